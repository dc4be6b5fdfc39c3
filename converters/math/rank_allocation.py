"""Per-layer latent widths: uniform, LoRC progressive (cumulative condition numbers), error budget.

Symbols

    L              number of layers, l = 1..L (index 0..L-1 in code; 0 = shallowest)
    W_k^l, W_v^l   the layer's key / value weights (any orientation; only singular values matter)
    kappa(W)       sigma_max / sigma_min over the min(out, in) singular values        (LoRC eq. 10)
    kappa~_l       prod_{j=l}^{L} kappa(W_k^j) kappa(W_v^j)   (cumulative, suffix product, eq. 12)
                   handled as ln kappa~_l = sum_{j>=l} ln kappa(W_k^j) + ln kappa(W_v^j)
    d_max, d_min   largest / smallest compressed width (LoRC: d_max = the original KV width G d)
    d_c^l          d_max [1 - (max ln kappa~ - ln kappa~_l)/(max ln kappa~ - min ln kappa~) (1 - d_min/d_max)]
                                                                                       (LoRC eq. 13)
    e_l(r)         measured error of layer l at rank r (e.g. activation_svd.activation_error_curve)
    s_l(r)         CARE's score of layer l's next rank: the share of its remaining error that rank
                   removes, (e_l(r) - e_l(r+1)) / e_l(r) = sigma_{r+1}^2 / sum_{m>r} sigma_m^2
                   (CARE eq. 1, with e_l the tail energy of the covariance-weighted spectrum)
    c_l            cache cost of one rank unit of layer l (cost_per_rank)
    budget         sum_l c_l r_l, met exactly by :func:`budgeted_ranks`

LoRC monotonicity (what the paper says and the tests assert): every kappa >= 1, so the suffix
product kappa~_l is non-increasing with depth; eq. 13 is increasing in kappa~_l, so ranks are
non-increasing with depth -- shallow layers (whose errors are amplified by all later layers,
Theorem 3) are compressed least, deep layers most; layers skipped by the threshold are therefore a
shallow prefix and keep their full width.

Ambiguities and decisions (see the report):
  * Threshold scale.  LoRC Algorithm 1 skips layers with kappa~_l > threshold and §6.2 uses 30
    (LLaMA-3-8B) / 90 (LLaMA-2-13B, LLaMA-3-70B).  A raw product of 2L condition numbers exceeds
    30 for essentially every layer of such models, so the numbers only make sense on a log scale.
    ``skip_threshold_scale="ln"`` (default) compares ln kappa~_l; ``"raw"`` compares kappa~_l
    literally (in log space, so no overflow).
  * The target.  The paper sets d_max = the original width and picks d_min "based on the target
    compression ratio" without a formula.  We solve for d_min by bisection: the largest d_min (a
    real number) whose rounded ranks have mean <= the target (skipped layers count at full
    width), so the cache never exceeds the target.  Eq. 13 always gives the most sensitive layer
    d_max, so low targets can be out of reach even at d_min = min_rank; then (our extension, with
    a RuntimeWarning) d_min = min_rank and d_max is lowered by the same bisection, which keeps the
    progressive profile.
  * Eq. 13's max / min run over all L layers, skipped ones included (Algorithm 1 computes d_c^l
    before the skip test).
  * Rounding: d_c^l is rounded to the nearest integer, then clipped to [min_rank, d_max].
"""

from __future__ import annotations

import heapq
import math
import warnings
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

__all__ = [
    "IllConditionedWeightWarning",
    "uniform_ranks",
    "condition_number",
    "LorcRanks",
    "lorc_progressive_ranks",
    "budgeted_ranks",
]


class IllConditionedWeightWarning(RuntimeWarning):
    """A weight matrix is (numerically) singular, so its condition number is infinite.

    Fallback: sigma_min is floored at eps(float64) * max(shape) * sigma_max (the numerical-rank
    tolerance of numpy.linalg.matrix_rank), giving a finite but huge kappa.
    """


def uniform_ranks(num_layers: int, rank: int) -> list[int]:
    """The same rank for every layer."""
    if num_layers < 0 or rank < 0:
        raise ValueError("num_layers and rank must be >= 0")
    return [int(rank)] * num_layers


