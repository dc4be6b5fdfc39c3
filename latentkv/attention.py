"""The attention math of latent-KV layers, written once.

Every consumer calls these functions: the reference model (``latentkv.modeling``, tensors
[B, S, ...]), the vLLM torch path (``vllm_latentkv.attention.impl``, one request's [S, ...] with a
leading batch of 1) and the Triton kernels' references (``vllm_latentkv.kernels``). Shapes are
token-major with any leading dims: ``[..., S, heads, d]``. All math is float32 (RoPE angles
float64); callers cast to their cache or model dtype.

Symbols (``latentkv.format``): H query heads, G KV heads (both: of this tensor-parallel rank),
d_h head dim, d_n NoPE dims of a query head, R_H rope key heads of width R_D, n_grp latent groups,
W latent width, c the cached latent, chunk(g) the latent chunk KV head g reads, slot(h) the rope key
head query head h reads.

    queries        q_h = [q_nope | q_rope] = norm(q_proj(x)_h);  q_rope <- RoPE(q_rope)   (partial, shared)
                                                                  q_nope <- RoPE(q_nope)   (full)
    rope keys      k_rope = RoPE(norm(kv_a_proj(x)[W:]))                                 cached, rotated
    rebuilt keys   k_t,g = norm(W_uk[g] c_k,t[chunk(g)] + b_k)   (full: then RoPE at position t)
    values         v_t,g = W_uv[g] c_v,t[chunk(g)] + b_v
    expanded       o_h = sum_t softmax(scale ([q_nope | q_rope] . [k_t,g | k_rope_t,slot]))_t v_t,g   (prefill)
    absorbed       q~_h = W_uk[g]^T q_nope,h,  s_h,t = q~_h . c_k,t + q_rope,h . k_rope_t,slot(h),
                   o_h = W_uv[g] (sum_t softmax(scale s_h)_t c_v,t) + b_v     (MHA2MLA App. B; decode)

Full RoPE cannot absorb W_uk (RoPE sits between W_uk and the query): its keys are rebuilt, only the
values are absorbed. "norm" is the source's per-head RMSNorm (q/k-norm sources, Qwen3). With partial
RoPE and NoPE dims it spans the NoPE dims (rebuilt) and the rope dims (cached), so the cache keeps
one key scale s_t,g = 1/rms(raw key) per KV head and the NoPE score is s_t,g (gain q_nope) . (W_uk c_k + b_k).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latentkv import format as fmt
from latentkv.rope import rotate

# ---------------------------------------------------------------------------------------------
# Norms and attention primitives
# ---------------------------------------------------------------------------------------------


def inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / rms(x) over the last dim, in float32: x [..., d] -> [...]."""
    return torch.rsqrt(x.float().pow(2).mean(-1) + eps)


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float, scale: torch.Tensor | None = None) -> torch.Tensor:
    """gain * x / rms(x) over the last dim, Hugging Face's RMSNorm (normalised in float32, cast back,
    then the gain). ``gain`` broadcasts over x ([d] or [heads, d]); ``scale`` [...] replaces 1/rms(x)
    (key scales measured over the whole key)."""
    if scale is None:
        scale = inv_rms(x, eps)
    return gain * (x.float() * scale[..., None]).to(x.dtype)


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [..., 1, T, S] mask: the query at position p sees the keys at positions <= p."""
    mask = k_pos[..., None, None, :] <= q_pos[..., None, :, None]
    if key_padding is not None:
        mask = mask & key_padding[..., None, None, :].bool()
    return mask


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """softmax(scale q k^T) v with GQA: q [..., H, T, d], k [..., G, S, d], v [..., G, S, d_v] -> [..., H, T, d_v].

    ``mask``: boolean (True = visible), a ``torch.nn.attention.bias.CausalBias``, or None for plain
    causal attention over T == S tokens (the fused kernels' fast path). Rows that see no key give 0
    (left padding), as in :func:`softmax_attention`.
    """
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
    return torch.nan_to_num(o, nan=0.0) if isinstance(mask, torch.Tensor) else o


def softmax_attention(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """scores [..., H, T, S] (already scaled) -> probabilities in float32 (fully masked rows give 0)."""
    probs = torch.softmax(scores.float().masked_fill(~mask, float("-inf")), dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


# ---------------------------------------------------------------------------------------------
# One latent layer's geometry and weights
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentHeads:
    """Which latent chunk, KV head and rope key head each head of one layer reads (on one
    tensor-parallel rank: H = H / tp local query heads, G = G / tp local KV heads), with the RoPE
    frequency tables. Index maps are device tensors, built once."""

    d_h: int
    d_n: int  # NoPE dims per query head
    R_H: int  # rope key heads (all of them: the rope keys are replicated over ranks)
    R_D: int  # rope key head width
    n_grp: int
    k_slice: slice
    v_slice: slice
    rope_mode: str
    key_scale: bool  # the cache holds one 1/rms(key) per KV head (fmt.caches_key_scale)
    scale: float  # softmax scale
    eps: float  # q/k norm epsilon
    kv_of_head: torch.Tensor  # [H] local KV head of each local query head
    chunk_of_kv: torch.Tensor  # [G] latent chunk each local KV head reads
    slot_of_head: torch.Tensor  # [H] rope key head each local query head reads (empty without rope keys)
    slot_of_kv: torch.Tensor  # [G] rope key head of each local KV head's queries (expanded attention)
    key_rope_freqs: torch.Tensor  # [R_H, R_D / 2] frequencies of each rope key head's pairs
    query_rope_freqs: torch.Tensor  # [H, R_D / 2] the same, per query head (its slot's)
    source_freqs: torch.Tensor  # [d_h / 2] the source model's table (full RoPE rotates whole heads)

    @classmethod
    def of(cls, layer: fmt.LatentLayer, spec: fmt.LatentKVSpec, dims: fmt.ModelDims, eps: float,
           tp: int = 1, rank: int = 0) -> "LatentHeads":
        H, G = dims.num_attention_heads, dims.num_key_value_heads
        H_l, G_l = H // tp, G // tp
        lat, R_H = layer.latent, layer.num_rope_heads
        cpu = torch.device("cpu")  # explicit: transformers builds models under a meta-device context
        h_glob = torch.arange(H_l, device=cpu) + rank * H_l
        g_glob = torch.arange(G_l, device=cpu) + rank * G_l
        slot_of_head = h_glob // (H // R_H) if R_H else torch.zeros(0, dtype=torch.long, device=cpu)
        freqs = spec.rope_inv_freq
        key_rope_freqs = torch.tensor([[freqs[i] for i in p] for p in layer.rope_pairs], dtype=torch.float64, device=cpu)
        return cls(
            d_h=dims.head_dim, d_n=layer.qk_nope_head_dim, R_H=R_H, R_D=layer.rope_head_dim, n_grp=lat.groups,
            k_slice=lat.k_slice, v_slice=lat.v_slice, rope_mode=layer.rope_mode,
            key_scale=fmt.caches_key_scale(layer, spec), scale=layer.softmax_scale, eps=eps,
            kv_of_head=torch.arange(H_l, device=cpu) // (H_l // G_l),
            chunk_of_kv=g_glob // (G // lat.groups),
            slot_of_head=slot_of_head,
            slot_of_kv=slot_of_head[:: H_l // G_l] if R_H else slot_of_head,
            key_rope_freqs=key_rope_freqs.reshape(R_H, layer.rope_head_dim // 2),
            query_rope_freqs=key_rope_freqs[slot_of_head] if R_H else key_rope_freqs.reshape(0, 0),
            source_freqs=torch.tensor(freqs, dtype=torch.float64, device=cpu),
        )

    @property
    def full(self) -> bool:
        return self.rope_mode == "full"

    def to(self, device: torch.device | str) -> "LatentHeads":
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)


@dataclass(frozen=True)
class LatentWeights:
    """The up-projections and norm gains of one latent layer, per local KV head (any dtype: the
    functions compute in float32). The reference model builds it from its parameters at every step
    (views, differentiable); vLLM once after loading, in float32 on the device."""

    w_uk: torch.Tensor | None  # [G, d_n, r_k / n_grp] (W_uk)
    b_k: torch.Tensor | None  # [G, d_n]
    w_uv: torch.Tensor  # [G, d_h, r_v / n_grp] (W_uv)
    b_v: torch.Tensor | None  # [G, d_h]
    q_gain: torch.Tensor | None = None  # [G, d_h] query norm gains of the local KV heads' queries
    k_gain: torch.Tensor | None = None  # [G, d_h] key norm gains of the local KV heads (rebuilt keys)
    rope_k_gain: torch.Tensor | None = None  # [R_H, d_h] key norm gains of the rope key heads

    @classmethod
    def of(cls, G: int, d_n: int, d_h: int, k_b_proj, v_b_proj, q_gain=None, k_gain=None, rope_k_gain=None) -> "LatentWeights":
        """From the linear layers ``k_b_proj`` [G d_n, r'] / ``v_b_proj`` [G d_h, r'] (weight, bias)."""
        def per_head(proj, out):
            if proj is None:
                return None, None
            bias = getattr(proj, "bias", None)
            return proj.weight.view(G, out, -1), None if bias is None else bias.view(G, out)

        w_uk, b_k = per_head(k_b_proj, d_n)
        w_uv, b_v = per_head(v_b_proj, d_h)
        return cls(w_uk, b_k, w_uv, b_v, q_gain, k_gain, rope_k_gain)

    def prepared(self, device: torch.device | str) -> "LatentWeights":
        """Float32 copies on ``device`` (the run-time form: nothing is cast per step)."""
        moved = {f.name: None if getattr(self, f.name) is None else getattr(self, f.name).detach().float().to(device)
                 for f in dataclasses.fields(self)}
        return LatentWeights(**moved)


# ---------------------------------------------------------------------------------------------
# The layer's steps
# ---------------------------------------------------------------------------------------------


def latent_chunks(c: torch.Tensor, part: slice, heads: LatentHeads) -> torch.Tensor:
    """c [..., S, W] -> the chunk of that part each KV head reads [..., S, G, r / n_grp] (float32)."""
    return c[..., part].float().unflatten(-1, (heads.n_grp, -1)).index_select(-2, heads.chunk_of_kv)


def up_project(c_heads: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Per-KV-head up-projection: c_heads [..., S, G, r'], w [G, out, r'] -> [..., S, G, out] (+ b [G, out])."""
    y = torch.einsum("...gr,gor->...go", c_heads.float(), w.float())
    return y if b is None else y + b.float()


def queries(q: torch.Tensor, positions: torch.Tensor, heads: LatentHeads, w: LatentWeights):
    """q_proj output [..., T, H, d_n + R_D] -> (q_nope, q_rope), normed and rotated, float32."""
    q = q.float()
    if w.q_gain is not None:
        q = rms_norm(q, w.q_gain.float().index_select(0, heads.kv_of_head), heads.eps)
    q_nope, q_rope = q.split((heads.d_n, heads.R_D), dim=-1)
    if heads.R_H:
        q_rope = rotate(q_rope, positions, heads.query_rope_freqs)
    if heads.full:
        q_nope = rotate(q_nope, positions, heads.source_freqs)
    return q_nope, q_rope


def new_rope_keys(c: torch.Tensor, k_rope: torch.Tensor, positions: torch.Tensor, heads: LatentHeads, w: LatentWeights):
    """This step's raw rope keys [..., T, R_H, R_D] -> (normed and rotated keys to cache, float32;
    key scales [..., T, G] for key-scale layers, else None)."""
    k_rope, scale = k_rope.float(), None
    if w.rope_k_gain is not None:
        if heads.key_scale:  # 1/rms over the whole raw key [k_nope (rebuilt from c) | k_rope]
            k_nope = up_project(latent_chunks(c, heads.k_slice, heads), w.w_uk, w.b_k)
            scale = inv_rms(torch.cat((k_nope, k_rope), dim=-1), heads.eps)
            k_rope = rms_norm(k_rope, w.rope_k_gain[:, heads.d_n:].float(), heads.eps, scale)
        else:  # all pairs kept: the rope key is the whole key
            k_rope = rms_norm(k_rope, w.rope_k_gain.float(), heads.eps)
    return rotate(k_rope, positions, heads.key_rope_freqs), scale


def rebuilt_keys(latent: torch.Tensor, k_pos: torch.Tensor, key_scale: torch.Tensor | None,
                 heads: LatentHeads, w: LatentWeights) -> torch.Tensor:
    """NoPE keys of every cached token from its latent [..., S, W]: norm(W_uk[g] c_k[chunk(g)] + b_k),
    rotated at positions k_pos [..., S] in full mode -> [..., S, G, d_n] float32."""
    k = up_project(latent_chunks(latent, heads.k_slice, heads), w.w_uk, w.b_k)
    if heads.key_scale:
        k = rms_norm(k, w.k_gain[:, : heads.d_n].float(), heads.eps, key_scale.float())
    elif w.k_gain is not None:  # full: the whole key is rebuilt, normed per KV head
        k = rms_norm(k, w.k_gain.float(), heads.eps)
    if heads.full:
        k = rotate(k, k_pos, heads.source_freqs)
    return k


def values(latent: torch.Tensor, heads: LatentHeads, w: LatentWeights) -> torch.Tensor:
    """v_t,g = W_uv[g] c_v,t[chunk(g)] + b_v: latent [..., S, W] -> [..., S, G, d_h] float32."""
    return up_project(latent_chunks(latent, heads.v_slice, heads), w.w_uv, w.b_v)


def head_keys(latent, rope_k, key_scale, k_pos, heads: LatentHeads, w: LatentWeights) -> torch.Tensor:
    """The keys attention sees, per KV head: [rebuilt NoPE part | rope part] [..., S, G, d_n + R_D] float32."""
    parts = []
    if heads.d_n:
        parts.append(rebuilt_keys(latent, k_pos, key_scale, heads, w))
    if heads.R_H:
        parts.append(rope_k.float().index_select(-2, heads.slot_of_kv))
    return torch.cat(parts, dim=-1)


def token_filter_features(latent, rope_k, key_scale, k_pos, heads: LatentHeads, w: LatentWeights, kind: str):
    """Token Filtering's (key, value) features of cached tokens (``latentkv.token_filter``), per head:
    "latent": the cached latent's key and value parts per latent group [..., S, n_grp, r / n_grp];
    "heads": the keys and values attention sees, rebuilt per KV head [..., S, G, .]."""
    if kind == "latent":
        split = lambda part: latent[..., part].float().unflatten(-1, (heads.n_grp, -1))  # noqa: E731
        return split(heads.k_slice), split(heads.v_slice)
    return head_keys(latent, rope_k, key_scale, k_pos, heads, w), values(latent, heads, w)


def expanded_attention(q_nope, q_rope, latent, rope_k, key_scale, k_pos, mask, heads: LatentHeads, w: LatentWeights):
    """Prefill: keys and values rebuilt from the cache, then one GQA SDPA call -> o [..., T, H, d_h].

    s = q_nope . k_nope + q_rope . k_rope is one dot product of the concatenations, so this is plain
    attention over KV-head keys of width d_n + R_D (fused and differentiable; on a GPU no [H, T, S]
    score tensor). q [..., T, H, .], latent [..., S, W], rope_k [..., S, R_H, R_D], mask as in
    :func:`sdpa_attention`.
    """
    q = torch.cat([p for p, used in ((q_nope, heads.d_n), (q_rope, heads.R_H)) if used], dim=-1)
    k, v = head_keys(latent, rope_k, key_scale, k_pos, heads, w), values(latent, heads, w)
    o = sdpa_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2), mask, heads.scale)
    return o.transpose(-3, -2)


