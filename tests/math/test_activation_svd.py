import pytest
import torch

from converters.math.activation_svd import (
    activation_aware_lowrank,
    activation_error_curve,
    activation_loss,
    bias_update,
    block_identity_junction,
)
from converters.math.preconditioners import PRECONDITIONER_KINDS, preconditioner
from converters.math.stats import InputStats


def _sample_loss(W, A, B, X):
    return float(((X @ (W - B @ A).T) ** 2).sum())  # ||(W - BA) X||_F^2, tokens as rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_root_covariance_is_best_at_every_rank(seed, randn, correlated_inputs):
    """LatentLLM Fig. 6: root covariance <= covariance (CorDA) and plain SVD (and the diagonal
    pre-conditioners) on the activation loss, at every rank."""
    out_f, in_f = 20, 32
    W = randn(out_f, in_f, seed=100 + seed)
    X = correlated_inputs(2000, in_f, seed=seed)
    s = InputStats.from_activations(X)
    factors = {k: preconditioner(k, s, damping=0.0) for k in PRECONDITIONER_KINDS}
    for r in range(0, out_f + 1):
        losses = {}
        for k, (P, P_inv) in factors.items():
            A, B = activation_aware_lowrank(W, r, P, P_inv)
            losses[k] = _sample_loss(W, A, B, X)
        best = losses["root_covariance"]
        for k, v in losses.items():
            assert best <= v * (1 + 1e-9) + 1e-9, (r, k, best, v)
        if 0 < r < out_f:  # strictly better than plain SVD and CorDA on correlated data
            assert best < 0.999 * losses["identity"]
            assert best < 0.999 * losses["covariance"]


@pytest.mark.parametrize("kind", PRECONDITIONER_KINDS)
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
@pytest.mark.parametrize("split", ["B", "A", "sqrt"])
def test_exact_at_full_rank(kind, shape, split, randn, correlated_inputs):
    W = randn(*shape, seed=3)
    s = InputStats.from_activations(correlated_inputs(400, shape[1], seed=4, mean_scale=0.3))
    P, P_inv = preconditioner(kind, s, damping=0.01)
    A, B = activation_aware_lowrank(W, min(shape), P, P_inv, split=split)
    assert A.shape == (min(shape), shape[1]) and B.shape == (shape[0], min(shape))
    torch.testing.assert_close(B @ A, W, atol=1e-9, rtol=1e-9)


def test_split_does_not_change_product_and_latent_is_white(randn, correlated_inputs):
    W = randn(16, 24, seed=5)
    X = correlated_inputs(3000, 24, seed=6)
    s = InputStats.from_activations(X)
    P, P_inv = preconditioner("root_covariance", s, damping=0.0)
    ref = None
    for sp in ("B", "A", "sqrt"):
        A, B = activation_aware_lowrank(W, 6, P, P_inv, split=sp)
        ref = B @ A if ref is None else ref
        torch.testing.assert_close(B @ A, ref)
    A, _ = activation_aware_lowrank(W, 6, P, P_inv, split="B")
    c = X @ A.T  # latent per token
    torch.testing.assert_close(c.T @ c / X.shape[0], torch.eye(6, dtype=torch.float64), atol=1e-8, rtol=0)


@pytest.mark.parametrize("kind", ["identity", "diag_l2", "covariance", "root_covariance"])
def test_error_curve_matches_direct_loss(kind, randn, correlated_inputs):
    W = randn(10, 14, seed=7)
    X = correlated_inputs(500, 14, seed=8)
    s = InputStats.from_activations(X)
    P, P_inv = preconditioner(kind, s, damping=0.0)
    C = s.autocorrelation()
    curve = activation_error_curve(W, P, P_inv, C)
    assert curve.shape == (11,)
    for r in range(11):
        A, B = activation_aware_lowrank(W, r, P, P_inv)
        assert abs(float(curve[r]) - activation_loss(W, A, B, C)) <= 1e-9 * float(curve[0])
    assert float(curve[-1]) == 0.0


def test_bias_update_exact_on_mean_and_beats_uncentred(randn, correlated_inputs):
    W, b = randn(12, 16, seed=9), randn(12, seed=10)
    X = correlated_inputs(1500, 16, seed=11, mean_scale=3.0)  # strongly non-zero-mean inputs
    s = InputStats.from_activations(X)
    mu = s.mean
    P, P_inv = preconditioner("root_covariance", s, damping=0.0, centred=True)
    A, B = activation_aware_lowrank(W, 5, P, P_inv)
    b_hat = bias_update(W, A, B, mu, b)
    torch.testing.assert_close(B @ A @ mu + b_hat, W @ mu + b)  # exact on the mean
    err_centred = float(((X @ W.T + b - (X @ A.T @ B.T + b_hat)) ** 2).sum())
    # eq. 44-46: the remaining loss is the centred-covariance loss
    Xc = X - mu
    assert abs(err_centred - _sample_loss(W, A, B, Xc)) < 1e-8 * err_centred
    # and it beats the uncentred decomposition with the original bias (eq. 41 with b_hat = b)
    P0, P0_inv = preconditioner("root_covariance", s, damping=0.0, centred=False)
    A0, B0 = activation_aware_lowrank(W, 5, P0, P0_inv)
    err_plain = float(((X @ W.T - X @ A0.T @ B0.T) ** 2).sum())
    assert err_centred < err_plain
    # no-bias layer: bias_update returns just the correction
    torch.testing.assert_close(bias_update(W, A, B, mu), (W - B @ A) @ mu)


def test_block_identity_junction_preserves_product(randn, correlated_inputs):
    W = randn(12, 20, seed=12)
    s = InputStats.from_activations(correlated_inputs(400, 20, seed=13))
    P, P_inv = preconditioner("root_covariance", s, damping=0.01)
    A, B = activation_aware_lowrank(W, 7, P, P_inv)
    f = block_identity_junction(A, B)
    assert f.A_rest.shape == (7, 13) and f.B.shape == (12, 7)
    assert sorted(f.perm.tolist()) == list(range(20))
    Ad = f.dense_A()
    torch.testing.assert_close(Ad[:, f.perm[:7]], torch.eye(7, dtype=torch.float64))
    torch.testing.assert_close(f.B @ Ad, B @ A, atol=1e-10, rtol=1e-10)
    x = randn(20, seed=14)
    c = x[f.perm[:7]] + f.A_rest @ x[f.perm[7:]]
    torch.testing.assert_close(f.B @ c, B @ A @ x)
    assert float(f.A_rest.abs().max()) < 1e3


def test_rank_out_of_range(randn):
    W = randn(4, 6, seed=15)
    eye = torch.eye(6, dtype=torch.float64)
    with pytest.raises(ValueError):
        activation_aware_lowrank(W, 5, eye, eye)
