"""The ``alignment`` group's schema."""

from __future__ import annotations

from typing import ClassVar, Literal

from recsys_compress.schema import Schema, require


class AlignmentConfig(Schema):
    KEY: ClassVar[str] = "alignment"
    method: Literal["none", "progressive", "progressive_lstsq"] = "none"
    batches: int = 16            # training batches whose hidden states are cached for alignment
    steps_per_layer: int = 100   # progressive: AdamW steps per decoder block
    lr: float = 1e-3             # progressive: 1e-4 for whitened SmolLM2 factors (BENCHMARKS.md)
    weight_decay: float = 0.0
    scheduler: Literal["constant", "cosine"] = "cosine"  # restarts with every block
    warmup_steps: int = 0
    task_weight: float = 0.0     # + task_weight x next-item cross-entropy through the blocks above
    distill_weight: float = 0.0  # + distill_weight x T^2 KL(teacher logits || student logits)
    distill_temperature: float = 1.0
    ridge: float = 1e-4          # progressive_lstsq: Tikhonov term, relative to mean diag((B X)(B X)^T)
    checkpoint: bool = True      # progressive: RUN_DIR/alignment/last.ckpt after every block (resume)
    # keep the teacher's cached per-block hidden states in CPU memory; one at a time goes to the
    # accelerator (README, "Memory at scale")
    offload_states: bool = False

    def check(self, p: str) -> None:
        require(self.batches >= 1, f"{p}.batches", self.batches, ">= 1")
        require(self.steps_per_layer >= 1, f"{p}.steps_per_layer", self.steps_per_layer, ">= 1")
        require(self.lr > 0, f"{p}.lr", self.lr, "> 0")
        require(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, ">= 0")
        require(0 <= self.warmup_steps < self.steps_per_layer, f"{p}.warmup_steps", self.warmup_steps,
                 f"[0, steps_per_layer={self.steps_per_layer})")
        require(self.task_weight >= 0, f"{p}.task_weight", self.task_weight, ">= 0")
        require(self.distill_weight >= 0, f"{p}.distill_weight", self.distill_weight, ">= 0")
        require(self.distill_temperature > 0, f"{p}.distill_temperature", self.distill_temperature, "> 0")
        require(self.ridge >= 0, f"{p}.ridge", self.ridge, ">= 0")
