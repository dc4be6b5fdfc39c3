"""Layer-by-layer calibration: run calibration tokens through the model one layer at a time.

Like llm-compressor's sequential pipeline, only one decoder layer's weights are in memory at a
time: the hidden states of all calibration sequences [N, L, D] are carried from layer to layer.
For each layer the converter gets the attention input x = RMSNorm(h) and collects what its
method needs (:class:`AttentionStats`), converts the layer, then moves the hidden states on
through either the *original* layer (every layer is calibrated on the source model's
activations) or the *converted* one (later layers see, and compensate for, earlier errors).
``--refine-target model`` carries both streams: the refinement feeds a layer the converted one
and fits it to the source's (:func:`refine_latent_layer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torch import nn

from converters.importers.hf import AttentionWeights, SourceModel
from converters.math.refine import FitReport, fit_to_outputs, mixed_precision, predictions
from converters.math.nope_scaling import fit_nope_scales, kept_projection_partial, kept_projection_shared
from converters.math.rope_selection import pair_covariance
from converters.math.stats import InputStats
from latentkv import format as fmt
from latentkv.attention import rms_norm
from latentkv.modeling import DecoderLayer, HeadAttention, LatentAttention, LatentKVConfig


@dataclass
class AttentionStats:
    """Calibration statistics of one layer's attention (float64 sums over N tokens)."""

    inputs: InputStats  # x = RMSNorm(h), the input of q/k/v_proj: sum x x^T etc.
    q_pair_norms: torch.Tensor  # [H, n_f] mean ||q^[pair i]||, after q-norm, before RoPE
    k_pair_norms: torch.Tensor  # [G, n_f]
    key_pair_cov: torch.Tensor  # [n_f, G, G] sum a_i a_i^T + b_i b_i^T over tokens
    tokens: int = 0


def head_projections(x: torch.Tensor, src: AttentionWeights, dims: fmt.ModelDims, eps: float):
    """Source queries, keys and values per head, q/k-normed, before RoPE: x [n, D] -> [n, heads, d_h]."""
    H, G, d_h = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
    bias = lambda b: b.float() if b is not None else 0  # noqa: E731
    q = (x @ src.wq.float().T + bias(src.bq)).view(-1, H, d_h)
    k = (x @ src.wk.float().T + bias(src.bk)).view(-1, G, d_h)
    v = (x @ src.wv.float().T + bias(src.bv)).view(-1, G, d_h)
    if src.q_norm is not None:
        q, k = rms_norm(q, src.q_norm.float(), eps), rms_norm(k, src.k_norm.float(), eps)
    return q, k, v


def attention_inputs(source: SourceModel, i: int, hidden: torch.Tensor, src: AttentionWeights, chunk: int = 8):
    """The one calibration loop: layer i's attention inputs over the calibration hidden states [N, L, D],
    ``chunk`` sequences at a time. Yields (x [n, D] normed, q [n, H, d_h], k [n, G, d_h], v [n, G, d_h]
    (q/k-normed, before RoPE), positions [n] of each token in its sequence)."""
    norm_w = source.tensor(f"model.layers.{i}.input_layernorm.weight", torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk]
        x = rms_norm(h.float(), norm_w, source.rms_norm_eps).flatten(0, 1)  # [n, D]
        q, k, v = head_projections(x, src, source.dims, source.rms_norm_eps)
        yield x, q, k, v, torch.arange(h.shape[1]).repeat(h.shape[0])


def source_layer_module(source: SourceModel, i: int, dtype=torch.float32) -> DecoderLayer:
    """Layer i of the source model as a reference-model DecoderLayer (kind ``source``)."""
    spec = single_layer_spec(source, fmt.SourceLayer(softmax_scale=fmt.default_softmax_scale(source.dims.head_dim)))
    tensors = {n.removeprefix(f"model.layers.{i}."): source.tensor(n, dtype) for n in source.layer_names(i)}
    return layer_module(source, spec, tensors, dtype)


def single_layer_spec(source: SourceModel, layer: fmt.LayerSpec, attention_bias: bool | None = None) -> fmt.LatentKVSpec:
    return fmt.LatentKVSpec(
        format_version=fmt.FORMAT_VERSION,
        source=fmt.SourceInfo(architecture=source.architecture, model_type=source.model_type),
        method=fmt.MethodInfo(name="calibration"),
        rope_inv_freq=source.inv_freq.tolist(),
        attention_bias=source.attention_bias if attention_bias is None else attention_bias,
        qk_norm=source.qk_norm,
        layers=[layer],
    )


