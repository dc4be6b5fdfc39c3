"""Output-aware value latent: joint V/O decomposition (LatentLLM eq. 14-16, 180-195).

Symbols (nn.Linear convention; tokens are rows of X)

    D, D_out     input width of v_proj, output width of o_proj
    H, G, d      query heads, KV heads, head width; g(i) = i // (H // G) (GQA repeat_kv)
    W_v          [G d, D]       value rows to compress; W_v,g its g-th [d, D] block
    W_o          [D_out, H d]   output projection; W_o,i = W_o[:, i d:(i+1) d]  (kept dense)
    C, P         input second moment and a factor P P^T = C (root covariance; centred C0 with
                 centred=True, then pair with activation_svd.bias_update)
    r            value latent width (the cache)
    A_v          [r, D]         value down-projection: cached c_v = A_v x
    B_v          [G d, r]       value up-projection: v_g = B_v,g c_v  (absorbed into o at decode)
    G_i          = W_o,i W_v,g(i) P      [D_out, D]   (eq. 182)
    A'_v         = A_v P, orthonormal rows

Loss (eq. 182, per head, valid for any attention weights since each head's softmax only re-weights
tokens -- the heads' attention maps differ, so the summed form eq. 181 that assumes a common map
is not used):
    L = sum_i || W_o,i (W_v,g(i) - B_v,g(i) A_v) P ||_F^2 = sum_i ||G_i - B_o H_i A'_v||^2
In our MLA o_proj is not compressed, i.e. r_o = D_out and B_o B_o^T = I in eq. 183-184, so the
alternating HOSVD collapses to one closed-form step (eq. 184), the exact global optimum:
    A'_v = RightSingular_r[ sum_i G_i^T G_i ] = top_r eig[ sum_g Y_g^T O_g Y_g ],
           Y_g = W_v,g P,  O_g = sum_{i in g} W_o,i^T W_o,i
    B_v,g = W_v,g P A'_v^T  (eq. 186, J_i = I),   A_v = A'_v P^{-1}
(For fixed orthonormal A'_v, B_v,g = Y_g A'_v^T is optimal whatever the O_g weighting: the residual
Y_g (I - A'^T A') is orthogonal to the row space of A'.)

Bias (eq. 187-195): with centred=True the mean error (W_v - B_v A_v) mu goes into the value bias
(activation_svd.bias_update); because attention weights sum to one this is identical to eq. 191's
o_proj bias b_o + W_o,i (...) mu, and b_v can be kept as is (eq. 195 remark).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .joint_qk import default_group_map
from .preconditioners import preconditioner, top_right_singular_vectors
from .stats import InputStats

__all__ = [
    "JointVOResult",
    "joint_vo",
    "output_aware_value_latent",
    "value_output_error",
    "value_output_error_from_stats",
]


def _split(W_v: torch.Tensor, W_o: torch.Tensor, num_kv_heads: int, group_map):
    Gd, D = W_v.shape
    if Gd % num_kv_heads:
        raise ValueError(f"W_v rows {Gd} not divisible by num_kv_heads={num_kv_heads}")
    d = Gd // num_kv_heads
    D_out, Hd = W_o.shape
    if Hd % d:
        raise ValueError(f"W_o columns {Hd} not a multiple of head width {d}")
    H = Hd // d
    gmap = default_group_map(H, num_kv_heads) if group_map is None else torch.as_tensor(group_map)
    if gmap.shape != (H,) or int(gmap.min()) < 0 or int(gmap.max()) >= num_kv_heads:
        raise ValueError(f"group_map must map {H} query heads to [0, {num_kv_heads})")
    Wv = W_v.to(torch.float64).reshape(num_kv_heads, d, D)
    Wo = W_o.to(torch.float64).reshape(D_out, H, d).permute(1, 0, 2)  # [H, D_out, d]
    return Wv, Wo, gmap, H, d, D


@dataclass
class JointVOResult:
    """A_v [r, D], B_v [G d, r] (float64); loss = sum_i ||W_o,i (W_v - B_v A_v) P||^2 with C = P P^T
    normalised per token; loss_total = the loss at rank 0."""

    A_v: torch.Tensor
    B_v: torch.Tensor
    loss: float
    loss_total: float


def joint_vo(
    W_v: torch.Tensor,
    W_o: torch.Tensor,
    rank: int,
    *,
    num_kv_heads: int,
    P: torch.Tensor,
    P_inv: torch.Tensor,
    group_map=None,
) -> JointVOResult:
    """Value latent minimising the per-head output error after o_proj (eq. 182, 184, 186)."""
    Wv, Wo, gmap, H, d, D = _split(W_v, W_o, num_kv_heads, group_map)
    if not 0 <= rank <= D:
        raise ValueError(f"rank {rank} outside [0, {D}]")
    Y = Wv @ P.to(torch.float64)  # [G, d, D]   Y_g = W_v,g P
    Oh = Wo.transpose(1, 2) @ Wo  # [H, d, d]   W_o,i^T W_o,i
    Og = torch.zeros(num_kv_heads, d, d, dtype=torch.float64).index_add_(0, gmap, Oh)
    # sum_i G_i^T G_i = sum_g Y_g^T O_g Y_g = F^T F,  F = [O_g^{1/2} Y_g]_g  [G d, D] (thin)
    ev, V = torch.linalg.eigh(0.5 * (Og + Og.transpose(1, 2)))
    Og_half = (V * ev.clamp_min(0.0).sqrt()[:, None, :]) @ V.transpose(1, 2)
    F = (Og_half @ Y).reshape(num_kv_heads * d, D)
    Av_w = top_right_singular_vectors(F, rank, what="joint VO value plane")  # eq. 184, B_o B_o^T = I
    total = float(F.square().sum())
    captured = float((F @ Av_w.T).square().sum())
    B_v = (Y @ Av_w.T).reshape(num_kv_heads * d, rank)  # eq. 186, J_i = I
    A_v = Av_w @ P_inv.to(torch.float64)
    return JointVOResult(A_v=A_v, B_v=B_v, loss=total - captured, loss_total=total)


def output_aware_value_latent(
    W_v: torch.Tensor,
    W_o: torch.Tensor,
    stats: InputStats,
    rank: int,
    *,
    num_kv_heads: int,
    damping: float,
    centred: bool = False,
    group_map=None,
    sqrt_method: str = "eigh",
) -> JointVOResult:
    """(A_v [rank, D], B_v [G d, rank]) with root-covariance pre-conditioning (`damping` relative;
    sqrt_method="cholesky" is the fast, loss-identical root).

    centred=True: decompose on the centred covariance, then correct the value bias with
    ``bias_update(W_v, res.A_v, res.B_v, stats.mean, b_v)``.
    """
    P, P_inv = preconditioner("root_covariance", stats, damping=damping, centred=centred, sqrt_method=sqrt_method)
    return joint_vo(W_v, W_o, rank, num_kv_heads=num_kv_heads, P=P, P_inv=P_inv, group_map=group_map)


def value_output_error(
    W_v: torch.Tensor,
    W_o: torch.Tensor,
    W_v_hat: torch.Tensor,
    X: torch.Tensor,
    *,
    num_kv_heads: int,
    group_map=None,
) -> float:
    """sum_i ||X (W_o,i (W_v,g - W^_v,g))^T||_F^2 on activations X [N, D] (eq. 182; for tests)."""
    Wv, Wo, gmap, H, d, D = _split(W_v, W_o, num_kv_heads, group_map)
    E = Wv - W_v_hat.to(torch.float64).reshape(num_kv_heads, d, D)  # [G, d, D]
    X = X.to(torch.float64)
    return float(sum(float((X @ (Wo[i] @ E[int(gmap[i])]).T).square().sum()) for i in range(H)))


def value_output_error_from_stats(
    W_v: torch.Tensor,
    W_o: torch.Tensor,
    W_v_hat: torch.Tensor,
    C: torch.Tensor,
    *,
    num_kv_heads: int,
    group_map=None,
) -> float:
    """sum_i tr[W_o,i E_g C E_g^T W_o,i^T], E = W_v - W^_v; equals value_output_error for C = X^T X."""
    Wv, Wo, gmap, H, d, D = _split(W_v, W_o, num_kv_heads, group_map)
    E = Wv - W_v_hat.to(torch.float64).reshape(num_kv_heads, d, D)
    Oh = Wo.transpose(1, 2) @ Wo  # [H, d, d]
    ECE = E @ C.to(torch.float64) @ E.transpose(1, 2)  # [G, d, d]
    return float((Oh * ECE[gmap]).sum())
