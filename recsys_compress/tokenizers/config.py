"""The ``semantic`` group's schema: how items get their code tuples (task=semantic_ids)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from recsys_compress.schema import ConfigError, Schema, require

# LC-Rec's uniform semantic mapping: Sinkhorn's entropy weight on [-1, 1]-scaled distances, and the
# iterations it needs at that weight to balance the codes (tokenizers/assign.py says why not 50)
SINKHORN_EPSILON = 0.003
SINKHORN_ITERATIONS = 200


class SemanticIDsConfig(Schema):
    KEY: ClassVar[str] = "semantic"
    # rqvae: learned from the items' text embeddings; random: random tuples of the same shape
    # (TIGER's ablation: do *semantic* codes matter?); a published index is loaded with index_path
    kind: Literal["rqvae", "random"] = "rqvae"
    index_path: str | None = None  # an LC-Rec NAME.index.json to load instead of building one
    levels: int = 4  # LC-Rec: 4 levels x 256 codes, code dim 32
    codebook_size: int = 256
    code_dim: int = 32
    hidden: list[int] = Field(default_factory=lambda: [512, 256, 128])  # the MLP encoder's widths (decoder mirrored)
    commitment: float = 0.25
    kmeans_iters: int = 100
    epochs: int = 500
    batch_size: int = 1024
    lr: float = 1e-3
    dropout: float = 0.0
    # re-draw a code used less than this fraction of the mean (the library's dead-code reset; 0: off):
    # its EMA codebooks, unlike LC-Rec's gradient-trained ones, otherwise leave codes unused
    dead_code_ratio: float = 0.1
    # the text embedding: this layer's mean-pooled hidden state of representation.model (last: the
    # final layer, MiniLM's sentence embedding; 0: the mean token embedding, SmolLM2's option)
    layer: int | Literal["last"] = "last"
    # LC-Rec's uniform semantic mapping on the last level (null: nearest code)
    sinkhorn_epsilon: float | None = SINKHORN_EPSILON
    sinkhorn_iterations: int = SINKHORN_ITERATIONS
    collisions: Literal["lcrec", "tiger"] = "lcrec"  # tiger for a loaded or random index: no RQ-VAE behind it
    collision_rounds: int = 20

    def check(self, p: str) -> None:
        require(self.levels >= 1, f"{p}.levels", self.levels, ">= 1")
        require(self.codebook_size >= 2, f"{p}.codebook_size", self.codebook_size, ">= 2")
        require(self.code_dim >= 1, f"{p}.code_dim", self.code_dim, ">= 1")
        require(self.epochs >= 1, f"{p}.epochs", self.epochs, ">= 1")
        require(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, ">= 1")
        require(self.lr > 0, f"{p}.lr", self.lr, "> 0")
        require(0 <= self.dead_code_ratio < 1, f"{p}.dead_code_ratio", self.dead_code_ratio, "0 (off) to < 1")
        require(self.collision_rounds >= 0, f"{p}.collision_rounds", self.collision_rounds, ">= 0")
        if self.sinkhorn_epsilon is not None:
            require(self.sinkhorn_epsilon > 0, f"{p}.sinkhorn_epsilon", self.sinkhorn_epsilon, "> 0, or null (off)")
        if (self.index_path is not None or self.kind == "random") and self.collisions == "lcrec":
            raise ConfigError(f"{p}.collisions=lcrec re-assigns codes with the RQ-VAE, but "
                              + (f"{p}.index_path loads an index" if self.index_path else f"{p}.kind=random")
                              + f" has none; allowed here: {p}.collisions=tiger")
