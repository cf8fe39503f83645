"""The ``marc`` group's schema."""

from __future__ import annotations

from typing import ClassVar, Literal

from recsys_compress.schema import Schema, require


class MARCConfig(Schema):
    KEY: ClassVar[str] = "marc"
    dim: int = 32  # the code size of the bottleneck
    beta: float = 1e-3  # weight of KL(q(z|h) || N(0, I))
    trainable_layers: int = 2  # last k LLM blocks trained (0: frozen LLM); the states below are cached
    finetune: Literal["full", "lora"] = "full"  # lora: PEFT LoRA on the trainable blocks
    lora_r: int = 8
    constraint: Literal["none", "hsic"] = "none"  # hsic: + hsic_weight x HSIC(z, task module's last hidden layer)
    hsic_weight: float = 0.1
    items_per_batch: int = 32  # a step takes every training sample of this many items
    lr: float = 1e-3  # compression and task modules
    llm_lr: float = 1e-4  # the trainable LLM blocks
    # true: the deployed CTR model trains on samples mu + sigma * eps of the exported posterior
    # (item_codes.safetensors holds mu and logvar) and is tested on mu
    deploy_noise: bool = False
    # null: deployment caches all marc.dim dimensions of mu | k: only the k with the largest mean
    # KL to the prior; a fresh model can memorise training items by the nearly empty ones
    export_dims: int | None = None

    def check(self, p: str) -> None:
        require(self.dim >= 1, f"{p}.dim", self.dim, ">= 1")
        if self.export_dims is not None:
            require(1 <= self.export_dims <= self.dim, f"{p}.export_dims", self.export_dims,
                     f"null (all) or 1..{p}.dim ({self.dim})")
        require(self.beta >= 0, f"{p}.beta", self.beta, ">= 0")
        require(self.trainable_layers >= 0, f"{p}.trainable_layers", self.trainable_layers, ">= 0 (0: frozen LLM)")
        require(self.lora_r >= 1, f"{p}.lora_r", self.lora_r, ">= 1")
        require(self.hsic_weight >= 0, f"{p}.hsic_weight", self.hsic_weight, ">= 0")
        require(self.items_per_batch >= 1, f"{p}.items_per_batch", self.items_per_batch, ">= 1")
        require(self.lr > 0, f"{p}.lr", self.lr, "> 0")
        require(self.llm_lr > 0, f"{p}.llm_lr", self.llm_lr, "> 0")
