"""The decoder blocks of a Hugging Face causal LM, and running one block on its own.

Sequential compression and progressive alignment both work one block at a time on cached
hidden states (the GPTQ / SVD-LLM "catcher" pattern); this is what they share.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel


def decoder_blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (``model.base_model.layers``)."""
    blocks = getattr(model.base_model, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no decoder blocks at base_model.layers")
    return blocks


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """One block's output hidden state for ``hidden`` and the arguments the model passes its blocks."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
