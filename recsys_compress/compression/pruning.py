"""Unstructured pruning baselines: magnitude pruning and Wanda (Sun et al., 2023).

``ratio`` is the fraction of each targeted matrix's weights KEPT (the same budget as the
low-rank methods); pruned weights are set to zero in place.
"""

from __future__ import annotations

import math

import torch


def magnitude_mask(W: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the floor(ratio * m * n) largest |W_ij| of the layer."""
    keep = math.floor(ratio * W.numel())
    mask = torch.zeros(W.numel(), dtype=torch.bool, device=W.device)
    mask[W.abs().flatten().topk(keep).indices] = True
    return mask.view_as(W)


def wanda_mask(W: torch.Tensor, ratio: float, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """Keep, in every output row, the floor(ratio * n) largest |W_ij| * ||x_j||_2.

    ``input_sq_sum`` is sum_t x_tj^2 over the calibration tokens (the Gram diagonal).
    Wanda compares weights per output row, not across the whole layer.
    """
    score = W.abs().double() * input_sq_sum.double().sqrt()[None, :]
    keep = math.floor(ratio * W.shape[1])
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask.scatter_(1, score.topk(keep, dim=1).indices, True)
    return mask
