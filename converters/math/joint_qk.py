"""Attention-aware key latent: joint Q/K HOSVD (LatentLLM Algorithm 1, eq. 10-13, 83-93, 143-148).

Symbols (nn.Linear convention; tokens are rows of X)

    D            hidden (input) width
    H, G         query heads, KV heads (GQA: H = n_rep * G; MHA: G = H)
    d            head width of the compressed (NoPE) part: W_q rows per head = W_k rows per head = d
    g(i)         KV head of query head i; HF repeat_kv convention g(i) = i // (H // G) (eq. 144)
    W_q          [H d, D]   query rows that pair with the compressed key dims; W_q,i its i-th block
    W_k          [G d, D]   key rows to compress; W_k,g its g-th [d, D] block
    b_q          [H d]      optional query bias (Qwen2-style)
    C_q, C_k     [D, D]     input second moments on the query / key side (C_k may be centred,
                            see ``centred_keys``); P_q, P_k any factors with P P^T = C
                            (root covariance, Table 1)
    r_k, r_q     key latent width (the cache), query latent width (None = queries not compressed)
    A_k          [r_k, D]   key down-projection: cached c_k = A_k x
    B_k          [G d, r_k] key up-projection: k_g = B_k,g c_k  (absorbed into q at decode)
    A_q, B_q     [r_q, D], [H d, r_q] optional query factors (only if r_q is given)
    G_i          = P_q^T W_q,i^T W_k,g(i) P_k   [D, D]  whitened bilinear form of head i (eq. 13)
    A'_k, A'_q   = A_k P_k, A_q P_q  (orthonormal rows: the HOSVD tensor planes, eq. 92-93)

Loss (eq. 11, 83-90, GQA eq. 146-148): the attention-logit error over all calibration token pairs
    L = sum_i sum_{m,n} (q_i,m^T k_g(i),n - q^_i,m^T k^_g(i),n)^2
      = sum_i tr[Delta_i C_k Delta_i^T C_q]      (exact for the empirical sums, C = X^T X)
      = sum_i || G_i - A'_q^T H_i A'_k ||^2,     H_i = A'_q G_i A'_k^T (eq. 61-62)
      = sum_i ||G_i||^2 - ||A'_q G_i A'_k^T||^2  (eq. 66)
Causal masking and RoPE are not in the loss (the compressed dims are NoPE; RoPE dims are kept
uncompressed by the converter).

Algorithm 1 (alternating HOSVD), written without forming the D x D slices G_i:
    init   A'_q = top_rq eig[ sum_i G_i G_i^T ]
    repeat A'_k = top_rk eig[ sum_i G_i^T A'_q^T A'_q G_i ]   (eq. 75)
           A'_q = top_rq eig[ sum_i G_i A'_k^T A'_k G_i^T ]   (eq. 73)
Each half-step maximises the captured energy given the other plane, so L is non-increasing.
Our MLA only caches keys, so by default r_q = None: A'_q = I and the A'_k step is the exact global
optimum in closed form (one eigendecomposition; iterations are irrelevant):
    A'_k = top_rk eig[ sum_g Y_g^T Q_g Y_g ],  Y_g = W_k,g P_k,  Q_g = sum_{i in g} E[q_i q_i^T]
Output (eq. 77-78 with J_i = I, Algorithm 1 "Output"):
    B_k,g = W_k,g P_k A'_k^T,  A_k = A'_k P_k^{-1};   B_q,i = W_q,i P_q A'_q^T,  A_q = A'_q P_q^{-1}
At r_k = D, B_k A_k = W_k exactly.

Query bias (eq. 138-142 specialised to uncompressed queries): with b_q the query second moment is
Q_g = sum_i (W_q,i C_q W_q,i^T + W_q,i mu b_q,i^T + b_q,i mu^T W_q,i^T + b_q,i b_q,i^T).  A key bias
never matters for NoPE dims (it adds the same q^T b_k to every logit of a query: softmax-invariant);
for the same reason the key-side statistics may be centred (``centred_keys=True``): the part of the
error that is constant across keys, q_m^T (W_k - B_k A_k) mu, is invisible after softmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .preconditioners import preconditioner, top_eigenvectors, top_right_singular_vectors
from .stats import InputStats

__all__ = [
    "JointQKResult",
    "default_group_map",
    "joint_qk_hosvd",
    "attention_aware_key_latent",
    "attention_logit_error",
    "attention_logit_error_from_stats",
]


def default_group_map(num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """g(i) = i // (H // G) (HF ``repeat_kv`` / LatentLLM eq. 144 repeat-interleave), int64 [H]."""
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    return torch.arange(num_heads) // (num_heads // num_kv_heads)


