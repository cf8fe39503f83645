"""Where an exported artefact's time goes: onnxruntime's per-operator profile, attributed by role.

    python experiments/profile_onnx.py ART_BASE ART_ODLLM ART_ODLLM_INT8 --reps 30 --threads 2

Each artefact folder (written by ``recsys_compress.deploy.export``) runs ``--reps`` batch-1
calls of a ``--length`` history with onnxruntime's profiler on. Every kernel's time goes to one
role, found from the module path the exporter records on each node (``namespace``) and, for
nodes the quantiser or the runtime's fusions created, from the node they came from:

- factor matmuls: the two matmuls of a ``LowRankLinear`` (``.down`` = B, ``.up`` = A);
- dense projections: q/k/v/o and gate/up/down kept dense;
- item head: the output matmul over every item;
- attention: score and value matmuls, softmax, mask, rotary embedding, the head reshapes;
- norms: the RMS norms; MLP activation: SiLU and the gate product;
- gather: the item-embedding lookup;
- quantise/dequantise: dynamic int8's activation quantisation and output rescaling, or static
  int8's QuantizeLinear/DequantizeLinear between its QLinearMatMuls and the float operators;
- other: residual adds, positions, shape arithmetic.

Prints a table of ms per call by role (median call time too) and, with ``--out``, writes it
as JSON. This process never imports torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROLES = ("factor matmuls", "dense projections", "item head", "attention", "norms", "MLP activation",
         "gather", "quantise/dequantise", "other")
MATMULS = {"MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul",
           "MatMulIntegerToFloat", "MatMulNBits"}
FUSED_ATTENTION = {"MultiHeadAttention", "GroupQueryAttention", "Attention", "RotaryEmbedding"}
FUSED_NORMS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RMSNormalization",
               "LayerNormalization", "SkipLayerNormalization"}
QUANT_OPS = {"DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"}


def node_namespaces(model_path: Path) -> dict[str, str]:
    """Node name -> the exporter's module path (``namespace``), for every node that has one."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return {n.name: p.value for n in model.graph.node for p in n.metadata_props if p.key == "namespace"}


def module_path(namespace: str) -> str:
    """The innermost module of a namespace ``: Cls/mod.a: Cls/mod.a.b: Cls/op: aten...``."""
    parts = [p.split(":")[0].strip() for p in namespace.split("/")[1:-1]]
    return parts[-1] if parts else ""


def role_of(op: str, node: str, namespaces: dict[str, str]) -> str:
    """The role (one of ``ROLES``) of a profiled kernel ``op`` run for graph node ``node``.

    The exporter records each node's module path; ``export.carry_module_paths`` copies it onto
    the nodes dynamic int8 wrote; a runtime fusion is named ``<first fused node>/<fusion>``.
    """
    if op in QUANT_OPS:
        return "quantise/dequantise"
    if op in FUSED_ATTENTION:  # fused nodes carry no module path
        return "attention"
    if op in FUSED_NORMS:
        return "norms"
    path = module_path(namespaces.get(node.split("/")[0], ""))
    leaf = path.rsplit(".", 1)[-1]
    if op == "Gather" and (leaf == "embed_tokens" or not path):
        return "gather"
    if leaf == "lm_head":
        return "item head"
    if op in MATMULS and leaf in ("down", "up"):
        return "factor matmuls"
    if op in MATMULS and leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        return "dense projections"
    if "self_attn" in path or "rotary_emb" in path:
        return "attention"
    if "norm" in leaf:
        return "norms"
    if ".mlp" in path:
        return "MLP activation"
    return "other"


def profile(folder: Path, reps: int, length: int, threads: int) -> dict:
    """ms per call by role, and the median wall time of a call, for one artefact folder."""
    import numpy as np
    import onnxruntime as ort

    model = folder / "model.onnx"
    warmup = 5
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        n_items = json.loads((folder / "deploy.json").read_text())["n_items"]
        ids = np.random.default_rng(0).integers(1, n_items + 1, (1, length)).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for _ in range(warmup + reps):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e for e in events if e["name"] == "model_run"), key=lambda e: e["ts"])[warmup:]
    namespaces = node_namespaces(model)
    by_role: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    first = runs[0]["ts"] if runs else 0  # the warm-up calls' kernels are left out
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first]
    for e in kernels:
        op = e["args"]["op_name"]
        by_role[role_of(op, e["name"].removesuffix("_kernel_time"), namespaces)] += e["dur"]
        by_op[op] += e["dur"]
    calls = max(len(runs), 1)
    return {
        "artefact": str(folder),
        "call_ms_median": statistics.median(r["dur"] for r in runs) / 1000 if runs else float("nan"),
        # what the kernels of the same calls add up to at most (one thread runs them one after another)
        "call_ms_mean": statistics.fmean(r["dur"] for r in runs) / 1000 if runs else float("nan"),
        "kernel_ms_per_call": sum(by_role.values()) / calls / 1000,
        "roles_ms": {r: by_role.get(r, 0.0) / calls / 1000 for r in ROLES},
        "ops_ms": {op: t / calls / 1000 for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artefacts", nargs="+", type=Path, help="folders written by export_onnx")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--labels", nargs="+", default=None, help="column names (default: the folder names)")
    args = parser.parse_args()
    if args.labels and len(args.labels) != len(args.artefacts):
        parser.error(f"--labels gives {len(args.labels)} names for {len(args.artefacts)} artefacts")
    rows = [profile(folder, args.reps, args.length, args.threads) for folder in args.artefacts]
    assert "torch" not in sys.modules
    names = args.labels or [Path(r["artefact"]).name for r in rows]
    print(f"batch 1, history {args.length}, {args.threads} threads, ms per call over {args.reps} profiled calls")
    print("| role | " + " | ".join(names) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for role in ROLES:
        print(f"| {role} | " + " | ".join(f"{r['roles_ms'][role]:.2f}" for r in rows) + " |")
    print("| **all kernels** | " + " | ".join(f"**{r['kernel_ms_per_call']:.2f}**" for r in rows) + " |")
    print("| call (median) | " + " | ".join(f"{r['call_ms_median']:.2f}" for r in rows) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
