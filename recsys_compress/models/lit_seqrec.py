"""The atomic recommender: one item = one vocabulary token of a causal LM, scored by its tied head.

``SeqRecLitModule`` trains, validates and tests it, and implements ``RecommenderModel`` (the seam
that compression, alignment, evaluation and export call); this module is the only place that
knows an item is one token.
"""

from __future__ import annotations

import math
import random

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from recsys_compress.evaluation.config import EvaluationConfig
from recsys_compress.evaluation.ranking import FullRankingMetrics, mask_scores, target_ranks
from recsys_compress.models.config import OptimConfig
from recsys_compress.models.interface import ExportGraph, RecommenderModel, TargetRanks, TokenSequence
from recsys_compress.models.item_llm import position_ids_for
from recsys_compress.models.padding import to_right_padding


class ItemScorer(nn.Module):
    """``(input_ids, attention_mask) -> scores`` of every item index as the next item, for
    **right-padded** histories (real items first, item 0 after them): the exported graph.

    The same scores as ``SeqRecLitModule.forward`` in eval mode gives the left-padded history
    (positions count from the first real item either way, and causal attention never lets a real
    item see the padding after it), without Lightning, for export. Right padding is what
    onnxruntime's ``GroupQueryAttention`` kernel handles (``deploy.fusions``); ``to_right_padding``
    turns the datamodule's left-padded batches into it. Every slot gets its index as position, so
    that the kernel reads each sequence as the full width: padding slots then attend to items
    and to each other, and only the last real item's state is read.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        hidden = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=torch.arange(length, device=input_ids.device).expand(batch, length),
            use_cache=False,
        ).last_hidden_state
        last = (attention_mask.sum(-1) - 1).clamp(min=0)
        return self.model.get_output_embeddings()(hidden[torch.arange(batch, device=hidden.device), last])


def example_inputs(n_items: int, max_len: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded example histories (one full, one half padding), as the datamodule pads them:
    the export traces their right-padded form and checks the graph against the eager model."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, n_items + 1, (batch, max_len), generator=generator)
    mask = torch.ones_like(ids)
    ids[1:, : max_len // 2] = 0
    mask[1:, : max_len // 2] = 0
    return ids, mask


class SeqRecLitModule(L.LightningModule, RecommenderModel):
    """Causal next-item cross-entropy at every position; full-ranking evaluation.

    The wrapped ``model`` knows nothing about Lightning; this module adds only the input
    dropout (LLaMA has none on embeddings, SASRec-style models need it), the loss, the
    optimiser and the metrics.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        optim: OptimConfig | None = None,
        evaluation: EvaluationConfig | None = None,
        embedding_dropout: float = 0.0,
    ):
        """``optim`` and ``evaluation`` default to their schemas' defaults (declared there
        once); ``embedding_dropout`` is ``model.embedding_dropout``."""
        super().__init__()
        self.optim = optim or OptimConfig()
        self.evaluation = evaluation or EvaluationConfig()
        # plain data in checkpoints and loggers, not schema objects
        self.save_hyperparameters({"optim": self.optim.model_dump(), "evaluation": self.evaluation.model_dump(),
                                   "embedding_dropout": embedding_dropout})
        self.model = model
        self.embedding_dropout = torch.nn.Dropout(embedding_dropout)
        hr_ks, ndcg_ks = tuple(self.evaluation.hr_ks), tuple(self.evaluation.ndcg_ks)
        self.val_metrics = FullRankingMetrics(hr_ks, ndcg_ks)
        # Test: the configured protocol (per-user NDCG@10 kept for paired intervals) and, in the
        # same pass, the other one, so figures compare with papers on either protocol.
        self.test_metrics = FullRankingMetrics(hr_ks, ndcg_ks, keep_per_example="ndcg@10")
        self.test_metrics_other = FullRankingMetrics(hr_ks, ndcg_ks)
        self.test_per_user: torch.Tensor | None = None  # per-user test NDCG@10 of the last test pass

    # ---- the RecommenderModel seam ---------------------------------------------------------
    @property
    def backbone(self) -> PreTrainedModel:
        return self.model

    @property
    def n_items(self) -> int:
        """Items in the catalogue (vocabulary token 0 is padding)."""
        return self.model.get_input_embeddings().num_embeddings - 1

    def sequence(self, batch: dict[str, torch.Tensor]) -> TokenSequence:
        """The items themselves, left-padded; positions count from each sequence's first item."""
        mask = batch["attention_mask"]
        return TokenSequence(batch["input_ids"], mask, position_ids_for(mask))

    def hidden_states(self, batch: dict[str, torch.Tensor], backbone: PreTrainedModel | None = None) -> torch.Tensor:
        """Final (normed) hidden state at every position."""
        backbone = backbone if backbone is not None else self.model
        seq = self.sequence(batch)
        embeds = self.embedding_dropout(backbone.get_input_embeddings()(seq.input_ids))
        return backbone.base_model(
            inputs_embeds=embeds,
            attention_mask=seq.attention_mask,
            position_ids=seq.position_ids,
            use_cache=False,
        ).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores of every item (index 0 = padding) as the next item after each sequence."""
        last = self.hidden_states({"input_ids": input_ids, "attention_mask": attention_mask})[:, -1]
        return self.model.get_output_embeddings()(last)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training objective on ``batch``: mean next-item cross-entropy over every position
        that has a next item (also the calibration loss of gradient-driven rank allocations)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        hidden = self.hidden_states(batch)[:, :-1]
        # Score the catalogue only where there is a next item: the full softmax dominates
        # the step, and padding is often half the positions.
        has_target = mask[:, :-1].bool()
        logits = self.model.get_output_embeddings()(hidden[has_target])
        return F.cross_entropy(logits.float(), ids[:, 1:][has_target])

    def target_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of an evaluation batch's held-out ``target`` item after each user's
        history (the calibration loss of gradient-driven allocations with gradient_split=val)."""
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]).float(), batch["target"])

    def predicted_logits(self, backbone: PreTrainedModel, last_hidden: torch.Tensor,
                         sequence: TokenSequence) -> tuple[torch.Tensor, torch.Tensor]:
        """Every item's logit at each position that has a next item, and that next item."""
        has_target = sequence.attention_mask[:, :-1].bool()
        normed = backbone.base_model.norm(last_hidden)[:, :-1][has_target]
        return backbone.get_output_embeddings()(normed).float(), sequence.input_ids[:, 1:][has_target]

    def rank(self, batch: dict[str, torch.Tensor]) -> TargetRanks:
        """The target's rank among all items' scores, seen items masked out or not."""
        scores = self(batch["input_ids"], batch["attention_mask"]).float()
        target = batch["target"]
        return TargetRanks(seen_excluded=target_ranks(mask_scores(scores, target, batch["seen"]), target),
                           seen_kept=target_ranks(mask_scores(scores, target, None), target))

    def export_graph(self, backbone: PreTrainedModel, max_len: int) -> ExportGraph:
        """``ItemScorer`` over ``backbone`` on right-padded example histories; ``expected``: this
        model's own scores of their left-padded form, as trained and evaluated."""
        left_ids, left_mask = example_inputs(self.n_items, max_len)
        ids, mask = (torch.from_numpy(a) for a in to_right_padding(left_ids.numpy(), left_mask.numpy()))
        batch = torch.export.Dim("batch", min=1, max=65536)
        length = torch.export.Dim("length", min=2, max=max(max_len, 2))
        was_training = self.training
        with torch.no_grad():
            expected = self.eval()(left_ids, left_mask)
        self.train(was_training)
        return ExportGraph(ItemScorer(backbone).eval(), {"input_ids": ids, "attention_mask": mask},
                           {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
                           ["scores"], expected)

    # ---- Lightning ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        loss = self.loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at epoch {self.current_epoch}, step "
                f"{self.global_step}: lower the learning rate or check the data"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=ids.shape[0])
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: FullRankingMetrics,
                   other_protocol: FullRankingMetrics | None = None) -> None:
        ranks = self.rank(batch)
        exclude = self.evaluation.exclude_seen
        metrics.update_ranks(*ranks.protocol(exclude))
        if other_protocol is not None:
            other_protocol.update_ranks(*ranks.protocol(not exclude))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        for k, v in values.items():
            self.log(f"val/{k}", v, prog_bar=k == "ndcg@10")
        self.val_metrics.reset()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, self.test_metrics_other)

    def on_test_epoch_end(self) -> None:
        configured, other = self.test_metrics.compute(), self.test_metrics_other.compute()
        excluded, kept = (configured, other) if self.evaluation.exclude_seen else (other, configured)
        self.log_dict({f"test/{k}": v for k, v in configured.items()})
        self.log_dict({f"test/seen_excluded/{k}": v for k, v in excluded.items()})
        self.log_dict({f"test/seen_kept/{k}": v for k, v in kept.items()})
        with self.test_metrics.sync_context():  # every process's users, under DDP too
            self.test_per_user = self.test_metrics.per_example().detach().cpu()
        self.test_metrics.reset()
        self.test_metrics_other.reset()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # With the RNG streams (dropout) saved, a resumed run continues exactly as an
        # uninterrupted one would; the data order is seeded per epoch by the datamodule.
        name, keys, pos, has_gauss, cached = np.random.get_state()
        # plain types only: checkpoints load with torch.load(weights_only=True)
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                                    "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if states is not None:
            torch.set_rng_state(states["torch"])
            random.setstate(states["python"])
            name, keys, pos, has_gauss, cached = states["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))

    def configure_optimizers(self):
        hp = self.optim
        head = self.model.get_output_embeddings()
        item_table = {id(self.model.get_input_embeddings().weight)} | ({id(head.weight)} if head is not None else set())
        decay, no_decay, items = [], [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) in item_table:
                items.append(p)
            # Norm gains and embeddings are not weight-decayed (standard for LMs).
            elif p.ndim < 2 or "embed" in name:
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0},
                  {"params": items, "weight_decay": 0.0, "lr": hp.item_lr or hp.lr}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=tuple(hp.betas))
        if hp.scheduler == "constant" and hp.warmup_steps == 0:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if hp.scheduler == "cosine":
                progress = (step - hp.warmup_steps) / max(1, total - hp.warmup_steps)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            return 1.0

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
