"""Dispatch `train.py` to a task and always close the experiment trackers."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from recsys_compress.config import ConfigError
from recsys_compress.data.readers import DataFormatError
from recsys_compress.tasks.marc import marc
from recsys_compress.tasks.mra_probe import mra_probe
from recsys_compress.tasks.proxy import proxy
from recsys_compress.tasks.train_seqrec import train_seqrec
from recsys_compress.utils.ddp_sweep import ddp_job
from recsys_compress.utils.run_dir import clear_stale_error, prepare_run_dir
from recsys_compress.utils.run_outputs import global_rank

log = logging.getLogger(__name__)

TASKS = {"train": train_seqrec, "mra_probe": mra_probe, "marc": marc, "proxy": proxy}
# Errors in what the user gave (config values, data files): their message says everything, so
# they are reported without a traceback.
USER_ERRORS = (ConfigError, DataFormatError)
# The exit status of a process ended by SIGTERM (128 + 15): schedulers (SLURM pre-emption, a
# shell loop) must see an interrupted run as interrupted, not as a success.
SIGTERM_EXIT = 143


def run_task(cfg: DictConfig) -> dict[str, Any]:
    """Run the task ``cfg.task.name``; a failure leaves ``error.txt`` and a failed W&B run.

    Raises the task's exception, except for SIGTERM, which becomes ``SystemExit(143)``.
    """
    name = cfg.task.name
    if name not in TASKS:
        raise ConfigError(f"task.name={name!r} is not a task; allowed: {', '.join(TASKS)}")
    import wandb

    try:
        cfg = prepare_run_dir(cfg, global_rank())
        with ddp_job(cfg):  # in a multirun, the job's other ranks run this job only
            metrics = TASKS[name](cfg)
    except BaseException as error:
        if isinstance(error, USER_ERRORS):
            log.error("%s: %s", type(error).__name__, error)
        elif isinstance(error, SIGTERMException):
            log.error("interrupted by SIGTERM; continue with hydra.run.dir=%s resume=auto", cfg.paths.output_dir)
        else:
            log.exception("task %s failed", name)
        # The job's own folder says why it failed (a multirun goes on with the other jobs).
        if global_rank() == 0:
            output_dir = Path(cfg.paths.output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "error.txt").write_text(
                f"{type(error).__name__}: {error}\n\n" + "".join(traceback.format_exception(error)))
        # One W&B run per job, marked failed so dashboards do not mistake it for a result.
        if wandb.run is not None:
            wandb.finish(exit_code=1)
        if isinstance(error, SIGTERMException):
            raise SystemExit(SIGTERM_EXIT) from error
        raise
    if wandb.run is not None:
        wandb.finish()
    if global_rank() == 0:
        clear_stale_error(cfg.paths.output_dir)
    return metrics
