import math

import numpy as np
import pytest
import torch

from converters.math.rank_allocation import (
    IllConditionedWeightWarning,
    budgeted_ranks,
    condition_number,
    lorc_progressive_ranks,
    uniform_ranks,
)


def _layers(randn, L=12, out=16, D=24):
    # K/V weights with per-layer condition numbers varying between ~3 and ~300
    layers = []
    for l in range(L):
        ks, vs = [], []
        for m in range(2):
            U, _ = torch.linalg.qr(randn(D, out, seed=100 * l + 10 * m))
            V, _ = torch.linalg.qr(randn(out, out, seed=100 * l + 10 * m + 1))
            kappa = 3.0 * 100 ** ((l * 7 + m * 3) % L / L)
            s = torch.logspace(0, -math.log10(kappa), out, dtype=torch.float64)
            (ks if m == 0 else vs).append((V * s) @ U.T)  # [out, D], condition number kappa
        layers.append((ks[0], vs[0]))
    return layers


def test_uniform():
    assert uniform_ranks(3, 7) == [7, 7, 7]


def test_condition_number_matrix_and_singular_values(randn):
    W = randn(8, 12, seed=1)
    s = torch.linalg.svdvals(W)
    assert condition_number(W) == pytest.approx(float(s[0] / s[-1]))
    assert condition_number(s) == pytest.approx(float(s[0] / s[-1]))


def test_singular_weight_warns_and_stays_finite(randn):
    W = randn(8, 3, seed=2) @ randn(3, 12, seed=3)  # rank 3 of 8
    with pytest.warns(IllConditionedWeightWarning, match="numerically singular"):
        k = condition_number(W)
    assert math.isfinite(k) and k > 1e10


def test_lorc_eq12_eq13_and_monotone(randn):
    layers = _layers(randn)
    res = lorc_progressive_ranks(layers, d_max=16, d_min=4)
    logk = [math.log(condition_number(k)) + math.log(condition_number(v)) for k, v in layers]
    expect_cum = np.cumsum(logk[::-1])[::-1]
    np.testing.assert_allclose(res.log_kappa_cum, expect_cum)  # eq. 12
    hi, lo = expect_cum.max(), expect_cum.min()
    expect = np.rint(16 * (1 - (hi - expect_cum) / (hi - lo) * (1 - 4 / 16)))  # eq. 13
    assert res.ranks == expect.astype(int).tolist()
    # LoRC: cumulative condition number non-increasing with depth -> ranks non-increasing with depth
    assert all(a >= b for a, b in zip(res.log_kappa_cum, res.log_kappa_cum[1:]))
    assert all(a >= b for a, b in zip(res.ranks, res.ranks[1:]))
    assert res.ranks[0] == 16 and res.ranks[-1] == 4  # most sensitive gets d_max, least d_min


