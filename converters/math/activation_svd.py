"""Activation-aware low-rank factorisation W ~= B A (LatentLLM eq. 3, 6-9, 34-47).

Symbols (nn.Linear convention, tokens are rows of X)

    W        [out, in]       weight to compress (e.g. k_proj / v_proj rows of one layer)
    x        [in]            a token's input; batches X: [N, in]
    r        rank            latent width (the per-token cache width of this latent)
    P, P_inv [in, in]        pre-conditioner and its inverse (:mod:`.preconditioners`)
    U S V^T  = svd_r[W P]    truncated SVD: U [out, r], S [r], V^T [r, in]   (eq. 3 / eq. 6)
    J        [r, r]          junction matrix: B = U S J, A = J^+ V^T P^+      (eq. 7)
    A        [r, in]         down-projection: latent c = A x   (this is what the KV cache holds)
    B        [out, r]        up-projection: W x ~= B c          (absorbed into q / o at decode)
    mu       [in]            calibration input mean (bias update, eq. 43)
    C        [in, in]        activation second moment used to *measure* the loss

Singular-value split (the junction J of eq. 7) -- default split="B", J = I:
    B = U S,  A = V^T P^{-1}.
With the root-covariance pre-conditioner P = C^{1/2} this makes the latent exactly white on the
calibration data: E[c c^T] = V^T C^{-1/2} C C^{-1/2} V = I_r.  Every cached coordinate has unit
second moment, independent of the layer's activation scale, which is the best-conditioned input
for a bf16/fp8 cache and keeps the ranking of latent coordinates meaningful (coordinate i carries
energy sigma_i^2 through B, not through c).  With P = I, A = V^T is orthonormal and c has the scale
of x.  split="A" (J = S^+) puts the scale into c instead; split="sqrt" (J = S^{-1/2}) splits it.
None of these changes the loss (S J J^+ = S).

Block-identity junction (eq. 8-9): see :func:`block_identity_junction`.  It is implemented but NOT
the default, for the reasons in its docstring.

All computations are float64; outputs are float64 on W's device (cast when saving).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "activation_aware_lowrank",
    "activation_error_curve",
    "activation_loss",
    "bias_update",
    "block_identity_junction",
    "BlockIdentityFactors",
]

Split = Literal["B", "A", "sqrt"]


def _svd_whitened(W: torch.Tensor, P: torch.Tensor | None):
    W64 = W.to(torch.float64)
    if P is None:  # identity pre-conditioner: plain SVD, without a D x D product
        return torch.linalg.svd(W64, full_matrices=False)
    P64 = P.to(device=W.device, dtype=torch.float64)
    if P64.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"P must be [{W.shape[1]}, {W.shape[1]}], got {tuple(P.shape)}")
    # svd[W P] (eq. 3 / eq. 39)
    return torch.linalg.svd(W64 @ P64, full_matrices=False)


def activation_aware_lowrank(
    W: torch.Tensor,
    rank: int,
    P: torch.Tensor | None,
    P_inv: torch.Tensor | None,
    *,
    split: Split = "B",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors (A [rank, in], B [out, rank]) of W [out, in] minimising ||(W - B A) P||_F.

    B A P = svd_r[W P] (LatentLLM eq. 3); B = U S J, A = J^+ V^T P^+ (eq. 7) with J chosen by
    `split` ("B": J = I, the default -- see module docstring).  At rank = min(out, in) B A == W
    up to round-off for any invertible P.  P = P_inv = None is the identity (plain SVD).
    """
    out_f, in_f = W.shape
    if not 0 <= rank <= min(out_f, in_f):
        raise ValueError(f"rank {rank} outside [0, min(out={out_f}, in={in_f})]")
    U, S, Vh = _svd_whitened(W, P)
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    if split == "B":  # J = I
        B, A = U * S, Vh
    elif split == "A":  # J = S^+
        B, A = U.clone(), S[:, None] * Vh
    elif split == "sqrt":  # J = [S^{1/2}]^+
        s = S.sqrt()
        B, A = U * s, s[:, None] * Vh
    else:
        raise ValueError(f"split must be 'B', 'A' or 'sqrt', got {split!r}")
    if P_inv is not None:
        A = A @ P_inv.to(device=W.device, dtype=torch.float64)
    return A.contiguous(), B.contiguous()


