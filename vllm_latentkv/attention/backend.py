"""LATENTKV_MLA: the attention backend of latent layers (paged latent cache, see ``cache.py``).

Capabilities (class level): decoder self-attention, causal; caches "auto" (the model dtype,
or float16/bfloat16/float32 from ``--kv-cache-dtype``) and "int4" (selected by the model's
``latent_kv.cache_dtype``, not by ``--kv-cache-dtype``); any block size; chunked prefill and
prefix caching (every step reads its whole context back from the paged cache).

The backend owns the cache I/O; the math of the layer is in ``layer.py``:

* ``write``: rows ``[c | k_rope | key scales]`` (or packed INT4 rows) at the slot mapping;
* ``read``: one request's rows back, dequantized, for the torch path (key scales split off);
* ``decode``: absorbed attention over the paged cache for a batch of one-token queries with the
  Triton kernel ``latent_decode_attention[_int4]`` when Triton can run (CUDA, or CPU under
  ``TRITON_INTERPRET=1``), selected by ``LATENTKV_TRITON`` = auto (default) | 1 | 0.
* ``decode_full``: the same for ``full`` RoPE layers (keys rebuilt from the key latent and rotated
  inside ``full_rope_decode_attention[_int4]``, values absorbed), same policy.
  The pure-torch path (``layer.py``) is the fallback and the CPU reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch

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

BACKEND_NAME = "LATENTKV_MLA"  # the CPU platform's MLA hook looks this name up
BACKEND_PATH = "vllm_latentkv.attention.backend.LatentKVAttentionBackend"
TRITON_ENV = "LATENTKV_TRITON"


def triton_usable(device: torch.device) -> bool:
    """Whether the latent kernels can run on tensors of this device (see module docstring)."""
    mode = os.environ.get(TRITON_ENV, "auto").strip().lower()
    if mode in ("0", "false", "off", "no"):
        return False
    runnable = device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "") == "1"
    if mode in ("1", "true", "on", "yes") and not runnable:
        raise RuntimeError(f"{TRITON_ENV}=1 but Triton cannot run on {device} (set TRITON_INTERPRET=1 on CPU)")
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
    """Cache I/O of one latent layer (the layer computes the attention math)."""

    def __init__(self, layout: LatentCacheLayout, kv_cache_dtype: str = "auto") -> None:
        if kv_cache_dtype not in LatentKVAttentionBackend.supported_kv_cache_dtypes:
            raise NotImplementedError(
                f"{BACKEND_NAME} does not support --kv-cache-dtype={kv_cache_dtype!r}: latent caches are "
                "'auto' (model dtype) or INT4 via --hf-overrides '{\"latent_kv_cache_dtype\": \"int4\"}'"
            )
        self.layout = layout
        self.kv_cache_dtype = "int4" if layout.int4 else kv_cache_dtype

    def forward(self, *args, **kwargs):  # the layer calls write/read/decode directly
        raise NotImplementedError("latent layers call LatentKVAttentionImpl.write/read/decode")

    @staticmethod
    def rows(kv_cache: torch.Tensor) -> torch.Tensor:
        """vLLM's [blocks, 1, block_size, row] view -> [blocks, block_size, row]."""
        return kv_cache[:, 0]

    # -- write -------------------------------------------------------------------------------
    def write(self, latent: torch.Tensor, rope: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """latent [T, W], rope [T, R_H R_D (+ K key scales)] (rotated) -> the rows at slot_mapping (-1 = skip)."""
        L = self.layout
        cache = self.rows(kv_cache)
        num = slot_mapping.shape[0]
        latent, rope = latent[:num].contiguous(), rope[:num].contiguous()
        if triton_usable(cache.device) and cache.stride(-1) == 1:
            from vllm_latentkv import kernels

            if L.int4:
                kernels.latent_cache_write_int4(latent, rope, cache, slot_mapping, L.group_size)
            else:
                kernels.latent_cache_write(latent, rope, cache, slot_mapping)
            return
        valid = slot_mapping >= 0
        slots = slot_mapping[valid].to(torch.int64)
        page = cache.shape[1]
        if L.int4:
            from latentkv.int4 import int4_pack_rows

            rows = int4_pack_rows(latent[valid], rope[valid], L.group_size)
        else:
            rows = torch.cat((latent[valid], rope[valid]), dim=-1).to(cache.dtype)
        cache[slots // page, slots % page] = rows

    # -- read ----------------------------------------------------------------------------------
    def read(
        self, kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One request's first seq_len rows: (latent fp32 [S, W], rope fp32 [S, R_H, R_D],
        key scales fp32 [S, K] or None when the layout has none)."""
        L = self.layout
        cache = self.rows(kv_cache)
        page = cache.shape[1]
        n_blocks = -(-seq_len // page)
        rows = cache[block_ids[:n_blocks].to(torch.int64)].reshape(-1, cache.shape[-1])[:seq_len]
        if L.int4:
            from latentkv.int4 import int4_unpack_rows

            lat, tail = int4_unpack_rows(rows, L.latent_dim, L.tail_dim, L.group_size)
        else:
            lat, tail = rows[:, : L.latent_dim], rows[:, L.latent_dim :]
        rope = tail[:, : L.rope_dim].float().view(seq_len, L.rope_heads, L.rope_head_dim)
        key_scale = tail[:, L.rope_dim :].float() if L.key_scales else None
        return lat.float(), rope, key_scale

    # -- absorbed decode with the Triton kernel ------------------------------------------------
    def decode(
        self,
        q_latent: torch.Tensor,  # [B, H, r_k] (zero outside each head's latent chunk)
        q_rope: torch.Tensor,  # [B, H, R_D] rotated
        kv_cache: torch.Tensor,
        meta: LatentKVMetadata,
        scale: float,
        k_range: tuple[int, int],
        v_range: tuple[int, int],
        rope_slots: tuple[int, int] | None = None,  # (first, count) of the row's rope heads these heads read
    ) -> torch.Tensor:
        """sum_t softmax(scale s)_t c_v,t per head: [B, H, r_v] fp32 (DeepSeek-V2 absorbed decode)."""
        from vllm_latentkv import kernels

        L = self.layout
        cache = self.rows(kv_cache)
        common = dict(rope_heads=L.rope_heads, rope_slots=rope_slots, k_range=k_range, v_range=v_range,
                      out_dtype=torch.float32,
                      num_kv_splits=4 if q_latent.device.type == "cpu" else 8)
        q_latent, q_rope = q_latent.float().contiguous(), q_rope.float().contiguous()
        if L.int4:
            out, _ = kernels.latent_decode_attention_int4(
                q_latent, q_rope, cache, meta.decode_block_table, meta.decode_seq_lens, scale,
                latent_dim=L.latent_dim, group_size=L.group_size, **common,
            )
        else:
            if cache.dtype != torch.float32:
                q_latent, q_rope = q_latent.to(cache.dtype), q_rope.to(cache.dtype)
            out, _ = kernels.latent_decode_attention(
                q_latent, q_rope, cache, meta.decode_block_table, meta.decode_seq_lens, scale, **common,
            )
        return out

    # -- full-RoPE decode with the Triton kernel -----------------------------------------------
    def decode_full(
        self,
        q: torch.Tensor,  # [B, H, d_h] rotated
        w_uk: torch.Tensor,  # [G, d_h, r_k / key_groups]
        inv_freq: torch.Tensor,  # [d_h / 2] fp32
        kv_cache: torch.Tensor,
        meta: LatentKVMetadata,
        scale: float,
        key_groups: int,
        key_groups_used: tuple[int, int] | None = None,  # (first, count) the KV heads of w_uk read
        v_range: tuple[int, int] | None = None,  # the value latent in the row; None: after the key latent
        b_k: torch.Tensor | None = None,  # [G, d_h] key bias
        k_gain: torch.Tensor | None = None,  # [G, d_h] key RMSNorm gain
        norm_eps: float = 1e-6,
    ) -> torch.Tensor:
        """sum_t softmax(scale q . RoPE_t(norm(W_uk c_k,t + b_k)))_t c_v,t per head: [B, H, r_v] fp32."""
        from vllm_latentkv import kernels

        L = self.layout
        cache = self.rows(kv_cache)
        common = dict(key_groups=key_groups, key_groups_used=key_groups_used, v_range=v_range, b_k=b_k,
                      k_gain=k_gain, norm_eps=norm_eps, out_dtype=torch.float32,
                      num_kv_splits=4 if q.device.type == "cpu" else 8)
        q, w_uk = q.float().contiguous(), w_uk.float().contiguous()
        if L.int4:
            out, _ = kernels.full_rope_decode_attention_int4(
                q, cache, w_uk, inv_freq, meta.decode_block_table, meta.decode_seq_lens, scale,
                latent_dim=L.latent_dim, group_size=L.group_size, **common,
            )
        else:
            if cache.dtype != torch.float32:
                q, w_uk = q.to(cache.dtype), w_uk.to(cache.dtype)
            out, _ = kernels.full_rope_decode_attention(
                q, cache, w_uk, inv_freq, meta.decode_block_table, meta.decode_seq_lens, scale, **common,
            )
        return out
