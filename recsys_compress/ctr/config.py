"""The ``ctr`` group's schema: the CTR data split and the DCN-V2 model trained on it."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from recsys_compress.schema import Schema, require


class CTRConfig(Schema):
    KEY: ClassVar[str] = "ctr"
    threshold: float = 4.0  # label = rating >= threshold
    split: list[float] = Field(default_factory=lambda: [0.8, 0.1, 0.1])  # train/val/test fractions
    # time: per user, time-ordered (warm items) | item: random item partition, val/test items
    # never seen in training (item cold start; seeded by `seed`)
    split_by: Literal["time", "item"] = "time"
    id_dim: int = 16
    cross_layers: int = 2
    hidden: list[int] = Field(default_factory=lambda: [128, 64])
    dropout: float = 0.1
    # fraction of training samples whose item id embedding is zeroed, so the model learns to
    # score items from their representation (cold items always get a zero id embedding);
    # 1.0 = no item ids at all
    item_id_dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 2048
    eval_batch_size: int = 8192
    # sample: random batches of batch_size | item: every training sample of items_per_batch
    # random items per step (how MARC's task module trains)
    batch_by: Literal["sample", "item"] = "sample"
    items_per_batch: int = 32

    def check(self, p: str) -> None:
        require(len(self.split) == 3 and min(self.split) >= 0 and abs(sum(self.split) - 1) < 1e-6,
                 f"{p}.split", self.split, "three non-negative fractions summing to 1 (train, val, test)")
        require(self.split[1] > 0 and self.split[2] > 0, f"{p}.split", self.split, "non-empty val and test parts")
        require(self.id_dim >= 1, f"{p}.id_dim", self.id_dim, ">= 1")
        require(self.cross_layers >= 0, f"{p}.cross_layers", self.cross_layers, ">= 0")
        require(0 <= self.dropout < 1, f"{p}.dropout", self.dropout, "[0, 1)")
        require(0 <= self.item_id_dropout <= 1, f"{p}.item_id_dropout", self.item_id_dropout, "[0, 1]")
        require(self.lr > 0, f"{p}.lr", self.lr, "> 0")
        require(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, ">= 0")
        require(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, ">= 1")
        require(self.eval_batch_size >= 1, f"{p}.eval_batch_size", self.eval_batch_size, ">= 1")
        require(self.items_per_batch >= 1, f"{p}.items_per_batch", self.items_per_batch, ">= 1")
