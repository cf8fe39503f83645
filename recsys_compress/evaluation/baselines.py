"""Non-learned baselines evaluated under exactly the same protocol as the models."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from recsys_compress.evaluation.ranking import evaluate_scorer


@torch.no_grad()
def evaluate_popularity(
    item_counts: torch.Tensor,
    batches: Iterable[dict[str, torch.Tensor]],
    exclude_seen: bool = True,
    hr_ks: tuple[int, ...] = (1, 5, 10, 20),
    ndcg_ks: tuple[int, ...] = (5, 10, 20),
) -> dict[str, float]:
    """Rank every item by its number of training interactions, for every user."""
    counts = item_counts.float()[None]
    values, _ = evaluate_scorer(lambda ids, mask: counts.expand(len(ids), -1), batches, exclude_seen, hr_ks, ndcg_ks)
    return {k: v for k, v in values.items() if "/" not in k}  # the configured protocol
