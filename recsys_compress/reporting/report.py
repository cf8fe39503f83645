"""Tables and plots from the metrics.json files of one or more (multi)runs.

    recsys-report outputs/mra_probe/multiruns/2026-11-24_19-00-00 --out reports/mra_ml1m
    recsys-report RUN_DIR [RUN_DIR ...] --out DIR

Every folder given is searched recursively for ``metrics.json``. What is drawn depends on
what the runs are:

- MRA probe runs (``probe/layer`` = an index, or ``all`` with per-layer results): the MRA
  curve, test AUC against layer per (encoder, compressor, dim, split and item-id dropout),
  marking the final layer and the layer that is best on validation, written to
  ``mra_curve.png``;
- ID-only probe runs (``probe/layer`` = -1), MARC runs (``marc/dim``), proxy runs (``task=proxy``:
  a fresh CTR model on the proxy's deployed code, named by the encoder it wrote) and fresh CTR models
  on a MARC or probe run's codes (``codes/dim``, from ``recsys-evaluate-codes``): drawn as horizontal
  reference lines on the curve and listed in the comparison table (MARC's end-to-end model
  is listed, not drawn);
- runs of one configuration with different seeds (``python train.py -m ... seed=0,1,2``) are
  pooled: tables give mean ± std (n seeds), the curve error bars, reference lines a band,
  and paired tables give every layer's and reference's test AUC minus the final-layer
  probe's, and each reference's minus the best-on-validation layer's (picked per seed), over
  the seeds both ran (same seed = same split), which cancels split-to-split variation, with
  the p-value of an exact sign-flip (paired randomisation) test; a reference is paired only
  with curves on its test sets (same split) and of its encoder (ID-only: any encoder); a
  proxy-trained encoder's final layer is paired with its pretrained model's final layer where
  the report holds both curves (did the proxy move the final layer, and which way);
- compression runs (``retention/ndcg@10``): the OD-LLM table, retention by method (with its rank
  allocation when not uniform), alignment and ratio with each aligned cell's alignment time,
  ``retention.png``. Only comparable runs share a cell: runs whose configs differ in anything
  but those axes, the seed and where outputs go (another base model, dataset, quantisation,
  export, calibration...) get a table (and a panel) of their own, named by what differs; seeds
  of one configuration are pooled (mean ± std); a rerun with the same seed is left out for the
  newest. The report lists the runs behind each cell and the runs left out, and what the runs
  cost (base models trained vs reused from the cache, compression and alignment seconds); when runs differ in ``compression.allocation``, the rank
  each matrix kept per decoder block and matrix type, uniform vs global, in ``ranks.png``
  (source table ``ranks.csv``);
- multiruns (``summary.jsonl`` of the sweep callback): the jobs that failed and why.

``report.md`` holds the markdown tables; ``report.json`` the rows behind them.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
import torch  # noqa: E402

from recsys_compress.representations.proxy import encoder_label  # noqa: E402


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
            cfg = run_config(path.parent)
            metrics["_run"] = str(path.parent)
            metrics["_mtime"] = path.stat().st_mtime
            metrics["_setting"] = setting_of(cfg, metrics)
            # Runs record what they are in metrics.json; older runs only in their Hydra config.
            metrics["_encoder"] = metrics.get("repr/encoder", cfg.get("representation", {}).get("model", "?"))
            # the pretrained model a proxy-trained encoder started from (itself for a pretrained one)
            metrics["_base_encoder"] = cfg.get("representation", {}).get("model", metrics["_encoder"])
            metrics["_dataset"] = metrics.get("data/name", cfg.get("dataset", {}).get("name", "?"))
            metrics["_alignment"] = metrics.get("alignment/method", cfg.get("alignment", {}).get("method", "none"))
            metrics["_method"] = metrics.get("compression/method", cfg.get("compression", {}).get("method", "none"))
            metrics["_ratio"] = metrics.get("compression/ratio", cfg.get("ratio"))
            metrics["_allocation"] = metrics.get("compression/allocation",
                                                 cfg.get("compression", {}).get("allocation", "uniform"))
            ctr = cfg.get("ctr", {})
            metrics["_seed"] = metrics.get("seed", cfg.get("seed"))
            metrics["_split_by"] = metrics.get("ctr/split_by", ctr.get("split_by", "time"))
            metrics["_item_id_dropout"] = metrics.get("ctr/item_id_dropout", ctr.get("item_id_dropout", 0.0))
            metrics["_batch_by"] = metrics.get("ctr/batch_by", ctr.get("batch_by", "sample"))
            runs.append(metrics)
    return runs


def run_config(folder: Path) -> dict[str, Any]:
    """The config a run started with: the runner's ``run_config.yaml`` (kept on resume), else
    Hydra's ``.hydra/config.yaml``; empty for a run that recorded neither."""
    for path in (folder / "run_config.yaml", folder / ".hydra" / "config.yaml"):
        if path.is_file():
            cfg = OmegaConf.to_container(OmegaConf.load(path))
            assert isinstance(cfg, dict)
            return cfg
    return {}


