"""Objects from validated config: what the tasks, the experiment scripts and the tests share.

Each builder takes its config object whole and returns a ready object (a set-up datamodule, a
model, a LightningModule, an encoder); none trains or writes results, so tasks stay the only
orchestrators.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from recsys_compress.data.config import DatasetConfig
from recsys_compress.models.config import ModelConfig
from recsys_compress.representations.config import RepresentationConfig
from recsys_compress.schema import ConfigError
from recsys_compress.tasks.config import MARCRunConfig, ProbeRunConfig, RunConfig
from recsys_compress.ctr.data import CTRDataModule, build_ctr_splits
from recsys_compress.data.datamodule import NextItemDataModule
from recsys_compress.models.gguf_cache import convert_gguf
from recsys_compress.models.item_llm import build_llama, load_item_llm
from recsys_compress.models.generative import CodeVocabulary, GenerativeRecLitModule, codebook_sizes
from recsys_compress.models.lit_base import RecLitModule
from recsys_compress.models.lit_seqrec import SeqRecLitModule
from recsys_compress.representations.layer_means import Encoder, load_encoder
from recsys_compress.representations.proxy import apply_proxy_encoder


def build_datamodule(cfg: DatasetConfig, seed: int) -> NextItemDataModule:
    """The next-item datamodule of ``cfg``, set up (its ``data`` is read and split)."""
    dm = NextItemDataModule(
        format=cfg.format,
        path=cfg.path,
        name=cfg.file_name,
        min_rating=cfg.min_rating,
        k_core=cfg.k_core,
        max_len=cfg.max_len,
        train_windows=cfg.train_windows,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size,
        num_workers=cfg.num_workers,
        seed=seed,
    )
    dm.setup()
    return dm


def build_model(cfg: ModelConfig, dm: NextItemDataModule, cache_dir: str | Path,
                codes: torch.Tensor | None = None) -> PreTrainedModel:
    """A LLaMA over ``dm``'s items: from scratch, or pretrained with a new item vocabulary; given
    the items' ``codes`` (item_ids=semantic), a LLaMA from scratch over their code tokens."""
    assert dm.data is not None
    if codes is not None or cfg.source == "scratch":
        tokens, max_len = dm.n_items, dm.max_len  # one token an item
        if codes is not None:
            vocab = CodeVocabulary(codebook_sizes(codes))
            # build_llama adds the padding token; a window and its target, L tokens an item
            tokens, max_len = vocab.size - 1, (dm.max_len + 1) * vocab.levels
        return build_llama(
            tokens,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            intermediate_size=cfg.intermediate_size,
            max_len=max_len,
            dropout=cfg.dropout,
            tie_embeddings=cfg.tie_embeddings,
        )
    path = cfg.pretrained_path or convert_gguf(cfg.gguf_path, Path(cache_dir) / "models")
    texts = dm.data.item_texts() if cfg.item_init == "text" else None
    return load_item_llm(path, dm.n_items, texts, cfg.item_init)


def build_lit_module(run: RunConfig, model: PreTrainedModel, codes: torch.Tensor | None = None) -> RecLitModule:
    """The training/evaluation LightningModule around ``model``: the atomic recommender, or given
    the items' ``codes``, the generative one."""
    if codes is not None:
        return GenerativeRecLitModule(model, codes, codebook_sizes(codes), run.model.optim, run.evaluation,
                                      run.model.embedding_dropout, run.model.code_loss)
    return SeqRecLitModule(model, run.model.optim, run.evaluation, run.model.embedding_dropout)


def build_encoder(rep: RepresentationConfig, cache_dir: str | Path, seed: int) -> Encoder:
    """The text encoder whose layer-wise representations the CTR tasks read: the pretrained
    model, with the blocks a task=proxy run fine-tuned when ``representation.encoder_run``."""
    if rep.model == "smollm2_135m" and not rep.path:
        if not rep.gguf_path:
            raise ConfigError("representation.gguf_path (or representation.path) is needed for smollm2_135m")
        encoder = load_encoder(rep.model, convert_gguf(rep.gguf_path, Path(cache_dir) / "models"))
    else:
        encoder = load_encoder(rep.model, rep.path, seed=seed)
    if rep.encoder_run:
        try:
            apply_proxy_encoder(encoder, rep.encoder_run)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return encoder


def build_ctr_datamodule(run: ProbeRunConfig | MARCRunConfig) -> CTRDataModule:
    """The run's CTR splits (``dataset``, ``ctr``, ``seed``) in a datamodule; ``.data`` holds them."""
    d, c = run.dataset, run.ctr
    data = build_ctr_splits(d.format, d.path, d.file_name, c.threshold, tuple(c.split), c.split_by, run.seed)
    return CTRDataModule(data, c.batch_size, c.eval_batch_size, run.seed, c.batch_by, c.items_per_batch)
