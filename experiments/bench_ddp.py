"""DDP (``trainer=ddp``, gloo on CPU) vs single-process epoch time, side by side in one run.

Every variant is a real ``train.py`` run in a subprocess with the same data, model and seed:

- ``single``: one process (``trainer=cpu``), batch B;
- ``ddp``: ``trainer=ddp`` (2 processes), batch B per process, so 2B per optimiser step and
  half the steps per epoch (how DDP is used to go faster);
- ``ddp_same_global_batch``: ``trainer=ddp`` with B/2 per process, the same optimisation as
  ``single``.

``--rounds`` alternate through the variants so machine noise hits each alike. Reported
(medians over rounds): time in training steps per epoch (``time/train_step_s`` / epochs, the
figure DDP changes), wall time of ``fit`` per epoch (process start-up and validation included)
and the test NDCG@10 (DDP must not change quality beyond noise).

    python experiments/bench_ddp.py --rounds 3 dataset=ml_100k trainer.max_epochs=2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from recsys_compress.utils.cli import parse_with_overrides
from recsys_compress.utils.overrides import path_override

REPO = Path(__file__).resolve().parents[1]


def run_variant(variant: str, batch: int, overrides: list[str], folder: Path) -> dict:
    trainer = "cpu" if variant == "single" else "ddp"
    per_process = batch // 2 if variant == "ddp_same_global_batch" else batch
    cmd = [sys.executable, str(REPO / "train.py"), f"trainer={trainer}", f"dataset.batch_size={per_process}",
           "logger=none", "compression=none", path_override("hydra.run.dir", folder), *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    m = json.loads((folder / "metrics.json").read_text())
    epochs = m["train/epochs"]
    return {"step_s_per_epoch": m["time/train_step_s"] / epochs, "fit_s_per_epoch": m["time/train_s"] / epochs,
            "ndcg@10": m["test/ndcg@10"], "epochs": epochs, "per_process_batch": per_process}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128, help="per-process batch of single and ddp")
    parser.add_argument("--variants", nargs="+", default=["single", "ddp", "ddp_same_global_batch"])
    parser.add_argument("--out", type=Path, default=None)
    args, overrides = parse_with_overrides(parser, sys.argv[1:] if argv is None else argv)

    samples: dict[str, list[dict]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for variant in args.variants:
                r = run_variant(variant, args.batch, overrides, Path(tmp) / f"{variant}_{round_}")
                samples[variant].append(r)
                print(f"round {round_ + 1}/{args.rounds} {variant}: {r['step_s_per_epoch']:.1f} s of steps per "
                      f"epoch, fit {r['fit_s_per_epoch']:.1f} s per epoch, NDCG@10 {r['ndcg@10']:.4f}", flush=True)
    rows = []
    base = statistics.median(r["step_s_per_epoch"] for r in samples[args.variants[0]])
    for variant, runs in samples.items():
        step = statistics.median(r["step_s_per_epoch"] for r in runs)
        rows.append({"variant": variant, "per_process_batch": runs[0]["per_process_batch"],
                     "step_s_per_epoch": step, "x_first": step / base,
                     "fit_s_per_epoch": statistics.median(r["fit_s_per_epoch"] for r in runs),
                     "ndcg@10": statistics.median(r["ndcg@10"] for r in runs), "rounds": len(runs)})
    print(f"\nmedians over {args.rounds} rounds; overrides: {' '.join(overrides)}\n")
    print(f"| variant | batch per process | steps s / epoch | x {args.variants[0]} | fit s / epoch | test NDCG@10 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['per_process_batch']} | {r['step_s_per_epoch']:.1f} | {r['x_first']:.2f} | "
              f"{r['fit_s_per_epoch']:.1f} | {r['ndcg@10']:.4f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"overrides": overrides, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
