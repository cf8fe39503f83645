"""Export a (compressed) item LLM as a self-contained CPU artefact: ONNX run by onnxruntime.

Why ONNX + onnxruntime rather than TorchScript or a ``torch.export`` program:
- the artefact runs without torch or this package (``onnxruntime`` alone, ~15 MB, available
  for phones, browsers and C/C++/Java/C# hosts), which is what "on device" means;
- onnxruntime fuses attention/normalisation and plans memory, and its dynamic int8
  quantisation applies to the exported graph, so a compressed+int8 model ships as one file
  (torch's ``quantize_dynamic`` modules cannot be saved or exported);
- TorchScript is in maintenance mode, and a ``.pt2`` program still needs the torch runtime.
The export itself goes through ``torch.export`` (``torch.onnx.export(dynamo=True)``), so a
model that exports to ONNX would also export to ``.pt2``.

A folder holds ``model.onnx`` (batch and history length dynamic), ``items.json`` (raw item id
and text of every item index) and ``deploy.json`` (format, sizes, and the maximum deviation
from the eager model measured at export time).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear
from transformers import PreTrainedModel

from recsys_compress.models.item_llm import position_ids_for

log = logging.getLogger(__name__)

FORMAT = "recsys-compress/onnx-v1"


class ItemScorer(nn.Module):
    """``(input_ids, attention_mask) -> scores`` of every item index as the next item.

    The same computation as ``SeqRecLitModule.forward`` in eval mode (left padding, positions
    counted from the first real item), without Lightning, for export.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_for(attention_mask),
            use_cache=False,
        ).last_hidden_state[:, -1]
        return self.model.get_output_embeddings()(hidden)


def example_inputs(n_items: int, max_len: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded example histories (one full, one half padding) used to trace and to check."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, n_items + 1, (batch, max_len), generator=generator)
    mask = torch.ones_like(ids)
    ids[1:, : max_len // 2] = 0
    mask[1:, : max_len // 2] = 0
    return ids, mask


def fuse_for_onnxruntime(path: Path) -> dict[str, int]:
    """Rewrite the graph at ``path`` in place into onnxruntime's fused operators (onnxscript's
    ``optimize_for_ort``): RMS norm (with the residual add) and attention as one
    MultiHeadAttention kernel. onnxruntime's own session-time fusions do not match these
    patterns as torch exports them, and an unfused decoder block runs ~60 small kernels whose
    dispatch adds up (SmolLM2: norms 3.2 -> 1.3 ms per call, BENCHMARKS.md). The rotary
    embedding and the key/value repeat of grouped-query attention stay separate kernels in the
    SmolLM2 graph, although the rewriter counts rotary matches. Returns the rewriter's counts."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(path))
    model, counts = optimize_for_ort(model)
    ir.save(model, str(path))
    return {name: n for name, n in counts.items() if n}


# The quantiser names each node it writes after the node it replaces plus one of these.
QUANTISER_SUFFIXES = ("_MatMul_quant", "_quant")


def carry_module_paths(source: Path, target: Path) -> None:
    """Copy the exporter's ``namespace`` (module path) of each node in ``source`` onto the node
    of ``target`` that replaced it, where the quantiser dropped it, so that an operator profile
    of the int8 graph can still tell a factor matmul from a dense projection or the item head."""
    import onnx

    namespaces = {n.name: p.value for n in onnx.load(str(source), load_external_data=False).graph.node
                  for p in n.metadata_props if p.key == "namespace"}
    model = onnx.load(str(target))
    for node in model.graph.node:
        if any(p.key == "namespace" for p in node.metadata_props):
            continue
        for suffix in QUANTISER_SUFFIXES:
            origin = node.name.removesuffix(suffix)
            if origin != node.name and origin in namespaces:
                node.metadata_props.add(key="namespace", value=namespaces[origin])
                break
    onnx.save(model, str(target))


def export_onnx(
    model: PreTrainedModel,
    folder: str | Path,
    max_len: int,
    item_ids: Sequence[str],
    item_texts: Sequence[str] | None = None,
    quantize: str | None = None,
    info: dict[str, Any] | None = None,
    fuse: bool = True,
) -> Path:
    """Write ``model`` (dense, low-rank or pruned float weights) as an ONNX artefact.

    ``item_ids[i - 1]`` is the raw id of item index ``i``; ``quantize='int8'`` additionally
    applies onnxruntime's dynamic int8 quantisation to the graph's matrix multiplications.
    ``fuse``: rewrite the graph into onnxruntime's fused operators first (``fuse_for_onnxruntime``).
    Returns the folder.
    """
    import onnxruntime as ort

    if quantize not in (None, "int8"):
        raise ValueError(f"quantize={quantize!r}; allowed: null, int8")
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError(
            "cannot export a model with torch int8 layers: export the float model with "
            "quantize='int8' (onnxruntime quantises the exported graph)"
        )
    n_items = model.get_input_embeddings().num_embeddings - 1
    if len(item_ids) != n_items:
        raise ValueError(f"item_ids has {len(item_ids)} entries but the model scores {n_items} items")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scorer = ItemScorer(model).eval()
    ids, mask = example_inputs(n_items, max_len)
    batch = torch.export.Dim("batch", min=1, max=65536)
    length = torch.export.Dim("length", min=2, max=max(max_len, 2))
    float_path = folder / ("model_float.onnx" if quantize else "model.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter chatter about axis renaming and deprecations
        torch.onnx.export(
            scorer, (ids, mask), str(float_path), dynamo=True, optimize=True, verbose=False,
            input_names=["input_ids", "attention_mask"], output_names=["scores"],
            dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
            external_data=False,
        )
    fusions = fuse_for_onnxruntime(float_path) if fuse else {}
    path = folder / "model.onnx"
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.WARNING)  # the quantiser logs one INFO line per tensor on the root logger
        try:
            quantize_dynamic(str(float_path), str(path), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        carry_module_paths(float_path, path)
        float_path.unlink()

    with torch.no_grad():
        expected = scorer(ids, mask).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    deviation = float(abs(got - expected).max())
    if quantize is None and deviation > 1e-3 * max(1.0, float(abs(expected).max())):
        raise RuntimeError(f"the exported graph deviates from the eager model by {deviation:.3g}")

    texts = list(item_texts) if item_texts is not None else [""] * (n_items + 1)
    (folder / "items.json").write_text(json.dumps(
        {"ids": list(item_ids), "texts": texts[1:]}, ensure_ascii=False) + "\n")
    (folder / "deploy.json").write_text(json.dumps({
        "format": FORMAT,
        "n_items": n_items,
        "max_len": max_len,
        "quantize": quantize,
        "fusions": fusions,
        "max_abs_deviation_from_eager": deviation,
        "megabytes": path.stat().st_size / 2**20,
        **(info or {}),
    }, indent=2) + "\n")
    log.info("exported %s (%.1f MB, max |onnx - eager| = %.2g)", path, path.stat().st_size / 2**20, deviation)
    return folder
