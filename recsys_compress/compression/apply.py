"""Replace targeted ``nn.Linear`` layers by ``LowRankLinear`` and report what it cost."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from recsys_compress.compression.allocation import DENSE, GRADIENT_ALLOCATIONS, allocate_ranks
from recsys_compress.compression.calibration import InputStats
from recsys_compress.compression.low_rank import LowRankLinear
from recsys_compress.compression.methods import LOW_RANK_METHODS, PRUNING_METHODS, LowRank, Pruning, get_method


@dataclass
class LayerReport:
    name: str
    out_features: int
    in_features: int
    rank: int  # 0 for pruning (no factorisation)
    energy_kept: float  # nan for pruning  # of the singular values of W S (S = I for plain SVD)
    rel_output_error: float  # ||(W - W') X||_F / ||W X||_F on the calibration tokens
    params_before: int
    params_after: int
    jitter: float
    seconds: float
    # The same error on tokens of users the calibration never saw (nan without held-out data).
    heldout_rel_output_error: float = float("nan")
    dense: bool = False  # a global allocation kept the matrix whole (past its break-even rank)

    def as_dict(self) -> dict:
        return asdict(self)


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - W') X||_F / ||W X||_F computed exactly from the Gram matrix C = X X^T."""
    D = (W.double() - W_hat.double())
    num = torch.einsum("ij,jk,ik->", D, gram, D)
    den = torch.einsum("ij,jk,ik->", W.double(), gram, W.double())
    return float((num.clamp(min=0) / den.clamp(min=1e-300)).sqrt())


def _heldout_error(W: torch.Tensor, W_hat: torch.Tensor, heldout: dict[str, InputStats] | None, name: str) -> float:
    s = heldout.get(name) if heldout else None
    if s is None or s.gram is None or s.tokens == 0:
        return float("nan")
    return relative_output_error(W, W_hat, s.gram.to(W.device))


