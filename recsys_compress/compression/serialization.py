"""Save and load compressed models: safetensors weights + the structure needed to rebuild them.

A folder holds the Hugging Face ``config.json`` of the base architecture,
``compression.json`` (which linear layers are ``LowRankLinear`` and at what rank, plus the
method and ratio for the record) and ``model.safetensors``. Loading builds the architecture
from the config, swaps in ``LowRankLinear`` modules of the recorded ranks and loads the
weights strictly, so any structural mismatch fails instead of silently reverting to dense
(the SVD-LLM pickling lesson, DESIGN.md section 4).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from recsys_compress.compression.low_rank import LowRankLinear

FORMAT = "recsys-compress/compressed-v1"


class ArtefactMismatchError(ValueError):
    """A saved compressed model does not fit the structure it claims."""


def save_compressed(model: PreTrainedModel, folder: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (dense, low-rank or pruned; float weights) to ``folder``."""
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise NotImplementedError(
            "saving int8-quantised models is not supported: save the float model and apply "
            "compression.quantize=int8 after loading (dynamic quantisation is cheap)"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    biases = {name: m.up.bias is not None for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    (folder / "compression.json").write_text(json.dumps(
        {"format": FORMAT, "low_rank": ranks, "bias": biases, **(info or {})}, indent=2) + "\n")
    save_model(model, str(folder / "model.safetensors"))  # handles the tied item head
    return folder


def load_compressed(folder: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Rebuild and load a model saved by ``save_compressed``; fails clearly on any mismatch."""
    folder = Path(folder)
    for name in ("config.json", "compression.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a compressed-model folder: {name} is missing")
    structure = json.loads((folder / "compression.json").read_text())
    if structure.get("format") != FORMAT:
        raise ArtefactMismatchError(f"{folder}/compression.json has format {structure.get('format')!r}, expected {FORMAT!r}")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    for name, rank in structure["low_rank"].items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise ArtefactMismatchError(f"compression.json names layer {name}, which the architecture lacks") from None
        if not isinstance(dense, nn.Linear):
            raise ArtefactMismatchError(f"layer {name} is a {type(dense).__name__}, not a linear layer")
        low = LowRankLinear(dense.in_features, dense.out_features, rank,
                            bias=structure["bias"].get(name, dense.bias is not None), dtype=dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, low)
    try:
        missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
    except RuntimeError as e:  # shapes differ from the recorded ranks
        raise ArtefactMismatchError(f"{folder}/model.safetensors does not match compression.json: {e}") from None
    if missing or unexpected:
        raise ArtefactMismatchError(
            f"{folder}/model.safetensors does not match compression.json: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model.eval()
