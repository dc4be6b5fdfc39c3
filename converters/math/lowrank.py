"""Low-rank factorisation of the key/value projections (MHA2MLA section 3.2, Figure 4).

Convention: weights as in ``nn.Linear``, W [out, in], y = W x. A factorisation W ~= B A gives
the down-projection A [r, in] (the latent c = A x that is cached) and the up-projection
B [out, r]. The paper writes x W with W [in, out]; its W_dkv = U Sigma^{1/2} is our A^T.

SVD_split:  W_k,nope = U_k S_k V_k^T, W_v = U_v S_v V_v^T, each to rank d_kv / 2, c = [c_k | c_v]
SVD_joint:  [W_k,nope; W_v] = U S V^T to rank d_kv, one c shared by keys and values

An optional right pre-conditioner P (activation-aware methods, LatentLLM Table 1) makes the
truncation minimise ||(W - B A) P||_F instead of ||W - B A||_F: factor W P, then A = A' P^-1.
"""

from __future__ import annotations

import torch


def factorize(W: torch.Tensor, rank: int, P: torch.Tensor | None = None, P_inv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors (A [rank, in], B [out, rank]) of W [out, in], in float64.

    The singular values are split evenly, A = S^{1/2} V^T and B = U S^{1/2} (MHA2MLA's choice),
    so neither factor carries the scale alone (better conditioned in low precision).
    """
    out_dim, in_dim = W.shape
    if not 0 <= rank <= min(out_dim, in_dim):
        raise ValueError(f"rank {rank} is impossible for a [{out_dim}, {in_dim}] matrix (max {min(out_dim, in_dim)})")
    W = W.to(torch.float64)
    target = W @ P if P is not None else W
    U, S, Vh = torch.linalg.svd(target, full_matrices=False)
    root = S[:rank].sqrt()
    A = root[:, None] * Vh[:rank]  # [rank, in]
    B = U[:, :rank] * root  # [out, rank]
    if P_inv is not None:
        A = A @ P_inv
    return A, B


def joint_factors(blocks: list[torch.Tensor], rank: int, **precond) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """SVD_joint: one latent for the stacked blocks; returns A and the up-projection of each block."""
    A, B = factorize(torch.cat(blocks, dim=0), rank, **precond)
    return A, list(B.split([b.shape[0] for b in blocks], dim=0))


def max_rank(blocks: list[torch.Tensor]) -> int:
    rows = sum(b.shape[0] for b in blocks)
    return min(rows, blocks[0].shape[1])
