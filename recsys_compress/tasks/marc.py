"""``task=marc``: train MARC end to end, export mu of every item, test a fresh CTR model on it.

The exported codes are what an industrial recommender would cache; the reported
``test/auc`` is that of a new DCN-V2 which sees only those cached vectors (plus ids), as in
deployment. The end-to-end model's own test AUC is ``marc/e2e_test/auc``. ``marc.export_dims``
caches only that many of the ``marc.dim`` code dimensions, those the bottleneck filled with the
most information (``bottleneck.informative_dims``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig
from rich.console import Console
from safetensors.torch import save_file

from recsys_compress.tasks.builders import build_ctr_datamodule, build_encoder
from recsys_compress.models.config import LoraSettings
from recsys_compress.schema import ConfigError
from recsys_compress.tasks.config import validate_marc
from recsys_compress.ctr.fit import ctr_fields, fit_ctr
from recsys_compress.ctr.model import RepresentationCompressor
from recsys_compress.marc.bottleneck import deployed_codes, kl_to_standard_normal
from recsys_compress.marc.marc_module import MARCModule
from recsys_compress.models.finetune import add_lora
from recsys_compress.representations.layer_means import item_texts
from recsys_compress.representations.token_states import cached_token_states, llama_top
from recsys_compress.utils.instantiators import Trainers, instantiate_loggers
from recsys_compress.representations.proxy import encoder_label
from recsys_compress.utils.run_outputs import finish_run

log = logging.getLogger(__name__)


def marc(cfg: DictConfig) -> dict[str, Any]:
    run = validate_marc(cfg)
    m = run.marc
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(run.seed, workers=True)
    d = run.dataset
    dm = build_ctr_datamodule(run)
    data = dm.data

    encoder = build_encoder(run.representation, cfg.paths.cache_dir, run.seed)
    n = encoder.n_layers
    if m.trainable_layers > n:
        raise ConfigError(f"marc.trainable_layers={m.trainable_layers} is out of range for "
                          f"{run.representation.model}; allowed: 0..{n}")
    texts, missing = item_texts(data.item_ids, data.item_info, run.representation.template)
    rep = run.representation
    t0 = time.perf_counter()
    states, mask, hit, cache_path = cached_token_states(encoder, d.name, data.item_ids, texts, rep.template,
                                                        n - m.trainable_layers, cfg.paths.cache_dir,
                                                        rep.batch_size, rep.max_tokens)
    extract_s = 0.0 if hit else time.perf_counter() - t0
    log.info("token states %s (%s): %s", cache_path, "cached" if hit else "extracted", tuple(states.shape))
    top = llama_top(encoder, m.trainable_layers) if m.trainable_layers else None
    if top is not None and m.finetune == "lora":
        # the top's one-row token table is unused (its inputs are hidden states), so nothing else trains
        add_lora(top, LoraSettings(r=m.lora_r, alpha=2.0 * m.lora_r, dropout=0.0))
    del encoder

    c = run.ctr
    module = MARCModule(top, states, mask, len(data.user_ids), m, c, known_items=data.known_items())
    train = dm.item_grouped_loader(m.items_per_batch)  # the LLM top runs once per item per epoch

    trainers = Trainers(cfg, instantiate_loggers(cfg))
    trainer: L.Trainer = trainers(checkpoint_dir=output_dir / "checkpoints" / "marc")
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=train, val_dataloaders=dm.val_dataloader())
    train_s = time.perf_counter() - t0
    ckpt = trainer.checkpoint_callback
    best = "best" if ckpt is not None and ckpt.best_model_path else None
    e2e = trainer.test(module, dataloaders=dm.test_dataloader(), ckpt_path=best, verbose=False)[0]

    codes, logvar = module.item_codes()
    kl = float(kl_to_standard_normal(codes, logvar).mean())
    codes, logvar = codes.cpu(), logvar.cpu()
    exported, noise, kept = deployed_codes(codes, logvar, m)
    exported_kl = float(kl_to_standard_normal(codes[:, kept], logvar[:, kept]).mean())  # nats the cache holds
    # The whole posterior is kept, so recsys-evaluate-codes can deploy other dimensions later.
    save_file({"mu": codes.contiguous(), "logvar": logvar.contiguous(), "exported_dims": kept},
              str(output_dir / "item_codes.safetensors"),
              metadata={"item_ids": "\n".join(data.item_ids)[:60000], "dim": str(m.dim)})

    # Deployment: a fresh CTR model that sees only the cached codes.
    t0 = time.perf_counter()
    deployed = fit_ctr(trainers, c, run.seed, dm, RepresentationCompressor(exported, "fixed", noise_std=noise),
                       output_dir / "checkpoints" / "deployed")
    metrics: dict[str, Any] = {
        "test/auc": deployed["test/auc"], "test/logloss": deployed["test/logloss"],
        "val/best_auc": deployed.get("val/best_auc", float("nan")),
        "marc/e2e_test/auc": e2e["test/auc"], "marc/e2e_test/logloss": e2e["test/logloss"],
        "marc/dim": m.dim, "marc/beta": m.beta, "marc/kl": kl, "marc/trainable_layers": m.trainable_layers,
        "marc/constraint": m.constraint, "marc/deploy_noise": int(m.deploy_noise), "marc/finetune": m.finetune,
        "marc/export_dims": len(kept), "marc/exported_kl": exported_kl,
        "repr/encoder": encoder_label(run.representation.model, run.representation.encoder_run), "repr/items_without_text": missing, "data/name": d.name,
        **ctr_fields(c), "seed": run.seed,
        "repr/cache_hit": int(hit), "repr/cache_mb": cache_path.stat().st_size / 2**20,
        "time/extract_s": extract_s, "time/train_s": train_s, "time/deploy_train_s": time.perf_counter() - t0,
        **{f"data/{k}": v for k, v in data.stats().items()},
    }
    metrics["objective"] = metrics.get("val/best_auc")  # what hyper-parameter searches maximise
    path = finish_run(output_dir, metrics, trainers.loggers)
    Console().print(f"[bold]MARC dim {m.dim} ({len(kept)} exported): deployed test auc {metrics['test/auc']:.4f} "
                    f"(end to end {e2e['test/auc']:.4f}), KL {kl:.2f}  -> {path}")
    return metrics