def absorbed_query(q_nope: torch.Tensor, heads: LatentHeads, w: LatentWeights) -> torch.Tensor:
    """q~_h = W_uk[g(h)]^T q_nope,h (MHA2MLA App. B): [..., T, H, d_n] -> [..., T, H, r_k / n_grp]."""
    return torch.einsum("...hd,hdr->...hr", q_nope, w.w_uk.float().index_select(0, heads.kv_of_head))


def absorbed_attention(q_nope, q_rope, latent, rope_k, key_scale, k_pos, mask, heads: LatentHeads, w: LatentWeights):
    """Decode: scores and the value sum in latent space -> o [..., T, H, d_h] float32.

    Arguments as in :func:`expanded_attention`; ``mask`` is boolean, broadcastable to [..., H, T, S].
    """
    kv = heads.kv_of_head
    scores = 0
    if heads.full:  # keys must be rebuilt: RoPE sits after W_uk
        k = rebuilt_keys(latent, k_pos, key_scale, heads, w).index_select(-2, kv)
        scores = torch.einsum("...thd,...shd->...hts", q_nope, k)
    elif heads.d_n:
        if heads.key_scale:  # the NoPE gains go to the query, each key's scale to its score
            q_nope = q_nope * w.k_gain[:, : heads.d_n].float().index_select(0, kv)
        c_k = latent_chunks(latent, heads.k_slice, heads).index_select(-2, kv)  # [..., S, H, r']
        scores = torch.einsum("...thr,...shr->...hts", absorbed_query(q_nope, heads, w), c_k)
        if heads.key_scale:
            if w.b_k is not None:  # q . b_k is scaled per key: no longer a softmax shift, kept
                bias = torch.einsum("...thd,hd->...ht", q_nope, w.b_k.float().index_select(0, kv))
                scores = scores + bias[..., None]
            scores = scores * key_scale.float().index_select(-1, kv).transpose(-1, -2)[..., None, :]
        # without key scales q . b_k is the same for every key: a softmax shift, dropped
    if heads.R_H:
        scores = scores + torch.einsum("...thd,...shd->...hts", q_rope, rope_k.float().index_select(-2, heads.slot_of_head))
    probs = softmax_attention(scores * heads.scale, mask)
    c_v = latent_chunks(latent, heads.v_slice, heads).index_select(-2, kv)
    return values_from_latent(torch.einsum("...hts,...shr->...thr", probs, c_v), heads, w)


