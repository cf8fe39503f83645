"""Sequential, memory-bounded compression: one decoder block at a time (SVD-LLM's layer-wise path).

The whole-model path hooks every targeted layer at once and holds every Gram matrix until
factorisation: for LLaMA-7B in float64, 32 x (3 x 4096^2 + 11008^2) x 8 bytes ~ 44 GB. Here

1. the calibration (and held-out) batches run through the embeddings only, up to the input of
   block 0 (a pre-hook stops the forward there; the GPTQ "catcher"); those hidden states and the
   arguments the model gives its blocks (causal mask, rotary embeddings) are kept on the CPU;
2. for each block in turn: its Gram matrices are accumulated from the cached hidden states, its
   linears are factorised (or pruned) and replaced, and the hidden states are propagated through
   the *compressed* block to become the next block's inputs, so each block is fitted to the
   error of the blocks below it, as it will see it when deployed; that block's statistics are
   then freed.

Only one block's statistics (calibration + held-out) are alive at a time; the activations cost
batches x batch_size x max_len x hidden x 4 bytes (README, "Memory at scale").

A global rank allocation needs every matrix's spectrum before the first factorisation: a first
pass over the blocks (propagating through the original blocks, so the spectra are exactly the
whole-model path's) keeps only the singular values (for ``zero_sum``, each direction's loss
change), then the second pass compresses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recsys_compress.models.blocks import decoder_blocks, layers_by_block, run_block
from recsys_compress.compression.allocation import allocate_ranks
from recsys_compress.compression.apply import LayerReport, compress_low_rank, direction_scores, prune_layers
from recsys_compress.compression.calibration import InputStats, collect_input_stats
from recsys_compress.compression.methods import LowRank, get_method
from recsys_compress.utils.memory import large_allocations_mapped, release_freed_memory

PROPAGATIONS = ("compressed", "original")


class _ReachedFirstBlock(Exception):
    """Raised by the catcher: nothing above the first block needs to run."""


def _to(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def first_block_inputs(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], forward: Callable[[dict], Any],
    store: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Per batch: the hidden state entering block 0, the block arguments and the token mask,
    on ``store``. ``forward(batch)`` runs the model; it stops at block 0."""
    first = decoder_blocks(model)[0]
    caught: dict[str, Any] = {}

    def catch(_module, args, kwargs):
        caught["hidden"] = args[0] if args else kwargs["hidden_states"]
        caught["kwargs"] = {k: v for k, v in kwargs.items()
                            if k not in ("hidden_states", "cache", "past_key_values", "past_key_value")}
        raise _ReachedFirstBlock

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    inputs = []
    try:
        for batch in batches:
            try:
                forward(batch)
            except _ReachedFirstBlock:
                pass
            else:
                raise RuntimeError("the forward never reached decoder block 0")
            inputs.append({"attention_mask": batch["attention_mask"].to(store),
                           "hidden": caught.pop("hidden").to(store), "kwargs": _to(caught.pop("kwargs"), store)})
    finally:
        handle.remove()
    return inputs


def _block_layers(model: nn.Module, layer_names: Sequence[str]) -> list[list[str]]:
    """``layer_names`` grouped by decoder block, in block order; a name outside every block fails."""
    grouped = layers_by_block(model, list(layer_names))
    if None in grouped:
        raise ValueError(f"compression.sequential=true compresses decoder blocks, and layer {grouped[None][0]} lies "
                         "outside them: exclude it (compression.exclude) or set compression.sequential=false")
    return [grouped.get(i, []) for i in range(len(decoder_blocks(model)))]


def _run(block: nn.Module, item: dict[str, Any]) -> torch.Tensor:
    """The block's output for one cached batch, computed on the block's device."""
    device = next(block.parameters()).device
    return run_block(block, item["hidden"].to(device), _to(item["kwargs"], device))


@torch.no_grad()
def _propagate(block: nn.Module, inputs: list[dict[str, Any]]) -> None:
    for item in inputs:
        item["hidden"] = _run(block, item).to(item["hidden"].device)


def _block_stats(model: nn.Module, block: nn.Module, names: list[str], inputs: list[dict[str, Any]],
                 gram_dtype: torch.dtype) -> dict[str, InputStats]:
    return collect_input_stats(model, names, inputs, forward=lambda item: _run(block, item),
                               max_batches=len(inputs), gram_dtype=gram_dtype)


