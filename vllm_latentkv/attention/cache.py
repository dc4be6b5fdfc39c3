"""Paged latent-KV cache of one layer: row layout, page bytes and the vLLM cache spec.

One row per token and layer (page = ``block_size`` rows, one "head" in vLLM's logical
``[blocks, heads, block_size, row]`` view):

    plain ("auto")  [ latent c (W) | rope keys (R_H x R_D, head-major, rotated) | key scales (K) ]
                    model/cache dtype
    int4            [ packed latent (W/2 B) | W/G fp16 scales | R_H x R_D fp16 rope keys | K fp16 key scales ]
                    uint8, byte layout and quantizer defined by ``latentkv.int4``
                    (the key scales ride along as extra "rope" columns: the packer stores them in fp16)

Key scales (K = G, else 0): partial RoPE on a q/k-norm source caches 1/rms(k) of every KV head
(``latentkv.format.caches_key_scale``); the Triton kernels do not read them, the torch path does.

The spec is vLLM's ``MLAAttentionSpec`` (``num_kv_heads = 1``, ``head_size = W + R_H R_D``).
For INT4 ``state_content_bytes`` is the packed row (``int4_row_bytes``), so page bytes and
therefore the engine's KV capacity follow the packed size. Layers with other ranks get other
page sizes; vLLM groups them with ``UniformTypeKVCacheSpecs`` (one block table).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentkv import format as fmt

def int4_row_bytes(latent_dim: int, rope_dim: int, group_size: int) -> int:
    """Bytes of one INT4 row: the kernels' definition (pure torch, no Triton import needed)."""
    from latentkv.int4 import int4_row_bytes as _row_bytes

    return _row_bytes(latent_dim, rope_dim, group_size)


@dataclass(frozen=True)
class LatentCacheLayout:
    """What one layer caches per token."""

    latent_dim: int  # W
    rope_heads: int  # R_H
    rope_head_dim: int  # R_D
    dtype: torch.dtype  # element dtype of the plain cache (ignored for int4)
    int4: bool = False
    group_size: int = 32
    key_scales: int = 0  # K: one 1/rms(k) per KV head (partial RoPE on q/k-norm sources), else 0

    @property
    def rope_dim(self) -> int:
        return self.rope_heads * self.rope_head_dim

    @property
    def tail_dim(self) -> int:
        """Values after the latent: rope keys and key scales (the int4 packer's fp16 part)."""
        return self.rope_dim + self.key_scales

    @property
    def width(self) -> int:
        """Values per token: W + R_H R_D + K (the spec's head_size)."""
        return self.latent_dim + self.tail_dim

    @property
    def row_bytes(self) -> int:
        if self.int4:
            return int4_row_bytes(self.latent_dim, self.tail_dim, self.group_size)
        return self.width * torch.empty((), dtype=self.dtype).element_size()

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.uint8 if self.int4 else self.dtype

    @classmethod
    def for_layer(
        cls, layer: fmt.LatentLayer, spec: fmt.LatentKVSpec, dtype: torch.dtype, where: str = "layer"
    ) -> "LatentCacheLayout":
        int4 = spec.cache_dtype == "int4"
        W = layer.latent.width
        if int4 and (W % spec.int4_group_size or spec.int4_group_size & (spec.int4_group_size - 1)):
            raise ValueError(
                f"{where}: INT4 latent cache needs the latent width ({W}) to be a multiple of "
                f"int4_group_size ({spec.int4_group_size}, a power of two >= 4); pass e.g. "
                f"--hf-overrides '{{\"latent_kv_int4_group_size\": {_largest_pow2_divisor(W)}}}'"
            )
        key_scales = len(layer.rope_pairs) if fmt.caches_key_scale(layer, spec) else 0  # partial: R_H = G
        return cls(W, layer.num_rope_heads, layer.rope_head_dim, dtype, int4, spec.int4_group_size, key_scales)

    def make_spec(self, block_size: int):
        """vLLM's MLAAttentionSpec for this layout (packed bytes for int4)."""
        from vllm_latentkv._vllm import MLAAttentionSpec

        return MLAAttentionSpec(
            block_size=block_size,
            num_kv_heads=1,
            head_size=self.width,
            dtype=self.storage_dtype,
            state_content_bytes=self.row_bytes if self.int4 else None,
            cache_dtype_str="int4" if self.int4 else "auto",
        )


def _largest_pow2_divisor(n: int) -> int:
    return n & -n


def cache_bytes_per_token(spec: fmt.LatentKVSpec, dims: fmt.ModelDims, dtype: torch.dtype) -> int:
    """KV-cache bytes per token over all layers, as this plugin lays the cache out."""
    total = 0
    elt = torch.empty((), dtype=dtype).element_size()
    for i, layer in enumerate(spec.layers):
        if isinstance(layer, fmt.LatentLayer):
            total += LatentCacheLayout.for_layer(layer, spec, dtype, f"latent_kv.layers[{i}]").row_bytes
        elif isinstance(layer, fmt.ReducedHeadLayer):
            d = max(layer.k_head_dim, layer.v_head_dim)  # K and V padded to one head size
            total += 2 * dims.num_key_value_heads * d * elt
        else:
            total += 2 * dims.num_key_value_heads * dims.head_dim * elt
    return total