# Config keys that say where and how a run was kept, not what it measured: runs that differ only
# here are the same experiment (resuming and the base-model cache give the same result by design).
NOT_A_SETTING = ("paths", "hydra", "logger", "task_name", "resume", "base_cache", "export.save",
                 "trainer.default_root_dir", "callbacks.progress_bar", "callbacks.lr_monitor",
                 "callbacks.last_checkpoint", "callbacks.model_checkpoint.dirpath")
# The retention table's own axes, and what is pooled across runs of one cell.
RETENTION_AXES = ("compression.method", "compression.allocation", "alignment.method", "ratio")
POOLED = ("seed",)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(node) if isinstance(node, list) else node}


def setting_of(cfg: dict[str, Any], metrics: dict[str, Any]) -> frozenset:
    """What makes two runs comparable: every config value except the retention table's axes,
    the pooled seed and what only says where outputs go. A run without a recorded config is
    known only by what its metrics name (dataset, base model, quantisation), which cannot pool
    seeds (the base-model key holds the seed)."""
    if not cfg:
        return frozenset({("(no config recorded) dataset", metrics.get("data/name", "?")),
                          ("base model", metrics.get("base/cache_key", "?")),
                          ("deployed artefact", "deploy/test/ndcg@10" in metrics)})
    skip = NOT_A_SETTING + RETENTION_AXES + POOLED
    return frozenset((k, v) for k, v in _flatten(cfg).items()
                     if not any(k == s or k.startswith(s + ".") for s in skip))


@functools.cache
def _default_config() -> dict[str, Any]:
    """``python train.py``'s own config, flattened: what a setting's values are named against."""
    from recsys_compress.tasks.compose import compose_config

    return _flatten(OmegaConf.to_container(compose_config()))


def setting_labels(settings: list[frozenset]) -> dict[frozenset, str]:
    """Each setting named by its dataset and model and, of the keys in which the settings differ,
    the values that are not ``python train.py``'s defaults (what a reader must know to tell two
    tables apart)."""
    values = [dict(s) for s in settings]
    keys = set().union(*values) if values else set()
    varying = sorted(k for k in keys if len({json.dumps(v.get(k), default=str) for v in values}) > 1)
    defaults = _default_config() if varying else {}
    labels = {}
    for setting, v in zip(settings, values):
        named = [f"{v[k]}" for k in ("dataset.name", "model.name") if k in v]
        named += [f"{k}={v.get(k, '(not set)')}" for k in varying
                  if k not in ("dataset.name", "model.name") and (k not in v or k not in defaults or v[k] != defaults[k])]
        labels[setting] = ", ".join(named) or "runs without a recorded config"
    return labels


def _variant(r: dict[str, Any]) -> str:
    """What sets a CTR run apart beyond encoder/compressor/dim: the split, item-id dropout, batching."""
    parts = []
    if r["_split_by"] == "item":
        parts.append("cold items")
    if r["_item_id_dropout"]:
        parts.append(f"item-id dropout {r['_item_id_dropout']:g}")
    if r["_batch_by"] == "item":
        parts.append("item-grouped batches")
    return f" [{', '.join(parts)}]" if parts else ""


