"""The latent-KV checkpoint format: the one source of truth shared by converter and plugin.

A converted model is a directory with a Hugging Face style ``config.json``, tokenizer files
copied from the source and safetensors weights. ``config.json`` carries the usual Llama
fields (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ...)
plus a ``latent_kv`` section validated by :class:`LatentKVSpec`. ``docs/format.md`` explains
the attention each layer kind computes; this module states it as data and checks it.

Symbols (per layer; one source model has D = hidden_size, H query heads, G KV heads, d_h
head dim, n_f = d_h / 2 RoPE frequency pairs in Hugging Face's half-split layout: pair i is
dims (i, i + n_f), inverse frequency ``rope_inv_freq[i]``):

kind ``latent`` (MLA-style; cache per token = latent c + rope keys [+ key scales]):
    r_k, r_v        key / value latent rank; joint latent: r_k = r_v = r and one c of width r;
                    split latent: c = [c_k | c_v], width r_k + r_v
    n_grp           Palu-style latent groups: KV head g reads latent chunk g // (G / n_grp)
    R_H, R_D        rope key heads and their width (2 x pairs). partial: R_H = G, one rope
                    head per KV head; shared: R_H = 1, one rope head for all query heads
                    (DeepSeek's layout); full: R_H = 0 (keys are rebuilt and rotated)
    d_n             qk_nope_head_dim, the NoPE part of each query head (partial: d_h - R_D;
                    shared and full: d_h)
    q_proj          [H (d_n + R_D), D]   per query head [q_nope (d_n) | q_rope (R_D)]
    kv_a_proj       [W + R_H R_D, D]     output [c (W) | k_rope (R_H x R_D), before RoPE]
    k_b_proj        [G d_n, r_k / n_grp] k_nope of head g = k_b_proj[g] @ c_k[chunk(g)]
    v_b_proj        [G d_h, r_v / n_grp] v of head g = v_b_proj[g] @ c_v[chunk(g)]
    o_proj          [D, H d_h]
    q_norm, k_norm  [G, d_h] per-head RMSNorm gains (q/k-norm sources), in each KV head's dim order

kind ``reduced_head`` (TransKV; ordinary per-head cache, narrower heads):
    q_proj [H d_h, D], k_proj [G d_h, D] (RoPE at full width d_h), k_reduce [G, d_h, r_k]
    applied to rotated q and k, v_proj [G r_v, D] (P_V folded in), o_proj [D, H r_v]

kind ``source``: the source layer unchanged (q_proj, k_proj, v_proj, o_proj).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMAT_VERSION = 1
MODEL_TYPE = "latentkv"
ARCHITECTURE = "LatentKVForCausalLM"
# The source architectures a checkpoint can be converted from, with their model types: the one list.
SOURCE_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SourceType = Literal[tuple(dict.fromkeys(SOURCE_ARCHITECTURES.values()))]  # type: ignore[valid-type]


class FormatError(ValueError):
    """A latent-KV checkpoint or config that does not follow the format."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceInfo(_Strict):
    architecture: str
    model_type: SourceType
    name: str = ""


