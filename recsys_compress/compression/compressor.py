"""``Compressor``: compression of a recommender's decoder, called by the task before testing.

Every method of the registry (``compression/methods.py``): low-rank factorisation (svd, asvd,
odllm) and, through the same interface and parameter budget, the paper's baselines:
unstructured pruning (prune_magnitude, wanda) and int8 dynamic quantisation, which can also be
stacked on a low-rank or pruned model (``compression.quantize=int8``).

It calls the model only through ``RecommenderModel`` (the backbone it transforms, the forward
that calibration runs, the losses that gradient-driven allocations differentiate), on whatever
device and precision the caller put the model (``utils.instantiators.place``: the run's Trainer's).
It is a plain object, not a Lightning callback: compression is one step of the task, done once,
and as a callback it had to move and cast the module by hand inside ``trainer.test``'s setup.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sized
from itertools import islice
from pathlib import Path

import torch

from recsys_compress.compression.allocation import GRADIENT_ALLOCATIONS, allocate_ranks, check_budget
from recsys_compress.compression.apply import LayerReport, compress_low_rank, prune_layers, quantize_int8
from recsys_compress.compression.calibration import (
    available_memory_bytes,
    batch_budget,
    collect_input_stats,
    select_linear_layers,
    split_calibration,
    statistics_bytes,
)
from recsys_compress.compression.methods import LowRank, Quantization, get_method
from recsys_compress.compression.sensitivity import loss_gradients
from recsys_compress.compression.sequential import compress_sequential
from recsys_compress.compression.config import CompressionConfig
from recsys_compress.schema import ConfigError
from recsys_compress.models.blocks import layers_by_block
from recsys_compress.models.interface import RecommenderModel, TokenSequence
from recsys_compress.utils.tables import write_table

log = logging.getLogger(__name__)


def check_allocation(c: CompressionConfig, ratio: float, model: torch.nn.Module) -> None:
    """Fail before training when a global rank budget cannot give every matrix its minimum,
    or when ``rank_align`` exceeds a uniform allocation's ranks."""
    if c.allocation == "uniform" and c.rank_align == 1:
        return
    names = select_linear_layers(model, c.include, c.exclude)
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    try:
        if c.allocation == "uniform":
            allocate_ranks(shapes, None, ratio, rank_align=c.rank_align)
        else:
            check_budget(shapes, ratio, c.min_rank)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class Compressor:
    """Compress with ``config`` (a validated ``CompressionConfig``) at ``ratio``.

    ``defer_quantize``: factorise/prune only; the pipeline calls ``apply_quantization`` itself,
    after alignment and the float export.
    """

    def __init__(self, config: CompressionConfig, ratio: float, defer_quantize: bool = False):
        self.config, self.ratio = config, ratio
        self.method = config.method
        self.kind = get_method(config.method)
        self.quantize = config.quantizes  # int8 for compression=int8 or a stacked compression.quantize=int8
        self.gram_dtype = getattr(torch, config.gram_dtype)
        self.defer_quantize = defer_quantize
        self.calib_tokens = self.heldout_tokens = self.calib_batches_used = 0
        self.rank_deficient_layers = 0
        self.reports: list[LayerReport] | None = None
        self.names: list[str] = []
        self.seconds = 0.0
        self.calibrate_seconds = 0.0
        self.gradient_seconds = 0.0  # the calibration loss's backward passes (gradient-driven allocations)

    @property
    def takes_gradients(self) -> bool:
        """Whether the allocation ranks directions by the loss's gradient (zero_sum)."""
        return isinstance(self.kind, LowRank) and self.config.allocation in GRADIENT_ALLOCATIONS

    def compress(self, recommender: RecommenderModel, batches: Iterable[dict],
                 gradient_batches: Iterable[dict] | None = None) -> list[LayerReport]:
        """Calibrate on ``batches`` (training sequences) and factorise the targeted layers of
        ``recommender.backbone`` in place, on the device it is on.
        ``gradient_batches``: evaluation batches (history, target) whose target loss a
        gradient-driven allocation differentiates instead of the calibration batches' training
        loss (``compression.gradient_split=val``); their first ``calib_batches`` are used."""
        t0 = time.perf_counter()
        model = recommender.backbone
        c = self.config
        names = select_linear_layers(model, c.include, c.exclude)
        if not names:
            raise ValueError(f"compression.include={c.include} minus compression.exclude={c.exclude} selects no layer")
        was_training = recommender.training
        recommender.eval()  # no dropout in the statistics
        device = next(model.parameters()).device
        if isinstance(self.kind, Quantization):
            # No factorisation or calibration: every weight is kept, in int8.
            self.reports = []
            for n in names:
                W = model.get_submodule(n).weight
                self.reports.append(LayerReport(n, *W.shape, 0, float("nan"), float("nan"),
                                                W.numel(), W.numel(), 0.0, 0.0))
        else:
            n_batches = len(batches) if isinstance(batches, Sized) else None
            calib_n, heldout_n = batch_budget(n_batches, c.calib_batches, c.heldout_batches)
            if heldout_n != c.heldout_batches:
                log.warning("the training split holds %d batches, fewer than compression.calib_batches + "
                            "compression.heldout_batches = %d: calibrating on %d and holding out %d, in their "
                            "proportion", n_batches, c.calib_batches + c.heldout_batches, calib_n, heldout_n)
            calibration_items, heldout_items = split_calibration(batches, calib_n, heldout_n)
            # The statistics are over the tokens the decoder reads (an item may be several), the
            # loss gradients over the item batches the recommender's losses take.
            calibration, heldout_set = token_batches(recommender, calibration_items), token_batches(
                recommender, heldout_items)

            def forward(b):
                return recommender.decode(TokenSequence(**on_device(b, device)))

            if len(calibration) < calib_n:
                log.warning("compression.calib_batches=%d, but the training split holds %d batches: calibrating "
                            "on all of them", c.calib_batches, len(calibration))
            if c.heldout_batches and not heldout_set:
                log.warning("no training batches are left after calibration for the held-out error "
                            "(compression.heldout_batches=%d): lower compression.calib_batches", c.heldout_batches)
            self.calib_batches_used = len(calibration)
            self._check_memory(model, names, calibration + heldout_set, bool(heldout_set))
            gradients = None
            if self.takes_gradients:
                gradients = self._loss_gradients(recommender, names, calibration_items, gradient_batches)
            if c.sequential:
                result = compress_sequential(model, names, self.method, self.ratio, calibration, heldout_set,
                                             forward, c.asvd_alpha, c.allocation, c.min_rank, self.gram_dtype,
                                             rank_align=c.rank_align, gradients=gradients)
                self.reports = result.reports
                self.calibrate_seconds = result.calibrate_seconds + self.gradient_seconds
                self.calib_tokens, self.heldout_tokens = result.calib_tokens, result.heldout_tokens
                self.rank_deficient_layers = result.rank_deficient_layers
            else:
                def statistics(chosen):
                    return collect_input_stats(model, names, chosen, forward=forward, max_batches=len(chosen),
                                               gram_dtype=self.gram_dtype)

                stats = statistics(calibration)
                self.calibrate_seconds = time.perf_counter() - t0
                heldout = statistics(heldout_set) if heldout_set else None
                self.calib_tokens = stats[names[0]].tokens
                self.heldout_tokens = heldout[names[0]].tokens if heldout else 0
                self.rank_deficient_layers = sum(stats[n].rank_deficient for n in names)
                if isinstance(self.kind, LowRank):
                    self.reports = compress_low_rank(model, names, self.method, self.ratio, stats, c.asvd_alpha,
                                                     heldout, c.allocation, c.min_rank, rank_align=c.rank_align,
                                                     gradients=gradients)
                else:
                    self.reports = prune_layers(model, names, self.method, self.ratio, stats, heldout)
            # Fewer tokens than input features: the Gram matrix is singular, and whitening fits
            # those very tokens (the held-out error says by how much).
            if self.rank_deficient_layers:
                widest = max(model.get_submodule(n).in_features for n in names)
                log.warning("calibration saw %d tokens, fewer than the %d input features of the widest targeted "
                            "layer: %d of %d layers have a singular Gram matrix; raise compression.calib_batches",
                            self.calib_tokens, widest, self.rank_deficient_layers, len(names))
        self.names = names
        if self.quantize == "int8" and not self.defer_quantize:
            self.apply_quantization(model)
        recommender.train(was_training)
        self.seconds = time.perf_counter() - t0
        jittered = sum(r.jitter > 0 for r in self.reports)
        if jittered:
            log.warning("%d of %d layers needed jitter for a positive-definite Gram matrix", jittered, len(names))
        return self.reports

    def _loss_gradients(self, recommender: RecommenderModel, names: list[str], calibration: list,
                        evaluation: Iterable[dict] | None = None) -> dict:
        """The loss's gradient per targeted weight, averaged over batches: the training loss over
        the calibration batches, or, given ``evaluation`` batches, their held-out target's loss."""
        c = self.config
        held_out = evaluation is not None
        loss_of = recommender.target_loss if held_out else recommender.loss
        batches = list(islice(evaluation, c.calib_batches)) if held_out else calibration
        if held_out and not batches:
            raise ValueError("compression.gradient_split=val, but the validation split holds no batches")
        t0 = time.perf_counter()
        device = next(recommender.backbone.parameters()).device

        def loss(b):
            return loss_of(on_device(b, device))

        gradients = loss_gradients(recommender.backbone, names, batches, loss)
        self.gradient_seconds = time.perf_counter() - t0
        log.info("%s loss gradients of %d layers over %d batches in %.1f s", c.gradient_split, len(names),
                 len(batches), self.gradient_seconds)
        return gradients

    def _check_memory(self, model: torch.nn.Module, names: list[str], batches: list, heldout: bool) -> None:
        """Refuse, with the numbers, statistics that would not fit in the memory available now."""
        available = available_memory_bytes()
        if available is None:
            return
        try:
            grouped = layers_by_block(model, names)
        except TypeError:  # not a Hugging Face decoder stack: one group
            grouped = {None: names}
        in_features = [[model.get_submodule(n).in_features for n in group] for group in grouped.values()]
        padded = sum(int(b["attention_mask"].numel()) for b in batches)
        sequential = self.config.sequential
        hidden = getattr(getattr(model, "config", None), "hidden_size", 0)
        gradient_weights = sum(model.get_submodule(n).weight.numel() for n in names) if self.takes_gradients else 0
        needed = statistics_bytes(in_features, hidden, padded, heldout, sequential, gradient_weights)
        if needed > available:
            hint = ("lower compression.calib_batches or compression.heldout_batches" if sequential else
                    "set compression.sequential=true (one block's statistics at a time)")
            raise MemoryError(
                f"calibration statistics need {needed / 2**20:,.1f} MiB ({len(names)} layers, "
                f"{'one block at a time' if sequential else 'every layer at once'}, {padded:,} padded tokens"
                f"{f', loss gradients of {gradient_weights:,} weights' if gradient_weights else ''}), "
                f"and {available / 2**20:,.1f} MiB are available: {hint}")

    def apply_quantization(self, model: torch.nn.Module) -> float:
        """int8-quantise the compressed layers (both factors of low-rank ones); returns seconds."""
        t0 = time.perf_counter()
        names = self.names
        if isinstance(self.kind, LowRank):  # both factors; a layer a global allocation kept dense, whole
            dense = {r.name for r in self.reports or [] if r.dense}
            names = [part for n in names for part in ([n] if n in dense else [f"{n}.down", f"{n}.up"])]
        quantize_int8(model, names)
        return time.perf_counter() - t0

    def summary(self) -> dict[str, float]:
        """Aggregates for metrics.json and the loggers."""
        assert self.reports is not None
        before = sum(r.params_before for r in self.reports)
        after = sum(r.params_after for r in self.reports)
        errors = torch.tensor([r.rel_output_error for r in self.reports])
        heldout = torch.tensor([r.heldout_rel_output_error for r in self.reports])
        energy = torch.tensor([r.energy_kept for r in self.reports])
        return {
            "compression/layers": len(self.reports),
            "compression/dense_layers": sum(r.dense for r in self.reports),
            "compression/kept_ratio": after / before,
            "compression/targeted_params_before": before,
            "compression/targeted_params_after": after,
            "compression/mean_rel_output_error": float(errors.mean()),
            # on tokens of users outside calibration (nan with compression.heldout_batches=0)
            "compression/heldout_rel_output_error": float(heldout.mean()),
            "compression/calib_batches": self.calib_batches_used,
            "compression/calib_tokens": self.calib_tokens,
            "compression/heldout_tokens": self.heldout_tokens,
            "compression/rank_deficient_layers": self.rank_deficient_layers,
            "compression/max_rel_output_error": float(errors.max()),
            "compression/mean_energy_kept": float(energy.mean()),
            "compression/jittered_layers": sum(r.jitter > 0 for r in self.reports),
            "time/compress_s": self.seconds,
            # The split says which lever matters: calibration tokens or the factorisations.
            "time/calibrate_s": self.calibrate_seconds,
            "time/loss_gradient_s": self.gradient_seconds,  # part of calibrate_s; 0 unless zero_sum
            "time/factorize_s": self.seconds - self.calibrate_seconds,
        }

    def write_report(self, report_dir: str | Path | None, loggers: list) -> None:
        """One row per layer to ``report_dir/compression_layers.csv`` and the loggers, and the
        summary to the loggers."""
        assert self.reports is not None
        write_table([r.as_dict() for r in self.reports],
                    Path(report_dir) / "compression_layers.csv" if report_dir is not None else None,
                    loggers, "compression/layers_table")
        for logger in loggers:
            logger.log_metrics(self.summary())


def token_batches(recommender: RecommenderModel, batches: list[dict]) -> list[dict[str, torch.Tensor]]:
    """Each batch as the token sequence its recommender's decoder reads (``input_ids``,
    ``attention_mask``, ``position_ids``): what calibration statistics count."""
    return [vars(recommender.sequence(b)) for b in batches]


def on_device(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (other entries dropped)."""
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
