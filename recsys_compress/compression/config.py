"""The ``compression`` group's schema."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from recsys_compress.compression.names import ALLOCATIONS, DEFAULT_TARGETS, LOW_RANK_METHODS
from recsys_compress.compression.names import METHOD_KINDS as METHODS
from recsys_compress.schema import ConfigError, Schema, require


class CompressionConfig(Schema):
    KEY: ClassVar[str] = "compression"
    method: Literal[("none",) + tuple(METHODS)] = "none"  # type: ignore[valid-type]  # compression/methods.py
    # Globs over module names; default: q/k/v/o and gate/up/down of every decoder block.
    include: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    exclude: list[str] = Field(default_factory=list)
    calib_batches: int = 16  # training batches of the recommendation data used for statistics
    heldout_batches: int = 4  # further batches, of users outside calibration: held-out output error
    asvd_alpha: float = 0.5  # asvd: channels scaled by mean|x|^alpha
    quantize: Literal["int8"] | None = None  # stack int8 on a low-rank or pruned model
    # per-batch x^T x (sums are always float64); float32 is faster but can lose positive definiteness
    gram_dtype: Literal["float32", "float64"] = "float64"
    # uniform: every matrix keeps `ratio` of its parameters. global: the same total, spent on the
    # singular directions that remove most error per parameter over all matrices; global_relative:
    # the same on each matrix's normalised spectrum; zero_sum: ZS-SVD, directions removed by their
    # first-order effect on the training loss (compression/allocation.py).
    allocation: Literal[ALLOCATIONS] = "uniform"  # type: ignore[valid-type]
    min_rank: int = 1  # global allocations: the least rank any matrix keeps
    # the data whose loss zero_sum differentiates: train (the calibration batches, the next item at
    # every position) or val (the validation users' held-out next item: a converged model's mean
    # training gradient is near zero, its held-out one is not). Ignored by the other allocations.
    gradient_split: Literal["train", "val"] = "train"
    # every rank a multiple of this, in the same parameter budget (compression/allocation.align_ranks);
    # 1: ranks as allocated
    rank_align: int = 1
    # one decoder block at a time, each calibrated on the output of the compressed blocks below
    # it; only one block's statistics are alive (compression/sequential.py). false: every
    # targeted layer of the model is hooked at once and calibrated on the original activations.
    sequential: bool = False

    def check(self, p: str) -> None:
        require(self.min_rank >= 1, f"{p}.min_rank", self.min_rank, ">= 1")
        require(self.rank_align >= 1, f"{p}.rank_align", self.rank_align, ">= 1")
        if self.rank_align > 1 and self.method not in LOW_RANK_METHODS:
            raise ConfigError(f"{p}.rank_align={self.rank_align} rounds ranks: it applies to "
                              f"{', '.join(LOW_RANK_METHODS)}, not {p}.method={self.method}")
        if self.allocation != "uniform" and self.method not in LOW_RANK_METHODS:
            raise ConfigError(f"{p}.allocation={self.allocation} sets ranks: it applies to "
                              f"{', '.join(LOW_RANK_METHODS)}, not {p}.method={self.method}")
        require(self.calib_batches >= 1, f"{p}.calib_batches", self.calib_batches, ">= 1")
        require(self.heldout_batches >= 0, f"{p}.heldout_batches", self.heldout_batches, ">= 0 (0: no held-out error)")
        require(self.asvd_alpha >= 0, f"{p}.asvd_alpha", self.asvd_alpha, ">= 0")
        if self.method != "none" and not self.include:
            raise ConfigError(f"{p}.include is empty: compression.method={self.method} needs layers to compress")

    @property
    def quantizes(self) -> str | None:
        """The int8 step: compression=int8, or int8 stacked on another method."""
        return "int8" if self.method == "int8" else self.quantize
