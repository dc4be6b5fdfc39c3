import pytest
import torch

from converters.math.activation_svd import activation_aware_lowrank, bias_update
from converters.math.joint_vo import (
    output_aware_value_latent,
    value_output_error,
    value_output_error_from_stats,
)
from converters.math.preconditioners import preconditioner
from converters.math.stats import InputStats

D, d, D_out = 32, 8, 24
CONFIGS = {"mha": (4, 4), "gqa": (8, 2)}


def _setup(kind, randn, correlated_inputs, seed=0, mean_scale=0.0):
    H, G = CONFIGS[kind]
    W_v = randn(G * d, D, seed=40 + seed)
    # uneven output heads / directions, as in trained models: makes the o_proj weighting matter
    W_o = randn(D_out, H * d, seed=50 + seed) * torch.exp(randn(H * d, seed=60 + seed))
    X = correlated_inputs(300, D, seed=70 + seed, mean_scale=mean_scale)
    return H, G, W_v, W_o, X, InputStats.from_activations(X)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_output_aware_beats_activation_aware_value_svd(kind, randn, correlated_inputs):
    H, G, W_v, W_o, X, s = _setup(kind, randn, correlated_inputs)
    P, P_inv = preconditioner("root_covariance", s, damping=0.0)
    for r in (2, 6, 12):
        res = output_aware_value_latent(W_v, W_o, s, r, num_kv_heads=G, damping=0.0)
        assert res.A_v.shape == (r, D) and res.B_v.shape == (G * d, r)
        e_joint = value_output_error(W_v, W_o, res.B_v @ res.A_v, X, num_kv_heads=G)
        A, B = activation_aware_lowrank(W_v, r, P, P_inv)
        e_act = value_output_error(W_v, W_o, B @ A, X, num_kv_heads=G)
        assert e_joint < 0.99 * e_act, (r, e_joint, e_act)
        assert abs(res.loss * X.shape[0] - e_joint) <= 1e-8 * e_joint
        via = value_output_error_from_stats(W_v, W_o, res.B_v @ res.A_v, X.T @ X, num_kv_heads=G)
        assert abs(via - e_joint) <= 1e-9 * e_joint


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_exact_at_full_rank(kind, randn, correlated_inputs):
    H, G, W_v, W_o, X, s = _setup(kind, randn, correlated_inputs)
    res = output_aware_value_latent(W_v, W_o, s, D, num_kv_heads=G, damping=0.01)
    torch.testing.assert_close(res.B_v @ res.A_v, W_v, atol=1e-9, rtol=1e-9)
    assert abs(res.loss) <= 1e-9 * res.loss_total


def test_centred_with_bias_update_exact_on_mean_after_o_proj(randn, correlated_inputs):
    H, G, W_v, W_o, X, s = _setup("gqa", randn, correlated_inputs, seed=1, mean_scale=3.0)
    b_v = randn(G * d, seed=5)
    res = output_aware_value_latent(W_v, W_o, s, 5, num_kv_heads=G, damping=0.0, centred=True)
    b_hat = bias_update(W_v, res.A_v, res.B_v, s.mean, b_v)
    rep = torch.arange(H) // (H // G)

    def attn_out(Wv, bv, attn):  # o_proj(concat_i attn_i @ v_g(i)), attn rows sum to one
        v = (X @ Wv.T + bv).reshape(-1, G, d)
        heads = [attn[i] @ v[:, int(rep[i])] for i in range(H)]
        return torch.cat(heads, -1) @ W_o.T

    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(H, X.shape[0], X.shape[0], generator=g, dtype=torch.float64), -1)
    ref = attn_out(W_v, b_v, attn)
    approx = attn_out(res.B_v @ res.A_v, b_hat, attn)
    uniform = torch.full_like(attn, 1.0 / X.shape[0])  # every query sees the mean token: exact
    torch.testing.assert_close(attn_out(res.B_v @ res.A_v, b_hat, uniform), attn_out(W_v, b_v, uniform))
    unc = output_aware_value_latent(W_v, W_o, s, 5, num_kv_heads=G, damping=0.0)
    approx_unc = attn_out(unc.B_v @ unc.A_v, b_v, attn)
    assert float((approx - ref).square().sum()) < float((approx_unc - ref).square().sum())
