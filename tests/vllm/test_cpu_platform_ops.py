"""The CPU platform's PyTorch pieces against plain references (no vLLM engine needed).

Paged attention: scatter random K/V into a shuffled paged cache, attend with
chunked queries (the last q_len of seq_len positions), compare with dense causal
attention over the contiguous sequence. Odd lengths and page boundaries, MHA, GQA
and MQA, several head sizes and block sizes.
"""

import math

import pytest
import torch

from vllm_latentkv.platform import ops, paged_attention


def dense_reference(q, k, v, scale, sliding_window=None, soft_cap=None):
    """q [Lq, H, D]; k, v [S, Hkv, D] -> [Lq, H, D]; queries are the last Lq positions."""
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
    v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
    if soft_cap is None:  # torch's own SDPA on the contiguous sequence
        pos = torch.arange(seq_len - q_len, seq_len)[:, None]
        allowed = torch.arange(seq_len)[None, :] <= pos
        if sliding_window is not None:
            allowed &= torch.arange(seq_len)[None, :] > pos - sliding_window
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=allowed, scale=scale,
        )
        return out.transpose(0, 1)
    out = torch.empty_like(q)  # token by token, for the soft cap
    for t in range(q_len):
        pos = seq_len - q_len + t
        lo = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
        s = torch.einsum("hd,jhd->hj", q[t], k[lo : pos + 1]) * scale
        s = soft_cap * torch.tanh(s / soft_cap)
        out[t] = torch.einsum("hj,jhd->hd", s.softmax(-1), v[lo : pos + 1])
    return out


def make_paged_batch(seq_lens, q_lens, num_kv_heads, head_size, block_size, gen):
    """Random K/V per request written through write_kv into a shuffled block pool."""
    blocks_per_req = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 3  # spare blocks stay garbage
    kv_cache = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_size, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = torch.zeros(len(seq_lens), max(blocks_per_req), dtype=torch.int32)
    keys, values, used = [], [], 0
    for r, (seq_len, nb) in enumerate(zip(seq_lens, blocks_per_req)):
        block_table[r, :nb] = perm[used : used + nb].to(torch.int32)
        used += nb
        k = torch.randn(seq_len, num_kv_heads, head_size, generator=gen)
        v = torch.randn(seq_len, num_kv_heads, head_size, generator=gen)
        pos = torch.arange(seq_len)
        slots = block_table[r, pos // block_size].long() * block_size + pos % block_size
        paged_attention.write_kv(k, v, kv_cache, slots)
        keys.append(k)
        values.append(v)
    qsl = [0]
    for q_len in q_lens:
        qsl.append(qsl[-1] + q_len)
    return kv_cache, block_table, qsl, keys, values


@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 2), (6, 1)])
@pytest.mark.parametrize("head_size", [32, 40, 80])
@pytest.mark.parametrize("block_size", [1, 16, 7])
def test_paged_attention_matches_dense(num_heads, num_kv_heads, head_size, block_size):
    gen = torch.Generator().manual_seed(1000 + head_size + block_size)
    # prefill from zero, a chunk after cached context, a decode step, an odd long one
    seq_lens, q_lens = [37, 65, 17, 129], [37, 19, 1, 64]
    kv_cache, block_table, qsl, keys, values = make_paged_batch(
        seq_lens, q_lens, num_kv_heads, head_size, block_size, gen
    )
    query = torch.randn(qsl[-1] + 5, num_heads, head_size, generator=gen)  # + padding
    output = torch.full_like(query, float("nan"))
    scale = head_size**-0.5
    paged_attention.paged_attention(
        query, kv_cache, block_table, qsl, seq_lens, output, scale
    )
    for r in range(len(seq_lens)):
        ref = dense_reference(query[qsl[r] : qsl[r + 1]], keys[r], values[r], scale)
        torch.testing.assert_close(output[qsl[r] : qsl[r + 1]], ref, atol=2e-5, rtol=2e-5)
    assert torch.isnan(output[qsl[-1] :]).all(), "padding rows must be left alone"


