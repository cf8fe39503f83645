"""Compression time of the whole SVD compression step (Compressor), split into calibration and factorisation.

Loads the model once (load time reported apart, as the target excludes it), then compresses a
fresh copy per variant: every combination of ``--gram-dtypes`` and ``--calib-batches``.
``--rounds`` alternate through the variants so machine noise hits each alike; the table gives
medians over rounds of the whole compression step (``time/compress_s``), its calibration part
(forward passes + statistics) and its factorisation part, and the mean relative output error
of the compressed layers on their calibration activations (quality must not pay for speed).

    python experiments/bench_compress.py --model smollm2_135m --ratio 0.5 --rounds 3 dataset=ml_100k
    python experiments/bench_compress.py --gram-dtypes float32 float64 --calib-batches 2 4 dataset=ml_100k

Trailing KEY=VALUE arguments are Hydra overrides of the run config (dataset, batch size, ...).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--method", default="odllm")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--gram-dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--calib-batches", nargs="+", type=int, default=[4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=ml_100k")
    from recsys_compress.utils.cli import parse_with_overrides
    from recsys_compress.tasks.compose import compose_config

    args, overrides = parse_with_overrides(parser, sys.argv[1:] if argv is None else argv)
    args.overrides = overrides

    import torch

    from recsys_compress.compression.compressor import Compressor
    from recsys_compress.tasks.config import validate
    from recsys_compress.tasks.builders import build_datamodule, build_lit_module, build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose_config([f"model={args.model}", *args.overrides])
    run = validate(cfg)
    dm = build_datamodule(run.dataset, run.seed)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    base = build_lit_module(run, build_model(run.model, dm, cfg.paths.cache_dir)).eval()
    load_s = time.perf_counter() - t0
    batch = next(iter(dm.train_dataloader()))
    print(f"model {args.model} loaded in {load_s:.1f} s; calibration batches of "
          f"{tuple(batch['input_ids'].shape)} sequences, torch threads {torch.get_num_threads()}")

    variants = [(g, b) for g in args.gram_dtypes for b in args.calib_batches]
    # Real (non-padding) calibration tokens per batch count: the same batches every round.
    tokens = {b: sum(int(batch["attention_mask"].sum()) for _, batch in zip(range(b), dm.train_dataloader()))
              for b in args.calib_batches}
    samples: dict[tuple, list[dict]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for gram_dtype, batches in variants:
            lit = copy.deepcopy(base)
            cb = Compressor(run.compression.replace(method=args.method, calib_batches=batches,
                                                             gram_dtype=gram_dtype), args.ratio)
            cb.compress(lit, dm.train_dataloader())
            summary = cb.summary()
            samples[(gram_dtype, batches)].append({**summary, "tokens": tokens[batches]})
            print(f"round {round_ + 1}/{args.rounds} gram {gram_dtype} x {batches} batches: "
                  f"{summary['time/compress_s']:.1f} s (calibrate {summary['time/calibrate_s']:.1f} s, "
                  f"factorize {summary['time/factorize_s']:.1f} s), mean rel. error "
                  f"{summary['compression/mean_rel_output_error']:.4f}", flush=True)
            del lit

    rows = []
    for (gram_dtype, batches), runs in samples.items():
        med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
        rows.append({
            "gram_dtype": gram_dtype, "calib_batches": batches, "tokens": runs[0]["tokens"],
            "compress_s": med("time/compress_s"), "calibrate_s": med("time/calibrate_s"),
            "factorize_s": med("time/factorize_s"),
            "mean_rel_output_error": med("compression/mean_rel_output_error"),
            "jittered_layers": max(r["compression/jittered_layers"] for r in runs), "rounds": len(runs),
        })
    print(f"\n{args.model} {args.method}@{args.ratio}, medians over {args.rounds} rounds (load {load_s:.1f} s excluded)\n")
    print("| gram products | calib batches | tokens | compress s | calibrate s | factorize s | mean rel. error | jittered |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['gram_dtype']} | {r['calib_batches']} | {r['tokens']} | {r['compress_s']:.1f} | "
              f"{r['calibrate_s']:.1f} | {r['factorize_s']:.1f} | {r['mean_rel_output_error']:.4f} | "
              f"{r['jittered_layers']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "method": args.method, "ratio": args.ratio,
                                        "load_s": load_s, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