def values_from_latent(o_lat: torch.Tensor, heads: LatentHeads, w: LatentWeights) -> torch.Tensor:
    """o_h = W_uv[g(h)] o_lat,h + b_v (exact because sum_t p_t = 1): [..., H, r_v / n_grp] -> [..., H, d_h]."""
    kv = heads.kv_of_head
    o = torch.einsum("...hr,hdr->...hd", o_lat.float(), w.w_uv.float().index_select(0, kv))
    return o if w.b_v is None else o + w.b_v.float().index_select(0, kv)


# ---------------------------------------------------------------------------------------------
# Per-head layers (``source`` and TransKV ``reduced_head``)
# ---------------------------------------------------------------------------------------------


def head_queries_keys(q, k, positions, source_freqs, eps: float, q_gain=None, k_gain=None, k_reduce=None):
    """q [..., T, H, d_h], k [..., T, G, d_h] -> normed (q/k-norm sources) and rotated, then for
    TransKV reduced per KV group: q' = P_K^T RoPE(q), k' = P_K^T RoPE(k) with k_reduce [G, d_h, r_k]."""
    if q_gain is not None:
        q, k = rms_norm(q, q_gain, eps), rms_norm(k, k_gain, eps)
    q, k = rotate(q, positions, source_freqs), rotate(k, positions, source_freqs)
    if k_reduce is not None:
        k = torch.einsum("...gd,gdr->...gr", k, k_reduce)
        q = torch.einsum("...hd,hdr->...hr", q, k_reduce.repeat_interleave(q.shape[-2] // k.shape[-2], dim=0))
    return q, k
