"""Writers of the paged latent-KV cache (plain float and INT4), with torch references.

Symbols
    T            new tokens this step; slot_mapping [T] int64, -1 = padding (skipped)
    W            latent width; R = R_H * R_D rope-key width (head-major)
    P            page (block) size; slot = block_table[b, t // P] * P + t % P
Plain cache  kv_cache [num_blocks, P, W + R] (fp32/fp16/bf16): row = [latent | rope]
INT4 cache   kv_cache [num_blocks, P, ROW_BYTES] uint8: row layout in `int4_pack`.
One program per token: a row is a few hundred bytes, a warp stores it in one coalesced pass
(the layout of vLLM's concat_and_cache_mla).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPES, check_device, check_tensor, pow2_at_least
from .int4_pack import FP16_MAX, int4_pack_rows, int4_row_bytes, int4_row_offsets


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
    stride_lat_t,
    stride_rope_t,
    stride_cache_blk,
    stride_cache_tok,
    PAGE_SIZE: tl.constexpr,
    LATENT_DIM: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BF16_RNE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:  # padding token
        return
    row = cache_ptr + (slot // PAGE_SIZE) * stride_cache_blk + (slot % PAGE_SIZE) * stride_cache_tok
    offs_w = tl.arange(0, BLOCK_W)
    mask_w = offs_w < LATENT_DIM
    x = tl.load(latent_ptr + t * stride_lat_t + offs_w, mask=mask_w)
    tl.store(row + offs_w, _to_cache_dtype(x, cache_ptr.dtype.element_ty, BF16_RNE), mask=mask_w)
    if ROPE_DIM > 0:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < ROPE_DIM
        kr = tl.load(rope_ptr + t * stride_rope_t + offs_r, mask=mask_r)
        kr = _to_cache_dtype(kr, cache_ptr.dtype.element_ty, BF16_RNE)
        tl.store(row + LATENT_DIM + offs_r, kr, mask=mask_r)


@triton.jit
def _latent_cache_write_int4_kernel(
    latent_ptr,
    rope_ptr,
    cache_u8_ptr,
    cache_f16_ptr,  # the same cache viewed as fp16 (scales and rope keys)
    slot_mapping_ptr,
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
    BLOCK_G: tl.constexpr,
    BLOCK_R: tl.constexpr,
    FP16_MAX: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:  # padding token
        return
    blk = slot // PAGE_SIZE
    tok = slot % PAGE_SIZE
    row_u8 = cache_u8_ptr + blk * stride_u8_blk + tok * stride_u8_tok
    row_f16 = cache_f16_ptr + blk * stride_f16_blk + tok * stride_f16_tok

    # latent as [group, pair, nibble]: column = g * G + 2 * i + j
    offs_g = tl.arange(0, BLOCK_G)
    offs_i = tl.arange(0, GROUP_SIZE // 2)
    offs_j = tl.arange(0, 2)
    col = offs_g[:, None, None] * GROUP_SIZE + offs_i[None, :, None] * 2 + offs_j[None, None, :]
    mask_g = offs_g < NUM_GROUPS
    mask3 = (offs_g[:, None, None] < NUM_GROUPS) & (col >= 0)
    x = tl.load(latent_ptr + t * stride_lat_t + col, mask=mask3, other=0.0).to(tl.float32)

    mx = tl.max(tl.max(x, axis=2), axis=1)
    mn = tl.min(tl.min(x, axis=2), axis=1)
    m = tl.where(mx >= -mn, mx, mn)  # signed element of largest magnitude
    s16 = tl.clamp(m * -0.125, -FP16_MAX, FP16_MAX).to(tl.float16)  # s = m / -8
    s = s16.to(tl.float32)
    s = tl.where(s == 0.0, 1.0, s)  # all-zero group: q = 0
    q = tl.clamp(tl.floor(x / s[:, None, None] + 0.5), -8.0, 7.0)  # q = clamp(round(x / s))
    u = (q + 8.0).to(tl.int32)  # offset binary nibble in [0, 15]
    byte = tl.sum(u << (offs_j[None, None, :] * 4), axis=2)  # col 2i -> low, 2i+1 -> high
    offs_b = offs_g[:, None] * (GROUP_SIZE // 2) + offs_i[None, :]
    tl.store(row_u8 + offs_b, byte.to(tl.uint8), mask=offs_b < NUM_GROUPS * (GROUP_SIZE // 2))
    tl.store(row_f16 + SCALE_OFF + offs_g, s16, mask=mask_g)

    if ROPE_DIM > 0:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < ROPE_DIM
        kr = tl.load(rope_ptr + t * stride_rope_t + offs_r, mask=mask_r)
        tl.store(row_f16 + ROPE_OFF + offs_r, kr.to(tl.float16), mask=mask_r)


def _check_write_inputs(latent, rope, kv_cache, slot_mapping):
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
) -> None:
    """Write latent and rope-key rows into the plain paged cache (cast to its dtype) in place."""
    _check_write_inputs(latent, rope, kv_cache, slot_mapping)
    if kv_cache.dtype not in FLOAT_DTYPES:
        raise ValueError(f"kv_cache dtype must be one of {FLOAT_DTYPES}, got {kv_cache.dtype}")
    w, r = latent.shape[1], rope.shape[1]
    if kv_cache.shape[2] != w + r:
        raise ValueError(f"kv_cache row is {kv_cache.shape[2]} wide, expected W + R = {w} + {r}")
    check_device(_latent_cache_write_kernel, latent, rope, kv_cache, slot_mapping)
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _latent_cache_write_kernel[(num_tokens,)](
        latent,
        rope,
        kv_cache,
        slot_mapping,
        latent.stride(0),
        rope.stride(0),
        kv_cache.stride(0),
        kv_cache.stride(1),
        PAGE_SIZE=kv_cache.shape[1],
        LATENT_DIM=w,
        ROPE_DIM=r,
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
) -> None:
    """Quantize latent rows to INT4 (per-group fp16 scales) and write them, with fp16 rope keys,
    into the uint8 paged cache in place. Bit-exact with `int4_pack.int4_pack_rows`."""
    _check_write_inputs(latent, rope, kv_cache, slot_mapping)
    w, r = latent.shape[1], rope.shape[1]
    row_bytes = int4_row_bytes(w, r, group_size)
    if kv_cache.dtype != torch.uint8 or kv_cache.shape[2] != row_bytes:
        raise ValueError(
            f"INT4 kv_cache must be uint8 [num_blocks, block_size, {row_bytes}] for W={w}, R={r}, "
            f"group_size={group_size}; got {kv_cache.dtype} {tuple(kv_cache.shape)}"
        )
    if kv_cache.stride(0) % 2 or kv_cache.stride(1) % 2:
        raise ValueError(f"INT4 kv_cache strides must be even (fp16 view), got {kv_cache.stride()}")
    check_device(_latent_cache_write_int4_kernel, latent, rope, kv_cache, slot_mapping)
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    cache_f16 = kv_cache.view(torch.float16)
    scale_off, rope_off = int4_row_offsets(w, group_size)
    _latent_cache_write_int4_kernel[(num_tokens,)](
        latent,
        rope,
        kv_cache,
        cache_f16,
        slot_mapping,
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
