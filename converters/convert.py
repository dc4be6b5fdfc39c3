"""Convert a Hugging Face MHA/GQA checkpoint into a latent-KV checkpoint, layer by layer.

    for each layer i (only layer i's weights in memory):
        stats  <- calibration activations of layer i        (if the method needs data)
        plan   <- RoPE choice (partial pairs / shared rotation / full) and latent ranks
        layer  <- build_latent_layer(source attention, plan, factorizer)
        write layer tensors; move calibration hidden states on through layer i

Everything is written to a temporary directory that is renamed to OUT at the end.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from converters import calibration as calib
from converters import methods
from converters.importers.hf import SourceModel
from converters.transkv_layer import build_reduced_layer, kv_head_autocorrelation
from converters.latent_attention import LatentPlan, build_latent_layer, compressed_blocks, source_layer_tensors
from converters.math import rope_selection as rs
from latentkv import checkpoint as ckpt
from latentkv import format as fmt

log = logging.getLogger("latentkv.convert")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# The recommended recipe is the default (the best one-shot setting measured on the real SmolLM2,
# benchmarks/results/smollm2_quality.md); the papers' settings stay available by option.
DEFAULT_KV_RATIO = 0.5  # when none of rank, ranks, kv_ratio is given
# Calibration text when the user gives none: the C4 sample shipped with the package (NOTICE beside it).
DEFAULT_CALIBRATION_TEXT = Path(__file__).resolve().parent / "data" / "text" / "c4_sample.jsonl"


@dataclass
class ConvertOptions:
    rope_mode: Literal["partial", "shared", "full"] = "full"
    rope_strategy: Literal["high", "low", "uniform", "2norm"] = "2norm"  # partial only
    rope_pairs: int = 1  # partial: pairs kept per KV head; shared: rotated 2-D components in all
    svd: Literal["joint", "split"] = "joint"
    rank: int | None = None  # latent width per layer (joint rank, or k_rank + v_rank when split)
    ranks: list[int] | None = None  # per-layer latent widths
    kv_ratio: float | None = None  # target cache size / source cache size; DEFAULT_KV_RATIO if no size is given
    latent_groups: int = 1  # Palu-style grouped-head latents
    hadamard: bool = False  # rotate the latent by a block Hadamard folded into the weights (for INT4 caches)
    keep_layers: list[int] = field(default_factory=list)  # left uncompressed
    method: Literal["svd", "activation", "latentllm", "transkv"] = "activation"  # see converters.methods
    transkv_scale: Literal["original", "reduced"] = "original"  # transkv softmax scale: 1/sqrt(d_h) or 1/sqrt(r_k)
    preconditioner: str = "root_covariance"  # method activation: LatentLLM Table 1 kind
    centred: bool = False  # method activation: centred covariance + bias update (LatentLLM eq. 41-47)
    damping: float = 0.01  # relative damping of the activation statistics (activation, latentllm)
    rank_allocation: Literal["uniform", "lorc", "budgeted"] = "uniform"  # per-layer widths from kv_ratio / rank
    nope_scaling: Literal["none", "fit"] = "none"  # partial/shared: scale NoPE'd key parts (math/nope_scaling.py)
    refine_steps: int = 100  # Adam steps fitting each latent layer to the source attention's output (math/refine.py)
    refine_lr: float = 1e-3  # Adam; the loss is in units of the relative error, so one rate suits every layer
    refine_batch: int = 4  # calibration sequences per step
    refine_params: Literal["latent", "attention"] = "latent"  # latent factors only, or also q_proj / o_proj
    refine_device: str | None = None  # where the refinement runs; None: cuda when available, else cpu
    calibration_text: str | None = None  # plain text, or JSON lines with a text field; None: DEFAULT_CALIBRATION_TEXT
    calibration_text_field: str = "text"
    calibration_samples: int = 32
    calibration_seq_len: int = 256
    calibration_seed: int = 0
    calibration_inputs: Literal["original", "converted"] = "original"
    dtype: str | None = None  # output dtype; default: the source's
    shard_bytes: int = ckpt.DEFAULT_SHARD_BYTES

    def needs_calibration(self) -> bool:
        return ((self.rope_mode == "partial" and self.rope_strategy == "2norm") or self.rope_mode == "shared"
                or self.method != "svd" or self.rank_allocation == "budgeted" or self.nope_scaling == "fit"
                or self.refine_steps > 0)

    def calibration_path(self) -> Path:
        return Path(self.calibration_text) if self.calibration_text else DEFAULT_CALIBRATION_TEXT


class ConversionError(ValueError):
    """Options that cannot work for this source model."""


# ---- ranks -------------------------------------------------------------------------------------

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
    given = [x is not None for x in (opts.rank, opts.ranks, opts.kv_ratio)]
    if sum(given) > 1:
        raise ConversionError("give at most one of rank, ranks (per layer) or kv_ratio")
    if opts.ranks is not None:
        if len(opts.ranks) != L:
            raise ConversionError(f"ranks has {len(opts.ranks)} entries; the model has {L} layers")
        return list(opts.ranks)
    if opts.rank is not None:
        return [opts.rank] * L
    ratio = target_kv_ratio(opts)
    source = fmt.source_cache_values_per_token(dims)
    rope = rope_values(opts, dims, qk_norm)
    width = round(ratio * source) - rope
    if width < 1:
        raise ConversionError(
            f"kv_ratio {ratio} leaves no room for a latent: the rope keys alone take "
            f"{rope / source:.1%} of the source cache; keep fewer rope pairs or raise the ratio"
        )
    return [width] * L


def target_kv_ratio(opts: ConvertOptions) -> float:
    return DEFAULT_KV_RATIO if opts.kv_ratio is None else opts.kv_ratio


def derives_widths(opts: ConvertOptions) -> bool:
    """Widths come from a cache ratio (given or default): clamp them to what is useful."""
    return opts.rank is None and opts.ranks is None


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
    clamp = derives_widths(opts)
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


# ---- the conversion ----------------------------------------------------------------------------

def validate_options(opts: ConvertOptions, source: SourceModel) -> None:
    """Reject options that cannot work for ``source``, the cache size first (what users get wrong most)."""
    dims = source.dims
    if opts.kv_ratio is not None and not 0 < opts.kv_ratio <= 1:
        raise ConversionError(f"kv_ratio must be in (0, 1] (the cache size as a fraction of the source's), got {opts.kv_ratio}")
    if opts.rank is not None and opts.rank < 1:
        raise ConversionError(f"rank must be a positive latent width, got {opts.rank}")
    if opts.ranks is not None and min(opts.ranks, default=1) < 1:
        raise ConversionError(f"ranks must be positive latent widths, got {opts.ranks}")
    n_f, G = dims.head_dim // 2, dims.num_key_value_heads
    if opts.rope_mode == "partial" and not 1 <= opts.rope_pairs <= n_f:
        raise ConversionError(f"rope_pairs={opts.rope_pairs}: a KV head has only {n_f} frequency pairs (head_dim/2)")
    if opts.rope_mode == "shared":
        if source.qk_norm:
            raise ConversionError("shared RoPE cannot represent q/k-norm sources (Qwen3): use --rope-mode partial or full")
        if not 1 <= opts.rope_pairs <= n_f * G:
            raise ConversionError(f"rope_pairs={opts.rope_pairs}: shared RoPE has {n_f * G} components (KV heads x head_dim/2)")
    if G % opts.latent_groups:
        raise ConversionError(f"latent_groups={opts.latent_groups} does not divide the {G} KV heads")
    bad = [i for i in opts.keep_layers if not 0 <= i < dims.num_hidden_layers]
    if bad:
        raise ConversionError(f"keep_layers {bad} outside [0, {dims.num_hidden_layers})")
    if opts.method not in methods.METHODS:
        raise ConversionError(f"method {opts.method!r}: choose one of {', '.join(methods.METHODS)}")
    if opts.method == "activation" and opts.preconditioner not in methods.PRECONDITIONERS:
        raise ConversionError(f"preconditioner {opts.preconditioner!r}: choose one of {', '.join(methods.PRECONDITIONERS)}")
    if opts.centred and opts.method != "activation":
        raise ConversionError("--centred (centred covariance + bias update) goes with --method activation")
    if opts.method == "transkv" and opts.rank_allocation != "uniform":
        raise ConversionError("method transkv uses one head width for every layer: use --rank-allocation uniform")
    if opts.method == "latentllm" and opts.svd != "split":
        raise ConversionError("method latentllm builds separate key and value latents: use --svd split")
    if opts.damping < 0:
        raise ConversionError(f"damping must be >= 0, got {opts.damping}")
    if opts.rank_allocation not in methods.RANK_ALLOCATIONS:
        raise ConversionError(f"rank_allocation {opts.rank_allocation!r}: choose one of {', '.join(methods.RANK_ALLOCATIONS)}")
    if opts.rank_allocation != "uniform" and opts.ranks is not None:
        raise ConversionError("rank_allocation lorc/budgeted distributes a total budget: give kv_ratio or rank, not ranks")
    if opts.nope_scaling not in ("none", "fit"):
        raise ConversionError(f"nope_scaling {opts.nope_scaling!r}: choose none or fit")
    if opts.nope_scaling == "fit" and (opts.rope_mode == "full" or opts.method == "transkv"):
        raise ConversionError("--nope-scaling fit scales the key dims that lose RoPE: use it with --rope-mode partial or shared")
    if opts.nope_scaling == "fit" and source.qk_norm:
        raise ConversionError("--nope-scaling fit cannot scale keys of q/k-norm sources (the key norm undoes it); use none")
    if opts.refine_steps < 0 or opts.refine_lr <= 0 or opts.refine_batch < 1:
        raise ConversionError("refine_steps must be >= 0, refine_lr > 0 and refine_batch >= 1")
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise ConversionError(f"dtype {opts.dtype!r}: choose one of {', '.join(DTYPES)}")


def calibration_tokens(source: SourceModel, opts: ConvertOptions) -> torch.Tensor:
    """[N, L] token ids from the calibration text, checked before heavy work starts."""
    from transformers import AutoTokenizer

    from latentkv.text import check_tokenizer_matches, load_calibration_samples

    tokenizer = AutoTokenizer.from_pretrained(source.dir)
    check_tokenizer_matches(tokenizer, source.hf_config)
    path = opts.calibration_path()
    if not opts.calibration_text:
        log.info("no calibration text given: calibrating on the C4 sample shipped with latentkv (%s)", path.name)
    return load_calibration_samples(
        path, tokenizer, opts.calibration_samples, opts.calibration_seq_len,
        seed=opts.calibration_seed, text_field=opts.calibration_text_field,
    )


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


def convert(
    src_dir: str | Path,
    out_dir: str | Path,
    opts: ConvertOptions,
    *,
    overwrite: bool = False,
    progress: bool = True,
    calibration_ids: torch.Tensor | None = None,
) -> dict:
    """Convert ``src_dir`` into a latent checkpoint at ``out_dir``; returns a summary report.

    ``calibration_ids`` [N, L] replaces ``opts.calibration_text`` when given (tests, benchmarks).
    """
    t0 = time.perf_counter()
    source = SourceModel(src_dir)
    validate_options(opts, source)
    dims = source.dims
    widths = latent_widths(opts, dims, source.qk_norm)
    out_dtype = DTYPES[opts.dtype] if opts.dtype else source.dtype
    tokens = calibration_ids
    if tokens is None and opts.needs_calibration():
        tokens = calibration_tokens(source, opts)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists; pass --overwrite to replace it")

    layers: list[fmt.LayerSpec] = []
    with ckpt.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writer = ckpt.ShardedWriter(tmp, opts.shard_bytes)
        for name in source.non_attention_names():
            if name == "lm_head.weight" and dims.tie_word_embeddings:
                continue  # tied to the embedding, as the config says
            if not name.startswith("model.layers."):
                writer.add(name, source.tensor(name, dtype=None).to(out_dtype))
        hidden = calib.embed(source, tokens) if tokens is not None else None
        cached_stats: dict = {}
        if opts.rank_allocation != "uniform":
            widths = allocate_widths(widths, opts, source, hidden, cached_stats)
            log.info("%s rank allocation: latent widths %s", opts.rank_allocation, widths)
        bar = tqdm(range(dims.num_hidden_layers), desc="convert", unit="layer", disable=not progress)
        for i in bar:
            layer, tensors = convert_layer(i, widths[i], opts, source, hidden, cached_stats.pop(i, None))
            layers.append(layer)
            prefix = f"model.layers.{i}."
            for name in source.layer_names(i):
                if ".self_attn." not in name:
                    writer.add(name, source.tensor(name, dtype=None).to(out_dtype))
            for name, t in tensors.items():
                writer.add(prefix + "self_attn." + name, t.to(out_dtype))
            if hidden is not None and i + 1 < dims.num_hidden_layers:
                hidden = _propagate(i, hidden, layer, tensors, opts, source)
        writer.close()
        spec = _spec(source, opts, layers)
        _write_config(tmp, source, spec, out_dtype)
        ckpt.copy_tokenizer_files(source.dir, tmp)
        ckpt.validate_checkpoint(tmp)
    report = fmt.kv_bytes_report(spec, dims, element_bytes=torch.tensor([], dtype=out_dtype).element_size())
    report["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("converted %s -> %s: KV cache %.1f%% of the source", src_dir, out_dir, 100 * report["ratio"])
    return report


def has_bias(opts: ConvertOptions, source: SourceModel) -> bool:
    """The centred method gives bias-free sources up-projection biases (and so every layer biases)."""
    return source.attention_bias or opts.centred


def complete_biases(layer: fmt.LayerSpec, tensors: dict, opts: ConvertOptions, source: SourceModel) -> dict:
    """Zero biases wherever the format expects one that the layer's source did not have."""
    if has_bias(opts, source):
        spec = calib.single_layer_spec(source, layer, attention_bias=True)
        for name, shape in fmt.attention_tensor_shapes(0, layer, spec, source.dims).items():
            key = name.removeprefix("model.layers.0.self_attn.")
            if key.endswith(".bias") and key not in tensors:
                tensors[key] = torch.zeros(shape, dtype=torch.float64)
    return tensors


