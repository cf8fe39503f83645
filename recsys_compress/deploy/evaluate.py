"""The exported artefact itself on the test users: what a device running it would recommend.

A run's test metrics are the eager model's; the artefact is another program (the exported
graph, and for int8 onnxruntime's dynamic quantisation, not torch's), so its quality is
measured on its own, with the same protocol and batches (``evaluate_scorer``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from recsys_compress.deploy.generative import GenerativeRecommender
from recsys_compress.deploy.serve import open_artefact
from recsys_compress.evaluation.ranking import evaluate_ranker, evaluate_scorer


def evaluate_artefact(
    folder: str | Path,
    batches: Iterable[dict[str, torch.Tensor]],
    exclude_seen: bool = True,
    hr_ks: tuple[int, ...] = (1, 5, 10, 20),
    ndcg_ks: tuple[int, ...] = (5, 10, 20),
    threads: int | None = None,
    scores: list[np.ndarray] | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Both protocols' metrics of the artefact in ``folder`` and its per-user NDCG@10; each
    batch's scores are also appended to ``scores`` when given (to compare two artefacts
    user by user without ranking the users twice)."""
    rec = open_artefact(folder, threads=threads)
    if isinstance(rec, GenerativeRecommender):
        if scores is not None:
            raise ValueError(f"{folder} is a generative artefact: it ranks by beam search and gives no scores")
        return evaluate_ranker(rec.ranks, batches, exclude_seen, hr_ks, ndcg_ks)

    def score(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch_scores = rec.score_indices(input_ids.numpy(), attention_mask.numpy())
        if scores is not None:
            scores.append(batch_scores.copy())  # the metrics mask seen items in what they are given
        return torch.from_numpy(batch_scores)

    return evaluate_scorer(score, batches, exclude_seen, hr_ks, ndcg_ks)
