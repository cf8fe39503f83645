"""Multirun sweeps of multi-process (DDP) jobs: each job once, with its ranks joined.

Lightning starts ranks 1..N-1 of a job by re-running the command line of the process. In a
multirun that command line holds ``-m`` and every swept value, so each extra rank would run
the whole sweep itself (lightning-hydra-template #393): jobs twice, summaries doubled, ranks in
step only by luck. Here rank 0 records the job it is running (its overrides and run directory)
in the environment its ranks inherit; ``train.py`` turns a rank started that way into a single
run of exactly that job (``rank_command_line``). When the job ends, rank 0 waits for its ranks,
ends any left behind by a failure, and clears what Lightning's launcher set in the environment,
so the next job starts its own ranks.

Processes started by a cluster (SLURM tasks through submitit, torchrun) are created outside
Lightning: every such process runs its own job function and nothing here is involved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence

from omegaconf import DictConfig

from recsys_compress.utils.overrides import path_override

log = logging.getLogger(__name__)

JOB_ENV = "RECSYS_DDP_JOB"
# What Lightning's subprocess launcher puts in the environment of rank 0 when it starts the ranks.
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_RANK_JOB_NAME = "train_ddp_process_"  # hydra.job.name Lightning gives the ranks it starts
_RANK_EXIT_WAIT_S = 120


def multi_process(cfg: DictConfig) -> bool:
    """Whether the trainer runs several processes (decided by config: rank 0 learns it late)."""
    strategy = str(cfg.trainer.get("strategy", "auto"))
    return strategy.startswith(("ddp", "fsdp")) or cfg.trainer.get("devices", 1) not in (1, "1")


def rank_command_line(argv: Sequence[str]) -> list[str] | None:
    """For a rank > 0 that Lightning started inside a multirun job: the single-run command line
    of that job (its overrides and run directory); None for every other process."""
    job, rank = os.environ.get(JOB_ENV), os.environ.get("LOCAL_RANK")
    if not job or rank in (None, "0"):
        return None
    spec = json.loads(job)
    return [argv[0], *spec["overrides"], path_override("hydra.run.dir", spec["run_dir"]), "hydra.output_subdir=null",
            f"hydra.job.name={_RANK_JOB_NAME}{rank}"]


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _end_ranks(failed: bool) -> None:
    """Wait for the ranks this job started to exit (end them at once when the job failed: they
    may be blocked in a collective that rank 0 will never join)."""
    import psutil

    ranks = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if any(arg.startswith(f"hydra.job.name={_RANK_JOB_NAME}") for arg in child.cmdline()):
                ranks.append(child)
    if failed:
        for rank in ranks:
            with contextlib.suppress(psutil.Error):
                rank.kill()
    _, alive = psutil.wait_procs(ranks, timeout=_RANK_EXIT_WAIT_S)
    for rank in alive:
        log.warning("rank process %d did not exit %d s after its job; killing it", rank.pid, _RANK_EXIT_WAIT_S)
        with contextlib.suppress(psutil.Error):
            rank.kill()


@contextlib.contextmanager
def ddp_job(cfg: DictConfig) -> Iterator[None]:
    """Around one job on the process that runs the sweep: its ranks run this job only."""
    if not (multi_process(cfg) and "LOCAL_RANK" not in os.environ and _in_multirun()):
        yield
        return
    from hydra.core.hydra_config import HydraConfig

    before = {key: os.environ.get(key) for key in _LAUNCHER_ENV}
    os.environ[JOB_ENV] = json.dumps({"overrides": list(HydraConfig.get().overrides.task),
                                      "run_dir": str(cfg.paths.output_dir)})
    failed = True
    try:
        yield
        failed = False
    finally:
        _end_ranks(failed)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.pop(JOB_ENV, None)
        for key, value in before.items():  # as before the job: the next job's trainer starts its own ranks
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