def _split_heads(W_q: torch.Tensor, W_k: torch.Tensor, num_kv_heads: int, group_map):
    Gd, D = W_k.shape
    if Gd % num_kv_heads:
        raise ValueError(f"W_k rows {Gd} not divisible by num_kv_heads={num_kv_heads}")
    d = Gd // num_kv_heads
    if W_q.shape[1] != D or W_q.shape[0] % d:
        raise ValueError(f"W_q {tuple(W_q.shape)} does not match head width {d} / input width {D}")
    H = W_q.shape[0] // d
    gmap = default_group_map(H, num_kv_heads) if group_map is None else torch.as_tensor(group_map)
    if gmap.shape != (H,) or int(gmap.min()) < 0 or int(gmap.max()) >= num_kv_heads:
        raise ValueError(f"group_map must map {H} query heads to [0, {num_kv_heads})")
    Wq = W_q.to(torch.float64).reshape(H, d, D)
    Wk = W_k.to(torch.float64).reshape(num_kv_heads, d, D)
    return Wq, Wk, gmap, H, d, D


@dataclass
class JointQKResult:
    """Factors of the joint QK decomposition (shapes in the module docstring), all float64.

    loss_history: whitened logit loss (eq. 66) after the initial A'_k step and after every
    half-step of Algorithm 1; loss_total = sum_i ||G_i||^2 (the loss at rank 0).
    """

    A_k: torch.Tensor
    B_k: torch.Tensor
    A_q: torch.Tensor | None = None
    B_q: torch.Tensor | None = None
    loss_history: list[float] = field(default_factory=list)
    loss_total: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_history[-1]