@dataclass
class SequentialResult:
    reports: list[LayerReport]
    calib_tokens: int
    heldout_tokens: int
    rank_deficient_layers: int
    calibrate_seconds: float  # capture, statistics and propagation (factorisation excluded)
    spectra_pass: bool = False  # a global allocation's first pass ran


@torch.no_grad()
@large_allocations_mapped()  # a freed block's statistics and workspace leave the resident set at once
def compress_sequential(
    model: nn.Module,
    layer_names: Sequence[str],
    method: str,
    ratio: float,
    calibration: Sequence[dict[str, torch.Tensor]],
    heldout: Sequence[dict[str, torch.Tensor]],
    forward: Callable[[dict], Any],
    asvd_alpha: float = 0.5,
    allocation: str = "uniform",
    min_rank: int = 1,
    gram_dtype: torch.dtype = torch.float64,
    propagate: str = "compressed",
    rank_align: int = 1,
    gradients: dict[str, torch.Tensor] | None = None,
) -> SequentialResult:
    """Compress ``layer_names`` block by block (see the module docstring).

    ``forward(batch)`` runs the model on a batch (it is stopped at block 0). ``propagate``:
    ``compressed`` (the method) or ``original``, which feeds every block the original model's
    activations, so the factors equal the whole-model path's (the tests' check). ``gradients``:
    the calibration loss's gradient per layer, for the gradient-driven allocations."""
    if propagate not in PROPAGATIONS:
        raise ValueError(f"propagate={propagate!r}; allowed: {', '.join(PROPAGATIONS)}")
    kind = get_method(method)
    grouped = _block_layers(model, layer_names)
    blocks = decoder_blocks(model)
    t0 = time.perf_counter()
    factorize_seconds = 0.0

    ranks = None
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in layer_names}
    spectra_pass = isinstance(kind, LowRank) and allocation != "uniform"
    if spectra_pass:
        scores: dict[str, torch.Tensor] = {}
        inputs = first_block_inputs(model, calibration, forward)
        for block, names in zip(blocks, grouped):
            if names:
                stats = _block_stats(model, block, names, inputs, gram_dtype)
                t1 = time.perf_counter()
                scores.update(direction_scores(model, names, method, allocation, stats, asvd_alpha, gradients))
                factorize_seconds += time.perf_counter() - t1
                del stats
                release_freed_memory()
            _propagate(block, inputs)
        ranks = allocate_ranks(shapes, scores, ratio, allocation, min_rank, rank_align)
        del inputs, scores
    elif isinstance(kind, LowRank):  # aligned ranks share one budget over all blocks, as in the whole-model path
        ranks = allocate_ranks(shapes, None, ratio, allocation, min_rank, rank_align)

    calib_inputs = first_block_inputs(model, calibration, forward)
    heldout_inputs = first_block_inputs(model, heldout, forward) if heldout else []
    reports: list[LayerReport] = []
    calib_tokens = heldout_tokens = narrow = 0
    for block, names in zip(blocks, grouped):
        if names:
            stats = _block_stats(model, block, names, calib_inputs, gram_dtype)
            held = _block_stats(model, block, names, heldout_inputs, gram_dtype) if heldout_inputs else None
            calib_tokens = stats[names[0]].tokens
            heldout_tokens = held[names[0]].tokens if held else 0
            narrow += sum(stats[n].rank_deficient for n in names)
            if propagate == "original":
                _propagate(block, calib_inputs + heldout_inputs)
            t1 = time.perf_counter()
            if isinstance(kind, LowRank):
                reports += compress_low_rank(model, names, method, ratio, stats, asvd_alpha, held,
                                             ranks=None if ranks is None else {n: ranks[n] for n in names})
            else:
                reports += prune_layers(model, names, method, ratio, stats, held)
            factorize_seconds += time.perf_counter() - t1
            del stats, held  # one block's statistics at a time
            release_freed_memory()  # ... and their pages, or the heap's holes grow with depth
        if not names or propagate == "compressed":
            _propagate(block, calib_inputs + heldout_inputs)
    return SequentialResult(reports, calib_tokens, heldout_tokens, narrow,
                            time.perf_counter() - t0 - factorize_seconds, spectra_pass)
