"""Flash-decoding pieces shared by the two decode kernels (`latent_decode`, `full_rope_decode`).

Both decode kernels differ only in how they score a tile of cached tokens; everything around the
scores is the same split-KV scheme, kept here once:
    stage 1 (per kernel)  a program walks one split of a sequence's tokens BLOCK_N at a time,
                          keeping an online softmax (scores in log2 units, exp2 being the fast
                          path on GPUs), and stores its normalised partial acc and its lse;
    stage 2 (shared)      `merge_splits` combines the splits of each (sequence, head) by lse.
Partial buffers: part_acc [B, H, S, V_LEN] fp32, part_lse [B, H, S] fp32 (natural log, -inf for
an empty split). Pure torch + triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import dot_precision, pow2_at_least


@triton.jit
def split_bounds(seq_lens_ptr, b, split, NUM_KV_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Token range [start, end) of this split of sequence b."""
    seq_len = tl.load(seq_lens_ptr + b)
    # splits are whole BLOCK_N tiles so that tiles stay page-aligned when BLOCK_N divides P
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_KV_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    return start, tl.minimum(start + split_len, seq_len)


@triton.jit
def tile_tokens(block_row_ptr, n0, end, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Tokens n0 .. n0 + BLOCK_N of a sequence, masked at end, with their page (int64: page *
    page stride can pass 2^31 elements) and position in it; block_row_ptr = its block-table row."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < end
    page = tl.load(block_row_ptr + offs_n // PAGE_SIZE, mask=mask_n, other=0)
    return offs_n, mask_n, page.to(tl.int64), offs_n % PAGE_SIZE


@triton.jit
def load_latent_cols(
    cache_ptr,
    scale_ptr,
    row,  # [BLOCK_N] element offset of each token row in cache_ptr units
    srow,  # [BLOCK_N] the same rows in scale_ptr (fp16) units
    cols,  # [BLOCK_C] latent columns
    mask,  # [BLOCK_N, BLOCK_C]
    INT4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SCALE_OFF: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """Latent tile [BLOCK_N, BLOCK_C] in DOT_DTYPE (dequantized for the INT4 cache)."""
    if INT4:
        b = tl.load(cache_ptr + row[:, None] + cols[None, :] // 2, mask=mask, other=0)
        u = (b.to(tl.int32) >> ((cols[None, :] % 2) * 4)) & 0xF  # col 2i low nibble, 2i+1 high
        s = tl.load(scale_ptr + srow[:, None] + SCALE_OFF + cols[None, :] // GROUP_SIZE, mask=mask, other=0.0)
        x = (u - 8).to(tl.float32) * s.to(tl.float32)  # x_hat = (u - 8) * s
    else:
        x = tl.load(cache_ptr + row[:, None] + cols[None, :], mask=mask, other=0.0)
    return x.to(DOT_DTYPE)


@triton.jit
def online_softmax_init(BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr):
    """(acc, running max, running sum) before the first tile."""
    acc = tl.zeros([BLOCK_H, BLOCK_V], dtype=tl.float32)
    return acc, tl.full([BLOCK_H], float("-inf"), dtype=tl.float32), tl.zeros([BLOCK_H], dtype=tl.float32)


@triton.jit
def online_softmax_step(
    qk,  # [BLOCK_H, BLOCK_N] fp32 scores, already scaled to log2 units, -inf where masked
    v,  # [BLOCK_N, BLOCK_V] value tile in DOT_DTYPE
    acc,
    e_max,
    e_sum,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One tile of the online softmax: rescale the running acc / sum to the new max, add the tile."""
    n_max = tl.maximum(e_max, tl.max(qk, 1))
    re_scale = tl.exp2(e_max - n_max)
    p = tl.exp2(qk - n_max[:, None])
    acc = acc * re_scale[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
    e_sum = e_sum * re_scale + tl.sum(p, 1)
    return acc, n_max, e_sum


@triton.jit
def store_split_partial(
    part_acc_ptr,  # this split's acc row of head 0 of its sequence (b, 0, split, 0)
    part_lse_ptr,  # this split's lse of head 0 of its sequence (b, 0, split)
    stride_pa_h,
    stride_pl_h,
    offs_h,
    mask_h,
    offs_v,
    mask_v,
    acc,
    e_max,
    e_sum,
):
    """Normalised partial acc and its natural-log lse (log2 units converted back)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    nonempty = e_sum > 0.0  # an empty split (short sequence) leaves lse = -inf, acc = 0
    acc = acc / tl.where(nonempty, e_sum, 1.0)[:, None]
    lse = tl.where(nonempty, (e_max + tl.log2(tl.where(nonempty, e_sum, 1.0))) / LOG2E, float("-inf"))
    tl.store(
        part_acc_ptr + offs_h[:, None] * stride_pa_h + offs_v[None, :],
        acc,
        mask=mask_h[:, None] & mask_v[None, :],
    )
    tl.store(part_lse_ptr + offs_h * stride_pl_h, lse, mask=mask_h)


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr,  # [B, H, S, V_LEN] fp32
    part_lse_ptr,  # [B, H, S] fp32
    out_ptr,  # [B, H, V_LEN]
    lse_ptr,  # [B, H] fp32
    stride_pa_b,
    stride_pa_h,
    stride_pa_s,
    stride_pl_b,
    stride_pl_h,
    stride_o_b,
    stride_o_h,
    stride_l_b,
    V_LEN: tl.constexpr,
    NUM_KV_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_v = tl.arange(0, BLOCK_V)
    mask_v = offs_v < V_LEN
    lse_base = part_lse_ptr + b * stride_pl_b + h * stride_pl_h
    lse_s = tl.load(lse_base + offs_s, mask=offs_s < NUM_KV_SPLITS, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty (seq_len 0)
    total = tl.sum(tl.exp(lse_s - m), 0)  # sum_s exp(lse_s - m); empty splits add 0
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    for s in range(NUM_KV_SPLITS):
        w = tl.exp(tl.load(lse_base + s) - m)  # weight of split s: exp(lse_s - max lse)
        a = tl.load(
            part_acc_ptr + b * stride_pa_b + h * stride_pa_h + s * stride_pa_s + offs_v,
            mask=mask_v,
            other=0.0,
        )
        acc += w * a
    out = acc / tl.where(total > 0.0, total, 1.0)
    lse = tl.where(total > 0.0, m + tl.log(tl.where(total > 0.0, total, 1.0)), float("-inf"))
    tl.store(out_ptr + b * stride_o_b + h * stride_o_h + offs_v, out.to(out_ptr.dtype.element_ty), mask=mask_v)
    tl.store(lse_ptr + b * stride_l_b + h, lse)


def launch_split_kv(
    stage1_kernel, head_programs, ptrs, scale, strides, *, bsz, num_heads, v_len, num_kv_splits,
    out_dtype, device, **constexprs,
):
    """Run a split-KV decode: stage 1 on grid (B, head_programs, S), then the shared merge.

    Stage-1 kernels take (*ptrs, part_acc_ptr, part_lse_ptr, sm_scale, *strides, the five
    part_acc / part_lse strides, **constexprs, NUM_KV_SPLITS, DOT_DTYPE, DOT_PRECISION).
    Returns (out [B, H, V_LEN] out_dtype, lse [B, H] fp32).
    """
    out = torch.empty(bsz, num_heads, v_len, dtype=out_dtype, device=device)
    lse = torch.empty(bsz, num_heads, dtype=torch.float32, device=device)
    if bsz == 0:
        return out, lse
    part_acc = torch.empty(bsz, num_heads, num_kv_splits, v_len, dtype=torch.float32, device=device)
    part_lse = torch.empty(bsz, num_heads, num_kv_splits, dtype=torch.float32, device=device)
    stage1_kernel[(bsz, head_programs, num_kv_splits)](
        *ptrs,
        part_acc,
        part_lse,
        float(scale),
        *strides,
        part_acc.stride(0),
        part_acc.stride(1),
        part_acc.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        NUM_KV_SPLITS=num_kv_splits,
        DOT_PRECISION=dot_precision(constexprs["DOT_DTYPE"]),
        num_warps=4,  # Hopper starting point (as vLLM's grouped MLA decode); tune on the GPU
        num_stages=2,
        **constexprs,
    )
    merge_splits(part_acc, part_lse, out, lse)
    return out, lse


def merge_splits(part_acc, part_lse, out, lse) -> None:
    """Stage 2: out[b, h] and lse[b, h] from the S partials, one program per (b, h)."""
    bsz, num_heads, num_kv_splits, v_len = part_acc.shape
    _merge_splits_kernel[(bsz, num_heads)](
        part_acc,
        part_lse,
        out,
        lse,
        part_acc.stride(0),
        part_acc.stride(1),
        part_acc.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        V_LEN=v_len,
        NUM_KV_SPLITS=num_kv_splits,
        BLOCK_S=pow2_at_least(num_kv_splits, 1),
        BLOCK_V=pow2_at_least(v_len),
    )

