"""Paired bootstrap intervals for metrics averaged over test users.

A retention figure (compressed NDCG@10 / base NDCG@10) on ~1,000 test users moves by 0.01-0.02
from seed to seed. Resampling the *users* (the same resampled users scored by both models)
gives an interval that says which differences such a figure can separate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def paired_bootstrap_ratio(
    base: torch.Tensor, other: torch.Tensor, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of ``mean(other) / mean(base)`` over users resampled with replacement.

    ``base[i]`` and ``other[i]`` are one user's metric under the two models (paired). A
    resample whose base mean is 0 is dropped (its ratio is undefined). Deterministic for a
    ``seed``. Identical inputs give the interval [1, 1].
    """
    if base.shape != other.shape or base.ndim != 1 or base.numel() == 0:
        raise ValueError(f"paired per-user values needed, got shapes {tuple(base.shape)} and {tuple(other.shape)}")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    generator = torch.Generator().manual_seed(seed)
    n = base.numel()
    base64, other64 = base.double().cpu(), other.double().cpu()
    # Resamples in blocks of ~2^22 indices, so memory stays bounded for any number of users.
    block = max(1, (1 << 22) // n)
    num, den = [], []
    for start in range(0, resamples, block):
        idx = torch.randint(0, n, (min(block, resamples - start), n), generator=generator)
        num.append(other64[idx].sum(1))
        den.append(base64[idx].sum(1))
    num, den = torch.cat(num), torch.cat(den)
    ratios = num[den > 0] / den[den > 0]
    if ratios.numel() == 0:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    low, high = torch.quantile(ratios, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return float(low), float(high)


def retention(
    base_value: float, value: float, base_per_user: torch.Tensor | None = None,
    per_user: torch.Tensor | None = None, key: str = "retention/ndcg@10", seed: int = 0,
) -> dict[str, float]:
    """``{key: value / base_value}`` (a zero base counts as 1e-12, so the figure stays finite),
    and, when both models' per-user values are given (the same users in the same order), the
    paired bootstrap interval of that ratio under ``key + "_ci_low"`` and ``key + "_ci_high"``.

    The one rule for every retention figure the project reports: eager and deployed runs, the
    compression table, the on-device benchmark.
    """
    out = {key: value / max(base_value, 1e-12)}
    if base_per_user is not None and per_user is not None:
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = paired_bootstrap_ratio(base_per_user, per_user, seed=seed)
    return out


def paired_median_ratio(
    base: Sequence[float], other: Sequence[float], resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """The per-round ratios ``other[i] / base[i]``: median, quartiles and a bootstrap interval.

    For timings measured side by side: round ``i`` timed both variants under the same machine
    load, so each ratio cancels that round's load. ``low``/``high`` is the percentile interval
    of the median ratio over rounds resampled with replacement; ``q1``/``q3`` the quartiles of
    the ratios themselves (their spread). Deterministic for a ``seed``.
    """
    if len(base) != len(other) or not base:
        raise ValueError(f"paired per-round values needed, got {len(base)} and {len(other)}")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    b, o = torch.tensor(base, dtype=torch.float64), torch.tensor(other, dtype=torch.float64)
    if (b <= 0).any():
        raise ValueError("base values must be positive")
    ratios = o / b
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, ratios.numel(), (resamples, ratios.numel()), generator=generator)
    medians = ratios[idx].quantile(0.5, dim=1)
    alpha = (1 - level) / 2
    q = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    q1, median, q3 = ratios.quantile(q).tolist()
    low, high = medians.quantile(torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return {"median": median, "q1": q1, "q3": q3, "low": low, "high": high, "rounds": ratios.numel()}