def _singular_values(W_or_s: torch.Tensor | np.ndarray | Sequence[float]) -> torch.Tensor:
    t = torch.as_tensor(W_or_s).to(torch.float64)
    if t.ndim == 1:
        return t.abs()
    if t.ndim == 2:
        return torch.linalg.svdvals(t)
    raise ValueError(f"expected a weight matrix or a vector of singular values, got shape {tuple(t.shape)}")


def condition_number(W_or_s, *, what: str = "weight") -> float:
    """kappa = sigma_max / sigma_min (LoRC eq. 10) of a matrix or of its singular values."""
    s = _singular_values(W_or_s)
    smax, smin = float(s.max()), float(s.min())
    if smax <= 0.0:
        raise ValueError(f"{what}: all-zero matrix has no condition number")
    tol = np.finfo(np.float64).eps * max(s.numel(), 1) * smax
    if smin <= tol:
        warnings.warn(
            f"{what}: numerically singular (sigma_min {smin:.3e} <= {tol:.3e}). Fallback: sigma_min "
            f"floored at {tol:.3e}, kappa = {smax / tol:.3e}.",
            IllConditionedWeightWarning,
            stacklevel=2,
        )
        smin = tol
    return smax / smin


@dataclass
class LorcRanks:
    ranks: list[int]  # per layer, shallow -> deep
    log_kappa_cum: list[float]  # ln kappa~_l (eq. 12)
    skipped: list[bool]  # True: not compressed (kept at full width)
    d_min: float  # the d_min of eq. 13 that was used
    d_max: float  # the d_max of eq. 13 that was used (< the argument only for very low targets)


def _eq13(logk: np.ndarray, d_max: int, d_min: float) -> np.ndarray:
    hi, lo = float(logk.max()), float(logk.min())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        frac = np.zeros_like(logk)  # all layers equally sensitive
    else:
        frac = (hi - logk) / (hi - lo)
    return d_max * (1.0 - frac * (1.0 - d_min / d_max))  # LoRC eq. 13


