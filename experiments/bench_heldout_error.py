"""In-sample vs held-out output error of the low-rank methods, on users calibration never saw.

Loads the model once, then for every method and ratio compresses a fresh copy with the same
calibration batches (the first ``--calib-batches`` training batches) and measures each layer's
relative output error ||(W - W') X||_F / ||W X||_F twice: on the calibration tokens themselves
(``compression/mean_rel_output_error``) and on the next ``--heldout-batches`` batches with every
calibration user removed (``compression/heldout_rel_output_error``). Whitening fits the
calibration tokens, so only the held-out figure says what it buys on new data; the last
column divides each method's held-out error by plain SVD's at the same ratio.

    python experiments/bench_heldout_error.py --model smollm2_135m --calib-batches 8 --heldout-batches 4 \
        dataset=ml_100k dataset.batch_size=8

Trailing KEY=VALUE arguments are Hydra overrides of the run config (dataset, batch size, ...).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from recsys_compress.utils.cli import parse_with_overrides

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--methods", nargs="+", default=["svd", "asvd", "odllm"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--heldout-batches", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args, overrides = parse_with_overrides(parser, sys.argv[1:] if argv is None else argv)

    import torch

    from recsys_compress.compression.compressor import Compressor
    from recsys_compress.tasks.config import validate
    from recsys_compress.tasks.builders import build_datamodule, build_lit_module, build_model
    from recsys_compress.tasks.compose import compose_config

    cfg = compose_config([f"model={args.model}", *overrides])
    run = validate(cfg)
    dm = build_datamodule(run.dataset, run.seed)
    torch.manual_seed(0)
    base = build_lit_module(run, build_model(run.model, dm, cfg.paths.cache_dir)).eval()
    rows = []
    for ratio in args.ratios:
        for method in args.methods:
            lit = copy.deepcopy(base)
            cb = Compressor(run.compression.replace(method=method, calib_batches=args.calib_batches,
                                                             heldout_batches=args.heldout_batches), ratio)
            cb.compress(lit, dm.train_dataloader())
            s = cb.summary()
            rows.append({"method": method, "ratio": ratio, "in_sample": s["compression/mean_rel_output_error"],
                         "heldout": s["compression/heldout_rel_output_error"],
                         "calib_tokens": s["compression/calib_tokens"], "heldout_tokens": s["compression/heldout_tokens"],
                         "rank_deficient_layers": s["compression/rank_deficient_layers"],
                         "jittered_layers": s["compression/jittered_layers"], "compress_s": s["time/compress_s"]})
            print(json.dumps(rows[-1]), flush=True)
            del lit
    plain = {r["ratio"]: r["heldout"] for r in rows if r["method"] == "svd"}
    first = rows[0]
    print(f"\n{args.model} on {run.dataset.name}: calibration {first['calib_tokens']} tokens, held-out "
          f"{first['heldout_tokens']} tokens of other users\n")
    print("| method | ratio | in-sample error | held-out error | held-out / plain SVD's | rank-deficient layers |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        versus = f"{r['heldout'] / plain[r['ratio']]:.3f}" if r["ratio"] in plain else ""
        print(f"| {r['method']} | {r['ratio']} | {r['in_sample']:.4f} | {r['heldout']:.4f} | {versus} | "
              f"{r['rank_deficient_layers']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "overrides": overrides, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
