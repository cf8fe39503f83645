"""``task=semantic_ids``: give every item of a dataset a tuple of semantic code tokens.

Built by the RQ-VAE tokenizer over the items' text embeddings (cached by the content of the
text, the encoder and every tokenizer setting), loaded from a published LC-Rec index, or drawn
at random (TIGER's ablation), as ``tasks/item_index.py`` does it for every run. Writes
``RUN_DIR/<dataset>.index.json`` in LC-Rec's format and reports reconstruction error, each
level's codebook usage, collisions before and after their handling, and the build time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from rich.console import Console

from recsys_compress.data.lcrec import index_stats, write_index
from recsys_compress.tasks.builders import build_datamodule
from recsys_compress.tasks.config import validate_semantic
from recsys_compress.tasks.item_index import item_index
from recsys_compress.utils.instantiators import instantiate_loggers
from recsys_compress.utils.run_outputs import finish_run


def semantic_ids(cfg: DictConfig) -> dict[str, Any]:
    run = validate_semantic(cfg)
    s = run.semantic
    output_dir = Path(cfg.paths.output_dir)
    torch.manual_seed(run.seed)
    dm = build_datamodule(run.dataset, run.seed)
    loggers = instantiate_loggers(cfg)
    t0 = time.perf_counter()
    index, figures, source = item_index(run, dm, cfg.paths.cache_dir)
    metrics: dict[str, Any] = {**{f"semantic/{k}": v for k, v in index_stats(index).items()}, **figures,
                               "data/name": run.dataset.name, "seed": run.seed,
                               "semantic/kind": "loaded" if s.index_path else s.kind,
                               "semantic/collisions": s.collisions, "time/total_s": time.perf_counter() - t0}
    path = write_index(output_dir / f"{run.dataset.name}.index.json", index)
    finish_run(output_dir, metrics, loggers)
    usage = ", ".join(f"{int(metrics[f'semantic/level_{lv}/codes_used'])} "
                      f"({metrics[f'semantic/level_{lv}/perplexity']:.0f})" for lv in range(int(metrics["semantic/levels"])))
    recon = metrics.get("semantic/reconstruction_error")
    Console().print(
        f"[bold]{run.dataset.name}: {int(metrics['semantic/items'])} items -> {int(metrics['semantic/tuples'])} tuples "
        f"({source}); codes used (perplexity) per level: {usage}; colliding groups "
        f"{int(metrics['semantic/colliding_groups_before'])} -> {int(metrics['semantic/colliding_groups'])}"
        + (f"; reconstruction error {recon:.3f}" if recon is not None else "") + f"[/bold]\nindex -> {path}",
        highlight=False, soft_wrap=True)
    return metrics
