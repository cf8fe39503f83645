"""MARC's compression module and information constraints.

``VariationalBottleneck`` maps an LLM representation h to q(z|h) = N(mu, diag(sigma^2)),
samples z = mu + sigma * eps while training and returns mu otherwise (mu is what deployment
caches). The KL to the prior N(0, I) is the information-bottleneck term; HSIC is the
optional decoupling constraint between two modules' outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys_compress.marc.config import MARCConfig


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q || N(0, 1)) of each dimension of each row (``kl_to_standard_normal`` before its sum)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row, summed over dimensions: exactly 0 iff mu = 0, logvar = 0."""
    return kl_per_dim(mu, logvar).sum(-1)


def informative_dims(mu: torch.Tensor, logvar: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` code dimensions with the largest mean KL to the prior, most informative first.

    Under the bottleneck a dimension whose posterior stays near N(0, 1) carries almost nothing
    about an item, yet its mu still differs from item to item. A fresh downstream model that
    sees those mu values as exact features can tell training items apart by them and memorise
    their labels, which does not carry over to new items. MARC's own task module never could:
    it saw those dimensions under noise of about their own spread.
    """
    if not 1 <= k <= mu.shape[-1]:
        raise ValueError(f"k={k} dimensions requested from codes of width {mu.shape[-1]}")
    per_dim = kl_per_dim(mu, logvar).mean(0)
    return torch.argsort(per_dim, descending=True, stable=True)[:k]


def posterior_std(logvar: torch.Tensor) -> torch.Tensor:
    """sigma of q(z|h) from its log-variance."""
    return (0.5 * logvar).exp()


class VariationalBottleneck(nn.Module):
    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_features)  # LLM hidden states have a few huge channels
        self.stats = nn.Linear(in_features, 2 * dim)
        self.dim = dim

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z, mu, logvar)``; z is a sample in training mode and mu in eval mode."""
        mu, logvar = self.stats(self.norm(h)).chunk(2, dim=-1)
        logvar = logvar.clamp(-10.0, 10.0)  # keeps exp() finite early in training
        z = mu + torch.randn_like(mu) * posterior_std(logvar) if self.training else mu
        return z, mu, logvar


def _rbf_kernel(x: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(x, x).pow(2)
    bandwidth = d.detach().median().clamp(min=1e-6)  # median heuristic
    return torch.exp(-d / bandwidth)


def hsic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased HSIC estimate with RBF kernels: 0 for independent x and y (in the limit), > 0 otherwise."""
    n = x.shape[0]
    if n < 2:
        return x.new_zeros(())
    centre = torch.eye(n, device=x.device, dtype=x.dtype) - 1.0 / n
    k, l = _rbf_kernel(x), _rbf_kernel(y)
    return torch.trace(k @ centre @ l @ centre) / (n - 1) ** 2


def deployed_codes(mu: torch.Tensor, logvar: torch.Tensor,
                   m: MARCConfig) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """What deployment caches and trains on: the codes (mu, or its ``m.export_dims`` most
    informative dimensions), their posterior sigma when ``m.deploy_noise``, and the kept dimensions."""
    kept = (informative_dims(mu, logvar, m.export_dims) if m.export_dims is not None
            else torch.arange(mu.shape[1]))
    codes = mu[:, kept].contiguous()
    return codes, posterior_std(logvar[:, kept]) if m.deploy_noise else None, kept
