"""How close onnxruntime runs a low-rank factor pair to its FLOP share, per projection shape and
thread count: the part of issue 21's latency gap that no graph rewrite can close.

For each projection shape of a decoder block (q/o: d x d, k/v: kv x d, gate/up and down:
d x ffn and back), one graph chains ``--chain`` dense matmuls x @ W (out x in) and back, and one
chains the same with every matrix replaced by a factor pair at rank r, both over a history of
``--tokens`` items (batch 1). Their time ratio against the FLOP ratio r (m + n) / (m n) gives
the efficiency of the factors relative to the dense kernel (1: the factors run as fast per
FLOP as the dense matmul). Ranks: the uniform rank at ``--ratio`` (``rank_for_ratio``), and that
rank rounded down to each ``--aligns`` multiple. Each thread count runs in a process of its
own, on onnxruntime's global thread pool, the graphs timed call by call in turn.

    python experiments/bench_factor_matmul.py                    # SmolLM2-135M's shapes, 1 and 2 threads
    python experiments/bench_factor_matmul.py --hidden 2048 --kv 512 --ffn 8192 --threads 4

The block row weighs each shape by its share of a block's dense FLOPs (q, k, v, o, gate, up,
down): the projection time of a low-rank block over a dense one, as the runtime delivers it.

``--siblings`` also times the projections that read one input (q, k and v; gate and up) as
separate matmuls against one matmul over their concatenated weights (for factor pairs: the
first factors concatenated, the second ones apart), ``--chain`` independent copies per graph:
whether fusing siblings would give the 2-thread kernels wider, more efficient work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def pair_graph(shapes: list[tuple[int, int]], seed: int) -> bytes:
    """An ONNX graph of chained MatMuls x @ W_1 @ W_2 ... with random weights of ``shapes`` (in, out)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, weights, current = [], [], "x"
    for i, (n_in, n_out) in enumerate(shapes):
        weights.append(numpy_helper.from_array((rng.standard_normal((n_in, n_out)) / n_in**0.5).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"y{i}"]))
        current = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, shapes[0][0]])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def sibling_graph(hidden: int, outs: list[int], ranks: list[int] | None, fused: bool, copies: int, seed: int) -> bytes:
    """An ONNX graph of ``copies`` independent sibling groups, each reading ``x`` (``hidden`` wide)
    into one output per ``outs`` width: dense (``ranks`` None) or factor pairs at ``ranks``;
    ``fused``: the matmuls that read ``x`` as one over their concatenated weights, then Split."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, weights, outputs = [], [], []

    def weight(value: np.ndarray, name: str) -> str:
        weights.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def draw(n_in: int, n_out: int) -> np.ndarray:
        return rng.standard_normal((n_in, n_out)) / n_in**0.5

    firsts = ranks or outs  # the widths of the matmuls that read x
    for c in range(copies):
        parts = [f"p{c}_{i}" for i in range(len(outs))]
        first = [draw(hidden, w) for w in firsts]  # the same weights fused or not
        if fused:
            weights.append(numpy_helper.from_array(np.array(firsts, dtype=np.int64), f"sizes{c}"))
            nodes += [helper.make_node("MatMul", ["x", weight(np.concatenate(first, axis=1), f"w{c}")], [f"h{c}"]),
                      helper.make_node("Split", [f"h{c}", f"sizes{c}"], parts, axis=-1)]
        else:
            nodes += [helper.make_node("MatMul", ["x", weight(w, f"w{c}_{i}")], [parts[i]]) for i, w in enumerate(first)]
        for i, n_out in enumerate(outs):
            if ranks:
                nodes.append(helper.make_node("MatMul", [parts[i], weight(draw(ranks[i], n_out), f"u{c}_{i}")], [f"y{c}_{i}"]))
            outputs.append(f"y{c}_{i}" if ranks else parts[i])
    graph = helper.make_graph(nodes, "siblings", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, hidden])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def sibling_groups(hidden: int, kv: int, ffn: int) -> dict[str, list[int]]:
    """The output widths of the projections of a block that read one input."""
    return {"q/k/v": [hidden, kv, kv], "gate/up": [ffn, ffn]}


def kinds(hidden: int, kv: int, ffn: int) -> dict[str, tuple[int, int, int]]:
    """Projection shapes (in, out) and how many of each a block holds."""
    return {"q/o": (hidden, hidden, 2), "k/v": (hidden, kv, 2), "gate/up/down": (hidden, ffn, 3)}


def time_worker(args: argparse.Namespace) -> dict:
    """One thread count: every graph of every shape, timed call by call in turn."""
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(args.threads[0], 1)  # one pool for all sessions
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    sessions, inputs = {}, {}
    for name, (n_in, n_out, _) in kinds(args.hidden, args.kv, args.ffn).items():
        variants = {"dense": [(n_in, n_out), (n_out, n_in)] * args.chain}
        for rank in ranks(n_in, n_out, args.ratio, args.aligns):
            variants[rank] = [(n_in, rank), (rank, n_out), (n_out, rank), (rank, n_in)] * args.chain
        for key, shapes in variants.items():
            sessions[(name, key)] = ort.InferenceSession(pair_graph(shapes, seed=0), options,
                                                         providers=["CPUExecutionProvider"])
        inputs[name] = np.random.default_rng(1).standard_normal((args.tokens, n_in)).astype(np.float32)
    for name, outs in (sibling_groups(args.hidden, args.kv, args.ffn) if args.siblings else {}).items():
        uniform = [ranks(args.hidden, n_out, args.ratio, [])[0] for n_out in outs]
        for key, rank_list, fused in (("dense", None, False), ("dense fused", None, True),
                                      ("factors", uniform, False), ("factors fused", uniform, True)):
            sessions[(name, key)] = ort.InferenceSession(sibling_graph(args.hidden, outs, rank_list, fused, args.chain, 0),
                                                         options, providers=["CPUExecutionProvider"])
        inputs[name] = np.random.default_rng(1).standard_normal((args.tokens, args.hidden)).astype(np.float32)
    times: dict[tuple, list[float]] = {key: [] for key in sessions}
    order = list(sessions)
    for call in range(args.warmup + args.reps):
        for key in order[call % len(order):] + order[: call % len(order)]:  # rotated each call
            feed = {"x": inputs[key[0]]}
            start = time.perf_counter()
            sessions[key].run(None, feed)
            if call >= args.warmup:
                times[key].append(time.perf_counter() - start)
    return {f"{name}|{key}": statistics.median(t) for (name, key), t in times.items()}


def ranks(n_in: int, n_out: int, ratio: float, aligns: list[int]) -> list[int]:
    """The uniform rank at ``ratio`` (first), then the multiples of each of ``aligns`` next to it,
    below and above (below the break-even rank), as ``align_ranks`` may choose them."""
    from recsys_compress.compression.allocation import break_even_rank
    from recsys_compress.compression.low_rank import rank_for_ratio

    rank = rank_for_ratio(n_out, n_in, ratio)
    aligned = {k for a in aligns if a > 1 and rank >= a for k in (rank - rank % a, rank - rank % a + a)}
    return [rank, *sorted(k for k in aligned - {rank} if k <= break_even_rank(n_out, n_in))]


def summarise(args: argparse.Namespace, medians: dict[int, dict[str, float]]) -> list[dict]:
    """Per thread count: a row per shape and rank, then the block at the uniform rank, each shape
    weighted by its dense FLOPs in a block (``count`` x in x out)."""
    rows = []
    shapes = kinds(args.hidden, args.kv, args.ffn)
    for threads, m in medians.items():
        dense_flops = factor_flops = factor_time = 0.0  # the block's, in units of its dense time per FLOP
        for name, (n_in, n_out, count) in shapes.items():
            dense = m[f"{name}|dense"]
            for rank in ranks(n_in, n_out, args.ratio, args.aligns):
                flops = rank * (n_in + n_out) / (n_in * n_out)
                time_ratio = m[f"{name}|{rank}"] / dense
                rows.append({"threads": threads, "shape": f"{name} {n_in}x{n_out}", "rank": rank, "flop_ratio": flops,
                             "time_ratio": time_ratio, "efficiency": flops / time_ratio,
                             "dense_us_per_matmul": dense / (2 * args.chain) * 1e6})
            uniform = ranks(n_in, n_out, args.ratio, [])[0]
            dense_flops += count * n_in * n_out
            factor_flops += count * uniform * (n_in + n_out)
            factor_time += count * n_in * n_out * m[f"{name}|{uniform}"] / dense
        rows.append({"threads": threads, "shape": "block (q, k, v, o, gate, up, down)", "rank": None,
                     "flop_ratio": factor_flops / dense_flops, "time_ratio": factor_time / dense_flops,
                     "efficiency": factor_flops / factor_time, "dense_us_per_matmul": None})
    return rows


def summarise_siblings(args: argparse.Namespace, medians: dict[int, dict[str, float]]) -> list[dict]:
    """Per thread count and sibling group: fused over separate, for dense and factor pairs, and
    the factor pairs (separate or fused) over the separate dense matmuls."""
    rows = []
    for threads, m in medians.items():
        for name in sibling_groups(args.hidden, args.kv, args.ffn):
            t = {key: m[f"{name}|{key}"] for key in ("dense", "dense fused", "factors", "factors fused")}
            rows.append({"threads": threads, "group": name, "dense_fused_over_separate": t["dense fused"] / t["dense"],
                         "factors_fused_over_separate": t["factors fused"] / t["factors"],
                         "factors_over_dense": t["factors"] / t["dense"],
                         "factors_fused_over_dense": t["factors fused"] / t["dense"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576, help="SmolLM2-135M's hidden size by default")
    parser.add_argument("--kv", type=int, default=192, help="key/value width (kv heads x head size)")
    parser.add_argument("--ffn", type=int, default=1536, help="the MLP's intermediate size")
    parser.add_argument("--tokens", type=int, default=50, help="history length (batch 1)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--aligns", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--chain", type=int, default=8, help="matmul pairs per graph (amortises the call)")
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--siblings", action="store_true",
                        help="also time q/k/v and gate/up as one matmul over concatenated weights against separate ones")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(time_worker(args)))
        return
    medians = {}
    for threads in args.threads:
        command = [sys.executable, __file__, "--worker", *strip_threads(sys.argv[1:]), "--threads", str(threads)]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"{threads} threads failed:\n{out.stderr[-3000:]}")
        medians[threads] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = summarise(args, medians)
    print(f"factor pair vs dense matmul, {args.tokens} tokens, ratio {args.ratio}, median of {args.reps} calls "
          f"of {args.chain} pairs each; efficiency = FLOP ratio / time ratio")
    print("| threads | shape | rank | FLOPs x dense | time x dense | efficiency | dense us per matmul |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        dense = f"{r['dense_us_per_matmul']:.0f}" if r["dense_us_per_matmul"] else "-"
        print(f"| {r['threads']} | {r['shape']} | {r['rank'] if r['rank'] else '-'} | {r['flop_ratio']:.3f} | {r['time_ratio']:.3f} | "
              f"{r['efficiency']:.2f} | {dense} |")
    siblings = summarise_siblings(args, medians) if args.siblings else []
    if siblings:
        print("\nprojections that read one input: one matmul over concatenated weights (fused) against separate ones")
        print("| threads | group | dense: fused x separate | factors: fused x separate | factors x dense | factors fused x dense |")
        print("|---|---|---|---|---|---|")
        for r in siblings:
            print(f"| {r['threads']} | {r['group']} | {r['dense_fused_over_separate']:.3f} | {r['factors_fused_over_separate']:.3f} | "
                  f"{r['factors_over_dense']:.3f} | {r['factors_fused_over_dense']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": sys.argv, "rows": rows, "siblings": siblings}, indent=2) + "\n")


def strip_threads(argv: list[str]) -> list[str]:
    """``argv`` without its ``--threads`` option and values."""
    out, skipping = [], False
    for a in argv:
        if a == "--threads" or a.startswith("--threads="):
            skipping = a == "--threads"
            continue
        if skipping and not a.startswith("--"):
            continue
        skipping = False
        out.append(a)
    return out


if __name__ == "__main__":
    main()
