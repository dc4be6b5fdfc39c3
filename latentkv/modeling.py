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

from latentkv import format as fmt
from latentkv import int4
from latentkv.rope import rotate

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
        self.entries, self.positions = {}, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.entries = {k: v.index_select(0, beam_idx) for k, v in self.entries.items()}
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx)

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
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GroupedRMSNorm(nn.Module):
    """Per-head RMSNorm whose gain differs per KV head: x [B, T, heads, d], heads a multiple of G."""

    def __init__(self, groups: int, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(groups, dim))
        self.eps = eps

    def gain(self, heads: int) -> torch.Tensor:
        return self.weight.repeat_interleave(heads // self.weight.shape[0], dim=0)  # [heads, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.gain(x.shape[-2]) * (x.float() * rms_scale(x, self.eps)[..., None])).to(x.dtype)


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / rms(x) over the last dim, in float32: x [..., d] -> [...]."""
    return torch.rsqrt(x.float().pow(2).mean(-1) + eps)


class MLP(nn.Module):
    def __init__(self, config: LatentKVConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
    """Boolean [B, 1, T, S] mask: query at position p sees cached keys at positions <= p."""
    mask = k_pos[:, None, None, :] <= q_pos[:, None, :, None]
    if key_padding is not None:
        mask = mask & key_padding[:, None, None, :].bool()
    return mask


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(scale q k^T) v with GQA: q [B, H, T, d], k [B, G, S, d], v [B, G, S, d_v] -> [B, H, T, d_v].

    ``mask`` [B, 1, T, S] (True = visible), or None for plain causal attention over T == S
    tokens (the fused kernel's fast path). Rows that see no key give 0 (left padding), as in
    :func:`softmax_attention`.
    """
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
    return torch.nan_to_num(o, nan=0.0) if mask is not None else o


def sdpa_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, key_padding: torch.Tensor | None, cache) -> torch.Tensor | None:
    """The mask for :func:`sdpa_attention`: None (causal fast path) for a whole uncached, unpadded
    sequence from position 0, else :func:`causal_mask`."""
    T = q_pos.shape[1]
    if cache is None and key_padding is None and bool((q_pos == torch.arange(T, device=q_pos.device)).all()):
        return None
    return causal_mask(q_pos, k_pos, key_padding)


