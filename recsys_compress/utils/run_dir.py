"""One run directory, one run: refuse to overwrite a finished run, resume with the run's own config.

Hydra rewrites ``RUN_DIR/.hydra/config.yaml`` from the current command line before the task
starts, so it cannot tell what an interrupted run was started with. The runner therefore keeps
its own copy, ``RUN_DIR/run_config.yaml`` (the composed config, unresolved, as Hydra saves it),
written when a run starts. ``resume=auto`` restores the run from that file; an override given
on resume that changes it is refused, so a resumed run never silently becomes another run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from recsys_compress.schema import ConfigError

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.yaml"


def holds_results(output_dir: Path) -> list[str]:
    """What a run left in ``output_dir`` that another run would overwrite or mix with."""
    found = []
    if (output_dir / "metrics.json").is_file():
        found.append("metrics.json (a finished run)")
    checkpoints = sorted(p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*.ckpt"))
    if checkpoints:
        found.append("checkpoints (" + ", ".join(checkpoints[:3]) + (", ..." if len(checkpoints) > 3 else "") + ")")
    return found


def _task_overrides() -> list[str]:
    """The command line's task overrides (``key=value``), or none outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _changed_by_overrides(saved: DictConfig, current: DictConfig, overrides: list[str]) -> list[str]:
    changed = []
    for override in overrides:
        key = override.lstrip("+~").partition("=")[0]
        if key == "resume":
            continue
        before = _plain(OmegaConf.select(saved, key, default=None, throw_on_missing=False))
        after = _plain(OmegaConf.select(current, key, default=None, throw_on_missing=False))
        if before != after:
            changed.append(f"{override} (the run has {key}={before!r})" if not isinstance(before, dict)
                           else f"{override} (the run has another {key})")
    return changed


def prepare_run_dir(cfg: DictConfig, rank: int = 0) -> DictConfig:
    """The config this job runs with, after the run directory's rules.

    - A directory that holds a run's results (``metrics.json``, checkpoints) is refused unless
      ``resume=auto``, naming the two ways forward.
    - With ``resume=auto`` and a run's results and ``run_config.yaml`` there, the run continues
      with that config (``resume=auto`` kept); ``.hydra/config.yaml`` is put back to it as well.
    - Otherwise the run starts, and rank 0 records its config in ``run_config.yaml``.
    """
    output_dir = Path(cfg.paths.output_dir)
    saved_path = output_dir / RUN_CONFIG
    # Only a run that left checkpoints has anything to continue (a run that failed at start did not).
    if cfg.get("resume") == "auto" and saved_path.is_file() and holds_results(output_dir):
        saved = OmegaConf.load(saved_path)
        assert isinstance(saved, DictConfig)
        changed = _changed_by_overrides(saved, cfg, _task_overrides())
        if changed:
            raise ConfigError(
                f"resume=auto continues the run in {output_dir} with the config it started with ({saved_path}); "
                f"these overrides would change it: {'; '.join(changed)}. Drop them to resume, or start a new run "
                "in another hydra.run.dir")
        saved.resume = "auto"
        log.info("resuming the run in %s with its saved config (%s)", output_dir, saved_path)
        if rank == 0 and (output_dir / ".hydra").is_dir():
            shutil.copyfile(saved_path, output_dir / ".hydra" / "config.yaml")
        return saved
    if cfg.get("resume") == "auto" and rank == 0:
        log.warning("resume=auto: %s holds no run to continue (%s); starting a new run there", output_dir,
                    f"no {RUN_CONFIG}" if not saved_path.is_file() else "no checkpoint or metrics.json")
    if rank != 0:  # rank 0 has checked the directory and recorded the config
        return cfg
    if cfg.get("resume") != "auto":
        found = holds_results(output_dir)
        if found:
            raise ConfigError(
                f"the run directory {output_dir} already holds a run: {'; '.join(found)}. Choose another "
                "hydra.run.dir (or hydra.sweep.dir for a multirun), or add resume=auto to continue that run")
    output_dir.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(OmegaConf.to_yaml(cfg))
    return cfg


# What a run refused at start leaves: Hydra's record of the command, its log, our copy of the
# config and the error. A folder holding anything else is someone's results and is kept.
REFUSED_RUN_FILES = {".hydra", "train.log", RUN_CONFIG, "error.txt"}


def discard_refused_run_dir(output_dir: str | Path) -> None:
    """Remove the folder of a run refused before it did any work (the message was printed), so
    refused commands leave no empty runs behind (conf/hydra: runs are outputs/TASK/runs/STAMP)."""
    output_dir = Path(output_dir)
    if output_dir.is_dir() and {p.name for p in output_dir.iterdir()} <= REFUSED_RUN_FILES:
        shutil.rmtree(output_dir, ignore_errors=True)


def clear_stale_error(output_dir: str | Path) -> None:
    """A run that finished removes the ``error.txt`` an earlier, interrupted attempt left."""
    (Path(output_dir) / "error.txt").unlink(missing_ok=True)
