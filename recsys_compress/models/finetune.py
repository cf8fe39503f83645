"""LoRA fine-tuning of an item-vocabulary LLM through PEFT, merged back into a stock model.

The adapters are injected *in place*: the ``PreTrainedModel`` the LightningModule holds stays
the same object, its targeted linears become PEFT LoRA layers while training, and
``merge_lora`` folds them into the weights again. Everything downstream (the base-model
cache, compression, alignment, export) therefore sees an ordinary LLaMA.
"""

from __future__ import annotations

import logging

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from recsys_compress.models.config import LoraSettings

log = logging.getLogger(__name__)

# PEFT wraps this model in place; the wrapper is remembered so the adapters can be merged.
_PEFT_WRAPPER = "_recsys_peft_wrapper"


def add_lora(model: PreTrainedModel, lora: LoraSettings) -> PreTrainedModel:
    """Freeze ``model`` except the item table and add LoRA adapters to ``lora.target_modules``.

    The item embeddings (and a tied head with them) stay fully trainable: they are a new
    vocabulary the pretrained weights know nothing about, so a low-rank update cannot learn them.
    """
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = sorted(set(lora.target_modules) - names)
    if missing:
        raise ValueError(f"model.lora.target_modules: {missing} are not linears of this model; "
                         f"its linears are {sorted(names)}")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules))
    wrapper = get_peft_model(model, config)
    if wrapper.base_model.model is not model:  # PEFT's contract; merging relies on it
        raise RuntimeError("PEFT did not wrap the model in place")
    model.get_input_embeddings().weight.requires_grad_(True)
    head = model.get_output_embeddings()
    if head is not None:
        head.weight.requires_grad_(True)
    object.__setattr__(model, _PEFT_WRAPPER, wrapper)  # not a submodule: keeps state_dict keys
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d on %s: %d of %d parameters train (%.1f%%)", lora.r, ",".join(lora.target_modules),
             trainable, total, 100 * trainable / total)
    return model


def has_lora(model: nn.Module) -> bool:
    return getattr(model, _PEFT_WRAPPER, None) is not None


def merge_lora(model: PreTrainedModel) -> PreTrainedModel:
    """Fold the adapters into the weights in place: ``model`` becomes a stock model again,
    with every parameter trainable as before ``add_lora``."""
    wrapper: PeftModel | None = getattr(model, _PEFT_WRAPPER, None)
    if wrapper is None:
        raise ValueError("merge_lora: the model has no LoRA adapters (add_lora first)")
    merged = wrapper.merge_and_unload()
    if merged is not model:
        raise RuntimeError("PEFT did not merge the adapters in place")
    object.__delattr__(model, _PEFT_WRAPPER)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
