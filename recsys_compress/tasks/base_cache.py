"""Cache of trained base models, so a compression sweep (methods x ratios) trains once.

The key hashes everything that determines the base model: dataset, model, trainer and
model-selection settings, evaluation and seed (not compression, ratio, loggers or paths).
An entry is written to a temporary folder and renamed into place, so a concurrent job
never reads a half-written one; ``base_model_lock`` makes jobs that need the same base model
wait for the one training it, so it is trained once.
"""

from __future__ import annotations

import hashlib
import json
import os
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_model, save_model
from torch import nn

log = logging.getLogger(__name__)

# Bump when training code changes what a cached base model would be.
CACHE_VERSION = 2  # 2: epoch-seeded training order
_IGNORED_CALLBACKS = {"progress_bar", "lr_monitor"}


def base_model_key(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """Hash of the config parts that determine the trained base model, and those parts."""
    c = OmegaConf.to_container(cfg, resolve=True)
    trainer = {k: v for k, v in c.get("trainer", {}).items() if k != "default_root_dir"}
    callbacks = {
        k: {kk: vv for kk, vv in v.items() if kk not in ("dirpath",)}
        for k, v in (c.get("callbacks") or {}).items() if k not in _IGNORED_CALLBACKS
    }
    material = {
        "version": CACHE_VERSION,
        "dataset": c["dataset"],
        "model": c["model"],
        "trainer": trainer,
        "callbacks": callbacks,
        "evaluation": c.get("evaluation"),
        "seed": c.get("seed"),
        "ckpt_path": c.get("ckpt_path"),
    }
    # Data and model files are named by path; their contents are assumed stable.
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return digest, material


def cache_folder(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / "base_models" / key


def load_base(cache_dir: str | Path, key: str, model: nn.Module) -> dict[str, Any] | None:
    """Load cached weights into ``model``; returns the cached base metrics, or None on a miss."""
    folder = cache_folder(cache_dir, key)
    if not (folder / "metrics.json").is_file():
        return None
    load_model(model, str(folder / "model.safetensors"), strict=True)
    return json.loads((folder / "metrics.json").read_text())


def store_base(
    cache_dir: str | Path, key: str, material: dict[str, Any], model: nn.Module, metrics: dict[str, Any]
) -> Path:
    folder = cache_folder(cache_dir, key)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    (tmp / "key.json").write_text(json.dumps(material, indent=2, sort_keys=True, default=str) + "\n")
    # metrics.json last: its presence marks a complete entry
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    try:
        tmp.rename(folder)
    except OSError:  # another job stored the same base model first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextmanager
def base_model_lock(cache_dir: str | Path, key: str) -> Iterator[None]:
    """An exclusive lock on one cache entry across processes (and SLURM jobs on a shared disk)."""
    path = Path(cache_dir) / "locks" / f"base_model-{key}.lock"  # beside, not inside, the entries
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename still prevents half-written reads
        yield
        return
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another job is training base model %s; waiting for it", key)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
