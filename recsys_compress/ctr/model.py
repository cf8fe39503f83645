"""The task-adaptation model: DCN-V2 (cross network + MLP) over ids and compressed LLM features.

``RepresentationCompressor`` turns a frozen item representation (an LLM layer's hidden
state) into ``dim`` features: a linear projection trained with the task, PCA fitted once
(frozen), nothing (ID-only baseline), or the vectors as they are (``fixed``: codes that were
already compressed, e.g. MARC's exported mu). Representations are standardised per dimension
first: LLM hidden states carry a few huge-magnitude channels that would otherwise dominate
both PCA and the projection's initial scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC


def standardise(reps: torch.Tensor) -> torch.Tensor:
    return (reps - reps.mean(0)) / reps.std(0).clamp(min=1e-6)


def pca_projection(reps: torch.Tensor, dim: int) -> torch.Tensor:
    """``[hidden, dim]`` top principal directions of (already standardised) ``reps``, scaled to unit variance."""
    centred = reps.double() - reps.double().mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    std = s[:dim] / max(1, reps.shape[0] - 1) ** 0.5
    return (vh[:dim].T / std.clamp(min=1e-12)).float()


class RepresentationCompressor(nn.Module):
    """``noise_std`` (``kind="fixed"`` only): a per-item, per-dimension standard deviation, e.g.
    the posterior sigma of MARC's bottleneck; training then sees ``reps + sigma * eps`` (samples
    of q(z|x), as MARC's own task module did) and evaluation the codes themselves."""

    def __init__(self, reps: torch.Tensor | None, kind: str = "linear", dim: int = 32,
                 noise_std: torch.Tensor | None = None):
        super().__init__()
        if kind not in ("linear", "pca", "none", "fixed"):
            raise ValueError(f"probe.compressor={kind!r}; allowed: linear, pca, none, fixed")
        if noise_std is not None and (kind != "fixed" or reps is None or noise_std.shape != reps.shape):
            raise ValueError("noise_std needs kind='fixed' and one standard deviation per value of reps")
        if kind == "fixed":
            assert reps is not None
            dim = reps.shape[1]
        self.kind, self.dim = kind, (0 if kind == "none" else dim)
        if kind == "none":
            self.register_buffer("reps", torch.zeros(0), persistent=False)
            return
        assert reps is not None
        if dim > reps.shape[1]:
            raise ValueError(f"probe.dim={dim} exceeds the representation width {reps.shape[1]}")
        if noise_std is not None:  # in the units of the standardised codes
            self.register_buffer("noise_std", noise_std.float() / reps.float().std(0).clamp(min=1e-6),
                                 persistent=False)
        else:
            self.noise_std = None
        reps = standardise(reps.float())
        if kind == "pca":
            self.register_buffer("reps", reps @ pca_projection(reps, dim), persistent=False)
        elif kind == "fixed":
            self.register_buffer("reps", reps, persistent=False)
        else:
            self.register_buffer("reps", reps, persistent=False)
            self.project = nn.Linear(reps.shape[1], dim)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return self.reps.new_zeros(items.shape[0], 0)
        x = self.reps[items]
        if self.noise_std is not None and self.training:
            return x + torch.randn_like(x) * self.noise_std[items]
        return self.project(x) if self.kind == "linear" else x  # pca, fixed: precomputed


