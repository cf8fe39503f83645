"""Validation NDCG@10 against wall time, one line per training run, from the runs' CSV logs.

    recsys-training-curves RUN_DIR [RUN_DIR ...] --out reports/curves.png
    recsys-training-curves outputs/a outputs/b --labels "full" "lora" --out curves.png
    recsys-training-curves outputs/c --points curves.csv --out curves2.png   # + earlier curves

Each run folder must hold the CSV logger's ``metrics.csv`` (``logger=csv`` or the default
``logger=default``), whose validation rows carry ``time/elapsed_s`` (logged by the training
throughput callback). The points drawn are also written next to the figure as a CSV, which
``--points`` reads back: curves of earlier runs whose folders are gone are drawn again beside new ones.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def validation_points(run: Path, metric: str = "val/ndcg@10") -> list[tuple[int, float, float]]:
    """(epoch, elapsed seconds, metric) of every validation of ``run``, from its CSV logs."""
    logs = sorted(run.rglob("metrics.csv"))
    if not logs:
        raise FileNotFoundError(f"no metrics.csv under {run}: train with logger=csv or logger=default")
    points = []
    for path in logs:
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(metric) and row.get("time/elapsed_s"):
                    points.append((int(row["epoch"]), float(row["time/elapsed_s"]), float(row[metric])))
    if not points:
        raise ValueError(f"{run}: no validation row has both {metric} and time/elapsed_s")
    return sorted(points, key=lambda p: p[1])


def saved_points(path: Path, metric: str) -> dict[str, list[tuple[int, float, float]]]:
    """label -> [(epoch, elapsed seconds, metric)] from a CSV this script wrote, in file order."""
    curves: dict[str, list[tuple[int, float, float]]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if metric not in row:
                raise ValueError(f"{path} holds no {metric} column (it has {sorted(row)})")
            curves.setdefault(row["run"], []).append((int(row["epoch"]), float(row["elapsed_s"]), float(row[metric])))
    return curves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--points", nargs="+", type=Path, default=[],
                        help="CSVs this script wrote: their curves are drawn first, as saved")
    parser.add_argument("--labels", nargs="+", help="one per run (default: the folder names)")
    parser.add_argument("--metric", default="val/ndcg@10")
    parser.add_argument("--out", type=Path, required=True, help="figure path (.png); the CSV goes beside it")
    args = parser.parse_args(argv)
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(labels)} labels for {len(args.runs)} runs")
    if not args.runs and not args.points:
        parser.error("give run folders, --points CSVs, or both")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = []
    curves = [curve for path in args.points for curve in saved_points(path, args.metric).items()]
    curves += [(label, validation_points(run, args.metric)) for run, label in zip(args.runs, labels)]
    for label, points in curves:
        ax.plot([p[1] / 60 for p in points], [p[2] for p in points], marker="o", label=label)
        rows += [(label, *p) for p in points]
        print(f"{label}: " + ", ".join(f"epoch {e} {t / 60:.0f} min {v:.4f}" for e, t, v in points))
    ax.set_xlabel("training wall time (min)")
    ax.set_ylabel(args.metric)
    ax.grid(alpha=0.3)
    # below the axes: recipe labels are long, and inside they cover the curves
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    fig.savefig(args.out, dpi=130, bbox_inches="tight")
    plt.close(fig)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "epoch", "elapsed_s", args.metric])
        writer.writerows(rows)
    print(f"written to {args.out} and {args.out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
