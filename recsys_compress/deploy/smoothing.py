"""SmoothQuant-style equalisation of the inputs int8 rounds, before int8 export.

Dynamic int8 quantises a matmul's input with one scale per call, set by its largest value, and a
few channels of a trained LLM's activations run far larger than the rest. In a LLaMA MLP the down
projection reads h = act(gate(x)) * up(x), the worst of them (SmolLM2: keeping every
``down_proj`` float halved the int8 artefact's score error, 0.34 -> 0.16; BENCHMARKS.md,
"Per-channel int8 weights"). One scale fitted to those channels rounds all the others coarsely.

SmoothQuant (Xiao et al., 2023) moves the range into the weights: per input channel j,

    s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)

(max|x_j| over calibration tokens, max|W_j| over the j-th input column of the matrices that read
x, the widest of them), then x_j / s_j and W[:, j] * s_j. The division is folded into what
produces x, so the model computes the same function in float (up to rounding) and the graph
gains no operator (``smoothing_groups``):

- the down projection's input: row j of ``up_proj`` (its output channel j, bias included), which
  h multiplies elementwise;
- the inputs of q/k/v and of gate/up, SmoothQuant's own placement: weight j of the RMSNorm before
  them (``input_layernorm``, ``post_attention_layernorm``), which scales its output channel j.

For a low-rank model the rows are those of ``up_proj.up`` and the columns those of each reader's
``down``, the factors that produce x and read it.
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


def _divide_output(producer: nn.Module, scales: torch.Tensor) -> None:
    """Divide ``producer``'s output channel j by ``scales[j]``: a linear layer's row j (and bias),
    or a norm's weight (and bias) j."""
    if _is_channel_norm(producer):
        params = [producer.weight, getattr(producer, "bias", None)]
    else:
        layer = _output_layer(producer)
        params = [layer.weight, layer.bias]
    for p in params:
        if p is not None:
            p.div_(scales.to(p.dtype).view(-1, *([1] * (p.dim() - 1))))


def _input_weight(module: nn.Module) -> torch.Tensor:
    """The weight that multiplies ``module``'s input (out x in): the first factor of a low-rank layer."""
    return module.down.weight if isinstance(module, LowRankLinear) else module.weight


# What the fold smooths: "mlp_down", the down projection's input (up_proj's output rows divided);
# "norm_inputs", the inputs of q/k/v and of gate/up (the RMSNorm before them divided), which is
# SmoothQuant's own placement (LayerNorm -> QKV and FC1).
SMOOTH_TARGETS = ("mlp_down", "norm_inputs")


@dataclass
class SmoothingGroup:
    """One input that int8 rounds: ``producer``'s output channel j is divided by s_j and each of
    ``readers``' input column j multiplied by it, which leaves the function unchanged."""

    target: str  # which of SMOOTH_TARGETS
    producer: nn.Module  # a linear (or low-rank) layer, or a norm with a per-channel weight
    readers: list[nn.Module]


def _is_channel_norm(module: nn.Module | None) -> bool:
    """A norm whose output is weight * f(x) (+ bias), per channel: RMSNorm, LayerNorm."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 1


def _projections(module: nn.Module | None, names: tuple[str, ...]) -> list[nn.Module] | None:
    found = [getattr(module, n, None) for n in names]
    return found if all(isinstance(p, (nn.Linear, LowRankLinear)) for p in found) else None


def smoothing_groups(model: nn.Module, targets: tuple[str, ...] = SMOOTH_TARGETS) -> dict[str, SmoothingGroup]:
    """``{name of the input's first reader: group}``, in the order to fold them, for every LLaMA block of ``model``
    (``SMOOTH_TARGETS``): a gated MLP's down projection reads act(gate) * up, q/k/v read
    ``input_layernorm`` and gate/up ``post_attention_layernorm``. The final norm is left alone:
    the item head it feeds shares its weight with the item embeddings."""
    unknown = set(targets) - set(SMOOTH_TARGETS)
    if unknown:
        raise ValueError(f"smoothing targets {sorted(unknown)}; allowed: {', '.join(SMOOTH_TARGETS)}")
    found = {}
    for name, module in model.named_modules():
        mlp = getattr(module, "mlp", None)
        mlp_parts = _projections(mlp, ("gate_proj", "up_proj", "down_proj"))
        qkv = _projections(getattr(module, "self_attn", None), ("q_proj", "k_proj", "v_proj"))
        # down_proj's first: its fold rescales up_proj's rows, and so the weight columns that the
        # gate/up input's scales are then balanced against (a dense up_proj is both)
        if "mlp_down" in targets and mlp_parts:
            found[f"{name}.mlp.down_proj"] = SmoothingGroup("mlp_down", mlp_parts[1], [mlp_parts[2]])
        if "norm_inputs" in targets and qkv and _is_channel_norm(getattr(module, "input_layernorm", None)):
            found[f"{name}.self_attn.q_proj"] = SmoothingGroup("norm_inputs", module.input_layernorm, qkv)
        if "norm_inputs" in targets and mlp_parts and _is_channel_norm(getattr(module, "post_attention_layernorm", None)):
            found[f"{name}.mlp.gate_proj"] = SmoothingGroup("norm_inputs", module.post_attention_layernorm, mlp_parts[:2])
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
    inputs: int  # the inputs smoothed (SmoothingGroup)
    tokens: int
    # per target, max_j |x_j| / median_j max|x_j|, the largest over its inputs: how far the
    # outliers stand out from a typical channel, before and after the fold (the range one int8
    # scale must cover)
    outlier_ratio_before: dict[str, float]
    outlier_ratio_after: dict[str, float]


@torch.no_grad()
def smooth_activations(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    forward: Callable[[dict[str, torch.Tensor]], object],
    alpha: float,
    targets: tuple[str, ...] = SMOOTH_TARGETS,
) -> SmoothingReport:
    """Fold SmoothQuant scales (``smoothing_scales``) into ``model`` in place, for each input of
    ``smoothing_groups(model, targets)``: the per-channel maxima of the input over the real
    tokens of ``forward(batch)`` for the ``batches``, and of its readers' weight columns. The
    float function is unchanged; int8 quantisation of the result rounds each input on a
    narrower range."""
    groups = smoothing_groups(model, targets)
    if not groups:
        raise ValueError("export.int8_smooth folds into LLaMA blocks (RMSNorm -> q/k/v and gate/up; up_proj -> "
                         "down_proj), and this model has none: set export.int8_smooth=null")
    batches = list(batches)
    # every input's statistics before any fold: each fold leaves the function, and so the
    # other inputs, as they were
    stats = collect_input_stats(model, list(groups), batches, forward, len(batches), gram=False)
    tokens = next(iter(stats.values())).tokens
    if tokens == 0:
        raise ValueError("export.int8_smooth needs calibration tokens: the calibration batches held none")
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    for name, group in groups.items():
        x_max = stats[name].abs_max
        weights = [_input_weight(r) for r in group.readers]
        scales = smoothing_scales(x_max, torch.stack([w.abs().amax(0) for w in weights]).amax(0), alpha)
        _divide_output(group.producer, scales)
        for w in weights:
            w.mul_(scales.to(w.dtype)[None, :])
        median = float(x_max.median())
        if median > 0:
            smoothed = x_max / scales
            before[group.target] = max(before.get(group.target, 0.0), float(x_max.max()) / median)
            after[group.target] = max(after.get(group.target, 0.0), float(smoothed.max() / smoothed.median()))
    return SmoothingReport(len(groups), tokens, before, after)