class CrossNetwork(nn.Module):
    """DCN-V2 full-rank cross layers: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class DCNv2(nn.Module):
    """Stacked DCN-V2: [user emb, item emb, features] -> cross network -> MLP -> logit.

    Items never seen in training (``known_items`` False) enter with a zero id embedding
    instead of their untrained random row: at test time on cold items only the features
    describe them. ``item_id_dropout`` zeroes the id embedding of that fraction of training
    samples, so the model learns to score an item from its features alone, as it must for
    cold items; 1.0 drops item ids altogether (a features-only item model).
    """

    def __init__(self, n_users: int, n_items: int, feature_dim: int, id_dim: int = 16, cross_layers: int = 2,
                 hidden: Sequence[int] = (128, 64), dropout: float = 0.1, item_id_dropout: float = 0.0,
                 known_items: torch.Tensor | None = None):
        super().__init__()
        if not 0 <= item_id_dropout <= 1:
            raise ValueError(f"item_id_dropout={item_id_dropout} must lie in [0, 1]")
        self.user = nn.Embedding(n_users, id_dim)
        self.item = nn.Embedding(n_items, id_dim)
        self.item_id_dropout = item_id_dropout
        known = torch.ones(n_items, dtype=torch.bool) if known_items is None else known_items.bool().clone()
        if known.shape != (n_items,):
            raise ValueError(f"known_items has shape {tuple(known.shape)}; expected ({n_items},)")
        if item_id_dropout >= 1:
            known[:] = False  # ids never trained: no item uses its row
        self.register_buffer("known_items", known, persistent=False)
        width = 2 * id_dim + feature_dim
        self.cross = CrossNetwork(width, cross_layers)
        mlp: list[nn.Module] = []
        for h in hidden:
            mlp += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.mlp = nn.Sequential(*mlp)
        self.head = nn.Linear(width, 1)
        for emb in (self.user, self.item):
            nn.init.normal_(emb.weight, std=0.01)

    def item_embedding(self, items: torch.Tensor) -> torch.Tensor:
        keep = self.known_items[items]
        if self.training and 0 < self.item_id_dropout < 1:
            keep = keep & (torch.rand(items.shape, device=items.device) >= self.item_id_dropout)
        return self.item(items) * keep.unsqueeze(-1)

    def forward_with_hidden(self, users: torch.Tensor, items: torch.Tensor,
                            features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the last hidden layer (the task module's output for decoupling terms)."""
        x0 = torch.cat([self.user(users), self.item_embedding(items), features], -1)
        hidden = self.mlp(self.cross(x0))
        return self.head(hidden).squeeze(-1), hidden

    def forward(self, users: torch.Tensor, items: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.forward_with_hidden(users, items, features)[0]


class CTRMetricsMixin:
    """Validation/test AUC (torchmetrics ``BinaryAUROC``) and LogLoss for a LightningModule
    whose ``eval_logits(users, items)`` scores a batch."""

    def init_ctr_metrics(self) -> None:
        self.auc = nn.ModuleDict({s: BinaryAUROC() for s in ("val", "test")})
        self.logloss = nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})

    def _eval(self, batch, stage: str) -> None:
        users, items, labels = batch
        logits = self.eval_logits(users, items)
        self.auc[stage].update(torch.sigmoid(logits), labels.long())
        self.logloss[stage].update(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"))

    def validation_step(self, batch, batch_idx):
        self._eval(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval(batch, "test")

    def _log_epoch(self, stage: str) -> None:
        self.log(f"{stage}/auc", self.auc[stage].compute(), prog_bar=stage == "val")
        self.log(f"{stage}/logloss", self.logloss[stage].compute())
        self.auc[stage].reset()
        self.logloss[stage].reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")


class CTRLitModule(CTRMetricsMixin, L.LightningModule):
    """BCE training of a DCN-V2 over ids and compressed item features."""

    def __init__(self, compressor: RepresentationCompressor, n_users: int, n_items: int, id_dim: int = 16,
                 cross_layers: int = 2, hidden: Sequence[int] = (128, 64), dropout: float = 0.1,
                 lr: float = 1e-3, weight_decay: float = 0.0,
                 user_compressor: RepresentationCompressor | None = None, item_id_dropout: float = 0.0,
                 known_items: torch.Tensor | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["compressor", "user_compressor", "known_items"])
        self.compressor = compressor
        self.user_compressor = user_compressor  # indexed by user: user representations, when used
        features = compressor.dim + (user_compressor.dim if user_compressor is not None else 0)
        self.model = DCNv2(n_users, n_items, features, id_dim, cross_layers, hidden, dropout, item_id_dropout,
                           known_items)
        self.init_ctr_metrics()

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        features = self.compressor(items)
        if self.user_compressor is not None:
            features = torch.cat([features, self.user_compressor(users)], -1)
        return self.model(users, items, features)

    def eval_logits(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self(users, items)

    def training_step(self, batch, batch_idx):
        users, items, labels = batch
        loss = F.binary_cross_entropy_with_logits(self(users, items), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"CTR loss is {loss.item()} at step {self.global_step}: lower ctr.lr")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
