"""``task=proxy``: fine-tune the LLM's top blocks with a proxy objective, save the encoder, and
test the proxy's own deployed code (its compressed final layer) in a fresh CTR model.

The saved encoder (``RUN_DIR/encoder``) is read by every representation consumer through
``representation.encoder_run=RUN_DIR``: the MRA probe at any layer (``probe.layer=all`` draws
the curve of the fine-tuned LLM) and MARC. The objectives are in
``recsys_compress/representations/proxy.py``; training uses the CTR training split only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from rich.console import Console
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from recsys_compress.tasks.builders import build_ctr_datamodule, build_encoder
from recsys_compress.representations.config import proxy_encoder_identity
from recsys_compress.schema import ConfigError
from recsys_compress.tasks.config import validate_proxy
from recsys_compress.ctr.fit import ctr_fields, fit_ctr
from recsys_compress.ctr.model import RepresentationCompressor
from recsys_compress.representations.proxy import (ProxyModule, chance_loss, held_out_pairs, proxy_texts,
                                                   proxy_token_ids, proxy_token_states, save_proxy_encoder,
                                                   settings_off_default)
from recsys_compress.representations.token_states import llama_top
from recsys_compress.utils.instantiators import Trainers, instantiate_loggers
from recsys_compress.utils.run_outputs import finish_run

log = logging.getLogger(__name__)


def proxy(cfg: DictConfig) -> dict[str, Any]:
    run = validate_proxy(cfg)
    p, rep, d = run.proxy, run.representation, run.dataset
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(run.seed, workers=True)
    dm = build_ctr_datamodule(run)
    data = dm.data

    encoder = build_encoder(rep, cfg.paths.cache_dir, run.seed)
    n = encoder.n_layers
    if p.trainable_layers > n:
        raise ConfigError(f"proxy.trainable_layers={p.trainable_layers} is out of range for {rep.model}; "
                          f"allowed: 1..{n}")
    below = n - p.trainable_layers
    hidden = encoder.model.config.hidden_size
    if p.objective == "ntp" and p.dim > hidden:
        raise ConfigError(f"proxy.dim={p.dim} exceeds {rep.model}'s hidden size {hidden}: ntp's code is the "
                          f"final layer's principal components; allowed: 1..{hidden}")
    t0 = time.perf_counter()
    texts = proxy_texts(data, rep)
    (item_states, item_mask, item_hit, item_path), (user_states, user_mask, user_hit, user_path) = \
        proxy_token_states(encoder, data, texts, rep, d.name, below, cfg.paths.cache_dir)
    extract_s = time.perf_counter() - t0
    top = llama_top(encoder, p.trainable_layers)

    users, items, labels = data.splits["train"]
    positives = labels > 0.5
    pairs = TensorDataset(users[positives], items[positives])
    if len(pairs) < p.batch_size:
        raise ConfigError(f"proxy.batch_size={p.batch_size} exceeds the {len(pairs)} positive training pairs")
    loader = DataLoader(pairs, batch_size=p.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(run.seed))
    ntp: dict[str, Any] = {}
    if p.objective == "ntp":
        item_tokens, user_tokens = proxy_token_ids(encoder, texts, rep)
        if not encoder.model.config.tie_word_embeddings:
            log.warning("proxy.objective=ntp reads out through the input embeddings, but %s does not tie them "
                        "to its LM head (which AutoModel does not load): the next-token loss is a stand-in",
                        rep.model)
        ntp = {"item_tokens": item_tokens, "user_tokens": user_tokens,
               "readout": encoder.model.get_input_embeddings().weight}
    module = ProxyModule(top, hidden, item_states, item_mask, user_states, user_mask, p, **ntp)
    val_users, val_items = held_out_pairs(data.splits["val"], p.val_pairs, p.batch_size, run.seed)
    val_loss_before = module.held_out_loss(val_users, val_items)

    trainers = Trainers(cfg, instantiate_loggers(cfg))
    trainer: L.Trainer = trainers(callbacks=[], max_steps=p.steps, max_epochs=-1, min_epochs=None,
                                  enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    train_s = time.perf_counter() - t0
    val_loss = module.held_out_loss(val_users, val_items)
    if p.objective == "ntp":  # it trains no code: the head becomes the PCA of the training items' final layer
        module.pca_head(items.unique(), users.unique())
    encoder_vocab = encoder.model.get_input_embeddings().num_embeddings
    save_proxy_encoder(output_dir, module, encoder,
                       {"objective": p.objective, "dim": p.dim, "trained_on": proxy_encoder_identity(run),
                        "settings_off_default": settings_off_default(p.model_dump())})
    codes = module.item_codes()
    save_file({"mu": codes.contiguous()}, str(output_dir / "item_codes.safetensors"),
              metadata={"kind": f"proxy {p.objective}", "dim": str(p.dim)})
    del encoder

    # The proxy's deployment: a fresh CTR model that sees only the cached final-layer codes.
    t0 = time.perf_counter()
    deployed = fit_ctr(trainers, run.ctr, run.seed, dm, RepresentationCompressor(codes, "fixed"),
                       output_dir / "checkpoints" / "deployed")
    window = max(1, min(20, len(module.losses) // 5))
    metrics: dict[str, Any] = {
        "test/auc": deployed["test/auc"], "test/logloss": deployed["test/logloss"],
        "val/best_auc": deployed.get("val/best_auc", float("nan")),
        "proxy/objective": p.objective, "proxy/dim": p.dim, "proxy/steps": p.steps,
        "proxy/trainable_layers": p.trainable_layers, "proxy/pairs": len(pairs),
        # mean loss over the first and the last steps (a window of up to 20)
        "proxy/first_loss": sum(module.losses[:window]) / window,
        "proxy/last_loss": sum(module.losses[-window:]) / window,
        "proxy/val_loss_before": val_loss_before, "proxy/val_loss": val_loss, "proxy/val_pairs": len(val_users),
        "proxy/chance_loss": chance_loss(p.objective, p.batch_size, p.mrl_levels, encoder_vocab),
        "repr/encoder": rep.model, "repr/items_without_text": texts.missing, "data/name": d.name,
        **{f"repr/{k}": v for k, v in texts.counts.items()}, **ctr_fields(run.ctr), "seed": run.seed,
        "repr/cache_hit": int(item_hit and user_hit),
        "repr/cache_mb": (item_path.stat().st_size + user_path.stat().st_size) / 2**20,
        "time/extract_s": 0.0 if item_hit and user_hit else extract_s, "time/proxy_train_s": train_s,
        "time/deploy_train_s": time.perf_counter() - t0,
        **{f"data/{k}": v for k, v in data.stats().items()},
    }
    metrics["objective"] = metrics["val/best_auc"]  # what hyper-parameter searches maximise
    path = finish_run(output_dir, metrics, trainers.loggers)
    Console().print(f"[bold]proxy {p.objective} (dim {p.dim}): loss {metrics['proxy/first_loss']:.3f} -> "
                    f"{metrics['proxy/last_loss']:.3f}, held-out {val_loss_before:.3f} -> {val_loss:.3f} "
                    f"(chance {metrics['proxy/chance_loss']:.3f}), deployed test auc {metrics['test/auc']:.4f}  -> {path}  "
                    f"(read it with representation.encoder_run={output_dir})")
    return metrics