def convert_layer(i: int, width: int, opts: ConvertOptions, source: SourceModel, hidden, stats=None):
    layer, tensors = _convert_attention(i, width, opts, source, hidden, stats)
    tensors = complete_biases(layer, tensors, opts, source)
    if opts.refine_steps > 0 and isinstance(layer, fmt.LatentLayer):
        tensors, fit = calib.refine_latent_layer(
            source, i, hidden, layer, tensors, has_bias(opts, source), steps=opts.refine_steps, lr=opts.refine_lr,
            batch=opts.refine_batch, params=opts.refine_params, seed=opts.calibration_seed + i,
            device=opts.refine_device or ("cuda" if torch.cuda.is_available() else "cpu"))
        log.info("layer %d: attention output error %.4f -> %.4f (%d refinement steps, %.1f s)",
                 i, fit.error_before, fit.error_after, fit.steps, fit.seconds)
    return layer, tensors


def _convert_attention(i: int, width: int, opts: ConvertOptions, source: SourceModel, hidden, stats=None):
    src = source.attention(i)
    dims = source.dims
    if i in opts.keep_layers:
        return fmt.SourceLayer(softmax_scale=fmt.default_softmax_scale(dims.head_dim)), source_layer_tensors(src)
    if opts.method == "transkv":
        per_head = width // (2 * dims.num_key_value_heads)  # cache width G (r_k + r_v), r_k = r_v
        Ck, Cv = kv_head_autocorrelation(source, i, hidden, src)
        return build_reduced_layer(src, Ck, Cv, per_head, per_head, dims, opts.transkv_scale)
    if stats is None and hidden is not None:
        stats = calib.attention_stats(source, i, hidden, src)
    plan = plan_layer(i, width, opts, source, stats)
    if opts.nope_scaling == "fit":
        plan.nope_scale = calib.nope_scales(source, i, hidden, src, plan)
    mean = stats.inputs.mean if opts.centred else None
    return build_latent_layer(src, plan, dims, methods.make_factorizer(opts, stats, src, plan, dims), input_mean=mean)


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
    clamp = lambda w: min(w, limit) if derives_widths(opts) else w  # noqa: E731
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


