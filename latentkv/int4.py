"""INT4 latent-cache format (``cache_dtype: int4`` of the checkpoint format): quantize, pack and
the byte layout of one token row (pure torch).

This module is the *definition* of the format, next to ``latentkv.format``: the reference model
caches what it describes, the plugin's torch path packs with it, and the Triton writer and
decode kernels (``vllm_latentkv.kernels``) must reproduce it bit for bit (their tests check).

Symbols
    W   latent width per token (multiple of GROUP_SIZE)
    G   GROUP_SIZE, latent values sharing one scale (power of two >= 4, e.g. 32 or 64)
    R   rope width per token = R_H * R_D (all rope-key heads, head-major)

Token row, ROW_BYTES = W/2 + 2*W/G + 2*R bytes (uint8 cache [num_blocks, block_size, ROW_BYTES]):
    [ packed latent: W/2 bytes | scales: W/G x fp16 | rope keys: R x fp16 ]
    byte i of the packed latent holds columns 2i (low nibble) and 2i+1 (high nibble).

Quantizer ("signed absmax", the Q4_0 rule of llama.cpp): per group x[0:G]
    m = the element of largest magnitude, with its sign
    s = fp16(m / -8)                    # m itself maps to q = -8 exactly, so all 16 levels are used
    q = clamp(floor(x / s + 0.5), -8, 7)
    x_hat = q * s
The textbook symmetric rule s = max|x| / 7 wastes level -8: its step is 8/7 of this one, so its
RMS error is ~14% larger (measured in tests/test_int4.py). An asymmetric rule
(scale + zero point) would need a second number per group that the row layout does not have,
and for zero-centred latents its step (max - min) / 15 is no finer. Rounding is floor(v + 0.5)
rather than round-half-even so that Triton and torch agree on ties without libdevice.
Nibbles are stored offset-binary, u = q + 8 in [0, 15].
"""

from __future__ import annotations

import torch

QUANT_SCHEMES = ("signed_absmax", "absmax7")
FP16_MAX = 65504.0


def int4_row_bytes(latent_dim: int, rope_dim: int, group_size: int) -> int:
    """Bytes of one token row of the INT4 latent cache (rope_dim = R_H * R_D)."""
    check_int4_dims(latent_dim, group_size)
    if rope_dim < 0:
        raise ValueError(f"rope_dim must be >= 0, got {rope_dim}")
    return latent_dim // 2 + 2 * (latent_dim // group_size) + 2 * rope_dim


def int4_row_offsets(latent_dim: int, group_size: int) -> tuple[int, int]:
    """(scale offset, rope offset) of a token row in fp16 elements (byte offset / 2)."""
    check_int4_dims(latent_dim, group_size)
    scale_off = latent_dim // 4  # W/2 bytes of nibbles
    return scale_off, scale_off + latent_dim // group_size


def check_int4_dims(latent_dim: int, group_size: int) -> None:
    if group_size < 4 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 4, got {group_size}")
    if latent_dim <= 0 or latent_dim % group_size:
        raise ValueError(
            f"latent_dim ({latent_dim}) must be a positive multiple of group_size ({group_size})"
        )


def quantize_int4(
    x: torch.Tensor, group_size: int, scheme: str = "signed_absmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., W] float -> (q int8 [..., W] in [-8, 7], scales fp16 [..., W/G]).

    Only "signed_absmax" is what the kernels write; "absmax7" (s = max|x| / 7) is kept to
    measure the choice against.
    """
    if scheme not in QUANT_SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}, expected one of {QUANT_SCHEMES}")
    w = x.shape[-1]
    check_int4_dims(w, group_size)
    xg = x.float().reshape(*x.shape[:-1], w // group_size, group_size)
    if scheme == "signed_absmax":
        mx, mn = xg.amax(-1), xg.amin(-1)
        m = torch.where(mx >= -mn, mx, mn)  # signed element of largest magnitude (ties: positive)
        s = (m * -0.125).clamp(-FP16_MAX, FP16_MAX)  # s = m / -8
    else:
        s = (xg.abs().amax(-1) / 7.0).clamp(max=FP16_MAX)  # s = max|x| / 7
    s16 = s.to(torch.float16)
    sf = s16.float()
    safe = torch.where(sf == 0, torch.ones_like(sf), sf)  # all-zero group: q = 0
    q = torch.clamp(torch.floor(xg / safe.unsqueeze(-1) + 0.5), -8, 7)  # q = clamp(round(x/s))
    return q.to(torch.int8).reshape(x.shape), s16


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """q int8 [..., W], scales fp16 [..., W/G] -> fp32 [..., W]."""
    w = q.shape[-1]
    qg = q.float().reshape(*q.shape[:-1], w // group_size, group_size)
    return (qg * scales.float().unsqueeze(-1)).reshape(q.shape)  # x_hat = q * s


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q int8 [..., W] in [-8, 7] -> uint8 [..., W/2]; byte i = (q[2i]+8) | (q[2i+1]+8) << 4."""
    if q.shape[-1] % 2:
        raise ValueError(f"last dim must be even, got {q.shape[-1]}")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., W/2] -> int8 [..., W] in [-8, 7] (inverse of pack_int4)."""
    lo = (packed & 0xF).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def int4_pack_rows(latent: torch.Tensor, rope: torch.Tensor, group_size: int) -> torch.Tensor:
    """latent [..., W], rope [..., R] -> uint8 token rows [..., ROW_BYTES] (reference writer)."""
    q, s = quantize_int4(latent, group_size)
    parts = [
        pack_int4(q),
        s.contiguous().view(torch.uint8),
        rope.to(torch.float16).contiguous().view(torch.uint8),
    ]
    return torch.cat(parts, dim=-1)


def int4_unpack_rows(
    rows: torch.Tensor, latent_dim: int, rope_dim: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 rows [..., ROW_BYTES] -> (dequantized latent fp32 [..., W], rope fp16 [..., R])."""
    row_bytes = int4_row_bytes(latent_dim, rope_dim, group_size)
    if rows.dtype != torch.uint8 or rows.shape[-1] != row_bytes:
        raise ValueError(
            f"rows must be uint8 [..., {row_bytes}], got {rows.dtype} {tuple(rows.shape)}"
        )
    nb = latent_dim // 2
    ns = 2 * (latent_dim // group_size)
    q = unpack_int4(rows[..., :nb])
    s = rows[..., nb : nb + ns].contiguous().view(torch.float16)
    rope = rows[..., nb + ns :].contiguous().view(torch.float16)
    return dequantize_int4(q, s, group_size), rope


def as_cached(entries: dict[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """What an INT4 cache row gives back: latents quantized per group, the fp16 tail (rope keys,
    key scales) rounded to fp16; in the entries' own dtype. The reference model caches this."""
    out = {}
    for name, x in entries.items():
        if name == "latent":
            q, s = quantize_int4(x, group_size)
            out[name] = dequantize_int4(q, s, group_size).to(x.dtype)
        else:
            out[name] = x.to(torch.float16).to(x.dtype)
    return out