def activation_loss(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> float:
    """tr[(W - B A) C (W - B A)^T] (eq. 4 / eq. 33): the activation loss for second moment C.

    With C = X^T X (unnormalised, tokens as rows) this equals ||X (W - B A)^T||_F^2 exactly.
    """
    E = W.to(torch.float64) - B.to(torch.float64) @ A.to(torch.float64)
    return float(((E @ C.to(torch.float64)) * E).sum())


def activation_error_curve(
    W: torch.Tensor, P: torch.Tensor, P_inv: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """Activation loss tr[(W - B_r A_r) C (W - B_r A_r)^T] for every rank r = 0..min(out, in).

    One SVD instead of one per rank: with W P = sum_i s_i u_i v_i^T,
        W - B_r A_r = sum_{i>r} s_i u_i v_i^T P^{-1}
    and the u_i are orthonormal, so loss(r) = sum_{i>r} s_i^2 m_ii with M = V^T P^{-1} C P^{-T} V.
    For P = C^{1/2} (the metric's own root) m_ii = 1 and this is the Eckart-Young tail sum_{i>r} s_i^2.
    Returns float64 [min(out, in) + 1] (the input to :func:`.rank_allocation.budgeted_ranks`).
    """
    _, S, Vh = _svd_whitened(W, P)
    Z = Vh @ P_inv.to(device=W.device, dtype=torch.float64)  # rows v_i^T P^{-1}
    m = ((Z @ C.to(device=W.device, dtype=torch.float64)) * Z).sum(1)
    terms = S.square() * m
    tail = torch.flip(torch.cumsum(torch.flip(terms, [0]), 0), [0])  # tail[r] = sum_{i>=r}
    return torch.cat([tail, tail.new_zeros(1)])


def bias_update(
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    mean: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Corrected up-projection bias b_hat = b + (W - B A) mu  (LatentLLM eq. 43), [out] float64.

    Pair it with a decomposition on the *centred* covariance (preconditioner(..., centred=True)):
    the optimal bias absorbs the mean error and the remaining loss is ||(W - BA)(X - mu 1^T)||^2
    (eq. 44-46).  Then B A mu + b_hat == W mu + b exactly: the layer is exact on the mean input.

    For the MLA cache (y = B c + b_hat with c = A x):
      * values: b_hat_v passes through attention unchanged (softmax weights sum to one), so it can
        equally be folded into the o_proj bias as W_o b_hat_v (this is eq. 191 with b_hat_v kept);
      * keys on NoPE dims: a key bias only adds q^T b_hat to every logit of a query, which softmax
        ignores -- the key bias can be dropped, but the centred statistics are still the right ones.
    """
    E = W.to(torch.float64) - B.to(torch.float64) @ A.to(torch.float64)
    b_hat = E @ mean.to(device=W.device, dtype=torch.float64)
    if bias is not None:
        b_hat = b_hat + bias.to(device=W.device, dtype=torch.float64)
    return b_hat


@dataclass
class BlockIdentityFactors:
    """A in block-identity form (eq. 9, with the column pivoting of Remark 2).

        A_full[:, perm[:r]] = I_r,   A_full[:, perm[r:]] = A_rest,   B_new A_full == B A.
    So c = x[perm[:r]] + A_rest @ x[perm[r:]]  and  W x ~= B_new c.
    """

    perm: torch.Tensor  # [in] int64 column permutation (pivots first)
    A_rest: torch.Tensor  # [r, in - r]
    B: torch.Tensor  # [out, r]

    def dense_A(self) -> torch.Tensor:
        r = self.B.shape[1]
        A = self.A_rest.new_zeros(r, self.perm.numel())
        A[:, self.perm[:r]] = torch.eye(r, dtype=A.dtype, device=A.device)
        A[:, self.perm[r:]] = self.A_rest
        return A


def block_identity_junction(A: torch.Tensor, B: torch.Tensor) -> BlockIdentityFactors:
    """Re-express (A, B) with junction J = V_1 so that A has an identity block (eq. 8-9).

    J = A[:, pivots] (V_1 of eq. 8 after column pivoting, Remark 2): A' = J^{-1} A, B' = B J.
    Pivots come from LU with partial pivoting of A^T, which keeps |A_rest| entries moderate
    (A_rest = (L_2 L_1^{-1})^T with |L| <= 1).  Raises ValueError if A is rank-deficient.

    What it saves in our setting: A is stored as r (in - r) numbers + a permutation instead of
    r in, and the down-projection costs r (in - r) MACs instead of r in -- r^2 fewer (eq. 9:
    r(d' + d) - r^2 parameters).  For a k/v latent of a 4096-wide model with r = 512 and
    out = G d = 1024 that is 262k of 2.6M latent parameters (~10%).
    Why it is not the default:
      * the latent loses its scaling: c = x[pivots] + A_rest x[rest] carries the raw scale of the
        residual stream, including its massive-activation outlier channels, instead of the white
        c of split="B" -- worse for a low-precision cache;
      * B' = B V_1 inherits V_1's conditioning, and the absorbed decode (W_uk folded into q)
        multiplies through B' anyway, so nothing is saved there;
      * the saving needs a gather + identity-aware kernel (or fusing into the previous layer's
        output); a dense kv_a_proj GEMM, as in vLLM's MLA, gets no benefit, and the checkpoint
        would have to carry the permutation.
    The same identity trick on B (J = [U S]_{:r}^+) is pointless for us: B is absorbed into the
    query / output projections at decode.
    """
    r, d_in = A.shape
    if B.shape[1] != r:
        raise ValueError(f"A [{r}, {d_in}] and B {tuple(B.shape)} do not chain")
    A64, B64 = A.to(torch.float64), B.to(torch.float64)
    # A^T = Pm L U  ->  rows perm[:r] of A^T are the pivots
    Pm, L, U = torch.linalg.lu(A64.T)
    perm = Pm.argmax(dim=0)  # (Pm^T A^T)[k] = A^T[perm[k]]
    diagU = torch.diagonal(U).abs()
    if r and float(diagU.min()) <= 1e-12 * float(diagU.max()):
        raise ValueError("block_identity_junction: A is rank-deficient; no invertible pivot block V_1")
    L1, L2 = L[:r], L[r:]
    J = A64[:, perm[:r]]  # V_1 (eq. 8)
    # A_rest = V_1^{-1} A[:, perm[r:]] = (L2 L1^{-1})^T  -> solve L1^T X = L2^T
    A_rest = torch.linalg.solve_triangular(L1.T, L2.T, upper=True, unitriangular=True)
    return BlockIdentityFactors(perm=perm, A_rest=A_rest.contiguous(), B=(B64 @ J).contiguous())
