"""Low-rank factorisation of linear layers: plain SVD, activation-aware SVD, whitened SVD.

A linear layer y = W x + b (W: m x n, out x in) becomes y = A (B x) + b with A: m x k and
B: k x n. The three methods differ only in the input-space transform S applied before the
SVD (``../shared/DESIGN.md``, OD-LLM steps 1-2):

* plain SVD: S = I, minimises ||W - W'||_F.
* activation-aware (ASVD): S = diag(s), s_j = mean |x_j| ** alpha over calibration tokens,
  so channels with large activations are preserved.
* whitened (OD-LLM token-covariance normalisation): C = sum_t x_t x_t^T = S S^T (Cholesky,
  float64). Since ||(W - W') X||_F = ||(W - W') S||_F, truncating the SVD of W S minimises
  the output error on the calibration activations themselves.

Then W S = U Sigma V^T, A = U_k Sigma_k^(1/2), B = Sigma_k^(1/2) V_k^T S^-1 (the SVD's top k
from the eigendecomposition of the smaller Gram matrix of W S: ``truncated_factors``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """y = A (B x) + b: two skinny matmuls instead of one m x n matmul.

    Stored as two ``nn.Linear`` (``down`` = B: n -> k, ``up`` = A: k -> m, with the original
    bias), so int8 dynamic quantisation, export and PEFT treat them like any linear layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @property
    def A(self) -> torch.Tensor:
        return self.up.weight

    @property
    def B(self) -> torch.Tensor:
        return self.down.weight

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> LowRankLinear:
        layer = cls(B.shape[1], A.shape[0], A.shape[1], bias is not None, dtype=A.dtype, device=A.device)
        with torch.no_grad():
            layer.up.weight.copy_(A)
            layer.down.weight.copy_(B)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        return self.A @ self.B

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """k = floor(m n rho / (m + n)): the rank whose two factors keep a ``ratio`` of m n params."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio={ratio} is out of range; allowed: (0, 1]")
    return math.floor(out_features * in_features * ratio / (out_features + in_features))


@dataclass
class Factorization:
    A: torch.Tensor  # m x k
    B: torch.Tensor  # k x n
    singular_values: torch.Tensor  # all of them, of W S
    energy_kept: float  # sum of kept sigma^2 / total
    jitter: float  # added to the Gram diagonal to make it positive definite (0: none)


def cholesky_with_jitter(gram: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, float]:
    """Lower-triangular S with S S^T = gram (+ jitter I), in float64.

    If ``gram`` is not positive definite (dead input channels, fewer tokens than features),
    add (|lambda_min| + eps * mean diagonal) I and retry, as OD-LLM does.
    """
    gram = gram.double()
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return chol, 0.0
    lam_min = float(torch.linalg.eigvalsh(gram)[0])
    scale = float(gram.diagonal().mean().abs()) or 1.0
    jitter = abs(lam_min) + eps * scale
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(gram + jitter * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))
        if int(info) == 0:
            return chol, jitter
        jitter *= 10
    raise torch.linalg.LinAlgError("Gram matrix stays non positive definite after jitter")


def truncated_factors(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``A`` (m x k), ``B`` (k x n) with ``A B`` the best rank-k approximation of ``M``, and all
    singular values of ``M``, from the eigendecomposition of the smaller of M M^T and M^T M.

    A symmetric eigensolver on a min(m, n)-square matrix is cheaper than a full SVD on a CPU
    (SmolLM2's whole factorisation phase: 17-19 s instead of 29 s, BENCHMARKS.md). The factors
    are built as projections (A B = U_k U_k^T M, or M V_k V_k^T), so at full rank they
    reproduce M to rounding whatever the accuracy of tiny singular values;
    in float64, singular values down to ~1e-7 of the largest are accurate, far below any
    that truncation keeps.
    """
    m, n = M.shape
    k = min(rank, m, n)
    left = m <= n
    gram = M @ M.T if left else M.T @ M
    eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
    sigma = eigenvalues.flip(0).clamp(min=0).sqrt()
    top = vectors.flip(1)[:, :k]
    # Balance the two factors (both scaled by sqrt(sigma)): better conditioned for alignment
    # training and int8. The floor only touches directions with (next to) no energy, keeping
    # their factors bounded (they would overflow float32 otherwise) while A B is unchanged.
    root = sigma[:k].clamp(min=max(float(sigma[0]) * 1e-12, 1e-300)).sqrt()
    if left:  # M ~ U_k (U_k^T M)
        A, B = top * root, (top.T @ M) / root[:, None]
    else:  # M ~ (M V_k) V_k^T
        A, B = (M @ top) / root, root[:, None] * top.T
    return A, B, sigma


