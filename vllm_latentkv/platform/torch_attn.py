"""TORCH_PAGED_ATTN: the CPU reference platform's attention backend (non-MLA).

vLLM's CPU_ATTN backend needs the kernels of vLLM's CPU build; this one is plain
PyTorch (math in :mod:`vllm_latentkv.platform.paged_attention`). It supports
decoder self-attention with MHA/GQA/MQA, any head size, any block size, fp32,
fp16 and bf16 activations and caches, chunked prefill and prefix caching (keys
and values are always read back from the paged cache), sliding windows and logit
soft-capping. It rejects, at construction, what it does not implement: ALiBi,
attention sinks, quantized KV caches, encoder and cross attention.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_latentkv._vllm import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionSpec,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
    VllmConfig,
)
from vllm_latentkv.platform import paged_attention

BACKEND_NAME = "TORCH_PAGED_ATTN"


class TorchPagedAttentionBackend(AttentionBackend):
    # The layer calls do_kv_cache_update() before forward(), so forward() finds
    # this step's keys in the cache along with the cached context.
    forward_includes_kv_cache_update: bool = False

    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ]
    supported_kv_cache_dtypes: ClassVar[list[str]] = [
        "auto",
        "float16",
        "bfloat16",
        "float32",
    ]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_non_causal(cls) -> bool:
        return True

    @staticmethod
    def get_impl_cls() -> type["TorchPagedAttentionImpl"]:
        return TorchPagedAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["TorchPagedAttentionMetadataBuilder"]:
        return TorchPagedAttentionMetadataBuilder


@dataclass
class TorchPagedAttentionMetadata:
    num_actual_tokens: int
    # Python lists: the per-request loop indexes them on the host.
    query_start_loc: list[int]  # [R + 1]
    seq_lens: list[int]  # [R]
    block_table: torch.Tensor  # [R, max_blocks], int32
    slot_mapping: torch.Tensor  # [T], int64
    causal: bool = True


class TorchPagedAttentionMetadataBuilder(
    AttentionMetadataBuilder[TorchPagedAttentionMetadata]
):
    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> TorchPagedAttentionMetadata:
        m = common_attn_metadata
        if isinstance(m.causal, torch.Tensor):
            raise NotImplementedError(
                f"{BACKEND_NAME} does not support per-request (dynamic) causality"
            )
        num_reqs = m.num_reqs
        return TorchPagedAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc_cpu[: num_reqs + 1].tolist(),
            seq_lens=m.seq_lens[:num_reqs].tolist(),
            block_table=m.block_table_tensor[:num_reqs],
            slot_mapping=m.slot_mapping,
            causal=m.causal,
        )


class TorchPagedAttentionImpl(AttentionImpl[TorchPagedAttentionMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        num_kv_heads = num_kv_heads or num_heads
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "attention sinks": sinks is not None,
            f"kv_cache_dtype={kv_cache_dtype!r}": kv_cache_dtype
            not in TorchPagedAttentionBackend.supported_kv_cache_dtypes,
            f"attn_type={attn_type!r}": attn_type != AttentionType.DECODER,
            f"{num_heads} query heads over {num_kv_heads} KV heads": num_heads
            % num_kv_heads
            != 0,
        }
        bad = [name for name, hit in unsupported.items() if hit]
        if bad:
            raise NotImplementedError(f"{BACKEND_NAME} does not support: {', '.join(bad)}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window
        self.kv_cache_dtype = kv_cache_dtype
        self.logits_soft_cap = logits_soft_cap
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,  # [T, Hkv, D]
        value: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,  # [NB, Hkv, BS, 2 * D]
        slot_mapping: torch.Tensor,  # [T]
    ) -> None:
        paged_attention.write_kv(key, value, kv_cache, slot_mapping)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,  # [T, H, D]
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,  # [NB, Hkv, BS, 2 * D]
        attn_metadata: TorchPagedAttentionMetadata | None,
        output: torch.Tensor,  # [T, H, D]
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{BACKEND_NAME} has no fused output quantization")
        if attn_metadata is None:
            # Profiling / dummy run: there is no cache content to attend to.
            return output.zero_()
        return paged_attention.paged_attention(
            query,
            kv_cache,
            attn_metadata.block_table,
            attn_metadata.query_start_loc,
            attn_metadata.seq_lens,
            output,
            self.scale,
            causal=attn_metadata.causal,
            sliding_window=self.sliding_window,
            logits_soft_cap=self.logits_soft_cap,
        )
