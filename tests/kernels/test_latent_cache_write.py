"""latent_cache_write / latent_cache_write_int4 vs their torch references (bit-exact)."""

import pytest
import torch

from latentkv.int4 import int4_row_bytes
from vllm_latentkv.kernels import (
    latent_cache_write,
    latent_cache_write_int4,
    latent_cache_write_int4_ref,
    latent_cache_write_ref,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _slots(num_tokens, num_blocks, block_size, gen):
    """Distinct random slots crossing page boundaries, with -1 padding sprinkled in."""
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::5] = -1
    return slots.to(torch.int64)


@pytest.mark.parametrize("cache_dtype", DTYPES)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("latent_dim,rope_dim", [(48, 8), (32, 0), (64, 4 * 6)])
@pytest.mark.parametrize("block_t", [1, 8])
def test_latent_cache_write(cache_dtype, input_dtype, block_size, latent_dim, rope_dim, block_t):
    gen = torch.Generator().manual_seed(1)
    num_tokens, num_blocks = 37, 5
    latent = torch.randn(num_tokens, latent_dim, generator=gen).to(input_dtype)
    rope = torch.randn(num_tokens, rope_dim, generator=gen).to(input_dtype)
    slots = _slots(num_tokens, num_blocks, block_size, gen)
    cache = torch.randn(num_blocks, block_size, latent_dim + rope_dim, generator=gen).to(cache_dtype)
    expect = cache.clone()
    latent_cache_write(latent, rope, cache, slots, block_t=block_t)
    latent_cache_write_ref(latent, rope, expect, slots)
    # exact: a copy with one cast (round to nearest even); untouched slots keep their old data
    assert torch.equal(cache, expect)


def test_latent_cache_write_strided_cache():
    """A cache that is a view into a larger per-layer buffer (non-contiguous block stride)."""
    gen = torch.Generator().manual_seed(2)
    latent = torch.randn(9, 32, generator=gen)
    rope = torch.randn(9, 8, generator=gen)
    buf = torch.zeros(3, 2, 16, 40)  # [num_blocks, layers, block_size, row]
    cache = buf[:, 1]
    slots = torch.tensor([0, 15, 16, 17, -1, 31, 47, 32, 1])
    expect = cache.clone()
    latent_cache_write(latent, rope, cache, slots)
    latent_cache_write_ref(latent, rope, expect, slots)
    assert torch.equal(cache, expect)
    assert torch.count_nonzero(buf[:, 0]) == 0


@pytest.mark.parametrize("input_dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("latent_dim,rope_dim,group_size", [(64, 8, 32), (48, 8, 16), (128, 0, 64), (96, 2 * 4, 32)])
@pytest.mark.parametrize("block_t", [1, 4])
def test_latent_cache_write_int4(input_dtype, block_size, latent_dim, rope_dim, group_size, block_t):
    gen = torch.Generator().manual_seed(3)
    num_tokens, num_blocks = 29, 4
    latent = (torch.randn(num_tokens, latent_dim, generator=gen) * 3).to(input_dtype)
    latent[3, :group_size] = 0.0  # all-zero group
    latent[4, :group_size] = -latent[4, :group_size].abs()  # negative extreme -> positive scale
    rope = torch.randn(num_tokens, rope_dim, generator=gen).to(input_dtype)
    slots = _slots(num_tokens, num_blocks, block_size, gen)
    row_bytes = int4_row_bytes(latent_dim, rope_dim, group_size)
    cache = torch.randint(0, 256, (num_blocks, block_size, row_bytes), generator=gen, dtype=torch.uint8)
    expect = cache.clone()
    latent_cache_write_int4(latent, rope, cache, slots, group_size, block_t=block_t)
    latent_cache_write_int4_ref(latent, rope, expect, slots, group_size)
    assert torch.equal(cache, expect)  # bit-exact with the torch quantizer and packer


def test_write_rejects_bad_shapes():
    cache = torch.zeros(2, 16, 40)
    with pytest.raises(ValueError, match="W \\+ R"):
        latent_cache_write(torch.zeros(3, 32), torch.zeros(3, 4), cache, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="uint8"):
        latent_cache_write_int4(torch.zeros(3, 32), torch.zeros(3, 8), cache, torch.zeros(3, dtype=torch.int64), 32)
    with pytest.raises(ValueError, match="group_size"):
        int4_row_bytes(48, 8, 32)