def joint_qk_hosvd(
    W_q: torch.Tensor,
    W_k: torch.Tensor,
    rank_k: int,
    *,
    num_kv_heads: int,
    P_q: torch.Tensor,
    P_k: torch.Tensor,
    P_k_inv: torch.Tensor,
    rank_q: int | None = None,
    P_q_inv: torch.Tensor | None = None,
    n_iter: int = 8,
    group_map=None,
    b_q: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
) -> JointQKResult:
    """LatentLLM Algorithm 1 with separate query/key pre-conditioners (eq. 164) and GQA (eq. 148).

    rank_q=None (default): queries stay uncompressed; closed-form optimum for A_k (see module doc).
    rank_q given: alternating HOSVD, `n_iter` rounds (needs P_q_inv). b_q (with `mean`, the input
    mean) is supported for rank_q=None only.
    """
    Wq, Wk, gmap, H, d, D = _split_heads(W_q, W_k, num_kv_heads, group_map)
    if not 0 <= rank_k <= D:
        raise ValueError(f"rank_k {rank_k} outside [0, {D}]")
    Pq = P_q.to(torch.float64)
    Pk = P_k.to(torch.float64)
    Cq = Pq @ Pq.T
    Y = Wk @ Pk  # [G, d, D]  Y_g = W_k,g P_k
    K = Y @ Y.transpose(1, 2)  # [G, d, d]  Y_g Y_g^T

    if rank_q is None:
        # Q_g = sum_{i in g} E[q_i q_i^T]   [G, d, d]   (eq. 140 with A_q^T A_q = I)
        Qh = Wq @ Cq @ Wq.transpose(1, 2)  # [H, d, d]
        if b_q is not None:
            if mean is None:
                raise ValueError("b_q needs the input mean")
            bq = b_q.to(torch.float64).reshape(H, d)
            m = Wq @ mean.to(torch.float64)  # [H, d]  W_q,i mu
            Qh = Qh + m[:, :, None] * bq[:, None, :] + bq[:, :, None] * m[:, None, :]
            Qh = Qh + bq[:, :, None] * bq[:, None, :]
        Qg = torch.zeros(num_kv_heads, d, d, dtype=torch.float64).index_add_(0, gmap, Qh)
        # S_k = sum_g Y_g^T Q_g Y_g = F^T F with the thin factor F = [Q_g^{1/2} Y_g]_g  [G d, D]
        ev, V = torch.linalg.eigh(0.5 * (Qg + Qg.transpose(1, 2)))
        Qg_half = (V * ev.clamp_min(0.0).sqrt()[:, None, :]) @ V.transpose(1, 2)
        F = (Qg_half @ Y).reshape(num_kv_heads * d, D)
        Ak_w = top_right_singular_vectors(F, rank_k, what="joint QK key plane")  # eq. 75
        total = float(F.square().sum())  # sum_i ||G_i||^2
        captured = float((F @ Ak_w.T).square().sum())
        B_k = (Y @ Ak_w.T).reshape(num_kv_heads * d, rank_k)  # eq. 78, J_i = I
        A_k = Ak_w @ P_k_inv.to(torch.float64)
        return JointQKResult(A_k=A_k, B_k=B_k, loss_history=[total - captured], loss_total=total)

    # ---------------- general Algorithm 1 (queries compressed too) ----------------
    if b_q is not None:
        raise NotImplementedError("query bias with compressed queries (eq. 103-115) is not implemented")
    if P_q_inv is None:
        raise ValueError("rank_q needs P_q_inv")
    if not 0 <= rank_q <= D:
        raise ValueError(f"rank_q {rank_q} outside [0, {D}]")
    F = Pq.T @ Wq.transpose(1, 2)  # [H, D, d]  F_i = P_q^T W_q,i^T, so G_i = F_i Y_g
    Kh = K[gmap]  # [H, d, d]
    total = float(torch.einsum("hDa,hab,hDb->", F, Kh, F))  # sum_i ||F_i Y_g||^2

    def loss(Aq_w, Ak_w):
        T = Aq_w @ F  # [H, r_q, d]
        M = Y[gmap] @ Ak_w.T  # [H, d, r_k]
        return total - float((T @ M).square().sum())  # eq. 66

    # init: A'_q = RightSingular_rq[sum_i G_i G_i^T]
    Aq_w = top_eigenvectors(torch.einsum("hDa,hab,hEb->DE", F, Kh, F), rank_q, what="joint QK query plane")
    history: list[float] = []
    Ak_w = None
    for _ in range(max(1, n_iter)):
        T = Aq_w @ F  # [H, r_q, d]
        Tg = torch.zeros(num_kv_heads, d, d, dtype=torch.float64).index_add_(0, gmap, T.transpose(1, 2) @ T)
        Ak_w = top_eigenvectors(torch.einsum("gaD,gab,gbE->DE", Y, Tg, Y), rank_k, what="joint QK key plane")
        history.append(loss(Aq_w, Ak_w))  # after A_k step (eq. 75)
        M = Y[gmap] @ Ak_w.T  # [H, d, r_k]
        FM = F @ M  # [H, D, r_k]
        Aq_w = top_eigenvectors(torch.einsum("hDr,hEr->DE", FM, FM), rank_q, what="joint QK query plane")
        history.append(loss(Aq_w, Ak_w))  # after A_q step (eq. 73)
    B_k = (Y @ Ak_w.T).reshape(num_kv_heads * d, rank_k)
    A_k = Ak_w @ P_k_inv.to(torch.float64)
    B_q = (Wq @ Pq @ Aq_w.T).reshape(H * d, rank_q)
    A_q = Aq_w @ P_q_inv.to(torch.float64)
    return JointQKResult(A_k=A_k, B_k=B_k, A_q=A_q, B_q=B_q, loss_history=history, loss_total=total)


def attention_aware_key_latent(
    W_q: torch.Tensor,
    W_k: torch.Tensor,
    stats: InputStats,
    rank: int,
    *,
    num_kv_heads: int,
    damping: float,
    centred_keys: bool = False,
    rank_q: int | None = None,
    n_iter: int = 8,
    group_map=None,
    b_q: torch.Tensor | None = None,
    sqrt_method: str = "eigh",
) -> JointQKResult:
    """Key latent (A_k [rank, D], B_k [G d, rank]) minimising the attention-logit error.

    Root-covariance pre-conditioning on both sides (LatentLLM eq. 13 / Algorithm 1 with P = C^{1/2};
    `damping` relative as in :mod:`.stats`; sqrt_method="cholesky" is the fast, loss-identical
    root, see :func:`.preconditioners.preconditioner`).  centred_keys=True whitens the key side with the
    centred covariance (softmax-invariant loss, see module doc).  Returns :class:`JointQKResult`
    (``res.A_k``, ``res.B_k``; ``res.A_q``/``res.B_q`` when rank_q is given).
    """
    P_q, P_q_inv = preconditioner("root_covariance", stats, damping=damping, sqrt_method=sqrt_method)
    if centred_keys:
        P_k, P_k_inv = preconditioner(
            "root_covariance", stats, damping=damping, centred=True, sqrt_method=sqrt_method
        )
    else:
        P_k, P_k_inv = P_q, P_q_inv
    return joint_qk_hosvd(
        W_q,
        W_k,
        rank,
        num_kv_heads=num_kv_heads,
        P_q=P_q,
        P_k=P_k,
        P_k_inv=P_k_inv,
        rank_q=rank_q,
        P_q_inv=P_q_inv,
        n_iter=n_iter,
        group_map=group_map,
        b_q=b_q,
        mean=stats.mean if b_q is not None else None,
    )