def _one_layer_config(source: SourceModel, spec: fmt.LatentKVSpec) -> LatentKVConfig:
    config_dict = dict(source.config_dict)
    config_dict.update(num_hidden_layers=1, latent_kv=spec.model_dump(), model_type=fmt.MODEL_TYPE)
    # rope_scaling: the frequencies are in the spec (newer transformers warn about the old key)
    for key in ("architectures", "layer_types", "rope_scaling", "rope_parameters"):
        config_dict.pop(key, None)
    return LatentKVConfig(**{k: v for k, v in config_dict.items() if k != "model_type"})


def _load(module: nn.Module, tensors: dict[str, torch.Tensor], dtype) -> nn.Module:
    module = module.to(dtype)
    missing, unexpected = module.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"layer tensors do not match the layer module: missing {missing}, unexpected {unexpected}")
    return module.eval()


def layer_module(source: SourceModel, spec: fmt.LatentKVSpec, tensors: dict[str, torch.Tensor], dtype) -> DecoderLayer:
    """Build a one-layer DecoderLayer and load ``tensors`` (names relative to the layer)."""
    return _load(DecoderLayer(_one_layer_config(source, spec), spec, 0), tensors, dtype)


def attention_module(source: SourceModel, spec: fmt.LatentKVSpec, tensors: dict[str, torch.Tensor], dtype) -> nn.Module:
    """The attention of a one-layer ``spec`` alone, ``tensors`` named relative to ``self_attn.``."""
    layer = spec.layers[0]
    cls = LatentAttention if isinstance(layer, fmt.LatentLayer) else HeadAttention
    return _load(cls(_one_layer_config(source, spec), spec, layer, 0), tensors, dtype)


# Parameters refined by --refine-params: the latent factors the conversion built, or the whole attention.
REFINED_PARAMETERS = {
    "latent": ("kv_a_proj.", "k_b_proj.", "v_b_proj."),
    "attention": ("kv_a_proj.", "k_b_proj.", "v_b_proj.", "q_proj.", "o_proj."),
}


def refine_latent_layer(source: SourceModel, i: int, hidden: torch.Tensor, layer: fmt.LatentLayer,
                        tensors: dict[str, torch.Tensor], attention_bias: bool, *, steps: int, lr: float,
                        batch: int, params: str = "latent", seed: int = 0, device: str = "cpu", precision: str = "float32",
                        reference: torch.Tensor | None = None, objective: str = "attention",
                        latent_lr_ratio: float = 1.0, beta2: float = 0.999, residual_weight: float = 1.0
                        ) -> tuple[dict[str, torch.Tensor], FitReport, dict[str, torch.Tensor]]:
    """Layer i's latent tensors fitted to the source attention's output on the calibration hidden
    states (``converters.math.refine``), on ``device``; returns the updated tensors (float64, CPU),
    the fit's report and the residual streams after layer i, from the outputs the fit has computed
    anyway (CPU, float32): "converted" = f(h + o(h)) with the returned tensors, "original" =
    f(h_src + o_src(h_src)) (f: the source layer's MLP half; h_src = ``reference``, else ``hidden``).

    ``reference``: the source model's own hidden states entering layer i, when ``hidden`` are the
    converted model's. The target is then the source's residual stream after the attention, less
    the converted stream: o(h) ~ o_src(h_src) + alpha (h_src - h) (``--refine-target model``; alpha =
    ``residual_weight``, ``--refine-residual-weight``, 1 by default).
    ``objective``: "attention" compares those attention outputs; "block" (``--refine-objective``)
    compares what the whole layer adds, f(h + o(h)) - h ~ f(h_src + o_src(h_src)) - h, through the
    frozen MLP.
    ``precision``: ``--refine-precision`` (:func:`converters.math.refine.mixed_precision`).
    ``latent_lr_ratio``, ``beta2``: ``--refine-latent-lr-ratio``, ``--refine-adam-beta2``.
    """
    hidden = hidden.to(device)
    reference = hidden if reference is None else reference.to(device)
    norm_w = source.tensor(f"model.layers.{i}.input_layernorm.weight", torch.float32).to(device)
    positions = torch.arange(hidden.shape[1], device=device)

    def attend(attention, h):  # what the attention adds to the residual stream h
        x = rms_norm(h, norm_w, source.rms_norm_eps)
        return attention(x, positions.expand(h.shape[0], -1), None, None, "expand")

    source_layer = source_layer_module(source, i).to(device).requires_grad_(False)  # its MLP half f is both models'
    source_out = predictions(lambda h: attend(source_layer.self_attn, h), reference)  # o_src(h_src)
    source_after = reference + source_out
    if objective == "block":
        source_out = predictions(source_layer.feed_forward, source_after, out=source_after).sub(reference)  # the whole layer's
    targets = source_out  # h_src = h unless fitting to the source model's stream: then o_src + alpha (h_src - h)
    if reference is not hidden:  # in place (x * 1 and a + b == b + a are exact: alpha 1 is the plain sum)
        targets = torch.sub(reference, hidden).mul_(residual_weight).add_(source_out)
    student = attention_module(source, single_layer_spec(source, layer, attention_bias), tensors, torch.float32).to(device)
    chosen = {n: p for n, p in student.named_parameters() if n.startswith(REFINED_PARAMETERS[params])}
    lr_scales = [latent_lr_ratio if n.startswith(REFINED_PARAMETERS["latent"]) else 1.0 for n in chosen]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in chosen.values():
        p.requires_grad_(True)

    def predict(hb):  # what the layer (block) or its attention adds to the stream hb
        return source_layer.feed_forward(hb + attend(student, hb)) - hb if objective == "block" else attend(student, hb)

    with torch.enable_grad():
        report = fit_to_outputs(predict, list(chosen.values()), hidden, targets, steps=steps, lr=lr, batch=batch,
                                seed=seed, autocast=mixed_precision(precision, device), lr_scales=lr_scales, beta2=beta2)
    fitted = {n: p.detach().to("cpu", torch.float64) for n, p in student.state_dict().items()}
    after_layer = {"converted": hidden + report.outputs, "original": source_after}
    if objective == "attention":  # the streams so far are after the attention: on through the MLP, in place
        after_layer = {kind: predictions(source_layer.feed_forward, h, out=h) for kind, h in after_layer.items()}
    return ({n: fitted[n] if n in fitted else t for n, t in tensors.items()}, report,
            {kind: h.cpu() for kind, h in after_layer.items()})


