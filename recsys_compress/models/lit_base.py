"""The Lightning side every recommender shares: training, validation and test loops, the
optimiser and its schedule, exact resumption. A recommender paradigm subclasses ``RecLitModule``
and implements the ``RecommenderModel`` seam (``models/interface.py``) it leaves abstract."""

from __future__ import annotations

import math
import random

import lightning as L
import numpy as np
import torch
from transformers import PreTrainedModel

from recsys_compress.evaluation.config import EvaluationConfig
from recsys_compress.evaluation.ranking import FullRankingMetrics
from recsys_compress.models.config import OptimConfig
from recsys_compress.models.interface import RecommenderModel, TokenSequence


class RecLitModule(L.LightningModule, RecommenderModel):
    """A recommender's decoder (``model``, a Hugging Face causal LM that knows nothing about
    Lightning) with the input dropout (LLaMA has none on embeddings, SASRec-style models need
    it), the optimiser and the ranking metrics; the loss and the ranking come from the seam.
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

    @property
    def backbone(self) -> PreTrainedModel:
        return self.model

    def hidden_states(self, batch: dict[str, torch.Tensor], backbone: PreTrainedModel | None = None) -> torch.Tensor:
        """Final (normed) hidden state at every position of ``sequence(batch)``."""
        return self.decode(self.sequence(batch), backbone)

    def decode(self, seq: TokenSequence, backbone: PreTrainedModel | None = None) -> torch.Tensor:
        """Final (normed) hidden state at every position of a token sequence."""
        backbone = backbone if backbone is not None else self.model
        embeds = self.embedding_dropout(backbone.get_input_embeddings()(seq.input_ids))
        return backbone.base_model(
            inputs_embeds=embeds,
            attention_mask=seq.attention_mask,
            position_ids=seq.position_ids,
            use_cache=False,
        ).last_hidden_state

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
        exclude = self.evaluation.exclude_seen
        ranks = self.rank(batch, None if other_protocol is not None else exclude)
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
