"""Input-activation statistics for activation-aware low-rank decomposition.

Symbols (LatentLLM, Koike-Akino et al. 2026, "LatentLLM"; appendix "Bias Update" eq. 41-47)

    D        input width of the linear layer (hidden size for q/k/v_proj)
    n        number of calibration tokens accumulated so far
    x        one token's input activation, [D]; a batch is X: [N, D] (rows are tokens)
    xx       S  = sum_t x_t x_t^T                 [D, D]  float64
    x_sum    s  = sum_t x_t                       [D]     float64
    abs_sum  a  = sum_t |x_t|                     [D]     float64  (ASVD / l1 pre-conditioner)
    mu       mu = s / n                           [D]     input mean
    C        C  = S / n + lam I                   [D, D]  auto-correlation ("covariance" in the
                                                          paper's main text, eq. 5; "precisely
                                                          auto-correlation")
    C0       C0 = S / n - mu mu^T + lam I         [D, D]  centred covariance (eq. 47, normalised
                                                          by n instead of the paper's * l)
    lam      lam = damping * mean(diag(S / n))    the shrinkage / damping of eq. 5
                                                          (LatentLLM: C = X X^T + lam I, Ledoit-Wolf
                                                          shrinkage).  We make lam *relative* to the
                                                          mean diagonal so one `damping` value works
                                                          for every layer and model scale (the same
                                                          convention as GPTQ's percdamp).  For the
                                                          centred covariance the mean diagonal of C0
                                                          is used.

Everything is accumulated in float64 whatever the activation dtype: sums over ~1e5-1e6 tokens of
bf16 activations whose squares span many decades lose the small eigen-directions otherwise, and
those are exactly the directions a low-rank truncation has to rank correctly.

Numerical trouble (singular / indefinite covariance) is reported with
:class:`CovarianceConditioningWarning`; the handling is in :mod:`converters.math.preconditioners`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["InputStats", "CovarianceConditioningWarning", "relative_damping"]


class CovarianceConditioningWarning(RuntimeWarning):
    """A covariance / auto-correlation matrix was singular, indefinite or failed to factorise.

    Raised (as a warning) together with the fallback that was applied, e.g. "eigenvalues clamped
    to 1e-10 * max" or "damping raised from 0 to 1e-6 * mean diag".  Remedy in all cases: more
    calibration tokens (n >> D) or a larger ``damping``.
    """


def relative_damping(M: torch.Tensor, damping: float) -> float:
    """lam = damping * mean(diag(M)): the damping convention used everywhere in this package."""
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    return float(damping) * float(torch.diagonal(M).mean())


@dataclass
class InputStats:
    """Streaming first/second moments of a layer's input activations (all float64).

    Create with :meth:`zeros`, feed batches with :meth:`update` (any leading shape, last dim D),
    merge shards with :meth:`merge`.
    """

    n: int
    xx: torch.Tensor  # [D, D] float64, sum x x^T
    x_sum: torch.Tensor  # [D]    float64, sum x
    abs_sum: torch.Tensor  # [D]    float64, sum |x|
    chunk_size: int = field(default=8192, repr=False)

    def __post_init__(self) -> None:
        D = self.xx.shape[0]
        if self.xx.shape != (D, D) or self.x_sum.shape != (D,) or self.abs_sum.shape != (D,):
            raise ValueError(
                f"inconsistent shapes: xx {tuple(self.xx.shape)}, x_sum {tuple(self.x_sum.shape)},"
                f" abs_sum {tuple(self.abs_sum.shape)}"
            )
        for name in ("xx", "x_sum", "abs_sum"):
            if getattr(self, name).dtype != torch.float64:
                raise TypeError(f"InputStats.{name} must be float64")

    # ------------------------------------------------------------------ construction
    @classmethod
    def zeros(cls, dim: int, device: torch.device | str = "cpu", chunk_size: int = 8192) -> "InputStats":
        z = dict(dtype=torch.float64, device=device)
        return cls(
            n=0,
            xx=torch.zeros(dim, dim, **z),
            x_sum=torch.zeros(dim, **z),
            abs_sum=torch.zeros(dim, **z),
            chunk_size=chunk_size,
        )

    @classmethod
    def from_activations(cls, x: torch.Tensor, chunk_size: int = 8192) -> "InputStats":
        s = cls.zeros(x.shape[-1], device=x.device, chunk_size=chunk_size)
        s.update(x)
        return s

    @property
    def dim(self) -> int:
        return self.xx.shape[0]

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def update(self, x: torch.Tensor) -> "InputStats":
        """Accumulate a batch x: [..., D] (any dtype). Chunked so the float64 copy stays small."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected last dim {self.dim}, got {tuple(x.shape)}")
        x = x.reshape(-1, self.dim)
        for start in range(0, x.shape[0], self.chunk_size):
            c = x[start : start + self.chunk_size].to(device=self.xx.device, dtype=torch.float64)
            self.xx.addmm_(c.T, c)  # S += X^T X   (tokens are rows here)
            self.x_sum.add_(c.sum(0))
            self.abs_sum.add_(c.abs().sum(0))
            self.n += c.shape[0]
        return self

    def merge(self, other: "InputStats") -> "InputStats":
        """In-place sum of two shards' statistics (e.g. from different calibration workers)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of width {self.dim} and {other.dim}")
        self.xx.add_(other.xx.to(self.xx.device))
        self.x_sum.add_(other.x_sum.to(self.xx.device))
        self.abs_sum.add_(other.abs_sum.to(self.xx.device))
        self.n += other.n
        return self

    # ------------------------------------------------------------------ derived moments
    def _check_nonempty(self) -> None:
        if self.n == 0:
            raise ValueError("InputStats is empty: call update() with calibration activations first")

    @property
    def mean(self) -> torch.Tensor:
        """mu = sum x / n, [D] float64."""
        self._check_nonempty()
        return self.x_sum / self.n

    @property
    def mean_abs(self) -> torch.Tensor:
        """sum |x| / n, [D] float64 (ASVD's l1 channel magnitude)."""
        self._check_nonempty()
        return self.abs_sum / self.n

    def autocorrelation(self, damping: float = 0.0) -> torch.Tensor:
        """C = X X^T / n + lam I,  lam = damping * mean(diag(X X^T / n))   (LatentLLM eq. 5)."""
        self._check_nonempty()
        C = self.xx / self.n
        C = 0.5 * (C + C.T)  # exact symmetry: addmm round-off is not symmetric
        lam = relative_damping(C, damping)
        return C + lam * torch.eye(self.dim, dtype=C.dtype, device=C.device)

    def covariance(self, centred: bool = True, damping: float = 0.0) -> torch.Tensor:
        """C0 = X X^T / n - mu mu^T + lam I (eq. 45-47) if centred, else the auto-correlation."""
        if not centred:
            return self.autocorrelation(damping)
        self._check_nonempty()
        mu = self.mean
        C0 = self.xx / self.n - torch.outer(mu, mu)
        C0 = 0.5 * (C0 + C0.T)
        lam = relative_damping(C0, damping)
        return C0 + lam * torch.eye(self.dim, dtype=C0.dtype, device=C0.device)
