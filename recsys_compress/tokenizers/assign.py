"""Reading items' code tuples off a trained RQ-VAE: Sinkhorn-balanced last level, collisions.

- **Uniform semantic mapping** (LC-Rec): the last level's codes are assigned by Sinkhorn-Knopp
  on the distances between the items' last residuals and the last codebook, so that the codes
  are used about equally (entropic optimal transport to uniform marginals), not by nearest code.
- **Collisions** (two items, one tuple), by choice:
  ``lcrec``: up to ``rounds`` rounds, each re-assigning the last code of the items of every
  colliding group by Sinkhorn over that group alone (a group of n items spread over n codes);
  what still collides after that is kept and counted (LC-Rec's "duplicate items");
  ``tiger``: one extra code per item, its position within its colliding group (0 for an item
  whose tuple is its own), so every tuple is unique and one level longer. A loaded index has no
  RQ-VAE behind it: only ``tiger`` applies to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from recsys_compress.data.lcrec import colliding_groups
from recsys_compress.tokenizers.config import SINKHORN_EPSILON, SINKHORN_ITERATIONS
from recsys_compress.tokenizers.rqvae import RQVAE

def sinkhorn(distances: torch.Tensor, epsilon: float = SINKHORN_EPSILON,
             iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """``[items, codes]`` transport plan with every code's column summing to items / codes and
    every item's row to 1: Sinkhorn-Knopp on exp(-d / epsilon), the distances first centred and
    scaled to [-1, 1] (so ``epsilon`` means the same whatever the distances' scale). At LC-Rec's
    epsilon 0.003 its 50 iterations leave the plan far from balanced (512 points all nearest one
    of 8 codes: 47-111 per code); 200 reach 63-66 (tests/test_tokenizers.py)."""
    d = distances.double()
    middle = (d.max() + d.min()) / 2
    d = (d - middle) / (d.max() - middle + 1e-5)
    n, k = d.shape
    # in log space: exp(-1 / 0.003) underflows float64
    log_q = -d / epsilon
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, 0, keepdim=True) + torch.log(torch.tensor(n / k, dtype=d.dtype))
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True)
    return log_q.exp()


def _last_level(model: RQVAE, residual: torch.Tensor, epsilon: float | None, iterations: int) -> torch.Tensor:
    distances = torch.cdist(residual, model.codebooks[-1])
    if not epsilon:
        return distances.argmin(1)
    return sinkhorn(distances, epsilon, iterations).argmax(1)


@torch.no_grad()
def assign_codes(model: RQVAE, embeddings: torch.Tensor, epsilon: float | None = SINKHORN_EPSILON,
                 iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """``[items, levels]`` codes: nearest codes on the first levels, the last by Sinkhorn
    (``epsilon`` null or 0: nearest there too)."""
    model.eval()
    first, residual = model.residuals(embeddings)
    return torch.cat([first, _last_level(model, residual, epsilon, iterations)[:, None]], 1)


@torch.no_grad()
def resolve_collisions_lcrec(model: RQVAE, embeddings: torch.Tensor, codes: torch.Tensor, rounds: int = 20,
                             epsilon: float | None = SINKHORN_EPSILON, iterations: int = SINKHORN_ITERATIONS
                             ) -> tuple[torch.Tensor, int]:
    """LC-Rec's re-assignment rounds; returns the codes and the rounds run. They spread a group by
    Sinkhorn whatever the first assignment used (``epsilon`` null: LC-Rec's 0.003): nearest codes
    would give the group its shared code back."""
    epsilon = epsilon or SINKHORN_EPSILON
    codes = codes.clone()
    _, residual = model.residuals(embeddings)
    for done in range(rounds):
        groups = colliding_groups({str(i): tuple(row) for i, row in enumerate(codes.tolist())})
        if not groups:
            return codes, done
        for group in groups:
            members = torch.tensor([int(i) for i in group])
            codes[members, -1] = _last_level(model, residual[members], epsilon, iterations)
    return codes, rounds


def disambiguate_tiger(index: Mapping[str, Sequence[str]], token: str | None = None) -> dict[str, tuple[str, ...]]:
    """TIGER's extra code: every tuple gets one more token, the item's position within the items
    that share its tuple (in the index's order). ``token``: the extra level's letter (default: the
    letter after the last level's)."""
    tuples = {item: tuple(t) for item, t in index.items()}
    letter = token or chr(ord(next(iter(tuples.values()))[-1][1]) + 1)
    seen: dict[tuple[str, ...], int] = {}
    out = {}
    for item, t in tuples.items():
        position = seen.get(t, 0)
        seen[t] = position + 1
        out[item] = (*t, f"<{letter}_{position}>")
    return out


def code_tokens(codes: torch.Tensor) -> list[tuple[str, ...]]:
    """``[items, levels]`` codes as LC-Rec's tokens: level l's code c is ``<{a + l}_{c}>``."""
    return [tuple(f"<{chr(ord('a') + level)}_{c}>" for level, c in enumerate(row)) for row in codes.tolist()]


def codes_from_tokens(tuples: Sequence[Sequence[str]]) -> torch.Tensor:
    """The inverse of ``code_tokens``: LC-Rec tokens (``<a_137>``, level l's letter ``a + l``) as
    an ``[items, levels]`` tensor of codes; every tuple must have the same levels in order."""
    rows = []
    for number, tokens in enumerate(tuples):
        row = []
        for level, token in enumerate(tokens):
            letter, _, code = token.strip("<>").partition("_")
            if letter != chr(ord("a") + level) or not code.isdigit():
                raise ValueError(f"tuple {number} {tuple(tokens)}: token {level} is {token!r}, expected "
                                 f"<{chr(ord('a') + level)}_CODE>")
            row.append(int(code))
        rows.append(row)
    if len({len(r) for r in rows}) > 1:
        raise ValueError(f"the tuples have {sorted({len(r) for r in rows})} levels: every item needs the same number")
    return torch.tensor(rows, dtype=torch.long)