@dataclass
class Summary:
    """A metric over the runs of one configuration (one per seed): ``values[i]`` ran with ``seeds[i]``."""

    values: list[float]
    seeds: list[Any]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def __str__(self) -> str:
        if len(self.values) == 1:
            return f"{self.values[0]:.4f}"
        return f"{self.mean:.4f} ± {self.std:.4f} (n={len(self.values)})"

    @property
    def by_seed(self) -> dict[Any, float]:
        return dict(zip(self.seeds, self.values))

    def minus(self, other: "Summary") -> list[float]:
        """Paired differences over the seeds both ran (same seed: same split and initialisation)."""
        mine, theirs = self.by_seed, other.by_seed
        return [mine[s] - theirs[s] for s in mine if s in theirs and s is not None]


class Curve(NamedTuple):
    """What one MRA curve is of; ``split_by`` decides which runs share its test sets (by seed);
    ``base`` is the pretrained model the encoder started from (the encoder itself if no proxy
    trained it)."""

    encoder: str
    compressor: str
    dim: Any
    variant: str
    split_by: str
    base: str
    dataset: str = "?"

    @property
    def label(self) -> str:
        return f"{self.encoder} {self.compressor} dim {self.dim}{self.variant}"


class Reference(NamedTuple):
    """A run kind drawn as a line beside the curves: ``encoder`` None where it reads no LLM (ID-only)."""

    label: str
    auc: Summary
    logloss: Summary
    drawn: bool
    encoder: str | None
    split_by: str
    dataset: str = "?"

    def pairs_with(self, curve: Curve) -> bool:
        """Only a reference on the curve's test sets (same dataset and split) and of its encoder
        (or of none) is paired with it: MARC on one proxy's encoder says nothing against another's
        layers, nor a run on ML-1M against a curve on ML-100K."""
        return (self.split_by, self.dataset) == (curve.split_by, curve.dataset) and self.encoder in (None, curve.encoder)


def _dataset_tagger(runs: list[dict[str, Any]]) -> Callable[[dict[str, Any]], str]:
    """A run's `` [DATASET]`` where the report holds runs of several datasets (their curves and
    references are apart, never pooled as seeds), else nothing."""
    several = len({x.get("_dataset", "?") for x in runs}) > 1
    return lambda r: f" [{r.get('_dataset', '?')}]" if several else ""


def _collect() -> tuple[list[float], list[Any]]:
    return [], []


def probe_points(runs: list[dict[str, Any]]) -> dict[Curve, list[tuple[int, Summary, Summary]]]:
    """Curve -> [(layer, val auc, test auc)], each a Summary over the seeds, from single- and
    all-layer runs."""
    val: dict[tuple, dict[int, tuple[list, list]]] = defaultdict(lambda: defaultdict(_collect))
    test: dict[tuple, dict[int, tuple[list, list]]] = defaultdict(lambda: defaultdict(_collect))

    def add(key: tuple, layer: int, v: float, t: float, seed: Any) -> None:
        for store, value in ((val, v), (test, t)):
            store[key][layer][0].append(value)
            store[key][layer][1].append(seed)

    dataset_tag = _dataset_tagger(runs)
    for r in runs:
        layer = r.get("probe/layer")
        if layer is None or layer == -1 or "marc/dim" in r:
            continue
        key = Curve(r["_encoder"], r.get("probe/compressor", "linear"), r.get("probe/dim"),
                    _variant(r) + dataset_tag(r), r["_split_by"], r.get("_base_encoder", r["_encoder"]),
                    r.get("_dataset", "?"))
        if layer == "all":
            for name, value in r.items():
                if name.startswith("layers/") and name.endswith("/test/auc"):
                    l = int(name.split("/")[1])
                    add(key, l, r[f"layers/{l}/val/best_auc"], value, r["_seed"])
        else:
            add(key, int(layer), r.get("val/best_auc", float("nan")), r["test/auc"], r["_seed"])
    return {k: sorted(((l, Summary(*val[k][l]), Summary(*test[k][l])) for l in pts), key=lambda p: p[0])
            for k, pts in test.items()}


