"""Non-learned baselines evaluated under exactly the same protocol as the models."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from recsys_compress.evaluation.ranking import FullRankingMetrics


@torch.no_grad()
def evaluate_popularity(
    item_counts: torch.Tensor,
    batches: Iterable[dict[str, torch.Tensor]],
    exclude_seen: bool = True,
    hr_ks: tuple[int, ...] = (1, 5, 10, 20),
    ndcg_ks: tuple[int, ...] = (5, 10, 20),
) -> dict[str, float]:
    """Rank every item by its number of training interactions, for every user."""
    metrics = FullRankingMetrics(hr_ks, ndcg_ks)
    scores = item_counts.float()[None]
    for batch in batches:
        target = batch["target"]
        metrics.update(scores.expand(len(target), -1), target, batch["seen"] if exclude_seen else None)
    return {k: float(v) for k, v in metrics.compute().items()}
