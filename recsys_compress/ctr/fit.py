"""Train one CTR model on given item (and user) features, select on validation AUC, test."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors.torch import save_file

from recsys_compress.ctr.config import CTRConfig
from recsys_compress.ctr.data import CTRDataModule
from recsys_compress.ctr.model import CTRLitModule, RepresentationCompressor
from recsys_compress.utils.instantiators import Trainers


def ctr_fields(c: CTRConfig) -> dict[str, Any]:
    """What a CTR run records in metrics.json about how its CTR model was trained, so reports
    pool only runs trained alike."""
    return {"ctr/split_by": c.split_by, "ctr/item_id_dropout": c.item_id_dropout, "ctr/batch_by": c.batch_by}


def fit_ctr(trainers: Trainers, c: CTRConfig, seed: int, dm: CTRDataModule, compressor: RepresentationCompressor,
            checkpoint_dir: Path,
            user_compressor: RepresentationCompressor | None = None,
            export_codes: Path | None = None) -> dict[str, float]:
    """Train one CTR model on ``compressor``'s item features (and ``user_compressor``'s user
    features, when given), select on val AUC, test, on a Trainer from ``trainers``.
    ``export_codes``: write the selected model's compressed feature of every item there
    (``mu``, as MARC exports its codes), so a fresh CTR model can be trained on them
    (recsys-evaluate-codes)."""
    L.seed_everything(seed, workers=True)
    lit = CTRLitModule(compressor, len(dm.data.user_ids), len(dm.data.item_ids), id_dim=c.id_dim,
                       cross_layers=c.cross_layers, hidden=tuple(c.hidden), dropout=c.dropout, lr=c.lr,
                       weight_decay=c.weight_decay, user_compressor=user_compressor,
                       item_id_dropout=c.item_id_dropout, known_items=dm.data.known_items())
    trainer: L.Trainer = trainers(checkpoint_dir=checkpoint_dir)
    t0 = time.perf_counter()
    trainer.fit(lit, datamodule=dm)
    train_s = time.perf_counter() - t0
    ckpt = trainer.checkpoint_callback
    best = "best" if ckpt is not None and ckpt.best_model_path else None
    out = dict(trainer.test(lit, datamodule=dm, ckpt_path=best, verbose=False)[0])  # loads the best weights
    out["time/train_s"] = train_s
    if export_codes is not None and compressor.dim:
        with torch.no_grad():
            codes = lit.compressor.eval()(torch.arange(len(dm.data.item_ids), device=lit.device)).cpu()
        save_file({"mu": codes.contiguous()}, str(export_codes),
                  metadata={"kind": f"probe {compressor.kind}", "dim": str(codes.shape[1])})
    if ckpt is not None and ckpt.best_model_score is not None:
        out["val/best_auc"] = float(ckpt.best_model_score)
    return out
