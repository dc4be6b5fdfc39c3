"""Hadamard rotations of the latent, folded into the weights (free at run time).

For an orthogonal R and a latent c = A x read back as B c, (R A, B R^T) is the same layer:
B R^T R A = B A. Quantising R c instead of c spreads an outlier coordinate over the whole block,
so a per-group INT4 scale fits every value of the group better (QuaRot / SpinQuant use this for
weights and activations). R is block-diagonal with Sylvester Hadamard blocks H_n / sqrt(n), n a
power of two; it is symmetric and its own inverse.
"""

from __future__ import annotations

import torch


def hadamard(n: int) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix [n, n] (n a power of two): H H^T = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / n**0.5


def block_hadamard(width: int) -> torch.Tensor:
    """Block-diagonal Hadamard [width, width] with the largest power-of-two block dividing ``width``."""
    block = width & -width  # largest power of two dividing width
    return torch.block_diag(*[hadamard(block)] * (width // block))
