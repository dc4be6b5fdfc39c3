"""Latent (MLA-style) attention of a latent-KV checkpoint in vLLM, with a real latent cache.

Symbols (one layer; the format's symbol table is ``latentkv.format``; this rank of TP size P
holds H_l = H / P query heads and G_l = G / P KV heads; the latent is replicated):

    x            [T, D]                     this step's tokens, all requests concatenated
    q_proj       [H (d_n + R_D), D]         column-parallel by query head: [q_nope | q_rope]
    kv_a_proj    [W + R_H R_D, D]           replicated: [c (W) | k_rope (R_H x R_D)]
    k_b_proj     [G d_n, r_k / n_grp]       column-parallel by KV head (W_uk)
    v_b_proj     [G d_h, r_v / n_grp]       column-parallel by KV head (W_uv)
    o_proj       [D, H d_h]                 row-parallel
    chunk(g)     latent chunk read by KV head g: g // (G / n_grp)
    slot(h)      rope key head read by query head h: h // (H / R_H)
    cache row    [c | RoPE(k_rope) | key scales] per token (``cache.py``; INT4: packed latent + fp16 tail)

Prefill ("expand", MHA2MLA / DeepSeek-V2 training form), per request, context read back from
the paged cache so that chunked prefill and prefix caching see exactly what decode sees:

    c_1..S, k_rope_1..S  = cache rows of the request (this step's rows written first)
    k_t,g = W_uk[g] c_k,t[chunk(g)] + b_k          (full: k_t,g = RoPE_t(W_uk[g] c_k,t + b_k))
    v_t,g = W_uv[g] c_v,t[chunk(g)] + b_v
    s_h,t = q_nope,h . k_t,g(h) + RoPE(q_rope,h) . k_rope_t[slot(h)]
    o_h   = sum_t softmax(scale s_h)_t v_t,g(h)     (one SDPA call per request, GQA, causal
                                                     lower-right: fused kernels on a GPU)

Decode ("absorb", MHA2MLA App. B / DeepSeek-V2 eq. 10 absorbed), one query token:

    q~_h  = W_uk[g(h)]^T q_nope,h                  (b_k adds q_nope . b_k to every score: dropped,
                                                     softmax is shift invariant)
    s_h,t = q~_h . c_k,t[chunk] + RoPE(q_rope,h) . k_rope_t[slot(h)]    <- Triton kernel over pages
    o_h   = W_uv[g(h)] (sum_t softmax(scale s_h)_t c_v,t[chunk]) + b_v

Full RoPE caches the latent only; its keys are rebuilt (and rotated) at attention time, only
the values are absorbed.

q/k-norm sources (Qwen3, ``qk_norm``): gains [G, d_h] per KV head (``q_norm``, ``k_norm``), in
each head's dim order. Queries are normed before RoPE. Full: rebuilt keys are normed per KV head,
then rotated. Partial with all pairs kept (d_n = 0): the rope key is the whole key, normed before
RoPE. Partial with NoPE dims: the row gains G key scales, ``[c | rope keys | s]`` with
s_g = 1/rms([W_uk[g] c_k + b_k | raw rope key g]), cached rope key = gain_rope s raw (rotated);
the NoPE score of key t is s_t,g (q_nope gain_nope) . (W_uk c_k,t + b_k) (the b_k term is then no
longer constant over t and is kept). Key-scale layers take the torch path. Latent groups (Palu, n_grp > 1) reach the kernel as a query that is
zero outside its chunk, so one pass over the page serves all groups. Full RoPE decodes on
``full_rope_decode_attention[_int4]`` (keys rebuilt, biased, normed and rotated in the kernel;
joint or split latent). With tensor parallelism each rank's kernels read its share of the row:
its heads' rope slots and its KV heads' key groups. Both kernels follow ``LATENTKV_TRITON``;
layers with key scales always take the torch path.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from latentkv import format as fmt
from latentkv.rope import rotate
from vllm_latentkv._vllm import (
    AttentionLayerBase,
    ColumnParallelLinear,
    QuantizationConfig,
    ReplicatedLinear,
    RowParallelLinear,
    VllmConfig,
    get_forward_context,
)
from vllm_latentkv.attention.backend import (
    LatentKVAttentionBackend,
    LatentKVAttentionImpl,
    LatentKVMetadata,
    triton_usable,
)
from vllm_latentkv.attention.cache import LatentCacheLayout
from vllm_latentkv.attention.tp import tp_split


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE of x [T, heads, 2n] at positions [T]: the reference model's rotate (float64 angles)."""
    return rotate(x[None], positions[None], inv_freq)[0]