def references(runs: list[dict[str, Any]]) -> list[Reference]:
    """The ID-only, MARC and proxy runs (the proxy's deployed code), each kind over its seeds.

    MARC's end-to-end model (its own task module) is listed next to the deployed one (a fresh
    CTR model on the exported codes) but not drawn."""
    groups: dict[tuple, list[tuple[float, float, Any]]] = defaultdict(list)
    dataset_tag = _dataset_tagger(runs)
    for r in runs:
        # the encoder whose curve a run pairs with: a proxy run records the model it started from,
        # and names the encoder it wrote as its probes do; an ID-only model reads none
        encoder = (None if r.get("probe/layer") == -1 else
                   encoder_label(r["_encoder"], r["_run"]) if "proxy/objective" in r else r["_encoder"])
        if r.get("probe/layer") == -1:
            entries = [(f"ID-only CTR model{_variant(r)}", r["test/auc"], r["test/logloss"], True)]
        elif "marc/dim" in r:
            what = f"{r['_encoder']}, final layer, dim {r['marc/dim']}, beta {r.get('marc/beta', float('nan')):g}"
            if r.get("marc/constraint", "none") != "none":
                what += f", {r['marc/constraint']}"
            if r.get("marc/finetune", "full") != "full":
                what += f", {r['marc/finetune']}"
            if r.get("marc/export_dims", r["marc/dim"]) != r["marc/dim"]:
                what += f", its {r['marc/export_dims']} most informative dims deployed"
            if r.get("marc/deploy_noise"):
                what += ", deployed model trained on posterior samples"
            entries = [(f"MARC ({what}){_variant(r)}", r["test/auc"], r["test/logloss"], True)]
            if "marc/e2e_test/auc" in r:
                entries.append((f"MARC end-to-end model ({what}){_variant(r)}", r["marc/e2e_test/auc"],
                                r["marc/e2e_test/logloss"], False))
        elif "proxy/objective" in r:  # task=proxy: a fresh CTR model on the proxy's deployed code
            entries = [(f"{encoder}: its deployed code, dim {r['proxy/dim']}{_variant(r)}", r["test/auc"],
                        r["test/logloss"], True)]
        elif "codes/dim" in r:  # recsys-evaluate-codes: a fresh CTR model on a MARC run's codes
            what = f"{r['_encoder']}, {r.get('codes/source', 'MARC')}, dim {r['codes/dim']}"
            # "+KEY=VALUE" (a key the run predates) and "KEY=VALUE" are the same setting: one row
            setting = " ".join(o.lstrip("+") for o in r.get("overrides", "").split())
            entries = [(f"codes ({what}), fresh CTR model with {setting or 'the run settings'}"
                        f"{_variant(r)}", r["test/auc"], r["test/logloss"], True)]
        else:
            continue
        for label, auc, logloss, drawn in entries:
            groups[(label + dataset_tag(r), drawn, encoder, r["_split_by"], r.get("_dataset", "?"))].append(
                (auc, logloss, r["_seed"]))
    return [Reference(label, Summary([a for a, _, _ in rows], [s for _, _, s in rows]),
                      Summary([ll for _, ll, _ in rows], [s for _, _, s in rows]), drawn, encoder, split_by, dataset)
            for (label, drawn, encoder, split_by, dataset), rows in groups.items()]