def _propagate(i, hidden, layer, tensors, opts: ConvertOptions, source: SourceModel):
    """Hidden states for layer i+1: through the source layer, or the converted one."""
    if opts.calibration_inputs == "original":
        module = calib.source_layer_module(source, i)
    else:
        rest = {n.removeprefix(f"model.layers.{i}."): source.tensor(n, torch.float32) for n in source.layer_names(i) if ".self_attn." not in n}
        rest.update({"self_attn." + n: t.float() for n, t in tensors.items()})
        module = calib.layer_module(source, calib.single_layer_spec(source, layer, has_bias(opts, source)), rest, torch.float32)
    return calib.run_layer(module, hidden)


def _spec(source: SourceModel, opts: ConvertOptions, layers: list) -> fmt.LatentKVSpec:
    params = {k: v for k, v in asdict(opts).items() if k not in ("shard_bytes",)}
    return fmt.LatentKVSpec(
        format_version=fmt.FORMAT_VERSION,
        source=fmt.SourceInfo(architecture=source.architecture, model_type=source.model_type, name=source.dir.name),
        method=methods.method_info(opts, params),
        rope_inv_freq=source.inv_freq.tolist(),
        attention_bias=has_bias(opts, source),
        qk_norm=source.qk_norm,
        layers=layers,
    )


def _write_config(out: Path, source: SourceModel, spec: fmt.LatentKVSpec, dtype: torch.dtype) -> None:
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id")
    config = {k: source.config_dict[k] for k in keep if k in source.config_dict}
    config.update(
        architectures=[fmt.ARCHITECTURE],
        model_type=fmt.MODEL_TYPE,
        head_dim=source.dims.head_dim,
        num_key_value_heads=source.dims.num_key_value_heads,
        tie_word_embeddings=source.dims.tie_word_embeddings,
        dtype=str(dtype).removeprefix("torch."),
        latent_kv=spec.model_dump(mode="json"),
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