def attention_logit_error(
    W_q: torch.Tensor,
    W_k: torch.Tensor,
    W_k_hat: torch.Tensor,
    X: torch.Tensor,
    *,
    num_kv_heads: int,
    W_q_hat: torch.Tensor | None = None,
    group_map=None,
) -> float:
    """Logit error sum_i ||X W_q,i^T W_k,g X^T - X W^_q,i^T W^_k,g X^T||_F^2 (eq. 11 / 146).

    = sum_i sum_{m,n} (q_i,m^T k_g,n - q^_i,m^T k^_g,n)^2 over all token pairs (no mask, no RoPE).

    Direct evaluation on activations X [N, D] (all token pairs, no mask): O(H N^2) -- for tests.
    W_k_hat = B_k A_k [G d, D]; W_q_hat = B_q A_q (defaults to W_q).
    """
    Wq, Wk, gmap, H, d, D = _split_heads(W_q, W_k, num_kv_heads, group_map)
    Wkh = W_k_hat.to(torch.float64).reshape(num_kv_heads, d, D)
    Wqh = Wq if W_q_hat is None else W_q_hat.to(torch.float64).reshape(H, d, D)
    X = X.to(torch.float64)
    err = 0.0
    for i in range(H):
        g = int(gmap[i])
        M = (X @ Wq[i].T) @ (X @ Wk[g].T).T  # [N, N] logits q_m^T k_n (eq. 10)
        M_hat = (X @ Wqh[i].T) @ (X @ Wkh[g].T).T  # eq. 12
        err += float((M - M_hat).square().sum())
    return err


def attention_logit_error_from_stats(
    W_q: torch.Tensor,
    W_k: torch.Tensor,
    W_k_hat: torch.Tensor,
    C_q: torch.Tensor,
    C_k: torch.Tensor | None = None,
    *,
    num_kv_heads: int,
    W_q_hat: torch.Tensor | None = None,
    group_map=None,
) -> float:
    """sum_i tr[Delta_i C_k Delta_i^T C_q] (eq. 87 / 160), Delta_i = W_q,i^T W_k,g - W^_q,i^T W^_k,g.

    With C = X^T X (unnormalised) this equals :func:`attention_logit_error` exactly.  Evaluated
    through the factors Delta_i = L_i R_i (L_i = [W_q,i^T, -W^_q,i^T], R_i = [W_k,g; W^_k,g]),
    so the cost is O(H d^2 D + d D^2) and no D x D slice per head is formed.
    """
    Wq, Wk, gmap, H, d, D = _split_heads(W_q, W_k, num_kv_heads, group_map)
    Wkh = W_k_hat.to(torch.float64).reshape(num_kv_heads, d, D)
    Wqh = Wq if W_q_hat is None else W_q_hat.to(torch.float64).reshape(H, d, D)
    Cq = C_q.to(torch.float64)
    Ck = Cq if C_k is None else C_k.to(torch.float64)
    Lt = torch.cat([Wq, -Wqh], dim=1)  # [H, 2d, D]  = L_i^T
    R = torch.cat([Wk, Wkh], dim=1)  # [G, 2d, D]
    LCL = Lt @ Cq @ Lt.transpose(1, 2)  # [H, 2d, 2d]  L^T C_q L
    RCR = R @ Ck @ R.transpose(1, 2)  # [G, 2d, 2d]  R C_k R^T
    return float((LCL * RCR[gmap]).sum())  # tr[(L^T C_q L)(R C_k R^T)], both symmetric
