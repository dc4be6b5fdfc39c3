"""Plain low-rank factorisation of the key/value projections (MHA2MLA section 3.2, Figure 4).

Convention: weights as in ``nn.Linear``, W [out, in], y = W x. A factorisation W ~= B A gives
the down-projection A [r, in] (the latent c = A x that is cached) and the up-projection
B [out, r]. The paper writes x W with W [in, out]; its W_dkv = U Sigma^{1/2} is our A^T.

SVD_split:  W_k,nope = U_k S_k V_k^T, W_v = U_v S_v V_v^T, each to rank d_kv / 2, c = [c_k | c_v]
SVD_joint:  [W_k,nope; W_v] = U S V^T to rank d_kv, one c shared by keys and values

This is the identity pre-conditioner of ``activation_svd`` with MHA2MLA's even split of the
singular values, A = S^{1/2} V^T and B = U S^{1/2}: neither factor carries the scale alone.
"""

from __future__ import annotations

import torch

from converters.math.activation_svd import activation_aware_lowrank


def joint_factors(blocks: list[torch.Tensor], rank: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """SVD_joint: one latent for the stacked blocks; returns A and the up-projection of each block."""
    A, B = activation_aware_lowrank(torch.cat(blocks, dim=0), rank, None, None, split="sqrt")
    return A, list(B.split([b.shape[0] for b in blocks], dim=0))
