"""Full-ranking next-item metrics: HR@K, NDCG@K and MRR over the whole catalogue.

With one relevant item per user, every metric is a function of the target's rank, so we
keep only ranks (not B x n_items score matrices, as torchmetrics' retrieval metrics would)
and reduce sums across processes through ``torchmetrics.Metric``. ``tests/test_metrics.py``
checks these numbers against torchmetrics' retrieval metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torchmetrics import Metric


def mask_scores(
    scores: torch.Tensor, target: torch.Tensor, seen: torch.Tensor | None
) -> torch.Tensor:
    """Exclude padding item 0 and (if given) every seen item, but never the target itself.

    Keeping the target rankable matters only for datasets with repeat consumption; there,
    turn ``evaluation.exclude_seen`` off to rank repeats fairly.
    """
    rows = torch.arange(scores.shape[0], device=scores.device)
    target_score = scores[rows, target]
    scores = scores.clone()
    if seen is not None:
        scores.scatter_(1, seen, float("-inf"))
    scores[:, 0] = float("-inf")
    scores[rows, target] = target_score
    return scores


def target_ranks(scores: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Items scored strictly above the target, and other items tied with it, per row."""
    target_score = scores.gather(1, target[:, None])
    ahead = (scores > target_score).sum(1)
    ties = (scores == target_score).sum(1) - 1
    return ahead, ties


