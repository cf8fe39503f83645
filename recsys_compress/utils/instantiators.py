"""Objects from the ``_target_`` groups of the config (loggers, callbacks), as tasks build them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a logger/callbacks group (none: [])."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def instantiate_callbacks(cfg: DictConfig, loggers: list, checkpoint_dir: str | Path | None = None) -> list[L.Callback]:
    """The run's ``callbacks`` group; ``checkpoint_dir``: where its ModelCheckpoint writes (one
    folder per model a task trains). Without loggers, LearningRateMonitor is left out: it
    refuses to start without one (logger=none)."""
    callbacks = []
    for cb in instantiate_group(cfg.get("callbacks")):
        if isinstance(cb, ModelCheckpoint) and checkpoint_dir is not None:
            cb.dirpath = str(checkpoint_dir)
        if isinstance(cb, LearningRateMonitor) and not loggers:
            continue
        callbacks.append(cb)
    return callbacks
