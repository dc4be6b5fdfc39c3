"""Writers of the paged latent-KV cache (plain float and INT4), with torch references.

Symbols
    T            new tokens this step; slot_mapping [T] int64, -1 = padding (skipped)
    W            latent width; R = R_H * R_D rope-key width (head-major)
    P            page (block) size; slot = block_table[b, t // P] * P + t % P
Plain cache  kv_cache [num_blocks, P, W + R] (fp32/fp16/bf16): row = [latent | rope]
INT4 cache   kv_cache [num_blocks, P, ROW_BYTES] uint8: row layout in `latentkv.int4`.
One program per BLOCK_T tokens (a power of two): each token row is a few hundred contiguous
bytes, stored in coalesced passes; several tokens per program amortise the slot lookups in
prefill (vLLM's concat_and_cache_mla takes one token per CTA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPES, check_device, check_int4_cache, check_tensor, pow2_at_least
from latentkv.int4 import FP16_MAX, int4_pack_rows, int4_row_offsets


@triton.jit
def _to_cache_dtype(x, CACHE_DTYPE: tl.constexpr, BF16_RNE: tl.constexpr):
    """Cast to the cache dtype; fp32 -> bf16 rounds to nearest even in integer ops, because the
    interpreter truncates that cast (a GPU rounds; both then agree with torch)."""
    if BF16_RNE:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round half to even on the dropped 16 bits
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(CACHE_DTYPE)


@triton.jit
def _latent_cache_write_kernel(
    latent_ptr,
    rope_ptr,
    cache_ptr,
    slot_mapping_ptr,
    num_tokens,
    stride_lat_t,
    stride_rope_t,
    stride_cache_blk,
    stride_cache_tok,
    PAGE_SIZE: tl.constexpr,
    LATENT_DIM: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BF16_RNE: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_mapping_ptr + offs_t, mask=offs_t < num_tokens, other=-1).to(tl.int64)
    mask_t = slot >= 0  # -1 = padding token
    row = (slot // PAGE_SIZE) * stride_cache_blk + (slot % PAGE_SIZE) * stride_cache_tok  # [BLOCK_T]
    offs_w = tl.arange(0, BLOCK_W)
    mask = mask_t[:, None] & (offs_w[None, :] < LATENT_DIM)
    x = tl.load(latent_ptr + offs_t[:, None] * stride_lat_t + offs_w[None, :], mask=mask)
    x = _to_cache_dtype(x, cache_ptr.dtype.element_ty, BF16_RNE)
    tl.store(cache_ptr + row[:, None] + offs_w[None, :], x, mask=mask)
    if ROPE_DIM > 0:
        offs_r = tl.arange(0, BLOCK_R)
        mask = mask_t[:, None] & (offs_r[None, :] < ROPE_DIM)
        kr = tl.load(rope_ptr + offs_t[:, None] * stride_rope_t + offs_r[None, :], mask=mask)
        kr = _to_cache_dtype(kr, cache_ptr.dtype.element_ty, BF16_RNE)
        tl.store(cache_ptr + row[:, None] + LATENT_DIM + offs_r[None, :], kr, mask=mask)


@triton.jit
def _latent_cache_write_int4_kernel(
    latent_ptr,
    rope_ptr,
    cache_u8_ptr,
    cache_f16_ptr,  # the same cache viewed as fp16 (scales and rope keys)
    slot_mapping_ptr,
    num_tokens,
    stride_lat_t,
    stride_rope_t,
    stride_u8_blk,
    stride_u8_tok,
    stride_f16_blk,
    stride_f16_tok,
    PAGE_SIZE: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    SCALE_OFF: tl.constexpr,  # fp16 elements before the scales (W / 4)
    ROPE_OFF: tl.constexpr,  # fp16 elements before the rope keys (W / 4 + W / G)
    BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_R: tl.constexpr,
    FP16_MAX: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_mapping_ptr + offs_t, mask=offs_t < num_tokens, other=-1).to(tl.int64)
    blk = slot // PAGE_SIZE
    tok = slot % PAGE_SIZE

    # one quantization group per "group row" r = token * BLOCK_G + group; tile [r, pair i, nibble j]
    # holds latent column g * G + 2 * i + j of token t
    offs_q = tl.arange(0, BLOCK_T * BLOCK_G)
    q_tok = offs_q // BLOCK_G
    q_grp = offs_q % BLOCK_G
    q_t = tl.program_id(0) * BLOCK_T + q_tok
    q_slot = tl.load(slot_mapping_ptr + q_t, mask=q_t < num_tokens, other=-1).to(tl.int64)
    mask_q = (q_slot >= 0) & (q_grp < NUM_GROUPS)  # [BLOCK_T * BLOCK_G]
    offs_i = tl.arange(0, GROUP_SIZE // 2)
    offs_j = tl.arange(0, 2)
    col = q_grp[:, None, None] * GROUP_SIZE + offs_i[None, :, None] * 2 + offs_j[None, None, :]
    mask3 = mask_q[:, None, None] & (col >= 0)
    x = tl.load(latent_ptr + q_t[:, None, None] * stride_lat_t + col, mask=mask3, other=0.0).to(tl.float32)

    mx = tl.max(tl.max(x, axis=2), axis=1)
    mn = tl.min(tl.min(x, axis=2), axis=1)
    m = tl.where(mx >= -mn, mx, mn)  # signed element of largest magnitude
    s16 = tl.clamp(m * -0.125, -FP16_MAX, FP16_MAX).to(tl.float16)  # s = m / -8
    s = s16.to(tl.float32)
    s = tl.where(s == 0.0, 1.0, s)  # all-zero group: q = 0
    # q = clamp(round(x / s)); div_rn: IEEE division as in torch (a bare `/` is div.full.f32, 2 ulp,
    # on NVIDIA GPUs, which could flip a value sitting on a rounding boundary)
    q = tl.clamp(tl.floor(tl.math.div_rn(x, s[:, None, None]) + 0.5), -8.0, 7.0)
    u = (q + 8.0).to(tl.int32)  # offset-binary nibble in [0, 15]
    byte = tl.sum(u << (offs_j[None, None, :] * 4), axis=2)  # col 2i -> low, 2i+1 -> high

    q_blk = q_slot // PAGE_SIZE
    q_pos = q_slot % PAGE_SIZE
    row_u8 = q_blk * stride_u8_blk + q_pos * stride_u8_tok
    row_f16 = q_blk * stride_f16_blk + q_pos * stride_f16_tok
    offs_b = q_grp[:, None] * (GROUP_SIZE // 2) + offs_i[None, :]
    tl.store(cache_u8_ptr + row_u8[:, None] + offs_b, byte.to(tl.uint8), mask=mask_q[:, None] & (offs_b >= 0))
    tl.store(cache_f16_ptr + row_f16 + SCALE_OFF + q_grp, s16, mask=mask_q)

    if ROPE_DIM > 0:
        offs_r = tl.arange(0, BLOCK_R)
        mask = (slot >= 0)[:, None] & (offs_r[None, :] < ROPE_DIM)
        kr = tl.load(rope_ptr + offs_t[:, None] * stride_rope_t + offs_r[None, :], mask=mask)
        row = blk * stride_f16_blk + tok * stride_f16_tok
        tl.store(cache_f16_ptr + row[:, None] + ROPE_OFF + offs_r[None, :], kr.to(tl.float16), mask=mask)


def _check_write_inputs(latent, rope, kv_cache, slot_mapping, block_t):
    if block_t < 1 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two, got {block_t}")
    check_tensor("latent", latent, 2, FLOAT_DTYPES)
    check_tensor("rope", rope, 2, FLOAT_DTYPES)
    check_tensor("kv_cache", kv_cache, 3)
    check_tensor("slot_mapping", slot_mapping, 1, (torch.int64, torch.int32))
    t = slot_mapping.shape[0]
    if latent.shape[0] < t or rope.shape[0] < t:
        raise ValueError(
            f"latent ({latent.shape[0]}) and rope ({rope.shape[0]}) need >= "
            f"len(slot_mapping) = {t} rows"
        )


def latent_cache_write(
    latent: torch.Tensor,  # [T, W]
    rope: torch.Tensor,  # [T, R_H * R_D]
    kv_cache: torch.Tensor,  # [num_blocks, block_size, W + R_H * R_D]
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
    block_t: int = 8,
) -> None:
    """Write latent and rope-key rows into the plain paged cache (cast to its dtype) in place."""
    _check_write_inputs(latent, rope, kv_cache, slot_mapping, block_t)
    check_tensor("kv_cache", kv_cache, 3, FLOAT_DTYPES)
    w, r = latent.shape[1], rope.shape[1]
    if kv_cache.shape[2] != w + r:
        raise ValueError(f"kv_cache row is {kv_cache.shape[2]} wide, expected W + R = {w} + {r}")
    check_device(_latent_cache_write_kernel, latent, rope, kv_cache, slot_mapping)
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _latent_cache_write_kernel[(triton.cdiv(num_tokens, block_t),)](
        latent,
        rope,
        kv_cache,
        slot_mapping,
        num_tokens,
        latent.stride(0),
        rope.stride(0),
        kv_cache.stride(0),
        kv_cache.stride(1),
        PAGE_SIZE=kv_cache.shape[1],
        LATENT_DIM=w,
        ROPE_DIM=r,
        BLOCK_T=block_t,
        BLOCK_W=pow2_at_least(w, 1),
        BLOCK_R=pow2_at_least(r, 1),
        BF16_RNE=kv_cache.dtype == torch.bfloat16,
    )


def latent_cache_write_int4(
    latent: torch.Tensor,  # [T, W]
    rope: torch.Tensor,  # [T, R_H * R_D]
    kv_cache: torch.Tensor,  # uint8 [num_blocks, block_size, int4_row_bytes(W, R, group_size)]
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
    group_size: int,
    block_t: int = 8,
) -> None:
    """Quantize latent rows to INT4 (per-group fp16 scales) and write them, with fp16 rope keys,
    into the uint8 paged cache in place. Bit-exact with `latentkv.int4.int4_pack_rows`."""
    _check_write_inputs(latent, rope, kv_cache, slot_mapping, block_t)
    w, r = latent.shape[1], rope.shape[1]
    check_int4_cache(kv_cache, w, r, group_size)
    check_device(_latent_cache_write_int4_kernel, latent, rope, kv_cache, slot_mapping)
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    cache_f16 = kv_cache.view(torch.float16)
    scale_off, rope_off = int4_row_offsets(w, group_size)
    _latent_cache_write_int4_kernel[(triton.cdiv(num_tokens, block_t),)](
        latent,
        rope,
        kv_cache,
        cache_f16,
        slot_mapping,
        num_tokens,
        latent.stride(0),
        rope.stride(0),
        kv_cache.stride(0),
        kv_cache.stride(1),
        cache_f16.stride(0),
        cache_f16.stride(1),
        PAGE_SIZE=kv_cache.shape[1],
        ROPE_DIM=r,
        GROUP_SIZE=group_size,
        NUM_GROUPS=w // group_size,
        SCALE_OFF=scale_off,
        ROPE_OFF=rope_off,
        BLOCK_T=block_t,
        BLOCK_G=pow2_at_least(w // group_size, 1),
        BLOCK_R=pow2_at_least(r, 1),
        FP16_MAX=FP16_MAX,
    )


# ----------------------------------------------------------------------------- references


def latent_cache_write_ref(latent, rope, kv_cache, slot_mapping) -> None:
    """Plain torch reference of latent_cache_write (loops over tokens)."""
    page = kv_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        row = torch.cat([latent[t], rope[t]]).to(kv_cache.dtype)
        kv_cache[slot // page, slot % page] = row


def latent_cache_write_int4_ref(latent, rope, kv_cache, slot_mapping, group_size) -> None:
    """Plain torch reference of latent_cache_write_int4 (loops over tokens)."""
    page = kv_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        kv_cache[slot // page, slot % page] = int4_pack_rows(latent[t], rope[t], group_size)