class LatentAttention(nn.Module, AttentionLayerBase):
    """Attention of a ``latent`` layer; it is its own vLLM attention layer (cache owner)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        spec: fmt.LatentKVSpec,
        dims: fmt.ModelDims,
        layer_idx: int,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        layer = spec.layers[layer_idx]
        assert isinstance(layer, fmt.LatentLayer)
        where = f"latent_kv.layers[{layer_idx}]"
        self.layer, self.layer_name = layer, prefix
        H, G, d_h = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
        tp, rank = tp_split(where, H, G)
        self.d_h = d_h
        self.H_l, self.G_l = H // tp, G // tp
        self.num_heads = self.H_l
        self.d_n, self.R_H, self.R_D = layer.qk_nope_head_dim, layer.num_rope_heads, layer.rope_head_dim
        lat = layer.latent
        self.W, self.n_grp = lat.width, lat.groups
        self.k_slice, self.v_slice = lat.k_slice, lat.v_slice
        self.r_k, self.r_v = lat.k_rank // lat.groups, lat.v_rank // lat.groups
        self.full = layer.rope_mode == "full"
        self.scale = layer.softmax_scale
        bias, D = spec.attention_bias, dims.hidden_size
        self.bias = bias

        self.q_proj = ColumnParallelLinear(D, H * (self.d_n + self.R_D), bias=bias, quant_config=quant_config, prefix=f"{prefix}.q_proj")
        self.kv_a_proj = ReplicatedLinear(D, self.W + self.R_H * self.R_D, bias=bias, quant_config=quant_config, prefix=f"{prefix}.kv_a_proj")
        self.k_b_proj = (
            ColumnParallelLinear(self.r_k, G * self.d_n, bias=bias, quant_config=None, prefix=f"{prefix}.k_b_proj")
            if self.d_n else None
        )
        self.v_b_proj = ColumnParallelLinear(self.r_v, G * d_h, bias=bias, quant_config=None, prefix=f"{prefix}.v_b_proj")
        self.o_proj = RowParallelLinear(H * d_h, D, bias=False, quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.key_scale = fmt.caches_key_scale(layer, spec)
        if self.key_scale and tp > 1:
            raise NotImplementedError(
                f"{where}: key scales (partial RoPE on a q/k-norm source) need every KV head's W_uk on each "
                "rank; tensor parallelism is not supported for them yet"
            )
        self.qk_norm = spec.qk_norm
        self.eps = float(getattr(vllm_config.model_config.hf_config, "rms_norm_eps", 1e-6)) if vllm_config.model_config is not None else 1e-6
        if self.qk_norm:
            # [G, d_h] gains; this rank keeps its KV heads' rows for queries / NoPE keys, and all
            # G rows for k_norm when the (replicated) rope keys of every head are normed here.
            self.q_norm = _Gains(G, d_h, rank * self.G_l, self.G_l)
            self.k_norm = _Gains(G, d_h, 0, G) if self.R_H else _Gains(G, d_h, rank * self.G_l, self.G_l)

        # Index maps of this rank's heads (global indices where the format needs them).
        h_glob = torch.arange(self.H_l) + rank * self.H_l
        g_glob = torch.arange(self.G_l) + rank * self.G_l
        self.kv_of_head = (torch.arange(self.H_l) // (self.H_l // self.G_l)).tolist()  # local KV head
        self.chunk_of_kv = (g_glob // (G // self.n_grp)).tolist()
        self.chunk_of_head = [self.chunk_of_kv[g] for g in self.kv_of_head]
        self.slot_of_head = (h_glob // (H // self.R_H)).tolist() if self.R_H else []
        freqs = spec.rope_inv_freq
        self.rope_freqs = torch.tensor([[freqs[i] for i in p] for p in layer.rope_pairs], dtype=torch.float64) if self.R_H else None
        self.q_rope_freqs = self.rope_freqs[self.slot_of_head] if self.R_H else None  # [H_l, R_D/2]
        self.source_freqs = torch.tensor(freqs, dtype=torch.float64)
        # The kernels' share of the row for this rank's heads (all of it without TP): rope slots
        # read by its query heads, latent key groups read by its KV heads; None if not contiguous.
        self.rope_slots = _contiguous_share(self.slot_of_head) if self.R_H else None
        self.key_groups_used = _contiguous_share(self.chunk_of_kv)
        self._inv_freq: torch.Tensor | None = None  # fp32 copy on the cache's device (full-RoPE kernel)

        # vLLM attention-layer plumbing: the cache spec, the backend, the static forward context.
        model_dtype = vllm_config.model_config.dtype if vllm_config.model_config is not None else torch.get_default_dtype()
        cache_dtype = vllm_config.cache_config.cache_dtype if vllm_config.cache_config is not None else "auto"
        elt_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(cache_dtype, model_dtype)
        self.layout = LatentCacheLayout.for_layer(layer, spec, elt_dtype, where)
        self.attn_backend = LatentKVAttentionBackend
        self.impl = LatentKVAttentionImpl(self.layout, cache_dtype)
        self.kv_cache = torch.tensor([])
        ctx = vllm_config.compilation_config.static_forward_context
        if prefix in ctx:
            raise ValueError(f"Duplicate layer name: {prefix}")
        ctx[prefix] = self

    # -- AttentionLayerBase -------------------------------------------------------------------
    def get_attn_backend(self):
        return self.attn_backend

    def get_kv_cache_spec(self, vllm_config: VllmConfig):
        return self.layout.make_spec(vllm_config.cache_config.block_size)

    # -- per-KV-head weights ------------------------------------------------------------------
    def _w(self, proj: nn.Module, out_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[G_l, out, r'] weight and [G_l, out] bias (fp32) of an up-projection."""
        w = proj.weight.float().view(self.G_l, out_dim, -1)
        b = proj.bias.float().view(self.G_l, out_dim) if getattr(proj, "bias", None) is not None else None
        return w, b

    def _chunks(self, lat: torch.Tensor, part: slice) -> torch.Tensor:
        """lat [S, W] -> the chunk each local KV head reads [S, G_l, r']."""
        return lat[:, part].unflatten(-1, (self.n_grp, -1))[:, self.chunk_of_kv]

    # -- forward ------------------------------------------------------------------------------
    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        T = hidden_states.shape[0]
        q, _ = self.q_proj(hidden_states)
        q = q.view(T, self.H_l, self.d_n + self.R_D)
        if self.qk_norm:
            q = self._norm(q, self.q_norm.weight[self.kv_of_head])
        q_nope, q_rope = q.split((self.d_n, self.R_D), dim=-1)
        kv, _ = self.kv_a_proj(hidden_states)
        c, k_rope = kv.split((self.W, self.R_H * self.R_D), dim=-1)
        key_scale = None
        if self.R_H:
            k_rope, key_scale = self._new_rope_keys(c, k_rope.view(T, self.R_H, self.R_D))
            k_rope = rope(k_rope, positions, self.rope_freqs).flatten(1)
            q_rope = rope(q_rope, positions, self.q_rope_freqs)
        if self.full:
            q_nope = rope(q_nope, positions, self.source_freqs)

        o = torch.zeros(T, self.H_l, self.d_h, dtype=torch.float32, device=hidden_states.device)
        ctx = get_forward_context()
        meta = ctx.attn_metadata
        if isinstance(meta, list):
            meta = meta[0]
        if isinstance(meta, dict):
            meta = meta.get(self.layer_name)
        if meta is not None:  # None: profiling / dummy run, nothing cached to attend to
            slots = ctx.slot_mapping
            slots = slots.get(self.layer_name, meta.slot_mapping) if isinstance(slots, dict) else meta.slot_mapping
            tail = k_rope if key_scale is None else torch.cat((k_rope, key_scale.to(k_rope.dtype)), dim=-1)
            self.impl.write(c, tail, self.kv_cache, slots)
            self._attend_all(q_nope.float(), q_rope.float(), meta, o)
        out, _ = self.o_proj(o.to(hidden_states.dtype).view(T, self.H_l * self.d_h))
        return out

    def _attend_all(self, q_nope, q_rope, meta: LatentKVMetadata, o: torch.Tensor) -> None:
        kernel_done = set()
        if meta.decode_reqs and self._kernel_decode_ok(o.device):
            idx = meta.decode_tokens
            o[idx] = self._kernel_decode(q_nope[idx], q_rope[idx], meta)
            kernel_done = set(meta.decode_reqs)
        qsl = meta.query_start_loc
        for r, seq_len in enumerate(meta.seq_lens):
            start, end = qsl[r], qsl[r + 1]
            if end == start or r in kernel_done:
                continue
            lat, rope_k, key_scale = self.impl.read(self.kv_cache, meta.block_table[r], seq_len)
            o[start:end] = self._attend(q_nope[start:end], q_rope[start:end], lat, rope_k, absorb=end - start == 1,
                                        key_scale=key_scale)

    # -- q/k norms ----------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, gain: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """gain * x / rms(x) per head (the reference's GroupedRMSNorm): x [T, heads, d], gain [heads, d];
        ``scale`` [T, heads] replaces 1/rms(x) (key scales computed over the whole key)."""
        if scale is None:
            scale = torch.rsqrt(x.float().pow(2).mean(-1) + self.eps)
        return (gain.float() * (x.float() * scale[..., None])).to(x.dtype)

    def _new_rope_keys(self, c: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw rope keys [T, R_H, R_D] -> normed (not yet rotated) and, for key-scale layers, the
        key scales [T, G] (latentkv.modeling.LatentAttention._new_rope_keys)."""
        if not self.qk_norm:
            return k_rope, None
        gain = self.k_norm.weight  # [G, d_h] (all heads: R_H = G in partial mode)
        if not self.key_scale:  # all pairs kept: the rope key is the whole key
            return self._norm(k_rope, gain), None
        w_uk, b_k = self._w(self.k_b_proj, self.d_n)
        k_nope = torch.einsum("tgr,gdr->tgd", self._chunks(c.float(), self.k_slice), w_uk)
        if b_k is not None:
            k_nope = k_nope + b_k
        scale = torch.rsqrt(torch.cat((k_nope, k_rope.float()), dim=-1).pow(2).mean(-1) + self.eps)  # [T, G]
        return self._norm(k_rope, gain[:, self.d_n:], scale), scale

    # -- the math (pure torch, fp32) ----------------------------------------------------------
    def _attend(self, q_nope, q_rope, lat, rope_k, absorb: bool, key_scale: torch.Tensor | None = None) -> torch.Tensor:
        """One request: q [L, H_l, .] (its last L of S positions), cache rows lat [S, W], rope_k [S, R_H, R_D],
        key scales [S, G] (key-scale layers)."""
        if not absorb:
            return self._attend_expanded(q_nope, q_rope, lat, rope_k, key_scale)
        L, S = q_nope.shape[0], lat.shape[0]
        heads = self.kv_of_head
        scores = q_nope.new_zeros(self.H_l, L, S)
        if self.d_n and not self.full:
            c_k = self._chunks(lat, self.k_slice)  # [S, G_l, r_k']
            w_uk, b_k = self._w(self.k_b_proj, self.d_n)
            if self.key_scale:  # NoPE gains go to the query, the key's scale to its score
                q_nope = q_nope * self.k_norm.weight[heads, : self.d_n].float()
            q_lat = torch.einsum("lhd,hdr->lhr", q_nope, w_uk[heads])  # q~ = W_uk^T q_nope
            nope = torch.einsum("lhr,shr->hls", q_lat, c_k[:, heads])
            if self.key_scale:
                if b_k is not None:  # q . b_k is scaled per key: no longer a softmax shift
                    nope = nope + torch.einsum("lhd,hd->hl", q_nope, b_k[heads])[..., None]
                nope = nope * key_scale[:, heads].T[:, None, :]
            scores += nope
        elif self.d_n:  # full RoPE: keys rebuilt and rotated, values still absorbed
            scores += torch.einsum("lhd,shd->hls", q_nope, self._nope_keys(lat, key_scale)[:, heads])
        if self.R_H:
            scores += torch.einsum("lhd,shd->hls", q_rope, rope_k[:, self.slot_of_head])
        q_pos = torch.arange(S - L, S, device=lat.device)[:, None]
        allowed = torch.arange(S, device=lat.device)[None, :] <= q_pos  # [L, S] causal
        probs = (scores * self.scale).masked_fill(~allowed, float("-inf")).softmax(-1)
        c_v = self._chunks(lat, self.v_slice)  # [S, G_l, r_v']
        w_uv, b_v = self._w(self.v_b_proj, self.d_h)
        o_lat = torch.einsum("hls,shr->lhr", probs, c_v[:, heads])  # sum_t p_t c_t
        o = torch.einsum("lhr,hdr->lhd", o_lat, w_uv[heads])  # W_uv after attention
        if b_v is not None:
            o = o + b_v[heads]
        return o

    def _attend_expanded(self, q_nope, q_rope, lat, rope_k, key_scale) -> torch.Tensor:
        """Prefill: per-KV-head keys [k_nope | k_rope[slot]] and values rebuilt from the cache rows,
        then one SDPA call (GQA, causal with the queries at the last L of S positions). On a GPU it
        runs a fused kernel: no [H, L, S] score tensor, which at 32K contexts would not fit."""
        L, S = q_nope.shape[0], lat.shape[0]
        q, k = q_nope, self._nope_keys(lat, key_scale) if self.d_n else lat.new_zeros(S, self.G_l, 0)
        if self.R_H:
            q = torch.cat((q, q_rope), dim=-1)
            group_slots = self.slot_of_head[:: self.H_l // self.G_l]  # one rope key head per KV group
            k = torch.cat((k, rope_k[:, group_slots].to(k.dtype)), dim=-1)
        w_uv, b_v = self._w(self.v_b_proj, self.d_h)
        v = torch.einsum("sgr,gdr->sgd", self._chunks(lat, self.v_slice), w_uv)
        if b_v is not None:
            v = v + b_v
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=causal_lower_right(L, S), scale=self.scale, enable_gqa=True,
        )
        return o[0].transpose(0, 1)

    def _nope_keys(self, lat: torch.Tensor, key_scale: torch.Tensor | None) -> torch.Tensor:
        """NoPE keys of this rank's KV heads rebuilt from cache rows lat [S, W]: W_uk[g] c_k,t[chunk(g)] + b_k,
        normed (q/k-norm sources) and, for full RoPE, rotated at their positions 0..S-1 -> [S, G_l, d_n]."""
        w_uk, b_k = self._w(self.k_b_proj, self.d_n)
        k = torch.einsum("sgr,gdr->sgd", self._chunks(lat, self.k_slice), w_uk)
        if b_k is not None:
            k = k + b_k
        if self.key_scale:
            k = self._norm(k, self.k_norm.weight[:, : self.d_n], key_scale)
        elif self.qk_norm:  # full: the whole key is rebuilt, normed per KV head
            k = self._norm(k, self.k_norm.weight)
        if self.full:
            k = rope(k, torch.arange(lat.shape[0], device=k.device), self.source_freqs)
        return k

    # -- decode on the Triton kernels ---------------------------------------------------------
    def _kernel_decode_ok(self, device: torch.device) -> bool:
        if self.full:
            # full_rope_decode_attention: keys W_uk[g] c_k (+ b_k, normed) rebuilt and rotated in the kernel.
            return self.key_groups_used is not None and triton_usable(device)
        # latent_decode_attention: one k range over the whole latent, rope slots of this rank's heads.
        return not self.key_scale and self.d_n > 0 and self.rope_slots is not None and triton_usable(device)

    def _kernel_decode(self, q_nope, q_rope, meta: LatentKVMetadata) -> torch.Tensor:
        if self.full:
            return self._kernel_decode_full(q_nope, meta)
        B = q_nope.shape[0]
        heads = self.kv_of_head
        w_uk, _ = self._w(self.k_b_proj, self.d_n)
        q_lat = torch.einsum("bhd,hdr->bhr", q_nope, w_uk[heads])  # [B, H, r_k']
        lat = self.layer.latent
        if self.n_grp > 1:  # zero outside each head's chunk: one pass serves all groups
            full = q_lat.new_zeros(B, self.H_l, self.n_grp, self.r_k)
            full[:, torch.arange(self.H_l), self.chunk_of_head] = q_lat
            q_lat = full.flatten(2)
        o_lat = self.impl.decode(
            q_lat, q_rope, self.kv_cache, meta, self.scale,
            k_range=(self.k_slice.start, lat.k_rank), v_range=(self.v_slice.start, lat.v_rank),
            rope_slots=self.rope_slots,
        )  # [B, H, r_v]
        return self._values_from_latent(o_lat)

    def _kernel_decode_full(self, q, meta: LatentKVMetadata) -> torch.Tensor:
        """Full RoPE: q [B, H_l, d_h] rotated -> o [B, H_l, d_h] (Palu-style online key rebuild)."""
        w_uk, b_k = self._w(self.k_b_proj, self.d_n)  # [G_l, d_h, r_k / n_grp], [G_l, d_h]
        if self._inv_freq is None or self._inv_freq.device != q.device:
            self._inv_freq = self.source_freqs.float().to(q.device)
        lat = self.layer.latent
        o_lat = self.impl.decode_full(
            q, w_uk, self._inv_freq, self.kv_cache, meta, self.scale, key_groups=self.n_grp,
            key_groups_used=self.key_groups_used, v_range=(self.v_slice.start, lat.v_rank), b_k=b_k,
            k_gain=self.k_norm.weight if self.qk_norm else None, norm_eps=self.eps,
        )
        return self._values_from_latent(o_lat)  # [B, H_l, v_rank] (all groups)

    def _values_from_latent(self, o_lat: torch.Tensor) -> torch.Tensor:
        """Softmax-weighted value latents [B, H_l, r_v (x n_grp)] -> o = W_uv o_lat + b_v per head."""
        B, heads = o_lat.shape[0], self.kv_of_head
        if self.n_grp > 1:
            o_lat = o_lat.view(B, self.H_l, self.n_grp, self.r_v)[:, torch.arange(self.H_l), self.chunk_of_head]
        w_uv, b_v = self._w(self.v_b_proj, self.d_h)
        o = torch.einsum("bhr,hdr->bhd", o_lat.float(), w_uv[heads])
        if b_v is not None:
            o = o + b_v[heads]
        return o


def _contiguous_share(index_of_head: list[int]) -> tuple[int, int] | None:
    """(first, count) if head i reads index first + i // (heads / count), the form the kernels take."""
    first, count = index_of_head[0], len(set(index_of_head))
    heads = len(index_of_head)
    if heads % count or index_of_head != [first + i // (heads // count) for i in range(heads)]:
        return None
    return first, count


class _Gains(nn.Module):
    """Per-KV-head RMSNorm gains ``weight`` [n, d_h]: rows [first, first + n) of the checkpoint's [G, d_h]."""

    def __init__(self, G: int, d_h: int, first: int, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, d_h), requires_grad=False)

        def load(param: nn.Parameter, loaded: torch.Tensor) -> None:
            if tuple(loaded.shape) != (G, d_h):
                raise ValueError(f"q/k norm gains have shape {tuple(loaded.shape)}, expected {(G, d_h)}")
            param.data.copy_(loaded[first : first + n])

        self.weight.weight_loader = load
