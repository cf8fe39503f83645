"""The ``dataset`` group's schema."""

from __future__ import annotations

from typing import ClassVar, Literal

from recsys_compress.schema import Schema, require


class DatasetConfig(Schema):
    KEY: ClassVar[str] = "dataset"
    name: str
    format: Literal["grouplens_csv", "recbole_atomic", "sequence_text", "lcrec_json"]
    path: str
    file_name: str | None = None  # NAME of NAME.inter (RecBole) or NAME.inter.json (LC-Rec); defaults to the folder name
    min_rating: float | None = None  # None: every rating is an interaction
    k_core: int = 0  # keep users and items with >= k interactions (0 or 1: off)
    max_len: int = 50  # the history a model sees (items)
    # recent: one training window per user (the latest max_len items); all: every window
    train_windows: Literal["recent", "all"] = "recent"
    batch_size: int = 128
    eval_batch_size: int = 256
    num_workers: int = 0

    def check(self, p: str) -> None:
        require(self.k_core >= 0, f"{p}.k_core", self.k_core, ">= 0 (0 or 1: off)")
        require(self.max_len >= 1, f"{p}.max_len", self.max_len, ">= 1")
        require(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, ">= 1")
        require(self.eval_batch_size >= 1, f"{p}.eval_batch_size", self.eval_batch_size, ">= 1")
        require(self.num_workers >= 0, f"{p}.num_workers", self.num_workers, ">= 0")
