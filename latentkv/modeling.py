"""Pure-PyTorch reference model of a latent-KV checkpoint: the numerical oracle.

The vLLM model, the Triton kernels and every benchmark are checked against this file. It is a
Hugging Face ``PreTrainedModel`` (``AutoModelForCausalLM`` after :func:`register_with_transformers`)
whose cache holds only what the format promises: per token and layer the latent c, the rotated
rope keys (and, for partial RoPE on q/k-norm sources, one key scale per KV head).

With ``cache_dtype: int4`` the latents are quantized as the INT4 cache stores them
(``latentkv.int4``), so the model is exactly what a server with that cache computes.

Latent attention of one query head h (KV head g, rope head j, see ``latentkv.format``):

    q_h = [q_nope | q_rope] = q_proj(x)_h            k_rope = RoPE(kv_a_proj(x)[W:])_j
    c   = kv_a_proj(x)[:W]                            k_nope = k_b_proj_g c_k,   v = v_b_proj_g c_v
    s_t = q_nope . k_nope_t + RoPE(q_rope) . k_rope_t            (partial / shared)
    s_t = RoPE(q_h) . RoPE(k_b_proj_g c_k,t)                     (full: keys rebuilt, then rotated)
    o_h = sum_t softmax(scale s)_t v_t

Prefill ("expand") up-projects the cached latents to keys and values. Decode ("absorb") follows
MHA2MLA Appendix B: W_uk is absorbed into the query, q~_h = k_b_proj_g^T q_nope, the scores are
q~_h . c_t in latent space and W_uv is applied after the attention-weighted sum of latents
(o_h = v_b_proj_g sum_t p_t c_t + b_v, exact because sum_t p_t = 1). Full mode cannot absorb the
keys (RoPE sits between W_uk and the query), so it rebuilds them and absorbs only the values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from latentkv import attention as attn
from latentkv import format as fmt
from latentkv import int4
from latentkv.token_filter import TokenFilterOptions, keep_last

AttnPath = Literal["auto", "expand", "absorb"]

# What transformers calls the cache. Up to 5.23 it is ``past_key_values``; from 5.24 it is ``cache`` everywhere:
# generate() keeps it in ``model_kwargs["cache"]``, prepare_inputs_for_generation passes it to forward as
# ``cache=`` and after each step generate reads it back from ``outputs["cache"]`` only. A model that takes and
# returns ``past_key_values`` there never gets its cache back: every decode step starts an empty cache and attends
# to its own token only (transformers' warning: "Both `past_key_values` and `cache` are set").
# The output class of the installed transformers declares the name (a public dataclass field, no private API).
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class LatentKVConfig(PretrainedConfig):
    model_type = fmt.MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-6,
        tie_word_embeddings: bool = False,
        latent_kv: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.latent_kv = latent_kv
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def spec(self) -> fmt.LatentKVSpec:
        spec, _ = fmt.load_spec(self.to_dict())
        return spec

    @property
    def dims(self) -> fmt.ModelDims:
        return fmt.model_dims(self.to_dict())


# ---------------------------------------------------------------------------------------------
# Cache: only what the format promises
# ---------------------------------------------------------------------------------------------

class _LayerEntries(CacheLayerMixin):
    """One layer's cached tensors by name, each [B, S, ...], grown along S."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[str, torch.Tensor] = {}
        self.positions: torch.Tensor | None = None  # [B, S]; bookkeeping like vLLM's slot mapping, not KV data
        self.kept_keys: torch.Tensor | None = None  # [B, S] bool: Token Filtering's skip="key" decisions

    def lazy_initialization(self, key_states, value_states) -> None:  # unused: entries are named
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("latent layers append named entries with append()")

    def append(self, positions: torch.Tensor, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        for name, value in new.items():
            old = self.entries.get(name)
            self.entries[name] = value if old is None else torch.cat((old, value), dim=1)
        self.positions = positions if self.positions is None else torch.cat((self.positions, positions), dim=1)
        self.is_initialized = True
        return self.entries

    def get_seq_length(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # get_max_length's name (and abstract) before transformers 5.13
        return -1

    def reset(self) -> None:
        self.entries, self.positions, self.kept_keys = {}, None, None

    def keep_keys(self, keep: torch.Tensor) -> torch.Tensor:
        """Append this step's skip="key" decisions [B, T]; -> all of them [B, S]."""
        self.kept_keys = keep if self.kept_keys is None else torch.cat((self.kept_keys, keep), dim=1)
        return self.kept_keys

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.entries = {k: v.index_select(0, beam_idx) for k, v in self.entries.items()}
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx)
        if self.kept_keys is not None:
            self.kept_keys = self.kept_keys.index_select(0, beam_idx)

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass


class LatentKVCache(Cache):
    """Per-layer named cache entries; :meth:`bytes_per_token` measures what is really stored."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[_LayerEntries() for _ in range(num_layers)])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def bytes_per_token(self, layer_idx: int) -> int:
        layer = self.layers[layer_idx]
        batch, seq = layer.positions.shape
        total = sum(t.numel() * t.element_size() for t in layer.entries.values())
        return total // (batch * seq)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return attn.rms_norm(x, self.weight, self.eps)


class Gains(nn.Module):
    """Per-KV-head RMSNorm gains ``weight`` [G, d_h] of a latent layer's q/k norms (applied by
    ``latentkv.attention``, which knows which head reads which row)."""

    def __init__(self, groups: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(groups, dim))


class MLP(nn.Module):
    def __init__(self, config: LatentKVConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def sdpa_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, key_padding: torch.Tensor | None, cache) -> torch.Tensor | None:
    """The mask for :func:`latentkv.attention.sdpa_attention`: None (causal fast path) for a whole
    uncached, unpadded sequence from position 0, else :func:`latentkv.attention.causal_mask`."""
    T = q_pos.shape[1]
    if cache is None and key_padding is None and bool((q_pos == torch.arange(T, device=q_pos.device)).all()):
        return None
    return attn.causal_mask(q_pos, k_pos, key_padding)


def key_mask(cache, cached, key_padding, key_filter) -> torch.Tensor | None:
    """The keys this step's queries may see: ``key_padding`` and, with Token Filtering's
    skip="key" (``key_filter`` maps what is cached to this step's decisions), not the skipped tokens."""
    if key_filter is None:
        return key_padding
    keep = key_filter(cached)
    kept = cache.keep_keys(keep) if cache is not None else keep
    return kept if key_padding is None else key_padding.bool() & kept


# ---------------------------------------------------------------------------------------------
# Attention, one class per layer kind; the math is latentkv.attention's
# ---------------------------------------------------------------------------------------------

class LatentAttention(nn.Module):
    """MLA-style attention of a ``latent`` layer (partial / shared / full RoPE)."""

    def __init__(self, config: LatentKVConfig, spec: fmt.LatentKVSpec, layer: fmt.LatentLayer, layer_idx: int):
        super().__init__()
        dims = config.dims
        self.layer, self.layer_idx = layer, layer_idx
        self.H, self.G, self.d_h = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
        self.W = layer.latent.width
        self.int4_group = spec.int4_group_size if spec.cache_dtype == "int4" else None
        # Index maps and RoPE tables: plain attributes, not buffers (transformers re-creates
        # non-persistent buffers empty when it loads on the meta device; these come from the config).
        self._heads = {"cpu": attn.LatentHeads.of(layer, spec, dims, config.rms_norm_eps)}
        h = self._heads["cpu"]
        bias, D, lat = spec.attention_bias, dims.hidden_size, layer.latent
        self.q_proj = nn.Linear(D, self.H * (h.d_n + h.R_D), bias=bias)
        self.kv_a_proj = nn.Linear(D, self.W + h.R_H * h.R_D, bias=bias)
        self.k_b_proj = nn.Linear(lat.k_rank // lat.groups, self.G * h.d_n, bias=bias) if h.d_n else None
        self.v_b_proj = nn.Linear(lat.v_rank // lat.groups, self.G * self.d_h, bias=bias)
        self.o_proj = nn.Linear(self.H * self.d_h, D, bias=False)
        self.q_norm = Gains(self.G, self.d_h) if spec.qk_norm else None
        self.k_norm = Gains(self.G, self.d_h) if spec.qk_norm else None

    def heads(self, device: torch.device) -> attn.LatentHeads:
        key = str(device)
        if key not in self._heads:
            self._heads[key] = self._heads["cpu"].to(device)
        return self._heads[key]

    def weights(self) -> attn.LatentWeights:
        """This step's view of the parameters (no copies: refinement and healing train through it)."""
        k_gain = self.k_norm.weight if self.k_norm is not None else None
        return attn.LatentWeights.of(
            self.G, self.layer.qk_nope_head_dim, self.d_h, self.k_b_proj, self.v_b_proj,
            q_gain=self.q_norm.weight if self.q_norm is not None else None,
            k_gain=k_gain, rope_k_gain=k_gain if self.layer.num_rope_heads else None,
        )

    def forward(self, x, positions, cache: _LayerEntries | None, key_padding, path: AttnPath, with_cached: bool = False,
                key_filter=None):
        """Attention output [B, T, D]; ``with_cached``: also what the layer now has cached (for
        :meth:`filter_features`); ``key_filter``: see :func:`key_mask`."""
        B, T, _ = x.shape
        heads, w = self.heads(x.device), self.weights()
        q_nope, q_rope = attn.queries(self.q_proj(x).view(B, T, self.H, -1), positions, heads, w)
        c, k_rope = self.kv_a_proj(x).split((self.W, heads.R_H * heads.R_D), dim=-1)
        new = {"latent": c}
        if heads.R_H:
            k_rope, scale = attn.new_rope_keys(c, k_rope.view(B, T, heads.R_H, heads.R_D), positions, heads, w)
            new["rope"] = k_rope.to(x.dtype)
            if scale is not None:
                new["key_scale"] = scale
        if self.int4_group:  # the checkpoint asks for an INT4 latent cache: attend to what it holds
            new = int4.as_cached(new, self.int4_group)
        entries = cache.append(positions, **new) if cache is not None else new
        k_pos = cache.positions if cache is not None else positions
        cached = (entries["latent"], entries.get("rope"), entries.get("key_scale"), k_pos)
        key_padding = key_mask(cache, cached, key_padding, key_filter)
        if path == "absorb" or (path == "auto" and T == 1 and cache is not None):
            o = attn.absorbed_attention(q_nope, q_rope, *cached, attn.causal_mask(positions, k_pos, key_padding), heads, w)
        else:
            o = attn.expanded_attention(q_nope, q_rope, *cached, sdpa_mask(positions, k_pos, key_padding, cache), heads, w)
        out = self.o_proj(o.to(x.dtype).reshape(B, T, self.H * self.d_h))
        return (out, cached) if with_cached else out

    def filter_features(self, cached, kind: str, n: int):
        """Token Filtering's (key, value) features of the last n cached tokens (``latentkv.token_filter``)."""
        latent, rope, scale, k_pos = (None if t is None else t[:, -n:] for t in cached)
        return attn.token_filter_features(latent, rope, scale, k_pos, self.heads(latent.device), self.weights(), kind)


class HeadAttention(nn.Module):
    """Ordinary per-head attention: ``source`` layers and TransKV's ``reduced_head`` layers."""

    def __init__(self, config: LatentKVConfig, spec: fmt.LatentKVSpec, layer, layer_idx: int):
        super().__init__()
        dims = config.dims
        self.layer, self.layer_idx = layer, layer_idx
        self.H, self.G, self.d_h = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
        self.reduced = isinstance(layer, fmt.ReducedHeadLayer)
        self.d_v = layer.v_head_dim if self.reduced else self.d_h
        bias, D = spec.attention_bias, dims.hidden_size
        self.q_proj = nn.Linear(D, self.H * self.d_h, bias=bias)
        self.k_proj = nn.Linear(D, self.G * self.d_h, bias=bias)
        self.v_proj = nn.Linear(D, self.G * self.d_v, bias=bias)
        self.o_proj = nn.Linear(self.H * self.d_v, D, bias=False)
        if self.reduced:
            self.k_reduce = nn.Parameter(torch.zeros(self.G, self.d_h, layer.k_head_dim))
        self.eps = config.rms_norm_eps
        self.q_norm = RMSNorm(self.d_h, self.eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.d_h, self.eps) if spec.qk_norm else None
        self.source_freqs = torch.tensor(spec.rope_inv_freq, dtype=torch.float64, device="cpu")  # not a buffer, see LatentAttention

    def forward(self, x, positions, cache, key_padding, path, with_cached: bool = False, key_filter=None):
        B, T, _ = x.shape
        q, k = attn.head_queries_keys(
            self.q_proj(x).view(B, T, self.H, self.d_h), self.k_proj(x).view(B, T, self.G, self.d_h), positions,
            self.source_freqs, self.eps, q_gain=self.q_norm.weight if self.q_norm is not None else None,
            k_gain=self.k_norm.weight if self.k_norm is not None else None,
            k_reduce=self.k_reduce if self.reduced else None,
        )
        v = self.v_proj(x).view(B, T, self.G, self.d_v)
        entries = cache.append(positions, k=k, v=v) if cache is not None else {"k": k, "v": v}
        k_pos = cache.positions if cache is not None else positions
        key_padding = key_mask(cache, (entries["k"], entries["v"]), key_padding, key_filter)
        k_all, v_all = (entries[n].float().transpose(1, 2) for n in ("k", "v"))  # [B, G, S, d]
        o = attn.sdpa_attention(q.float().transpose(1, 2), k_all, v_all, sdpa_mask(positions, k_pos, key_padding, cache),
                                self.layer.softmax_scale)
        o = o.transpose(1, 2).to(x.dtype)  # [B, T, H, d_v]
        out = self.o_proj(o.reshape(B, T, self.H * self.d_v))
        return (out, (entries["k"], entries["v"])) if with_cached else out

    def filter_features(self, cached, kind: str, n: int):
        """Token Filtering's features of the last n cached tokens: the cached keys (rotated) and values."""
        return cached[0][:, -n:], cached[1][:, -n:]


class DecoderLayer(nn.Module):
    def __init__(self, config: LatentKVConfig, spec: fmt.LatentKVSpec, layer_idx: int):
        super().__init__()
        layer = spec.layers[layer_idx]
        attn_cls = LatentAttention if isinstance(layer, fmt.LatentLayer) else HeadAttention
        self.self_attn = attn_cls(config, spec, layer, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, positions, cache, key_padding, path, token_filter: TokenFilterOptions | None = None):
        h = self.input_layernorm(x)
        if token_filter is None:
            a = self.self_attn(h, positions, cache, key_padding, path)
        elif token_filter.skip == "key":  # Token Filtering: redundant tokens are left out as keys (still cached)
            def decide(cached):
                keep = self.filter_decisions(cached, key_padding, x.shape[1], token_filter)
                self.last_keep = keep.float()
                return keep

            a = self.self_attn(h, positions, cache, key_padding, path, key_filter=decide)
        else:  # Token Filtering: redundant tokens' attention output is dropped (their K/V stay cached)
            a, cached = self.self_attn(h, positions, cache, key_padding, path, with_cached=True)
            keep = self.filter_decisions(cached, key_padding, x.shape[1], token_filter)
            self.last_keep = keep.float()
            a = a * keep[..., None].to(a.dtype)
        return self.feed_forward(x + a)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's second half, on the residual stream after its attention."""
        return x + self.mlp(self.post_attention_layernorm(x))

    def filter_decisions(self, cached, key_padding, T: int, opts: TokenFilterOptions) -> torch.Tensor:
        """Keep [B, T] (bool) for this step's T tokens, from the features of what the layer has
        cached: the decisions need no state of their own (``latentkv.token_filter``)."""
        S = cached[0].shape[1]
        n = min(S, T + opts.context)
        k, v = self.self_attn.filter_features(cached, opts.features, n)
        if key_padding is None:  # every cached token is real, numbered from 0
            index = torch.arange(S - n, S, device=k.device).expand(k.shape[0], n)
            valid = torch.ones_like(index, dtype=torch.bool)
        else:  # left padding: count the real tokens
            real = key_padding[:, -S:].bool()
            index, valid = (real.long().cumsum(-1) - 1)[:, -n:], real[:, -n:]
        return keep_last(k, v, valid, index, T, opts, self.self_attn.layer_idx)


class LatentKVPreTrainedModel(PreTrainedModel):
    config_class = LatentKVConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = False

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)


class LatentKVModel(LatentKVPreTrainedModel):
    def __init__(self, config: LatentKVConfig):
        super().__init__(config)
        spec = config.spec
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, spec, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids, positions, cache, key_padding, path, token_filter: TokenFilterOptions | None = None):
        x = self.embed_tokens(input_ids)
        filtered = token_filter.filtered_layers(len(self.layers)) if token_filter is not None else set()
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, cache.layers[i] if cache is not None else None, key_padding, path,
                      token_filter if i in filtered else None)
        return self.norm(x)


