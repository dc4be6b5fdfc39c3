"""Where the cache budget goes: latent widths per layer, ranks per latent, each layer's plan.

    latent_widths   the width of every layer from --rank, --ranks or --kv-ratio (the rope keys'
                    share of the cache comes off the ratio first)
    allocate_widths redistribute the same total over the layers: LoRC progressive ranks (weights'
                    condition numbers) or budgeted (the method's activation-loss curves per layer)
    make_ranks      (k_rank, v_rank) of one latent of a given width, clamped or rejected
    plan_layer      the layer's RoPE choice (kept pairs / shared rotation / full) and ranks
"""

from __future__ import annotations

import logging

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


def allocate_widths(widths: list[int], opts: ConvertOptions, source: SourceModel, hidden, cached_stats: dict) -> list[int]:
    """Per-layer latent widths with the same total as ``widths`` over the compressed layers.

    lorc: LoRC progressive ranks from the condition numbers of each layer's compressed key and value
    weights (weights only); the mean width is <= the uniform one.  budgeted: error curves of the
    method's activation loss per layer (statistics pre-pass over all layers with the source model's
    activations), then the allocation minimising the summed loss at exactly the same total.
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
    total = sum(clamp(widths[i]) for i in layers)
    step = opts.latent_groups * (1 if opts.svd == "joint" or nope_dim == 0 else 2)
    lo = step
    if opts.rank_allocation == "lorc":
        from converters.math.rank_allocation import lorc_progressive_ranks

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
        res = lorc_progressive_ranks(pairs, d_max=limit, target_avg_rank=total / len(layers), min_rank=lo)
        ranks = [max(lo, r // step * step) for r in res.ranks]
    else:
        from converters.math.rank_allocation import budgeted_ranks

        curves = []
        h = hidden
        for i in range(L):
            src = source.attention(i)
            if i in layers:
                stats = calib.attention_stats(source, i, h, src)
                if opts.calibration_inputs == "original":
                    cached_stats[i] = stats
                plan = plan_layer(i, lo, opts, source, stats)
                wk, wv = compressed_blocks(src, plan, dims)
                curve = methods.width_error_curve(opts, stats, wk, wv, plan.joint)
                curves.append(curve[::step].clone())  # width units of `step` values
            if i + 1 < L and i < max(layers):
                h = calib.run_layer(calib.source_layer_module(source, i), h)
        units = budgeted_ranks(curves, total // step, 1, min_rank=1)
        ranks = [u * step for u in units]
        left = total - sum(ranks)  # total not a multiple of step: give the rest to the first layer with room
        for k in range(len(ranks)):
            room = limit - ranks[k]
            add = min(room, left)
            ranks[k] += add
            left -= add
    for i, r in zip(layers, ranks):
        out[i] = r
    return out