def _finite_weight(model: nn.Module, name: str) -> torch.Tensor:
    W = model.get_submodule(name).weight
    if not torch.isfinite(W).all():
        raise FloatingPointError(f"non-finite weight in layer {name}")
    return W


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def layer_spectra(model: nn.Module, layer_names: list[str], method: str, stats: dict[str, InputStats],
                  asvd_alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Per layer, the singular values the low-rank ``method`` truncates (what global allocations
    rank directions by), computed where the weight lives and kept on the CPU."""
    low_rank = get_method(method)
    spectra = {}
    for name in layer_names:
        W = model.get_submodule(name).weight
        spectra[name] = low_rank.spectrum(W, stats[name].to(W.device), asvd_alpha).cpu()
    return spectra


@torch.no_grad()
def direction_scores(model: nn.Module, layer_names: list[str], method: str, allocation: str,
                     stats: dict[str, InputStats], asvd_alpha: float = 0.5,
                     gradients: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
    """What ``allocation`` ranks each layer's singular directions by (``allocate_ranks``'s
    ``scores``): nothing for ``uniform``, the spectra for the global rules, each direction's
    first-order loss change for the gradient-driven ones (``gradients``: the calibration
    loss's gradient per layer, ``sensitivity.loss_gradients``)."""
    if allocation == "uniform":
        return None
    if allocation not in GRADIENT_ALLOCATIONS:
        return layer_spectra(model, layer_names, method, stats, asvd_alpha)
    if gradients is None or not set(layer_names) <= set(gradients):
        raise ValueError(f"compression.allocation={allocation} needs the calibration loss's gradient of every "
                         "targeted layer (compression/sensitivity.py)")
    low_rank = get_method(method)
    changes = {}
    for name in layer_names:
        W = model.get_submodule(name).weight
        changes[name] = low_rank.loss_changes(W, gradients[name].to(W.device), stats[name].to(W.device),
                                              asvd_alpha).cpu()
    return changes


@torch.no_grad()
def compress_low_rank(
    model: nn.Module,
    layer_names: list[str],
    method: str,
    ratio: float,
    stats: dict[str, InputStats],
    asvd_alpha: float = 0.5,
    heldout: dict[str, InputStats] | None = None,
    allocation: str = "uniform",
    min_rank: int = 1,
    ranks: dict[str, int] | None = None,
    rank_align: int = 1,
    gradients: dict[str, torch.Tensor] | None = None,
) -> list[LayerReport]:
    """Factorise every layer in ``layer_names`` in place; returns one report per layer.

    ``allocation`` sets each layer's rank (``compression/allocation.py``): one ``ratio`` for
    every layer, or one budget over all of them, where a layer may also stay dense.
    ``ranks``: ranks already allocated (sequential compression allocates over every block
    before it factorises the first); ``allocation`` and ``rank_align`` are then not consulted.
    ``rank_align``: every rank a multiple of it, within the same budget (``align_ranks``).
    ``heldout``: input statistics of tokens outside the calibration set, on which each
    layer's output error is measured too. ``gradients``: the calibration loss's gradient per
    layer, for the gradient-driven allocations (``zero_sum``)."""
    low_rank = get_method(method)
    if not isinstance(low_rank, LowRank):
        raise ValueError(f"compression.method={method!r} is not low-rank; allowed: {', '.join(LOW_RANK_METHODS)}")
    # from the layers themselves: k/v are narrower under grouped-query attention
    shapes = {name: tuple(_finite_weight(model, name).shape) for name in layer_names}
    if ranks is None:
        scores = direction_scores(model, layer_names, method, allocation, stats, asvd_alpha, gradients)
        ranks = allocate_ranks(shapes, scores, ratio, allocation, min_rank, rank_align)
    reports = []
    for name in layer_names:
        t0 = time.perf_counter()
        linear = model.get_submodule(name)
        W = linear.weight
        m, n = shapes[name]
        rank = ranks[name]
        if rank == DENSE:
            reports.append(LayerReport(name, m, n, min(m, n), 1.0, 0.0, m * n, m * n, 0.0,
                                       time.perf_counter() - t0, 0.0 if heldout else float("nan"), dense=True))
            continue
        if rank < 1:
            raise ValueError(
                f"ratio={ratio} gives rank 0 for layer {name} ({m} x {n}); the smallest ratio that "
                f"keeps rank 1 there is {(m + n) / (m * n):.4f}"
            )
        s = stats[name].to(W.device)  # summed on the CPU; factorised where the weight lives
        fac = low_rank.factorize(W, rank, s, asvd_alpha)
        low = LowRankLinear.from_factors(fac.A, fac.B, linear.bias)
        error = relative_output_error(W, fac.A @ fac.B, s.gram) if s.gram is not None else float("nan")
        _set_module(model, name, low)
        reports.append(LayerReport(
            name, m, n, rank, fac.energy_kept, error, m * n, rank * (m + n), fac.jitter,
            time.perf_counter() - t0, _heldout_error(W, fac.A @ fac.B, heldout, name),
        ))
    return reports


@torch.no_grad()
def prune_layers(
    model: nn.Module, layer_names: list[str], method: str, ratio: float, stats: dict[str, InputStats],
    heldout: dict[str, InputStats] | None = None,
) -> list[LayerReport]:
    """Zero all but a ``ratio`` of every targeted layer's weights (magnitude or Wanda)."""
    pruning = get_method(method)
    if not isinstance(pruning, Pruning):
        raise ValueError(f"compression.method={method!r} is not pruning; allowed: {', '.join(PRUNING_METHODS)}")
    reports = []
    for name in layer_names:
        t0 = time.perf_counter()
        W = _finite_weight(model, name)
        s = stats[name].to(W.device)
        gram = s.gram
        mask = pruning.mask(W, ratio, s)
        original = W.detach().clone()
        W.mul_(mask)
        m, n = W.shape
        error = relative_output_error(original, W, gram) if gram is not None else float("nan")
        reports.append(LayerReport(name, m, n, 0, float("nan"), error, m * n, int(mask.sum()), 0.0,
                                   time.perf_counter() - t0, _heldout_error(original, W, heldout, name)))
    return reports


def quantize_int8(model: nn.Module, layer_names: list[str]) -> nn.Module:
    """Dynamic int8 quantisation (int8 weights, activations quantised per batch) of exactly
    the named linear layers, in place. CPU only.

    Uses ``torch.ao.quantization.quantize_dynamic``, deprecated in favour of torchao but
    still shipped with torch 2.13; the embeddings and the item head stay in float.
    """
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, set(layer_names), dtype=torch.qint8, inplace=True)