class MethodInfo(_Strict):
    """How the checkpoint was made, so that it can be reproduced."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class LatentRanks(_Strict):
    joint: bool
    k_rank: int = Field(ge=0)
    v_rank: int = Field(ge=1)
    groups: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "LatentRanks":
        if self.joint and self.k_rank != self.v_rank:
            raise ValueError(f"a joint latent has one rank: k_rank={self.k_rank} != v_rank={self.v_rank}")
        for name, rank in (("k_rank", self.k_rank), ("v_rank", self.v_rank)):
            if rank % self.groups:
                raise ValueError(f"{name}={rank} is not divisible by groups={self.groups}")
        return self

    @property
    def width(self) -> int:
        """Latent values cached per token."""
        return self.v_rank if self.joint else self.k_rank + self.v_rank

    @property
    def k_slice(self) -> slice:
        return slice(0, self.k_rank)

    @property
    def v_slice(self) -> slice:
        return slice(0, self.v_rank) if self.joint else slice(self.k_rank, self.k_rank + self.v_rank)


class LatentLayer(_Strict):
    kind: Literal["latent"] = "latent"
    rope_mode: Literal["partial", "shared", "full"]
    # Source frequency-pair index of each rope pair, one list per rope key head.
    rope_pairs: list[list[int]]
    qk_nope_head_dim: int = Field(ge=0)
    latent: LatentRanks
    softmax_scale: float = Field(gt=0)

    @property
    def num_rope_heads(self) -> int:
        return len(self.rope_pairs)

    @property
    def rope_head_dim(self) -> int:
        return 2 * len(self.rope_pairs[0]) if self.rope_pairs else 0


class ReducedHeadLayer(_Strict):
    kind: Literal["reduced_head"] = "reduced_head"
    k_head_dim: int = Field(ge=1)
    v_head_dim: int = Field(ge=1)
    softmax_scale: float = Field(gt=0)


class SourceLayer(_Strict):
    kind: Literal["source"] = "source"
    softmax_scale: float = Field(gt=0)


LayerSpec = Annotated[Union[LatentLayer, ReducedHeadLayer, SourceLayer], Field(discriminator="kind")]


class LatentKVSpec(_Strict):
    """The ``latent_kv`` section of config.json."""

    format_version: int
    source: SourceInfo
    method: MethodInfo
    rope_inv_freq: list[float]
    attention_bias: bool = False
    qk_norm: bool = False
    cache_dtype: Literal["auto", "int4"] = "auto"
    int4_group_size: int = Field(default=32, ge=2)
    token_filter: dict[str, Any] | None = None  # serving default: Token Filtering's options (latentkv.token_filter)
    layers: list[LayerSpec]

    @model_validator(mode="after")
    def _check_version(self) -> "LatentKVSpec":
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is not supported by this latentkv "
                f"(it reads version {FORMAT_VERSION}); upgrade latentkv or reconvert the model"
            )
        return self

    @model_validator(mode="after")
    def _check_token_filter(self) -> "LatentKVSpec":
        self.token_filter_options()  # raises ValueError naming the bad option
        return self

    def token_filter_options(self):
        """The Token Filtering options a server applies by default (None: off)."""
        if self.token_filter is None:
            return None
        from latentkv.token_filter import TokenFilterOptions

        return TokenFilterOptions.from_dict(self.token_filter)


class ModelDims(_Strict):
    """The source-model dimensions the format needs (read from config.json's flat fields)."""

    hidden_size: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    head_dim: int = Field(ge=2)
    num_hidden_layers: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    tie_word_embeddings: bool = False

    @model_validator(mode="after")
    def _check(self) -> "ModelDims":
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        return self

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


# ---------------------------------------------------------------------------------------------
# Consistency of a spec with the model dimensions
# ---------------------------------------------------------------------------------------------

def check_spec(spec: LatentKVSpec, dims: ModelDims) -> None:
    """Raise FormatError naming the field when the spec cannot describe a model of these dims."""
    n_f = dims.head_dim // 2
    if len(spec.rope_inv_freq) != n_f:
        raise FormatError(f"latent_kv.rope_inv_freq has {len(spec.rope_inv_freq)} entries, expected head_dim/2 = {n_f}")
    if len(spec.layers) != dims.num_hidden_layers:
        raise FormatError(
            f"latent_kv.layers has {len(spec.layers)} entries, expected num_hidden_layers = {dims.num_hidden_layers}"
        )
    for i, layer in enumerate(spec.layers):
        where = f"latent_kv.layers[{i}]"
        if isinstance(layer, LatentLayer):
            _check_latent_layer(layer, dims, spec, where)
        elif isinstance(layer, ReducedHeadLayer):
            if layer.k_head_dim > dims.head_dim or layer.v_head_dim > dims.head_dim:
                raise FormatError(f"{where}: reduced head dims ({layer.k_head_dim}, {layer.v_head_dim}) exceed head_dim {dims.head_dim}")


def _check_latent_layer(layer: LatentLayer, dims: ModelDims, spec: LatentKVSpec, where: str) -> None:
    G, d_h, n_f = dims.num_key_value_heads, dims.head_dim, dims.head_dim // 2
    lat = layer.latent
    if G % lat.groups:
        raise FormatError(f"{where}.latent.groups={lat.groups} does not divide num_key_value_heads={G}")
    pair_counts = {len(p) for p in layer.rope_pairs}
    if len(pair_counts) > 1:
        raise FormatError(f"{where}.rope_pairs: every rope head must keep the same number of pairs, got {sorted(pair_counts)}")
    for pairs in layer.rope_pairs:
        bad = [p for p in pairs if not 0 <= p < n_f]
        if bad:
            raise FormatError(f"{where}.rope_pairs: pair indices {bad} outside [0, {n_f})")
    mode = layer.rope_mode
    if mode == "partial":
        if layer.num_rope_heads != G:
            raise FormatError(f"{where}: partial RoPE needs one rope head per KV head ({G}), got {layer.num_rope_heads}")
        for pairs in layer.rope_pairs:
            if len(set(pairs)) != len(pairs):
                raise FormatError(f"{where}.rope_pairs: a KV head keeps pair indices twice: {pairs}")
        expected_nope = d_h - layer.rope_head_dim
    elif mode == "shared":
        if layer.num_rope_heads != 1:
            raise FormatError(f"{where}: shared RoPE has exactly one rope head, got {layer.num_rope_heads}")
        if spec.qk_norm:
            raise FormatError(f"{where}: shared RoPE cannot represent per-head q/k RMSNorm sources; use partial or full")
        expected_nope = d_h
    else:
        if layer.num_rope_heads != 0:
            raise FormatError(f"{where}: full RoPE caches no rope keys, rope_pairs must be []")
        expected_nope = d_h
    if layer.qk_nope_head_dim != expected_nope:
        raise FormatError(f"{where}.qk_nope_head_dim={layer.qk_nope_head_dim}, expected {expected_nope} for rope_mode={mode}")
    if layer.qk_nope_head_dim == 0 and not lat.joint and lat.k_rank:
        raise FormatError(f"{where}.latent.k_rank={lat.k_rank} but there are no NoPE key dims to compress; use k_rank=0")
    if layer.qk_nope_head_dim > 0 and lat.k_rank == 0:
        raise FormatError(f"{where}.latent.k_rank=0 but qk_nope_head_dim={layer.qk_nope_head_dim}")
    max_rank = G * (layer.qk_nope_head_dim + d_h) if lat.joint else None
    if max_rank is not None and lat.v_rank > max_rank:
        raise FormatError(f"{where}.latent rank {lat.v_rank} exceeds the joint K/V width {max_rank}")


# ---------------------------------------------------------------------------------------------
# Derived quantities: cache layout and tensor shapes
# ---------------------------------------------------------------------------------------------

def caches_key_scale(layer: LayerSpec, spec: LatentKVSpec) -> bool:
    """Partial RoPE on a source with per-head key RMSNorm caches 1/rms(k) per KV head.

    The norm scales the whole key by a per-token factor that depends on the NoPE dims too, so it
    cannot be folded into the latent; storing it costs G values per token.
    """
    return isinstance(layer, LatentLayer) and layer.rope_mode == "partial" and spec.qk_norm and layer.qk_nope_head_dim > 0


def cache_values_per_token(layer: LayerSpec, spec: LatentKVSpec, dims: ModelDims) -> int:
    """Numbers stored in the KV cache per token for one layer."""
    G = dims.num_key_value_heads
    if isinstance(layer, LatentLayer):
        extra = G if caches_key_scale(layer, spec) else 0
        return layer.latent.width + layer.num_rope_heads * layer.rope_head_dim + extra
    if isinstance(layer, ReducedHeadLayer):
        return G * (layer.k_head_dim + layer.v_head_dim)
    return 2 * G * dims.head_dim


def source_cache_values_per_token(dims: ModelDims) -> int:
    return 2 * dims.num_key_value_heads * dims.head_dim


def attention_tensor_shapes(i: int, layer: LayerSpec, spec: LatentKVSpec, dims: ModelDims) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the attention tensors of layer ``i``."""
    D, H, G, d_h = dims.hidden_size, dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
    p = f"model.layers.{i}.self_attn."
    shapes: dict[str, tuple[int, ...]] = {}
    bias = spec.attention_bias
    if isinstance(layer, LatentLayer):
        lat, d_n, R = layer.latent, layer.qk_nope_head_dim, layer.num_rope_heads * layer.rope_head_dim
        q_out = H * (d_n + layer.rope_head_dim)
        shapes[p + "q_proj.weight"] = (q_out, D)
        shapes[p + "kv_a_proj.weight"] = (lat.width + R, D)
        if d_n:
            shapes[p + "k_b_proj.weight"] = (G * d_n, lat.k_rank // lat.groups)
        shapes[p + "v_b_proj.weight"] = (G * d_h, lat.v_rank // lat.groups)
        if bias:
            shapes[p + "q_proj.bias"] = (q_out,)
            shapes[p + "kv_a_proj.bias"] = (lat.width + R,)
            if d_n:
                shapes[p + "k_b_proj.bias"] = (G * d_n,)
            shapes[p + "v_b_proj.bias"] = (G * d_h,)
        shapes[p + "o_proj.weight"] = (D, H * d_h)
    elif isinstance(layer, ReducedHeadLayer):
        shapes[p + "q_proj.weight"] = (H * d_h, D)
        shapes[p + "k_proj.weight"] = (G * d_h, D)
        shapes[p + "k_reduce"] = (G, d_h, layer.k_head_dim)
        shapes[p + "v_proj.weight"] = (G * layer.v_head_dim, D)
        if bias:
            shapes[p + "q_proj.bias"] = (H * d_h,)
            shapes[p + "k_proj.bias"] = (G * d_h,)
            shapes[p + "v_proj.bias"] = (G * layer.v_head_dim,)
        shapes[p + "o_proj.weight"] = (D, H * layer.v_head_dim)
    else:
        shapes[p + "q_proj.weight"] = (H * d_h, D)
        shapes[p + "k_proj.weight"] = (G * d_h, D)
        shapes[p + "v_proj.weight"] = (G * d_h, D)
        if bias:
            shapes[p + "q_proj.bias"] = (H * d_h,)
            shapes[p + "k_proj.bias"] = (G * d_h,)
            shapes[p + "v_proj.bias"] = (G * d_h,)
        shapes[p + "o_proj.weight"] = (D, H * d_h)
    if spec.qk_norm:
        # Latent layers reorder each KV head's dims [nope | rope], so their norm gains are per KV head.
        norm_shape = (G, d_h) if isinstance(layer, LatentLayer) else (d_h,)
        shapes[p + "q_norm.weight"] = norm_shape
        shapes[p + "k_norm.weight"] = norm_shape
    return shapes


def expected_tensor_shapes(spec: LatentKVSpec, dims: ModelDims) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this spec must contain, with its shape."""
    D, F, V = dims.hidden_size, dims.intermediate_size, dims.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not dims.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for i, layer in enumerate(spec.layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "mlp.gate_proj.weight"] = (F, D)
        shapes[p + "mlp.up_proj.weight"] = (F, D)
        shapes[p + "mlp.down_proj.weight"] = (D, F)
        shapes.update(attention_tensor_shapes(i, layer, spec, dims))
    return shapes


def check_tensor_shapes(found: dict[str, tuple[int, ...]], spec: LatentKVSpec, dims: ModelDims) -> None:
    """Raise FormatError naming the first missing, unexpected or mis-shaped tensor."""
    expected = expected_tensor_shapes(spec, dims)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise FormatError(f"checkpoint is missing tensor(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise FormatError(f"checkpoint has unexpected tensor(s): {', '.join(unexpected[:5])}")
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise FormatError(f"tensor {name} has shape {tuple(found[name])}, the config implies {shape}")


# ---------------------------------------------------------------------------------------------
# Reading config.json
# ---------------------------------------------------------------------------------------------

def model_dims(config: dict[str, Any]) -> ModelDims:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return ModelDims(
        hidden_size=config["hidden_size"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        num_hidden_layers=config["num_hidden_layers"],
        intermediate_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def parse_spec(section: Any) -> LatentKVSpec:
    """Validate a ``latent_kv`` section, turning pydantic's report into a FormatError."""
    if not isinstance(section, dict):
        raise FormatError("config.json has no 'latent_kv' object: this is not a latentkv checkpoint (convert it with `latentkv convert`)")
    try:
        return LatentKVSpec.model_validate(section)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise FormatError(f"invalid latent_kv config at 'latent_kv.{loc}': {first['msg']} ({e.error_count()} error(s) in all)") from None


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FormatError(f"{path} not found: expected a model directory with a config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path} is not valid JSON: {e}") from None


def load_spec(config: dict[str, Any]) -> tuple[LatentKVSpec, ModelDims]:
    """Parse and cross-check the latent_kv section of a config dict."""
    if config.get("model_type") != MODEL_TYPE:
        raise FormatError(f"config.json model_type is {config.get('model_type')!r}, expected {MODEL_TYPE!r}")
    spec = parse_spec(config.get("latent_kv"))
    dims = model_dims(config)
    check_spec(spec, dims)
    return spec, dims


def default_softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def kv_bytes_report(spec: LatentKVSpec, dims: ModelDims, element_bytes: int = 2) -> dict[str, Any]:
    """Per-layer cache widths and bytes per token, and the ratio to the source model."""
    per_layer = [cache_values_per_token(layer, spec, dims) for layer in spec.layers]
    source = source_cache_values_per_token(dims) * dims.num_hidden_layers
    return {
        "values_per_token_per_layer": per_layer,
        "bytes_per_token": sum(per_layer) * element_bytes,
        "source_bytes_per_token": source * element_bytes,
        "ratio": sum(per_layer) / source,
    }
