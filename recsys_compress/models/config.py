"""The ``model`` group's schema: the architecture, its initialisation, fine-tuning and optimiser."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from recsys_compress.schema import ConfigError, Schema, require


class OptimConfig(Schema):
    KEY: ClassVar[str] = "model.optim"
    lr: float = 1e-3
    # Learning rate of the item table (input embeddings and a tied head). null: ``lr``. A
    # pretrained decoder wants a small rate, its new item vocabulary a large one.
    item_lr: float | None = None
    weight_decay: float = 0.0
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 0
    scheduler: Literal["constant", "cosine"] = "constant"

    def check(self, p: str) -> None:
        require(self.lr > 0, f"{p}.lr", self.lr, "> 0")
        if self.item_lr is not None:
            require(self.item_lr > 0, f"{p}.item_lr", self.item_lr, "> 0 (or null: lr)")
        require(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, ">= 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{p}.betas",
                 self.betas, "two numbers in [0, 1)")
        require(self.warmup_steps >= 0, f"{p}.warmup_steps", self.warmup_steps, ">= 0")


# The linears of a LLaMA decoder block: what LoRA adapts by default.
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSettings(Schema):
    """LoRA adapters (PEFT) on the decoder's linears; merged into the weights after training."""
    KEY: ClassVar[str] = "model.lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_LINEARS))

    def check(self, p: str) -> None:
        require(self.r >= 1, f"{p}.r", self.r, ">= 1")
        require(self.alpha > 0, f"{p}.alpha", self.alpha, "> 0")
        require(0 <= self.dropout < 1, f"{p}.dropout", self.dropout, "[0, 1)")
        require(len(self.target_modules) >= 1, f"{p}.target_modules", self.target_modules,
                 "at least one linear name (e.g. q_proj)")


class ModelConfig(Schema):
    KEY: ClassVar[str] = "model"
    name: str
    source: Literal["scratch", "pretrained"] = "scratch"
    # scratch LLaMA
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int | None = None  # null: same as num_heads (no grouped-query attention)
    intermediate_size: int | None = None  # null: 4 x hidden_size
    dropout: float = 0.1  # attention dropout
    tie_embeddings: bool = True
    # pretrained: a local Hugging Face folder, or a GGUF file converted once into the cache
    pretrained_path: str | None = None
    gguf_path: str | None = None
    item_init: Literal["text", "random"] = "text"  # text: item embeddings start from the LLM's embeddings of the item text
    embedding_dropout: float = 0.1
    # item_ids=semantic: cross-entropy on the codes of every next item of a window (window) or of
    # its last item only (last: one target per prefix, as LC-Rec and TIGER train)
    code_loss: Literal["window", "last"] = "window"
    # full: every weight trains. lora: the decoder is frozen and LoRA adapters train beside the
    # (always fully trained) item table; the adapters are merged after training, so the cached
    # base model, compression and export see a stock model.
    finetune: Literal["full", "lora"] = "full"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    optim: OptimConfig = Field(default_factory=OptimConfig)

    def check(self, p: str) -> None:
        for key in ("hidden_size", "num_layers", "num_heads"):
            require(getattr(self, key) >= 1, f"{p}.{key}", getattr(self, key), ">= 1")
        require(self.hidden_size % self.num_heads == 0, f"{p}.hidden_size", self.hidden_size,
                 f"a multiple of {p}.num_heads={self.num_heads}")
        if self.num_kv_heads is not None:
            require(self.num_heads % self.num_kv_heads == 0, f"{p}.num_kv_heads",
                     self.num_kv_heads, f"a divisor of {p}.num_heads={self.num_heads}")
        for key in ("dropout", "embedding_dropout"):
            require(0 <= getattr(self, key) < 1, f"{p}.{key}", getattr(self, key), "[0, 1)")
        if self.source == "pretrained" and not (self.pretrained_path or self.gguf_path):
            raise ConfigError(
                f"{p}.source=pretrained needs {p}.pretrained_path (a Hugging Face folder) "
                f"or {p}.gguf_path (a GGUF file)"
            )