@torch.no_grad()
def embed(source: SourceModel, tokens: torch.Tensor) -> torch.Tensor:
    """Token embeddings [N, L, D] in float32."""
    return source.tensor("model.embed_tokens.weight", torch.float32)[tokens]


@torch.no_grad()
def attention_stats(source: SourceModel, i: int, hidden: torch.Tensor, src: AttentionWeights, chunk: int = 8) -> AttentionStats:
    """Statistics of layer i's attention input and of its queries and keys."""
    dims = source.dims
    H, G, d_h = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
    n_f = d_h // 2
    inputs = InputStats.zeros(dims.hidden_size)
    q_norms = torch.zeros(H, n_f, dtype=torch.float64)
    k_norms = torch.zeros(G, n_f, dtype=torch.float64)
    cov = torch.zeros(n_f, G, G, dtype=torch.float64)
    n = 0
    for x, q, k, _, _ in attention_inputs(source, i, hidden, src, chunk):
        inputs.update(x)
        q_norms += _pair_norms(q).sum(0)
        k_norms += _pair_norms(k).sum(0)
        cov += pair_covariance(k)
        n += x.shape[0]
    return AttentionStats(inputs=inputs, q_pair_norms=q_norms / n, k_pair_norms=k_norms / n, key_pair_cov=cov, tokens=n)


NOPE_FIT_SEQUENCES = 8  # calibration sequences the NoPE scales are fitted on (scores are [N, H, L, L])


@torch.no_grad()
def nope_scales(source: SourceModel, i: int, hidden: torch.Tensor, src: AttentionWeights, plan) -> torch.Tensor:
    """Layer i's NoPE scales [n_f] (``converters.math.nope_scaling``) for the pairs / components
    ``plan`` keeps, fitted on the source layer's attention over the first calibration sequences."""
    dims = source.dims
    n_f, N, L = dims.head_dim // 2, min(NOPE_FIT_SEQUENCES, hidden.shape[0]), hidden.shape[1]
    _, q, k, v, _ = next(attention_inputs(source, i, hidden[:N], src, chunk=N))
    kept = (kept_projection_shared(plan.rotation, plan.components) if plan.rope_mode == "shared"
            else kept_projection_partial(plan.pairs, n_f))
    return fit_nope_scales(q.view(N, L, *q.shape[1:]), k.view(N, L, *k.shape[1:]), v.view(N, L, *v.shape[1:]),
                           source.inv_freq, kept, fmt.default_softmax_scale(dims.head_dim))


def _pair_norms(x: torch.Tensor) -> torch.Tensor:
    """||x^[pair i]|| per token and head: x [n, heads, d_h] -> [n, heads, n_f] (float64)."""
    n_f = x.shape[-1] // 2
    x = x.to(torch.float64)
    return (x[..., :n_f].pow(2) + x[..., n_f:].pow(2)).sqrt()


def run_layer(module: DecoderLayer, hidden: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Move calibration hidden states [N, L, D] through one layer (full causal attention)."""
    positions = torch.arange(hidden.shape[1])
    return predictions(lambda h: module(h, positions.expand(h.shape[0], -1), None, None, "expand"), hidden, chunk)
