"""Run the configured alignment of a compressed student against its teacher."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import PreTrainedModel

from recsys_compress.alignment.block_cache import capture_teacher
from recsys_compress.alignment.lstsq import progressive_lstsq
from recsys_compress.alignment.progressive import ProgressiveAlignmentModule, check_alignable
from recsys_compress.alignment.config import AlignmentConfig
from recsys_compress.models.interface import RecommenderModel
from recsys_compress.utils.tables import write_table

log = logging.getLogger(__name__)


def align(
    cfg: AlignmentConfig,
    recommender: RecommenderModel,
    teacher: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    trainer_factory: Any = None,
    output_dir: str | Path | None = None,
    loggers: list | None = None,
) -> dict[str, Any]:
    """Align ``recommender.backbone`` (the compressed student) in place to ``teacher``, its
    uncompressed twin; returns ``time/align_s`` and per-block summaries.

    ``trainer_factory(**overrides) -> L.Trainer`` builds the Trainer for gradient alignment
    (the run's trainer config, so accelerator, precision and clipping apply); progress is
    checkpointed to ``output_dir/alignment/last.ckpt`` and resumed from there when present.
    """
    student = recommender.backbone
    check_alignable(teacher, student)
    loggers = loggers or []
    t0 = time.perf_counter()
    if cfg.method == "progressive_lstsq":
        # The closed form runs where the run's Trainer would (Lightning's teardown leaves a
        # model on the CPU after every fit/test, so the student's own device says nothing).
        device = (trainer_factory(callbacks=[], logger=False, enable_checkpointing=False).strategy.root_device
                  if trainer_factory else next(student.parameters()).device)
        student.to(device)
        cache = capture_teacher(teacher.to(device), batches, cfg.batches, device, recommender.sequence,
                                cfg.offload_states)
        was_training = student.training
        student.eval()
        reports = progressive_lstsq(teacher, student, cache, cfg.ridge)
        student.train(was_training)
        del cache
    elif cfg.method == "progressive":
        module = ProgressiveAlignmentModule(
            recommender, teacher, batches, num_batches=cfg.batches, steps_per_layer=cfg.steps_per_layer, lr=cfg.lr,
            weight_decay=cfg.weight_decay, scheduler=cfg.scheduler, warmup_steps=cfg.warmup_steps,
            task_weight=cfg.task_weight, distill_weight=cfg.distill_weight,
            distill_temperature=cfg.distill_temperature, offload_states=cfg.offload_states,
        )
        callbacks, ckpt_path = [], None
        if cfg.checkpoint and output_dir is not None:
            folder = Path(output_dir) / "alignment"
            callbacks.append(ModelCheckpoint(dirpath=folder, save_top_k=0, save_last=True,
                                             every_n_train_steps=cfg.steps_per_layer))
            if (folder / "last.ckpt").is_file():
                ckpt_path = str(folder / "last.ckpt")
                log.info("resuming alignment from %s", ckpt_path)
        overrides = dict(max_steps=module.total_steps, max_epochs=-1, callbacks=callbacks,
                         logger=loggers or False, enable_checkpointing=bool(callbacks),
                         num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=10)
        trainer = trainer_factory(**overrides) if trainer_factory else L.Trainer(
            accelerator="cpu", devices=1, enable_model_summary=False, **overrides)
        with warnings.catch_warnings():
            # The student runs in eval mode on purpose (no dropout against deterministic
            # targets), and batches are chosen by the global step, not the loader position,
            # so a mid-epoch resume is exact.
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
            warnings.filterwarnings("ignore", message=r".*dataloader is not resumable.*")
            trainer.fit(module, ckpt_path=ckpt_path)
        reports = module.layer_reports
        module.cache.clear()
    else:
        raise ValueError(f"alignment.method={cfg.method!r}; allowed: progressive, progressive_lstsq")
    seconds = time.perf_counter() - t0
    _write_reports(reports, output_dir, loggers)
    out: dict[str, Any] = {"time/align_s": seconds, "align/layers": len(reports)}
    if reports:
        out["align/mean_mse_before"] = sum(r["mse_before"] for r in reports) / len(reports)
        out["align/mean_mse_after"] = sum(r["mse_after"] for r in reports) / len(reports)
    return out


def _write_reports(reports: list[dict[str, float]], output_dir: str | Path | None, loggers: list) -> None:
    # one row per block, before and after
    write_table(reports, Path(output_dir) / "alignment_layers.csv" if output_dir is not None else None,
                loggers, "align/layers_table")
