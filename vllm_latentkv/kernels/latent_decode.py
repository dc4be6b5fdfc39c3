"""Absorbed MLA decode over the paged latent cache (plain float or INT4), flash-decoding style.

Symbols
    B, H        sequences (one new query token each), query heads
    W           latent width; the key part is latent[K_START : K_START + K_LEN], the value part
                latent[V_START : V_START + V_LEN] (joint latent: both the whole latent)
    R_H, R_D    rope-key heads and their width; query head h uses rope slot h // (H // R_H)
                (R_H = 1: DeepSeek's shared rope head; R_H = KV heads: MHA2MLA). With
                rope_slots = (first, n) the heads use slots first .. first + n - 1 only, head h
                slot first + h // (H // n): a tensor-parallel rank's heads read its KV heads' slots
    P           page size; slot(b, t) = block_table[b, t // P] * P + t % P
    S           NUM_KV_SPLITS
Inputs  q_latent [B, H, K_LEN] (= q_nope @ W_uk^T), q_rope [B, H, R_D] (rotated)
Cache   plain [num_blocks, P, W + R_H * R_D] = [latent | rope]; INT4 layout in `latentkv.int4`.

    s[b,h,t] = scale * (q_latent[b,h] . latent_t[K] + q_rope[b,h] . rope_t[slot(h)])   (DeepSeek-V2 eq. 10, absorbed)
    out[b,h] = sum_t softmax_t(s[b,h,:]) latent_t[V];   lse[b,h] = log sum_t exp(s[b,h,t])

Stage 1, grid (B, cdiv(H, BLOCK_H), S): a program takes BLOCK_H heads of one sequence and one
split of its tokens, walking it BLOCK_N tokens at a time; each latent tile is loaded once and
used by all BLOCK_H heads (the latent is shared like MQA keys). The rope keys of all R_H slots
are loaded as one [BLOCK_N, R_H * R_D] tile and scored against a rope query that is zero
outside each head's slot, so heads of different rope slots still share the one pass over the
page. Output per split: normalised partial acc and its lse. Stage 2, grid (B, H): merge the
splits with their lse (`_split_kv`, shared with `full_rope_decode`).
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
from latentkv.int4 import int4_row_offsets, int4_unpack_rows


@triton.jit
def _latent_decode_stage1_kernel(
    q_lat_ptr,
    q_rope_ptr,
    cache_ptr,  # latent (plain: the cache; INT4: uint8 bytes)
    rope_cache_ptr,  # rope keys and INT4 scales (plain: the cache; INT4: fp16 view of it)
    block_table_ptr,
    seq_lens_ptr,
    part_acc_ptr,  # [B, H, S, V_LEN] fp32
    part_lse_ptr,  # [B, H, S] fp32, natural log
    sm_scale,
    stride_ql_b,
    stride_ql_h,
    stride_qr_b,
    stride_qr_h,
    stride_c_blk,
    stride_c_tok,
    stride_rc_blk,
    stride_rc_tok,
    stride_bt_b,
    stride_pa_b,
    stride_pa_h,
    stride_pa_s,
    stride_pl_b,
    stride_pl_h,
    NUM_HEADS: tl.constexpr,
    HEADS_PER_ROPE: tl.constexpr,  # H // R_H
    K_START: tl.constexpr,
    K_LEN: tl.constexpr,
    V_START: tl.constexpr,
    V_LEN: tl.constexpr,
    ROPE_HEAD_DIM: tl.constexpr,  # R_D
    ROPE_DIM: tl.constexpr,  # R_H * R_D
    ROPE_OFF: tl.constexpr,  # rope column in rope_cache_ptr units
    PAGE_SIZE: tl.constexpr,
    INT4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SCALE_OFF: tl.constexpr,
    SHARED_KV: tl.constexpr,  # K and V ranges identical: reuse the key tile as the value tile
    NUM_KV_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    LOG2E: tl.constexpr = 1.4426950408889634

    offs_h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < NUM_HEADS
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K_LEN
    offs_v = tl.arange(0, BLOCK_V)
    mask_v = offs_v < V_LEN
    offs_r = tl.arange(0, BLOCK_R)

    start, end = split_bounds(seq_lens_ptr, b, split, NUM_KV_SPLITS, BLOCK_N)

    q_lat = tl.load(
        q_lat_ptr + b * stride_ql_b + offs_h[:, None] * stride_ql_h + offs_k[None, :],
        mask=mask_h[:, None] & mask_k[None, :],
        other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_H, BLOCK_K]
    # rope query spread over all R_H slots, zero outside slot(h): q_pad[h, slot(h)*R_D + d] = q_rope[h, d]
    slot_h = offs_h // HEADS_PER_ROPE
    mask_qr = (
        mask_h[:, None]
        & (offs_r[None, :] < ROPE_DIM)
        & (offs_r[None, :] // ROPE_HEAD_DIM == slot_h[:, None])
    )
    q_rope = tl.load(
        q_rope_ptr + b * stride_qr_b + offs_h[:, None] * stride_qr_h
        + (offs_r[None, :] - slot_h[:, None] * ROPE_HEAD_DIM),
        mask=mask_qr,
        other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_H, BLOCK_R]

    qk_scale = sm_scale * LOG2E
    acc, e_max, e_sum = online_softmax_init(BLOCK_H, BLOCK_V)

    for n0 in tl.range(start, end, BLOCK_N):
        offs_n, mask_n, page, pos = tile_tokens(block_table_ptr + b * stride_bt_b, n0, end, BLOCK_N, PAGE_SIZE)
        row = page * stride_c_blk + pos * stride_c_tok
        rrow = page * stride_rc_blk + pos * stride_rc_tok

        k = load_latent_cols(
            cache_ptr, rope_cache_ptr, row, rrow, K_START + offs_k,
            mask_n[:, None] & mask_k[None, :], INT4, GROUP_SIZE, SCALE_OFF, DOT_DTYPE,
        )  # [BLOCK_N, BLOCK_K]
        qk = tl.dot(q_lat, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
        if ROPE_DIM > 0:
            kr = tl.load(
                rope_cache_ptr + rrow[:, None] + ROPE_OFF + offs_r[None, :],
                mask=mask_n[:, None] & (offs_r[None, :] < ROPE_DIM),
                other=0.0,
            ).to(DOT_DTYPE)  # [BLOCK_N, BLOCK_R]
            qk += tl.dot(q_rope, tl.trans(kr), input_precision=DOT_PRECISION)
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))  # log2 units
        if SHARED_KV:
            v = k
        else:
            v = load_latent_cols(
                cache_ptr, rope_cache_ptr, row, rrow, V_START + offs_v,
                mask_n[:, None] & mask_v[None, :], INT4, GROUP_SIZE, SCALE_OFF, DOT_DTYPE,
            )  # [BLOCK_N, BLOCK_V]
        acc, e_max, e_sum = online_softmax_step(qk, v, acc, e_max, e_sum, DOT_DTYPE, DOT_PRECISION)

    store_split_partial(
        part_acc_ptr + b * stride_pa_b + split * stride_pa_s, part_lse_ptr + b * stride_pl_b + split,
        stride_pa_h, stride_pl_h, offs_h, mask_h, offs_v, mask_v, acc, e_max, e_sum,
    )


def _resolve_ranges(k_range, v_range, latent_dim, k_len):
    k_range = (0, latent_dim) if k_range is None else tuple(k_range)
    v_range = (0, latent_dim) if v_range is None else tuple(v_range)
    for name, (start, length) in (("k_range", k_range), ("v_range", v_range)):
        if start < 0 or length <= 0 or start + length > latent_dim:
            raise ValueError(f"{name}={(start, length)} must lie inside the latent [0, {latent_dim})")
    if k_range[1] != k_len:
        raise ValueError(f"q_latent is {k_len} wide but k_range={k_range} has length {k_range[1]}")
    return k_range, v_range


def _check_decode_inputs(q_latent, q_rope, block_table, seq_lens, rope_heads, rope_slots) -> tuple[int, int]:
    """Shapes of an absorbed decode; returns the (first, count) rope slots the query heads use."""
    check_tensor("q_latent", q_latent, 3, FLOAT_DTYPES)
    check_tensor("q_rope", q_rope, 3, FLOAT_DTYPES)
    b, h, _ = q_latent.shape
    if q_rope.shape[:2] != (b, h):
        raise ValueError(f"q_rope {tuple(q_rope.shape)} must be [B, H, R_D] with B, H = {b}, {h}")
    check_paged(block_table, seq_lens, b)
    first, count = (0, rope_heads) if rope_slots is None else rope_slots
    if rope_heads < 1 or first < 0 or count < 1 or first + count > rope_heads:
        raise ValueError(f"rope_slots={(first, count)} must lie inside the row's {rope_heads} rope heads")
    if h % count:
        raise ValueError(f"rope_heads / rope_slots: the {count} rope slots used must divide the query heads ({h})")
    return first, count


def _launch_decode(
    q_latent, q_rope, cache, rope_cache, block_table, seq_lens, scale, *, latent_dim, k_range, v_range,
    rope_heads_used, rope_off, int4, group_size, scale_off, num_kv_splits, block_n, block_h, out_dtype,
    latent_dtype,
):
    bsz, num_heads, k_len = q_latent.shape
    rope_head_dim = q_rope.shape[2]
    (k_start, k_len), (v_start, v_len) = _resolve_ranges(k_range, v_range, latent_dim, k_len)
    check_blocks(num_kv_splits, block_n, block_h)
    dev = check_device(_latent_decode_stage1_kernel, q_latent, q_rope, cache, block_table, seq_lens)
    shared_kv = (k_start, k_len) == (v_start, v_len)
    block_h = block_h or min(16, pow2_at_least(num_heads))
    block_k = pow2_at_least(k_len)
    return launch_split_kv(
        _latent_decode_stage1_kernel,
        triton.cdiv(num_heads, block_h),
        (q_latent, q_rope, cache, rope_cache, block_table, seq_lens),
        scale,
        (
            q_latent.stride(0),
            q_latent.stride(1),
            q_rope.stride(0),
            q_rope.stride(1),
            cache.stride(0),
            cache.stride(1),
            rope_cache.stride(0),
            rope_cache.stride(1),
            block_table.stride(0),
        ),
        bsz=bsz,
        num_heads=num_heads,
        v_len=v_len,
        num_kv_splits=num_kv_splits,
        out_dtype=out_dtype,
        device=dev,
        NUM_HEADS=num_heads,
        HEADS_PER_ROPE=num_heads // rope_heads_used,  # the first slot used is folded into rope_off
        K_START=k_start,
        K_LEN=k_len,
        V_START=v_start,
        V_LEN=v_len,
        ROPE_HEAD_DIM=rope_head_dim,
        ROPE_DIM=rope_heads_used * rope_head_dim,
        ROPE_OFF=rope_off,
        PAGE_SIZE=cache.shape[1],
        INT4=int4,
        GROUP_SIZE=group_size,
        SCALE_OFF=scale_off,
        SHARED_KV=shared_kv,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_V=block_k if shared_kv else pow2_at_least(v_len),
        BLOCK_R=pow2_at_least(rope_heads_used * rope_head_dim),
        DOT_DTYPE=dot_dtype(_latent_decode_stage1_kernel, q_latent.dtype, latent_dtype),
    )


def latent_decode_attention(
    q_latent: torch.Tensor,  # [B, H, K_LEN]
    q_rope: torch.Tensor,  # [B, H, R_D]
    kv_cache: torch.Tensor,  # [num_blocks, block_size, W + R_H * R_D]
    block_table: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    *,
    rope_heads: int = 1,  # R_H of the cache row
    rope_slots: tuple[int, int] | None = None,  # (first, count) of the row's slots the heads use; None = all
    k_range: tuple[int, int] | None = None,  # (start, length) in the latent; None = whole latent
    v_range: tuple[int, int] | None = None,
    num_kv_splits: int = 8,
    block_n: int = 32,
    block_h: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode over the plain paged latent cache.

    Returns (out [B, H, V_LEN] in out_dtype (default q_latent.dtype), lse [B, H] fp32, natural
    log of the sum of exp(scaled scores); -inf for an empty sequence, whose out is 0).
    """
    first, count = _check_decode_inputs(q_latent, q_rope, block_table, seq_lens, rope_heads, rope_slots)
    check_tensor("kv_cache", kv_cache, 3, FLOAT_DTYPES)
    rope_dim = rope_heads * q_rope.shape[2]
    latent_dim = kv_cache.shape[2] - rope_dim
    if latent_dim <= 0:
        raise ValueError(f"kv_cache row ({kv_cache.shape[2]}) leaves no latent after {rope_dim} rope dims")
    return _launch_decode(
        q_latent, q_rope, kv_cache, kv_cache, block_table, seq_lens, scale,
        latent_dim=latent_dim, k_range=k_range, v_range=v_range, rope_heads_used=count,
        rope_off=latent_dim + first * q_rope.shape[2], int4=False, group_size=1, scale_off=0, num_kv_splits=num_kv_splits,
        block_n=block_n, block_h=block_h, out_dtype=out_dtype or q_latent.dtype,
        latent_dtype=kv_cache.dtype,
    )


