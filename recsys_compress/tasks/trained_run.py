"""A finished ``train.py`` run's trained base model, for the scripts that measure it again.

The tools over finished runs (``recsys-compression-table``, ``experiments/bench_ondevice.py --base-run``) take a run
folder, compose the run's own command line (``RUN_DIR/.hydra/overrides.yaml``) and put the
weights it trained into a freshly built model: the cached base model when the run compressed
one (``base/cache_key`` in its metrics.json: the exact model it compressed, LoRA adapters
already merged), otherwise its best validation checkpoint, whose adapters are merged here.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from recsys_compress.tasks.config import RunConfig
from recsys_compress.models.base_cache import cache_folder, load_base
from recsys_compress.models.finetune import add_lora, merge_lora


def run_overrides(run_dir: str | Path) -> list[str]:
    """The command-line overrides the run was started with."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a train.py run folder: {path} is missing")
    return [str(o) for o in OmegaConf.load(path)]


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's best validation checkpoint (``checkpoints/epochNNN.ckpt``), if it kept one."""
    candidates = sorted((Path(run_dir) / "checkpoints").glob("epoch*.ckpt"))
    return candidates[-1] if candidates else None


def load_trained_base(run_dir: str | Path, lit: L.LightningModule, cache_dir: str, run: RunConfig) -> str:
    """Put the run's trained base model into ``lit`` (built from the run's config); returns
    where the weights came from."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    key = json.loads(metrics_path.read_text()).get("base/cache_key") if metrics_path.is_file() else None
    if key is not None and load_base(cache_dir, key, lit.model) is not None:
        return str(cache_folder(cache_dir, key))
    ckpt = best_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(
            f"{run_dir}: no cached base model named by base/cache_key in its metrics.json (looked in "
            f"{cache_dir}/base_models) and no checkpoints/epoch*.ckpt (best validation checkpoint)")
    if run.model.finetune == "lora":
        add_lora(lit.model, run.model.lora)
    lit.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    if run.model.finetune == "lora":
        merge_lora(lit.model)
    return str(ckpt)
