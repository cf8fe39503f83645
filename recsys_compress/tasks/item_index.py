"""The item index a run uses: every item's tuple of semantic code tokens, loaded from a published
LC-Rec index, drawn at random (TIGER's ablation) or built by the RQ-VAE tokenizer over the items'
text embeddings (cached by the content of the text, the encoder and every tokenizer setting).
``task=semantic_ids`` reports on one; ``item_ids=semantic`` trains the generative recommender on one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from recsys_compress.tasks.builders import build_encoder
from recsys_compress.data.lcrec import index_stats, read_index, write_index
from recsys_compress.representations.layer_means import cached_layer_means, item_texts
from recsys_compress.schema import ConfigError
from recsys_compress.tasks.config import RunConfig, SemanticRunConfig
from recsys_compress.data.datamodule import NextItemDataModule
from recsys_compress.tokenizers.assign import (
    assign_codes,
    code_tokens,
    codes_from_tokens,
    disambiguate_tiger,
    resolve_collisions_lcrec,
)
from recsys_compress.tokenizers.rqvae import RQVAE, fit_rqvae

log = logging.getLogger(__name__)

# Bump when building changes what a cached index would be.
INDEX_CACHE_VERSION = 1


def collisions_before(index: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """The colliding groups and items of ``index`` before collisions are handled."""
    stats = index_stats(index)
    return {"semantic/colliding_groups_before": stats["colliding_groups"],
            "semantic/colliding_items_before": stats["colliding_items"]}


def index_cache_key(representations: Path, run: SemanticRunConfig) -> str:
    """What a built index depends on: the text embeddings' cache entry (keyed by the encoder's
    weights, the dataset, its items and text template), every tokenizer setting and the seed."""
    material = {"version": INDEX_CACHE_VERSION, "representations": representations.name,
                "semantic": run.semantic.model_dump(), "seed": run.seed}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def build_rqvae_index(run: SemanticRunConfig, item_ids: list[str], texts: list[str],
                      cache_dir: str | Path) -> tuple[dict[str, tuple[str, ...]], dict[str, Any]]:
    """The RQ-VAE index of ``item_ids`` (from the cache when built before), and its figures."""
    s = run.semantic
    encoder = build_encoder(run.representation, cache_dir, run.seed)
    rep = run.representation
    reps, _, rep_path = cached_layer_means(encoder, run.dataset.name, item_ids, texts, rep.template, cache_dir,
                                           rep.batch_size, rep.max_tokens)
    layer = reps.shape[0] - 1 if s.layer == "last" else s.layer
    if not 0 <= layer < reps.shape[0]:
        raise ConfigError(f"semantic.layer={s.layer} is out of range for {rep.model}; allowed: 0..{reps.shape[0] - 1} "
                          "or last")
    folder = Path(cache_dir) / "semantic_ids" / index_cache_key(rep_path, run)
    name = f"{run.dataset.name}.index.json"
    if (folder / "figures.json").is_file():
        log.info("reusing the cached index %s", folder / name)
        return read_index(folder / name), {**json.loads((folder / "figures.json").read_text()), "semantic/cache_hit": 1}
    x = reps[layer].float()
    t0 = time.perf_counter()
    model = RQVAE(x.shape[1], s.levels, s.codebook_size, s.code_dim, tuple(s.hidden), s.commitment, s.kmeans_iters,
                  s.dropout, s.dead_code_ratio)
    losses = fit_rqvae(model, x, s.epochs, s.batch_size, s.lr, run.seed)
    codes = assign_codes(model, x, s.sinkhorn_epsilon, s.sinkhorn_iterations)
    before = collisions_before(dict(zip(item_ids, code_tokens(codes))))
    rounds = 0
    if s.collisions == "lcrec":
        codes, rounds = resolve_collisions_lcrec(model, x, codes, s.collision_rounds, s.sinkhorn_epsilon,
                                                 s.sinkhorn_iterations)
    index = dict(zip(item_ids, code_tokens(codes)))
    if s.collisions == "tiger":
        index = disambiguate_tiger(index)
    figures = {"semantic/reconstruction_error": model.reconstruction_error(x), "semantic/first_loss": losses[0],
               "semantic/last_loss": losses[-1], "semantic/collision_rounds": rounds, **before,
               "time/build_s": time.perf_counter() - t0}
    folder.mkdir(parents=True, exist_ok=True)
    write_index(folder / name, index)
    (folder / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")  # last: marks a complete entry
    return index, {**figures, "semantic/cache_hit": 0}


def item_index(run: SemanticRunConfig, dm: NextItemDataModule, cache_dir: str | Path, unique: bool = False
               ) -> tuple[dict[str, tuple[str, ...]], dict[str, Any], str]:
    """Every item of ``dm`` (in its index order) and its code tuple: loaded
    (``semantic.index_path``), random (``semantic.kind=random``) or built by the RQ-VAE (cached);
    with the figures of its building and a line saying where it came from. ``unique``: items that
    still share a tuple after LC-Rec's re-assignment rounds get TIGER's extra code (a model that
    generates tuples needs one item per tuple); ``semantic/extra_code_groups`` counts them."""
    s = run.semantic
    assert dm.data is not None
    item_ids = list(dm.data.item_ids)
    if s.kind == "rqvae" and s.index_path is None and s.codebook_size > len(item_ids):
        raise ConfigError(f"semantic.codebook_size={s.codebook_size} is larger than the {len(item_ids)} items of "
                          f"{run.dataset.name}; allowed: 2..{len(item_ids)}")
    figures: dict[str, Any] = {}
    if s.index_path is not None:
        index = read_index(s.index_path, item_ids)
        index = {item: index[item] for item in item_ids}
        source = f"loaded {s.index_path}"
    elif s.kind == "random":
        generator = torch.Generator().manual_seed(run.seed)
        index = dict(zip(item_ids, code_tokens(torch.randint(0, s.codebook_size, (len(item_ids), s.levels),
                                                             generator=generator))))
        source = f"random {s.levels} x {s.codebook_size}"
    else:
        infos = dict(zip(item_ids, dm.data.item_info[1:]))
        texts, missing = item_texts(item_ids, {k: v for k, v in infos.items() if v is not None},
                                    run.representation.template)
        if missing == len(item_ids):
            raise ConfigError(f"dataset {run.dataset.name} ({run.dataset.path}) has no item text to embed: "
                              + ("its NAME.item.json is missing" if run.dataset.format == "lcrec_json" else
                                 "no item has a title") + "; load a published index with semantic.index_path, or "
                              "semantic.kind=random")
        if missing:
            log.warning("%d of %d items have no title; they use the text 'Item <id>'", missing, len(item_ids))
        index, figures = build_rqvae_index(run, item_ids, texts, cache_dir)
        source = f"RQ-VAE over {run.representation.model} embeddings"
    if s.index_path is not None or s.kind == "random":
        figures = collisions_before(index)
        index = disambiguate_tiger(index)  # the config allows only tiger without an RQ-VAE
    elif unique:
        left = index_stats(index)["colliding_groups"]
        figures["semantic/extra_code_groups"] = left
        if left:
            log.warning("%d groups of items still share a tuple after semantic.collision_rounds=%d: every tuple "
                        "gets TIGER's extra code", left, s.collision_rounds)
            index = disambiguate_tiger(index)
    return index, figures, source


def item_codes(index: dict[str, tuple[str, ...]], item_ids: list[str]) -> torch.Tensor:
    """``(items + 1) x levels`` codes in ``item_ids``' order (row 0, the padding item: zeros)."""
    codes = codes_from_tokens([index[item] for item in item_ids])
    return torch.cat([torch.zeros(1, codes.shape[1], dtype=torch.long), codes])


def run_item_codes(run: RunConfig, dm: NextItemDataModule, cache_dir: str | Path, write_to: Path | None = None
                   ) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """A training run's item codes (None for item_ids=atomic: one token per item) and the index's
    figures for its metrics; the index is also written to ``write_to/<dataset>.index.json`` in
    LC-Rec's format (what the run trained on, for LC-Rec/TIGER code or a later load)."""
    if run.item_ids == "atomic":
        return None, {}
    assert run.semantic is not None and run.representation is not None  # RunConfig.check
    index, figures, source = item_index(SemanticRunConfig(seed=run.seed, dataset=run.dataset,
                                                          representation=run.representation, semantic=run.semantic),
                                        dm, cache_dir, unique=True)
    assert dm.data is not None
    codes = item_codes(index, list(dm.data.item_ids))
    log.info("item ids: %d items as tuples of %d codes (%s)", dm.n_items, codes.shape[1], source)
    if write_to is not None:
        write_index(Path(write_to) / f"{run.dataset.name}.index.json", index)
    return codes, {**{f"semantic/{k}": v for k, v in index_stats(index).items()}, **figures}
