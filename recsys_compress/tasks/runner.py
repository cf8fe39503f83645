"""Dispatch `train.py` to a task and always close the experiment trackers.

This module imports nothing heavy: the config is validated first and the task (with torch,
Lightning and transformers) is imported after, so a wrong value fails in a few seconds.
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from recsys_compress.schema import ConfigError
from recsys_compress.tasks.config import validate_task
from recsys_compress.data.readers import DataFormatError
from recsys_compress.utils.run_dir import clear_stale_error, prepare_run_dir
from recsys_compress.utils.run_outputs import global_rank

log = logging.getLogger(__name__)

# Each task's function, as "module:function", imported when the task runs.
TASKS = {"train": "recsys_compress.tasks.train_seqrec:train_seqrec",
         "mra_probe": "recsys_compress.tasks.mra_probe:mra_probe",
         "marc": "recsys_compress.tasks.marc:marc",
         "proxy": "recsys_compress.tasks.proxy:proxy",
         "semantic_ids": "recsys_compress.tasks.semantic_ids:semantic_ids"}
# Errors in what the user gave (config values, data files): their message says everything, so
# they are reported without a traceback.
USER_ERRORS = (ConfigError, DataFormatError)
# The exit status of a process ended by SIGTERM (128 + 15) or Ctrl-C (SIGINT, 128 + 2): schedulers
# (SLURM pre-emption, a shell loop) must see an interrupted run as interrupted, not as a success.
SIGTERM_EXIT = 143
SIGINT_EXIT = 130


def interruption(error: BaseException) -> str | None:
    """``SIGTERM`` or ``Ctrl-C`` when ``error`` is how a run was interrupted, else None. Lightning
    turns Ctrl-C inside a Trainer into ``SystemExit(1)`` raised while handling the
    KeyboardInterrupt, after its own one-line "graceful shutdown" notice."""
    if type(error).__name__ == "SIGTERMException" and type(error).__module__.startswith("lightning"):
        return "SIGTERM"
    if isinstance(error, KeyboardInterrupt) or (
            isinstance(error, SystemExit) and isinstance(error.__context__, KeyboardInterrupt)):
        return "Ctrl-C"
    return None


def resume_hint(output_dir: Path) -> str:
    """Where an interrupted run's checkpoint is and the command that continues it."""
    last = output_dir / "checkpoints" / "last.ckpt"
    where = f"its last checkpoint is {last}" if last.is_file() else "it left no checkpoint (it had not finished an epoch)"
    return f"{where}; continue with: python3 train.py hydra.run.dir={output_dir} resume=auto"


def log_lightning_once() -> None:
    """``import lightning`` gives the ``lightning`` logger a console handler of its own, while its
    records also reach the root logger's handlers (Hydra's console and ``train.log``): every
    Lightning line twice. Where the root logger has handlers, keep only those."""
    if not logging.getLogger().handlers:
        return
    lightning_logger = logging.getLogger("lightning")
    for handler in list(lightning_logger.handlers):
        if type(handler) is logging.StreamHandler:
            lightning_logger.removeHandler(handler)


def run_task(cfg: DictConfig) -> dict[str, Any]:
    """Run the task ``cfg.task.name``; a failure leaves ``error.txt`` and a failed W&B run.

    Raises the task's exception, except for SIGTERM, which becomes ``SystemExit(143)``.
    """
    name = cfg.task.name
    if name not in TASKS:
        raise ConfigError(f"task.name={name!r} is not a task; allowed: {', '.join(TASKS)}")
    try:
        cfg = prepare_run_dir(cfg, global_rank())
        validate_task(cfg)  # before the task's heavy imports
        module, function = TASKS[name].split(":")
        task = getattr(importlib.import_module(module), function)
        log_lightning_once()
        from recsys_compress.utils.ddp_sweep import ddp_job

        with ddp_job(cfg):  # in a multirun, the job's other ranks run this job only
            metrics = task(cfg)
    except BaseException as error:
        output_dir = Path(cfg.paths.output_dir)
        interrupted = interruption(error)
        if isinstance(error, USER_ERRORS):
            log.error("%s: %s", type(error).__name__, error)
        elif interrupted:
            log.error("interrupted by %s: %s", interrupted, resume_hint(output_dir))
        else:
            log.exception("task %s failed", name)
        # The job's own folder says why it failed (a multirun goes on with the other jobs).
        if global_rank() == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            what = f"interrupted by {interrupted}" if interrupted else f"{type(error).__name__}: {error}"
            (output_dir / "error.txt").write_text(
                f"{what}\n\n" + "".join(traceback.format_exception(error)))
        # One W&B run per job, marked failed so dashboards do not mistake it for a result.
        wandb = sys.modules.get("wandb")  # not loaded: no run to close
        if wandb is not None and wandb.run is not None:
            wandb.finish(exit_code=1)
        if interrupted:
            raise SystemExit(SIGTERM_EXIT if interrupted == "SIGTERM" else SIGINT_EXIT) from None
        raise
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
    if global_rank() == 0:
        clear_stale_error(cfg.paths.output_dir)
    return metrics
