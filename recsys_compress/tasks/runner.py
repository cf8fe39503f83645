"""Dispatch `train.py` to a task and always close the experiment trackers."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
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
    except BaseException as error:
        log.exception("task %s failed", name)
        # The job's own folder says why it failed (a multirun goes on with the other jobs).
        output_dir = Path(cfg.paths.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "error.txt").write_text(
            f"{type(error).__name__}: {error}\n\n" + "".join(traceback.format_exception(error)))
        # One W&B run per job, marked failed so dashboards do not mistake it for a result.
        if wandb.run is not None:
            wandb.finish(exit_code=1)
        raise
    if wandb.run is not None:
        wandb.finish()
    return metrics
