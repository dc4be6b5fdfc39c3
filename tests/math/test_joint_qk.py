import pytest
import torch

from converters.math.activation_svd import activation_aware_lowrank
from converters.math.joint_qk import (
    attention_aware_key_latent,
    attention_logit_error,
    attention_logit_error_from_stats,
    default_group_map,
    joint_qk_hosvd,
)
from converters.math.preconditioners import preconditioner
from converters.math.stats import InputStats

D, d = 32, 8
CONFIGS = {"mha": (4, 4), "gqa": (8, 2)}  # (H, G)


def _setup(kind, randn, correlated_inputs, seed=0, n=300, mean_scale=0.0):
    H, G = CONFIGS[kind]
    W_q = randn(H * d, D, seed=10 + seed)
    W_k = randn(G * d, D, seed=20 + seed)
    X = correlated_inputs(n, D, seed=30 + seed, mean_scale=mean_scale)
    return H, G, W_q, W_k, X, InputStats.from_activations(X)


def test_default_group_map():
    assert default_group_map(8, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert default_group_map(4, 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        default_group_map(6, 4)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_logit_error_from_stats_equals_direct(kind, randn, correlated_inputs):
    H, G, W_q, W_k, X, s = _setup(kind, randn, correlated_inputs, n=200)
    W_k_hat = W_k + 0.1 * randn(*W_k.shape, seed=1)
    W_q_hat = W_q + 0.1 * randn(*W_q.shape, seed=2)
    direct = attention_logit_error(W_q, W_k, W_k_hat, X, num_kv_heads=G, W_q_hat=W_q_hat)
    via = attention_logit_error_from_stats(W_q, W_k, W_k_hat, X.T @ X, num_kv_heads=G, W_q_hat=W_q_hat)
    assert abs(direct - via) <= 1e-9 * direct


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_attention_aware_beats_activation_aware_key_svd(kind, randn, correlated_inputs):
    """LatentLLM Fig. 9: attention-aware (joint QK) < activation-aware SVD of W_k alone, logit error."""
    H, G, W_q, W_k, X, s = _setup(kind, randn, correlated_inputs)
    P, P_inv = preconditioner("root_covariance", s, damping=0.0)
    n = X.shape[0]
    for r in (2, 6, 12):  # < G d = 16 (GQA): at r >= G d both are exact
        res = attention_aware_key_latent(W_q, W_k, s, r, num_kv_heads=G, damping=0.0)
        assert res.A_k.shape == (r, D) and res.B_k.shape == (G * d, r)
        e_joint = attention_logit_error(W_q, W_k, res.B_k @ res.A_k, X, num_kv_heads=G)
        A, B = activation_aware_lowrank(W_k, min(r, G * d), P, P_inv)
        e_act = attention_logit_error(W_q, W_k, B @ A, X, num_kv_heads=G)
        assert e_joint < 0.99 * e_act, (r, e_joint, e_act)
        # the reported loss is the whitened logit loss with C = X^T X / n on both sides (eq. 90)
        assert abs(res.loss * n**2 - e_joint) <= 1e-8 * e_joint


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_exact_at_full_rank(kind, randn, correlated_inputs):
    H, G, W_q, W_k, X, s = _setup(kind, randn, correlated_inputs)
    res = attention_aware_key_latent(W_q, W_k, s, D, num_kv_heads=G, damping=0.01)
    torch.testing.assert_close(res.B_k @ res.A_k, W_k, atol=1e-9, rtol=1e-9)
    assert abs(res.loss) <= 1e-9 * res.loss_total
    # rank >= rank(sum_i G_i) = G d is also exact on the logit loss (the key rows span G d dims)
    res = attention_aware_key_latent(W_q, W_k, s, G * d, num_kv_heads=G, damping=0.01)
    assert abs(res.loss) <= 1e-9 * res.loss_total


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_hosvd_with_query_compression(kind, randn, correlated_inputs):
    """Algorithm 1 with r_q < D: the loss is monotone over the alternating updates and the joint
    decomposition beats separate activation-aware SVDs of W_q and W_k (Fig. 9)."""
    H, G, W_q, W_k, X, s = _setup(kind, randn, correlated_inputs, seed=1)
    P, P_inv = preconditioner("root_covariance", s, damping=0.0)
    for r_q, r_k in ((8, 8), (12, 6)):
        res = joint_qk_hosvd(
            W_q, W_k, r_k, num_kv_heads=G, P_q=P, P_k=P, P_k_inv=P_inv, rank_q=r_q, P_q_inv=P_inv, n_iter=6
        )
        h = res.loss_history
        assert all(b <= a * (1 + 1e-10) + 1e-12 for a, b in zip(h, h[1:])), h
        assert res.A_q.shape == (r_q, D) and res.B_q.shape == (H * d, r_q)
        e_joint = attention_logit_error(
            W_q, W_k, res.B_k @ res.A_k, X, num_kv_heads=G, W_q_hat=res.B_q @ res.A_q
        )
        assert abs(res.loss * X.shape[0] ** 2 - e_joint) <= 1e-8 * e_joint
        Aq, Bq = activation_aware_lowrank(W_q, r_q, P, P_inv)
        Ak, Bk = activation_aware_lowrank(W_k, r_k, P, P_inv)
        e_sep = attention_logit_error(W_q, W_k, Bk @ Ak, X, num_kv_heads=G, W_q_hat=Bq @ Aq)
        assert e_joint < e_sep, (r_q, r_k, e_joint, e_sep)


def test_full_query_rank_reduces_to_closed_form(randn, correlated_inputs):
    H, G, W_q, W_k, X, s = _setup("gqa", randn, correlated_inputs, seed=2)
    P, P_inv = preconditioner("root_covariance", s, damping=0.0)
    a = joint_qk_hosvd(W_q, W_k, 6, num_kv_heads=G, P_q=P, P_k=P, P_k_inv=P_inv)
    b = joint_qk_hosvd(W_q, W_k, 6, num_kv_heads=G, P_q=P, P_k=P, P_k_inv=P_inv, rank_q=D, P_q_inv=P_inv, n_iter=2)
    assert abs(a.loss - b.loss) <= 1e-9 * a.loss_total
    torch.testing.assert_close(a.B_k @ a.A_k, b.B_k @ b.A_k, atol=1e-8, rtol=1e-8)


def test_query_bias_is_taken_into_account(randn, correlated_inputs):
    H, G, W_q, W_k, X, s = _setup("gqa", randn, correlated_inputs, seed=3, mean_scale=1.0)
    b_q = 3.0 * randn(H * d, seed=4)

    def biased_logit_error(W_k_hat):
        err = 0.0
        gm = default_group_map(H, G)
        for i in range(H):
            g = int(gm[i])
            q = X @ W_q[i * d : (i + 1) * d].T + b_q[i * d : (i + 1) * d]
            err += float((q @ (X @ (W_k[g * d : (g + 1) * d] - W_k_hat[g * d : (g + 1) * d]).T).T).square().sum())
        return err

    with_b = attention_aware_key_latent(W_q, W_k, s, 6, num_kv_heads=G, damping=0.0, b_q=b_q)
    without = attention_aware_key_latent(W_q, W_k, s, 6, num_kv_heads=G, damping=0.0)
    e_with = biased_logit_error(with_b.B_k @ with_b.A_k)
    assert abs(with_b.loss * X.shape[0] ** 2 - e_with) <= 1e-8 * e_with
    assert e_with < biased_logit_error(without.B_k @ without.A_k)


def test_centred_keys_minimise_softmax_invariant_error(randn, correlated_inputs):
    """A per-query constant logit error is invisible after softmax; centred key statistics minimise
    the error with that constant removed (row-centred logit error)."""
    H, G, W_q, W_k, X, s = _setup("gqa", randn, correlated_inputs, seed=4, mean_scale=2.0)

    def row_centred_error(W_k_hat):
        err = 0.0
        gm = default_group_map(H, G)
        for i in range(H):
            g = int(gm[i])
            E = (X @ W_q[i * d : (i + 1) * d].T) @ (X @ (W_k - W_k_hat)[g * d : (g + 1) * d].T).T
            err += float((E - E.mean(1, keepdim=True)).square().sum())
        return err

    cen = attention_aware_key_latent(W_q, W_k, s, 5, num_kv_heads=G, damping=0.0, centred_keys=True)
    unc = attention_aware_key_latent(W_q, W_k, s, 5, num_kv_heads=G, damping=0.0)
    assert row_centred_error(cen.B_k @ cen.A_k) < row_centred_error(unc.B_k @ unc.A_k)
