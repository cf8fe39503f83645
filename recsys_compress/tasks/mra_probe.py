"""``task=mra_probe``: how good is each LLM layer's item representation once compressed?

For ``probe.layer`` (an index, or ``all``) the frozen mean-pooled representation is
compressed to ``probe.dim`` features (linear trained with the task, PCA, or none = ID-only)
and a DCN-V2 CTR model is trained on MovieLens (label rating >= threshold, per-user time
split), selected on validation AUC and tested. Representations come from the on-disk cache.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from recsys_compress.config import (CTRConfig, ConfigError, MARCRunConfig, ProbeRunConfig, RepresentationConfig,
                                    validate_probe)
from recsys_compress.marc.ctr_data import CTRDataModule, CTRSplits, build_ctr_splits
from recsys_compress.marc.ctr_model import CTRLitModule, RepresentationCompressor
from recsys_compress.marc.representations import Encoder, cached_layer_means, item_texts, load_encoder, user_texts
from recsys_compress.models.gguf_cache import convert_gguf
from recsys_compress.tasks.train_seqrec import instantiate_group
from recsys_compress.utils.run_outputs import finish_run

log = logging.getLogger(__name__)


def build_encoder(rep: RepresentationConfig, cache_dir: str | Path, seed: int) -> Encoder:
    if rep.model == "smollm2_135m" and not rep.path:
        if not rep.gguf_path:
            raise ConfigError("representation.gguf_path (or representation.path) is needed for smollm2_135m")
        return load_encoder(rep.model, convert_gguf(rep.gguf_path, Path(cache_dir) / "models"))
    return load_encoder(rep.model, rep.path, seed=seed)


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
    titles, _ = item_texts(data.item_ids, data.item_info, "{title}")  # same "Item <id>" fallback
    history = [[titles[i] for i in items] for items in data.recent_train_items(rep.user_history)]
    utexts, counts = user_texts(data.user_ids, data.user_info, history, rep.user_template)
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


def ctr_datamodule(run: ProbeRunConfig | MARCRunConfig) -> CTRDataModule:
    """The run's CTR splits (``dataset``, ``ctr``, ``seed``) in a datamodule; ``.data`` holds them."""
    d, c = run.dataset, run.ctr
    data = build_ctr_splits(d.format, d.path, d.file_name, c.threshold, tuple(c.split), c.split_by, run.seed)
    return CTRDataModule(data, c.batch_size, c.eval_batch_size, run.seed, c.batch_by, c.items_per_batch)


def ctr_fields(c: CTRConfig) -> dict[str, Any]:
    """What a CTR run records in metrics.json about how its CTR model was trained, so reports
    pool only runs trained alike."""
    return {"ctr/split_by": c.split_by, "ctr/item_id_dropout": c.item_id_dropout, "ctr/batch_by": c.batch_by}


def callbacks_into(cfg: DictConfig, checkpoint_dir: Path, loggers: list) -> list[L.Callback]:
    """The run's callbacks, checkpointing into ``checkpoint_dir`` (one folder per model trained)."""
    callbacks = []
    for cb in instantiate_group(cfg.get("callbacks")):
        if isinstance(cb, ModelCheckpoint):
            cb.dirpath = str(checkpoint_dir)
        if isinstance(cb, LearningRateMonitor) and not loggers:
            continue  # it refuses to start without a logger
        callbacks.append(cb)
    return callbacks


