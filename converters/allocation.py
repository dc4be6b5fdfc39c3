"""Where the cache budget goes: latent widths per layer, ranks per latent, each layer's plan.

    latent_widths   the width of every layer from --rank, --ranks or --kv-ratio (the rope keys'
                    share of the cache comes off the ratio first)
    allocate_widths redistribute the same total over the layers: LoRC progressive ranks (weights'
                    condition numbers), budgeted (the method's activation-loss curves per layer),
                    care (CARE's water-filling on the same curves, by each layer's relative gain) or
                    kl (each layer's measured effect on the model's output; may keep layers whole)
    make_ranks      (k_rank, v_rank) of one latent of a given width, clamped or rejected
    plan_layer      the layer's RoPE choice (kept pairs / shared rotation / full) and ranks
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from converters import calibration as calib
from converters import methods
from converters.importers.hf import SourceModel
from converters.latent_attention import LatentPlan, compressed_blocks
from converters.math import rope_selection as rs
from converters.options import ConversionError, ConvertOptions
from latentkv import format as fmt

log = logging.getLogger("latentkv.convert")


def rope_values(opts: ConvertOptions, dims: fmt.ModelDims, qk_norm: bool) -> int:
    """Cached values per token spent on rope keys (and key scales) in one layer."""
    G = dims.num_key_value_heads
    if opts.method == "transkv":
        return 0  # reduced heads keep full RoPE at run time and cache G (r_k + r_v) values
    if opts.rope_mode == "partial":
        nope = dims.head_dim - 2 * opts.rope_pairs
        return G * 2 * opts.rope_pairs + (G if qk_norm and nope else 0)
    if opts.rope_mode == "shared":
        return 2 * opts.rope_pairs
    return 0


def latent_widths(opts: ConvertOptions, dims: fmt.ModelDims, qk_norm: bool) -> list[int]:
    """Latent width of every layer, from --rank, --ranks or --kv-ratio."""
    L = dims.num_hidden_layers
    if opts.ranks is not None:
        if len(opts.ranks) != L:
            raise ConversionError(f"ranks has {len(opts.ranks)} entries; the model has {L} layers")
        return list(opts.ranks)
    if opts.rank is not None:
        return [opts.rank] * L
    ratio = opts.target_kv_ratio
    source = fmt.source_cache_values_per_token(dims)
    rope = rope_values(opts, dims, qk_norm)
    width = round(ratio * source) - rope
    if width < 1:
        raise ConversionError(
            f"kv_ratio {ratio} leaves no room for a latent: the rope keys alone take "
            f"{rope / source:.1%} of the source cache; keep fewer rope pairs or raise the ratio"
        )
    return [width] * L


def width_limit(opts: ConvertOptions, dims: fmt.ModelDims, nope_dim: int) -> int:
    """The largest latent width that still compresses anything (beyond it the latent is exact)."""
    G, d_h = dims.num_key_value_heads, dims.head_dim
    if opts.svd == "joint" or nope_dim == 0:
        return min(G * (nope_dim + d_h), dims.hidden_size)
    return 2 * min(G * d_h, dims.hidden_size)


def make_ranks(width: int, opts: ConvertOptions, dims: fmt.ModelDims, nope_dim: int) -> tuple[int, int]:
    """(k_rank, v_rank) for a latent of ``width`` values, checked against what is possible.

    A width derived from --kv-ratio is clamped to the largest useful rank (beyond it the latent is
    exact already); an explicit --rank above it is an error.
    """
    clamp = opts.derives_widths
    n_grp = opts.latent_groups
    limit = width_limit(opts, dims, nope_dim)
    if opts.svd == "joint" or nope_dim == 0:
        k_rank = v_rank = width
    else:
        if width < 2:
            raise ConversionError(f"a split latent needs width >= 2, got {width}")
        k_rank = width // 2  # MHA2MLA's SVD_split gives d_kv / 2 to each
        v_rank = width - k_rank
    if width > limit and clamp:
        log.info("latent width %d is more than the useful maximum %d; using %d", width, limit, limit)
        return make_ranks(limit, opts, dims, nope_dim)
    if width > limit:
        raise ConversionError(f"latent width {width} exceeds the largest useful rank {limit} for this model")
    for name, r in (("k", k_rank), ("v", v_rank)):
        if r % n_grp:
            raise ConversionError(f"{name} rank {r} is not divisible by latent_groups={n_grp}; pick a width that is")
    return k_rank, v_rank


def plan_layer(i: int, width: int, opts: ConvertOptions, source: SourceModel, stats) -> LatentPlan:
    dims = source.dims
    G, n_f = dims.num_key_value_heads, dims.head_dim // 2
    plan = LatentPlan(rope_mode=opts.rope_mode, joint=opts.svd == "joint", k_rank=0, v_rank=0, groups=opts.latent_groups,
                      hadamard=opts.hadamard)
    if opts.rope_mode == "partial":
        scores = rs.two_norm_scores(stats.q_pair_norms, stats.k_pair_norms) if stats is not None else None
        plan.pairs = rs.select_partial_pairs(opts.rope_strategy, n_f, G, opts.rope_pairs, scores)
        nope_dim = dims.head_dim - 2 * opts.rope_pairs
    elif opts.rope_mode == "shared":
        plan.rotation, energy = rs.shared_rotation(stats.key_pair_cov)
        plan.components = rs.top_components(energy, opts.rope_pairs)
        nope_dim = dims.head_dim
    else:
        nope_dim = dims.head_dim
    plan.k_rank, plan.v_rank = make_ranks(width, opts, dims, nope_dim)
    plan.joint = plan.joint or nope_dim == 0
    return plan


def allocate_widths(widths: list[int], opts: ConvertOptions, source: SourceModel, hidden, cached_stats: dict,
                    convert_at=None) -> list[int | None]:
    """Per-layer latent widths with the same total as ``widths`` over the compressed layers; None
    marks a layer the allocation keeps uncompressed.

    lorc: LoRC progressive ranks from the condition numbers of each layer's compressed key and value
    weights (weights only); the mean width is <= the uniform one.  budgeted: error curves of the
    method's activation loss per layer (statistics pre-pass over all layers with the source model's
    activations), then the allocation minimising the summed loss at exactly the same total.  care: the
    same curves, CARE's greedy by relative gain (``_budgeted_widths``).  kl:
    each layer's effect on the model's output (``converters.sensitivity``) at a few widths around
    the uniform one and uncompressed, then the choice per layer minimising the summed KL within
    the same cache (latent and rope values); ``convert_at(i, width, stats, hidden)`` builds a candidate
    layer from its statistics and input hidden states.
    """
    dims = source.dims
    L = dims.num_hidden_layers
    layers = [i for i in range(L) if i not in opts.keep_layers]
    out = list(widths)
    if not layers:
        return out
    nope_dim = dims.head_dim - 2 * opts.rope_pairs if opts.rope_mode == "partial" else dims.head_dim
    limit = width_limit(opts, dims, nope_dim)
    clamp = lambda w: min(w, limit) if opts.derives_widths else w  # noqa: E731
    step = opts.latent_groups * (1 if opts.svd == "joint" or nope_dim == 0 else 2)
    base = {i: clamp(widths[i]) for i in layers}
    if opts.rank_allocation == "lorc":
        ranks = _lorc_widths(layers, sum(base.values()), opts, source, limit, step)
    else:
        keep = opts.allocation_samples if opts.rank_allocation == "kl" else 0
        stats, inputs = _source_pass(opts, source, layers, hidden, keep)
        if opts.calibration_inputs == "original":
            cached_stats.update(stats)
        if opts.rank_allocation in ("budgeted", "care"):
            ranks = _budgeted_widths(layers, base, opts, source, stats, limit, step)
        else:
            build = lambda i, w: convert_at(i, w, stats[i], inputs[i])  # noqa: E731
            ranks = _kl_widths(base, opts, source, inputs, limit, step, build)
    for i, r in zip(layers, ranks):
        out[i] = r
    return out


def _source_pass(opts: ConvertOptions, source: SourceModel, layers: list[int], hidden, keep: int):
    """Statistics of every compressed layer on the source model's activations, and the hidden states
    entering every layer of the first ``keep`` calibration sequences."""
    stats, inputs = {}, []
    h = hidden
    for i in range(source.dims.num_hidden_layers):
        inputs.append(h[:keep].clone() if keep else None)
        if i in layers:
            stats[i] = calib.attention_stats(source, i, h, source.attention(i))
        if i + 1 < source.dims.num_hidden_layers and (keep or i < max(layers)):
            h = calib.run_layer(calib.source_layer_module(source, i), h)
    return stats, inputs


def _lorc_widths(layers: list[int], total: int, opts: ConvertOptions, source: SourceModel, limit: int, step: int):
    from converters.math.rank_allocation import lorc_progressive_ranks

    dims = source.dims
    pairs = []
    for i in layers:
        src = source.attention(i)
        plan = LatentPlan(rope_mode=opts.rope_mode, joint=True, k_rank=0, v_rank=0, groups=opts.latent_groups)
        if opts.rope_mode == "partial":  # weights only: the pairs a weight-only strategy keeps
            strategy = opts.rope_strategy if opts.rope_strategy != "2norm" else "high"  # 2norm: a proxy
            plan.pairs = rs.select_partial_pairs(strategy, dims.head_dim // 2, dims.num_key_value_heads, opts.rope_pairs, None)
        elif opts.rope_mode == "shared":
            plan.rope_mode = "full"  # condition numbers of W_k, W_v as a whole
        wk, wv = compressed_blocks(src, plan, dims)
        pairs.append((wk, wv) if wk.shape[0] else (wv, wv))
    res = lorc_progressive_ranks(pairs, d_max=limit, target_avg_rank=total / len(layers), min_rank=step)
    return [max(step, r // step * step) for r in res.ranks]


def _budgeted_widths(layers: list[int], base: dict[int, int], opts: ConvertOptions, source: SourceModel, stats: dict,
                     limit: int, step: int):
    """budgeted: the widths of least summed activation error (exact for convex curves).  care: CARE's
    water-filling by eq. 1 as the paper states it, each layer between half and twice its uniform
    width as CARE's code does (that code also weights early layers up and wide ones down; not
    reproduced). On near-exponential tails eq. 1 is nearly constant per layer, so it gives layers
    either bound: on SmolLM2 at 50%, 25 of the 30 widths came out at 96 or 384."""
    from converters.math.rank_allocation import budgeted_ranks

    total = sum(base.values())
    curves = []
    for i in layers:
        src = source.attention(i)
        plan = plan_layer(i, step, opts, source, stats[i])
        wk, wv = compressed_blocks(src, plan, source.dims)
        curve = methods.width_error_curve(opts, stats[i], wk, wv, plan.joint)
        curves.append(curve[::step].clone())  # width units of `step` values
    if opts.rank_allocation == "care":
        uniform = total // len(layers) // step  # the same cache spread evenly
        units = budgeted_ranks(curves, total // step, 1, min_rank=max(1, uniform // 2), max_rank=2 * uniform,
                               gain="relative")
    else:
        units = budgeted_ranks(curves, total // step, 1, min_rank=1)
    ranks = [u * step for u in units]
    left = total - sum(ranks)  # total not a multiple of step: give the rest to the first layer with room
    for k in range(len(ranks)):
        add = min(limit - ranks[k], left)
        ranks[k] += add
        left -= add
    return ranks


# Candidate widths of the kl allocation, as fractions of the layer's uniform width (and uncompressed).
KL_WIDTH_FRACTIONS = (0.5, 0.75, 1.0, 1.5, 2.0)


def kl_candidates(base: int, limit: int, step: int, latent_room: int) -> list[int]:
    """Latent widths measured for a layer whose uniform width is ``base``: multiples of ``step``
    below both the exact width ``limit`` and ``latent_room`` (the source cache less the rope values:
    from there on keeping the layer uncompressed costs no more)."""
    top = min(limit, latent_room)
    snap = lambda w: max(step, round(w / step) * step)  # noqa: E731
    return sorted({snap(f * base) for f in KL_WIDTH_FRACTIONS if snap(f * base) < top} | ({base} if base < top else set()))


def _kl_widths(base: dict[int, int], opts: ConvertOptions, source: SourceModel, inputs, limit: int, step: int,
               convert_at):
    """Measure D_l(w) at each layer's candidate widths, then :func:`pick_widths`."""
    from converters.sensitivity import layer_sensitivities

    dims = source.dims
    rope = rope_values(opts, dims, source.qk_norm)
    whole = fmt.source_cache_values_per_token(dims)
    device = opts.refine_device or ("cuda" if torch.cuda.is_available() else "cpu")
    candidates = {i: kl_candidates(w, limit, step, whole - rope) for i, w in base.items()}
    kl = layer_sensitivities(source, candidates, convert_at, inputs, device)
    return pick_widths(kl, base, rope, whole)