def write_source_table(path: Path, columns: list[str], rows: list[tuple]) -> Path:
    """The points a figure draws, beside it: read them, or check the figure against the runs."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([repr(v) if isinstance(v, float) else v for v in row] for row in rows)
    return path


def draw_mra(curves, refs, out: Path) -> Path:
    rows = [(curve.label, p[0], p[2].mean, p[2].std, len(p[2].values)) for curve, pts in curves.items() for p in pts]
    rows += [(ref.label, "", ref.auc.mean, ref.auc.std, len(ref.auc.values)) for ref in refs if ref.drawn]
    write_source_table(out / "mra_curve.csv", ["curve", "layer", "test/auc", "std", "seeds"], rows)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for curve, pts in curves.items():
        layers = [p[0] for p in pts]
        test = [p[2].mean for p in pts]
        seeds = max(len(p[2].values) for p in pts)
        line = ax.errorbar(layers, test, yerr=[p[2].std for p in pts] if seeds > 1 else None, marker="o",
                           capsize=3, label=curve.label
                           + (f" (mean ± std, {seeds} seeds)" if seeds > 1 else ""))[0]
        best = max(pts, key=lambda p: p[1].mean)
        ax.scatter([best[0]], [best[2].mean], s=160, facecolors="none", edgecolors=line.get_color(), linewidths=2,
                   label=f"best on validation: layer {best[0]}")
        ax.scatter([pts[-1][0]], [pts[-1][2].mean], marker="s", s=70, color=line.get_color(),
                   label=f"final layer {pts[-1][0]}")
    for i, (label, auc, *_) in enumerate(r for r in refs if r.drawn):
        color = f"C{(i + 5) % 10}"
        ax.axhline(auc.mean, linestyle="--", color=color, label=f"{label}: {auc.mean:.4f}")
        if auc.std:
            ax.axhspan(auc.mean - auc.std, auc.mean + auc.std, color=color, alpha=0.12)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("LLM layer (0 = token embeddings)")
    ax.set_ylabel("test AUC")
    ax.set_title("Mid-layer representation advantage (MRA curve)")
    ax.grid(alpha=0.3)
    # Below the axes: with seeds, dropout variants and MARC references it outgrows any corner.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1, frameon=False)
    path = out / "mra_curve.png"
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def mra_tables(curves, refs) -> list[str]:
    """Markdown tables; a configuration run with several seeds shows mean ± std (n seeds)."""
    lines = []
    for curve, pts in curves.items():
        best = max(pts, key=lambda p: p[1].mean)
        final = pts[-1]
        lines += [f"### MRA curve: {curve.encoder}, {curve.compressor} compression to {curve.dim} dims{curve.variant}",
                  "",
                  "| layer | val AUC | test AUC |", "|---|---|---|"]
        for layer, val, test in pts:
            mark = " (best on val)" if layer == best[0] else " (final)" if layer == final[0] else ""
            lines.append(f"| {layer}{mark} | {val} | {test} |")
        lines += ["", f"Best layer {best[0]} vs final layer {final[0]}: test AUC {best[2].mean:.4f} vs "
                      f"{final[2].mean:.4f} ({best[2].mean - final[2].mean:+.4f}).", ""]
    if refs:
        lines += ["| reference | test AUC | test LogLoss |", "|---|---|---|"]
        lines += [f"| {ref.label} | {ref.auc} | {ref.logloss} |" for ref in refs]
        lines.append("")
    for curve, pts in curves.items():
        lines += paired_table(curve, pts, [ref for ref in refs if ref.pairs_with(curve)])
        lines += final_layer_shift(curve, pts, curves)
    return lines


def sign_flip_p(diffs: list[float], exact_up_to: int = 16) -> float:
    """Two-sided p-value of a paired randomisation test: under "no difference" each paired
    difference is as likely to have the other sign, so p is the share of the 2^n sign patterns
    whose mean is at least as far from 0 as the observed one. Exact up to ``exact_up_to``
    pairs (then 2^16 random patterns, fixed generator); no normality assumed, which suits a
    handful of seeds."""
    d = torch.tensor(diffs, dtype=torch.float64)
    n = len(diffs)
    exact = n <= exact_up_to
    if exact:
        bits = (torch.arange(2**n)[:, None] >> torch.arange(n)) & 1
    else:
        bits = torch.randint(0, 2, (2**exact_up_to, n), generator=torch.Generator().manual_seed(0))
    means = ((1 - 2 * bits).to(d) * d).mean(1).abs()
    extreme = int((means >= d.mean().abs() - 1e-12).sum())
    # sampled: count the observed pattern too, so p is never 0
    return extreme / len(bits) if exact else (extreme + 1) / (len(bits) + 1)


def best_on_validation(pts) -> tuple[Summary, list[Any]]:
    """Per seed, the test AUC of the layer with the highest validation AUC on that seed (what a
    user who picks the layer on validation data deploys), and the layers picked."""
    values, seeds, layers = [], [], []
    for seed in pts[-1][2].seeds:
        scored = [(val.by_seed[seed], layer, test.by_seed[seed])
                  for layer, val, test in pts if seed in test.seeds and seed in val.seeds]
        _, layer, test_auc = max(scored, key=lambda s: (s[0], -s[1]))  # a tie goes to the lower layer
        values.append(test_auc), seeds.append(seed), layers.append(layer)
    return Summary(values, seeds), layers


def _paired_head(what: str) -> list[str]:
    """The header of a paired table whose rows are minus ``what``."""
    return [f"| features | test AUC minus the {what} (mean ± std over shared seeds) | seeds where higher "
            "| p (sign-flip test) |", "|---|---|---|---|"]


def _paired_rows(rows: list[tuple[str, Summary]], against: Summary) -> list[str]:
    lines = []
    for label, summary in rows:
        diff = summary.minus(against)
        if len(diff) >= 2:
            wins = sum(d > 0 for d in diff)
            lines.append(f"| {label} | {statistics.fmean(diff):+.4f} ± {statistics.stdev(diff):.4f} | "
                         f"{wins} of {len(diff)} | {sign_flip_p(diff):.2f} |")
    return lines


def paired_table(curve: Curve, pts, refs: list[Reference]) -> list[str]:
    """Test AUC minus the final-layer probe's, and minus the best-on-validation layer's (picked
    per seed), paired by seed (same split, same initialisation): seed-to-seed variation of the
    split cancels, so this separates smaller gaps than the pooled mean ± std. Only where at
    least two seeds are shared. ``refs`` are the references that share the curve's test sets."""
    final_layer, _, final = pts[-1]
    best, picked = best_on_validation(pts)
    best_row = [(f"best layer on validation, per seed ({', '.join(map(str, picked))})", best)] if len(pts) > 1 else []
    lines = _paired_rows([(f"layer {layer}", test) for layer, _, test in pts[:-1]] + best_row
                         + [(ref.label, ref.auc) for ref in refs], final)
    if not lines:
        return []
    out = [f"### Paired with the final-layer probe ({curve.label}, layer {final_layer})", "",
           *_paired_head("final layer's"), *lines, ""]
    lines = _paired_rows([(ref.label, ref.auc) for ref in refs], best)
    if lines and len(pts) > 1:
        out += [f"### Paired with the best layer on validation ({curve.label}; layers per seed "
                f"{', '.join(f'{s}: {l}' for s, l in zip(best.seeds, picked))})", "",
                *_paired_head("best-on-validation layer's"), *lines, ""]
    return out


