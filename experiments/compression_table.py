"""Methods x ratios on one trained model: retention of NDCG@10 and activation error.

Takes a finished `train.py` run directory (its `.hydra/config.yaml` and best checkpoint),
tests the base model once, then for every method and ratio restores the base weights,
compresses (same calibration batches for every method) and tests. Writes a markdown table
and a JSON file.

    python experiments/compression_table.py outputs/bench/ml1m --methods svd asvd odllm \
        prune_magnitude wanda --ratios 0.3 0.5 0.7 0.9 --out outputs/bench/compression_ml1m.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from recsys_compress.compression.callback import SVDCompressionCallback
from recsys_compress.config import validate
from recsys_compress.tasks.train_seqrec import build_datamodule, build_lit_module, build_model
from recsys_compress.utils.compose import PROJECT_ROOT


def best_checkpoint(run_dir: Path) -> Path:
    folder = run_dir / "checkpoints"
    candidates = sorted(p for p in folder.glob("epoch*.ckpt"))
    if not candidates:
        raise FileNotFoundError(f"no epoch*.ckpt (best validation checkpoint) in {folder}")
    return candidates[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--methods", nargs="+", default=["svd", "asvd", "odllm"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    cfg = OmegaConf.load(args.run_dir / ".hydra" / "config.yaml")
    # The saved config keeps ${hydra:...} interpolations, which resolve only inside Hydra.
    cfg.paths.root_dir = str(PROJECT_ROOT)
    cfg.paths.output_dir = str(args.run_dir)
    run = validate(cfg)
    L.seed_everything(run.seed)
    dm = build_datamodule(run.dataset, run.seed)
    lit = build_lit_module(run, build_model(run.model, dm, cfg.paths.cache_dir))
    ckpt = best_checkpoint(args.run_dir)
    lit.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    base_model = copy.deepcopy(lit.model)

    def test(callbacks=()) -> dict:
        trainer = L.Trainer(logger=False, callbacks=list(callbacks), enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu", devices=1)
        return trainer.test(lit, datamodule=dm, verbose=False)[0]

    base = test()
    rows = []
    for ratio in args.ratios:
        for method in args.methods:
            lit.model = copy.deepcopy(base_model)
            cb = SVDCompressionCallback(method=method, ratio=ratio, calib_batches=args.calib_batches)
            result = test([cb])
            summary = cb.summary()
            rows.append({
                "method": method, "ratio": ratio,
                "test/ndcg@10": result["test/ndcg@10"],
                "retention/ndcg@10": result["test/ndcg@10"] / base["test/ndcg@10"],
                "compression/kept_ratio": summary["compression/kept_ratio"],
                "compression/mean_rel_output_error": summary["compression/mean_rel_output_error"],
                "time/compress_s": summary["time/compress_s"],
            })
            print(json.dumps(rows[-1]), flush=True)

    print(f"\nbase {run.model.name} on {run.dataset.name} ({ckpt.name}): test NDCG@10 {base['test/ndcg@10']:.4f}\n")
    print("| ratio | " + " | ".join(args.methods) + " |")
    print("|---|" + "---|" * len(args.methods))
    for ratio in args.ratios:
        cells = []
        for method in args.methods:
            r = next(r for r in rows if r["method"] == method and r["ratio"] == ratio)
            cells.append(f"{r['retention/ndcg@10']:.3f} (err {r['compression/mean_rel_output_error']:.3f})")
        print(f"| {ratio} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps({"base": base, "checkpoint": str(ckpt), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
