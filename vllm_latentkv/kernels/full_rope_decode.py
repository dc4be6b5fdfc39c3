"""Decode for "full RoPE" latent layers (LoRC / Palu style): keys rebuilt from the latent.

Every key dimension is rotated, so W_uk cannot be absorbed into the query; instead each page's
keys are rebuilt inside the kernel from the cached key latent and rotated there (Palu, Chang et
al. 2024, Sec. 3.3 "online reconstruction with fused RoPE"). Values stay absorbed: the kernel
returns softmax-weighted value latents and the caller applies W_uv.

Symbols
    B, H, G, D_H   sequences, query heads, KV heads, head dim (even); query head h -> KV head h // (H/G)
    G_L, r         key-latent groups (Palu's grouped-head low rank; G_L = 1: one joint key
                   latent, G_L = G: per-head) and their width r = K_LEN / G_L;
                   KV head g reads group g // (G / G_L). With key_groups_used = (first, n) the
                   call's KV heads read groups first .. first + n - 1 only, head g group
                   first + g // (G / n): a tensor-parallel rank's KV heads read their groups
    K_LEN, V_LEN   key- and value-latent widths; cache row = [c_k (K_LEN) | c_v (V_LEN)] (split
                   latent), or one joint latent read as both (v_range = (0, K_LEN))
    W_uk           [G, D_H, r]; inv_freq [D_H / 2]; HF half-split rotary layout: dims i and
                   i + D_H/2 form pair i, angle(t, i) = t * inv_freq[i] (t = token index = position)

    k[t,g]   = RoPE_t(norm_g(W_uk[g] @ c_k[t, group(g)] + b_k[g]))  (Palu eq. 4, LoRC eq. 3; the key
               bias b_k of Qwen2-style sources and the per-KV-head RMSNorm norm_g(x) =
               gain_g * x / rms(x) of q/k-norm sources (Qwen3) are optional)
    s[b,h,t] = scale * q[b,h] . k[t, g(h)]                          (q already rotated)
    out[b,h] = sum_t softmax_t(s[b,h,:]) c_v[t];  lse[b,h] = log sum_t exp(s[b,h,t])

Grid (B, G * cdiv(H/G, BLOCK_H), NUM_KV_SPLITS): one program rebuilds the keys of one KV head
for a tile of BLOCK_N tokens (two [BLOCK_N, r] x [r, D_H/2] dots, one per rotary half, so the
rotation is elementwise on the two halves) and scores all query heads of that KV head against
them. Stage 2 is the split merge shared with `latent_decode` (`_split_kv`). The cache may be
plain float or the INT4 layout of `latentkv.int4` with no rope part (rope_dim = 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (
    FLOAT_DTYPES,
    check_blocks,
    check_device,
    check_int4_cache,
    check_paged,
    check_tensor,
    dot_dtype,
    pow2_at_least,
)
from ._split_kv import (
    launch_split_kv,
    load_latent_cols,
    online_softmax_init,
    online_softmax_step,
    split_bounds,
    store_split_partial,
    tile_tokens,
)
from latentkv import attention as attn
from latentkv.int4 import int4_row_offsets, int4_unpack_rows


@triton.jit
def _cos_sin(angle):
    """cos and sin of fp32 angles; reduced to [-pi, pi] first (Cody-Waite, 2 pi = C1 + C2 with
    C1 exact in 8 bits) so that GPU approximate sin/cos stay accurate at long positions."""
    C1: tl.constexpr = 6.28125
    C2: tl.constexpr = 1.9353071795864769e-03  # 2 pi - C1
    k = tl.floor(angle * 0.15915494309189535 + 0.5)  # nearest multiple of 2 pi
    r = (angle - k * C1) - k * C2
    return tl.cos(r), tl.sin(r)


@triton.jit
def _full_rope_decode_stage1_kernel(
    q_ptr,
    cache_ptr,  # latent rows (plain: the cache; INT4: uint8 bytes)
    scale_cache_ptr,  # INT4: fp16 view of the cache (scales); plain: the cache (unused)
    w_uk_ptr,
    b_k_ptr,  # [G, D_H] key bias (read if HAS_KEY_BIAS)
    k_gain_ptr,  # [G, D_H] key RMSNorm gain (read if KEY_NORM)
    inv_freq_ptr,
    block_table_ptr,
    seq_lens_ptr,
    part_acc_ptr,  # [B, H, S, V_LEN] fp32
    part_lse_ptr,  # [B, H, S] fp32
    sm_scale,
    stride_q_b,
    stride_q_h,
    stride_c_blk,
    stride_c_tok,
    stride_sc_blk,
    stride_sc_tok,
    stride_w_g,
    stride_w_d,
    stride_bk_g,
    stride_kg_g,
    norm_eps,
    stride_bt_b,
    stride_pa_b,
    stride_pa_h,
    stride_pa_s,
    stride_pl_b,
    stride_pl_h,
    HEADS_PER_KV: tl.constexpr,  # H // G
    HEAD_BLOCKS_PER_KV: tl.constexpr,  # cdiv(H // G, BLOCK_H)
    KV_PER_KEY_GROUP: tl.constexpr,  # G // (key groups used)
    FIRST_KEY_GROUP: tl.constexpr,  # first key group used (0 unless a TP rank's share)
    GROUP_RANK: tl.constexpr,  # r = K_LEN // G_L
    V_START: tl.constexpr,  # K_LEN (split latent) or 0 (joint)
    V_LEN: tl.constexpr,
    HAS_KEY_BIAS: tl.constexpr,
    KEY_NORM: tl.constexpr,
    HALF_DIM: tl.constexpr,  # D_H // 2
    PAGE_SIZE: tl.constexpr,
    INT4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SCALE_OFF: tl.constexpr,
    NUM_KV_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KR: tl.constexpr,
    BLOCK_HD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1) // HEAD_BLOCKS_PER_KV
    head_block = tl.program_id(1) % HEAD_BLOCKS_PER_KV
    split = tl.program_id(2)
    LOG2E: tl.constexpr = 1.4426950408889634

    offs_hh = head_block * BLOCK_H + tl.arange(0, BLOCK_H)  # head index within the KV group
    mask_h = offs_hh < HEADS_PER_KV
    offs_h = kv_head * HEADS_PER_KV + offs_hh
    offs_r = tl.arange(0, BLOCK_KR)
    mask_r = offs_r < GROUP_RANK
    offs_d = tl.arange(0, BLOCK_HD)
    mask_d = offs_d < HALF_DIM
    offs_v = tl.arange(0, BLOCK_V)
    mask_v = offs_v < V_LEN
    key_cols = (FIRST_KEY_GROUP + kv_head // KV_PER_KEY_GROUP) * GROUP_RANK + offs_r  # this head's key-latent group

    # W_uk[g] split into the two rotary halves, as [r, D_H/2] for tile @ W^T
    w_base = w_uk_ptr + kv_head * stride_w_g + offs_r[:, None] + offs_d[None, :] * stride_w_d
    w_mask = mask_r[:, None] & mask_d[None, :]
    w1 = tl.load(w_base, mask=w_mask, other=0.0).to(DOT_DTYPE)  # rows i < D_H/2
    w2 = tl.load(w_base + HALF_DIM * stride_w_d, mask=w_mask, other=0.0).to(DOT_DTYPE)  # rows i + D_H/2
    q_base = q_ptr + b * stride_q_b + offs_h[:, None] * stride_q_h + offs_d[None, :]
    q_mask = mask_h[:, None] & mask_d[None, :]
    q1 = tl.load(q_base, mask=q_mask, other=0.0).to(DOT_DTYPE)  # [BLOCK_H, BLOCK_HD]
    q2 = tl.load(q_base + HALF_DIM, mask=q_mask, other=0.0).to(DOT_DTYPE)
    inv_freq = tl.load(inv_freq_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_KEY_BIAS:
        b1 = tl.load(b_k_ptr + kv_head * stride_bk_g + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        b2 = tl.load(b_k_ptr + kv_head * stride_bk_g + HALF_DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if KEY_NORM:
        g1 = tl.load(k_gain_ptr + kv_head * stride_kg_g + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        g2 = tl.load(k_gain_ptr + kv_head * stride_kg_g + HALF_DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    start, end = split_bounds(seq_lens_ptr, b, split, NUM_KV_SPLITS, BLOCK_N)

    qk_scale = sm_scale * LOG2E
    acc, e_max, e_sum = online_softmax_init(BLOCK_H, BLOCK_V)

    for n0 in tl.range(start, end, BLOCK_N):
        offs_n, mask_n, page, pos = tile_tokens(block_table_ptr + b * stride_bt_b, n0, end, BLOCK_N, PAGE_SIZE)
        row = page * stride_c_blk + pos * stride_c_tok
        srow = page * stride_sc_blk + pos * stride_sc_tok

        c_k = load_latent_cols(
            cache_ptr, scale_cache_ptr, row, srow, key_cols,
            mask_n[:, None] & mask_r[None, :], INT4, GROUP_SIZE, SCALE_OFF, DOT_DTYPE,
        )  # [BLOCK_N, BLOCK_KR]
        k1 = tl.dot(c_k, w1, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_HD] fp32
        k2 = tl.dot(c_k, w2, input_precision=DOT_PRECISION)
        if HAS_KEY_BIAS:
            k1 += b1[None, :]
            k2 += b2[None, :]
        if KEY_NORM:  # masked dims are 0 in both halves, so the sums run over D_H values
            inv_rms = tl.rsqrt((tl.sum(k1 * k1, axis=1) + tl.sum(k2 * k2, axis=1)) / (2 * HALF_DIM) + norm_eps)
            k1 = k1 * inv_rms[:, None] * g1[None, :]
            k2 = k2 * inv_rms[:, None] * g2[None, :]
        cos, sin = _cos_sin(offs_n.to(tl.float32)[:, None] * inv_freq[None, :])  # angle = t * inv_freq
        k1r = k1 * cos - k2 * sin  # RoPE, first half:  x1 cos - x2 sin
        k2r = k2 * cos + k1 * sin  # second half:         x2 cos + x1 sin
        qk = tl.dot(q1, tl.trans(k1r.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
        qk += tl.dot(q2, tl.trans(k2r.to(DOT_DTYPE)), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))  # log2 units
        v = load_latent_cols(
            cache_ptr, scale_cache_ptr, row, srow, V_START + offs_v,
            mask_n[:, None] & mask_v[None, :], INT4, GROUP_SIZE, SCALE_OFF, DOT_DTYPE,
        )  # [BLOCK_N, BLOCK_V]
        acc, e_max, e_sum = online_softmax_step(qk, v, acc, e_max, e_sum, DOT_DTYPE, DOT_PRECISION)

    store_split_partial(
        part_acc_ptr + b * stride_pa_b + split * stride_pa_s, part_lse_ptr + b * stride_pl_b + split,
        stride_pa_h, stride_pl_h, offs_h, mask_h, offs_v, mask_v, acc, e_max, e_sum,
    )


def _check_full_rope_inputs(q, w_uk, inv_freq, block_table, seq_lens, latent_dim, key_groups,
                            key_groups_used, v_range, b_k, k_gain) -> tuple[int, int, int, tuple[int, int]]:
    """Shapes of a full-RoPE decode; returns K_LEN (the key-latent part of a cache row), the
    (first, count) key groups the call's KV heads read and the value range (start, length)."""
    check_tensor("q", q, 3, FLOAT_DTYPES)
    check_tensor("w_uk", w_uk, 3, FLOAT_DTYPES)
    check_tensor("inv_freq", inv_freq, 1, FLOAT_DTYPES)
    bsz, num_heads, head_dim = q.shape
    check_paged(block_table, seq_lens, bsz)
    num_kv_heads, w_head_dim, rank = w_uk.shape
    if head_dim % 2 or w_head_dim != head_dim:
        raise ValueError(f"q head dim ({head_dim}) must be even and equal w_uk.shape[1] ({w_head_dim})")
    if inv_freq.shape[0] != head_dim // 2:
        raise ValueError(f"inv_freq must have D_H/2 = {head_dim // 2} entries, got {inv_freq.shape[0]}")
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of w_uk's KV heads ({num_kv_heads})")
    first, count = (0, key_groups) if key_groups_used is None else key_groups_used
    if key_groups < 1 or first < 0 or count < 1 or first + count > key_groups:
        raise ValueError(f"key_groups_used={(first, count)} must lie inside the row's {key_groups} key groups")
    if num_kv_heads % count:
        raise ValueError(f"key_groups ({count} used) must divide the KV heads ({num_kv_heads})")
    k_len = key_groups * rank
    v_start, v_len = (k_len, latent_dim - k_len) if v_range is None else v_range
    if k_len > latent_dim or v_start < 0 or v_len <= 0 or v_start + v_len > latent_dim:
        raise ValueError(f"latent row ({latent_dim}) must hold K_LEN = {key_groups} x {rank} and the value range "
                         f"v_range={(v_start, v_len)} (default: the rest of the row after the key latent)")
    for name, t in (("b_k", b_k), ("k_gain", k_gain)):
        if t is not None and tuple(t.shape) != (num_kv_heads, head_dim):
            raise ValueError(f"{name} must be [G, D_H] = {(num_kv_heads, head_dim)}, got {tuple(t.shape)}")
    return k_len, first, count, (v_start, v_len)


