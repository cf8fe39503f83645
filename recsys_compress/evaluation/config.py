"""The ``evaluation`` group's schema."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from recsys_compress.schema import Schema, require


class EvaluationConfig(Schema):
    KEY: ClassVar[str] = "evaluation"
    # Full ranking over the whole catalogue, leave-one-out.
    exclude_seen: bool = True  # items already in the user's history are not ranked
    hr_ks: list[int] = Field(default_factory=lambda: [1, 5, 10, 20])
    ndcg_ks: list[int] = Field(default_factory=lambda: [5, 10, 20])
    popularity_baseline: bool = True  # also report the popularity baseline under the same protocol
    # The generative recommender's constrained beam search keeps this many tuples per user: its
    # ranked list, so at least the largest K (an item outside it counts as a miss).
    beams: int = 20
    # How the test's beam search constrains the codes: trie (only tuples that are items, the
    # default) or per_level (LC-Rec's own decoding: each position any code seen at its level, so
    # tuples that are no item can take places in the list; the run records their rate, for parity
    # with LC-Rec's published figures). Validation, which selects the checkpoint, always uses the
    # trie, so this choice does not change the trained model.
    decoding: Literal["trie", "per_level"] = "trie"

    def check(self, p: str) -> None:
        for key in ("hr_ks", "ndcg_ks"):
            ks = getattr(self, key)
            require(bool(ks) and all(k >= 1 for k in ks), f"{p}.{key}", ks, "non-empty, each >= 1")
        # metrics.json promises these keys; a run without them would break reports.
        require({1, 5, 10, 20} <= set(self.hr_ks), f"{p}.hr_ks", self.hr_ks, "must include 1, 5, 10, 20")
        require({5, 10, 20} <= set(self.ndcg_ks), f"{p}.ndcg_ks", self.ndcg_ks, "must include 5, 10, 20")
        largest = max(self.hr_ks + self.ndcg_ks)
        require(self.beams >= largest, f"{p}.beams", self.beams, f">= the largest K of hr_ks and ndcg_ks ({largest})")