def fit_ctr(cfg: DictConfig, c: CTRConfig, seed: int, dm: CTRDataModule, compressor: RepresentationCompressor,
            loggers: list, checkpoint_dir: Path,
            user_compressor: RepresentationCompressor | None = None,
            export_codes: Path | None = None) -> dict[str, float]:
    """Train one CTR model on ``compressor``'s item features (and ``user_compressor``'s user
    features, when given), select on val AUC, test. ``export_codes``: write the selected
    model's compressed feature of every item there (``mu``, as MARC exports its codes), so a
    fresh CTR model can be trained on them (experiments/evaluate_codes.py)."""
    L.seed_everything(seed, workers=True)
    lit = CTRLitModule(compressor, len(dm.data.user_ids), len(dm.data.item_ids), id_dim=c.id_dim,
                       cross_layers=c.cross_layers, hidden=tuple(c.hidden), dropout=c.dropout, lr=c.lr,
                       weight_decay=c.weight_decay, user_compressor=user_compressor,
                       item_id_dropout=c.item_id_dropout, known_items=dm.data.known_items())
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False,
                                     callbacks=callbacks_into(cfg, checkpoint_dir, loggers))
    t0 = time.perf_counter()
    trainer.fit(lit, datamodule=dm)
    train_s = time.perf_counter() - t0
    ckpt = trainer.checkpoint_callback
    best = "best" if ckpt is not None and ckpt.best_model_path else None
    out = dict(trainer.test(lit, datamodule=dm, ckpt_path=best, verbose=False)[0])  # loads the best weights
    out["time/train_s"] = train_s
    if export_codes is not None and compressor.dim:
        with torch.no_grad():
            codes = lit.compressor.eval()(torch.arange(len(dm.data.item_ids), device=lit.device)).cpu()
        save_file({"mu": codes.contiguous()}, str(export_codes),
                  metadata={"kind": f"probe {compressor.kind}", "dim": str(codes.shape[1])})
    if ckpt is not None and ckpt.best_model_score is not None:
        out["val/best_auc"] = float(ckpt.best_model_score)
    return out


def mra_probe(cfg: DictConfig) -> dict[str, Any]:
    run = validate_probe(cfg)
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(run.seed, workers=True)
    dm = ctr_datamodule(run)
    data = dm.data
    reps, user_reps, info = layer_representations(run, data, cfg.paths.cache_dir)

    def users_at(layer: int) -> RepresentationCompressor | None:
        # The user text is encoded by the same layer as the items, compressed the same way.
        if user_reps is None:
            return None
        return RepresentationCompressor(user_reps[layer], run.probe.compressor, run.probe.dim)

    loggers = instantiate_group(cfg.get("logger"))
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    metrics: dict[str, Any] = {"probe/dim": run.probe.dim, "probe/compressor": run.probe.compressor,
                               "repr/encoder": run.representation.model, "data/name": run.dataset.name,
                               **ctr_fields(run.ctr),
                               "seed": run.seed, **info, **{f"data/{k}": v for k, v in data.stats().items()}}
    if reps is None or run.probe.layer != "all":
        layer = None if reps is None else int(run.probe.layer)
        compressor = RepresentationCompressor(None if reps is None else reps[layer], run.probe.compressor, run.probe.dim)
        result = fit_ctr(cfg, run.ctr, run.seed, dm, compressor, loggers, output_dir / "checkpoints",
                         None if layer is None else users_at(layer),
                         export_codes=None if layer is None else output_dir / "item_codes.safetensors")
        metrics.update(result)
        metrics["probe/layer"] = -1 if layer is None else layer  # -1: ID-only, no representation
    else:
        rows = []
        for layer in range(reps.shape[0]):
            log.info("probing layer %d of %d", layer, reps.shape[0] - 1)
            compressor = RepresentationCompressor(reps[layer], run.probe.compressor, run.probe.dim)
            result = fit_ctr(cfg, run.ctr, run.seed, dm, compressor, loggers,
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
    columns = ["layer", "val/best_auc", "test/auc", "test/logloss", "time/train_s"]
    with open(output_dir / "probe_layers.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = Table(title="MRA probe: AUC by layer")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(str(r[c]) if c == "layer" else f"{r[c]:.4f}" for c in columns))
    Console().print(table)
    data = [[r[c] for c in columns] for r in rows]
    for logger in loggers:
        if hasattr(logger, "log_table"):
            import wandb

            logger.log_table("probe/layers_table", columns=columns, data=data)
            wandb_table = wandb.Table(columns=columns, data=data)
            logger.experiment.log({"probe/mra_curve": wandb.plot.line(
                wandb_table, "layer", "test/auc", title="MRA curve: test AUC by layer")})