def _launch_full_rope(
    q, cache, scale_cache, w_uk, inv_freq, block_table, seq_lens, scale, *, latent_dim, key_groups,
    key_groups_used, v_range, b_k, k_gain, norm_eps, int4, group_size, scale_off, num_kv_splits, block_n,
    block_h, out_dtype, latent_dtype,
):
    _, first_group, groups_used, (v_start, v_len) = _check_full_rope_inputs(
        q, w_uk, inv_freq, block_table, seq_lens, latent_dim, key_groups, key_groups_used, v_range, b_k, k_gain)
    check_blocks(num_kv_splits, block_n, block_h)
    dev = check_device(_full_rope_decode_stage1_kernel, q, cache, w_uk, inv_freq, block_table, seq_lens)
    bsz, num_heads, head_dim = q.shape
    num_kv_heads, _, rank = w_uk.shape
    heads_per_kv = num_heads // num_kv_heads
    block_h = block_h or min(16, pow2_at_least(heads_per_kv))
    head_blocks = triton.cdiv(heads_per_kv, block_h)
    b_k_arg = b_k.float().contiguous() if b_k is not None else w_uk  # unread placeholders when absent
    k_gain_arg = k_gain.float().contiguous() if k_gain is not None else w_uk
    return launch_split_kv(
        _full_rope_decode_stage1_kernel,
        num_kv_heads * head_blocks,
        (q, cache, scale_cache, w_uk, b_k_arg, k_gain_arg, inv_freq, block_table, seq_lens),
        scale,
        (
            q.stride(0),
            q.stride(1),
            cache.stride(0),
            cache.stride(1),
            scale_cache.stride(0),
            scale_cache.stride(1),
            w_uk.stride(0),
            w_uk.stride(1),
            b_k_arg.stride(0),
            k_gain_arg.stride(0),
            float(norm_eps),
            block_table.stride(0),
        ),
        bsz=bsz,
        num_heads=num_heads,
        v_len=v_len,
        num_kv_splits=num_kv_splits,
        out_dtype=out_dtype,
        device=dev,
        HEADS_PER_KV=heads_per_kv,
        HEAD_BLOCKS_PER_KV=head_blocks,
        KV_PER_KEY_GROUP=num_kv_heads // groups_used,
        FIRST_KEY_GROUP=first_group,
        GROUP_RANK=rank,
        V_START=v_start,
        V_LEN=v_len,
        HAS_KEY_BIAS=b_k is not None,
        KEY_NORM=k_gain is not None,
        HALF_DIM=head_dim // 2,
        PAGE_SIZE=cache.shape[1],
        INT4=int4,
        GROUP_SIZE=group_size,
        SCALE_OFF=scale_off,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_KR=pow2_at_least(rank),
        BLOCK_HD=pow2_at_least(head_dim // 2),
        BLOCK_V=pow2_at_least(v_len),
        DOT_DTYPE=dot_dtype(_full_rope_decode_stage1_kernel, q.dtype, latent_dtype, w_uk.dtype),
    )


def full_rope_decode_attention(
    q: torch.Tensor,  # [B, H, D_H] rotated
    kv_cache: torch.Tensor,  # [num_blocks, block_size, K_LEN + V_LEN] = [c_k | c_v]
    w_uk: torch.Tensor,  # [G, D_H, K_LEN / G_L]
    inv_freq: torch.Tensor,  # [D_H / 2] fp32
    block_table: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    *,
    key_groups: int = 1,  # G_L of the cache row
    key_groups_used: tuple[int, int] | None = None,  # (first, count) the KV heads of w_uk read; None = all
    v_range: tuple[int, int] | None = None,  # (start, length) of the value latent; None = after the key latent
    b_k: torch.Tensor | None = None,  # [G, D_H] key bias
    k_gain: torch.Tensor | None = None,  # [G, D_H] key RMSNorm gain (q/k-norm sources)
    norm_eps: float = 1e-6,
    num_kv_splits: int = 8,
    block_n: int = 32,
    block_h: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-RoPE latent decode (keys rebuilt from c_k with RoPE fused) over the plain cache.
    Returns (out [B, H, V_LEN] (softmax-weighted value latents), lse [B, H] fp32)."""
    check_tensor("kv_cache", kv_cache, 3, FLOAT_DTYPES)
    return _launch_full_rope(
        q, kv_cache, kv_cache, w_uk, inv_freq, block_table, seq_lens, scale,
        latent_dim=kv_cache.shape[2], key_groups=key_groups, key_groups_used=key_groups_used, v_range=v_range,
        b_k=b_k, k_gain=k_gain, norm_eps=norm_eps, int4=False, group_size=1, scale_off=0,
        num_kv_splits=num_kv_splits, block_n=block_n, block_h=block_h,
        out_dtype=out_dtype or q.dtype, latent_dtype=kv_cache.dtype,
    )


def full_rope_decode_attention_int4(
    q: torch.Tensor,  # [B, H, D_H] rotated
    kv_cache: torch.Tensor,  # uint8 [num_blocks, block_size, int4_row_bytes(K_LEN + V_LEN, 0, G)]
    w_uk: torch.Tensor,  # [G, D_H, K_LEN / G_L]
    inv_freq: torch.Tensor,  # [D_H / 2]
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    latent_dim: int,  # K_LEN + V_LEN
    group_size: int,
    key_groups: int = 1,
    key_groups_used: tuple[int, int] | None = None,
    v_range: tuple[int, int] | None = None,
    b_k: torch.Tensor | None = None,
    k_gain: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    num_kv_splits: int = 8,
    block_n: int = 32,
    block_h: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """full_rope_decode_attention over the INT4 cache (`latentkv.int4` layout with rope_dim = 0, as
    written by latent_cache_write_int4 with an empty rope tensor)."""
    check_int4_cache(kv_cache, latent_dim, 0, group_size)
    scale_off, _ = int4_row_offsets(latent_dim, group_size)
    return _launch_full_rope(
        q, kv_cache, kv_cache.view(torch.float16), w_uk, inv_freq, block_table, seq_lens, scale,
        latent_dim=latent_dim, key_groups=key_groups, key_groups_used=key_groups_used, v_range=v_range,
        b_k=b_k, k_gain=k_gain, norm_eps=norm_eps, int4=True, group_size=group_size,
        scale_off=scale_off, num_kv_splits=num_kv_splits, block_n=block_n, block_h=block_h,
        out_dtype=out_dtype or q.dtype, latent_dtype=q.dtype,
    )


# ----------------------------------------------------------------------------- reference


def rotate_half_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """HF Llama RoPE: x [n, ..., D] at positions [n] -> x cos + rotate_half(x) sin, with float32 angles
    as the kernel and transformers compute them (``latentkv.rope.rotate`` uses float64 angles, which
    differ by ~1e-4 at positions in the thousands)."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]  # [n, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    cos, sin = emb.cos().view(shape), emb.sin().view(shape)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def full_rope_decode_attention_ref(
    q, kv_cache, w_uk, inv_freq, block_table, seq_lens, scale, *, key_groups=1, key_groups_used=None,
    v_range=None, b_k=None, k_gain=None, norm_eps=1e-6, latent_dim=None, group_size=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch reference: rebuild every key, rotate, GQA attention over value latents.
    For an INT4 (uint8) cache pass latent_dim and group_size."""
    bsz, num_heads, head_dim = q.shape
    num_kv_heads, _, rank = w_uk.shape
    page = kv_cache.shape[1]
    if kv_cache.dtype == torch.uint8:
        lat_all, _ = int4_unpack_rows(kv_cache, latent_dim, 0, group_size)
    else:
        lat_all = kv_cache
    k_len = key_groups * rank
    v_start, v_len = (k_len, lat_all.shape[-1] - k_len) if v_range is None else v_range
    kv_of_head = torch.arange(num_heads) // (num_heads // num_kv_heads)
    first, count = (0, key_groups) if key_groups_used is None else key_groups_used
    group_of_kv = first + torch.arange(num_kv_heads) // (num_kv_heads // count)
    out = torch.zeros(bsz, num_heads, v_len)
    lse = torch.full((bsz, num_heads), float("-inf"))
    for b in range(bsz):
        n = int(seq_lens[b])
        if n == 0:
            continue
        t = torch.arange(n)
        lat = lat_all[block_table[b, t // page].long().cpu(), t % page].float().cpu()  # [n, W]
        c_k = lat[:, :k_len].view(n, key_groups, rank)[:, group_of_kv]  # [n, G, r]
        keys = attn.up_project(c_k, w_uk.cpu(), None if b_k is None else b_k.cpu())  # k = W_uk[g] c_k[t, group(g)] + b_k
        if k_gain is not None:
            keys = attn.rms_norm(keys, k_gain.float().cpu(), norm_eps)
        keys = rotate_half_rope(keys, t, inv_freq.cpu())  # [n, G, D_H]
        s = torch.einsum("hd,nhd->hn", q[b].float().cpu(), keys[:, kv_of_head]) * scale
        lse[b] = torch.logsumexp(s, dim=-1)
        out[b] = torch.softmax(s, dim=-1) @ lat[:, v_start : v_start + v_len]
    return out, lse
