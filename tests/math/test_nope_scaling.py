"""converters.math.nope_scaling: the fitted factors of the key parts that lose RoPE.

The attention output error is recomputed here independently (dense attention over per-pair score
terms written out with explicit 2-D rotations), not with the module's own helpers.
"""

import math

import pytest
import torch

from converters.math.nope_scaling import (
    GRID,
    fit_nope_scales,
    kept_projection_partial,
    kept_projection_shared,
)

N, L, H, G, D_H = 3, 24, 4, 2, 8
N_F = D_H // 2


def _problem(seed=0, inv_freq=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(N, L, H, D_H, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(N, L, G, D_H, generator=gen, dtype=torch.float64) * 2
    v = torch.randn(N, L, G, D_H, generator=gen, dtype=torch.float64)
    if inv_freq is None:
        inv_freq = 1.0 / (10000.0 ** (torch.arange(N_F, dtype=torch.float64) * 2 / D_H))
    return q, k, v, inv_freq


def _rot(x, pos, theta):
    """Rotate the 2-vectors x [..., 2] at positions pos by angle pos * theta."""
    c, s = torch.cos(pos * theta), torch.sin(pos * theta)
    return torch.stack((x[..., 0] * c - x[..., 1] * s, x[..., 1] * c + x[..., 0] * s), dim=-1)


def _output_error(q, k, v, inv_freq, P, alpha):
    """sum ||softmax(s(alpha)) v - softmax(s_source) v||^2, s built pair by pair."""
    scale = 1 / math.sqrt(D_H)
    pos = torch.arange(L, dtype=torch.float64)[None, :, None]
    g_of_h = torch.arange(H) // (H // G)
    s_src = torch.zeros(N, H, L, L, dtype=torch.float64)
    s_fit = torch.zeros_like(s_src)
    for i in range(N_F):
        qi, ki = q[..., [i, i + N_F]], k[..., [i, i + N_F]]  # [N, L, H|G, 2]
        q_r, k_r = _rot(qi, pos, inv_freq[i]), _rot(ki, pos, inv_freq[i])
        k_keep = torch.einsum("gh,nlhd->nlgd", P[i], k_r)
        k_nope = torch.einsum("gh,nlhd->nlgd", torch.eye(G, dtype=torch.float64) - P[i], ki)
        for h in range(H):
            g = g_of_h[h]
            s_src[:, h] += torch.einsum("ntd,nsd->nts", q_r[:, :, h], k_r[:, :, g])
            s_fit[:, h] += torch.einsum("ntd,nsd->nts", q_r[:, :, h], k_keep[:, :, g])
            s_fit[:, h] += alpha[i] * torch.einsum("ntd,nsd->nts", qi[:, :, h], k_nope[:, :, g])
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    vh = v[:, :, g_of_h].transpose(1, 2)  # [N, H, L, d]

    def out(s):
        return (s * scale).masked_fill(~mask, float("-inf")).softmax(-1) @ vh

    return (out(s_fit) - out(s_src)).pow(2).sum().item()


def test_nothing_nope_d_keeps_every_factor_at_one():
    q, k, v, inv_freq = _problem()
    P = kept_projection_partial([list(range(N_F))] * G, N_F)
    alpha = fit_nope_scales(q, k, v, inv_freq, P, 1 / math.sqrt(D_H))
    assert torch.equal(alpha, torch.ones(N_F, dtype=torch.float64))


def test_without_rotation_plain_nope_is_exact_and_kept():
    """theta = 0: a NoPE'd pair scores exactly as the source, so alpha = 1 (zero error) is chosen."""
    q, k, v, _ = _problem(inv_freq=torch.zeros(N_F, dtype=torch.float64))
    P = kept_projection_partial([[0], [1]], N_F)
    alpha = fit_nope_scales(q, k, v, torch.zeros(N_F, dtype=torch.float64), P, 1 / math.sqrt(D_H))
    assert torch.equal(alpha, torch.ones(N_F, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["partial", "shared"])
def test_fitted_factors_never_do_worse_than_plain_nope_or_dropping(mode):
    q, k, v, inv_freq = _problem(seed=1)
    if mode == "partial":
        P = kept_projection_partial([[3], [2]], N_F)  # each KV head keeps one (slow) pair
    else:
        U = torch.linalg.qr(torch.randn(N_F, G, G, generator=torch.Generator().manual_seed(2), dtype=torch.float64))[0]
        P = kept_projection_shared(U, [(3, 0), (2, 1), (3, 1)])
    alpha = fit_nope_scales(q, k, v, inv_freq, P, 1 / math.sqrt(D_H))
    assert set(alpha.tolist()) <= set(GRID)
    fitted = _output_error(q, k, v, inv_freq, P, alpha)
    plain = _output_error(q, k, v, inv_freq, P, torch.ones(N_F, dtype=torch.float64))
    dropped = _output_error(q, k, v, inv_freq, P, torch.zeros(N_F, dtype=torch.float64))
    assert fitted <= plain and fitted <= dropped
    assert fitted < plain  # the fast pairs' plain NoPE is not the best choice here
    assert alpha[0] < 1  # the fastest pair (theta = 1 rad/token) is shrunk


def test_kept_projections():
    P = kept_projection_partial([[0, 2], [2]], 3)
    assert P[:, 0, 0].tolist() == [1, 0, 1] and P[:, 1, 1].tolist() == [0, 0, 1] and P[:, 0, 1].abs().sum() == 0
    U = torch.linalg.qr(torch.randn(3, 2, 2, dtype=torch.float64))[0]
    Ps = kept_projection_shared(U, [(0, 0), (0, 1), (1, 1)])
    torch.testing.assert_close(Ps[0], torch.eye(2, dtype=torch.float64))  # both components: the identity
    torch.testing.assert_close(Ps[1] @ Ps[1], Ps[1])  # a projection
    assert Ps[2].abs().sum() == 0