class LatentKVForCausalLM(LatentKVPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LatentKVConfig):
        super().__init__(config)
        self.model = LatentKVModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.attn_path: AttnPath = "auto"
        # serving-time option: the checkpoint's default (latent_kv.token_filter), off unless it has one
        self.token_filter: TokenFilterOptions | None = config.spec.token_filter_options()
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Validate the checkpoint against its config before transformers loads it.

        transformers only warns about missing or mis-shaped tensors and initialises them at random;
        a latent checkpoint that does not match its config must fail instead.
        """
        from latentkv.checkpoint import validate_checkpoint

        validate_checkpoint(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() would make a DynamicCache; give it a LatentKVCache, under the name it reads (CACHE_NAME)."""
        if model_kwargs.get(CACHE_NAME) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE_NAME] = LatentKVCache(self.config.num_hidden_layers)
        else:  # the caller's cache, or none: transformers' own checks apply
            super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: LatentKVCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        cache: LatentKVCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        # Either name is accepted (generate passes CACHE_NAME, callers may use either); see CACHE_NAME.
        if past_key_values is not None:
            if cache is not None and cache is not past_key_values:
                raise TypeError("pass the cache as `cache` or as `past_key_values`, not both")
            cache = past_key_values
        if cache is not None and not isinstance(cache, LatentKVCache):
            raise TypeError(f"the cache must be a LatentKVCache, got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = LatentKVCache(self.config.num_hidden_layers)
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        hidden = self.model(input_ids, position_ids, cache, attention_mask, self.attn_path, self.token_filter)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.lm_head(hidden[:, keep]).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: cache})


def register_with_transformers() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know the latentkv model type (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(fmt.MODEL_TYPE, LatentKVConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(LatentKVConfig, LatentKVForCausalLM)
    except ValueError:
        pass


register_with_transformers()

__all__ = ["LatentKVConfig", "LatentKVForCausalLM", "LatentKVCache", "register_with_transformers"]
