"""The RQ-VAE item tokenizer: an item's text embedding -> L code tokens, one per level.

As in LC-Rec and TIGER: an MLP encoder maps the embedding to a ``code_dim`` latent, a residual
quantiser (``vector_quantize_pytorch.ResidualVQ``: k-means-initialised codebooks, EMA updates,
commitment loss) quantises it in L levels of K codes, each level the residual of the one
before, and an MLP decoder reconstructs the embedding. Loss = MSE reconstruction + the mean
over levels of the commitment loss (weight ``commitment``, LC-Rec's beta 0.25).

What the library lacks is written here and in ``assign.py``: reading an item's codes with the
last level balanced by Sinkhorn (LC-Rec's uniform semantic mapping) and handling collisions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import ResidualVQ

from recsys_compress.schema import defaults_of
from recsys_compress.tokenizers.config import SemanticIDsConfig

# LC-Rec's shape (4 x 256, code dim 32, ...), declared once in the schema
DEFAULTS = defaults_of(SemanticIDsConfig)


def mlp(sizes: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers through ``sizes`` with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    def __init__(self, in_dim: int, levels: int = DEFAULTS["levels"], codebook_size: int = DEFAULTS["codebook_size"],
                 code_dim: int = DEFAULTS["code_dim"], hidden: tuple[int, ...] = tuple(DEFAULTS["hidden"]),
                 commitment: float = DEFAULTS["commitment"], kmeans_iters: int = DEFAULTS["kmeans_iters"],
                 dropout: float = DEFAULTS["dropout"], dead_code_ratio: float = DEFAULTS["dead_code_ratio"]):
        super().__init__()
        if levels < 1 or codebook_size < 2 or code_dim < 1:
            raise ValueError(f"levels={levels}, codebook_size={codebook_size}, code_dim={code_dim}: allowed "
                             "levels >= 1, codebook_size >= 2, code_dim >= 1")
        self.levels, self.codebook_size = levels, codebook_size
        self.encoder = mlp([in_dim, *hidden, code_dim], dropout)
        self.decoder = mlp([code_dim, *reversed(hidden), in_dim], dropout)
        self.quantizer = ResidualVQ(dim=code_dim, num_quantizers=levels, codebook_size=codebook_size,
                                    kmeans_init=True, kmeans_iters=kmeans_iters, commitment_weight=commitment,
                                    dead_code_threshold_ratio=dead_code_ratio)

    @property
    def codebooks(self) -> torch.Tensor:
        """``[levels, codebook_size, code_dim]``: every level's code vectors."""
        return self.quantizer.codebooks

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction, codes ``[batch, levels]`` (nearest code at every level) and the loss."""
        quantized, codes, commitment = self.quantizer(self.encoder(x)[None])
        reconstruction = self.decoder(quantized[0])
        loss = F.mse_loss(reconstruction, x) + commitment.mean()
        return reconstruction, codes[0], loss

    @torch.no_grad()
    def reconstruction_error(self, x: torch.Tensor) -> float:
        """Mean squared error of the decoded codes against ``x``, relative to ``x``'s variance
        (0: exact; 1: no better than the mean embedding)."""
        was_training = self.training
        self.eval()  # quantised latents are the codes' vectors: the reconstruction decodes the codes
        reconstruction = self(x)[0]
        self.train(was_training)
        return float(((reconstruction - x) ** 2).sum(1).mean() / x.var(0, unbiased=False).sum())

    @torch.no_grad()
    def residuals(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The nearest codes of the first ``levels - 1`` levels ``[batch, levels - 1]`` and the
        residual the last level quantises ``[batch, code_dim]``."""
        residual = self.encoder(x)
        codes = []
        for codebook in self.codebooks[:-1]:
            nearest = torch.cdist(residual, codebook).argmin(1)
            codes.append(nearest)
            residual = residual - codebook[nearest]
        return torch.stack(codes, 1) if codes else residual.new_zeros(len(x), 0, dtype=torch.long), residual


def fit_rqvae(model: RQVAE, embeddings: torch.Tensor, epochs: int = 200, batch_size: int = 1024,
              lr: float = 1e-3, seed: int = 0, progress: bool = True) -> list[float]:
    """Train ``model`` on ``embeddings`` (items x dim); returns the mean loss of every epoch.

    The codebooks are k-means-initialised on the first batch; the data are shuffled by ``seed``."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the library's k-means and the MLPs' dropout draw from the global generator
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in tqdm(range(epochs), desc="RQ-VAE", disable=not progress):
        order = torch.randperm(len(embeddings), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = embeddings[order[start:start + batch_size]]
            _, _, loss = model(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        losses.append(total / len(embeddings))
    model.eval()
    return losses
