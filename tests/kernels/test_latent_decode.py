"""latent_decode_attention (plain and INT4 cache) vs the torch reference (tolerances: see
kernel_helpers.py)."""

import math

import pytest
import torch
from kernel_helpers import KERNEL_DTYPES, ROPE_HEAD_DIM, check_close, make_paged

from latentkv.int4 import int4_pack_rows
from vllm_latentkv.kernels import (
    latent_cache_write_int4,
    latent_decode_attention,
    latent_decode_attention_int4,
    latent_decode_attention_ref,
)

NUM_HEADS = 4
LATENT_DIM = 48
# (k_range, v_range): joint latent, and split latent (key part, then value part)
LAYOUTS = {"joint": (None, None), "split": ((0, 32), (32, 16))}


def make_queries(bsz, k_len, dtype, gen, num_heads=NUM_HEADS):
    q_latent = torch.randn(bsz, num_heads, k_len, generator=gen).to(dtype)
    q_rope = torch.randn(bsz, num_heads, ROPE_HEAD_DIM, generator=gen).to(dtype)
    return q_latent, q_rope


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("rope_heads", [1, 2])  # 1 = shared rope head; 2 = per KV head (GQA 4:2)
@pytest.mark.parametrize("layout", ["joint", "split"])
def test_decode_matches_reference(dtype, block_size, rope_heads, layout):
    gen = torch.Generator().manual_seed(10)
    seq_lens = [1, 17, 1025, 1027]  # ragged, odd, crossing page and tile boundaries
    k_range, v_range = LAYOUTS[layout]
    k_len = LATENT_DIM if k_range is None else k_range[1]
    cache, block_table = make_paged(seq_lens, block_size, LATENT_DIM + rope_heads * ROPE_HEAD_DIM, dtype, gen)
    q_latent, q_rope = make_queries(len(seq_lens), k_len, dtype, gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = 1.0 / math.sqrt(k_len + ROPE_HEAD_DIM)
    kw = dict(rope_heads=rope_heads, k_range=k_range, v_range=v_range)
    out, lse = latent_decode_attention(q_latent, q_rope, cache, block_table, lens, scale, num_kv_splits=4, **kw)
    ref_out, ref_lse = latent_decode_attention_ref(q_latent, q_rope, cache, block_table, lens, scale, **kw)
    assert out.shape == (len(seq_lens), NUM_HEADS, LATENT_DIM if v_range is None else v_range[1])
    assert out.dtype == dtype and lse.dtype == torch.float32
    check_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("num_kv_splits", [1, 3, 16])
@pytest.mark.parametrize("block_n,block_size", [(16, 32), (32, 16), (64, 16)])
def test_decode_splits_and_tiles(num_kv_splits, block_n, block_size):
    """Split counts that leave empty splits for short sequences; tiles smaller/larger than pages."""
    gen = torch.Generator().manual_seed(11)
    seq_lens = [33, 1, 200]
    cache, block_table = make_paged(seq_lens, block_size, LATENT_DIM + ROPE_HEAD_DIM, torch.float32, gen)
    q_latent, q_rope = make_queries(len(seq_lens), LATENT_DIM, torch.float32, gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out, lse = latent_decode_attention(
        q_latent, q_rope, cache, block_table, lens, 0.3, num_kv_splits=num_kv_splits, block_n=block_n
    )
    check_close(out, lse, *latent_decode_attention_ref(q_latent, q_rope, cache, block_table, lens, 0.3))


def test_decode_bf16_many_heads_and_views():
    """bf16 cache, 20 heads (two head blocks, the second partial), rope_heads = 5 (4 heads per
    slot, a slot straddling head blocks), queries as strided views of one projection, a cache
    that is a view into a larger buffer, an empty sequence (out 0, lse -inf)."""
    gen = torch.Generator().manual_seed(12)
    num_heads, rope_heads = 20, 5
    seq_lens = [40, 0, 65]
    row = LATENT_DIM + rope_heads * ROPE_HEAD_DIM
    cache, block_table = make_paged(seq_lens, 16, row, torch.bfloat16, gen)
    big = torch.zeros(cache.shape[0], 2, 16, row, dtype=torch.bfloat16)
    big[:, 1] = cache
    cache_view = big[:, 1]
    q = torch.randn(len(seq_lens), num_heads, LATENT_DIM + ROPE_HEAD_DIM, generator=gen).to(torch.bfloat16)
    q_latent, q_rope = q[..., :LATENT_DIM], q[..., LATENT_DIM:]
    lens = torch.tensor(seq_lens, dtype=torch.int64)
    out, lse = latent_decode_attention(
        q_latent, q_rope, cache_view, block_table, lens, 0.1, rope_heads=rope_heads, num_kv_splits=2
    )
    ref_out, ref_lse = latent_decode_attention_ref(
        q_latent, q_rope, cache, block_table, lens, 0.1, rope_heads=rope_heads
    )
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    check_close(out, lse, ref_out, ref_lse)


def _int4_setup(seq_lens, block_size, rope_heads, group_size, gen, latent_dim=64):
    """(plain fp32 cache, the same rows packed to INT4, block table). Packed with the torch
    reference writer: the Triton writer is bit-exact with it (test_latent_cache_write_int4)
    and the interpreter needs ~20 ms per writer program, too slow for thousands of rows."""
    rope_dim = rope_heads * ROPE_HEAD_DIM
    plain, block_table = make_paged(seq_lens, block_size, latent_dim + rope_dim, torch.float32, gen)
    plain[..., latent_dim:] = plain[..., latent_dim:].half().float()  # rope keys are fp16 in INT4 rows
    packed = int4_pack_rows(plain[..., :latent_dim], plain[..., latent_dim:], group_size)
    return plain, packed, block_table


def test_int4_decode_after_triton_write():
    """End to end: Triton INT4 writer, then the INT4 decode kernel, on a short batch."""
    gen = torch.Generator().manual_seed(15)
    seq_lens = [5, 33]
    plain, expect, block_table = _int4_setup(seq_lens, 16, 2, 16, gen)
    packed = torch.zeros_like(expect)
    rows = plain.view(-1, plain.shape[-1])
    latent_cache_write_int4(rows[:, :64], rows[:, 64:], packed, torch.arange(rows.shape[0]), 16, block_t=32)
    assert torch.equal(packed, expect)
    q_latent, q_rope = make_queries(len(seq_lens), 64, torch.float32, gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    kw = dict(rope_heads=2)
    out, lse = latent_decode_attention_int4(
        q_latent, q_rope, packed, block_table, lens, 0.2, latent_dim=64, group_size=16, **kw
    )
    ref = latent_decode_attention_ref(q_latent, q_rope, packed, block_table, lens, 0.2, latent_dim=64, group_size=16, **kw)
    check_close(out, lse, *ref)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("rope_heads", [1, 2])
@pytest.mark.parametrize("layout,group_size,block_size", [("joint", 32, 16), ("split", 16, 32)])
def test_int4_decode_matches_reference(dtype, rope_heads, layout, group_size, block_size):
    """INT4 kernel == attention over the torch-dequantized cache (same quantizer, bit-exact cache:
    see test_latent_cache_write_int4); differences are only summation order, tolerances as above."""
    gen = torch.Generator().manual_seed(13)
    seq_lens = [1, 17, 1025, 1027]
    latent_dim = 64
    k_range, v_range = {"joint": (None, None), "split": ((0, 48), (48, 16))}[layout]
    k_len = latent_dim if k_range is None else k_range[1]
    _, packed, block_table = _int4_setup(seq_lens, block_size, rope_heads, group_size, gen, latent_dim)
    q_latent, q_rope = make_queries(len(seq_lens), k_len, dtype, gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = 1.0 / math.sqrt(k_len + ROPE_HEAD_DIM)
    kw = dict(rope_heads=rope_heads, k_range=k_range, v_range=v_range)
    out, lse = latent_decode_attention_int4(
        q_latent, q_rope, packed, block_table, lens, scale, latent_dim=latent_dim,
        group_size=group_size, num_kv_splits=4, **kw,
    )
    ref_out, ref_lse = latent_decode_attention_ref(
        q_latent, q_rope, packed, block_table, lens, scale, latent_dim=latent_dim, group_size=group_size, **kw
    )
    check_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_decode_error_vs_unquantized(group_size):
    """INT4 vs the unquantized fp32 cache: Gaussian latent (W = 128) and queries, 8 heads,
    rope_heads 2, scale 1/sqrt(W + R_D) (scores of std ~1), sequences of 1, 17 and 300 tokens.

    Measured (this seed): G=32 out rel. error 0.090, lse RMS 0.055 (max 0.19, at 1-token
    sequences whose lse is the single score itself); G=64: 0.098, 0.044. Elementwise the
    quantizer's RMS error is 0.086 (G=32) / 0.095 (G=64) of the latent's RMS (tests/test_int4.py).
    Bounds, ~1.5x the measurement: out rel. error < 0.15, lse RMS < 0.1.
    """
    gen = torch.Generator().manual_seed(14)
    seq_lens = [1, 17, 300]
    plain, packed, block_table = _int4_setup(seq_lens, 16, 2, group_size, gen, latent_dim=128)
    q_latent, q_rope = make_queries(len(seq_lens), 128, torch.float32, gen, num_heads=8)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = 1.0 / math.sqrt(128 + ROPE_HEAD_DIM)
    out, lse = latent_decode_attention_int4(
        q_latent, q_rope, packed, block_table, lens, scale, latent_dim=128, group_size=group_size, rope_heads=2
    )
    ref_out, ref_lse = latent_decode_attention_ref(q_latent, q_rope, plain, block_table, lens, scale, rope_heads=2)
    rel = ((out - ref_out).norm() / ref_out.norm()).item()
    lse_rms = (lse - ref_lse).pow(2).mean().sqrt().item()
    print(f"G={group_size}: out rel. error {rel:.4f}, lse RMS {lse_rms:.4f}, max {(lse - ref_lse).abs().max():.4f}")
    assert rel < 0.15
    assert lse_rms < 0.1


@pytest.mark.parametrize("int4", [False, True])
def test_rope_slots_read_a_tensor_parallel_ranks_slots(int4):
    """Row with 4 rope heads (one per KV head); this call's 4 query heads are rank 1 of TP = 2
    (KV heads 2, 3): rope_slots=(2, 2) must equal a cache whose rows hold only those two slots."""
    gen = torch.Generator().manual_seed(12)
    seq_lens, block_size, group_size = [1, 19, 70], 16, 16
    row_heads, used = 4, (2, 2)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    cache, block_table = make_paged(seq_lens, block_size, LATENT_DIM + row_heads * ROPE_HEAD_DIM, torch.float32, gen)
    lat, rope = cache[..., :LATENT_DIM], cache[..., LATENT_DIM:].unflatten(-1, (row_heads, ROPE_HEAD_DIM))
    only_used = torch.cat((lat, rope[..., used[0] : used[0] + used[1], :].flatten(-2)), dim=-1)
    q_latent, q_rope = make_queries(len(seq_lens), LATENT_DIM, torch.float32, gen)
    scale = 1.0 / math.sqrt(LATENT_DIM + ROPE_HEAD_DIM)
    if int4:
        def packed(c):
            return int4_pack_rows(c[..., :LATENT_DIM], c[..., LATENT_DIM:], group_size)
        int4_kw = dict(latent_dim=LATENT_DIM, group_size=group_size)
        out, lse = latent_decode_attention_int4(q_latent, q_rope, packed(cache), block_table, lens, scale,
                                                rope_heads=row_heads, rope_slots=used, num_kv_splits=2, **int4_kw)
        want_out, want_lse = latent_decode_attention_ref(q_latent, q_rope, packed(only_used), block_table, lens,
                                                         scale, rope_heads=2, **int4_kw)
    else:
        out, lse = latent_decode_attention(q_latent, q_rope, cache, block_table, lens, scale, rope_heads=row_heads,
                                           rope_slots=used, num_kv_splits=2)
        want_out, want_lse = latent_decode_attention_ref(q_latent, q_rope, only_used, block_table, lens, scale,
                                                         rope_heads=2)
        ref_out, ref_lse = latent_decode_attention_ref(q_latent, q_rope, cache, block_table, lens, scale,
                                                       rope_heads=row_heads, rope_slots=used)
        check_close(ref_out, ref_lse, want_out, want_lse)
    check_close(out, lse, want_out, want_lse)


def test_decode_rejects_bad_inputs():
    q_latent = torch.zeros(2, 4, 48)
    q_rope = torch.zeros(2, 4, 8)
    cache = torch.zeros(3, 16, 56)
    bt = torch.zeros(2, 1, dtype=torch.int32)
    lens = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="rope_heads"):
        latent_decode_attention(q_latent, q_rope, cache, bt, lens, 1.0, rope_heads=3)
    with pytest.raises(ValueError, match="rope_slots"):
        latent_decode_attention(q_latent, q_rope, cache, bt, lens, 1.0, rope_slots=(1, 1))
    with pytest.raises(ValueError, match="k_range"):
        latent_decode_attention(q_latent, q_rope, cache, bt, lens, 1.0, k_range=(0, 32))
    with pytest.raises(ValueError, match="B = 2"):
        latent_decode_attention(q_latent, q_rope, cache, bt[:1], lens, 1.0)
    with pytest.raises(ValueError, match="INT4 kv_cache row"):
        latent_decode_attention_int4(
            q_latent, q_rope, torch.zeros(3, 16, 10, dtype=torch.uint8), bt, lens, 1.0, latent_dim=48, group_size=16
        )
