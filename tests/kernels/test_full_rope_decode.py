"""full_rope_decode_attention (keys rebuilt from the latent, RoPE fused) vs the torch reference.

Tolerances: see kernel_helpers.py (the reference also rebuilds and rotates the keys in fp32).
"""

import math
import os

import pytest
import torch
import triton
import triton.language as tl
from kernel_helpers import KERNEL_DTYPES, check_close, make_paged

from latentkv.int4 import int4_pack_rows, int4_row_bytes
from vllm_latentkv.kernels import (
    full_rope_decode_attention,
    full_rope_decode_attention_int4,
    full_rope_decode_attention_ref,
)
from vllm_latentkv.kernels.full_rope_decode import _cos_sin, rotate_half_rope


HEAD_DIM = 32
V_LEN = 32
RANK = 16  # per key-latent group


def make_problem(seq_lens, block_size, num_heads, num_kv_heads, key_groups, dtype, gen):
    cache, block_table = make_paged(seq_lens, block_size, key_groups * RANK + V_LEN, dtype, gen)
    w_uk = (torch.randn(num_kv_heads, HEAD_DIM, RANK, generator=gen) / math.sqrt(RANK)).to(dtype)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    q = torch.randn(len(seq_lens), num_heads, HEAD_DIM, generator=gen).to(dtype)
    return q, cache, w_uk, inv_freq, block_table, torch.tensor(seq_lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("key_groups", [1, 2])  # joint key latent; Palu per-KV-head groups
def test_full_rope_matches_reference(dtype, block_size, key_groups):
    gen = torch.Generator().manual_seed(20)
    seq_lens = [1, 17, 1025, 1027]
    q, cache, w_uk, inv_freq, bt, lens = make_problem(seq_lens, block_size, 4, 2, key_groups, dtype, gen)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    out, lse = full_rope_decode_attention(q, cache, w_uk, inv_freq, bt, lens, scale, key_groups=key_groups, num_kv_splits=4)
    ref = full_rope_decode_attention_ref(q, cache, w_uk, inv_freq, bt, lens, scale, key_groups=key_groups)
    assert out.shape == (4, 4, V_LEN) and out.dtype == dtype
    check_close(out, lse, *ref)


@pytest.mark.parametrize("num_heads,num_kv_heads,key_groups", [(4, 4, 2), (8, 2, 1), (40, 2, 2)])
def test_full_rope_head_layouts(num_heads, num_kv_heads, key_groups):
    """MHA with 2 KV heads per key group; GQA 4:1; 20 heads per KV head (two head blocks)."""
    gen = torch.Generator().manual_seed(21)
    seq_lens = [40, 0, 3]
    q, cache, w_uk, inv_freq, bt, lens = make_problem(seq_lens, 16, num_heads, num_kv_heads, key_groups, torch.float32, gen)
    out, lse = full_rope_decode_attention(q, cache, w_uk, inv_freq, bt, lens, 0.2, key_groups=key_groups, num_kv_splits=3)
    check_close(out, lse, *full_rope_decode_attention_ref(q, cache, w_uk, inv_freq, bt, lens, 0.2, key_groups=key_groups))
    assert torch.all(lse[1] == float("-inf"))


@pytest.mark.parametrize("key_groups,rank1_groups", [(4, (2, 2)), (2, (1, 1)), (1, (0, 1))])
@pytest.mark.parametrize("int4", [False, True])
def test_tensor_parallel_rank_equals_its_heads_of_the_whole_call(key_groups, rank1_groups, int4):
    """8 query / 4 KV heads; rank 1 of TP = 2 holds query heads 4..7 and KV heads 2, 3 (w_uk rows
    2, 3) and reads key groups rank1_groups of the row: its call must give those heads' output of
    the whole call."""
    gen = torch.Generator().manual_seed(23)
    seq_lens = [1, 21, 70]
    q, cache, w_uk, inv_freq, bt, lens = make_problem(seq_lens, 16, 8, 4, key_groups, torch.float32, gen)
    kw = dict(key_groups=key_groups, num_kv_splits=2)
    if int4:
        cache = int4_pack_rows(cache, cache[..., :0], 16)
        kw.update(latent_dim=key_groups * RANK + V_LEN, group_size=16)
    decode = full_rope_decode_attention_int4 if int4 else full_rope_decode_attention
    whole_out, whole_lse = decode(q, cache, w_uk, inv_freq, bt, lens, 0.2, **kw)
    out, lse = decode(q[:, 4:].contiguous(), cache, w_uk[2:].contiguous(), inv_freq, bt, lens, 0.2,
                      key_groups_used=rank1_groups, **kw)
    check_close(out, lse, whole_out[:, 4:], whole_lse[:, 4:])
    kw.pop("num_kv_splits")
    ref = full_rope_decode_attention_ref(q[:, 4:], cache, w_uk[2:], inv_freq, bt, lens, 0.2,
                                         key_groups_used=rank1_groups, **kw)
    check_close(out, lse, *ref)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("int4", [False, True])
@pytest.mark.parametrize("key_groups", [1, 2])
def test_joint_latent_with_key_bias_and_key_norm(dtype, int4, key_groups):
    """One joint latent read as keys and values (v_range = the whole row); Qwen2's key bias and
    Qwen3's per-KV-head key RMSNorm applied to the rebuilt key before RoPE."""
    gen = torch.Generator().manual_seed(24)
    seq_lens = [1, 33, 90]
    width = 2 * RANK  # key_groups x GROUP_RANK = width
    cache, bt = make_paged(seq_lens, 16, width, torch.float32, gen)
    w_uk = torch.randn(2, HEAD_DIM, width // key_groups, generator=gen) / math.sqrt(width // key_groups)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    q = torch.randn(len(seq_lens), 4, HEAD_DIM, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    kw = dict(key_groups=key_groups, v_range=(0, width), b_k=torch.randn(2, HEAD_DIM, generator=gen),
              k_gain=1.0 + 0.3 * torch.randn(2, HEAD_DIM, generator=gen), norm_eps=1e-6)
    if int4:
        cache = int4_pack_rows(cache, cache[..., :0], 16)
        kw.update(latent_dim=width, group_size=16)
    decode = full_rope_decode_attention_int4 if int4 else full_rope_decode_attention
    q, w_uk = q.to(dtype), w_uk.to(dtype)
    if not int4:
        cache = cache.to(dtype)
    out, lse = decode(q, cache, w_uk, inv_freq, bt, lens, 0.25, num_kv_splits=2, **kw)
    assert out.shape == (3, 4, width)
    check_close(out, lse, *full_rope_decode_attention_ref(q, cache, w_uk, inv_freq, bt, lens, 0.25, **kw))
    # the norm matters: without it the same call gives other scores
    plain, _ = full_rope_decode_attention_ref(q, cache, w_uk, inv_freq, bt, lens, 0.25,
                                              **{**kw, "k_gain": None, "b_k": None})
    assert (plain - out.float()).abs().max() > 1e-2


def test_full_rope_int4_matches_reference():
    gen = torch.Generator().manual_seed(22)
    seq_lens = [1, 17, 300]
    q, cache, w_uk, inv_freq, bt, lens = make_problem(seq_lens, 16, 4, 2, 2, torch.float32, gen)
    latent_dim, group_size = cache.shape[-1], 16
    packed = int4_pack_rows(cache, cache[..., :0], group_size)
    assert packed.shape[-1] == int4_row_bytes(latent_dim, 0, group_size)
    kw = dict(latent_dim=latent_dim, group_size=group_size, key_groups=2)
    out, lse = full_rope_decode_attention_int4(q, packed, w_uk, inv_freq, bt, lens, 0.2, num_kv_splits=2, **kw)
    check_close(out, lse, *full_rope_decode_attention_ref(q, packed, w_uk, inv_freq, bt, lens, 0.2, **kw))


def test_reference_rope_is_hf_rope():
    """The reference rotation is HF Llama's apply_rotary_pos_emb (half-split layout)."""
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(7, 3, HEAD_DIM, generator=gen)
    pos = torch.tensor([0, 1, 5, 17, 100, 1025, 4097])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    freqs = pos.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), -1)
    # HF takes [batch, heads, seq, dim] and cos/sin [batch, seq, dim]
    hf, _ = modeling.apply_rotary_pos_emb(
        x.permute(1, 0, 2)[None], x.permute(1, 0, 2)[None], emb.cos()[None], emb.sin()[None]
    )
    torch.testing.assert_close(rotate_half_rope(x, pos, inv_freq), hf[0].permute(1, 0, 2))


