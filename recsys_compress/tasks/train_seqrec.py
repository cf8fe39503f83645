"""Train and evaluate the sequential-recommendation LLM: the `task=train` pipeline."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from recsys_compress.alignment.runner import align
from recsys_compress.compression.calibration import batch_budget
from recsys_compress.compression.compressor import Compressor, check_allocation
from recsys_compress.compression.serialization import save_compressed
from recsys_compress.tasks.builders import build_datamodule, build_lit_module, build_model
from recsys_compress.tasks.config import RunConfig, validate
from recsys_compress.tasks.item_index import run_item_codes
from recsys_compress.data.datamodule import NextItemDataModule
from recsys_compress.deploy.evaluate import evaluate_artefact
from recsys_compress.deploy.export import export_onnx
from recsys_compress.evaluation.baselines import evaluate_popularity
from recsys_compress.evaluation.bootstrap import retention
from recsys_compress.models.finetune import add_lora, has_lora, merge_lora
from recsys_compress.models.base_cache import (
    base_model_key,
    base_model_lock,
    load_base,
    load_base_test_per_user,
    store_base,
)
from recsys_compress.models.item_llm import count_nonzero_parameters, count_parameters, serialized_megabytes
from recsys_compress.models.interface import RecommenderModel
from recsys_compress.models.lit_base import RecLitModule
from recsys_compress.utils.callbacks import TrainingThroughput
from recsys_compress.utils.instantiators import Trainers, instantiate_loggers, place
from recsys_compress.utils.ddp_sweep import multi_process
from recsys_compress.utils.run_outputs import finish_run, global_rank

log = logging.getLogger(__name__)


def print_dataset_stats(name: str, stats: dict[str, Any]) -> None:
    table = Table(title=f"dataset {name}", show_header=False)
    for key, value in stats.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


def compress_and_test(
    run: RunConfig, lit: RecLitModule, dm: NextItemDataModule, trainers: Trainers, output_dir: Path
) -> dict[str, Any]:
    """Compress the (best-validation) base model in place, test, align, save, quantise last.

    Stages: factorise/prune (float) -> test (``stages/compressed/...``) -> progressive
    alignment against the uncompressed model (when asked) -> save the float artefacts -> int8
    (when asked) -> test. Quantisation comes last so alignment trains float factors and the
    saved and exported artefacts are float (onnxruntime quantises the ONNX graph itself).
    """
    c = run.compression
    aligning = run.alignment.method != "none"
    teacher = copy.deepcopy(lit.model).eval() if aligning else None
    compressor = Compressor(c, run.ratio, defer_quantize=True)
    quantize = compressor.quantize  # int8 for compression=int8 or a stacked compression.quantize=int8
    trainer: L.Trainer = trainers(callbacks=[], enable_checkpointing=False)
    compress_on(trainer, compressor, lit, dm)
    compressor.write_report(output_dir, trainer.loggers)
    t0 = time.perf_counter()
    test = trainer.test(lit, datamodule=dm, verbose=False)[0]
    out: dict[str, Any] = {**compressor.summary(), "time/test_s": time.perf_counter() - t0}
    out.update({f"stages/compressed/{k}": v for k, v in test.items()})

    if aligning:
        L.seed_everything(run.seed)
        out.update(align(run.alignment, lit, teacher, dm.train_dataloader(),
                         trainer_factory=trainers, output_dir=output_dir, loggers=trainers.loggers))
        del teacher
        test = trainer.test(lit, datamodule=dm, verbose=False)[0]
    out.update(save_artefacts(run, lit, dm, quantize, output_dir))
    if quantize:
        out["time/quantize_s"] = compressor.apply_quantization(lit.model)
        test = trainer.test(lit, datamodule=dm, verbose=False)[0]
    out.update(test)
    # Validation of the final model: what hyper-parameter searches may optimise (never test).
    out.update(trainer.validate(lit, datamodule=dm, verbose=False)[0])
    return out


def compress_on(trainer: L.Trainer, compressor: Compressor, recommender: RecLitModule,
                dm: NextItemDataModule) -> None:
    """Compress ``recommender`` where ``trainer`` will test it: on its device, cast to its precision
    (bf16-true: bf16 weights, half the memory), calibrated on ``dm``'s training batches (and its
    validation batches for a gradient-driven allocation with ``gradient_split=val``)."""
    place(recommender, trainer)
    c = compressor.config
    gradient_batches = dm.val_dataloader() if compressor.takes_gradients and c.gradient_split == "val" else None
    compressor.compress(recommender, dm.train_dataloader(), gradient_batches)


def save_artefacts(
    run: RunConfig, recommender: RecommenderModel, dm: NextItemDataModule, quantize: str | None, output_dir: Path
) -> dict[str, Any]:
    """Write the float model (``RUN_DIR/model``) and the ONNX artefact (``RUN_DIR/onnx``)."""
    out: dict[str, Any] = {}
    if global_rank() != 0:  # under DDP every rank holds the same model: one writes it
        return out
    if run.export.save:
        save_compressed(recommender.backbone, output_dir / "model", artefact_info(run, quantize))
        log.info("compressed model saved to %s (float; quantize after loading: %s)", output_dir / "model", quantize)
    if run.export.onnx:
        out.update(export_artefact(run, recommender, dm, quantize, output_dir))
    return out


def artefact_info(run: RunConfig, quantize: str | None) -> dict[str, Any]:
    """What a saved or exported model records about itself (a plain run's ratio is none: it kept all)."""
    compressing = run.compression.method != "none"
    return {"method": run.compression.method, "ratio": run.ratio if compressing else None, "quantize": quantize,
            "alignment": run.alignment.method, "dataset": run.dataset.name, "model": run.model.name}


def export_artefact(run: RunConfig, recommender: RecommenderModel, dm: NextItemDataModule, quantize: str | None,
                    output_dir: Path) -> dict[str, Any]:
    """The ONNX artefact (``RUN_DIR/onnx``) of ``recommender`` for ``recsys-recommend``."""
    assert dm.data is not None
    t0 = time.perf_counter()
    calibration = None
    smooth = run.export.int8_smooth if quantize is not None else None
    if quantize is not None and (run.export.int8 == "static" or smooth is not None):
        # static int8 fixes its activation scales, and smoothing its channel scales, on the
        # batches the compression calibrated on: the first ones of the training order, as
        # many as batch_budget gave calibration
        loader, c = dm.train_dataloader(), run.compression
        calibration = islice(loader, batch_budget(len(loader), c.calib_batches, c.heldout_batches)[0])
    folder = export_onnx(recommender, output_dir / "onnx", dm.max_len, dm.data.item_ids, dm.data.item_texts(),
                         quantize=quantize, info=artefact_info(run, quantize), int8=run.export.int8,
                         calibration=calibration, int8_weights=run.export.int8_weights, int8_smooth=smooth)
    meta = json.loads((folder / "deploy.json").read_text())
    return {"time/export_s": time.perf_counter() - t0, "size/onnx_mb": meta["megabytes"],
            "export/max_abs_deviation": meta["max_abs_deviation_from_eager"]}


def evaluate_deployed(run: RunConfig, dm: NextItemDataModule, folder: Path, base_ndcg: float,
                      base_per_user: Any = None) -> dict[str, Any]:
    """The exported artefact's own test metrics (``deploy/test/...``, both protocols) and its
    retention of the base model's NDCG@10, with the paired interval when ``base_per_user``
    (the base's per-user NDCG@10 in the test loader's order) is given."""
    t0 = time.perf_counter()
    e = run.evaluation
    values, per_user = evaluate_artefact(folder, dm.test_dataloader(), e.exclude_seen, tuple(e.hr_ks), tuple(e.ndcg_ks))
    out: dict[str, Any] = {f"deploy/test/{k}": v for k, v in values.items()}
    out.update(retention(base_ndcg, values["ndcg@10"], base_per_user, per_user, key="deploy/retention/ndcg@10",
                         seed=run.seed))
    out["time/deploy_test_s"] = time.perf_counter() - t0
    log.info("the exported artefact: test ndcg@10 %.4f (%.3f of the base)", values["ndcg@10"],
             out["deploy/retention/ndcg@10"])
    return out


def resume_checkpoint(resume: str | None, output_dir: str | Path) -> str | None:
    """The checkpoint to resume from: ``auto`` = the run folder's last.ckpt if there is one."""
    if resume != "auto":
        return resume
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("resuming training from %s", last)
        return str(last)
    return None


def train_base(lit: RecLitModule, dm: NextItemDataModule, trainers: Trainers, output_dir: Path,
               resume: str | None = None, ckpt_path: str | None = "best") -> dict[str, Any]:
    """Fit (or resume), then test the ``ckpt_path`` checkpoint (``best``: the best-validation
    one; null: the final weights); returns test and training metrics."""
    throughput = TrainingThroughput()
    trainer: L.Trainer = trainers(callbacks=trainers.callbacks() + [throughput])

    t0 = time.perf_counter()
    trainer.fit(lit, datamodule=dm, ckpt_path=resume_checkpoint(resume, output_dir))
    train_s = time.perf_counter() - t0

    ckpt = trainer.checkpoint_callback
    if ckpt_path == "best" and not (ckpt is not None and ckpt.best_model_path):
        ckpt_path = None  # fast_dev_run or no checkpointing: test the final weights
    t0 = time.perf_counter()
    metrics: dict[str, Any] = dict(trainer.test(lit, datamodule=dm, ckpt_path=ckpt_path, verbose=False)[0])
    metrics.update({
        "time/train_s": train_s,
        "time/test_s": time.perf_counter() - t0,
        "time/train_step_s": throughput.step_s,
        "train/tokens_per_s": throughput.tokens_per_s,
        "train/tokens": throughput.tokens,  # next-item targets this process trained on (1/N of each epoch under DDP)
        "train/epochs": trainer.current_epoch,
        "train/start_step": throughput.start_step,  # > 0: resumed from a checkpoint of that step
        # what the optimiser updated (LoRA: adapters and item table), counted before merging
        "params/trained": sum(p.numel() for p in lit.parameters() if p.requires_grad),  # a tied head once
    })
    if ckpt is not None and ckpt.best_model_score is not None:
        metrics["val/best_ndcg@10"] = float(ckpt.best_model_score)
    return metrics


def train_seqrec(cfg: DictConfig) -> dict[str, Any]:
    """Train, select on validation, test; returns the metrics written to ``metrics.json``."""
    run = validate(cfg)  # fail before any work on a bad value
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(run.seed, workers=True)

    dm = build_datamodule(run.dataset, run.seed)
    assert dm.data is not None
    stats = dm.data.stats
    print_dataset_stats(run.dataset.name, stats)

    codes, index_metrics = run_item_codes(run, dm, cfg.paths.cache_dir,
                                          output_dir if global_rank() == 0 else None)
    model = build_model(run.model, dm, cfg.paths.cache_dir, codes)
    check_allocation(run.compression, run.ratio, model)
    lit = build_lit_module(run, model, codes)

    trainers = Trainers(cfg, instantiate_loggers(cfg, data=stats))
    for lg in trainers.loggers:
        lg.log_metrics({f"data/{k}": float(v) for k, v in stats.items()}, step=0)

    compressing = run.compression.method != "none"
    key, material = base_model_key(cfg, codes)
    # Only a compression run reuses a cached base (a plain run is asked to train); every run
    # that trains one stores it, so `python train.py` followed by `compression=odllm` trains once.
    caching = compressing and run.base_cache
    storing = run.base_cache and not cfg.trainer.get("fast_dev_run")
    # Under DDP the ranks train together: one waiting on the lock would deadlock the other.
    locking = caching and not multi_process(cfg)
    with base_model_lock(cfg.paths.cache_dir, key) if locking else contextlib.nullcontext():
        cached = load_base(cfg.paths.cache_dir, key, model) if caching else None
        if cached is None:
            if run.model.finetune == "lora":
                add_lora(model, run.model.lora)
            metrics = train_base(lit, dm, trainers, output_dir, run.resume, cfg.get("ckpt_path"))
            if has_lora(model):  # the best checkpoint was tested with its adapters; keep a stock model
                merge_lora(model)
            base_per_user = lit.test_per_user
            if storing:
                store_base(cfg.paths.cache_dir, key, material, model, metrics, base_per_user)
        else:
            base_per_user = load_base_test_per_user(cfg.paths.cache_dir, key)
    if cached is None:
        metrics["base/cache_hit"] = 0
    else:
        log.info("reusing the cached base model %s (no training)", key)
        metrics = {**cached, "base/cache_hit": 1, "base/time/train_s": cached["time/train_s"], "time/train_s": 0.0}
    metrics["base/cache_key"] = key

    params, size_mb = count_parameters(model), serialized_megabytes(model)
    if compressing:
        base_params, base_mb = params, size_mb
        metrics = {(f"base/{k}" if k.startswith("test/") else k): v for k, v in metrics.items()}
        metrics["time/base_test_s"] = metrics.pop("time/test_s")
        metrics.update(compress_and_test(run, lit, dm, trainers, output_dir))
        params, size_mb = count_parameters(model), serialized_megabytes(model)
        # The same test users ranked by both models: an interval for the retention ratio.
        metrics.update(retention(metrics["base/test/ndcg@10"], metrics["test/ndcg@10"], base_per_user,
                                 lit.test_per_user, seed=run.seed))
        if run.export.onnx and global_rank() == 0:
            metrics.update(evaluate_deployed(run, dm, output_dir / "onnx", metrics["base/test/ndcg@10"],
                                             None if multi_process(cfg) else base_per_user))
        metrics.update({
            "compression/quantize": run.compression.quantizes,
            "compression/method": run.compression.method,
            "compression/allocation": run.compression.allocation,
            "compression/ratio": run.ratio,
            "alignment/method": run.alignment.method,
            "params/base_total": base_params,
            "size/base_mb": base_mb,
            "compression/model_ratio": params / base_params,
        })
    elif run.export.onnx and global_rank() == 0:  # the trained model itself, as deployed
        metrics.update(export_artefact(run, lit, dm, None, output_dir))
        metrics.update(evaluate_deployed(run, dm, output_dir / "onnx", metrics["test/ndcg@10"],
                                         None if multi_process(cfg) else base_per_user))
    metrics.update(
        {
            "params/total": params,
            "params/nonzero": count_nonzero_parameters(model),
            "size/mb": size_mb,
            "data/n_users": dm.data.n_users,
            "data/n_items": dm.data.n_items,
            "data/n_interactions": dm.data.n_interactions,
            "item_ids": run.item_ids,
            **index_metrics,
        }
    )
    if run.item_ids == "semantic":
        metrics["evaluation/beams"] = run.evaluation.beams  # the ranked list: an item outside it is a miss
        metrics["evaluation/decoding"] = run.evaluation.decoding
    metrics["objective"] = metrics.get("val/ndcg@10") if compressing else metrics.get("val/best_ndcg@10")
    if run.evaluation.popularity_baseline:
        pop = evaluate_popularity(
            dm.item_counts("test"), dm.test_dataloader(), run.evaluation.exclude_seen,
            tuple(run.evaluation.hr_ks), tuple(run.evaluation.ndcg_ks),
        )
        metrics.update({f"baseline/popularity/test/{k}": v for k, v in pop.items()})

    path = finish_run(output_dir, metrics, trainers.loggers)
    log.info("metrics written to %s", path)
    Console().print("\n".join(result_lines(metrics, path)), highlight=False, soft_wrap=True)
    return metrics


def result_lines(metrics: dict[str, Any], path: Path) -> list[str]:
    """The run's answer, the last lines it prints: the test score and, for a compression run,
    the base model's, the retention with its paired interval and the deployed artefact's."""
    pop = metrics.get("baseline/popularity/test/ndcg@10")
    lines = [f"[bold]test ndcg@10 {metrics['test/ndcg@10']:.4f}  hr@10 {metrics['test/hr@10']:.4f}"
             + (f"  (popularity ndcg@10 {pop:.4f})" if pop is not None else "")
             + f"  train {metrics['time/train_s']:.1f}s"
             + ("  (base model from the cache)" if metrics.get("base/cache_hit") == 1 else "") + "[/bold]"]
    if "retention/ndcg@10" in metrics:
        method = f"{metrics['compression/method']}@{metrics['compression/ratio']:g}"
        if metrics.get("alignment/method", "none") != "none":
            method += f" + {metrics['alignment/method']}"
        low, high = metrics.get("retention/ndcg@10_ci_low"), metrics.get("retention/ndcg@10_ci_high")
        interval = f" [{low:.3f}, {high:.3f}] (95% paired bootstrap over test users)" if low is not None else ""
        lines.append(f"[bold]{method}: test ndcg@10 {metrics['base/test/ndcg@10']:.4f} (base) -> "
                     f"{metrics['test/ndcg@10']:.4f}, retention {metrics['retention/ndcg@10']:.3f}{interval}[/bold]")
    if "deploy/retention/ndcg@10" in metrics:
        low, high = metrics.get("deploy/retention/ndcg@10_ci_low"), metrics.get("deploy/retention/ndcg@10_ci_high")
        interval = f" [{low:.3f}, {high:.3f}]" if low is not None else ""
        lines.append(f"[bold]deployed artefact: test ndcg@10 {metrics['deploy/test/ndcg@10']:.4f}, retention "
                     f"{metrics['deploy/retention/ndcg@10']:.3f}{interval}, {metrics['size/onnx_mb']:.1f} MB[/bold]")
    lines.append(f"metrics -> {path}")
    return lines
