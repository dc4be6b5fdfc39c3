import numpy as np
import pytest
import torch

from converters.math.stats import CovarianceConditioningWarning
from converters.math.transkv import (
    fold_value_projection,
    head_autocorrelation,
    project_heads,
    transkv_projections,
    transkv_softmax_scale,
)

N, D, d, H, G, D_out = 200, 24, 8, 4, 2, 20


def _rope(x, pos, base=10000.0):  # rotate-half RoPE on the last dim, x: [N, heads, d]
    half = x.shape[-1] // 2
    inv = base ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = pos[:, None].double() * inv[None]  # [N, half]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def _data(randn, correlated_inputs):
    X = correlated_inputs(N, D, seed=1)
    W_q, W_k, W_v = randn(H * d, D, seed=2), randn(G * d, D, seed=3), randn(G * d, D, seed=4)
    W_o = randn(D_out, H * d, seed=5)
    pos = torch.arange(N)
    q = _rope((X @ W_q.T).reshape(N, H, d), pos)
    k = _rope((X @ W_k.T).reshape(N, G, d), pos)
    v = (X @ W_v.T).reshape(N, G, d)
    return X, W_q, W_k, W_v, W_o, q, k, v


def test_projections_match_definition_and_are_orthonormal(randn, correlated_inputs):
    X, *_, q, k, v = _data(randn, correlated_inputs)
    Ck, Cv = head_autocorrelation(k), head_autocorrelation(v)
    assert Ck.shape == (G, d, d) and Ck.dtype == torch.float64
    torch.testing.assert_close(Ck[1], k[:, 1].T @ k[:, 1] / N)
    P_K, P_V = transkv_projections(Ck, Cv, 3, 5)
    assert P_K.shape == (G, d, 3) and P_V.shape == (G, d, 5)
    for P in (P_K, P_V):
        torch.testing.assert_close(P.transpose(1, 2) @ P, torch.eye(P.shape[2], dtype=torch.float64).expand(G, -1, -1))
    for g in range(G):  # authors' code: top-r eigenvectors of C + 0.01 mean(diag) I (compare projectors)
        C = Ck[g].numpy() + 0.01 * np.trace(Ck[g].numpy()) / d * np.eye(d)
        w, V = np.linalg.eigh(C)
        top = V[:, np.argsort(w)[::-1][:3]]
        np.testing.assert_allclose(P_K[g].numpy() @ P_K[g].numpy().T, top @ top.T, atol=1e-10)
    # damping shifts eigenvalues only: same subspace without it
    P_K0, _ = transkv_projections(Ck, Cv, 3, 5, damping=0.0)
    torch.testing.assert_close(P_K0 @ P_K0.transpose(1, 2), P_K @ P_K.transpose(1, 2))


def test_key_projection_captures_most_energy(randn, correlated_inputs):
    *_, q, k, v = _data(randn, correlated_inputs)
    P_K, _ = transkv_projections(head_autocorrelation(k), head_autocorrelation(v), 3, 3)
    kept = project_heads(k, P_K).square().sum()
    for seed in range(5):
        R, _ = torch.linalg.qr(randn(G, d, 3, seed=seed))
        assert kept >= project_heads(k, R).square().sum()


def test_full_rank_exact_logits_and_output(randn, correlated_inputs):
    X, W_q, W_k, W_v, W_o, q, k, v = _data(randn, correlated_inputs)
    P_K, P_V = transkv_projections(head_autocorrelation(k), head_autocorrelation(v), d, d)
    rep = torch.arange(H) // (H // G)
    logits = torch.einsum("nhd,mhd->hnm", q, k[:, rep])
    qp, kp = project_heads(q, P_K), project_heads(k, P_K)  # RoPE at full width, then project
    assert qp.shape == (N, H, d) and kp.shape == (N, G, d)
    torch.testing.assert_close(torch.einsum("nhr,mhr->hnm", qp, kp[:, rep]), logits)
    Wv2, Wo2, _ = fold_value_projection(W_v, W_o, P_V)
    attn = torch.softmax(logits * transkv_softmax_scale(d, d), -1)
    out = torch.einsum("hnm,mhd->nhd", attn, v[:, rep]).reshape(N, H * d) @ W_o.T
    v2 = (X @ Wv2.T).reshape(N, G, d)
    out2 = torch.einsum("hnm,mhd->nhd", attn, v2[:, rep]).reshape(N, H * d) @ Wo2.T
    torch.testing.assert_close(out2, out)


def test_fold_equals_projected_values_at_low_rank(randn, correlated_inputs):
    X, W_q, W_k, W_v, W_o, q, k, v = _data(randn, correlated_inputs)
    b_v = randn(G * d, seed=7)
    _, P_V = transkv_projections(head_autocorrelation(k), head_autocorrelation(v), 2, 3)
    Wv2, Wo2, bv2 = fold_value_projection(W_v, W_o, P_V, b_v=b_v)
    assert Wv2.shape == (G * 3, D) and Wo2.shape == (D_out, H * 3) and bv2.shape == (G * 3,)
    rep = torch.arange(H) // (H // G)
    vb = (X @ W_v.T + b_v).reshape(N, G, d)
    ref = torch.einsum("nhd,hde,hfe->nhf", vb[:, rep], P_V[rep], P_V[rep])  # P P^T v per query head
    ref = ref.reshape(N, H * d) @ W_o.T
    got = (X @ Wv2.T + bv2).reshape(N, G, 3)[:, rep].reshape(N, H * 3) @ Wo2.T
    torch.testing.assert_close(got, ref)


def test_dead_head_fallback_warns(randn):
    Ck = torch.zeros(2, 4, 4, dtype=torch.float64)
    Ck[0] = torch.eye(4, dtype=torch.float64)
    with pytest.warns(CovarianceConditioningWarning, match="dead head"):
        P_K, _ = transkv_projections(Ck, Ck, 2, 2)
    torch.testing.assert_close(P_K[1].T @ P_K[1], torch.eye(2, dtype=torch.float64))


def test_softmax_scale():
    assert transkv_softmax_scale(64, 16) == 64**-0.5
    assert transkv_softmax_scale(64, 16, "reduced") == 0.25
    with pytest.raises(ValueError):
        transkv_softmax_scale(64, 16, "other")
