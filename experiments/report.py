"""Tables and plots from the metrics.json files of one or more (multi)runs.

    python experiments/report.py outputs/mra_probe/multiruns/2026-11-24_19-00-00 --out reports/mra_ml1m
    python experiments/report.py RUN_DIR [RUN_DIR ...] --out DIR

Every folder given is searched recursively for ``metrics.json``. What is drawn depends on
what the runs are:

- MRA probe runs (``probe/layer`` = an index, or ``all`` with per-layer results): the MRA
  curve, test AUC against layer per (encoder, compressor, dim), marking the final layer and
  the layer that is best on validation, written to ``mra_curve.png``;
- ID-only probe runs (``probe/layer`` = -1) and MARC runs (``marc/dim``): drawn as horizontal
  reference lines on the curve and listed in the comparison table;
- compression runs (``retention/ndcg@10``): the OD-LLM table, retention by method, alignment
  and ratio with each aligned cell's alignment time, ``retention.png``, and what the runs cost
  (base models trained vs reused from the cache, compression and alignment seconds);
- multiruns (``summary.jsonl`` of the sweep callback): the jobs that failed and why.

``report.md`` holds the markdown tables; ``report.json`` the rows behind them.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402


def load_runs(folders: list[Path]) -> list[dict[str, Any]]:
    """One dict per run: its metrics plus the config values the report groups by."""
    runs = []
    for folder in folders:
        if not folder.exists():
            raise FileNotFoundError(f"{folder} does not exist")
        paths = sorted(folder.rglob("metrics.json"))
        if not paths:
            raise FileNotFoundError(f"no metrics.json under {folder}")
        for path in paths:
            metrics = json.loads(path.read_text())
            cfg_path = path.parent / ".hydra" / "config.yaml"
            cfg = OmegaConf.to_container(OmegaConf.load(cfg_path)) if cfg_path.is_file() else {}
            metrics["_run"] = str(path.parent)
            # Runs record what they are in metrics.json; older runs only in their Hydra config.
            metrics["_encoder"] = metrics.get("repr/encoder", cfg.get("representation", {}).get("model", "?"))
            metrics["_dataset"] = metrics.get("data/name", cfg.get("dataset", {}).get("name", "?"))
            metrics["_alignment"] = metrics.get("alignment/method", cfg.get("alignment", {}).get("method", "none"))
            metrics["_method"] = metrics.get("compression/method", cfg.get("compression", {}).get("method", "none"))
            metrics["_ratio"] = metrics.get("compression/ratio", cfg.get("ratio"))
            runs.append(metrics)
    return runs


def probe_points(runs: list[dict[str, Any]]) -> dict[tuple, list[tuple[int, float, float]]]:
    """(encoder, compressor, dim) -> [(layer, val auc, test auc)] from single- and all-layer runs."""
    curves: dict[tuple, dict[int, tuple[float, float]]] = defaultdict(dict)
    for r in runs:
        layer = r.get("probe/layer")
        if layer is None or layer == -1 or "marc/dim" in r:
            continue
        key = (r["_encoder"], r.get("probe/compressor", "linear"), r.get("probe/dim"))
        if layer == "all":
            for name, value in r.items():
                if name.startswith("layers/") and name.endswith("/test/auc"):
                    l = int(name.split("/")[1])
                    curves[key][l] = (r[f"layers/{l}/val/best_auc"], value)
        else:
            curves[key][int(layer)] = (r.get("val/best_auc", float("nan")), r["test/auc"])
    return {k: sorted((l, v, t) for l, (v, t) in pts.items()) for k, pts in curves.items()}


def references(runs: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(label, test auc, test logloss) of ID-only and MARC runs."""
    refs = []
    for r in runs:
        if r.get("probe/layer") == -1:
            refs.append(("ID-only CTR model", r["test/auc"], r["test/logloss"]))
        elif "marc/dim" in r:
            refs.append((f"MARC ({r['_encoder']}, final layer, dim {r['marc/dim']})", r["test/auc"], r["test/logloss"]))
    return refs