@triton.jit
def _cos_sin_kernel(angle_ptr, cos_ptr, sin_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    c, s = _cos_sin(tl.load(angle_ptr + offs))
    tl.store(cos_ptr + offs, c)
    tl.store(sin_ptr + offs, s)


def test_cos_sin_range_reduction_long_positions():
    """Positions up to 131072 with the fastest frequency: the reduced cos/sin match torch on the
    same fp32 angles to 1e-5 (the reduction error is ~k * ulp(C2), k < 2^15)."""
    pos = torch.tensor([0, 1, 2, 1023, 1024, 4095, 32767, 65536, 100000, 131071] + [7] * 6).float()
    angle = pos * torch.tensor(1.0)  # inv_freq[0] = 1
    angle[-3:] = torch.tensor([-3.5, 3.2, 1e-3])
    device = os.environ.get("LATENTKV_KERNEL_DEVICE", "cpu")  # the kernel runs where the others do
    angle_d = angle.to(device)
    c, s = torch.empty_like(angle_d), torch.empty_like(angle_d)
    _cos_sin_kernel[(1,)](angle_d, c, s, N=16)
    c, s = c.cpu(), s.cpu()
    torch.testing.assert_close(c, angle.double().cos().float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(s, angle.double().sin().float(), atol=1e-5, rtol=0)


def test_full_rope_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(25)
    q, cache, w_uk, inv_freq, bt, lens = make_problem([3], 16, 4, 2, 1, torch.float32, gen)
    with pytest.raises(ValueError, match="v_range"):
        full_rope_decode_attention(q, cache, w_uk, inv_freq, bt, lens, 0.2, v_range=(8, cache.shape[-1]))
    with pytest.raises(ValueError, match="b_k must be"):
        full_rope_decode_attention(q, cache, w_uk, inv_freq, bt, lens, 0.2, b_k=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="key_groups_used"):
        full_rope_decode_attention(q, cache, w_uk, inv_freq, bt, lens, 0.2, key_groups_used=(1, 1))


@pytest.mark.parametrize("kernel", ["full_rope", "latent"])
def test_token_filter_skipped_rows_exit_early(kernel):
    """Token Filtering hands a skipped decode row an attended length of 0 (on the device): its
    split loops run no iteration, its output is 0 and lse -inf, and the kept rows are what the
    unfiltered call gives them."""
    from vllm_latentkv.kernels import latent_decode_attention

    gen = torch.Generator().manual_seed(23)
    seq_lens = [40, 300, 3, 129]
    keep = torch.tensor([1, 0, 1, 0], dtype=torch.int32)
    if kernel == "full_rope":
        q, cache, w_uk, inv_freq, bt, lens = make_problem(seq_lens, 16, 4, 2, 2, torch.float32, gen)
        run = lambda n: full_rope_decode_attention(q, cache, w_uk, inv_freq, bt, n, 0.2, key_groups=2, num_kv_splits=3)  # noqa: E731
    else:
        cache, bt = make_paged(seq_lens, 16, 48 + 16, torch.float32, gen)
        q_lat, q_rope = torch.randn(4, 4, 48, generator=gen), torch.randn(4, 4, 16, generator=gen)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        run = lambda n: latent_decode_attention(q_lat, q_rope, cache, bt, n, 0.2, num_kv_splits=3)  # noqa: E731
    out, lse = run(lens * keep)
    full_out, full_lse = run(lens)
    skipped = keep == 0
    assert torch.all(out[skipped] == 0) and torch.all(lse[skipped] == float("-inf"))
    torch.testing.assert_close(out[~skipped], full_out[~skipped], atol=0, rtol=0)
    torch.testing.assert_close(lse[~skipped], full_lse[~skipped], atol=0, rtol=0)
