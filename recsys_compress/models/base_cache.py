"""Cache of trained base models, so a compression sweep (methods x ratios) trains once.

The key hashes everything that determines the base model: dataset, model, trainer and
model-selection settings, evaluation and seed (not compression, ratio, loggers or paths),
and the *content* of the data and model files (a path says nothing about an in-place edit).
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
from safetensors import SafetensorError, safe_open
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from recsys_compress.utils.fingerprint import content_fingerprint

log = logging.getLogger(__name__)

# Bump when training code changes what a cached base model would be.
CACHE_VERSION = 3  # 2: epoch-seeded training order; 3: data and model file contents in the key, per-user test
_IGNORED_CALLBACKS = {"progress_bar", "lr_monitor", "last_checkpoint"}  # they do not change the model


def base_model_key(cfg: DictConfig, item_codes: torch.Tensor | None = None) -> tuple[str, dict[str, Any]]:
    """Hash of the config parts that determine the trained base model, and those parts; with
    ``item_codes`` (item_ids=semantic), of the items' code tuples too (a rebuilt index with other
    codes is another model, whatever setting produced it)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    cache_dir = c["paths"]["cache_dir"]
    model_files = [c["model"].get(k) for k in ("pretrained_path", "gguf_path")]
    trainer = {k: v for k, v in c.get("trainer", {}).items() if k != "default_root_dir"}
    callbacks = {
        k: {kk: vv for kk, vv in v.items() if kk not in ("dirpath",)} if isinstance(v, dict) else v
        for k, v in (c.get("callbacks") or {}).items() if k not in _IGNORED_CALLBACKS
    }
    material = {
        "version": CACHE_VERSION,
        "dataset": c["dataset"],
        "model": c["model"],
        "trainer": trainer,
        "callbacks": callbacks,
        # evaluation.decoding is a test-time choice (validation always decodes with the trie)
        "evaluation": {k: v for k, v in (c.get("evaluation") or {}).items() if k != "decoding"},
        "seed": c.get("seed"),
        "ckpt_path": c.get("ckpt_path"),
        "data_sha256": content_fingerprint(c["dataset"]["path"], cache_dir),
        "model_files_sha256": [content_fingerprint(p, cache_dir) if p else None for p in model_files],
    }
    if item_codes is not None:
        material["item_ids"] = c.get("item_ids")
        material["item_codes_sha256"] = hashlib.sha256(item_codes.cpu().numpy().tobytes()).hexdigest()
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return digest, material


def cache_folder(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / "base_models" / key


def _check_shapes(path: Path, model: nn.Module) -> None:
    """Refuse a weights file whose tensors do not fit ``model`` before loading any of them."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(path), "pt") as f:  # reads the header: a truncated file fails here
        for name in f.keys():
            shape = tuple(f.get_slice(name).get_shape())
            if name not in expected or expected[name] != shape:
                raise ValueError(f"tensor {name} has shape {shape}, the model has "
                                 f"{expected.get(name, 'no such tensor')}")


def load_base(cache_dir: str | Path, key: str, model: nn.Module) -> dict[str, Any] | None:
    """Load cached weights into ``model``; returns the cached base metrics, or None on a miss.

    An entry that cannot be read (a truncated file, weights of another shape) is reported by
    path and removed, so the caller trains the base model again and stores a sound entry;
    ``model`` is untouched in that case.
    """
    folder = cache_folder(cache_dir, key)
    if not (folder / "metrics.json").is_file():
        return None
    weights = folder / "model.safetensors"
    try:
        _check_shapes(weights, model)
        metrics = json.loads((folder / "metrics.json").read_text())
        load_model(model, str(weights), strict=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        log.warning("the cached base model %s is unreadable (%s: %s); removing it and training the base "
                    "model again (base_cache=false bypasses the cache)", folder, type(error).__name__, error)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return metrics


def store_base(
    cache_dir: str | Path, key: str, material: dict[str, Any], model: nn.Module, metrics: dict[str, Any],
    test_per_user: torch.Tensor | None = None,
) -> Path:
    """``test_per_user``: the base model's per-user test NDCG@10, kept for paired intervals."""
    folder = cache_folder(cache_dir, key)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    if test_per_user is not None:
        save_file({"ndcg@10": test_per_user.contiguous()}, str(tmp / "test_per_user.safetensors"))
    (tmp / "key.json").write_text(json.dumps(material, indent=2, sort_keys=True, default=str) + "\n")
    # metrics.json last: its presence marks a complete entry
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    try:
        tmp.rename(folder)
    except OSError:  # another job stored the same base model first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_base_test_per_user(cache_dir: str | Path, key: str) -> torch.Tensor | None:
    """The cached base model's per-user test NDCG@10 (None for an entry stored without it)."""
    path = cache_folder(cache_dir, key) / "test_per_user.safetensors"
    return load_file(str(path))["ndcg@10"] if path.is_file() else None


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