def pick_widths(kl: dict[int, dict[int, float]], base: dict[int, int], rope: int, whole: int) -> list[int | None]:
    """One width per layer (None: uncompressed, D = 0, ``whole`` cache values) minimising
    sum_l D_l(w_l) with exactly the cache of ``base`` (a latent of width w caches w + ``rope``
    values): a multiple-choice knapsack over the measured widths, solved exactly by the DP of
    ``budgeted_ranks`` in units of the costs' greatest common divisor (non-measured widths cost inf).
    """
    from converters.math.rank_allocation import budgeted_ranks

    cost = {i: {w: w + rope for w in ws} for i, ws in kl.items()}  # cache values per token
    total = sum(w + rope for w in base.values())
    unit = math.gcd(total, whole, *(c for cs in cost.values() for c in cs.values()))
    curves = []
    for i in base:
        curve = np.full(whole // unit + 1, np.inf)
        for w, c in cost[i].items():
            curve[c // unit] = kl[i][w]
        curve[whole // unit] = 0.0  # uncompressed: the source layer itself
        curves.append(curve)
    units = budgeted_ranks(curves, total // unit, 1, min_rank=0, method="dp")
    chosen = [None if u * unit == whole else u * unit - rope for u in units]
    picked = sum(float(c[u]) for c, u in zip(curves, units))
    uniform = sum(kl[i][w] for i, w in base.items() if w in kl[i])
    log.info("kl rank allocation: summed KL %.4f (uniform widths: %.4f); widths %s", picked, uniform,
             ["keep" if w is None else w for w in chosen])
    return chosen
