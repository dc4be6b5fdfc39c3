"""Synthetic data for the math tests: random weights and Wishart-correlated activations.

As in LatentLLM Fig. 6 / Fig. 9: inputs X = Z L^T (tokens are rows) with Z i.i.d. Gaussian and a
random mixing L, so the population correlation L L^T is Wishart; on top an AR(0.9) decay across
channels and uneven channel scales, so that plain SVD, diagonal and full pre-conditioners differ.
"""

import pytest
import torch


def _correlated_inputs(n: int, d: int, *, seed: int, mean_scale: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(d, dtype=torch.float64)
    ar = 0.9 ** (idx[:, None] - idx[None, :]).abs()  # 0.9-decaying correlation
    L = torch.linalg.cholesky(ar) @ torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    scales = torch.exp(torch.randn(d, generator=g, dtype=torch.float64))  # uneven channels
    Z = torch.randn(n, d, generator=g, dtype=torch.float64)
    X = (Z @ L.T) * scales
    if mean_scale:
        X = X + mean_scale * torch.randn(d, generator=g, dtype=torch.float64) * scales
    return X


@pytest.fixture
def correlated_inputs():
    """factory(n, d, seed=0, mean_scale=0.0) -> X [n, d] float64."""
    return _correlated_inputs


@pytest.fixture
def randn():
    """factory(*shape, seed) -> float64 Gaussian tensor."""

    def make(*shape: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return make