def latent_decode_attention_int4(
    q_latent: torch.Tensor,  # [B, H, K_LEN]
    q_rope: torch.Tensor,  # [B, H, R_D]
    kv_cache: torch.Tensor,  # uint8 [num_blocks, block_size, int4_row_bytes(W, R_H * R_D, G)]
    block_table: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    *,
    latent_dim: int,
    group_size: int,
    rope_heads: int = 1,
    rope_slots: tuple[int, int] | None = None,
    k_range: tuple[int, int] | None = None,
    v_range: tuple[int, int] | None = None,
    num_kv_splits: int = 8,
    block_n: int = 32,
    block_h: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """latent_decode_attention over the INT4 cache (written by latent_cache_write_int4); the
    latent is dequantized inside the kernel. Same returns."""
    first, count = _check_decode_inputs(q_latent, q_rope, block_table, seq_lens, rope_heads, rope_slots)
    check_int4_cache(kv_cache, latent_dim, rope_heads * q_rope.shape[2], group_size)
    scale_off, rope_off = int4_row_offsets(latent_dim, group_size)
    return _launch_decode(
        q_latent, q_rope, kv_cache, kv_cache.view(torch.float16), block_table, seq_lens, scale,
        latent_dim=latent_dim, k_range=k_range, v_range=v_range, rope_heads_used=count,
        rope_off=rope_off + first * q_rope.shape[2], int4=True, group_size=group_size, scale_off=scale_off,
        num_kv_splits=num_kv_splits, block_n=block_n, block_h=block_h,
        out_dtype=out_dtype or q_latent.dtype,
        latent_dtype=q_latent.dtype,  # dequantized values are cast to the query's dtype for tl.dot
    )


# ----------------------------------------------------------------------------- references


def latent_decode_attention_ref(
    q_latent, q_rope, kv_cache, block_table, seq_lens, scale, *, rope_heads=1, rope_slots=None, k_range=None,
    v_range=None, latent_dim=None, group_size=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch reference (fp32, one sequence at a time, tokens gathered by slot).

    For an INT4 (uint8) cache pass latent_dim and group_size: rows are dequantized with
    latentkv.int4.int4_unpack_rows first.
    """
    bsz, num_heads, k_len = q_latent.shape
    r_d = q_rope.shape[2]
    rope_dim = rope_heads * r_d
    page = kv_cache.shape[1]
    if kv_cache.dtype == torch.uint8:
        lat_all, rope_all = int4_unpack_rows(kv_cache, latent_dim, rope_dim, group_size)
    else:
        latent_dim = kv_cache.shape[2] - rope_dim
        lat_all, rope_all = kv_cache[..., :latent_dim], kv_cache[..., latent_dim:]
    (ks, kl), (vs, vl) = _resolve_ranges(k_range, v_range, latent_dim, k_len)
    first, count = (0, rope_heads) if rope_slots is None else rope_slots
    slot_of_head = first + torch.arange(num_heads) // (num_heads // count)
    out = torch.zeros(bsz, num_heads, vl, dtype=torch.float32)
    lse = torch.full((bsz, num_heads), float("-inf"))
    for b in range(bsz):
        n = int(seq_lens[b])
        if n == 0:
            continue
        t = torch.arange(n)
        blocks = block_table[b, t // page].long().cpu()
        lat = lat_all[blocks, t % page].float().cpu()  # [n, W]
        rope = rope_all[blocks, t % page].float().cpu().view(n, rope_heads, r_d)
        k_rope = rope[:, slot_of_head]  # [n, H, R_D]
        s = q_latent[b].float().cpu() @ lat[:, ks : ks + kl].T  # [H, n]
        s = s + torch.einsum("hd,nhd->hn", q_rope[b].float().cpu(), k_rope)
        s = s * scale
        lse[b] = torch.logsumexp(s, dim=-1)
        out[b] = torch.softmax(s, dim=-1) @ lat[:, vs : vs + vl]
    return out, lse

