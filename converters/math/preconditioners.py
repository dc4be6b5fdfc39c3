"""Pre-conditioners P for activation-aware SVD (LatentLLM Table 1 and appendix "Pre-Conditioning").

Symbols

    W        weight [out, in] (nn.Linear convention: y = W x)
    D        = in, the input width
    S / n    X X^T / n, the (normalised) second moment of the inputs, from :class:`InputStats`
    C        S / n + lam I                  (damped auto-correlation, LatentLLM eq. 5)
    C0       S / n - mu mu^T + lam I        (centred covariance, eq. 47; used when centred=True)
    lam      damping * mean(diag(S / n))    (see :mod:`converters.math.stats`)
    P        pre-conditioner [D, D]; the decomposition svd_r[W P] (eq. 3) then minimises
             || (W - B A) P ||_F.  Only P = C^(1/2) makes this the activation loss
             E|| (W - B A) x ||^2 = || (W - B A) C^(1/2) ||_F^2 (eq. 4-5); the others are the
             approximations of Table 1.
    P_inv    P^{-1} [D, D] (used to undo the pre-conditioning: A = J^+ V P^+, eq. 7)

Table 1 (kinds accepted by :func:`preconditioner`):

    "identity"         P = I                                   plain SVD
    "diag_hessian"     P = diag[(C)^{-1}]^{-1/2}               OBS / GPTQ / SparseGPT
    "diag_l1"          P = diag[mean_t |x_t|]^alpha            ASVD (alpha = 0.5) / AWQ
    "diag_l2"          P = diag[S / n]^{1/2}                   WandA
    "covariance"       P = C                                   CorDA
    "root_covariance"  P = C^{1/2}  (symmetric square root)    LatentLLM (optimal)

Decisions where the paper is ambiguous (see the report):
  * diag_hessian: Table 1 prints the exponent as +1/2, the appendix list as -1/2.  We use -1/2:
    for uncorrelated inputs diag[C^{-1}]^{-1/2} = diag[C]^{1/2} (= WandA = root covariance, the
    optimum) whereas +1/2 would weight every input channel by the *inverse* of its scale.  It is
    also OBS's saliency w^2 / [H^{-1}]_jj.
  * diag_l1: the table prints sum_j X_ij (no absolute value); the appendix and ASVD use the l1 norm
    ||X_i,:||_1.  We use the mean absolute value (the 1/n is an irrelevant global scale).
  * Damping is applied where Table 1 has lam (hessian, covariance, root covariance); diag_l1 and
    diag_l2 are undamped as in the table, with a floor for dead channels (below).
  * centred=True swaps the auto-correlation for the centred covariance C0 (eq. 44-47) in every kind
    that uses second moments; the decomposition must then be paired with
    :func:`converters.math.activation_svd.bias_update`.  (diag_l1 has no centred form from the
    accumulated statistics and ignores the flag.)

Numerical failures (named :class:`CovarianceConditioningWarning`, each with its fallback):
  * eigendecomposition of C does not converge -> retried once on C + 1e-8 * mean(diag) I;
  * eigenvalues <= 1e-10 x the largest (singular or indefinite C, e.g. n < D tokens and damping 0)
    -> clamped to 1e-10 x the largest.  Full-rank reconstruction stays exact (P P_inv = I); the
    clamped directions carry no calibration energy, so the activation loss is unaffected;
  * Cholesky of C (diag_hessian) fails -> damping raised x10 (starting at 1e-8 relative) up to 8
    times, as GPTQ does;
  * zero entries of a diagonal pre-conditioner (dead input channel) -> floored at 1e-5 x the largest
    entry, so that P_inv exists.
All inputs are promoted to float64; P and P_inv are returned as float64 [D, D] on stats' device.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from .stats import CovarianceConditioningWarning, InputStats, relative_damping

__all__ = [
    "PreconditionerKind",
    "PRECONDITIONER_KINDS",
    "preconditioner",
    "psd_eigh",
    "psd_sqrt_and_inv_sqrt",
    "top_eigenvectors",
    "top_right_singular_vectors",
]

PreconditionerKind = Literal[
    "identity", "diag_hessian", "diag_l1", "diag_l2", "covariance", "root_covariance"
]
PRECONDITIONER_KINDS: tuple[str, ...] = (
    "identity",
    "diag_hessian",
    "diag_l1",
    "diag_l2",
    "covariance",
    "root_covariance",
)

EIG_REL_FLOOR = 1e-10  # eigenvalue floor relative to the largest eigenvalue
DIAG_REL_FLOOR = 1e-5  # diagonal pre-conditioner floor relative to its largest entry


def psd_eigh(M: torch.Tensor, *, what: str = "matrix", rel_floor: float = EIG_REL_FLOOR):
    """Eigendecomposition of a symmetric PSD matrix with named fallbacks.

    Returns (evals [D] ascending, clamped to >= rel_floor * max, evecs [D, D]), float64.
    """
    M = M.to(torch.float64)
    M = 0.5 * (M + M.T)
    try:
        evals, evecs = torch.linalg.eigh(M)
    except torch.linalg.LinAlgError as err:  # pragma: no cover - LAPACK rarely fails on float64
        jitter = 1e-8 * float(torch.diagonal(M).abs().mean())
        warnings.warn(
            f"{what}: eigendecomposition failed ({err}); fallback: retry on M + {jitter:.3e} I. "
            "Remedy: more calibration tokens or a larger damping.",
            CovarianceConditioningWarning,
            stacklevel=2,
        )
        evals, evecs = torch.linalg.eigh(M + jitter * torch.eye(M.shape[0], dtype=M.dtype, device=M.device))
    top = float(evals[-1])
    if not top > 0.0:
        raise ValueError(f"{what}: matrix has no positive eigenvalue (all-zero statistics?)")
    floor = rel_floor * top
    n_bad = int((evals < floor).sum())
    if n_bad:
        warnings.warn(
            f"{what}: {n_bad} of {evals.numel()} eigenvalues below {rel_floor:g} x the largest "
            f"(smallest {float(evals[0]):.3e}, largest {top:.3e}): singular or indefinite. "
            f"Fallback: clamped to {floor:.3e}. Remedy: more calibration tokens (n >> D) or damping > 0.",
            CovarianceConditioningWarning,
            stacklevel=2,
        )
        evals = evals.clamp_min(floor)
    return evals, evecs


def psd_sqrt_and_inv_sqrt(M: torch.Tensor, *, what: str = "covariance"):
    """Symmetric M^{1/2} and M^{-1/2} (float64) via :func:`psd_eigh` (with its fallbacks)."""
    evals, evecs = psd_eigh(M, what=what)
    s = evals.sqrt()
    return (evecs * s) @ evecs.T, (evecs / s) @ evecs.T


def top_eigenvectors(S: torch.Tensor, r: int, *, what: str = "matrix") -> torch.Tensor:
    """Rows = the r leading eigenvectors of symmetric S (descending eigenvalue), [r, D] float64.

    Used for every "RightSingular_r[sum_i G_i^T G_i]" step of LatentLLM (Algorithm 1, eq. 183-184)
    and for TransKV's projections.  No floor: eigenvectors of a PSD sum are well defined even if
    it is singular.
    """
    S = S.to(torch.float64)
    S = 0.5 * (S + S.T)
    if not 0 <= r <= S.shape[0]:
        raise ValueError(f"{what}: rank {r} outside [0, {S.shape[0]}]")
    try:
        evals, evecs = torch.linalg.eigh(S)
    except torch.linalg.LinAlgError as err:  # pragma: no cover
        jitter = 1e-12 * float(torch.diagonal(S).abs().mean() + 1e-300)
        warnings.warn(
            f"{what}: eigendecomposition failed ({err}); fallback: retry with {jitter:.3e} I jitter.",
            CovarianceConditioningWarning,
            stacklevel=2,
        )
        evals, evecs = torch.linalg.eigh(S + jitter * torch.eye(S.shape[0], dtype=S.dtype, device=S.device))
    return evecs.flip(-1)[:, :r].T.contiguous()


def top_right_singular_vectors(F: torch.Tensor, r: int, *, what: str = "matrix") -> torch.Tensor:
    """The r leading eigenvectors of F^T F as rows [r, D] float64, from the thin SVD of F [m, D].

    Same result as top_eigenvectors(F^T F, r) but O(m^2 D) instead of an O(D^3) eigensolver when
    the factor is thin (m = G d << D); falls back to the eigh when r > min(m, D).
    """
    F = F.to(torch.float64)
    if r <= min(F.shape):
        return torch.linalg.svd(F, full_matrices=False).Vh[:r].contiguous()
    return top_eigenvectors(F.T @ F, r, what=what)


def _floor_diag(p: torch.Tensor, what: str) -> torch.Tensor:
    top = float(p.max())
    if not top > 0.0:
        raise ValueError(f"{what}: all input channels are zero")
    floor = DIAG_REL_FLOOR * top
    n_bad = int((p < floor).sum())
    if n_bad:
        warnings.warn(
            f"{what}: {n_bad} of {p.numel()} input channels have (near) zero magnitude (dead "
            f"channels). Fallback: floored at {floor:.3e} = {DIAG_REL_FLOOR:g} x the largest so P is invertible.",
            CovarianceConditioningWarning,
            stacklevel=3,
        )
        p = p.clamp_min(floor)
    return p


def _damped_inverse_diag(C: torch.Tensor, damping: float) -> torch.Tensor:
    """diag[(C + lam I)^{-1}] via Cholesky; on failure raise the damping (GPTQ-style fallback)."""
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    lam = relative_damping(C, damping)
    for attempt in range(9):
        L, info = torch.linalg.cholesky_ex(C + lam * eye)
        if int(info) == 0:
            return torch.diagonal(torch.cholesky_inverse(L))
        new_lam = max(10.0 * lam, relative_damping(C, 1e-8))
        warnings.warn(
            f"diag_hessian: Cholesky of C + lam I failed (lam = {lam:.3e}, leading minor {int(info)} "
            f"not positive): covariance singular/ill-conditioned. Fallback: damping raised to "
            f"{new_lam:.3e}. Remedy: damping > 0 or more calibration tokens.",
            CovarianceConditioningWarning,
            stacklevel=3,
        )
        lam = new_lam
    raise torch.linalg.LinAlgError("diag_hessian: Cholesky failed even after raising the damping 8 times")


def preconditioner(
    kind: PreconditionerKind,
    stats: InputStats,
    *,
    damping: float,
    asvd_alpha: float = 0.5,
    centred: bool = False,
    sqrt_method: Literal["eigh", "cholesky"] = "eigh",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, P_inv), both float64 [D, D], of LatentLLM Table 1 (module docstring has the formulas).

    `damping` is relative: lam = damping * mean(diag(C)).  svd_r[W P] then minimises ||(W - BA) P||_F;
    for kind="root_covariance" that is exactly the activation loss of the calibration data
    (eq. 4-5; with centred=True the loss of eq. 44-46, to be paired with the bias update eq. 43).

    sqrt_method (root_covariance only): "eigh" gives the symmetric C^{1/2} of Table 1; "cholesky"
    gives the lower-triangular L with L L^T = C.  Both give the *same* factors A, B downstream:
    L = C^{1/2} Q with Q orthogonal, so svd[W L] has the same U, S and V_L^T = V^T Q, hence
    A = V_L^T L^{-1} = V^T C^{-1/2} (up to ties among singular values).  Cholesky is ~50x faster
    at D = 2048-4096 on CPU.  If it fails (C not numerically PD, e.g. damping 0 with n < D) we fall
    back to "eigh" with its eigenvalue clamp, with a CovarianceConditioningWarning.
    """
    D = stats.dim
    dev = stats.xx.device
    eye = torch.eye(D, dtype=torch.float64, device=dev)
    if kind == "identity":
        return eye, eye.clone()
    if kind == "diag_l1":
        # ASVD: P = diag[ ||X_i,:||_1 ]^alpha (Table 1 row 3)
        p = _floor_diag(stats.mean_abs.pow(asvd_alpha), "diag_l1")
        return torch.diag(p), torch.diag(1.0 / p)
    C_raw = stats.covariance(centred=centred, damping=0.0)
    if kind == "diag_l2":
        # WandA: P = diag[X X^T]^{1/2} (Table 1 row 4)
        p = _floor_diag(torch.diagonal(C_raw).clamp_min(0.0).sqrt(), "diag_l2")
        return torch.diag(p), torch.diag(1.0 / p)
    if kind == "diag_hessian":
        # OBS / GPTQ: P = diag[(X X^T + lam I)^{-1}]^{-1/2} (Table 1 row 2, appendix sign)
        hinv = _damped_inverse_diag(C_raw, damping)
        p = _floor_diag(hinv.rsqrt(), "diag_hessian")
        return torch.diag(p), torch.diag(1.0 / p)
    C = stats.covariance(centred=centred, damping=damping)
    what = f"{kind} ({'centred covariance' if centred else 'auto-correlation'}, damping={damping:g})"
    if kind == "root_covariance" and sqrt_method == "cholesky":
        L, info = torch.linalg.cholesky_ex(C)
        if int(info) == 0:
            L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
            if bool(torch.isfinite(L_inv).all()):
                return L, L_inv  # P P^T = C (eq. 5 with a triangular root)
        warnings.warn(
            f"{what}: Cholesky failed (leading minor {int(info)} not positive / non-finite inverse). "
            "Fallback: symmetric root via eigendecomposition with eigenvalue clamping.",
            CovarianceConditioningWarning,
            stacklevel=2,
        )
    elif sqrt_method not in ("eigh", "cholesky"):
        raise ValueError("sqrt_method must be 'eigh' or 'cholesky'")
    evals, evecs = psd_eigh(C, what=what)
    if kind == "covariance":
        # CorDA: P = X X^T + lam I (Table 1 row 5)
        return (evecs * evals) @ evecs.T, (evecs / evals) @ evecs.T
    if kind == "root_covariance":
        # LatentLLM: P = (X X^T + lam I)^{1/2} (Table 1 row 6, eq. 5)
        s = evals.sqrt()
        return (evecs * s) @ evecs.T, (evecs / s) @ evecs.T
    raise ValueError(f"unknown pre-conditioner kind {kind!r}; expected one of {PRECONDITIONER_KINDS}")