def singular_values(M: torch.Tensor) -> torch.Tensor:
    """All singular values of ``M``, descending, from the eigenvalues of its smaller Gram matrix
    (the spectrum ``truncated_factors`` truncates, without the eigenvectors)."""
    M = M.double()
    gram = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    return torch.linalg.eigvalsh(gram).flip(0).clamp(min=0).sqrt()


def singular_loss_changes(A: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per singular direction of ``A`` = W S (descending), the first-order change of a loss when
    that direction is removed: -sigma_i u_i^T H v_i, where ``H`` = G S^-T carries the loss's
    gradient G with respect to W into the same coordinates (W' = W - sigma_i u_i v_i^T S^-1, so
    <G, W' - W> = -sigma_i u_i^T G S^-T v_i; ZS-SVD's singular sensitivity). Float64."""
    U, sigma, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    return -sigma * ((U.T @ H.double()) * Vh).sum(1)


@dataclass(frozen=True)
class InputTransform:
    """The input-space transform S a low-rank method truncates in: it takes the SVD of W S.
    ``weight``: W -> W S (float64); ``unweight``: B -> B S^-1 (undoes S on the right factor);
    ``gradient``: G -> G S^-T, a loss gradient with respect to W in the coordinates of W S
    (``singular_loss_changes``); ``jitter``: what the Cholesky factor added to the Gram diagonal."""
    weight: Callable[[torch.Tensor], torch.Tensor]
    unweight: Callable[[torch.Tensor], torch.Tensor]
    gradient: Callable[[torch.Tensor], torch.Tensor]
    jitter: float = 0.0


def identity_transform() -> InputTransform:
    """Plain SVD: S = I."""
    return InputTransform(torch.Tensor.double, lambda B: B, torch.Tensor.double)


def asvd_scale(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """ASVD's input-channel scale s_j = mean|x_j|^alpha (float64; dead channels floored)."""
    return abs_mean.double().clamp(min=1e-8) ** alpha


def asvd_transform(abs_mean: torch.Tensor, alpha: float = 0.5) -> InputTransform:
    """ASVD: S = diag(s), s_j = mean|x_j|^alpha, so S^-T = diag(1/s)."""
    s = asvd_scale(abs_mean, alpha)
    return InputTransform(lambda W: W.double() * s, lambda B: B / s, lambda G: G.double() / s)


def whitening_transform(gram: torch.Tensor) -> InputTransform:
    """OD-LLM / SVD-LLM: S S^T = sum_t x_t x_t^T (Cholesky, float64), so that the squared
    singular values of W S are each direction's output error on the calibration tokens."""
    S, jitter = cholesky_with_jitter(gram)
    return InputTransform(
        lambda W: W.double() @ S,
        # B S^-1 and G S^-T by triangular solves (S^T Y^T = B^T; S Z = G^T), never forming the inverse
        lambda B: torch.linalg.solve_triangular(S.T, B.T, upper=True).T,
        lambda G: torch.linalg.solve_triangular(S, G.double().T, upper=False).T,
        jitter)


def factorize(W: torch.Tensor, rank: int, transform: InputTransform) -> Factorization:
    """The rank-``rank`` truncation of W S, mapped back: A B ~ W, in W's dtype."""
    A, B, sigma = truncated_factors(transform.weight(W), rank)
    k = A.shape[1]
    energy = float((sigma[:k] ** 2).sum() / (sigma ** 2).sum().clamp(min=1e-300))
    if transform.jitter:
        warnings.warn(f"Gram matrix not positive definite: added {transform.jitter:.3g} * I", stacklevel=2)
    return Factorization(A.to(W.dtype), transform.unweight(B).to(W.dtype), sigma, energy, transform.jitter)


def plain_svd(W: torch.Tensor, rank: int) -> Factorization:
    """Truncated SVD of W itself."""
    return factorize(W, rank, identity_transform())


def activation_aware_svd(W: torch.Tensor, rank: int, abs_mean: torch.Tensor, alpha: float = 0.5) -> Factorization:
    """ASVD: scale input channel j by s_j = mean|x_j|^alpha before the SVD, undo it in B."""
    return factorize(W, rank, asvd_transform(abs_mean, alpha))


def whitened_svd(W: torch.Tensor, rank: int, gram: torch.Tensor) -> Factorization:
    """OD-LLM: SVD of W S with S S^T = sum_t x_t x_t^T; B = Sigma^(1/2) V^T S^-1."""
    return factorize(W, rank, whitening_transform(gram))
