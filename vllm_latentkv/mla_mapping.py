"""A ``shared``-RoPE latent layer as DeepSeek MLA weights (vLLM's ``MultiHeadLatentAttentionWrapper``).

Pure torch; importing this module does not import vLLM.

A ``shared`` layer (R_H = 1) caches per token [c (W) | one rope key (R_D)], which is DeepSeek's
MLA cache row [kv_c (kv_lora_rank) | k_pe (qk_rope_head_dim)]. The weights map as

    ours (``latentkv.format``)                 vLLM MLA (q_lora_rank = None)
    q_proj     [H (d_h + R_D), D]              q_proj              qk_nope = d_h, qk_rope = R_D (same rows)
    kv_a_proj  [W + R_D, D]                    kv_a_proj_with_mqa  kv_lora_rank = W (same rows)
    (no latent norm)                           kv_a_layernorm      = identity (not an RMSNorm: that rescales)
    k_b_proj   [G d_h, r_k / n_grp]  \\
    v_b_proj   [G d_h, r_v / n_grp]  /         kv_b_proj [H (d_h + d_h), W]: per query head h,
                                                [W_uk[g(h)] ; W_uv[g(h)]] placed at the latent columns
                                                head g(h) reads (zero elsewhere), so GQA, split latents
                                                and Palu groups all become per-query-head MLA exactly
    o_proj     [D, H d_h]                      o_proj              v_head_dim = d_h
    softmax_scale                              scale
    rope pair j: rope_inv_freq[rope_pairs[0][j]], half-split    rotary_emb = :class:`PairRotaryEmbedding`

vLLM's MLA attention then computes, for query head h (``mla_attention.py``'s header):
prefill ``k_nope = kv_c W_UK``, ``v = kv_c W_UV``, ordinary attention over
[q_nope | RoPE(q_pe)] . [k_nope | RoPE(k_pe)]; decode ``ql_nope = q_nope W_UK^T``, MQA over the
cache rows, ``o = (sum_t p_t kv_c_t) W_UV`` -- the reference model's ``_expanded`` / ``_absorbed``
for a layer without biases or q/k norms.
"""

from __future__ import annotations

import torch
from torch import nn

from latentkv import format as fmt
from latentkv.rope import rotate

# MLACommonBackend.get_supported_head_sizes() of vLLM 0.32 (kv_lora_rank + qk_rope_head_dim).
MLA_HEAD_SIZES = (320, 512, 576)
# CPUMLABackend.get_supported_head_sizes(): vLLM's CPU decode kernel is built for DeepSeek's 512 + 64 only.
CPU_MLA_HEAD_SIZES = (576,)


def mla_unsupported_reason(layer: fmt.LayerSpec, spec: fmt.LatentKVSpec, dims: fmt.ModelDims,
                           *, head_sizes: tuple[int, ...] | None = MLA_HEAD_SIZES) -> str | None:
    """Why this layer cannot run as vLLM MLA (None: it can). ``head_sizes=None`` skips the size check."""
    if not isinstance(layer, fmt.LatentLayer):
        return f"layer kind {layer.kind!r} is not latent"
    if layer.rope_mode != "shared" or layer.num_rope_heads != 1:
        return f"rope_mode={layer.rope_mode!r} with {layer.num_rope_heads} rope heads (MLA needs shared, one rope head)"
    if layer.qk_nope_head_dim != dims.head_dim:
        return f"qk_nope_head_dim={layer.qk_nope_head_dim} != head_dim={dims.head_dim}"
    if spec.attention_bias:
        return "attention biases (vLLM's absorbed decode has no W_UV bias)"
    if spec.qk_norm:
        return "q/k norms"
    if spec.cache_dtype != "auto":
        return f"cache_dtype={spec.cache_dtype!r} (vLLM's MLA backends have no INT4 latent cache)"
    size = layer.latent.width + layer.rope_head_dim
    if head_sizes is not None and size not in head_sizes:
        return f"cache row of {size} values (latent {layer.latent.width} + rope {layer.rope_head_dim}) not in vLLM MLA's {head_sizes}"
    return None


def rope_inv_freq(layer: fmt.LatentLayer, spec: fmt.LatentKVSpec) -> torch.Tensor:
    """Inverse frequency of each pair of the one rope head, [R_D / 2] float64."""
    return torch.tensor([spec.rope_inv_freq[i] for i in layer.rope_pairs[0]], dtype=torch.float64)


def kv_b_weight(k_b: torch.Tensor, v_b: torch.Tensor, layer: fmt.LatentLayer, dims: fmt.ModelDims,
                heads: range | list[int] | None = None) -> torch.Tensor:
    """MLA ``kv_b_proj.weight`` [len(heads) (d_h + d_h), W] of the given query heads (default: all H).

    k_b [G d_h, r_k / n_grp], v_b [G d_h, r_v / n_grp] (our per-KV-head up-projections). Row block of
    head h: [W_uk[g(h)] ; W_uv[g(h)]] at the latent columns KV head g(h) reads, zero elsewhere.
    """
    H, G, d_h = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
    lat = layer.latent
    heads = range(H) if heads is None else heads
    r_k, r_v = lat.k_rank // lat.groups, lat.v_rank // lat.groups
    k_b, v_b = k_b.view(G, d_h, r_k), v_b.view(G, d_h, r_v)
    out = k_b.new_zeros(len(heads), 2 * d_h, lat.width)
    for i, h in enumerate(heads):
        g = h // (H // G)
        chunk = g // (G // lat.groups)
        k0 = lat.k_slice.start + chunk * r_k
        v0 = lat.v_slice.start + chunk * r_v
        out[i, :d_h, k0 : k0 + r_k] = k_b[g]
        out[i, d_h:, v0 : v0 + r_v] = v_b[g]
    return out.flatten(0, 1)


def mla_weights(tensors: dict[str, torch.Tensor], layer: fmt.LatentLayer, dims: fmt.ModelDims) -> dict[str, torch.Tensor]:
    """Our layer tensors (``q_proj``, ``kv_a_proj``, ``k_b_proj``, ``v_b_proj``, ``o_proj``; weights, no
    ``.weight`` suffix) -> vLLM MLA names (``q_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``)."""
    return {
        "q_proj": tensors["q_proj"],
        "kv_a_proj_with_mqa": tensors["kv_a_proj"],
        "kv_b_proj": kv_b_weight(tensors["k_b_proj"], tensors["v_b_proj"], layer, dims),
        "o_proj": tensors["o_proj"],
    }


class PairRotaryEmbedding(nn.Module):
    """``rotary_emb`` for vLLM's MLA wrapper: RoPE of the rope head with our per-pair frequency table.

    Called as ``q_pe, k_pe = rotary_emb(positions [T], q_pe [T, H, R_D], k_pe [T, 1, R_D])``;
    half-split (neox) layout, pair j turning by ``position * inv_freq[j]`` (float64 angles, as
    ``latentkv.rope.rotate``).
    """

    def __init__(self, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.to(torch.float64), persistent=False)

    def forward(self, positions: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = positions.flatten()[None]
        q = rotate(q_pe[None], pos, self.inv_freq)[0]
        k = rotate(k_pe[None], pos, self.inv_freq)[0]
        return q, k
