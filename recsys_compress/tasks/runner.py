"""Dispatch `train.py` to a task and always close the experiment trackers."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from recsys_compress.tasks.marc import marc
from recsys_compress.tasks.mra_probe import mra_probe
from recsys_compress.tasks.train_seqrec import train_seqrec

log = logging.getLogger(__name__)

TASKS = {"train": train_seqrec, "mra_probe": mra_probe, "marc": marc}


def run_task(cfg: DictConfig) -> dict[str, Any]:
    name = cfg.task.name
    if name not in TASKS:
        raise ValueError(f"task.name={name!r} is not a task; allowed: {', '.join(TASKS)}")
    import wandb

    try:
        metrics = TASKS[name](cfg)
    except BaseException:
        log.exception("task %s failed", name)
        # One W&B run per job, marked failed so dashboards do not mistake it for a result.
        if wandb.run is not None:
            wandb.finish(exit_code=1)
        raise
    if wandb.run is not None:
        wandb.finish()
    return metrics
