"""The calibration loss's gradient with respect to each targeted weight: what the ``zero_sum``
rank allocation (ZS-SVD) scores singular directions by.

One backward pass per calibration batch through the uncompressed model, the per-batch
gradients of the batch-mean loss averaged over batches (as ZS-SVD averages them). The sums are
float64 on the CPU: a copy of every targeted weight at twice its float32 size (SmolLM2-135M:
~0.85 GB), which is why gradient-driven allocation is for models of this size, not 7B ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def loss_gradients(
    model: nn.Module, layer_names: Sequence[str], batches: Sequence[dict[str, torch.Tensor]],
    loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Per layer name, the mean over ``batches`` of d loss(batch) / d weight (float64, CPU).

    The weights' ``requires_grad`` flags are restored afterwards (a merged or frozen model's
    weights usually do not require gradients); nothing else of the model changes."""
    if not batches:
        raise ValueError("loss gradients need at least one calibration batch")
    weights = {name: model.get_submodule(name).weight for name in layer_names}
    flags = {name: w.requires_grad for name, w in weights.items()}
    sums = {name: torch.zeros(w.shape, dtype=torch.float64) for name, w in weights.items()}
    try:
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                grads = torch.autograd.grad(loss(batch), list(weights.values()), allow_unused=True)
                for name, g in zip(weights, grads):
                    if g is not None:  # a layer the loss does not reach has a zero gradient
                        sums[name] += g.detach().double().cpu()
    finally:
        for name, w in weights.items():
            w.requires_grad_(flags[name])
    return {name: s / len(batches) for name, s in sums.items()}
