"""Scale the key parts that lose RoPE (partial / shared modes), fitted on the source attention output.

Moving a frequency pair of the keys to NoPE replaces its score term q_i^T R(theta_i (t - s)) k_i by
q_i^T k_i: exact for neighbours, but for fast-turning pairs an unrotated term that never averages
out over distance, so distant keys gain spurious attention. Dropping the pair instead loses the
neighbours' term. This module picks, per pair i, a factor alpha_i for the NoPE'd part:

    s_h,t,s = scale * sum_i [ q_h,i(t)^T R(theta_i (t - s)) P_i k_g,i(s)            (kept, rotated)
                             + alpha_i q_h,i(t)^T (I - P_i) k_g,i(s) ]              (NoPE'd)

with P_i the projection (over KV heads) onto the components of pair i that keep RoPE (partial:
the heads that keep pair i; shared: sum of u u^T over the kept mixed components), g = g(h).
alpha is chosen by coordinate descent over a small grid, minimising on calibration sequences
sum ||softmax(s) v - o_source||^2, the squared error of the layer's attention output against the
source model's (all pairs NoPE'd at once, so the errors of different pairs add up as they will).
alpha = 1 everywhere is MHA2MLA's plain NoPE; alpha_i = 0 removes pair i's NoPE'd part.
"""

from __future__ import annotations

import torch

from latentkv.rope import rotate

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def kept_projection_partial(pairs: list[list[int]], n_f: int) -> torch.Tensor:
    """P [n_f, G, G] for partial RoPE: P_i[g, g] = 1 if KV head g keeps pair i."""
    P = torch.zeros(n_f, len(pairs), len(pairs), dtype=torch.float64)
    for g, kept in enumerate(pairs):
        P[kept, g, g] = 1.0
    return P


def kept_projection_shared(U: torch.Tensor, components: list[tuple[int, int]]) -> torch.Tensor:
    """P [n_f, G, G] for shared RoPE: sum of u u^T over the kept components (pair i, column j of U_i)."""
    U = U.to(torch.float64)
    P = torch.zeros_like(U)
    for i, j in components:
        P[i] += torch.outer(U[i, :, j], U[i, :, j])
    return P


def fit_nope_scales(
    q: torch.Tensor,  # [N, L, H, d_h] source queries (q-normed, before RoPE)
    k: torch.Tensor,  # [N, L, G, d_h] source keys, before RoPE
    v: torch.Tensor,  # [N, L, G, d_v]
    inv_freq: torch.Tensor,  # [d_h / 2]
    P: torch.Tensor,  # [n_f, G, G] kept projection per pair
    scale: float,
    *,
    grid: tuple[float, ...] = GRID,
    sweeps: int = 2,
) -> torch.Tensor:
    """alpha [n_f] (float64): the factor of each pair's NoPE'd key part (pairs with nothing NoPE'd: 1)."""
    N, L, H, d_h = q.shape
    G, n_f = k.shape[2], d_h // 2
    group = torch.arange(H) // (H // G)
    q, k, v = q.double(), k.double(), v.double()[:, :, group]
    pos = torch.arange(L).expand(N, L)
    q_rot, k_rot = rotate(q, pos, inv_freq), rotate(k, pos, inv_freq)
    causal = torch.ones(L, L, dtype=torch.bool).tril()

    def output(scores: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nhts,nshd->nhtd", scores.masked_fill(~causal, float("-inf")).softmax(-1), v)

    def pair(x: torch.Tensor, i: int) -> torch.Tensor:  # half-split layout: dims i and i + n_f
        return x[..., [i, i + n_f]]

    def score(qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:  # [N, L, H, 2] x [N, L, G, 2] -> [N, H, L, L]
        return torch.einsum("nthd,nshd->nhts", qi, ki[:, :, group]) * scale

    P = P.to(torch.float64)
    nope = torch.eye(G, dtype=torch.float64) - P  # [n_f, G, G]

    def kept_score(i: int) -> torch.Tensor:  # R(theta t) P_i k = P_i R(theta t) k: P mixes heads only
        return score(pair(q_rot, i), torch.einsum("gh,nshd->nsgd", P[i], pair(k_rot, i)))

    def nope_score(i: int) -> torch.Tensor:  # unrotated (I - P_i) k, scored against the unrotated query
        return score(pair(q, i), torch.einsum("gh,nshd->nsgd", nope[i], pair(k, i)))

    target = output(score(q_rot, k_rot))
    alpha = torch.ones(n_f, dtype=torch.float64)
    nope_pairs = [i for i in range(n_f) if nope[i].abs().max() > 1e-12]
    total = sum(kept_score(i) for i in range(n_f)) + sum(nope_score(i) for i in nope_pairs)  # alpha = 1
    for _ in range(sweeps):
        for i in nope_pairs:
            s_i = nope_score(i)  # recomputed rather than kept: n_f score tensors of [N, H, L, L] would not fit
            errors = [(output(total + (a - alpha[i]) * s_i) - target).pow(2).sum().item() for a in grid]
            best = grid[min(range(len(grid)), key=errors.__getitem__)]
            total = total + (best - alpha[i]) * s_i
            alpha[i] = best
    return alpha
