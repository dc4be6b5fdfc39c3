"""Shared pieces of the kernel tests.

Tolerances. The references compute in fp32 from the very values the kernel reads (same cache,
same queries), so the only differences are fp32 summation order (online softmax over tiles and
splits, ~1e-6 relative for outputs of size ~1) and the final cast of `out` to its dtype:
    fp32 out: atol = rtol = 2e-5
    fp16 out: atol = rtol = 2e-3 (half an fp16 ulp at 1 is 4.9e-4; 2e-3 leaves room for the
              fp16 tensor-core dots on a GPU, where p and q are rounded to fp16 before tl.dot)
    bf16 out: atol = rtol = 2e-2 (bf16 ulp at 1 is 7.8e-3)
lse is fp32 in every case: atol 1e-4 (scores are O(10); fp32 sums of ~1000 terms).
"""

import math
import os

import torch

# Float dtypes of the kernels' inputs under test: bf16 only natively (the interpreter's bf16 tl.dot is broken).
KERNEL_DTYPES = [torch.float32, torch.float16] + (
    [torch.bfloat16] if os.environ.get("LATENTKV_KERNEL_DEVICE", "cpu") != "cpu" else [])

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
LSE_ATOL = 1e-4
ROPE_HEAD_DIM = 8


def make_paged(seq_lens, block_size, row, dtype, gen, spare_blocks=3):
    """Cache with randomly permuted pages (plus unused ones holding garbage) and its block table."""
    max_blocks = max(1, max(math.ceil(n / block_size) for n in seq_lens))
    num_blocks = len(seq_lens) * max_blocks + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)[: len(seq_lens) * max_blocks]
    block_table = perm.view(len(seq_lens), max_blocks).to(torch.int32)
    cache = torch.randn(num_blocks, block_size, row, generator=gen).to(dtype)
    return cache, block_table


def check_close(out, lse, ref_out, ref_lse):
    atol = ATOL[out.dtype]
    torch.testing.assert_close(out.float(), ref_out, atol=atol, rtol=atol)
    torch.testing.assert_close(lse, ref_lse, atol=LSE_ATOL, rtol=1e-5)
