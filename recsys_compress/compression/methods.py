"""The compression methods by name: one registry that config validation, the compression
callback, the experiment scripts, the report and the tests all read (as PEFT's tuner registry).

Adding a method is one function here and one entry in ``METHODS``. A low-rank method says how
it factorises a weight and which matrix's singular values it truncates (what the global rank
allocations rank directions by); a pruning method says which weights it keeps; quantisation
keeps every weight in int8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from recsys_compress.compression.calibration import InputStats
from recsys_compress.compression.low_rank import (
    Factorization,
    activation_aware_svd,
    asvd_scale,
    cholesky_with_jitter,
    plain_svd,
    singular_loss_changes,
    singular_values,
    whitened_svd,
)
from recsys_compress.compression.pruning import magnitude_mask, wanda_mask


@dataclass(frozen=True)
class LowRank:
    """W ~ A B at a rank; ``factorize(W, rank, stats, asvd_alpha)``, ``spectrum(W, stats,
    asvd_alpha)``: the singular values of the matrix the factorisation truncates;
    ``loss_changes(W, G, stats, asvd_alpha)``: each of its directions' first-order loss change
    when removed, G the loss gradient with respect to W (``low_rank.singular_loss_changes``)."""
    factorize: Callable[[torch.Tensor, int, InputStats, float], Factorization]
    spectrum: Callable[[torch.Tensor, InputStats, float], torch.Tensor]
    loss_changes: Callable[[torch.Tensor, torch.Tensor, InputStats, float], torch.Tensor]
    kind: ClassVar[str] = "low_rank"


@dataclass(frozen=True)
class Pruning:
    """Zero all but a fraction of the weights; ``mask(W, ratio, stats)`` is 1 where kept."""
    mask: Callable[[torch.Tensor, float, InputStats], torch.Tensor]
    kind: ClassVar[str] = "pruning"


@dataclass(frozen=True)
class Quantization:
    """Every weight kept, in int8 (dynamic quantisation); no calibration."""
    kind: ClassVar[str] = "quantization"


def _svd(W: torch.Tensor, rank: int, stats: InputStats, alpha: float) -> Factorization:
    return plain_svd(W, rank)


def _svd_spectrum(W: torch.Tensor, stats: InputStats, alpha: float) -> torch.Tensor:
    return singular_values(W.double())


def _asvd(W: torch.Tensor, rank: int, stats: InputStats, alpha: float) -> Factorization:
    return activation_aware_svd(W, rank, stats.abs_mean, alpha)


def _asvd_spectrum(W: torch.Tensor, stats: InputStats, alpha: float) -> torch.Tensor:
    return singular_values(W.double() * asvd_scale(stats.abs_mean, alpha))


def _whitened(W: torch.Tensor, rank: int, stats: InputStats, alpha: float) -> Factorization:
    return whitened_svd(W, rank, stats.gram)


def _whitened_spectrum(W: torch.Tensor, stats: InputStats, alpha: float) -> torch.Tensor:
    # their squares are exactly each direction's output error on the calibration tokens
    S, _ = cholesky_with_jitter(stats.gram)  # the factorisation reports the jitter
    return singular_values(W.double() @ S)


def _svd_loss_changes(W: torch.Tensor, G: torch.Tensor, stats: InputStats, alpha: float) -> torch.Tensor:
    return singular_loss_changes(W, G)


def _asvd_loss_changes(W: torch.Tensor, G: torch.Tensor, stats: InputStats, alpha: float) -> torch.Tensor:
    s = asvd_scale(stats.abs_mean, alpha)
    return singular_loss_changes(W.double() * s, G.double() / s)


def _whitened_loss_changes(W: torch.Tensor, G: torch.Tensor, stats: InputStats, alpha: float) -> torch.Tensor:
    S, _ = cholesky_with_jitter(stats.gram)
    # G S^-T = (S^-1 G^T)^T: one triangular solve, no inverse
    H = torch.linalg.solve_triangular(S, G.double().T, upper=False).T
    return singular_loss_changes(W.double() @ S, H)


def _magnitude(W: torch.Tensor, ratio: float, stats: InputStats) -> torch.Tensor:
    return magnitude_mask(W, ratio)


def _wanda(W: torch.Tensor, ratio: float, stats: InputStats) -> torch.Tensor:
    return wanda_mask(W, ratio, stats.gram.diagonal())


METHODS: dict[str, LowRank | Pruning | Quantization] = {
    "svd": LowRank(_svd, _svd_spectrum, _svd_loss_changes),                   # plain truncated SVD (S = I)
    "asvd": LowRank(_asvd, _asvd_spectrum, _asvd_loss_changes),               # input channels scaled by mean|x|^alpha
    "odllm": LowRank(_whitened, _whitened_spectrum, _whitened_loss_changes),  # OD-LLM: SVD of W S, S S^T = input Gram
    "prune_magnitude": Pruning(_magnitude),                                   # baseline: keep the largest |W|
    "wanda": Pruning(_wanda),                                                 # baseline: keep the largest |W| x ||x||
    "int8": Quantization(),                                                   # baseline: int8 dynamic quantisation
}


def names(kind: str | None = None) -> tuple[str, ...]:
    """The registered method names (of one ``kind``: low_rank, pruning, quantization)."""
    return tuple(n for n, m in METHODS.items() if kind is None or m.kind == kind)


LOW_RANK_METHODS = names("low_rank")
PRUNING_METHODS = names("pruning")


def get_method(name: str) -> LowRank | Pruning | Quantization:
    if name not in METHODS:
        raise ValueError(f"compression.method={name!r} is not allowed; allowed: {', '.join(METHODS)}")
    return METHODS[name]