def softmax_attention(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """scores [B, H, T, S] (already scaled) -> probabilities in float32 (fully masked rows give 0)."""
    scores = scores.float().masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


# ---------------------------------------------------------------------------------------------
# Attention, one class per layer kind
# ---------------------------------------------------------------------------------------------

class LatentAttention(nn.Module):
    """MLA-style attention of a ``latent`` layer (partial / shared / full RoPE)."""

    def __init__(self, config: LatentKVConfig, spec: fmt.LatentKVSpec, layer: fmt.LatentLayer, layer_idx: int):
        super().__init__()
        dims = config.dims
        self.layer, self.layer_idx = layer, layer_idx
        self.H, self.G, self.d_h = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
        self.d_n, self.R_H, self.R_D = layer.qk_nope_head_dim, layer.num_rope_heads, layer.rope_head_dim
        lat = layer.latent
        self.W, self.n_grp = lat.width, lat.groups
        self.eps = config.rms_norm_eps
        self.key_scale = fmt.caches_key_scale(layer, spec)
        self.int4_group = spec.int4_group_size if spec.cache_dtype == "int4" else None
        bias = spec.attention_bias
        D = dims.hidden_size
        self.q_proj = nn.Linear(D, self.H * (self.d_n + self.R_D), bias=bias)
        self.kv_a_proj = nn.Linear(D, self.W + self.R_H * self.R_D, bias=bias)
        self.k_b_proj = nn.Linear(lat.k_rank // lat.groups, self.G * self.d_n, bias=bias) if self.d_n else None
        self.v_b_proj = nn.Linear(lat.v_rank // lat.groups, self.G * self.d_h, bias=bias)
        self.o_proj = nn.Linear(self.H * self.d_h, D, bias=False)
        self.q_norm = GroupedRMSNorm(self.G, self.d_h, self.eps) if spec.qk_norm else None
        self.k_norm = GroupedRMSNorm(self.G, self.d_h, self.eps) if spec.qk_norm else None
        freqs = spec.rope_inv_freq
        # Frequencies of each rope head's pairs [R_H, R_D/2]; full mode rotates whole heads.
        rope_freqs = [[freqs[i] for i in pairs] for pairs in layer.rope_pairs] if self.R_H else [freqs]
        # Plain attributes, not buffers: transformers re-creates non-persistent buffers empty when
        # it loads on the meta device, and these tables come from the config, not the weights.
        self.rope_freqs = torch.tensor(rope_freqs, dtype=torch.float64, device="cpu")
        self.source_freqs = torch.tensor(freqs, dtype=torch.float64, device="cpu")

    # -- per-head views of the up-projections -------------------------------------------------
    def _chunks(self, c: torch.Tensor, part: slice) -> torch.Tensor:
        """Latent part -> per-KV-head chunk it feeds: c [B, S, W] -> [B, S, G, r / n_grp]."""
        c = c[..., part]
        c = c.unflatten(-1, (self.n_grp, -1))  # [B, S, n_grp, r/n_grp]
        return c.repeat_interleave(self.G // self.n_grp, dim=2)

    def _up(self, proj: nn.Linear, c_heads: torch.Tensor, out_dim: int) -> torch.Tensor:
        """Per-KV-head up-projection: c_heads [B, S, G, r'] -> [B, S, G, out_dim]."""
        w = proj.weight.view(self.G, out_dim, -1)  # [G, out, r']
        y = torch.einsum("bsgr,gor->bsgo", c_heads, w)
        if proj.bias is not None:
            y = y + proj.bias.view(self.G, out_dim)
        return y

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """KV-head tensor [B, S, G, ...] -> query-head tensor [B, S, H, ...] (GQA sharing)."""
        return x.repeat_interleave(self.H // self.G, dim=2)

    def _per_query_head(self, w: torch.Tensor) -> torch.Tensor:
        """Per-KV-head weights [G, ...] -> [H, ...]."""
        return w.repeat_interleave(self.H // self.G, dim=0)

    def _rope_slots(self, k_rope: torch.Tensor) -> torch.Tensor:
        """Rope key heads [B, S, R_H, R_D] -> the slot each query head reads [B, S, H, R_D]."""
        return k_rope.repeat_interleave(self.H // self.R_H, dim=2)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x, positions, cache: _LayerEntries | None, key_padding, path: AttnPath):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.d_n + self.R_D)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q_nope, q_rope = q.split((self.d_n, self.R_D), dim=-1)
        kv = self.kv_a_proj(x)
        c, k_rope = kv.split((self.W, self.R_H * self.R_D), dim=-1)
        new = {"latent": c}
        if self.R_H:
            k_rope, scale = self._new_rope_keys(c, k_rope.view(B, T, self.R_H, self.R_D), positions)
            new["rope"] = k_rope
            if scale is not None:
                new["key_scale"] = scale
            q_rope = rotate(q_rope, positions, self.rope_freqs.repeat_interleave(self.H // self.R_H, dim=0))
        if self.int4_group:  # the checkpoint asks for an INT4 latent cache: attend to what it holds
            new = int4.as_cached(new, self.int4_group)
        entries = cache.append(positions, **new) if cache is not None else new
        k_pos = cache.positions if cache is not None else positions
        if self.layer.rope_mode == "full":
            q_nope = rotate(q_nope, positions, self.source_freqs)
        use_absorb = path == "absorb" or (path == "auto" and T == 1 and cache is not None)
        if use_absorb:
            o = self._absorbed(q_nope, q_rope, entries, k_pos, causal_mask(positions, k_pos, key_padding))
        else:
            o = self._expanded(q_nope, q_rope, entries, k_pos, sdpa_mask(positions, k_pos, key_padding, cache))
        # o: [B, T, H, d_h]
        return self.o_proj(o.reshape(B, T, self.H * self.d_h))

    def _new_rope_keys(self, c, k_rope, positions):
        """Rope keys to cache (normalised and rotated) and, with a key norm, the key scales."""
        scale = None
        if self.k_norm is not None:
            w = self.k_norm.weight  # [G, d_h]
            if self.key_scale:
                # 1/rms over the whole raw key [k_nope (rebuilt from c) | k_rope]: [B, T, G]
                k_nope = self._up(self.k_b_proj, self._chunks(c, self.layer.latent.k_slice), self.d_n)
                scale = rms_scale(torch.cat((k_nope, k_rope), dim=-1), self.eps)
                k_rope = (w[:, self.d_n:] * (k_rope.float() * scale[..., None])).to(k_rope.dtype)
            else:  # all pairs kept: the rope key is the whole key
                k_rope = self.k_norm(k_rope)
        return rotate(k_rope, positions, self.rope_freqs), scale

    def _keys_nope(self, entries, k_pos) -> torch.Tensor:
        """Rebuild per-KV-head NoPE (or, in full mode, rotated) keys of all cached tokens."""
        k = self._up(self.k_b_proj, self._chunks(entries["latent"], self.layer.latent.k_slice), self.d_n)
        if self.k_norm is not None:
            if self.key_scale:
                k = (self.k_norm.weight[:, : self.d_n] * (k.float() * entries["key_scale"][..., None])).to(k.dtype)
            else:
                k = self.k_norm(k)
        if self.layer.rope_mode == "full":
            k = rotate(k, k_pos, self.source_freqs)
        return k

    def _expanded(self, q_nope, q_rope, entries, k_pos, mask):
        """Prefill path: up-project the cached latents, then ordinary attention.

        s = q_nope . k_nope + q_rope . k_rope is one dot product of the concatenations
        [q_nope | q_rope] . [k_nope | k_rope], so this is plain GQA attention over KV-head keys of
        width d_n + R_D, run by scaled_dot_product_attention (fused, differentiable).
        """
        q_parts, k_parts = [], []
        if self.d_n:
            q_parts.append(q_nope)
            k_parts.append(self._keys_nope(entries, k_pos))  # [B, S, G, d_n]
        if self.R_H:
            q_parts.append(q_rope)
            k_parts.append(entries["rope"].repeat_interleave(self.G // self.R_H, dim=2))  # rope head of each KV head
        q = torch.cat(q_parts, dim=-1).float().transpose(1, 2)  # [B, H, T, d]
        k = torch.cat(k_parts, dim=-1).float().transpose(1, 2)  # [B, G, S, d]
        v = self._up(self.v_b_proj, self._chunks(entries["latent"], self.layer.latent.v_slice), self.d_h)
        o = sdpa_attention(q, k, v.float().transpose(1, 2), mask, self.layer.softmax_scale)
        return o.transpose(1, 2).to(q_rope.dtype)

    def _absorbed(self, q_nope, q_rope, entries, k_pos, mask):
        """Decode path (MHA2MLA App. B): scores and values in latent space."""
        lat = self.layer.latent
        c_k = self._heads(self._chunks(entries["latent"], lat.k_slice)).float()  # [B, S, H, r_k/n_grp]
        scores = 0
        if self.layer.rope_mode == "full":
            k = self._heads(self._keys_nope(entries, k_pos))  # keys must be rebuilt: RoPE sits after W_uk
            scores = torch.einsum("bthd,bshd->bhts", q_nope.float(), k.float())
        elif self.d_n:
            gain = self.k_norm.gain(self.H)[:, : self.d_n] if self.key_scale else 1.0
            q = (q_nope * gain).float()
            w_uk = self.k_b_proj.weight.view(self.G, self.d_n, -1).float()  # [G, d_n, r']
            q_lat = torch.einsum("bthd,hdr->bthr", q, self._per_query_head(w_uk))  # q~ = W_uk^T q_nope
            nope = torch.einsum("bthr,bshr->bhts", q_lat, c_k)
            if self.k_b_proj.bias is not None:  # q . b_k: constant over keys unless scaled per key
                b = self._per_query_head(self.k_b_proj.bias.view(self.G, self.d_n)).float()
                nope = nope + torch.einsum("bthd,hd->bht", q, b)[..., None]
            if self.key_scale:
                nope = nope * self._heads(entries["key_scale"]).permute(0, 2, 1)[:, :, None, :]
            scores = nope
        if self.R_H:
            k_rope = self._rope_slots(entries["rope"])
            scores = scores + torch.einsum("bthd,bshd->bhts", q_rope.float(), k_rope.float())
        probs = softmax_attention(scores * self.layer.softmax_scale, mask)
        c_v = self._heads(self._chunks(entries["latent"], lat.v_slice)).float()
        o_lat = torch.einsum("bhts,bshr->bthr", probs, c_v)  # sum_t p_t c_t
        w_uv = self._per_query_head(self.v_b_proj.weight.view(self.G, self.d_h, -1)).float()
        o = torch.einsum("bthr,hdr->bthd", o_lat, w_uv)  # W_uv applied after attention
        if self.v_b_proj.bias is not None:
            o = o + self._per_query_head(self.v_b_proj.bias.view(self.G, self.d_h)).float()
        return o.to(q_rope.dtype)


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
        self.q_norm = RMSNorm(self.d_h, config.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.d_h, config.rms_norm_eps) if spec.qk_norm else None
        self.source_freqs = torch.tensor(spec.rope_inv_freq, dtype=torch.float64, device="cpu")  # not a buffer, see LatentAttention

    def forward(self, x, positions, cache, key_padding, path):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.d_h)
        k = self.k_proj(x).view(B, T, self.G, self.d_h)
        v = self.v_proj(x).view(B, T, self.G, self.d_v)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, positions, self.source_freqs), rotate(k, positions, self.source_freqs)
        if self.reduced:  # TransKV: q' = P_K^T RoPE(q), k' = P_K^T RoPE(k), per KV group
            k = torch.einsum("btgd,gdr->btgr", k, self.k_reduce)
            q = torch.einsum("bthd,hdr->bthr", q, self.k_reduce.repeat_interleave(self.H // self.G, dim=0))
        entries = cache.append(positions, k=k, v=v) if cache is not None else {"k": k, "v": v}
        k_pos = cache.positions if cache is not None else positions
        k_all, v_all = (entries[n].float().transpose(1, 2) for n in ("k", "v"))  # [B, G, S, d]
        o = sdpa_attention(q.float().transpose(1, 2), k_all, v_all, sdpa_mask(positions, k_pos, key_padding, cache),
                           self.layer.softmax_scale)
        o = o.transpose(1, 2).to(x.dtype)  # [B, T, H, d_v]
        return self.o_proj(o.reshape(B, T, self.H * self.d_v))


class DecoderLayer(nn.Module):
    def __init__(self, config: LatentKVConfig, spec: fmt.LatentKVSpec, layer_idx: int):
        super().__init__()
        layer = spec.layers[layer_idx]
        attn_cls = LatentAttention if isinstance(layer, fmt.LatentLayer) else HeadAttention
        self.self_attn = attn_cls(config, spec, layer, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, positions, cache, key_padding, path):
        x = x + self.self_attn(self.input_layernorm(x), positions, cache, key_padding, path)
        return x + self.mlp(self.post_attention_layernorm(x))


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

    def forward(self, input_ids, positions, cache, key_padding, path):
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, cache.layers[i] if cache is not None else None, key_padding, path)
        return self.norm(x)


class LatentKVForCausalLM(LatentKVPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LatentKVConfig):
        super().__init__(config)
        self.model = LatentKVModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.attn_path: AttnPath = "auto"
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
        hidden = self.model(input_ids, position_ids, cache, attention_mask, self.attn_path)
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
