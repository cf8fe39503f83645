"""Export a (compressed) item LLM as a self-contained CPU artefact: ONNX run by onnxruntime.

Why ONNX + onnxruntime rather than TorchScript or a ``torch.export`` program:
- the artefact runs without torch or this package (``onnxruntime`` alone, ~15 MB, available
  for phones, browsers and C/C++/Java/C# hosts), which is what "on device" means;
- onnxruntime fuses attention/normalisation and plans memory, and its int8 quantisation
  (dynamic, or static on calibration histories) applies to the exported graph, so a
  compressed+int8 model ships as one file (torch's ``quantize_dynamic`` modules cannot be saved
  or exported);
- TorchScript is in maintenance mode, and a ``.pt2`` program still needs the torch runtime.
The export itself goes through ``torch.export`` (``torch.onnx.export(dynamo=True)``), so a
model that exports to ONNX would also export to ``.pt2``.

A folder holds ``model.onnx`` (the graph the recommender gives through
``RecommenderModel.export_graph``; the atomic model's takes right-padded histories of dynamic
batch and length), ``items.json`` (raw item id
and text of every item index) and ``deploy.json`` (format, sizes, and the maximum deviation
from the eager model measured at export time).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear

from recsys_compress.deploy.fusions import fuse_for_onnxruntime
from recsys_compress.deploy.smoothing import check_alpha, smooth_activations
from recsys_compress.compression.compressor import token_batches
from recsys_compress.models.interface import RecommenderModel, TokenSequence
from recsys_compress.models.padding import to_right_padding

log = logging.getLogger(__name__)

FORMAT = "recsys-compress/onnx-v2"  # v2: the graph takes right-padded histories


# Loggers that report every graph pass at INFO, some with a stack trace (onnx_ir's "Failed to get
# schema ... skipping"): ~300 lines, in a run's console and log, for one export.
CONVERTER_LOGGERS = ("onnxscript", "onnx_ir")


@contextlib.contextmanager
def quiet_logs(names: Sequence[str], level: int = logging.WARNING) -> Iterator[None]:
    """Only records of ``level`` and above from the loggers ``names`` ("": the root logger)
    inside the block; their own levels come back after it."""
    loggers = [logging.getLogger(name) for name in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, own in zip(loggers, saved):
            lg.setLevel(own)


# How the int8 graph quantises activations. dynamic: each matmul's input scale is computed per
# call (DynamicQuantizeLinear), weights int8. static: scales fixed from calibration histories (QDQ
# around every matmul, run as QLinearMatMul chains). Dynamic is the default: on SmolLM2 it was
# 8-14% faster at 1 and 2 threads, and kept more of a strong base's NDCG@10 (0.970 against 0.859)
# (BENCHMARKS.md, "Static int8, and one thread against two").
INT8_MODES = ("dynamic", "static")

# One int8 scale per output channel of each weight (the first: the default), or one per matrix.
# A low-rank factor's rank components differ in scale by their singular values, and one scale per
# matrix rounds the small components coarser: on the strong SmolLM2 base, odllm+int8@0.5's scores
# moved 0.30 of their spread from the float artefact's per channel, 0.53 per tensor, for 2-5% more
# latency (BENCHMARKS.md, "Per-channel int8 weights").
INT8_WEIGHTS = ("per_channel", "per_tensor")


def histories(batches: Iterable[dict[str, torch.Tensor]], max_len: int) -> Iterator[dict[str, torch.Tensor]]:
    """Left-padded training windows as serving histories: their last ``max_len`` items (a
    window is one longer: its last item is the target; here it is the latest history item)."""
    for b in batches:
        yield {"input_ids": b["input_ids"][:, -max_len:], "attention_mask": b["attention_mask"][:, -max_len:]}


class _Histories:
    """onnxruntime's ``CalibrationDataReader`` (an ABC that accepts any class with ``get_next``) over
    left-padded batches (dicts with ``input_ids`` and ``attention_mask``), fed as the graph takes
    them: right-padded, at most ``max_len`` items (a training window is one longer: its last
    item is the target; here its last ``max_len`` items are a history, as at serving time)."""

    def __init__(self, batches: Iterable[dict[str, torch.Tensor]], max_len: int):
        self._feeds = iter(
            dict(zip(("input_ids", "attention_mask"), to_right_padding(
                b["input_ids"].cpu().numpy(), b["attention_mask"].cpu().numpy())))
            for b in histories(batches, max_len))

    def get_next(self) -> dict[str, Any] | None:
        return next(self._feeds, None)


# 7-bit weights (reduce_range), said explicitly: onnxruntime 1.32 no longer defaults to them. A
# uint8 x int8 product pair summed in int16 (vpmaddubsw, CPUs without VNNI, as AVX2 ones) saturates
# at full 8-bit range, and per-channel scales put every column there: on the tiny test model the
# per-channel int8 error was 4x the per-tensor one (0.0060 against 0.0016), 0.0015 with 7 bits.
# deploy.json records it, so a kept artefact from before can be told apart.
INT8_WEIGHT_BITS = 7


def quantize_graph(float_path: Path, path: Path, int8: str, max_len: int,
                   calibration: Iterable[dict[str, torch.Tensor]] | None, weights: str) -> None:
    """Write the int8 form of the float graph at ``float_path`` to ``path`` (``INT8_MODES``),
    with weight scales ``weights`` (``INT8_WEIGHTS``). Either way every projection and the item
    table (the item head's weight, which the embedding lookup shares) are stored int8; static
    quantises only the MatMul and Gemm nodes (dynamic: onnxruntime's default operator set)."""
    from onnxruntime import quantization as q

    per_channel = weights == "per_channel"
    reduce_range = INT8_WEIGHT_BITS == 7
    # the quantiser logs one INFO line per tensor, and advice, on the root logger ("")
    with quiet_logs(("",), logging.ERROR):
        if int8 == "dynamic":
            q.quantize_dynamic(str(float_path), str(path), weight_type=q.QuantType.QInt8, per_channel=per_channel,
                               reduce_range=reduce_range)
            drop_zero_weight_zero_points(path)
        else:
            assert calibration is not None
            q.quantize_static(
                str(float_path), str(path), _Histories(calibration, max_len), quant_format=q.QuantFormat.QDQ,
                op_types_to_quantize=["MatMul", "Gemm"], per_channel=per_channel, reduce_range=reduce_range,
                activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                # activations only where they meet a weight: attention's own inputs stay float
                extra_options={"MatMulConstBOnly": True},
            )


def drop_zero_weight_zero_points(path: Path) -> int:
    """Remove every MatMulInteger's weight zero point that is a constant of zeros (int8 weights
    are quantised symmetrically, so all of them are) from the graph at ``path``; returns how many.
    The results are the same bit for bit, but per-channel quantisation writes one zero per
    column, and onnxruntime runs a matmul with per-column zero points on a slower path: on
    SmolLM2 per-channel int8 took 1.03-1.06 of per-tensor's time with them, 1.00-1.05 without
    (scratch timings, BENCHMARKS.md, "Per-channel int8 weights")."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    constants = {i.name: i for i in model.graph.initializer}
    dropped = 0
    for node in model.graph.node:
        if (node.op_type == "MatMulInteger" and len(node.input) == 4 and node.input[3] in constants
                and not numpy_helper.to_array(constants[node.input[3]]).any()):
            del node.input[3]  # the last, optional input: absent means zero
            dropped += 1
    used = {name for node in model.graph.node for name in node.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, str(path))
    return dropped


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
    recommender: RecommenderModel,
    folder: str | Path,
    max_len: int,
    item_ids: Sequence[str],
    item_texts: Sequence[str] | None = None,
    quantize: str | None = None,
    info: dict[str, Any] | None = None,
    fuse: bool = True,
    int8: str = INT8_MODES[0],
    calibration: Iterable[dict[str, torch.Tensor]] | None = None,
    int8_weights: str = INT8_WEIGHTS[0],
    int8_smooth: float | None = None,
) -> Path:
    """Write ``recommender``'s model (dense, low-rank or pruned float weights) as an ONNX artefact.

    ``item_ids[i - 1]`` is the raw id of item index ``i``; ``quantize='int8'`` additionally
    applies onnxruntime's int8 quantisation to the graph's matrix multiplications, with
    activation scales per call (``int8='dynamic'``) or fixed on the left-padded ``calibration``
    batches (``int8='static'``), and weight scales per output channel or per matrix
    (``int8_weights``, ``INT8_WEIGHTS``). ``int8_smooth``: before int8, fold SmoothQuant scales
    with this alpha into every block (RMSNorm -> q/k/v and gate/up, up_proj -> down_proj), from
    those inputs on the ``calibration`` batches (``smoothing.smooth_activations``; ``model``
    itself is left as it is; None: off).
    ``fuse``: rewrite the graph into onnxruntime's fused operators first
    (``fuse_for_onnxruntime``). Returns the folder.
    """
    import onnxruntime as ort

    model = recommender.backbone
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize={quantize!r}; allowed: null, int8")
    if int8 not in INT8_MODES:
        raise ValueError(f"int8={int8!r}; allowed: {', '.join(INT8_MODES)}")
    if int8_weights not in INT8_WEIGHTS:
        raise ValueError(f"int8_weights={int8_weights!r}; allowed: {', '.join(INT8_WEIGHTS)}")
    if quantize and int8 == "static" and calibration is None:
        raise ValueError("int8='static' fixes activation scales on calibration histories: pass calibration batches")
    if int8_smooth is not None:
        if not quantize:
            raise ValueError(f"int8_smooth={int8_smooth} prepares a model for int8: it needs quantize='int8'")
        check_alpha(int8_smooth)
        if calibration is None:
            raise ValueError("int8_smooth scales channels by their range on calibration histories: "
                             "pass calibration batches")
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError(
            "cannot export a model with torch int8 layers: export the float model with "
            "quantize='int8' (onnxruntime quantises the exported graph)"
        )
    device = next(model.parameters()).device
    if device.type != "cpu":  # the artefact is a CPU graph, traced and checked on CPU tensors
        raise ValueError(f"the model is on {device}: export_onnx exports a CPU model (call model.cpu() first)")
    n_items = recommender.n_items
    if len(item_ids) != n_items:
        raise ValueError(f"item_ids has {len(item_ids)} entries but the model scores {n_items} items")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    exported, smoothing = model, None
    if quantize and int8_smooth is not None:
        calibration = list(histories(calibration, max_len))  # static int8 reads them again
        exported = copy.deepcopy(model).eval()
        was_training = recommender.training
        recommender.eval()  # no dropout in the statistics
        # statistics over the tokens the decoder reads (several per item for a generative model)
        smoothing = smooth_activations(exported, token_batches(recommender, calibration),
                                       lambda s: recommender.decode(TokenSequence(**s), exported), int8_smooth)
        recommender.train(was_training)
        log.info("int8_smooth=%s: %d inputs, %d calibration tokens; largest input channel over the median, "
                 "before -> after: %s", int8_smooth, smoothing.inputs, smoothing.tokens, ", ".join(
                     f"{t} {smoothing.outlier_ratio_before[t]:.0f}x -> {smoothing.outlier_ratio_after[t]:.1f}x"
                     for t in smoothing.outlier_ratio_before))
    graph = recommender.export_graph(exported, max_len)
    if quantize and int8 == "static" and set(graph.inputs) != {"input_ids", "attention_mask"}:
        raise ValueError(f"int8='static' calibrates on item histories, but this recommender's graph reads "
                         f"{', '.join(graph.inputs)}: use int8='dynamic'")
    float_path = folder / ("model_float.onnx" if quantize else "model.onnx")
    with quiet_logs(CONVERTER_LOGGERS):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # exporter chatter about axis renaming and deprecations
            torch.onnx.export(
                graph.module, tuple(graph.inputs.values()), str(float_path), dynamo=True, optimize=True,
                verbose=False, input_names=list(graph.inputs), output_names=graph.output_names,
                dynamic_shapes=graph.dynamic_shapes, external_data=False,
            )
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        positions = graph.meta.get("max_positions", max_len)  # a generative graph reads several tokens an item
        fusions = fuse_for_onnxruntime(float_path, max(positions, 2), head_dim) if fuse else {}
        path = folder / "model.onnx"
        if quantize == "int8":
            quantize_graph(float_path, path, int8, max_len, calibration, int8_weights)
            carry_module_paths(float_path, path)
            float_path.unlink()

    expected = graph.expected.numpy()  # the model as trained and evaluated, no export wrapper
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: value.numpy() for name, value in graph.inputs.items()})[0]
    deviation = float(abs(got - expected).max())
    if quantize is None and deviation > 1e-3 * max(1.0, float(abs(expected).max())):
        raise RuntimeError(f"the exported graph deviates from the eager model by {deviation:.3g}")

    texts = list(item_texts) if item_texts is not None else [""] * (n_items + 1)
    (folder / "items.json").write_text(json.dumps(
        {"ids": list(item_ids), "texts": texts[1:], **graph.item_fields}, ensure_ascii=False) + "\n")
    (folder / "deploy.json").write_text(json.dumps({
        "format": FORMAT,
        "n_items": n_items,
        "max_len": max_len,
        "quantize": quantize,
        "int8": int8 if quantize else None,
        "int8_weights": int8_weights if quantize else None,
        "int8_weight_bits": INT8_WEIGHT_BITS if quantize else None,
        "int8_smooth": int8_smooth,
        **({"smoothing": dataclasses.asdict(smoothing)} if smoothing else {}),
        "fusions": fusions,
        "max_abs_deviation_from_eager": deviation,
        "megabytes": path.stat().st_size / 2**20,
        **graph.meta,
        **(info or {}),
    }, indent=2) + "\n")
    log.info("exported %s (%.1f MB, max |onnx - eager| = %.2g)", path, path.stat().st_size / 2**20, deviation)
    return folder
