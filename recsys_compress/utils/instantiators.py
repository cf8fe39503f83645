"""Objects from the ``_target_`` groups of the config (trainer, loggers, callbacks), as tasks build them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a logger/callbacks group (none: [])."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def instantiate_callbacks(group: DictConfig | None, loggers: list,
                          checkpoint_dir: str | Path | None = None) -> list[L.Callback]:
    """The run's ``callbacks`` group; ``checkpoint_dir``: where its ModelCheckpoint writes (one
    folder per model a task trains). Without loggers, LearningRateMonitor is left out: it
    refuses to start without one (logger=none)."""
    callbacks = []
    for cb in instantiate_group(group):
        if isinstance(cb, ModelCheckpoint) and checkpoint_dir is not None:
            cb.dirpath = str(checkpoint_dir)
        if isinstance(cb, LearningRateMonitor) and not loggers:
            continue
        callbacks.append(cb)
    return callbacks


class Trainers:
    """Lightning Trainers from the run's ``trainer`` and ``callbacks`` groups, logging to its
    loggers: what a task hands to the layers below instead of the raw config, so that every
    model a run trains (base, alignment, CTR, MARC) runs on the same accelerator, precision
    and limits."""

    def __init__(self, cfg: DictConfig, loggers: list | None = None) -> None:
        self.trainer_group: DictConfig = cfg.trainer
        self.callbacks_group: DictConfig | None = cfg.get("callbacks")
        self.loggers: list = loggers or []

    def callbacks(self, checkpoint_dir: str | Path | None = None) -> list[L.Callback]:
        """Fresh instances of the configured callbacks, the ModelCheckpoint writing to ``checkpoint_dir``."""
        return instantiate_callbacks(self.callbacks_group, self.loggers, checkpoint_dir)

    def __call__(self, callbacks: list[L.Callback] | None = None, checkpoint_dir: str | Path | None = None,
                 **overrides: Any) -> L.Trainer:
        """A Trainer with ``callbacks`` (None: the configured ones, see ``callbacks()``);
        ``overrides`` win over the trainer group (``logger`` included)."""
        if callbacks is None:
            callbacks = self.callbacks(checkpoint_dir)
        return instantiate(self.trainer_group, **{"logger": self.loggers or False, "callbacks": callbacks,
                                                   **overrides})


def place(module: torch.nn.Module, trainer: L.Trainer) -> torch.nn.Module:
    """``module`` on ``trainer``'s device, cast to its precision's dtype (bf16-true: bf16), for work
    done on it outside ``fit``/``test`` (compression): Lightning does both only inside them, and
    its teardown leaves the module on the CPU after each."""
    module.to(trainer.strategy.root_device)
    trainer.precision_plugin.convert_module(module)
    return module


def instantiate_loggers(cfg: DictConfig, **extra_hparams: Any) -> list[Any]:
    """The run's ``logger`` group, each logger given the resolved config (and ``extra_hparams``)
    as its hyper-parameters: what a dashboard groups and filters runs by."""
    loggers = instantiate_group(cfg.get("logger"))
    if loggers:
        hparams = {**OmegaConf.to_container(cfg, resolve=True), **extra_hparams}
        for lg in loggers:
            lg.log_hyperparams(hparams)
    return loggers
