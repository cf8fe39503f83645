"""Methods x ratios (x alignments) on one trained model: retention of NDCG@10, errors, times.

Takes a finished `train.py` run directory (its `.hydra/config.yaml` and either its best
checkpoint or, for a compression run that reused a cached base model, that cache entry named
by `base/cache_key` in its metrics.json), tests the base model once, then for every method,
ratio and alignment restores the base weights, compresses (same calibration batches for every
method), aligns and tests. Writes a markdown table and a JSON file.

    recsys-compression-table outputs/bench/ml1m --methods svd asvd odllm \
        prune_magnitude wanda --ratios 0.3 0.5 0.7 0.9 --out outputs/bench/compression_ml1m.json
    recsys-compression-table outputs/bench/ml1m --methods svd odllm --ratios 0.3 0.5 0.7 \
        --alignments none progressive progressive_lstsq alignment.steps_per_layer=200
    recsys-compression-table outputs/bench/smollm2_ml100k_odllm05 --calib-batches 1 \
        --methods svd odllm --ratios 0.3 0.5 0.7 --alignments none progressive progressive_lstsq
    recsys-compression-table RUN_DIR --methods odllm --ratios 0.3 0.5 \
        --allocations uniform global global_relative --alignments none progressive_lstsq

With several ``--allocations`` each low-rank cell is also compared with its uniform twin on the
same test users (``vs_uniform/ndcg@10`` and its paired bootstrap interval). ``--out`` also keeps
every cell's per-user test NDCG@10 (``per_user``), so cells of two invocations (one with
``compression.sequential=true``, say) can be paired with ``evaluation.bootstrap.paired_bootstrap_ratio``.

Every cell's config is composed by Hydra as ``train.py`` would compose it: the run's own command
line (``RUN_DIR/.hydra/overrides.yaml``), then ``compression=METHOD ratio=R
compression.allocation=A alignment=NAME``, then any ``KEY=VALUE`` given here (e.g.
``alignment.lr=1e-4``, ``compression.asvd_alpha=0.3``, ``trainer.precision=32-true``); the
Trainer is the run's ``trainer`` group.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import lightning as L

from recsys_compress.alignment.runner import align
from recsys_compress.tasks.builders import build_datamodule, build_lit_module, build_model
from recsys_compress.tasks.item_index import run_item_codes
from recsys_compress.compression.allocation import ALLOCATIONS
from recsys_compress.compression.compressor import Compressor
from recsys_compress.compression.methods import LOW_RANK_METHODS, METHODS
from recsys_compress.tasks.config import validate
from recsys_compress.evaluation.bootstrap import retention
from recsys_compress.tasks.train_seqrec import compress_on
from recsys_compress.tasks.trained_run import load_trained_base, run_overrides as overrides_of
from recsys_compress.utils.cli import parse_with_overrides
from recsys_compress.utils.instantiators import Trainers
from recsys_compress.tasks.compose import compose_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--methods", nargs="+", default=["svd", "asvd", "odllm"], choices=list(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--heldout-batches", type=int, default=4)
    parser.add_argument("--allocations", nargs="+", default=["uniform"], choices=list(ALLOCATIONS),
                        help="rank allocations of the low-rank methods (pruning always runs uniform)")
    parser.add_argument("--alignments", nargs="+", default=["none"],
                        choices=["none", "progressive", "progressive_lstsq"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE Hydra overrides for every cell (e.g. alignment.lr=1e-4)")
    args, overrides = parse_with_overrides(parser, sys.argv[1:] if argv is None else argv)

    run_overrides = overrides_of(args.run_dir)

    def cell(method: str = "none", ratio: float | None = None, allocation: str = "uniform",
             alignment: str = "none"):
        """The composed config and validated run of one cell."""
        cell_overrides = [f"compression={method}", f"alignment={alignment}"]
        if method != "none":
            cell_overrides += [f"ratio={ratio}", f"compression.calib_batches={args.calib_batches}",
                               f"compression.heldout_batches={args.heldout_batches}",
                               f"compression.allocation={allocation}"]
        cfg = compose_config([*run_overrides, *cell_overrides, *overrides], args.run_dir)
        return cfg, validate(cfg)

    cfg, run = cell()
    L.seed_everything(run.seed)
    dm = build_datamodule(run.dataset, run.seed)
    codes, _ = run_item_codes(run, dm, cfg.paths.cache_dir)  # None for item_ids=atomic
    lit = build_lit_module(run, build_model(run.model, dm, cfg.paths.cache_dir, codes), codes)
    source = load_trained_base(args.run_dir, lit, cfg.paths.cache_dir, run)
    base_model = copy.deepcopy(lit.model)

    trainers = Trainers(cfg)  # the run's trainer settings, no loggers: the table is the record

    def trainer() -> L.Trainer:
        return trainers(callbacks=[], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)

    def test() -> dict:
        return trainer().test(lit, datamodule=dm, verbose=False)[0]

    base = test()
    base_per_user = lit.test_per_user  # per-user NDCG@10: the retention intervals are paired by user
    rows, per_user_of = [], {}
    for ratio in args.ratios:
        for method, allocation in [(m, a) for m in args.methods
                                   for a in (args.allocations if m in LOW_RANK_METHODS else ["uniform"])]:
            lit.model = copy.deepcopy(base_model)
            _, compressing = cell(method, ratio, allocation)
            cb = Compressor(compressing.compression, ratio)
            compress_on(trainer(), cb, lit, dm)
            compressed_result = test()
            compressed_per_user = lit.test_per_user
            compressed_model = copy.deepcopy(lit.model)  # every alignment starts from the same factors
            summary = cb.summary()
            for alignment in (args.alignments if method in LOW_RANK_METHODS else ["none"]):  # it refines factors
                lit.model = copy.deepcopy(compressed_model)
                result, per_user = compressed_result, compressed_per_user
                row = {"method": method, "allocation": allocation, "ratio": ratio, "alignment": alignment,
                       "compressed/test/ndcg@10": result["test/ndcg@10"],
                       "compression/kept_ratio": summary["compression/kept_ratio"],
                       "compression/targeted_params_after": summary["compression/targeted_params_after"],
                       "compression/dense_layers": summary["compression/dense_layers"],
                       "compression/mean_rel_output_error": summary["compression/mean_rel_output_error"],
                       "compression/heldout_rel_output_error": summary["compression/heldout_rel_output_error"],
                       "time/compress_s": summary["time/compress_s"],
                       "time/loss_gradient_s": summary["time/loss_gradient_s"]}  # within compress_s; zero_sum only
                if alignment != "none":
                    L.seed_everything(run.seed)
                    aligning = cell(method, ratio, allocation, alignment)[1].alignment
                    row.update(align(aligning, lit, base_model, dm.train_dataloader(),
                                     trainer_factory=trainers))
                    result, per_user = test(), lit.test_per_user
                row["test/ndcg@10"] = result["test/ndcg@10"]
                row.update(retention(base["test/ndcg@10"], result["test/ndcg@10"], base_per_user, per_user, seed=run.seed))
                per_user_of[(method, allocation, ratio, alignment)] = per_user
                uniform = per_user_of.get((method, "uniform", ratio, alignment))
                if allocation != "uniform" and uniform is not None:
                    # the same users ranked by both allocations: is the difference real?
                    row.update(retention(float(uniform.mean()), float(per_user.mean()), uniform, per_user,
                                         key="vs_uniform/ndcg@10", seed=run.seed))
                rows.append(row)
                print(json.dumps(row), flush=True)

    print(f"\nbase {run.model.name} on {run.dataset.name} ({source}): test NDCG@10 {base['test/ndcg@10']:.4f}\n")
    columns = list(dict.fromkeys((r["method"], r["allocation"], r["alignment"]) for r in rows))  # in run order

    def label(method: str, allocation: str, alignment: str) -> str:
        text = method if allocation == "uniform" else f"{method} ({allocation})"
        return text if alignment == "none" else f"{text} + {alignment}"

    print("Retention of test NDCG@10 [95% paired bootstrap interval over test users]\n")
    print("| ratio | " + " | ".join(label(*c) for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for ratio in args.ratios:
        cells = []
        for method, allocation, alignment in columns:
            r = next(r for r in rows if (r["method"], r["allocation"], r["ratio"], r["alignment"])
                     == (method, allocation, ratio, alignment))
            cell = f"{r['retention/ndcg@10']:.3f} [{r['retention/ndcg@10_ci_low']:.3f}, " \
                   f"{r['retention/ndcg@10_ci_high']:.3f}]"
            cell += (f" (err {r['compression/mean_rel_output_error']:.3f}, held-out "
                     f"{r['compression/heldout_rel_output_error']:.3f})") if alignment == "none" \
                else f" ({r['time/align_s']:.0f} s)"
            cells.append(cell)
        print(f"| {ratio} | " + " | ".join(cells) + " |")
    compared = [r for r in rows if "vs_uniform/ndcg@10" in r]
    if compared:
        print("\nAllocation vs uniform, same method, ratio and alignment: NDCG@10 ratio [95% paired bootstrap "
              "interval]; targeted parameters kept (uniform's in brackets)\n")
        print("| method | allocation | alignment | ratio | vs uniform | kept params | dense layers |")
        print("|---|---|---|---|---|---|---|")
        for r in compared:
            u = next(x for x in rows if (x["method"], x["allocation"], x["ratio"], x["alignment"])
                     == (r["method"], "uniform", r["ratio"], r["alignment"]))
            print(f"| {r['method']} | {r['allocation']} | {r['alignment']} | {r['ratio']} | "
                  f"{r['vs_uniform/ndcg@10']:.3f} [{r['vs_uniform/ndcg@10_ci_low']:.3f}, "
                  f"{r['vs_uniform/ndcg@10_ci_high']:.3f}] | {r['compression/targeted_params_after']:,} "
                  f"({u['compression/targeted_params_after']:,}) | {r['compression/dense_layers']} |")
    if args.out:
        # per-user test NDCG@10 (test users in loader order, the same in every invocation on this
        # run), so cells of two invocations (e.g. compression.sequential=false vs true) can be paired
        per_user_rows = [per_user_of[(r["method"], r["allocation"], r["ratio"], r["alignment"])].tolist() for r in rows]
        args.out.write_text(json.dumps({"base": base, "base_weights": source, "rows": rows,
                                        "per_user": {"base": base_per_user.tolist(), "rows": per_user_rows}}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
