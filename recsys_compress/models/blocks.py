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


def _in_dtype(value: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):  # the rotary (cos, sin)
        return tuple(_in_dtype(v, dtype) for v in value)
    return value


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """One block's output hidden state for ``hidden`` and the arguments the model passes its blocks.

    The arguments' floating tensors (rotary cos/sin, a float mask) take ``hidden``'s dtype: they
    may have been captured from a model in another precision (a float32 teacher's, for a bf16
    student), and float32 cos/sin would turn a bf16 block's queries and keys, not its values, to float32."""
    out = block(hidden, **{k: _in_dtype(v, hidden.dtype) for k, v in kwargs.items()})
    return out[0] if isinstance(out, tuple) else out


def layers_by_block(model: PreTrainedModel, names: list[str] | tuple[str, ...]) -> dict[int | None, list[str]]:
    """``names`` grouped by the index of the decoder block holding each module (None: outside
    every block), blocks in order."""
    owner = {id(m): i for i, block in enumerate(decoder_blocks(model)) for m in block.modules()}
    grouped: dict[int | None, list[str]] = {}
    for name in names:
        grouped.setdefault(owner.get(id(model.get_submodule(name))), []).append(name)
    return grouped
