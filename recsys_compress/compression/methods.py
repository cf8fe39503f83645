"""The compression methods by name: one registry that config validation, the compression
callback, the experiment scripts, the report and the tests all read (as PEFT's tuner registry).

Adding a method is one function here and one entry in ``METHODS``. A low-rank method says in
which input-space transform S it truncates the SVD of W S (``low_rank.InputTransform``): its
factors, the spectrum the global rank allocations rank directions by and the loss-driven
allocation's per-direction loss changes all follow from it; a pruning method says which weights
it keeps; quantisation keeps every weight in int8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from recsys_compress.compression.calibration import InputStats
from recsys_compress.compression.names import METHOD_KINDS
from recsys_compress.compression.low_rank import (
    Factorization,
    InputTransform,
    asvd_transform,
    factorize,
    identity_transform,
    singular_loss_changes,
    singular_values,
    whitening_transform,
)
from recsys_compress.compression.pruning import magnitude_mask, wanda_mask


@dataclass(frozen=True)
class LowRank:
    """W ~ A B at a rank, the truncated SVD of W S; ``transform(stats, asvd_alpha)`` builds the
    method's input-space S (``low_rank.InputTransform``), from which follow the factors, the
    spectrum the global allocations rank directions by, and each direction's first-order loss
    change when removed (``low_rank.singular_loss_changes``; G the loss gradient w.r.t. W)."""
    transform: Callable[[InputStats, float], InputTransform]
    kind: ClassVar[str] = "low_rank"

    def factorize(self, W: torch.Tensor, rank: int, stats: InputStats, asvd_alpha: float) -> Factorization:
        return factorize(W, rank, self.transform(stats, asvd_alpha))

    def spectrum(self, W: torch.Tensor, stats: InputStats, asvd_alpha: float) -> torch.Tensor:
        # for odllm their squares are exactly each direction's output error on the calibration tokens
        return singular_values(self.transform(stats, asvd_alpha).weight(W))

    def loss_changes(self, W: torch.Tensor, G: torch.Tensor, stats: InputStats, asvd_alpha: float) -> torch.Tensor:
        t = self.transform(stats, asvd_alpha)
        return singular_loss_changes(t.weight(W), t.gradient(G))


@dataclass(frozen=True)
class Pruning:
    """Zero all but a fraction of the weights; ``mask(W, ratio, stats)`` is 1 where kept."""
    mask: Callable[[torch.Tensor, float, InputStats], torch.Tensor]
    kind: ClassVar[str] = "pruning"


@dataclass(frozen=True)
class Quantization:
    """Every weight kept, in int8 (dynamic quantisation); no calibration."""
    kind: ClassVar[str] = "quantization"


def _plain(stats: InputStats, alpha: float) -> InputTransform:
    return identity_transform()


def _activation_aware(stats: InputStats, alpha: float) -> InputTransform:
    return asvd_transform(stats.abs_mean, alpha)


def _whitening(stats: InputStats, alpha: float) -> InputTransform:
    return whitening_transform(stats.gram)


def _magnitude(W: torch.Tensor, ratio: float, stats: InputStats) -> torch.Tensor:
    return magnitude_mask(W, ratio)


def _wanda(W: torch.Tensor, ratio: float, stats: InputStats) -> torch.Tensor:
    return wanda_mask(W, ratio, stats.gram.diagonal())


METHODS: dict[str, LowRank | Pruning | Quantization] = {
    "svd": LowRank(_plain),                  # plain truncated SVD (S = I)
    "asvd": LowRank(_activation_aware),      # input channels scaled by mean|x|^alpha
    "odllm": LowRank(_whitening),            # OD-LLM: SVD of W S, S S^T = input Gram
    "prune_magnitude": Pruning(_magnitude),  # baseline: keep the largest |W|
    "wanda": Pruning(_wanda),                # baseline: keep the largest |W| x ||x||
    "int8": Quantization(),                  # baseline: int8 dynamic quantisation
}


def names(kind: str | None = None) -> tuple[str, ...]:
    """The registered method names (of one ``kind``: low_rank, pruning, quantization)."""
    return tuple(n for n, m in METHODS.items() if kind is None or m.kind == kind)


LOW_RANK_METHODS = names("low_rank")
PRUNING_METHODS = names("pruning")
# The config validates against names.METHOD_KINDS (torch-free): the registry must say the same.
if {n: m.kind for n, m in METHODS.items()} != METHOD_KINDS:
    raise RuntimeError("compression.methods.METHODS and compression.names.METHOD_KINDS disagree: "
                       f"{ {n: m.kind for n, m in METHODS.items()} } vs {METHOD_KINDS}")


def get_method(name: str) -> LowRank | Pruning | Quantization:
    if name not in METHODS:
        raise ValueError(f"compression.method={name!r} is not allowed; allowed: {', '.join(METHODS)}")
    return METHODS[name]
