"""LATENTKV_MLA: the attention backend of latent layers (paged latent cache, see ``cache.py``).

Capabilities (class level): decoder self-attention, causal; caches "auto" (the model dtype,
or float16/bfloat16/float32 from ``--kv-cache-dtype``) and "int4" (selected by the model's
``latent_kv.cache_dtype``, not by ``--kv-cache-dtype``); any block size; chunked prefill and
prefix caching (every step reads its whole context back from the paged cache).

The flow is one way, as in vLLM's own MLA: the layer (``layer.py``) projects the step's tokens to
queries, latents and rope keys; :class:`LatentKVAttentionImpl` does everything after that:

* writes the rows ``[c | k_rope | key scales]`` (or packed INT4 rows) at the slot mapping;
* one-token requests (decode) on the Triton kernels ``latent_decode_attention[_int4]`` (absorbed,
  DeepSeek-V2 / MHA2MLA App. B) or ``full_rope_decode_attention[_int4]`` (full RoPE: keys rebuilt
  and rotated in the kernel, values absorbed) when Triton can run (``LATENTKV_TRITON``, see
  ``latentkv.settings``) and the layer's layout suits them;
* everything else on the PyTorch path: each request's rows read back, then
  ``latentkv.attention`` (expanded for prefill, absorbed for decode);
* W_uv after the attention-weighted latent sum;
* Token Filtering (``latentkv.token_filter``), when the layer is filtered: each new token's
  keep/skip decision from the features of the last ``Q + W`` cached rows of its request (read back
  from the paged cache: no per-request state, so preemption, chunked prefill and prefix-cache hits
  need nothing), then skipped tokens do no attention work: a skipped decode row is given an
  attended length of 0, on which the kernels' split loops run no iteration (the early exit,
  decided on the device: no host sync), and the PyTorch path attends the kept rows only.

The kernel-or-torch choice, the float32 up-projections and the index maps are fixed once in
:meth:`LatentKVAttentionImpl.prepare`, after the weights are loaded: nothing is cast, moved or read
from the environment per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn.attention.bias import causal_lower_right

from latentkv import attention as attn
from latentkv.settings import settings
from latentkv.token_filter import TokenFilterOptions, keep_last
from vllm_latentkv.attention import BACKEND_NAME
from vllm_latentkv._vllm import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionSpec,
    CommonAttentionMetadata,
    MultipleOf,
    VllmConfig,
)
from vllm_latentkv.attention.cache import LatentCacheLayout



def triton_usable(device: torch.device) -> bool:
    """Whether our kernels can run on tensors of this device (``LATENTKV_TRITON``, read once per layer)."""
    env = settings()
    if env.triton == "off":
        return False
    runnable = device.type == "cuda" or env.triton_interpret
    if env.triton == "on" and not runnable:
        raise RuntimeError(f"LATENTKV_TRITON=1 but Triton cannot run on {device} (set TRITON_INTERPRET=1 on CPU)")
    if not runnable:
        return False
    try:
        import vllm_latentkv.kernels  # noqa: F401  (imports triton)
    except ImportError:
        return False
    return True


class LatentKVAttentionBackend(AttentionBackend):
    # The layer writes this step's rows itself before attending.
    forward_includes_kv_cache_update: bool = True
    accept_output_buffer: bool = False

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16", "float32", "int4"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["LatentKVAttentionImpl"]:
        return LatentKVAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["LatentKVMetadataBuilder"]:
        return LatentKVMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any latent + rope width

    @classmethod
    def is_mla(cls) -> bool:
        return True

    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        return (num_blocks, 1, block_size, head_size)


@dataclass
class LatentKVMetadata:
    num_actual_tokens: int
    query_start_loc: list[int]  # [R + 1], host
    seq_lens: list[int]  # [R], host: cached context + this step's tokens
    block_table: torch.Tensor  # [R, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64
    # one-token requests (absorbed decode): request indices, their tokens, tensors for kernels
    decode_reqs: list[int]
    decode_tokens: torch.Tensor  # [B_d] int64
    decode_seq_lens: torch.Tensor  # [B_d] int32
    decode_block_table: torch.Tensor  # [B_d, max_blocks] int32


class LatentKVMetadataBuilder(AttentionMetadataBuilder[LatentKVMetadata]):
    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.device = device

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False) -> LatentKVMetadata:
        m = common_attn_metadata
        if isinstance(m.causal, torch.Tensor) or not m.causal:
            raise NotImplementedError(f"{BACKEND_NAME} supports causal decoder attention only")
        num_reqs = m.num_reqs
        qsl = m.query_start_loc_cpu[: num_reqs + 1].tolist()
        seq_lens = m.seq_lens[:num_reqs].cpu().tolist()
        block_table = m.block_table_tensor[:num_reqs]
        decode = [r for r in range(num_reqs) if qsl[r + 1] - qsl[r] == 1]
        idx = torch.tensor(decode, dtype=torch.int64, device=block_table.device)
        return LatentKVMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=qsl,
            seq_lens=seq_lens,
            block_table=block_table,
            slot_mapping=m.slot_mapping,
            decode_reqs=decode,
            decode_tokens=torch.tensor([qsl[r] for r in decode], dtype=torch.int64, device=self.device),
            decode_seq_lens=torch.tensor([seq_lens[r] for r in decode], dtype=torch.int32, device=self.device),
            decode_block_table=block_table.index_select(0, idx).to(torch.int32),
        )


class LatentKVAttentionImpl(AttentionImpl[LatentKVMetadata]):
    """One latent layer after its projections: cache writes, attention (kernels or torch) and W_uv."""

    def __init__(self, heads: attn.LatentHeads, layout: LatentCacheLayout, kv_cache_dtype: str = "auto",
                 token_filter: TokenFilterOptions | None = None, layer_idx: int = 0) -> None:
        if kv_cache_dtype not in LatentKVAttentionBackend.supported_kv_cache_dtypes:
            raise NotImplementedError(
                f"{BACKEND_NAME} does not support --kv-cache-dtype={kv_cache_dtype!r}: latent caches are "
                "'auto' (model dtype) or INT4 via --hf-overrides '{\"latent_kv_cache_dtype\": \"int4\"}'"
            )
        self.heads, self.layout = heads, layout
        self.kv_cache_dtype = "int4" if layout.int4 else kv_cache_dtype
        self.weights: attn.LatentWeights | None = None
        self.token_filter, self.layer_idx = token_filter, layer_idx

    # -- once, after loading ---------------------------------------------------------------------
    def prepare(self, weights: attn.LatentWeights, device: torch.device) -> None:
        """Fix the run-time form: float32 weights and index maps on ``device``, the kernel choice."""
        h = self.heads = self.heads.to(device)
        self.weights = weights.prepared(device)
        self.write_on_kernel = triton_usable(device)
        kv_rows = h.chunk_of_kv.tolist()
        self.key_groups_used = _contiguous_share(kv_rows)
        self.rope_slots = _contiguous_share(h.slot_of_head.tolist()) if h.R_H else None
        if h.full:  # full_rope_decode_attention rebuilds (biased, normed) keys and rotates them itself
            self.decode_on_kernel = self.write_on_kernel and self.key_groups_used is not None
        else:  # latent_decode_attention: absorbed NoPE scores over one k range, this rank's rope slots
            self.decode_on_kernel = (self.write_on_kernel and not h.key_scale and h.d_n > 0
                                     and self.rope_slots is not None)
        self.chunk_of_head = h.chunk_of_kv.index_select(0, h.kv_of_head)[None, :, None, None]  # [1, H, 1, 1]
        self.inv_freq = h.source_freqs.float()
        kernel_dtype = torch.float32 if self.layout.int4 else self.layout.dtype
        self.kernel_w_uk = None if self.weights.w_uk is None else self.weights.w_uk.to(kernel_dtype).contiguous()
        self.num_kv_splits = 4 if torch.device(device).type == "cpu" else 8
        # (start, length) of the key and value latents in the row (all groups), for the kernels
        self.k_range = (h.k_slice.start, h.k_slice.stop - h.k_slice.start)
        self.v_range = (h.v_slice.start, h.v_slice.stop - h.v_slice.start)

    # -- every step ------------------------------------------------------------------------------
    def forward(self, q_nope, q_rope, latent, tail, kv_cache, meta: "LatentKVMetadata", slot_mapping) -> torch.Tensor:
        """q_nope, q_rope [T, H, .] (normed, rotated, fp32), this step's rows: latent [T, W] and tail
        [T, R_H R_D (+ key scales)] -> attention output o [T, H, d_h] float32 (before o_proj)."""
        self.write(latent, tail, kv_cache, slot_mapping)
        o = q_nope.new_zeros(q_nope.shape[0], q_nope.shape[1], self.heads.d_h)
        keep = torch.ones(q_nope.shape[0], dtype=torch.int32, device=o.device) if self.token_filter else None
        on_kernel = set()
        if meta.decode_reqs and self.decode_on_kernel:
            idx = meta.decode_tokens
            attended = meta.decode_seq_lens
            if keep is not None:
                keep[idx] = self.decode_decisions(kv_cache, meta)
                attended = attended * keep[idx]  # 0: the kernels' split loops run no iteration
            o[idx] = self._decode_on_kernel(q_nope[idx], q_rope[idx], kv_cache, meta.decode_block_table, attended)
            on_kernel = set(meta.decode_reqs)
        qsl = meta.query_start_loc
        for r, seq_len in enumerate(meta.seq_lens):
            start, end = qsl[r], qsl[r + 1]
            if end > start and r not in on_kernel:
                cached = self.read(kv_cache, meta.block_table[r], seq_len)  # read once: decisions and attention
                rows = None
                if keep is not None:
                    keep[start:end] = self._keep_from_rows(cached, end - start)
                    rows = keep[start:end].nonzero()[:, 0]  # host sync: the torch path only
                    if rows.numel() == 0:
                        continue
                o[start:end] = self._attend_request(q_nope[start:end], q_rope[start:end], cached, rows)
        return o if keep is None else o * keep[:, None, None]

    def decode_decisions(self, kv_cache, meta: "LatentKVMetadata") -> torch.Tensor:
        """Token Filtering's keep (int32 0/1) of the decode batch's tokens, from one batched gather of
        each request's last ``1 + context`` cached rows, on the device with no host sync; a pure
        function of the cached rows (``latentkv.token_filter``)."""
        seq_lens = meta.decode_seq_lens.to(torch.int64)
        lat, rope, key_scale, pos, valid = self.read_window(kv_cache, meta.decode_block_table, seq_lens,
                                                            1 + self.token_filter.context)
        return self._decide(lat, rope, key_scale, pos, valid, 1)[:, 0]

    def _keep_from_rows(self, cached, count: int) -> torch.Tensor:
        """Decisions for the last ``count`` of one request's rows as :meth:`read` returned them -> [count] int32."""
        lat, rope, key_scale = cached
        S = lat.shape[0]
        n = min(S, count + self.token_filter.context)  # the rows the decisions depend on
        pos = torch.arange(S - n, S, device=lat.device)
        tail = lambda t: None if t is None else t[S - n :][None]  # noqa: E731
        return self._decide(tail(lat), tail(rope), tail(key_scale), pos[None], torch.ones_like(pos, dtype=torch.bool)[None],
                            count)[0]

    def _decide(self, lat, rope, key_scale, pos, valid, count: int) -> torch.Tensor:
        """[B, n] cached rows (positions, valid) -> keep [B, count] int32 of each request's last count tokens."""
        k, v = attn.token_filter_features(lat, rope, key_scale, pos, self.heads, self.weights, self.token_filter.features)
        return keep_last(k, v, valid, pos, count, self.token_filter, self.layer_idx).to(torch.int32)

    def write(self, latent: torch.Tensor, tail: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """latent [T, W], tail [T, R_H R_D (+ K key scales)] (rotated) -> the rows at slot_mapping (-1 = skip)."""
        L = self.layout
        cache = _rows(kv_cache)
        num = slot_mapping.shape[0]
        latent, tail = latent[:num].contiguous(), tail[:num].contiguous()
        if self.write_on_kernel and cache.stride(-1) == 1:
            from vllm_latentkv import kernels

            if L.int4:
                kernels.latent_cache_write_int4(latent, tail, cache, slot_mapping, L.group_size)
            else:
                kernels.latent_cache_write(latent, tail, cache, slot_mapping)
            return
        valid = slot_mapping >= 0
        slots = slot_mapping[valid].to(torch.int64)
        page = cache.shape[1]
        if L.int4:
            from latentkv.int4 import int4_pack_rows

            rows = int4_pack_rows(latent[valid], tail[valid], L.group_size)
        else:
            rows = torch.cat((latent[valid], tail[valid]), dim=-1).to(cache.dtype)
        cache[slots // page, slots % page] = rows

    def read(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int):
        """One request's first seq_len rows: (latent fp32 [S, W], rope fp32 [S, R_H, R_D],
        key scales fp32 [S, K] or None when the layout has none)."""
        cache = _rows(kv_cache)
        page = cache.shape[1]
        n_blocks = -(-seq_len // page)
        return self.unpack(cache[block_ids[:n_blocks].to(torch.int64)].reshape(-1, cache.shape[-1])[:seq_len])

    def read_window(self, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, n: int):
        """The last n rows of B requests (a gather on the device, no host sync): (latent, rope,
        key scales) as :meth:`read` with a leading [B, n], positions [B, n] (clamped at 0) and
        valid [B, n] (False before a request's first token)."""
        cache = _rows(kv_cache)
        page = cache.shape[1]
        pos = seq_lens[:, None] - n + torch.arange(n, device=seq_lens.device)
        valid = pos >= 0
        pos = pos.clamp(min=0)
        blocks = block_table.to(torch.int64).gather(1, pos // page)
        lat, rope, key_scale = self.unpack(cache[blocks, pos % page])
        return lat, rope, key_scale, pos, valid

    def unpack(self, rows: torch.Tensor):
        """Cache rows [..., row] -> (latent fp32 [..., W], rope fp32 [..., R_H, R_D], key scales fp32 or None)."""
        L = self.layout
        if L.int4:
            from latentkv.int4 import int4_unpack_rows

            lat, tail = int4_unpack_rows(rows, L.latent_dim, L.tail_dim, L.group_size)
        else:
            lat, tail = rows[..., : L.latent_dim], rows[..., L.latent_dim :]
        rope = tail[..., : L.rope_dim].float().unflatten(-1, (L.rope_heads, L.rope_head_dim))
        key_scale = tail[..., L.rope_dim :].float() if L.key_scales else None
        return lat.float(), rope, key_scale

    # -- the PyTorch path: latentkv.attention on one request's rows -------------------------------
    def _attend_request(self, q_nope, q_rope, cached, rows: torch.Tensor | None = None) -> torch.Tensor:
        """q [L, H, .] of the request's last L of its S cached positions (``cached``: :meth:`read`'s
        rows) -> o [L, H, d_h]; with ``rows`` (Token Filtering's kept rows) only those are computed,
        the others are 0."""
        lat, rope_k, key_scale = cached
        L, S = q_nope.shape[0], lat.shape[0]
        k_pos = torch.arange(S, device=lat.device)
        batch = lambda t: None if t is None else t[None]  # noqa: E731  (the core's leading batch dim)
        cached = (lat[None], rope_k[None], batch(key_scale), k_pos[None])
        if rows is not None and rows.numel() < L:  # a subset of the queries: an explicit causal mask
            o = torch.zeros(L, q_nope.shape[1], self.heads.d_h, device=q_nope.device)
            mask = attn.causal_mask((S - L + rows)[None], k_pos[None])
            attend = attn.absorbed_attention if rows.numel() == 1 else attn.expanded_attention
            o[rows] = attend(q_nope[rows][None], q_rope[rows][None], *cached, mask, self.heads, self.weights)[0]
            return o
        if L == 1:  # absorbed (MHA2MLA App. B): scores and the value sum in latent space
            mask = attn.causal_mask(k_pos[S - 1 :][None], k_pos[None])
            o = attn.absorbed_attention(q_nope[None], q_rope[None], *cached, mask, self.heads, self.weights)
        else:  # expanded: one SDPA call, causal with the queries at the last L of S positions
            o = attn.expanded_attention(q_nope[None], q_rope[None], *cached, causal_lower_right(L, S), self.heads, self.weights)
        return o[0]

    # -- decode on the Triton kernels -------------------------------------------------------------
    def _decode_on_kernel(self, q_nope, q_rope, kv_cache, block_table, seq_lens) -> torch.Tensor:
        """One query token per request: q [B, H, .] -> o [B, H, d_h]; each attends to its first
        seq_lens[b] cached tokens (0: none, the kernels exit at once)."""
        from vllm_latentkv import kernels

        h, L = self.heads, self.layout
        cache = _rows(kv_cache)
        B, H = q_nope.shape[:2]
        paged = (block_table, seq_lens, h.scale)
        kernel_dtype = torch.float32 if L.int4 else cache.dtype
        common = dict(out_dtype=torch.float32, num_kv_splits=self.num_kv_splits)
        int4 = dict(latent_dim=L.latent_dim, group_size=L.group_size) if L.int4 else {}
        if h.full:
            w = self.weights
            o_lat, _ = (kernels.full_rope_decode_attention_int4 if L.int4 else kernels.full_rope_decode_attention)(
                q_nope.to(kernel_dtype).contiguous(), cache, self.kernel_w_uk, self.inv_freq, *paged,
                key_groups=h.n_grp, key_groups_used=self.key_groups_used, v_range=self.v_range, b_k=w.b_k,
                k_gain=w.k_gain, norm_eps=h.eps, **common, **int4,
            )
        else:
            q_lat = attn.absorbed_query(q_nope, h, self.weights)  # [B, H, r_k / n_grp]
            if h.n_grp > 1:  # zero outside each head's chunk: one pass over the page serves all groups
                spread = q_lat.new_zeros(B, H, h.n_grp, q_lat.shape[-1])
                spread.scatter_(2, self.chunk_of_head.expand(B, H, 1, q_lat.shape[-1]), q_lat[:, :, None])
                q_lat = spread.flatten(2)
            o_lat, _ = (kernels.latent_decode_attention_int4 if L.int4 else kernels.latent_decode_attention)(
                q_lat.to(kernel_dtype).contiguous(), q_rope.to(kernel_dtype).contiguous(), cache, *paged,
                rope_heads=L.rope_heads, rope_slots=self.rope_slots, k_range=self.k_range, v_range=self.v_range,
                **common, **int4,
            )
        if h.n_grp > 1:  # [B, H, n_grp r_v'] -> each head's own chunk
            o_lat = o_lat.view(B, H, h.n_grp, -1)
            o_lat = o_lat.gather(2, self.chunk_of_head.expand(B, H, 1, o_lat.shape[-1])).squeeze(2)
        return attn.values_from_latent(o_lat, h, self.weights)


def _rows(kv_cache: torch.Tensor) -> torch.Tensor:
    """vLLM's [blocks, 1, block_size, row] view -> [blocks, block_size, row]."""
    return kv_cache[:, 0]


def _contiguous_share(index_of_head: list[int]) -> tuple[int, int] | None:
    """(first, count) if head i reads index first + i // (heads / count), the form the kernels take."""
    first, count = index_of_head[0], len(set(index_of_head))
    heads = len(index_of_head)
    if heads % count or index_of_head != [first + i // (heads // count) for i in range(heads)]:
        return None
    return first, count
