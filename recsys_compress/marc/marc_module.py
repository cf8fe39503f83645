"""MARC as a LightningModule: representation learner -> compression module -> task module.

- representation learner: the LLM's trainable top (last k blocks over cached states; or
  frozen), mean-pooled over the item's text tokens;
- compression module: a variational information bottleneck to ``dim`` dimensions;
- task-adaptation module: a DCN-V2 over user/item ids and z (a different structure from the
  compression module, as MARC's decoupling asks).

loss = BCE + beta * KL(q(z|h) || N(0, I)) [+ hsic_weight * HSIC(z, task module's hidden)].

Training batches are grouped by item (``ctr_data.ItemGroupBatchSampler``): each step takes every
training sample of ``items_per_batch`` items, so the LLM top runs once per item per epoch.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from recsys_compress.marc.bottleneck import VariationalBottleneck, hsic, kl_to_standard_normal
from recsys_compress.ctr.config import CTRConfig
from recsys_compress.marc.config import MARCConfig
from recsys_compress.ctr.model import CTRMetricsMixin, DCNv2
from recsys_compress.representations.token_states import pooled


class MARCModule(CTRMetricsMixin, L.LightningModule):
    """``marc`` sets the bottleneck, the loss and the learning rates; ``ctr`` the task module."""

    def __init__(
        self,
        top: nn.Module | None,
        states: torch.Tensor,
        mask: torch.Tensor,
        n_users: int,
        marc: MARCConfig,
        ctr: CTRConfig,
        known_items: torch.Tensor | None = None,
        eval_item_batch: int = 256,
    ):
        super().__init__()
        self.marc, self.ctr, self.eval_item_batch = marc, ctr, eval_item_batch
        self.save_hyperparameters({"marc": marc.model_dump(), "ctr": ctr.model_dump(), "n_users": n_users})
        self.top = top
        # Cached inputs of the trainable top: not parameters, not checkpointed.
        self.register_buffer("states", states, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.bottleneck = VariationalBottleneck(states.shape[-1], marc.dim)
        self.task = DCNv2(n_users, states.shape[0], marc.dim, ctr.id_dim, ctr.cross_layers, tuple(ctr.hidden),
                          ctr.dropout, ctr.item_id_dropout, known_items)
        self.init_ctr_metrics()
        self._codes: torch.Tensor | None = None

    # ---- representations ----------------------------------------------------------------
    def item_hidden(self, items: torch.Tensor) -> torch.Tensor:
        return pooled(self.top, self.states[items], self.mask[items])

    @torch.no_grad()
    def item_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mu and log-variance of every item (eval mode): what deployment caches is mu."""
        was_training = self.training
        self.eval()
        mus, logvars = [], []
        for start in range(0, self.states.shape[0], self.eval_item_batch):
            items = torch.arange(start, min(start + self.eval_item_batch, self.states.shape[0]),
                                 device=self.states.device)
            _, mu, logvar = self.bottleneck(self.item_hidden(items))
            mus.append(mu)
            logvars.append(logvar)
        self.train(was_training)
        return torch.cat(mus), torch.cat(logvars)

    # ---- training ---------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        users, items, labels = batch
        unique, inverse = torch.unique(items, return_inverse=True)
        z, mu, logvar = self.bottleneck(self.item_hidden(unique))
        logits, task_hidden = self.task.forward_with_hidden(users, items, z[inverse])
        bce = F.binary_cross_entropy_with_logits(logits, labels)
        kl = kl_to_standard_normal(mu, logvar).mean()
        loss = bce + self.marc.beta * kl
        if self.marc.constraint == "hsic":
            rows = torch.randperm(len(items), device=items.device)[:512]  # HSIC is O(n^2)
            decoupling = hsic(z[inverse][rows], task_hidden[rows])
            loss = loss + self.marc.hsic_weight * decoupling
            self.log("train/hsic", decoupling)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"MARC loss is {loss.item()} at step {self.global_step}: lower marc.lr")
        self.log_dict({"train/loss": loss, "train/bce": bce, "train/kl": kl}, prog_bar=True, batch_size=len(items))
        return loss

    def eval_logits(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        if self._codes is None:  # every item's code once per evaluation
            self._codes = self.item_codes()[0]
        return self.task(users, items, self._codes[items])

    def on_validation_epoch_start(self) -> None:
        self._codes = None  # weights changed since the last evaluation

    on_test_epoch_start = on_validation_epoch_start

    def configure_optimizers(self):
        groups = [{"params": list(self.bottleneck.parameters()) + list(self.task.parameters()), "lr": self.marc.lr}]
        llm = [p for p in self.top.parameters() if p.requires_grad] if self.top is not None else []
        if llm:
            groups.append({"params": llm, "lr": self.marc.llm_lr})  # the pretrained blocks move slowly
        return torch.optim.AdamW(groups, weight_decay=self.ctr.weight_decay)
