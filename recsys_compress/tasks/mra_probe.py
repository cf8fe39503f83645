"""``task=mra_probe``: how good is each LLM layer's item representation once compressed?

For ``probe.layer`` (an index, or ``all``) the frozen mean-pooled representation is
compressed to ``probe.dim`` features (linear trained with the task, PCA, or none = ID-only)
and a DCN-V2 CTR model is trained on MovieLens (label rating >= threshold, per-user time
split), selected on validation AUC and tested. Representations come from the on-disk cache.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from recsys_compress.tasks.builders import build_ctr_datamodule, build_encoder
from recsys_compress.schema import ConfigError
from recsys_compress.tasks.config import ProbeRunConfig, validate_probe
from recsys_compress.ctr.data import CTRSplits
from recsys_compress.ctr.fit import ctr_fields, fit_ctr
from recsys_compress.ctr.model import RepresentationCompressor
from recsys_compress.representations.layer_means import cached_layer_means, item_texts, split_user_texts
from recsys_compress.utils.instantiators import Trainers, instantiate_loggers
from recsys_compress.representations.proxy import encoder_label
from recsys_compress.utils.run_outputs import finish_run
from recsys_compress.utils.tables import write_table

log = logging.getLogger(__name__)


def layer_representations(
    run: ProbeRunConfig, data: CTRSplits, cache_dir: str | Path
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, Any]]:
    """Item representations ``[n_layers + 1, n_items, hidden]`` from the cache (or extracted
    now), user representations ``[n_layers + 1, n_users, hidden]`` when
    ``representation.users`` (else None), and what they cost."""
    if run.probe.compressor == "none":
        return None, None, {"probe/n_layers": float("nan")}
    rep = run.representation
    encoder = build_encoder(rep, cache_dir, run.seed)
    n = encoder.n_layers
    if run.probe.layer != "all" and not 0 <= run.probe.layer <= n:
        raise ConfigError(f"probe.layer={run.probe.layer} is out of range for {rep.model}; "
                          f"allowed: 0..{n} (0 = token embeddings, {n} = final layer) or all")
    texts, missing = item_texts(data.item_ids, data.item_info, rep.template)
    if missing:
        log.warning("%d of %d items have no title; they use the text 'Item <id>'", missing, len(texts))
    t0 = time.perf_counter()
    reps, hit, path = cached_layer_means(encoder, run.dataset.name, data.item_ids, texts, rep.template,
                                        cache_dir, rep.batch_size, rep.max_tokens)
    info = {"time/extract_s": 0.0 if hit else time.perf_counter() - t0, "repr/cache_hit": int(hit),
            "repr/cache_mb": path.stat().st_size / 2**20, "repr/items_without_text": missing,
            "repr/hidden": reps.shape[-1], "probe/n_layers": n}
    log.info("representations %s (%s): %s", path, "cached" if hit else "extracted", tuple(reps.shape))
    if not rep.users:
        return reps, None, {**info, "repr/users": 0}
    utexts, counts = split_user_texts(data, rep.user_template, rep.user_history)
    for what, n_users in counts.items():
        if n_users:
            log.warning("%d of %d users are %s", n_users, len(utexts), what.replace("_", " "))
    t0 = time.perf_counter()
    user_reps, user_hit, user_path = cached_layer_means(
        encoder, f"{run.dataset.name}/users", data.user_ids, utexts,
        f"{rep.user_template}|history={rep.user_history}", cache_dir, rep.batch_size, rep.user_max_tokens,
        key_texts=True)
    info.update({"repr/users": 1, "time/extract_users_s": 0.0 if user_hit else time.perf_counter() - t0,
                 "repr/users_cache_hit": int(user_hit), "repr/users_cache_mb": user_path.stat().st_size / 2**20,
                 **{f"repr/{k}": v for k, v in counts.items()}})
    log.info("user representations %s (%s): %s", user_path, "cached" if user_hit else "extracted",
             tuple(user_reps.shape))
    return reps, user_reps, info


def mra_probe(cfg: DictConfig) -> dict[str, Any]:
    run = validate_probe(cfg)
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(run.seed, workers=True)
    dm = build_ctr_datamodule(run)
    data = dm.data
    reps, user_reps, info = layer_representations(run, data, cfg.paths.cache_dir)

    def users_at(layer: int) -> RepresentationCompressor | None:
        # The user text is encoded by the same layer as the items, compressed the same way.
        if user_reps is None:
            return None
        return RepresentationCompressor(user_reps[layer], run.probe.compressor, run.probe.dim)

    loggers = instantiate_loggers(cfg)
    trainers = Trainers(cfg, loggers)

    metrics: dict[str, Any] = {"probe/dim": run.probe.dim, "probe/compressor": run.probe.compressor,
                               "repr/encoder": encoder_label(run.representation.model, run.representation.encoder_run), "data/name": run.dataset.name,
                               **ctr_fields(run.ctr),
                               "seed": run.seed, **info, **{f"data/{k}": v for k, v in data.stats().items()}}
    if reps is None or run.probe.layer != "all":
        layer = None if reps is None else int(run.probe.layer)
        compressor = RepresentationCompressor(None if reps is None else reps[layer], run.probe.compressor, run.probe.dim)
        result = fit_ctr(trainers, run.ctr, run.seed, dm, compressor, output_dir / "checkpoints",
                         None if layer is None else users_at(layer),
                         export_codes=None if layer is None else output_dir / "item_codes.safetensors")
        metrics.update(result)
        metrics["probe/layer"] = -1 if layer is None else layer  # -1: ID-only, no representation
    else:
        rows = []
        for layer in range(reps.shape[0]):
            log.info("probing layer %d of %d", layer, reps.shape[0] - 1)
            compressor = RepresentationCompressor(reps[layer], run.probe.compressor, run.probe.dim)
            result = fit_ctr(trainers, run.ctr, run.seed, dm, compressor,
                             output_dir / "checkpoints" / f"layer{layer:02d}", users_at(layer))
            rows.append({"layer": layer, **result})
            metrics.update({f"layers/{layer}/{k}": v for k, v in result.items()})
        best = max(rows, key=lambda r: r["val/best_auc"])  # chosen on validation, reported on test
        final = rows[-1]
        metrics.update({k: v for k, v in best.items() if k != "layer"})
        metrics.update({"probe/layer": "all", "probe/best_layer": best["layer"], "probe/final_layer": final["layer"],
                        "probe/final_test/auc": final["test/auc"], "probe/final_test/logloss": final["test/logloss"],
                        "time/train_s": sum(r["time/train_s"] for r in rows)})
        write_layer_table(rows, output_dir, loggers)

    metrics["objective"] = metrics.get("val/best_auc")  # what hyper-parameter searches maximise
    path = finish_run(output_dir, metrics, loggers)
    Console().print(f"[bold]probe layer {metrics['probe/layer']}  dim {run.probe.dim}  ({run.probe.compressor})  "
                    f"test auc {metrics['test/auc']:.4f}  logloss {metrics['test/logloss']:.4f}  -> {path}")
    return metrics


def write_layer_table(rows: list[dict[str, Any]], output_dir: Path, loggers: list) -> None:
    """``probe_layers.csv``, a console table, and a W&B table + line plot of AUC against layer."""
    columns = write_table(rows, output_dir / "probe_layers.csv", loggers, "probe/layers_table",
                          columns=["layer", "val/best_auc", "test/auc", "test/logloss", "time/train_s"])
    table = Table(title="MRA probe: AUC by layer")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(str(r[c]) if c == "layer" else f"{r[c]:.4f}" for c in columns))
    Console().print(table)
    for logger in loggers:
        if hasattr(logger, "log_table"):
            import wandb

            wandb_table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            logger.experiment.log({"probe/mra_curve": wandb.plot.line(
                wandb_table, "layer", "test/auc", title="MRA curve: test AUC by layer")})