def test_paged_attention_sliding_window_and_soft_cap():
    gen = torch.Generator().manual_seed(7)
    seq_lens, q_lens = [50, 23], [13, 23]
    kv_cache, block_table, qsl, keys, values = make_paged_batch(seq_lens, q_lens, 2, 16, 8, gen)
    # Request 0's queries see positions >= 37 - 9 + 1 = 29, in blocks >= 3. Blocks
    # 0-2 may have been freed and reused (sliding-window groups): poison them.
    kv_cache[block_table[0, :3].long()] = float("nan")
    query = torch.randn(qsl[-1], 4, 16, generator=gen) * 4  # large logits: cap matters
    output = torch.empty_like(query)
    paged_attention.paged_attention(
        query, kv_cache, block_table, qsl, seq_lens, output, 0.25,
        sliding_window=9, logits_soft_cap=5.0,
    )
    for r in range(2):
        ref = dense_reference(
            query[qsl[r] : qsl[r + 1]], keys[r], values[r], 0.25, sliding_window=9, soft_cap=5.0
        )
        torch.testing.assert_close(output[qsl[r] : qsl[r + 1]], ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_write_kv_half_cache_and_padding_slots(dtype):
    kv_cache = torch.zeros(4, 2, 4, 2 * 8, dtype=dtype)
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([5, -1, 14])  # -1: padding token, must not be written
    paged_attention.write_kv(key, value, kv_cache, slots)
    k_cache, v_cache = paged_attention.split_kv_cache(kv_cache)
    torch.testing.assert_close(k_cache[1, :, 1], key[0].to(dtype))
    torch.testing.assert_close(v_cache[3, :, 2], value[2].to(dtype))
    assert int((kv_cache != 0).any(-1).sum()) == 2 * 2  # 2 tokens x 2 heads, nothing else


def slot_mapping_loop(qsl, positions, block_table, block_size):
    out = []
    for r in range(len(qsl) - 1):
        for t in range(qsl[r], qsl[r + 1]):
            p = int(positions[t])
            out.append(int(block_table[r, p // block_size]) * block_size + p % block_size)
    return out


def test_slot_mapping_kernel_replacement_matches_loop():
    qsl = torch.tensor([0, 5, 6, 23], dtype=torch.int32)
    positions = torch.cat([torch.arange(3, 8), torch.tensor([40]), torch.arange(0, 17)])
    block_table = torch.randint(0, 100, (4, 8), dtype=torch.int32)
    slot_mapping = torch.full((32,), 12345, dtype=torch.int64)
    ops.compute_slot_mapping_kernel(
        num_tokens=23, max_num_tokens=32, query_start_loc_ptr=qsl, positions_ptr=positions,
        block_table_ptr=block_table, block_table_stride=8, slot_mapping_ptr=slot_mapping,
        KV_CACHE_BLOCK_SIZE=16, TOTAL_CP_WORLD_SIZE=1, TOTAL_CP_RANK=0,
        CP_KV_CACHE_INTERLEAVE_SIZE=1, PAD_ID=-1, BLOCK_SIZE=1024,
    )
    assert slot_mapping[:23].tolist() == slot_mapping_loop(qsl.tolist(), positions, block_table, 16)
    assert (slot_mapping[23:] == -1).all()


def test_cpu_ops_are_registered_with_cpp_schemas():
    ops.register_cpu_ops()
    assert ops.register_cpu_ops() == []  # idempotent
    torch.ops._C.init_cpu_memory_env([0])
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 7.0]])
    assert torch.ops._C.greedy_argmax(logits).tolist() == [1, 2]
    qsl = torch.tensor([0, 2], dtype=torch.int32)
    out = torch.zeros(4, dtype=torch.int64)
    torch.ops._C.compute_slot_mapping_kernel_impl(
        qsl, torch.tensor([4, 5]), torch.tensor([[9, 3]], dtype=torch.int32), out, 4
    )
    assert out.tolist() == [12, 13, 0, 0]


def test_fused_gumbel_argmax_samples_softmax_and_is_seeded():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    logits = probs.log().expand(n, -1).contiguous()
    seeds = torch.arange(n)
    draws = torch.ops._C.fused_gumbel_argmax(logits, seeds)
    freq = torch.bincount(draws, minlength=4).float() / n
    # 4000 draws: standard error <= 0.008; 4 sigma
    torch.testing.assert_close(freq, probs, atol=0.032, rtol=0)
    assert torch.equal(draws, torch.ops._C.fused_gumbel_argmax(logits, seeds))
    # a row's draw depends on its own seed only, not on the rest of the batch
    assert int(torch.ops._C.fused_gumbel_argmax(logits[:1], seeds[7:8])) == int(draws[7])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_packed_linear_is_linear_with_fp32_bias(dtype):
    # vLLM's AMX GEMM path (bf16/fp16 layers): pack once, then out = x @ W^T + b.
    ops.register_cpu_ops()
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 40, generator=gen).to(dtype)
    x = torch.randn(5, 40, generator=gen).to(dtype)
    bias = torch.randn(24, generator=gen)  # vLLM hands the bias over as float32
    packed = torch.ops._C.convert_weight_packed(weight)
    out = torch.empty(5, 24, dtype=dtype)
    torch.ops._C.weight_packed_linear(out, x, packed, bias, True)
    ref = x.double() @ weight.double().t() + bias.double()
    torch.testing.assert_close(out, ref.to(dtype))


def test_mla_decode_kvcache_is_mqa_over_each_requests_pages():
    """vLLM's CPU_MLA decode: per request, softmax(q . row * scale) over its cache rows (shuffled
    pages, lengths on and off page boundaries), weighted sum of the rows' latent part."""
    ops.register_cpu_ops()
    gen = torch.Generator().manual_seed(4)
    heads, latent, rope, block_size, num_blocks = 3, 10, 4, 4, 12
    cache = torch.randn(num_blocks, block_size, latent + rope, generator=gen)
    seq_lens = torch.tensor([1, 4, 9], dtype=torch.int32)
    block_tables = torch.randperm(num_blocks, generator=gen)[:9].view(3, 3).to(torch.int32)
    query = torch.randn(3, heads, latent + rope, generator=gen)
    out = torch.full((3, heads, latent), float("nan"))
    torch.ops._C.mla_decode_kvcache(out, query, cache, 0.3, block_tables, seq_lens)
    for b, n in enumerate(seq_lens.tolist()):
        rows = cache[block_tables[b].long()].reshape(-1, latent + rope)[:n]  # the request's rows in order
        k, v = rows.unsqueeze(0).expand(heads, -1, -1), rows[:, :latent].unsqueeze(0).expand(heads, -1, -1)
        ref = torch.nn.functional.scaled_dot_product_attention(query[b].unsqueeze(1), k, v, scale=0.3)
        torch.testing.assert_close(out[b], ref.squeeze(1))
