import pytest
import torch

from converters.math.preconditioners import PRECONDITIONER_KINDS, preconditioner
from converters.math.stats import CovarianceConditioningWarning, InputStats


@pytest.mark.parametrize("kind", PRECONDITIONER_KINDS)
@pytest.mark.parametrize("centred", [False, True])
def test_p_times_p_inv_is_identity(kind, centred, correlated_inputs):
    s = InputStats.from_activations(correlated_inputs(800, 10, seed=4, mean_scale=0.5))
    P, P_inv = preconditioner(kind, s, damping=0.01, centred=centred)
    assert P.shape == P_inv.shape == (10, 10) and P.dtype == torch.float64
    torch.testing.assert_close(P @ P_inv, torch.eye(10, dtype=torch.float64), atol=1e-9, rtol=0)


def test_table1_formulas(correlated_inputs):
    X = correlated_inputs(600, 7, seed=5)
    s = InputStats.from_activations(X)
    C = X.T @ X / 600
    lam = 0.01 * torch.diagonal(C).mean()
    Cd = C + lam * torch.eye(7, dtype=torch.float64)
    P, _ = preconditioner("root_covariance", s, damping=0.01)
    torch.testing.assert_close(P @ P, Cd)  # (XX^T + lam I)^{1/2}
    torch.testing.assert_close(P, P.T)
    P, _ = preconditioner("covariance", s, damping=0.01)
    torch.testing.assert_close(P, Cd)
    P, _ = preconditioner("diag_l2", s, damping=0.01)
    torch.testing.assert_close(torch.diagonal(P), torch.diagonal(C).sqrt())
    P, _ = preconditioner("diag_l1", s, damping=0.01, asvd_alpha=0.5)
    torch.testing.assert_close(torch.diagonal(P), X.abs().mean(0).sqrt())
    P, _ = preconditioner("diag_hessian", s, damping=0.01)
    torch.testing.assert_close(torch.diagonal(P), torch.diagonal(torch.linalg.inv(Cd)).rsqrt())


def test_diag_hessian_equals_wanda_for_uncorrelated_inputs(randn):
    # the sign decision of the module docstring: diag[C^-1]^-1/2 = diag[C]^1/2 when C is diagonal
    X = randn(20000, 5, seed=6) * torch.tensor([1.0, 2.0, 3.0, 0.5, 7.0], dtype=torch.float64)
    s = InputStats.from_activations(X)
    Ph, _ = preconditioner("diag_hessian", s, damping=0.0)
    Pw, _ = preconditioner("diag_l2", s, damping=0.0)
    torch.testing.assert_close(torch.diagonal(Ph), torch.diagonal(Pw), rtol=2e-2, atol=0)


def test_singular_covariance_clamped_with_warning(randn):
    # n < D tokens and no damping: C has rank 6 of 16 -> eigenvalues clamped, warned, still invertible
    s = InputStats.from_activations(randn(6, 16, seed=7))
    with pytest.warns(CovarianceConditioningWarning, match="eigenvalues below .* Fallback: clamped"):
        P, P_inv = preconditioner("root_covariance", s, damping=0.0)
    torch.testing.assert_close(P @ P_inv, torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)


def test_singular_covariance_cholesky_fallback_raises_damping(randn):
    s = InputStats.from_activations(randn(6, 16, seed=8))
    with pytest.warns(CovarianceConditioningWarning, match="Cholesky .* failed"):
        P, P_inv = preconditioner("diag_hessian", s, damping=0.0)
    assert torch.isfinite(P).all() and torch.isfinite(P_inv).all()


def test_dead_channel_floored_with_warning(randn):
    X = randn(100, 5, seed=9)
    X[:, 2] = 0.0
    s = InputStats.from_activations(X)
    for kind in ("diag_l1", "diag_l2"):
        with pytest.warns(CovarianceConditioningWarning, match="dead channels"):
            P, P_inv = preconditioner(kind, s, damping=0.01)
        assert torch.isfinite(P_inv).all() and float(P[2, 2]) > 0


def test_no_warning_on_healthy_statistics(correlated_inputs):
    import warnings

    s = InputStats.from_activations(correlated_inputs(500, 8, seed=10))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CovarianceConditioningWarning)
        for kind in PRECONDITIONER_KINDS:
            preconditioner(kind, s, damping=0.0)


def test_unknown_kind_rejected(correlated_inputs):
    s = InputStats.from_activations(correlated_inputs(50, 4, seed=11))
    with pytest.raises(ValueError, match="unknown pre-conditioner"):
        preconditioner("rootcov", s, damping=0.0)


def test_cholesky_root_gives_identical_factors(randn, correlated_inputs):
    from converters.math.activation_svd import activation_aware_lowrank
    from converters.math.joint_qk import attention_aware_key_latent

    X = correlated_inputs(500, 16, seed=12)
    s = InputStats.from_activations(X)
    L, L_inv = preconditioner("root_covariance", s, damping=0.01, sqrt_method="cholesky")
    torch.testing.assert_close(L @ L.T, s.autocorrelation(0.01))
    assert torch.equal(L, torch.tril(L))
    P, P_inv = preconditioner("root_covariance", s, damping=0.01)
    W = randn(10, 16, seed=13)
    for r in (3, 7):
        A1, B1 = activation_aware_lowrank(W, r, P, P_inv)
        A2, B2 = activation_aware_lowrank(W, r, L, L_inv)
        torch.testing.assert_close(B2 @ A2, B1 @ A1, atol=1e-9, rtol=1e-9)
        # the latent c = A x itself matches up to the sign of each coordinate
        torch.testing.assert_close((A2 * torch.sign(A2[:, :1] / A1[:, :1])), A1, atol=1e-8, rtol=1e-8)
    W_q, W_k = randn(32, 16, seed=14), randn(8, 16, seed=15)
    a = attention_aware_key_latent(W_q, W_k, s, 5, num_kv_heads=2, damping=0.01)
    b = attention_aware_key_latent(W_q, W_k, s, 5, num_kv_heads=2, damping=0.01, sqrt_method="cholesky")
    torch.testing.assert_close(b.B_k @ b.A_k, a.B_k @ a.A_k, atol=1e-9, rtol=1e-9)


def test_cholesky_failure_falls_back_to_eigh_with_warning(randn):
    s = InputStats.from_activations(randn(6, 16, seed=16))  # rank 6 of 16, no damping
    with pytest.warns(CovarianceConditioningWarning) as rec:
        P, P_inv = preconditioner("root_covariance", s, damping=0.0, sqrt_method="cholesky")
    msgs = [str(w.message) for w in rec]
    assert any("Cholesky failed" in m for m in msgs) and any("Fallback: clamped" in m for m in msgs)
    torch.testing.assert_close(P @ P_inv, torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)
