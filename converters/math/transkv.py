"""TransKV per-KV-head projections of post-RoPE keys and of values (TransKV, as in the authors' code).

Symbols

    H, G, d      query heads, KV heads, head width; g(i) = i // (H // G) (GQA repeat_kv)
    k_g, v_g     [d]  post-RoPE key / value of KV head g for one token
    Ck, Cv       [G, d, d]  auto-correlations sum_t k k^T / n, sum_t v v^T / n over calibration
                 tokens, float64 (:func:`head_autocorrelation`)
    lam_g        0.01 * mean(diag(C_g))   damping (authors' code)
    P_K, P_V     [G, d, r_k], [G, d, r_v]  top-r eigenvectors of C_g + lam_g I (columns, descending)
    W_v, W_o     [G d, D], [D_out, H d]   value / output projections (nn.Linear convention)

Run-time form (TransKV §A.6/A.8: "P_K projects W_Q, P_K^T projects W_K"; "P_V for W_V, P_V^T for W_O"):
    keys:    k'_g = P_K[g]^T RoPE(k_g)            [r_k]  <- cached
    queries: q'_i = P_K[g(i)]^T RoPE(q_i)         [r_k]  (RoPE at full width d, then project)
    logits:  q'_i . k'_g = RoPE(q_i)^T P P^T RoPE(k_g) ~= RoPE(q_i)^T RoPE(k_g)
    values:  v'_g = P_V[g]^T v_g = (P_V[g]^T W_v,g) x  -> fold P_V into W_v (rows) ...
    output:  o = sum_i W_o,i P_V[g(i)] (attn_i v'_g(i))  -> ... and into W_o (columns)
Because RoPE is applied before the projection, keys cannot be folded into W_k: the projection is
an extra d x r_k matmul on rotated q and k at run time (TransKV "operates on RoPE(K)").

Softmax scale: the projected logits approximate the original ones, so the original 1/sqrt(d) is
the consistent choice; 1/sqrt(r_k) (the width actually multiplied) is offered as the alternative
(:func:`transkv_softmax_scale`).

Numerical notes: the damping shifts every eigenvalue by lam_g and does not change eigenvectors
(it only protects the eigensolver); a KV head whose statistics are all zero (dead head) has no
preferred directions -- warned (CovarianceConditioningWarning) and given the first r coordinate
axes as its (still orthonormal) projection.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from .joint_qk import default_group_map
from .preconditioners import top_eigenvectors
from .stats import CovarianceConditioningWarning, relative_damping

__all__ = [
    "head_autocorrelation",
    "transkv_projections",
    "project_heads",
    "fold_value_projection",
    "transkv_softmax_scale",
]


def head_autocorrelation(x: torch.Tensor) -> torch.Tensor:
    """sum_t x_t x_t^T / n per head, float64 [G, d, d], from x: [..., G, d] (e.g. post-RoPE keys)."""
    G, d = x.shape[-2:]
    x = x.reshape(-1, G, d).to(torch.float64)
    return torch.einsum("ngi,ngj->gij", x, x) / max(x.shape[0], 1)


def _per_head_top(C: torch.Tensor, r: int, damping: float, what: str) -> torch.Tensor:
    if C.ndim != 3 or C.shape[1] != C.shape[2]:
        raise ValueError(f"{what}: expected [G, d, d], got {tuple(C.shape)}")
    G, d, _ = C.shape
    if not 0 <= r <= d:
        raise ValueError(f"{what}: rank {r} outside [0, {d}]")
    out = []
    for g in range(G):
        Cg = C[g].to(torch.float64)
        Cg = 0.5 * (Cg + Cg.T)
        lam = relative_damping(Cg, damping)  # 0.01 * mean diag (authors' code)
        if not float(torch.diagonal(Cg).sum()) > 0.0:
            warnings.warn(
                f"{what}: KV head {g} has all-zero statistics (dead head). Fallback: the first {r} "
                "coordinate axes as projection.",
                CovarianceConditioningWarning,
                stacklevel=3,
            )
            out.append(torch.eye(d, r, dtype=torch.float64, device=C.device))
            continue
        eye = torch.eye(d, dtype=torch.float64, device=C.device)
        out.append(top_eigenvectors(Cg + lam * eye, r, what=f"{what} head {g}").T)  # [d, r]
    return torch.stack(out)


def transkv_projections(
    Ck: torch.Tensor, Cv: torch.Tensor, r_k: int, r_v: int, *, damping: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """P_K [G, d, r_k], P_V [G, d, r_v]: per KV head, top eigenvectors of the damped auto-correlation
    of post-RoPE keys / of values (float64, orthonormal columns, descending eigenvalue)."""
    return (
        _per_head_top(Ck, r_k, damping, "TransKV key projection"),
        _per_head_top(Cv, r_v, damping, "TransKV value projection"),
    )


def project_heads(x: torch.Tensor, P: torch.Tensor, group_map=None) -> torch.Tensor:
    """x [..., n, d] -> [..., n, r]: head j multiplied by P[group(j)]^T.

    Keys / values: n = G and the identity map (default when n == G).  Queries: n = H, group_map
    default i // (H // G).  Apply to RoPE'd queries and keys.
    """
    n, d = x.shape[-2:]
    G = P.shape[0]
    if group_map is None:
        group_map = torch.arange(G) if n == G else default_group_map(n, G)
    Pm = P.to(x.dtype)[torch.as_tensor(group_map)]  # [n, d, r]
    return torch.einsum("...nd,ndr->...nr", x, Pm)


def fold_value_projection(
    W_v: torch.Tensor,
    W_o: torch.Tensor,
    P_v: torch.Tensor,
    *,
    group_map=None,
    b_v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fold P_V into the value and output projections.

    W_v' [G r, D]:      block g = P_V[g]^T W_v,g
    W_o' [D_out, H r]:  block i = W_o,i P_V[g(i)]
    b_v' [G r]:         block g = P_V[g]^T b_v,g  (None if b_v is None)
    At r = d (full rank, P_V orthogonal) the attention output is unchanged.  float64 outputs.
    """
    G, d, r = P_v.shape
    Gd, D = W_v.shape
    if Gd != G * d:
        raise ValueError(f"W_v rows {Gd} != G d = {G * d}")
    D_out, Hd = W_o.shape
    if Hd % d:
        raise ValueError(f"W_o columns {Hd} not a multiple of d = {d}")
    H = Hd // d
    gmap = default_group_map(H, G) if group_map is None else torch.as_tensor(group_map)
    P = P_v.to(torch.float64)
    Wv = W_v.to(torch.float64).reshape(G, d, D)
    Wv_new = (P.transpose(1, 2) @ Wv).reshape(G * r, D)
    Wo = W_o.to(torch.float64).reshape(D_out, H, d)
    Wo_new = torch.einsum("ohd,hdr->ohr", Wo, P[gmap]).reshape(D_out, H * r)
    bv_new = None
    if b_v is not None:
        bv_new = (P.transpose(1, 2) @ b_v.to(torch.float64).reshape(G, d, 1)).reshape(G * r)
    return Wv_new, Wo_new, bv_new


def transkv_softmax_scale(head_dim: int, r_k: int, mode: Literal["original", "reduced"] = "original") -> float:
    """1/sqrt(head_dim) ("original": logits approximate the source logits) or 1/sqrt(r_k)."""
    if mode == "original":
        return head_dim**-0.5
    if mode == "reduced":
        return r_k**-0.5
    raise ValueError("mode must be 'original' or 'reduced'")
