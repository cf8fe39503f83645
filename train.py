"""Entry point: `python train.py [group=option ...] [key=value ...]` (see README.md)."""

import os

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", os.path.dirname(os.path.abspath(__file__)))
# W&B is offline unless the user opts in (WANDB_MODE=online); no account or network needed.
os.environ.setdefault("WANDB_MODE", "offline")
# ... and quiet: its end-of-run history and summary (~40 lines) would bury the run's own answer,
# which the task prints last (WANDB_QUIET=false brings them back; `wandb leet` shows a run).
os.environ.setdefault("WANDB_QUIET", "true")

from recsys_compress.tasks.config import register_schemas

# Every group's defaults come from its schema (GROUP/base); also in jobs a launcher starts anew.
register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from recsys_compress.tasks.runner import USER_ERRORS, run_task
    from recsys_compress.utils.run_dir import discard_refused_run_dir

    try:
        metrics = run_task(cfg)
    except USER_ERRORS:
        # The runner has printed the message; a single run ends there, without Hydra printing
        # it again with a traceback, and without leaving an empty run folder behind. In a
        # multirun the job fails (its folder says why) and the other jobs go on.
        if HydraConfig.get().mode == RunMode.RUN:
            discard_refused_run_dir(cfg.paths.output_dir)
            raise SystemExit(1) from None
        raise
    # Sweepers (Optuna) maximise the value returned here: a validation metric of the task's
    # final model (val NDCG@10, or val AUC for the CTR tasks), never a test metric.
    return metrics.get("objective")


if __name__ == "__main__":
    import sys

    from recsys_compress.utils.ddp_sweep import rank_command_line
    from recsys_compress.utils.plugins import missing_plugin

    problem = missing_plugin(sys.argv[1:])
    if problem:
        sys.exit(f"error: {problem}")
    # A DDP rank that Lightning started for one job of a multirun runs that job alone, not the sweep.
    sys.argv = rank_command_line(sys.argv) or sys.argv
    main()
