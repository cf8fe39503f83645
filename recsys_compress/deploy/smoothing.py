"""SmoothQuant-style equalisation of each MLP's down-projection input, before int8 export.

Dynamic int8 quantises a matmul's input with one scale per call, set by its largest value.
In a LLaMA MLP the down projection reads h = act(gate(x)) * up(x), and a few channels of h run
far larger than the rest (SmolLM2: keeping every ``down_proj`` float halved the int8 artefact's
score error, 0.34 -> 0.16, where any other kind of projection moved it 0.01-0.05; BENCHMARKS.md,
"Per-channel int8 weights"). One scale fitted to those channels rounds all the others coarsely.

SmoothQuant (Xiao et al., 2023) moves the range into the weight: per input channel j,

    s_j = max|h_j|^alpha / max|W_j|^(1 - alpha)

(max|h_j| over calibration tokens, max|W_j| over the j-th input column of the matrix h meets),
then h_j / s_j and W[:, j] * s_j. Here h_j / s_j comes from dividing row j of ``up_proj`` (its
output channel j, bias included), which h multiplies elementwise, so the model computes the
same function in float (up to rounding) and the graph gains no operator. For a low-rank model
the rows are those of ``up_proj.up`` and the columns those of ``down_proj.down``, the factors
that produce h and read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from recsys_compress.compression.calibration import collect_input_stats
from recsys_compress.compression.low_rank import LowRankLinear


def _output_layer(module: nn.Module) -> nn.Linear:
    """The linear layer whose output rows are ``module``'s output channels."""
    return module.up if isinstance(module, LowRankLinear) else module


def _input_weight(module: nn.Module) -> torch.Tensor:
    """The weight that multiplies ``module``'s input (out x in): the first factor of a low-rank layer."""
    return module.down.weight if isinstance(module, LowRankLinear) else module.weight


def mlp_down_projections(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """``{down_proj name: (up_proj, down_proj)}`` of every gated MLP (LLaMA's ``gate_proj``,
    ``up_proj``, ``down_proj``) whose up and down projections are linear or low-rank layers."""
    found = {}
    for name, module in model.named_modules():
        parts = [getattr(module, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if all(isinstance(p, (nn.Linear, LowRankLinear)) for p in parts):
            found[f"{name}.down_proj"] = (parts[1], parts[2])
    return found


def check_alpha(alpha: float) -> None:
    """``alpha``: how much of each input channel's range moves into the weight. At 1 every
    channel's input reaches the same maximum (1); at 0 every weight column does; at 0.5 each
    channel's input and weight column end with equal maxima."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"int8_smooth={alpha} is out of range; allowed: None (off) or 0 to 1")


def smoothing_scales(activation_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|h_j|^alpha / max|W_j|^(1 - alpha), float64. A channel that never fired, or
    whose weight column is zero, gets 1 (nothing to move)."""
    check_alpha(alpha)
    a, w = activation_max.double(), weight_max.double()
    scales = a.pow(alpha) / w.pow(1 - alpha)
    return torch.where((a > 0) & (w > 0) & torch.isfinite(scales), scales, torch.ones_like(scales))


@dataclass
class SmoothingReport:
    layers: int
    tokens: int
    # max_j |h_j| / median_j max|h_j|, the largest over layers: how far the outliers stand out
    # from a typical channel, before and after the fold (the range one int8 scale must cover)
    outlier_ratio_before: float
    outlier_ratio_after: float


@torch.no_grad()
def smooth_mlp_activations(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    forward: Callable[[dict[str, torch.Tensor]], object],
    alpha: float,
) -> SmoothingReport:
    """Fold SmoothQuant scales (``smoothing_scales``) into every gated MLP of ``model``, in
    place: the per-channel maxima of each ``down_proj`` input over the real tokens of
    ``forward(batch)`` for the ``batches``. The float function is unchanged; int8 quantisation of
    the result rounds the down projection's input on a narrower range."""
    pairs = mlp_down_projections(model)
    if not pairs:
        raise ValueError("export.int8_smooth folds into gated MLPs (gate_proj, up_proj, down_proj), "
                         "and this model has none: set export.int8_smooth=null")
    batches = list(batches)
    stats = collect_input_stats(model, list(pairs), batches, forward, len(batches), gram=False)
    tokens = next(iter(stats.values())).tokens
    if tokens == 0:
        raise ValueError("export.int8_smooth needs calibration tokens: the calibration batches held none")
    before = after = 0.0
    for name, (up_proj, down_proj) in pairs.items():
        h_max = stats[name].abs_max
        weight = _input_weight(down_proj)
        scales = smoothing_scales(h_max, weight.abs().amax(0), alpha)
        rows = _output_layer(up_proj)
        rows.weight.div_(scales.to(rows.weight.dtype)[:, None])
        if rows.bias is not None:
            rows.bias.div_(scales.to(rows.bias.dtype))
        weight.mul_(scales.to(weight.dtype)[None, :])
        median = float(h_max.median())
        if median > 0:
            before = max(before, float(h_max.max()) / median)
            smoothed = h_max / scales
            after = max(after, float(smoothed.max() / smoothed.median()))
    return SmoothingReport(len(pairs), tokens, before, after)