def metrics_from_ranks(
    ahead: torch.Tensor, ks: Sequence[int], ties: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-example HR@K, NDCG@K (K in ``ks``) and MRR of one relevant item.

    With ``ties`` other items scored exactly like the target, its 0-based rank is uniform on
    ``ahead .. ahead + ties`` (random tie-breaking) and we return the exact expectation, so a
    constant model scores like random ranking instead of perfectly (optimistic ties) or
    worst (pessimistic ties). Without ties this is the usual rank-based formula.
    """
    ahead = ahead.double()
    ties = torch.zeros_like(ahead) if ties is None else ties.double()
    n = ties + 1.0
    out = {}
    for k in ks:
        # D(j) = sum of discounts 1/log2(r + 2) over ranks r < j, for j in 0..k.
        discounts = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=ahead.device) + 2.0)
        cum = torch.cat([discounts.new_zeros(1), discounts.cumsum(0)])
        lo = ahead.clamp(max=k).long()
        hi = (ahead + n).clamp(max=k).long()
        out[f"hr@{k}"] = (hi - lo).double() / n
        out[f"ndcg@{k}"] = (cum[hi] - cum[lo]) / n
    # sum_{r=a}^{a+t} 1/(r+1) = H(a+t+1) - H(a), with H(m) = digamma(m+1) + Euler's gamma.
    out["mrr"] = (torch.digamma(ahead + n + 1.0) - torch.digamma(ahead + 1.0)) / n
    return out


class FullRankingMetrics(Metric):
    """Accumulates HR@K, NDCG@K and MRR over batches of target ranks (or of full-catalogue scores)."""

    full_state_update = False
    higher_is_better = True

    def __init__(
        self,
        hr_ks: Sequence[int] = (1, 5, 10, 20),
        ndcg_ks: Sequence[int] = (5, 10, 20),
        keep_per_example: str | None = None,
        **kwargs,
    ):
        """``keep_per_example``: a metric name (e.g. ``ndcg@10``) whose per-example values are
        also kept, in update order, for paired statistics (``per_example()``)."""
        super().__init__(**kwargs)
        self.hr_ks, self.ndcg_ks = tuple(hr_ks), tuple(ndcg_ks)
        self.names = [f"hr@{k}" for k in self.hr_ks] + [f"ndcg@{k}" for k in self.ndcg_ks] + ["mrr"]
        if keep_per_example is not None and keep_per_example not in self.names:
            raise ValueError(f"keep_per_example={keep_per_example!r}; allowed: {', '.join(self.names)}")
        self.keep_per_example = keep_per_example
        for name in self.names:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if keep_per_example is not None:
            self.add_state("kept", default=[], dist_reduce_fx="cat")

    def update(
        self, scores: torch.Tensor, target: torch.Tensor, seen: torch.Tensor | None = None
    ) -> None:
        """Add a batch of full-catalogue ``scores`` (B x (n_items + 1), index 0 = padding)."""
        self.update_ranks(*target_ranks(mask_scores(scores.float(), target, seen), target))

    def update_ranks(self, ahead: torch.Tensor, ties: torch.Tensor | None = None) -> None:
        """Add a batch of target ranks: items ranked strictly ahead of each target, and tied with it."""
        per_example = metrics_from_ranks(ahead, sorted(set(self.hr_ks) | set(self.ndcg_ks)), ties)
        for name in self.names:
            setattr(self, name, getattr(self, name) + per_example[name].sum())
        self.count += ahead.numel()
        if self.keep_per_example is not None:
            self.kept.append(per_example[self.keep_per_example])

    def per_example(self) -> torch.Tensor:
        """The kept metric of every example so far (gathered across processes), in order."""
        if self.keep_per_example is None:
            raise RuntimeError("this metric keeps no per-example values (keep_per_example=None)")
        kept = self.kept
        if isinstance(kept, torch.Tensor):  # torchmetrics has synced the list into one tensor
            return kept
        return torch.cat(kept) if kept else torch.zeros(0, dtype=torch.float64)

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.clamp(min=1)
        return {name: (getattr(self, name) / n).float() for name in self.names}


@torch.no_grad()
def evaluate_scorer(
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[dict[str, torch.Tensor]],
    exclude_seen: bool = True,
    hr_ks: Sequence[int] = (1, 5, 10, 20),
    ndcg_ks: Sequence[int] = (5, 10, 20),
) -> tuple[dict[str, float], torch.Tensor]:
    """Both protocols of a scorer in one pass, as the models' test step reports them.

    ``score(input_ids, attention_mask) -> B x (n_items + 1)`` scores of a batch (a model, an
    exported artefact, a baseline). Returns the configured protocol's metrics (``ndcg@10``,
    ...), the same under ``seen_excluded/`` and ``seen_kept/``, and the configured protocol's
    per-user NDCG@10 in batch order (for paired intervals against another scorer)."""
    configured = FullRankingMetrics(hr_ks, ndcg_ks, keep_per_example="ndcg@10")
    other = FullRankingMetrics(hr_ks, ndcg_ks)
    for batch in batches:
        scores, target, seen = score(batch["input_ids"], batch["attention_mask"]), batch["target"], batch["seen"]
        configured.update(scores, target, seen if exclude_seen else None)
        other.update(scores, target, None if exclude_seen else seen)
    return _both_protocols(configured, other, exclude_seen)


def evaluate_ranker(
    rank: Callable[[dict[str, torch.Tensor], bool], tuple[torch.Tensor, torch.Tensor]],
    batches: Iterable[dict[str, torch.Tensor]],
    exclude_seen: bool = True,
    hr_ks: Sequence[int] = (1, 5, 10, 20),
    ndcg_ks: Sequence[int] = (5, 10, 20),
) -> tuple[dict[str, float], torch.Tensor]:
    """``evaluate_scorer`` for a recommender that ranks rather than scores (a beam search):
    ``rank(batch, exclude_seen) -> (ahead, ties)`` of each target, once per protocol."""
    configured = FullRankingMetrics(hr_ks, ndcg_ks, keep_per_example="ndcg@10")
    other = FullRankingMetrics(hr_ks, ndcg_ks)
    for batch in batches:
        configured.update_ranks(*rank(batch, exclude_seen))
        other.update_ranks(*rank(batch, not exclude_seen))
    return _both_protocols(configured, other, exclude_seen)


def _both_protocols(configured: FullRankingMetrics, other: FullRankingMetrics,
                    exclude_seen: bool) -> tuple[dict[str, float], torch.Tensor]:
    first, second = configured.compute(), other.compute()
    excluded, kept = (first, second) if exclude_seen else (second, first)
    out = {k: float(v) for k, v in first.items()}
    out.update({f"seen_excluded/{k}": float(v) for k, v in excluded.items()})
    out.update({f"seen_kept/{k}": float(v) for k, v in kept.items()})
    return out, configured.per_example()