@pytest.mark.parametrize("target", [5.0, 8.0, 11.5, 16.0])
def test_lorc_target_average_and_bounds(target, randn):
    layers = _layers(randn)
    if target < 10:  # below what eq. 13 reaches with d_max = 16: d_max is lowered, with a warning
        with pytest.warns(RuntimeWarning, match="d_max lowered"):
            res = lorc_progressive_ranks(layers, d_max=16, target_avg_rank=target, min_rank=2)
        assert res.d_max < 16
    else:
        res = lorc_progressive_ranks(layers, d_max=16, target_avg_rank=target, min_rank=2)
    assert all(2 <= r <= 16 for r in res.ranks)
    assert np.mean(res.ranks) <= target + 1e-9
    assert np.mean(res.ranks) >= target - 1.0  # as close as the rounding allows (<= 1 per layer)
    assert all(a >= b for a, b in zip(res.ranks, res.ranks[1:]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        same = lorc_progressive_ranks(layers, d_max=16, target_ratio=target / 16, min_rank=2)
    assert same.ranks == res.ranks


def test_lorc_skip_threshold_keeps_shallow_prefix_full(randn):
    layers = _layers(randn)
    probe = lorc_progressive_ranks(layers, d_max=16, d_min=4)
    thr = 0.5 * (probe.log_kappa_cum[2] + probe.log_kappa_cum[3])  # between layers 2 and 3
    res = lorc_progressive_ranks(layers, d_max=16, d_min=4, full_width=20, skip_threshold=thr)
    assert res.skipped == [True] * 3 + [False] * 9  # skipped layers are the shallow prefix
    assert res.ranks[:3] == [20] * 3 and all(r <= 16 for r in res.ranks[3:])
    raw = lorc_progressive_ranks(
        layers, d_max=16, d_min=4, full_width=20, skip_threshold=math.exp(thr), skip_threshold_scale="raw"
    )
    assert raw.skipped == res.skipped
    with pytest.raises(ValueError, match="unreachable"):
        lorc_progressive_ranks(layers, d_max=16, target_avg_rank=3.0, full_width=20, skip_threshold=thr)


def _synthetic_curves(L=10, R=33, seed=0):
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(L):
        a, tau = rng.uniform(0.2, 5.0), rng.uniform(2.0, 12.0)
        curves.append(a * np.exp(-np.arange(R) / tau))  # convex, decreasing, like SVD tails
    return curves


@pytest.mark.parametrize("budget", [40, 100, 160, 250])
def test_budgeted_exact_budget_beats_uniform_and_is_optimal_on_convex(budget):
    curves = _synthetic_curves()
    ranks = budgeted_ranks(curves, budget, min_rank=1, max_rank=32)
    assert sum(ranks) == budget and all(1 <= r <= 32 for r in ranks)
    total = sum(c[r] for c, r in zip(curves, ranks))
    uni = budget // len(curves)
    uniform_total = sum(c[uni] for c in curves)  # uniform spends the same budget
    assert uni * len(curves) == budget
    assert total < uniform_total
    dp = budgeted_ranks(curves, budget, min_rank=1, max_rank=32, method="dp")
    assert sum(dp) == budget
    assert total == pytest.approx(sum(c[r] for c, r in zip(curves, dp)), rel=1e-12)  # greedy optimal


def test_budgeted_unequal_costs_exact_and_dp_on_nonconvex():
    curves = _synthetic_curves(L=6, R=21, seed=1)
    costs = [1, 2, 1, 3, 2, 1]
    ranks = budgeted_ranks(curves, 47, costs, min_rank=0)
    assert sum(c * r for c, r in zip(costs, ranks)) == 47
    # non-convex curve (a plateau then a cliff): greedy is myopic, DP is exact and never worse
    cliff = np.array([10.0] * 8 + [0.0] * 9)
    smooth = np.linspace(3.0, 0.0, 17)
    g = budgeted_ranks([cliff, smooth], 8, method="greedy")
    d = budgeted_ranks([cliff, smooth], 8, method="dp")
    tot = lambda rs: cliff[rs[0]] + smooth[rs[1]]
    assert sum(d) == sum(g) == 8 and tot(d) <= tot(g) and d == [8, 0]
    with pytest.raises(ValueError):
        budgeted_ranks(curves, 10_000)
    with pytest.raises(ValueError, match="exactly"):
        budgeted_ranks([np.zeros(5), np.zeros(5)], 3, [2, 2], method="dp")


def test_relative_gain_ignores_a_layer_scale_and_absolute_does_not():
    # CARE's score (eq. 1) of an exponential tail is constant, 1 - exp(-1/tau), whatever its scale:
    # the faster-decaying layer gets every rank it can, though the other holds 100x the error.
    fast_small, slow_large = np.exp(-np.arange(21) / 3.0), 100 * np.exp(-np.arange(21) / 4.0)
    assert budgeted_ranks([fast_small, slow_large], 20, max_rank=15, gain="relative") == [15, 5]
    small, large = budgeted_ranks([fast_small, slow_large], 20, max_rank=15, gain="absolute")
    assert large > small
    with pytest.raises(ValueError, match="greedy"):
        budgeted_ranks([fast_small, slow_large], 20, method="dp", gain="relative")