def retention_rows(runs):
    return [r for r in runs if "retention/ndcg@10" in r]


def _method_label(r: dict[str, Any]) -> str:
    """The method, with its rank allocation when it is not the uniform default."""
    return r["_method"] if r.get("_allocation", "uniform") == "uniform" else f"{r['_method']} ({r['_allocation']})"


class Cell(NamedTuple):
    """One entry of a retention table: a setting (see ``setting_of``), a method, an alignment and
    a ratio; the runs in it differ only in their seed."""

    setting: frozenset
    method: str
    alignment: str
    ratio: Any


def retention_cells(rows) -> tuple[dict[Cell, list[dict[str, Any]]], list[tuple[dict[str, Any], str]]]:
    """Runs by cell, one per seed, and the runs left out with the reason. Runs of one cell with
    different seeds are pooled; a second run with the same seed (a rerun of one configuration)
    is left out in favour of the newest, which is what a rerun is for."""
    cells: dict[Cell, dict[Any, dict[str, Any]]] = defaultdict(dict)
    left_out = []
    for r in sorted(rows, key=lambda r: r["_mtime"], reverse=True):
        cell = Cell(r["_setting"], _method_label(r), r["_alignment"], r["_ratio"])
        kept = cells[cell].get(r["_seed"])
        if kept is not None:
            left_out.append((r, f"the same configuration and seed as {kept['_run']}, which is newer"))
            continue
        cells[cell][r["_seed"]] = r
    return {cell: sorted(by_seed.values(), key=lambda r: str(r["_seed"])) for cell, by_seed in cells.items()}, left_out


def _cell_text(runs: list[dict[str, Any]]) -> tuple[str, float, float, float, float]:
    """A cell's text, and its mean, std and interval (a single run's paired bootstrap interval;
    seeds pooled give mean ± std instead)."""
    nan = float("nan")
    values = [r["retention/ndcg@10"] for r in runs]
    if len(runs) > 1:
        mean, std = statistics.fmean(values), statistics.stdev(values)
        return f"{mean:.3f} ± {std:.3f} (n={len(runs)} seeds)", mean, std, nan, nan
    r = runs[0]
    text = f"{values[0]:.3f}"
    low, high = r.get("retention/ndcg@10_ci_low"), r.get("retention/ndcg@10_ci_high")
    if low is not None and high is not None:  # runs from before the interval was recorded have none
        text += f" [{low:.3f}, {high:.3f}]"
    else:
        low = high = nan
    return text, values[0], 0.0, low, high


