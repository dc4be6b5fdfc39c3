"""Where the positional information goes: RoPE pair selection (partial) and rotation (shared).

Symbols: H query heads, G KV heads, d_h head dim, n_f = d_h / 2 frequency pairs; pair i of a
head is dims (i, i + n_f) in Hugging Face's half-split layout (the paper's [2k, 2k+1] chunk),
rotating with theta_i = beta^(-2i / d_h): i = 0 is the fastest.

partial (MHA2MLA, section 3.1): each KV head keeps r pairs, the rest become NoPE.
shared (RoRoPE, TransMLA): for one frequency i the 2-D key sub-spaces of all G KV heads turn by
the same angle, so an orthogonal mixing U_i [G, G] of the heads (the same on both coordinates
of the pair) commutes with RoPE. With a_i, b_i the pair's two coordinates stacked over KV heads,
U_i = eigenvectors of E[a_i a_i^T + b_i b_i^T]; mixed components are ranked by eigenvalue
over all frequencies and the top K keep RoPE, shared by all query heads.
"""

from __future__ import annotations

import torch


# ---- partial RoPE: the four strategies of MHA2MLA section 3.1 --------------------------------

def s_high(n_f: int, r: int) -> list[int]:
    """S_high = {k | 0 <= k < r}: the r fastest-rotating pairs."""
    return list(range(r))


def s_low(n_f: int, r: int) -> list[int]:
    """S_low = {k | d_h/2 - r <= k < d_h/2}: the r slowest pairs."""
    return list(range(n_f - r, n_f))


def s_uniform(n_f: int, r: int) -> list[int]:
    """S_uniform = {floor(k d_h / (2r)) | 0 <= k < r}: equidistant pairs."""
    return [(k * n_f) // r for k in range(r)]


def two_norm_scores(q_pair_norms: torch.Tensor, k_pair_norms: torch.Tensor) -> torch.Tensor:
    """Head-wise 2-norm contribution (MHA2MLA section 3.1 and Appendix A).

    q_pair_norms: [H, n_f] mean over tokens of ||q^[pair i]|| per query head;
    k_pair_norms: [G, n_f] the same for keys. The Cauchy-Schwarz bound
    |<q_i, k_i>| <= ||q_i|| ||k_i|| is averaged within each GQA group (Appendix A): returns [G, n_f].
    """
    H, G = q_pair_norms.shape[0], k_pair_norms.shape[0]
    q_group = q_pair_norms.view(G, H // G, -1)  # [G, H/G, n_f]
    return (q_group * k_pair_norms[:, None, :]).mean(dim=1)


def s_2norm(scores: torch.Tensor, r: int) -> list[list[int]]:
    """S_2-norm = top-r(||q_i|| ||k_i||) per KV head: scores [G, n_f] -> sorted pair lists."""
    top = scores.topk(r, dim=-1).indices
    return [sorted(row.tolist()) for row in top]


STRATEGIES = {"high": s_high, "low": s_low, "uniform": s_uniform}


def select_partial_pairs(strategy: str, n_f: int, G: int, r: int, scores: torch.Tensor | None = None) -> list[list[int]]:
    """Kept pair indices for each of the G KV heads."""
    if not 1 <= r <= n_f:
        raise ValueError(f"rope pairs per head must be in [1, {n_f}] (head_dim/2), got {r}")
    if strategy == "2norm":
        if scores is None:
            raise ValueError("the 2norm strategy needs calibration statistics (q/k pair norms)")
        return s_2norm(scores, r)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown rope strategy {strategy!r}; choose one of high, low, uniform, 2norm")
    return [STRATEGIES[strategy](n_f, r)] * G


# ---- shared RoPE: per-frequency head mixing ---------------------------------------------------

def pair_covariance(keys: torch.Tensor) -> torch.Tensor:
    """sum over tokens of a_i a_i^T + b_i b_i^T per frequency: keys [N, G, d_h] -> [n_f, G, G] (float64)."""
    n_f = keys.shape[-1] // 2
    k = keys.to(torch.float64)
    a, b = k[..., :n_f], k[..., n_f:]  # [N, G, n_f]
    return torch.einsum("ngi,nhi->igh", a, a) + torch.einsum("ngi,nhi->igh", b, b)


def shared_rotation(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition per frequency: cov [n_f, G, G] -> (U [n_f, G, G], energy [n_f, G]).

    Columns of U_i are sorted by decreasing eigenvalue; U_i is orthogonal, so mixing the heads
    with it loses nothing until components are dropped.
    """
    energy, U = torch.linalg.eigh(cov)
    order = energy.argsort(dim=-1, descending=True)
    energy = energy.gather(-1, order)
    U = U.gather(-1, order[:, None, :].expand_as(U))
    return U, energy.clamp_min(0)


def top_components(energy: torch.Tensor, K: int) -> list[tuple[int, int]]:
    """The K mixed components (pair i, component j) with the most energy, in (i, j) order."""
    n_f, G = energy.shape
    if not 1 <= K <= n_f * G:
        raise ValueError(f"shared rope components must be in [1, {n_f * G}] (KV heads x head_dim/2), got {K}")
    flat = energy.flatten().topk(K).indices.tolist()
    return sorted((idx // G, idx % G) for idx in flat)