def draw_mra(curves, refs, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (encoder, compressor, dim), pts in curves.items():
        layers = [p[0] for p in pts]
        test = [p[2] for p in pts]
        line, = ax.plot(layers, test, marker="o", label=f"{encoder} {compressor} dim {dim}")
        best = max(pts, key=lambda p: p[1])
        ax.scatter([best[0]], [best[2]], s=160, facecolors="none", edgecolors=line.get_color(), linewidths=2,
                   label=f"best on validation: layer {best[0]}")
        ax.scatter([pts[-1][0]], [pts[-1][2]], marker="s", s=70, color=line.get_color(),
                   label=f"final layer {pts[-1][0]}")
    for i, (label, auc, _) in enumerate(refs):
        ax.axhline(auc, linestyle="--", color=f"C{(i + 5) % 10}", label=f"{label}: {auc:.4f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("LLM layer (0 = token embeddings)")
    ax.set_ylabel("test AUC")
    ax.set_title("Mid-layer representation advantage (MRA curve)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out / "mra_curve.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def mra_tables(curves, refs) -> list[str]:
    lines = []
    for (encoder, compressor, dim), pts in curves.items():
        best = max(pts, key=lambda p: p[1])
        final = pts[-1]
        lines += [f"### MRA curve: {encoder}, {compressor} compression to {dim} dims", "",
                  "| layer | val AUC | test AUC |", "|---|---|---|"]
        for layer, val, test in pts:
            mark = " (best on val)" if layer == best[0] else " (final)" if layer == final[0] else ""
            lines.append(f"| {layer}{mark} | {val:.4f} | {test:.4f} |")
        lines += ["", f"Best layer {best[0]} vs final layer {final[0]}: test AUC {best[2]:.4f} vs {final[2]:.4f} "
                      f"({best[2] - final[2]:+.4f}).", ""]
    if refs:
        lines += ["| reference | test AUC | test LogLoss |", "|---|---|---|"]
        lines += [f"| {label} | {auc:.4f} | {ll:.4f} |" for label, auc, ll in refs]
        lines.append("")
    return lines


def retention_rows(runs):
    return [r for r in runs if "retention/ndcg@10" in r]


def retention_table(rows, out: Path) -> list[str]:
    ratios = sorted({r["_ratio"] for r in rows})
    columns = sorted({(r["_method"], r["_alignment"]) for r in rows})
    cell = {(r["_method"], r["_alignment"], r["_ratio"]): r["retention/ndcg@10"] for r in rows}
    align_s = {(r["_method"], r["_alignment"], r["_ratio"]): r["time/align_s"] for r in rows if "time/align_s" in r}
    lines = ["### Retention of test NDCG@10 (alignment time in brackets)", "",
             "| ratio | " + " | ".join(m if a == "none" else f"{m} + {a}" for m, a in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for ratio in ratios:
        vals = []
        for m, a in columns:
            key = (m, a, ratio)
            text = f"{cell[key]:.3f}" if key in cell else ""
            vals.append(f"{text} ({align_s[key]:.0f} s)" if key in align_s else text)
        lines.append(f"| {ratio} | " + " | ".join(vals) + " |")
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, a in columns:
        xs = [x for x in ratios if (m, a, x) in cell]
        ax.plot(xs, [cell[(m, a, x)] for x in xs], marker="o", label=m if a == "none" else f"{m} + {a}")
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xlabel("ratio (fraction of targeted parameters kept)")
    ax.set_ylabel("retention of test NDCG@10")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "retention.png", dpi=130)
    plt.close(fig)
    return lines + [""]


def cost_table(rows) -> list[str]:
    """What the compression runs cost: the base-model cache turns N trainings into one."""
    trained = [r for r in rows if r.get("base/cache_hit") == 0]
    train_s = sum(r.get("time/train_s", 0.0) for r in trained)
    lines = ["### Cost of the runs", "",
             f"{len(rows)} compression runs; base model trained in {len(trained)} "
             f"({train_s:.0f} s of training), reused from the base-model cache in {len(rows) - len(trained)}.", "",
             "| method | alignment | ratio | base | compress s | align s |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["_method"], r["_alignment"], r["_ratio"])):
        base = "cached" if r.get("base/cache_hit") == 1 else f"trained {r.get('time/train_s', float('nan')):.0f} s"
        align = f"{r['time/align_s']:.1f}" if "time/align_s" in r else "-"
        lines.append(f"| {r['_method']} | {r['_alignment']} | {r['_ratio']} | {base} | "
                     f"{r.get('time/compress_s', float('nan')):.1f} | {align} |")
    return lines + [""]


def failed_jobs(folders: list[Path]) -> list[str]:
    """Failed jobs recorded by the sweep callback (utils/sweep_summary.py) in summary.jsonl."""
    failed = []
    for folder in folders:
        for path in sorted(folder.rglob("summary.jsonl")):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record.get("status") == "failed":
                    # the first line of the error names the exception; a job killed without one has none
                    error = (record.get("error") or "").strip().splitlines() or ["(no error recorded)"]
                    failed.append(f"| {' '.join(record.get('overrides', []))} | {error[0]} |")
    if not failed:
        return []
    return ["### Failed jobs", "", "| overrides | error |", "|---|---|", *failed, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run or multirun folders")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Report over {len(runs)} runs", ""]
    curves, refs = probe_points(runs), references(runs)
    if curves:
        draw_mra(curves, refs, args.out)
        lines += mra_tables(curves, refs) + ["![MRA curve](mra_curve.png)", ""]
    elif refs:
        lines += mra_tables({}, refs)
    rows = retention_rows(runs)
    if rows:
        lines += retention_table(rows, args.out) + ["![retention](retention.png)", ""] + cost_table(rows)
    lines += failed_jobs(args.runs)
    if len(lines) == 2:
        raise SystemExit("none of the runs has probe, MARC or compression metrics to report")
    (args.out / "report.md").write_text("\n".join(lines))
    (args.out / "report.json").write_text(json.dumps(runs, indent=2, default=str) + "\n")
    print("\n".join(lines))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