def lorc_progressive_ranks(
    layers: Sequence[tuple],
    *,
    d_max: int,
    target_avg_rank: float | None = None,
    target_ratio: float | None = None,
    d_min: float | None = None,
    full_width: int | None = None,
    min_rank: int = 1,
    skip_threshold: float | None = None,
    skip_threshold_scale: Literal["ln", "raw"] = "ln",
) -> LorcRanks:
    """LoRC Algorithm 1 / eq. 12-13: progressive per-layer ranks from cumulative condition numbers.

    layers: per layer (shallow -> deep) a pair (W_k, W_v) of weight matrices or of their singular
        value vectors.
    d_max: the largest compressed width (LoRC: the original KV width).  full_width: the width of a
        skipped layer (default d_max).
    Exactly one of target_avg_rank, target_ratio (= target_avg_rank / d_max) or d_min.  With a
    target, d_min is solved for (module docstring); the mean rank over all layers (skipped at
    full width) is then <= the target and as close to it as the rounding allows.
    skip_threshold: layers with kappa~_l above it are not compressed (Algorithm 1 line 8); see the
    module docstring for `skip_threshold_scale`.
    """
    L = len(layers)
    if L == 0:
        return LorcRanks([], [], [], float(d_max), float(d_max))
    full = d_max if full_width is None else int(full_width)
    if not 1 <= min_rank <= d_max <= full:
        raise ValueError(f"need 1 <= min_rank ({min_rank}) <= d_max ({d_max}) <= full_width ({full})")
    log_k = np.array(
        [
            math.log(condition_number(k, what=f"layer {l} W_k")) + math.log(condition_number(v, what=f"layer {l} W_v"))
            for l, (k, v) in enumerate(layers)
        ]
    )
    log_cum = np.cumsum(log_k[::-1])[::-1].copy()  # eq. 12: ln prod_{j>=l}
    if skip_threshold is None:
        skipped = np.zeros(L, dtype=bool)
    else:
        if skip_threshold_scale not in ("ln", "raw"):
            raise ValueError("skip_threshold_scale must be 'ln' or 'raw'")
        thr = math.log(skip_threshold) if skip_threshold_scale == "raw" else float(skip_threshold)
        skipped = log_cum > thr  # Algorithm 1, line 8

    def ranks_for(dmin: float, dmax: float = float(d_max)) -> np.ndarray:
        r = np.clip(np.rint(_eq13(log_cum, dmax, dmin)), min_rank, d_max).astype(np.int64)
        r[skipped] = full
        return r

    def largest_within(f, lo: float, hi: float, target: float) -> float:
        """largest x in [lo, hi] with mean(f(x)) <= target (f non-decreasing), by bisection."""
        if f(hi).mean() <= target + 1e-9:
            return hi
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if f(mid).mean() <= target + 1e-9 else (lo, mid)
        return lo

    n_targets = sum(x is not None for x in (target_avg_rank, target_ratio, d_min))
    if n_targets != 1:
        raise ValueError("give exactly one of target_avg_rank, target_ratio, d_min")
    dmax_eff = float(d_max)
    if d_min is not None:
        if not min_rank <= d_min <= d_max:
            raise ValueError(f"d_min {d_min} outside [{min_rank}, {d_max}]")
        dmin = float(d_min)
    else:
        target = float(target_avg_rank if target_avg_rank is not None else target_ratio * d_max)
        floor_mean = ranks_for(min_rank, min_rank).mean()
        if floor_mean > target + 1e-9:
            raise ValueError(
                f"target mean rank {target:.2f} unreachable: {int(skipped.sum())} skipped layers at width "
                f"{full} and min_rank {min_rank} already give {floor_mean:.2f}"
            )
        if ranks_for(min_rank).mean() <= target + 1e-9:
            # the paper's case: d_max fixed, solve for d_min
            dmin = largest_within(ranks_for, float(min_rank), float(d_max), target)
        else:
            # even d_min = min_rank overshoots (eq. 13 always gives the most sensitive layer
            # d_max): keep the progressive profile and lower d_max as well.
            dmin = float(min_rank)
            dmax_eff = largest_within(lambda x: ranks_for(min_rank, x), float(min_rank), float(d_max), target)
            warnings.warn(
                f"LoRC: target mean rank {target:.2f} is below what eq. 13 reaches with d_max={d_max} "
                f"(d_min=min_rank={min_rank} gives {ranks_for(min_rank).mean():.2f}); d_max lowered to "
                f"{dmax_eff:.2f}.",
                RuntimeWarning,
                stacklevel=2,
            )
    r = ranks_for(dmin, dmax_eff)
    return LorcRanks(ranks=r.tolist(), log_kappa_cum=log_cum.tolist(), skipped=skipped.tolist(), d_min=dmin, d_max=dmax_eff)


def _budget_dp(curves, costs, lo, hi, units):
    """Exact min sum_l e_l(r_l) s.t. sum_l c_l (r_l - lo_l) = units (multiple-choice knapsack DP)."""
    INF = np.inf
    best = np.full(units + 1, INF)
    best[0] = 0.0
    choice = []
    for e, c, a, b in zip(curves, costs, lo, hi):
        new = np.full(units + 1, INF)
        arg = np.full(units + 1, -1, dtype=np.int64)
        for r in range(a, b + 1):
            shift = c * (r - a)
            if shift > units:
                break
            cand = best[: units + 1 - shift] + e[r]
            better = cand < new[shift:]
            new[shift:][better] = cand[better]
            arg[shift:][better] = r
        best = new
        choice.append(arg)
    if not np.isfinite(best[units]):
        return None
    ranks, u = [], units
    for arg, c, a in zip(reversed(choice), reversed(costs), reversed(lo)):
        r = int(arg[u])
        ranks.append(r)
        u -= c * (r - a)
    return ranks[::-1]


