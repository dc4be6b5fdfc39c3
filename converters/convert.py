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
from pathlib import Path

import torch
from tqdm import tqdm

from converters import calibration as calib
from converters import methods
from converters.importers.hf import SourceModel
from converters.transkv_layer import build_reduced_layer, kv_head_autocorrelation
from converters.allocation import allocate_widths, latent_widths, plan_layer
from converters.latent_attention import build_latent_layer, source_layer_tensors
from converters.options import ConversionError, ConvertOptions
from latentkv import checkpoint as ckpt
from latentkv import format as fmt

log = logging.getLogger("latentkv.convert")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- the conversion ----------------------------------------------------------------------------

def validate_options(opts: ConvertOptions, source: SourceModel) -> None:
    """Reject options that cannot work together or for ``source``, before any heavy work."""
    opts.check()
    dims = source.dims
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
    if opts.nope_scaling == "fit" and source.qk_norm:
        raise ConversionError("--nope-scaling fit cannot scale keys of q/k-norm sources (the key norm undoes it); use none")


def calibration_tokens(source: SourceModel, opts: ConvertOptions) -> torch.Tensor:
    """[N, L] token ids from the calibration text, checked before heavy work starts."""
    from transformers import AutoTokenizer

    from latentkv.text import check_tokenizer_matches, load_calibration_samples

    tokenizer = AutoTokenizer.from_pretrained(source.dir)
    check_tokenizer_matches(tokenizer, source.hf_config)
    paths = opts.calibration_paths()
    if not opts.calibration_text:
        log.info("no calibration text given: calibrating on the texts shipped with latentkv (%s), an equal share each",
                 " + ".join(p.name for p in paths))
    return load_calibration_samples(
        paths, tokenizer, opts.calibration_samples, opts.calibration_seq_len,
        seed=opts.calibration_seed, text_field=opts.calibration_text_field,
    )


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
        streams = calibration_streams(opts, calib.embed(source, tokens) if tokens is not None else None)
        hidden = streams.get(opts.calibration_inputs)  # what the closed forms and the allocation read
        cached_stats: dict = {}
        if opts.rank_allocation != "uniform":
            widths = allocate_widths(widths, opts, source, hidden, cached_stats,
                                     lambda i, w, stats, h: _closed_form_module(i, w, opts, source, h, stats))
            log.info("%s rank allocation: latent widths %s", opts.rank_allocation, widths)
        # the calibration streams feed the compressed layers only: none to carry past the last one
        last_compressed = max((j for j, w in enumerate(widths) if w is not None and j not in opts.keep_layers), default=-1)
        bar = tqdm(range(dims.num_hidden_layers), desc="convert", unit="layer", disable=not progress)
        for i in bar:
            layer, tensors, after_layer = convert_layer(i, widths[i], opts, source, streams, cached_stats.pop(i, None))
            layers.append(layer)
            prefix = f"model.layers.{i}."
            for name in source.layer_names(i):
                if ".self_attn." not in name:
                    writer.add(name, source.tensor(name, dtype=None).to(out_dtype))
            for name, t in tensors.items():
                writer.add(prefix + "self_attn." + name, t.to(out_dtype))
            if i < last_compressed:
                streams = {kind: after_layer[kind] if kind in after_layer else
                           _propagate(i, h, layer, tensors, opts, source, converted=kind == "converted")
                           for kind, h in streams.items()}
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


def calibration_streams(opts: ConvertOptions, embedded: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The calibration hidden states to carry through the layers, by the model that produces them:
    "original" (the source's layers) or "converted". The closed forms read the one
    --calibration-inputs names; --refine-target model needs both (the student is fed the converted
    stream, its target comes from the original)."""
    if embedded is None:
        return {}
    kinds = {opts.calibration_inputs}
    if opts.refine_steps > 0 and opts.refine_target == "model":
        kinds |= {"original", "converted"}
    return dict.fromkeys(sorted(kinds), embedded)  # equal at the embeddings; each layer makes new tensors


def convert_layer(i: int, width: int, opts: ConvertOptions, source: SourceModel, streams: dict, stats=None):
    """Layer i converted (closed form, then refined), from the calibration ``streams`` entering it:
    (layer spec, tensors, the streams after the layer where the refinement computed them)."""
    hidden = streams.get(opts.calibration_inputs)
    layer, tensors = _convert_attention(i, width, opts, source, hidden, stats)
    tensors = complete_biases(layer, tensors, opts, source)
    if opts.refine_steps > 0 and isinstance(layer, fmt.LatentLayer):
        student, reference = ((streams["converted"], streams["original"]) if opts.refine_target == "model"
                              else (hidden, None))
        tensors, fit, after_layer = calib.refine_latent_layer(
            source, i, student, layer, tensors, has_bias(opts, source), steps=opts.refine_steps, lr=opts.refine_lr,
            batch=opts.refine_batch, params=opts.refine_params, seed=opts.calibration_seed + i,
            latent_lr_ratio=opts.refine_latent_lr_ratio, beta2=opts.refine_adam_beta2,
            residual_weight=opts.refine_residual_weight,
            device=opts.refine_device or ("cuda" if torch.cuda.is_available() else "cpu"),
            precision=opts.refine_precision, reference=reference, objective=opts.refine_objective)
        log.info("layer %d: %s output error %.4f -> %.4f (%d refinement steps in %s, %.1f s)", i,
                 opts.refine_objective, fit.error_before, fit.error_after, fit.steps, fit.precision, fit.seconds)
        return layer, tensors, after_layer
    return layer, tensors, {}


def _convert_attention(i: int, width: int, opts: ConvertOptions, source: SourceModel, hidden, stats=None):
    src = source.attention(i)
    dims = source.dims
    if width is None or i in opts.keep_layers:  # None: kept uncompressed by the rank allocation
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


def _propagate(i, hidden, layer, tensors, opts: ConvertOptions, source: SourceModel, *, converted: bool):
    """Hidden states for layer i+1: through the converted layer i, or the source's."""
    module = _converted_module(i, layer, tensors, opts, source) if converted else calib.source_layer_module(source, i)
    return calib.run_layer(module, hidden)


def _converted_module(i: int, layer, tensors: dict, opts: ConvertOptions, source: SourceModel):
    """Decoder layer i with its converted attention (float32)."""
    rest = {n.removeprefix(f"model.layers.{i}."): source.tensor(n, torch.float32) for n in source.layer_names(i) if ".self_attn." not in n}
    rest.update({"self_attn." + n: t.float() for n, t in tensors.items()})
    return calib.layer_module(source, calib.single_layer_spec(source, layer, has_bias(opts, source)), rest, torch.float32)


def _closed_form_module(i: int, width: int, opts: ConvertOptions, source: SourceModel, hidden, stats):
    """Layer i converted at ``width`` by the closed form alone (a rank-allocation candidate), from its
    statistics and input hidden states."""
    layer, tensors = _convert_attention(i, width, opts, source, hidden, stats)
    return _converted_module(i, layer, complete_biases(layer, tensors, opts, source), opts, source)


def _spec(source: SourceModel, opts: ConvertOptions, layers: list) -> fmt.LatentKVSpec:
    params = opts.model_dump(mode="json", exclude={"shard_bytes"})
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
