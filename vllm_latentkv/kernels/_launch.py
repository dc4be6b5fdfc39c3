"""Host-side launch helpers shared by the kernel modules: argument checks, tile sizes, dot
dtypes (pure torch + triton, no vLLM)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from latentkv.int4 import int4_row_bytes

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def is_interpreted(kernel) -> bool:
    """True if `kernel` was decorated while TRITON_INTERPRET=1 (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(kernel, *tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; CPU only under the Triton interpreter."""
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")
    if dev.type == "cpu" and not is_interpreted(kernel):
        raise RuntimeError(
            "latentkv Triton kernels got CPU tensors but were compiled for a GPU: set "
            "TRITON_INTERPRET=1 before vllm_latentkv.kernels is first imported to run them on CPU"
        )
    return dev


def check_tensor(name: str, t: torch.Tensor, ndim: int, dtypes=None) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} dtype must be one of {dtypes}, got {t.dtype}")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def check_paged(block_table: torch.Tensor, seq_lens: torch.Tensor, bsz: int) -> None:
    """Block table [B, max_blocks] and seq_lens [B] of a decode batch of B sequences."""
    check_tensor("block_table", block_table, 2, (torch.int32, torch.int64))
    check_tensor("seq_lens", seq_lens, 1, (torch.int32, torch.int64))
    if block_table.shape[0] != bsz or seq_lens.shape[0] != bsz:
        raise ValueError(
            f"block_table {tuple(block_table.shape)} and seq_lens {tuple(seq_lens.shape)} need B = {bsz} rows"
        )


def check_int4_cache(kv_cache: torch.Tensor, latent_dim: int, rope_dim: int, group_size: int) -> None:
    """uint8 paged cache whose rows are `latentkv.int4` rows; the kernels also read it as fp16
    (scales, rope keys), which needs even strides."""
    check_tensor("kv_cache", kv_cache, 3, (torch.uint8,))
    row_bytes = int4_row_bytes(latent_dim, rope_dim, group_size)
    if kv_cache.shape[2] != row_bytes:
        raise ValueError(
            f"INT4 kv_cache row is {kv_cache.shape[2]} bytes, expected {row_bytes} for "
            f"W={latent_dim}, R={rope_dim}, group_size={group_size}"
        )
    if kv_cache.stride(0) % 2 or kv_cache.stride(1) % 2:
        raise ValueError(f"INT4 kv_cache strides must be even (fp16 view), got {kv_cache.stride()}")


def pow2_at_least(n: int, lo: int = 16) -> int:
    """Block size covering n; >= 16 because tl.dot needs M, N, K >= 16 on tensor cores."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def dot_dtype(kernel, *dtypes: torch.dtype):
    """Operand dtype of tl.dot: fp32 under the interpreter (its bf16 dot is broken), else the
    narrowest input dtype (fp16/bf16 tensor cores with fp32 accumulation), fp32 for fp32 inputs.
    """
    if is_interpreted(kernel) or all(d == torch.float32 for d in dtypes):
        return tl.float32
    if torch.bfloat16 in dtypes:
        return tl.bfloat16
    return tl.float16


def dot_precision(ddtype) -> str:
    """input_precision of tl.dot: exact products for fp32 operands (the references are fp32),
    tf32 is ignored for fp16/bf16 operands."""
    return "ieee" if ddtype == tl.float32 else "tf32"


def check_blocks(num_kv_splits: int, block_n: int, block_h: int | None) -> None:
    """Tile sizes of the decode kernels: powers of two >= 16 (tl.dot's minimum on GPUs)."""
    if num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1, got {num_kv_splits}")
    for name, v in (("block_n", block_n), ("block_h", block_h)):
        if v is not None and (v < 16 or v & (v - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