def budgeted_ranks(
    error_curves: Sequence[Sequence[float]],
    budget: int,
    cost_per_rank: int | Sequence[int] = 1,
    min_rank: int = 0,
    max_rank: int | None = None,
    *,
    method: Literal["greedy", "dp"] = "greedy",
    gain: Literal["absolute", "relative"] = "absolute",
) -> list[int]:
    """Per-layer ranks with sum_l cost_l * r_l == budget exactly, spending rank where it helps most.

    error_curves[l][r]: measured error of layer l at rank r (r = 0 .. len-1; the usable range is
    [min_rank, min(max_rank, len-1)]).  cost_per_rank: integer cache cost of one rank unit, shared
    or per layer (e.g. 1 per latent dim; 2 if a layer's K and V latents share one rank).

    method="greedy" (marginal analysis): start every layer at min_rank and repeatedly give one
    rank to the layer with the largest error reduction per unit cost, e_l(r) - e_l(r+1) / c_l,
    until the budget is spent.  Optimality: with equal costs this is exactly optimal whenever
    every curve is convex in r (non-increasing marginal gains -- the usual shape of SVD tail
    errors): the separable-convex resource-allocation result (Gross 1956 / Fox 1966); the chosen
    steps are the `budget` largest marginal gains, and convexity makes each layer's chosen steps a
    prefix.  For non-convex curves or unequal costs greedy is a heuristic.  If it cannot spend the
    budget exactly (unequal costs) it falls back to the DP, with a warning.
    gain="relative" ranks the steps by CARE's score s_l(r) (eq. 1) instead: the error a rank
    removes as a share of the layer's remaining error, which puts layers of different spectral
    scales on one footing (CARE's water-filling; a heuristic, it does not minimise the summed error).
    method="dp": exact optimum for arbitrary curves and integer costs (multiple-choice knapsack
    dynamic programme, O(L * R * budget)); absolute gains only.
    Raises ValueError if no allocation meets the budget exactly.
    """
    L = len(error_curves)
    curves = [np.asarray(torch.as_tensor(e, dtype=torch.float64).cpu(), dtype=np.float64) for e in error_curves]
    costs = [int(cost_per_rank)] * L if np.isscalar(cost_per_rank) else [int(c) for c in cost_per_rank]
    if len(costs) != L or any(c <= 0 for c in costs):
        raise ValueError("cost_per_rank must be a positive integer or one per layer")
    lo = [int(min_rank)] * L
    hi = [len(e) - 1 if max_rank is None else min(int(max_rank), len(e) - 1) for e in curves]
    if any(a > b for a, b in zip(lo, hi)):
        raise ValueError(f"min_rank {min_rank} exceeds a layer's largest measured rank")
    units = int(budget) - sum(c * a for c, a in zip(costs, lo))
    if units < 0 or units > sum(c * (b - a) for c, a, b in zip(costs, lo, hi)):
        raise ValueError(
            f"budget {budget} outside [{sum(c * a for c, a in zip(costs, lo))}, {sum(c * b for c, b in zip(costs, hi))}]"
        )
    if gain not in ("absolute", "relative"):
        raise ValueError("gain must be 'absolute' or 'relative'")
    if method == "dp":
        if gain != "absolute":
            raise ValueError("the DP minimises the summed error: use method='greedy' with gain='relative'")
        ranks = _budget_dp(curves, costs, lo, hi, units)
        if ranks is None:
            raise ValueError(f"no allocation meets budget {budget} exactly with costs {sorted(set(costs))}")
        return ranks
    if method != "greedy":
        raise ValueError("method must be 'greedy' or 'dp'")
    ranks = list(lo)
    heap: list[tuple[float, int]] = []

    def push(l: int) -> None:
        if ranks[l] < hi[l]:
            e = curves[l]
            drop = e[ranks[l]] - e[ranks[l] + 1]
            if gain == "relative":  # CARE eq. 1; an exact layer (no error left) gains nothing more
                drop = drop / e[ranks[l]] if e[ranks[l]] > 0 else 0.0
            heapq.heappush(heap, (-drop / costs[l], l))

    for l in range(L):
        push(l)
    left = units
    deferred: list[tuple[float, int]] = []
    while left > 0 and heap:
        neg_gain, l = heapq.heappop(heap)
        if costs[l] > left:  # cannot afford this layer's step any more
            deferred.append((neg_gain, l))
            continue
        ranks[l] += 1
        left -= costs[l]
        push(l)
    if left != 0 and gain == "relative":
        raise ValueError(f"budgeted_ranks: relative gains cannot spend the last {left} budget units with unequal costs")
    if left != 0:
        warnings.warn(
            f"budgeted_ranks: greedy left {left} budget units unspendable with unequal costs; "
            "falling back to the exact DP.",
            RuntimeWarning,
            stacklevel=2,
        )
        return budgeted_ranks(error_curves, budget, costs, min_rank, max_rank, method="dp")
    return ranks
