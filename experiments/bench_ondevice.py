"""On-device figures: base vs compressed vs compressed+int8, side by side in one run.

For each variant (base, odllm at each ratio, each of those + int8): batch-1 next-item
latency (median over ``--reps`` calls, history length ``--length``), throughput at
``--batch`` sequences, peak RSS of the process that built and ran it, and the size of the
saved state dict. Every variant runs in a fresh subprocess (so peak RSS is its own), and
``--rounds`` alternate through all variants so machine noise hits each alike; the table
reports medians over rounds and ratios to the base.

    python experiments/bench_ondevice.py --model llama_tiny --ratios 0.3 0.5 0.7 dataset=ml_100k
    python experiments/bench_ondevice.py --model smollm2_135m --ratios 0.3 0.5 0.7 dataset=ml_100k
    python experiments/bench_ondevice.py --runtime onnx --model smollm2_135m --ratios 0.5 dataset=ml_100k
    python experiments/bench_ondevice.py --device cuda --model smollm2_135m --ratios 0.5 dataset=ml_1m  # GPU, float only

``--runtime onnx`` measures the deployable artefact instead: each variant is exported once
(``recsys_compress.deploy.export``; +int8 = onnxruntime dynamic int8 on the graph), then every
round loads only the artefact with onnxruntime in a process that never imports torch, so
peak RSS is what a device running the recommender needs.

Latency does not depend on what the weights learned, so the base model is the untrained
architecture (pretrained weights for smollm2_135m); compression calibrates on real batches.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recsys_compress.utils.cli import split_overrides


def build_variant(args: argparse.Namespace, variant: str):
    """The model of ``variant`` (base, METHOD@R, with +int8), its datamodule and compression time."""
    import torch

    from recsys_compress.compression.callback import CompressionCallback
    from recsys_compress.config import validate
    from recsys_compress.builders import build_datamodule, build_lit_module, build_model
    from recsys_compress.utils.compose import compose_config

    torch.set_num_threads(args.threads)
    cfg = compose_config([f"model={args.model}", *args.overrides])
    run = validate(cfg)
    dm = build_datamodule(run.dataset, run.seed)
    torch.manual_seed(0)
    lit = build_lit_module(run, build_model(run.model, dm, cfg.paths.cache_dir)).eval().to(args.device)
    method, _, ratio = variant.partition("@")
    quantize = method.endswith("+int8")
    method = method.removesuffix("+int8")
    compress_s = 0.0
    if method != "base" or quantize:
        cb = CompressionCallback(
            run.compression.replace(method="int8" if method == "base" else method, calib_batches=args.calib_batches,
                                    quantize="int8" if quantize else None),
            float(ratio or 1.0),
            defer_quantize=args.runtime == "onnx",  # onnxruntime quantises the exported graph
        )
        cb.compress(lit, dm.train_dataloader())
        compress_s = cb.seconds
    return lit, dm, compress_s, quantize


def export_worker(args: argparse.Namespace) -> dict:
    from recsys_compress.deploy.export import export_onnx
    from recsys_compress.models.item_llm import count_parameters

    lit, dm, compress_s, quantize = build_variant(args, args.export)
    export_onnx(lit.model, args.folder, max(args.length, dm.max_len), dm.data.item_ids, dm.data.item_texts(),
                quantize="int8" if quantize else None)
    return {"params": count_parameters(lit.model), "compress_s": compress_s}


def onnx_worker(args: argparse.Namespace) -> dict:
    """Latency/throughput/RSS of an exported artefact; this process never imports torch."""
    import numpy as np

    from recsys_compress.deploy.recommend import Recommender

    rec = Recommender(args.folder, threads=args.threads)
    rng = np.random.default_rng(0)
    history = [rec.item_ids[i] for i in rng.integers(0, len(rec.item_ids), args.length)]
    batch = [history] * args.batch
    for _ in range(5):
        rec.scores([history])
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        rec.scores([history])
        times.append(time.perf_counter() - t0)
    rec.scores(batch)
    t0 = time.perf_counter()
    for _ in range(3):
        rec.scores(batch)
    throughput = 3 * args.batch / (time.perf_counter() - t0)
    assert "torch" not in sys.modules
    return {
        "variant": args.worker,
        "latency_ms": 1000 * statistics.median(times),
        "throughput_seq_s": throughput,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "file_mb": (Path(args.folder) / "model.onnx").stat().st_size / 2**20,
    }


def worker(args: argparse.Namespace) -> dict:
    import torch
    from recsys_compress.models.item_llm import count_parameters, serialized_megabytes

    lit, dm, compress_s, _ = build_variant(args, args.worker)
    device = torch.device(args.device)

    def wait() -> None:  # CUDA kernels run asynchronously: time them to completion
        if device.type == "cuda":
            torch.cuda.synchronize()

    history = torch.randint(1, dm.n_items + 1, (1, args.length), device=device)
    one = torch.ones_like(history)
    batch = history.expand(args.batch, -1).contiguous()
    ones = torch.ones_like(batch)
    with torch.inference_mode():
        for _ in range(5):
            lit(history, one)
        times = []
        for _ in range(args.reps):
            wait()
            t0 = time.perf_counter()
            lit(history, one)
            wait()
            times.append(time.perf_counter() - t0)
        lit(batch, ones)
        wait()
        t0 = time.perf_counter()
        for _ in range(3):
            lit(batch, ones)
        wait()
        throughput = 3 * args.batch / (time.perf_counter() - t0)
    return {
        "variant": args.worker,
        "latency_ms": 1000 * statistics.median(times),
        "throughput_seq_s": throughput,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "file_mb": serialized_megabytes(lit.model),
        "params": count_parameters(lit.model),
        "compress_s": compress_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_tiny")
    parser.add_argument("--method", default="odllm")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--runtime", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--device", default="cpu", help="torch runtime: cpu or cuda (int8 variants are CPU-only)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--export", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=ml_100k")
    options, overrides = split_overrides(sys.argv[1:])  # `--ratios 0.5 dataset=x` would swallow them
    args = parser.parse_args(options)
    args.overrides = overrides
    if args.export:
        print(json.dumps(export_worker(args)))
        return
    if args.worker:
        print(json.dumps(onnx_worker(args) if args.runtime == "onnx" else worker(args)))
        return

    if args.device != "cpu" and args.runtime != "torch":
        parser.error(f"--device={args.device} applies to --runtime torch; onnx runs on the CPU")
    # dynamic int8 (torch.ao and onnxruntime) runs on CPUs only
    int8 = args.device == "cpu"
    variants = ["base"] + (["base+int8"] if int8 else [])
    for r in args.ratios:
        variants += [f"{args.method}@{r}"] + ([f"{args.method}+int8@{r}"] if int8 else [])
    results: dict[str, list[dict]] = {v: [] for v in variants}
    passthrough = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
                   ("model", "length", "batch", "reps", "threads", "calib-batches", "runtime", "device")]

    def call(*extra: str) -> dict:
        out = subprocess.run([sys.executable, __file__, *passthrough, *extra, *args.overrides],
                             capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{' '.join(extra)} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as tmp:
        exported = {}
        if args.runtime == "onnx":
            for v in variants:
                exported[v] = call(f"--export={v}", f"--folder={tmp}/{v}")
        for _ in range(args.rounds):
            for v in variants:
                if args.runtime == "onnx":
                    results[v].append({**exported[v], **call(f"--worker={v}", f"--folder={tmp}/{v}")})
                else:
                    results[v].append(call(f"--worker={v}"))
    base = {k: statistics.median(r[k] for r in results["base"]) for k in ("latency_ms", "file_mb")}
    rows = []
    for v in variants:
        row = {"variant": v, "params": results[v][0]["params"]}  # fixed by the variant, not measured
        for k in ("latency_ms", "throughput_seq_s", "peak_rss_mb", "file_mb", "compress_s"):
            row[k] = statistics.median(r[k] for r in results[v])
        row["latency_x_base"] = row["latency_ms"] / base["latency_ms"]
        row["file_x_base"] = row["file_mb"] / base["file_mb"]
        rows.append(row)
    print(f"{args.model} ({args.runtime}), history {args.length}, batch {args.batch}, {args.threads} threads, "
          f"median of {args.rounds} rounds x {args.reps} calls")
    print("| variant | latency ms | x base | seq/s @batch | peak RSS MB | file MB | x base | params |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['latency_ms']:.2f} | {r['latency_x_base']:.2f} | {r['throughput_seq_s']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['file_mb']:.2f} | {r['file_x_base']:.2f} | {r['params']:,} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
