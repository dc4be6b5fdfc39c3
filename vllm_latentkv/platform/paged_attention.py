"""Paged attention in plain PyTorch: the math of the CPU reference backend.

Symbols (vLLM's logical per-layer KV-cache view, ``[B, H, N, C]``):

    T      tokens scheduled in this step (all requests, concatenated)
    R      requests in the batch
    H      query heads, Hkv KV heads, G = H / Hkv query heads per KV head (GQA)
    D      head size (any value)
    NB     cache blocks, BS tokens per block
    kv_cache   [NB, Hkv, BS, 2*D]: key in [..., :D], value in [..., D:]
    block_table [R, max_blocks]: request r's j-th block of tokens lives in cache
               block ``block_table[r, j]``
    slot       ``block * BS + offset``: where one token's K/V is stored

A step attends request r's query tokens, which are the *last* ``q_len_r`` of its
``seq_len_r`` tokens, to all ``seq_len_r`` keys read back from the paged cache:
what earlier steps cached (prefix-cache hits, earlier prefill chunks, decoded
tokens) and this step's own keys, written by :func:`write_kv` just before. That is
what makes chunked prefill and prefix caching work: nothing but the cache carries
context between steps.

    out[t, h] = softmax_j( scale * q[t, h] . k[j, h // G] + mask[t, j] ) . v[j, h // G]
    mask[t, j] = 0 if pos_k(j) <= pos_q(t) (causal) and
                 pos_q(t) - pos_k(j) < window (sliding window), else -inf

Everything is computed in float32 and written in the output's dtype. One request
at a time, no fused kernel: correctness over speed.
"""

import torch


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[NB, Hkv, BS, 2*D] -> key, value views, each [NB, Hkv, BS, D]."""
    head_size = kv_cache.shape[-1] // 2
    return kv_cache[..., :head_size], kv_cache[..., head_size:]


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store each token's K/V at its slot. key, value: [>= T, Hkv, D]; slots [T].

    Negative slots are padding (vLLM's PAD_SLOT_ID) and are skipped.
    """
    key_cache, value_cache = split_kv_cache(kv_cache)
    block_size = kv_cache.shape[2]
    num_tokens = slot_mapping.shape[0]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].to(torch.int64)
    blocks, offsets = slots // block_size, slots % block_size
    # Advanced indices around a slice put the token dim first: [T', Hkv, D].
    key_cache[blocks, :, offsets] = key[:num_tokens][valid].to(key_cache.dtype)
    value_cache[blocks, :, offsets] = value[:num_tokens][valid].to(value_cache.dtype)


def gather_kv(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int, first_block: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one request's tokens [first_block * BS, seq_len) back: two [Hkv, S', D]."""
    key_cache, value_cache = split_kv_cache(kv_cache)
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    ids = block_ids[first_block:num_blocks].to(torch.int64)
    length = seq_len - first_block * block_size

    def gather(cache: torch.Tensor) -> torch.Tensor:
        # [nb, Hkv, BS, D] -> [Hkv, nb * BS, D] -> [Hkv, S', D]
        pages = cache[ids].transpose(0, 1)
        return pages.reshape(pages.shape[0], -1, pages.shape[-1])[:, :length]

    return gather(key_cache), gather(value_cache)


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    seq_len: int | None = None,
) -> torch.Tensor:
    """One request. query [Lq, H, D]; key, value [Hkv, S', D]. Returns fp32 [Lq, H, D].

    The queries are the last Lq of seq_len positions (default S'); the keys are
    the last S' of them.
    """
    q_len, num_heads, head_size = query.shape
    num_kv_heads, num_keys, _ = key.shape
    seq_len = num_keys if seq_len is None else seq_len
    group = num_heads // num_kv_heads
    # [Lq, H, D] -> [Hkv, G, Lq, D]: query head h uses KV head h // G.
    q = query.float().view(q_len, num_kv_heads, group, head_size).permute(1, 2, 0, 3)
    k, v = key.float().unsqueeze(1), value.float().unsqueeze(1)  # [Hkv, 1, S', D]
    scores = (q @ k.transpose(-1, -2)) * scale  # [Hkv, G, Lq, S']
    if logits_soft_cap:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)  # [Lq, 1]
    k_pos = torch.arange(seq_len - num_keys, seq_len).unsqueeze(0)  # [1, S']
    allowed = torch.ones(q_len, num_keys, dtype=torch.bool)
    if causal:
        allowed &= k_pos <= q_pos
    if sliding_window is not None and sliding_window > 0:
        allowed &= q_pos - k_pos < sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(dim=-1) @ v  # [Hkv, G, Lq, D]
    return out.permute(2, 0, 1, 3).reshape(q_len, num_heads, head_size)


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: list[int],
    seq_lens: list[int],
    output: torch.Tensor,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """All requests of a step. query, output: [>= T, H, D]; T = query_start_loc[-1].

    query_start_loc: R + 1 offsets into the token dim; seq_lens: R context lengths
    (cached + this step's tokens). Writes ``output[:T]`` and returns ``output``.
    """
    for r, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[r], query_start_loc[r + 1]
        if end == start:
            continue
        first_block = 0
        if sliding_window is not None and sliding_window > 0:
            # Blocks wholly outside every query's window may already be freed
            # (sliding-window KV groups): do not read them.
            first_key = max(0, seq_len - (end - start) - sliding_window + 1)
            first_block = first_key // kv_cache.shape[2]
        key, value = gather_kv(kv_cache, block_table[r], seq_len, first_block)
        out = attend(
            query[start:end], key, value, scale, causal, sliding_window,
            logits_soft_cap, seq_len,
        )
        output[start:end] = out.to(output.dtype)
    return output