def retention_table(rows, out: Path) -> list[str]:
    """One table per setting (runs that are not comparable never share a cell), seeds pooled,
    the runs behind every cell and the runs left out listed; ``retention.csv`` and ``retention.png``
    (a panel per setting) from the same cells."""
    cells, left_out = retention_cells(rows)
    labels = setting_labels(list({c.setting for c in cells}))
    settings = sorted(labels, key=lambda st: (len(labels[st]), labels[st]))  # the plainest first
    lines: list[str] = []
    points = []
    for setting in settings:
        mine = {c: runs for c, runs in cells.items() if c.setting == setting}
        ratios = sorted({c.ratio for c in mine}, key=str)
        columns = sorted({(c.method, c.alignment) for c in mine})
        title = "### Retention of test NDCG@10 [95% paired bootstrap interval over test users] (alignment time in brackets)"
        lines += [title + (f": {labels[setting]}" if len(settings) > 1 else ""), "",
                  "| ratio | " + " | ".join(m if a == "none" else f"{m} + {a}" for m, a in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for ratio in ratios:
            vals = []
            for m, a in columns:
                runs = mine.get(Cell(setting, m, a, ratio))
                if not runs:
                    vals.append("")
                    continue
                text, mean, std, low, high = _cell_text(runs)
                points.append((labels[setting], m, a, ratio, mean, low, high, std, len(runs),
                               " ".join(r["_run"] for r in runs)))
                align_s = [r["time/align_s"] for r in runs if "time/align_s" in r]
                vals.append(f"{text} ({statistics.fmean(align_s):.0f} s)" if align_s else text)
            lines.append(f"| {ratio} | " + " | ".join(vals) + " |")
        lines.append("")
    lines += ["### Runs behind each cell", "", "| setting | method | alignment | ratio | seeds | runs |",
              "|---|---|---|---|---|---|"]
    for cell, runs in sorted(cells.items(), key=lambda kv: (labels[kv[0].setting], repr(kv[0][1:]))):
        lines.append(f"| {labels[cell.setting]} | {cell.method} | {cell.alignment} | {cell.ratio} | "
                     f"{', '.join(str(r['_seed']) for r in runs)} | {', '.join(r['_run'] for r in runs)} |")
    lines.append("")
    if left_out:
        lines += ["### Runs left out", "", "| run | why |", "|---|---|"]
        lines += [f"| {r['_run']} | {why} |" for r, why in left_out]
        lines.append("")
    write_source_table(out / "retention.csv", ["setting", "method", "alignment", "ratio", "retention/ndcg@10",
                                               "ci_low", "ci_high", "std", "seeds", "runs"], points)
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False, sharey=True)
    for ax, setting in zip(axes[0], settings):
        for m, a in sorted({(p[1], p[2]) for p in points if p[0] == labels[setting]}):
            # drawn from the source table's points: the interval (one run) or ± std (seeds) as error bars
            drawn = sorted((p for p in points if p[:3] == (labels[setting], m, a)), key=lambda p: p[3])
            errors = [[max(p[4] - p[5], 0) if p[8] == 1 else p[7] for p in drawn],
                      [max(p[6] - p[4], 0) if p[8] == 1 else p[7] for p in drawn]]
            errors = [[0.0 if e != e else e for e in side] for side in errors]  # no interval recorded: no bar
            ax.errorbar([p[3] for p in drawn], [p[4] for p in drawn], yerr=errors, marker="o", capsize=3,
                        label=m if a == "none" else f"{m} + {a}")
        ax.axhline(1.0, color="grey", linestyle=":")
        ax.set_xlabel("ratio (fraction of targeted parameters kept)")
        if len(settings) > 1:
            ax.set_title(labels[setting], fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("retention of test NDCG@10")
    fig.tight_layout()
    fig.savefig(out / "retention.png", dpi=130)
    plt.close(fig)
    return lines


def rank_points(rows) -> list[tuple]:
    """(method, allocation, ratio, block, matrix type, rank, dense) from each compression run's
    ``compression_layers.csv``; a dense layer's rank is min(m, n)."""
    points = []
    for r in rows:
        path = Path(r["_run"]) / "compression_layers.csv"
        if not path.is_file() or r["_method"] not in ("svd", "asvd", "odllm"):
            continue
        with open(path) as f:
            for layer in csv.DictReader(f):
                parts = layer["name"].split(".")
                block = next((int(p) for p in parts if p.isdigit()), -1)
                points.append((r["_method"], r["_allocation"], r["_ratio"], block, parts[-1], int(layer["rank"]),
                               layer.get("dense") == "True"))
    return sorted(set(points))


def draw_ranks(points: list[tuple], out: Path) -> list[str]:
    """Rank kept per block and matrix type, one panel per (method, ratio), allocations side by side."""
    write_source_table(out / "ranks.csv", ["method", "allocation", "ratio", "block", "matrix", "rank", "dense"], points)
    panels = sorted({(p[0], p[2]) for p in points})
    matrices = sorted({p[4] for p in points})
    styles = {"uniform": ":", "global": "-", "global_relative": "--"}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (method, ratio) in zip(axes[0], panels):
        for allocation in sorted({p[1] for p in points if p[0] == method and p[2] == ratio}):
            for i, matrix in enumerate(matrices):
                line = sorted((p[3], p[5], p[6]) for p in points if p[:3] == (method, allocation, ratio) and p[4] == matrix)
                if not line:
                    continue
                ax.plot([b for b, _, _ in line], [k for _, k, _ in line], styles.get(allocation, "-."),
                        color=colours[i % len(colours)], label=f"{matrix} ({allocation})", linewidth=1.2)
                dense = [(b, k) for b, k, d in line if d]
                if dense:
                    ax.scatter(*zip(*dense), marker="s", color=colours[i % len(colours)], s=18)
        ax.set_title(f"{method} at ratio {ratio}")
        ax.set_xlabel("decoder block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("rank kept (squares: kept dense)")
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "ranks.png", dpi=130)
    plt.close(fig)
    return ["![ranks kept per block and matrix](ranks.png)", ""]


def cost_table(rows) -> list[str]:
    """What the compression runs cost: the base-model cache turns N trainings into one."""
    trained = [r for r in rows if r.get("base/cache_hit") == 0]
    train_s = sum(r.get("time/train_s", 0.0) for r in trained)
    lines = ["### Cost of the runs", "",
             f"{len(rows)} compression runs; base model trained in {len(trained)} "
             f"({train_s:.0f} s of training), reused from the base-model cache in {len(rows) - len(trained)}.", "",
             "| method | alignment | ratio | base | compress s | align s | run |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (_method_label(r), r["_alignment"], str(r["_ratio"]), r["_run"])):
        base = "cached" if r.get("base/cache_hit") == 1 else f"trained {r.get('time/train_s', float('nan')):.0f} s"
        align = f"{r['time/align_s']:.1f}" if "time/align_s" in r else "-"
        lines.append(f"| {_method_label(r)} | {r['_alignment']} | {r['_ratio']} | {base} | "
                     f"{r.get('time/compress_s', float('nan')):.1f} | {align} | {r['_run']} |")
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


def final_layer_shift(curve: Curve, pts, curves) -> list[str]:
    """A proxy-trained encoder's final-layer probe minus its pretrained model's, paired by seed
    (same probe, split and seeds): did the proxy pull the final layer away from the CTR task?
    Only where the report holds the pretrained model's curve with the same final layer."""
    before = curves.get(curve._replace(encoder=curve.base))
    if curve.base == curve.encoder or not before or before[-1][0] != pts[-1][0]:
        return []
    lines = _paired_rows([(f"final layer ({pts[-1][0]}) after the proxy", pts[-1][2])], before[-1][2])
    if not lines:
        return []
    return [f"### The final layer after the proxy minus before ({curve.label} vs {curve.base})", "",
            *_paired_head("pretrained model's final layer's"), *lines, ""]


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
        ranks = rank_points(rows)
        if len({p[1] for p in ranks}) > 1:  # only worth a figure when allocations differ
            lines += draw_ranks(ranks, args.out)
    lines += failed_jobs(args.runs)
    if len(lines) == 2:
        raise SystemExit("none of the runs has probe, MARC or compression metrics to report")
    (args.out / "report.md").write_text("\n".join(lines))
    labels = setting_labels(sorted({r["_setting"] for r in runs}, key=lambda st: sorted(map(str, st))))
    kept = [{**{k: v for k, v in r.items() if k != "_setting"}, "_setting": labels[r["_setting"]]} for r in runs]
    (args.out / "report.json").write_text(json.dumps(kept, indent=2, default=str) + "\n")
    print("\n".join(lines))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
