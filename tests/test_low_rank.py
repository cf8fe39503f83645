import math

import pytest
import torch

from recsys_compress.compression.low_rank import (
    LowRankLinear,
    activation_aware_svd,
    cholesky_with_jitter,
    plain_svd,
    rank_for_ratio,
    truncated_factors,
    whitened_svd,
)


def test_rank_formula():
    assert rank_for_ratio(576, 576, 0.5) == 144
    assert rank_for_ratio(192, 576, 0.5) == math.floor(192 * 576 * 0.5 / 768)  # GQA k/v: 72
    assert rank_for_ratio(1536, 576, 1.0) == 418
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"allowed: \(0, 1\]"):
            rank_for_ratio(8, 8, bad)


def test_kept_parameters_match_the_ratio():
    m, n, rho = 1536, 576, 0.3
    k = rank_for_ratio(m, n, rho)
    assert k * (m + n) <= rho * m * n < (k + 1) * (m + n)


@pytest.mark.parametrize("method", ["plain", "asvd", "whitened"])
def test_full_rank_reproduces_the_layer(method):
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 16)
    x = torch.randn(200, 24)
    full = min(16, 24)
    if method == "plain":
        fac = plain_svd(layer.weight.data, full)
    elif method == "asvd":
        fac = activation_aware_svd(layer.weight.data, full, x.abs().mean(0))
    else:
        fac = whitened_svd(layer.weight.data, full, x.double().T @ x.double())
    low = LowRankLinear.from_factors(fac.A, fac.B, layer.bias.data)
    torch.testing.assert_close(low(x), layer(x), atol=1e-5, rtol=1e-5)
    assert fac.energy_kept == pytest.approx(1.0)


def test_whitened_minimises_output_error_on_its_activations():
    torch.manual_seed(0)
    W = torch.randn(32, 48)
    # anisotropic, correlated activations: what real hidden states look like
    mix = torch.randn(48, 48) * torch.logspace(0, -2, 48)
    x = torch.randn(4000, 48) @ mix.T
    gram = x.double().T @ x.double()
    k = 8
    err = {}
    for name, fac in {
        "plain": plain_svd(W, k),
        "asvd": activation_aware_svd(W, k, x.abs().mean(0)),
        "whitened": whitened_svd(W, k, gram),
    }.items():
        err[name] = float(torch.linalg.norm(x @ (W - fac.A @ fac.B).T) / torch.linalg.norm(x @ W.T))
    # ASVD's diagonal scaling has no such guarantee against plain SVD; whitening does.
    assert err["whitened"] < 0.5 * err["plain"] and err["whitened"] < 0.5 * err["asvd"]
    # whitened SVD is the optimum among rank-k maps on these activations (Eckart-Young in S space)
    S = torch.linalg.cholesky(gram)
    sigma = torch.linalg.svdvals(W.double() @ S)
    optimum = float(sigma[k:].square().sum().sqrt() / sigma.square().sum().sqrt())
    assert err["whitened"] == pytest.approx(optimum, rel=1e-4)


def test_cholesky_jitter_for_rank_deficient_gram():
    x = torch.randn(5, 10, dtype=torch.float64)  # 5 tokens, 10 features: rank 5
    with pytest.warns(UserWarning, match="not positive definite"):
        fac = whitened_svd(torch.randn(6, 10), 4, x.T @ x)
    assert fac.jitter > 0
    S, jitter = cholesky_with_jitter(torch.eye(3) * 2)
    assert jitter == 0.0 and torch.allclose(S @ S.T, torch.eye(3, dtype=torch.float64) * 2)


def test_low_rank_linear_shapes_and_params():
    layer = LowRankLinear(576, 192, rank=72, bias=False)
    assert layer.A.shape == (192, 72) and layer.B.shape == (72, 576)
    assert sum(p.numel() for p in layer.parameters()) == 72 * (576 + 192)
    assert layer(torch.randn(3, 5, 576)).shape == (3, 5, 192)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LowRankLinear(4, 4, rank=0)


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (40, 40)])
def test_truncated_factors_equal_the_truncated_svd(shape):
    torch.manual_seed(0)
    M = torch.randn(*shape, dtype=torch.float64) @ torch.diag(torch.logspace(0, -3, shape[1], dtype=torch.float64))
    U, sigma, Vh = torch.linalg.svd(M, full_matrices=False)
    for k in (1, 7, min(shape)):
        A, B, values = truncated_factors(M, k)
        assert A.shape == (shape[0], k) and B.shape == (k, shape[1])
        torch.testing.assert_close(A @ B, (U[:, :k] * sigma[:k]) @ Vh[:k], atol=1e-10, rtol=0)
        torch.testing.assert_close(values, sigma, atol=1e-10 * float(sigma[0]), rtol=0)
    # a rank-deficient matrix still gives finite factors that reproduce it
    low = torch.randn(20, 3, dtype=torch.float64) @ torch.randn(3, 25, dtype=torch.float64)
    A, B, _ = truncated_factors(low, 10)
    assert torch.isfinite(A.float()).all() and torch.isfinite(B.float()).all()
    torch.testing.assert_close(A @ B, low, atol=1e-10, rtol=0)
