"""A ``shared``-RoPE latent layer served by vLLM's own MLA layer (FlashMLA / Triton MLA on CUDA, CPU_MLA on CPU).

Used instead of :class:`~vllm_latentkv.attention.layer.LatentAttention` when :func:`use_vllm_mla`
says so: ``shared`` RoPE with one rope head, no biases or q/k norms, ``auto`` cache dtype and a
cache row (W + R_D) in vLLM MLA's head-size list (on CPU: 576 only, the size of vLLM's CPU
decode kernel); ``LATENTKV_VLLM_MLA=0`` turns it off.
The weights map as in :mod:`vllm_latentkv.mla_mapping`:

* ``q_proj``, ``kv_a_proj`` (= ``kv_a_proj_with_mqa``), ``o_proj`` load as they are;
* ``kv_a_layernorm`` is ``nn.Identity`` (our latent has no norm; the wrapper just calls it);
* the checkpoint's ``k_b_proj`` / ``v_b_proj`` load into empty placeholder parameters whose loaders
  write this rank's query heads' rows of ``kv_b_proj`` [H_l (d_h + d_h), W] (GQA repeated per query
  head); ``kv_b_proj.weight`` is reported loaded through :attr:`derived_parameters`. vLLM's
  ``MLAAttention.process_weights_after_loading`` then derives W_UK_T / W_UV from it;
* RoPE: :class:`~vllm_latentkv.mla_mapping.PairRotaryEmbedding` (our per-pair frequencies).

vLLM traps handled here (``/work/shared/notes/vllm-facts.md``, "MLA path"):
``MLACommonMetadata.__post_init__`` checks ``model_config.get_head_size()`` (our source head dim,
since ``use_mla`` is false for ``model_type`` latentkv) against 320/512/576: the layer's backend is
swapped for a subclass whose builder makes metadata without that check (the size itself is checked
per layer by :func:`use_vllm_mla`). vLLM's FA prefill warmup reads the MLA dims from the HF config
(``get_mla_dims``): they are set on it from the first such layer if absent.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from latentkv import format as fmt
from latentkv.settings import settings
from vllm_latentkv._vllm import (
    ColumnParallelLinear,
    MLAModules,
    MultiHeadLatentAttentionWrapper,
    current_platform,
    QuantizationConfig,
    ReplicatedLinear,
    RowParallelLinear,
    VllmConfig,
)
from vllm_latentkv.attention.tp import tp_split
from vllm_latentkv.mla_mapping import (
    CPU_MLA_HEAD_SIZES,
    MLA_HEAD_SIZES,
    PairRotaryEmbedding,
    kv_b_weight,
    mla_unsupported_reason,
    rope_inv_freq,
)

def use_vllm_mla(layer: fmt.LayerSpec, spec: fmt.LatentKVSpec, dims: fmt.ModelDims) -> bool:
    """Serve this layer with vLLM's MLA layer (CUDA and CPU; our own backend everywhere else)."""
    if not settings().vllm_mla:
        return False
    if current_platform.is_cuda():
        head_sizes = MLA_HEAD_SIZES
    elif current_platform.is_cpu():
        head_sizes = CPU_MLA_HEAD_SIZES
    else:
        return False
    return mla_unsupported_reason(layer, spec, dims, head_sizes=head_sizes) is None


class _KvBPart(nn.Module):
    """Placeholder for the checkpoint's ``k_b_proj`` / ``v_b_proj``: an empty ``weight`` whose loader
    writes this rank's rows of ``kv_b_proj`` (part 0: W_uk, part 1: W_uv of each query head)."""

    def __init__(self, owner: "LatentMLAAttention", part: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        owner_ref = [owner]  # not a submodule

        def load(param: nn.Parameter, loaded: torch.Tensor) -> None:
            o = owner_ref[0]
            layer, dims = o.layer, o.dims
            lat, G, d_h = layer.latent, dims.num_key_value_heads, dims.head_dim
            expected = (G * d_h, (lat.k_rank if part == 0 else lat.v_rank) // lat.groups)
            if tuple(loaded.shape) != expected:
                raise ValueError(f"{o.prefix}: {('k_b_proj', 'v_b_proj')[part]} has shape {tuple(loaded.shape)}, expected {expected}")
            other = loaded.new_zeros(G * d_h, (lat.v_rank if part == 0 else lat.k_rank) // lat.groups)
            k_b, v_b = (loaded, other) if part == 0 else (other, loaded)
            rows = kv_b_weight(k_b.float(), v_b.float(), layer, dims, heads=o.local_heads).view(len(o.local_heads), 2, d_h, -1)
            dst = o.kv_b_proj.weight.data.view(len(o.local_heads), 2, d_h, -1)
            dst[:, part] = rows[:, part].to(device=dst.device, dtype=dst.dtype)

        self.weight.weight_loader = load


@functools.cache
def _relaxed_backend(backend: type) -> type:
    """``backend`` whose metadata builder skips ``MLACommonMetadata``'s head-size whitelist."""
    builder_cls = backend.get_builder_cls()

    class RelaxedBuilder(builder_cls):  # type: ignore[valid-type, misc]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.metadata_cls = _relaxed_metadata(self.metadata_cls)

    RelaxedBuilder.__name__ = RelaxedBuilder.__qualname__ = f"LatentKV{builder_cls.__name__}"

    class Relaxed(backend):  # type: ignore[valid-type, misc]
        @staticmethod
        def get_builder_cls():
            return RelaxedBuilder

    Relaxed.__name__ = Relaxed.__qualname__ = f"LatentKV{backend.__name__}"
    return Relaxed


@functools.cache
def _relaxed_metadata(metadata_cls: type) -> type:
    def __post_init__(self) -> None:  # the head size was checked per layer (use_vllm_mla)
        pass

    return type(f"LatentKV{metadata_cls.__name__}", (metadata_cls,), {"__post_init__": __post_init__})


class LatentMLAAttention(nn.Module):
    """Attention of a ``shared``-RoPE latent layer through vLLM's ``MultiHeadLatentAttentionWrapper``."""

    derived_parameters = ("kv_b_proj.weight",)  # filled by the k_b_proj / v_b_proj loaders

    def __init__(
        self,
        vllm_config: VllmConfig,
        spec: fmt.LatentKVSpec,
        dims: fmt.ModelDims,
        layer_idx: int,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        layer = spec.layers[layer_idx]
        reason = mla_unsupported_reason(layer, spec, dims)
        if reason is not None:
            raise ValueError(f"latent_kv.layers[{layer_idx}] cannot run as vLLM MLA: {reason}")
        H, d_h, D = dims.num_attention_heads, dims.head_dim, dims.hidden_size
        tp, rank = tp_split(f"latent_kv.layers[{layer_idx}]", H)
        self.layer, self.dims, self.prefix = layer, dims, prefix
        H_l = H // tp
        self.local_heads = range(rank * H_l, (rank + 1) * H_l)
        W, R_D = layer.latent.width, layer.rope_head_dim

        # Registered before the wrapper so that parameter names are the checkpoint's.
        self.q_proj = ColumnParallelLinear(D, H * (d_h + R_D), bias=False, quant_config=quant_config, prefix=f"{prefix}.q_proj")
        self.kv_a_proj = ReplicatedLinear(D, W + R_D, bias=False, quant_config=quant_config, prefix=f"{prefix}.kv_a_proj")
        self.kv_b_proj = ColumnParallelLinear(W, H * 2 * d_h, bias=False, quant_config=None, prefix=f"{prefix}.kv_b_proj")
        self.k_b_proj = _KvBPart(self, 0)
        self.v_b_proj = _KvBPart(self, 1)
        self.o_proj = RowParallelLinear(H * d_h, D, bias=False, quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = PairRotaryEmbedding(rope_inv_freq(layer, spec))

        hf = vllm_config.model_config.hf_config if vllm_config.model_config is not None else None
        if hf is not None and getattr(hf, "kv_lora_rank", None) is None:  # get_mla_dims (FA prefill warmup)
            hf.q_lora_rank, hf.kv_lora_rank = None, W
            hf.qk_nope_head_dim, hf.qk_rope_head_dim, hf.v_head_dim = d_h, R_D, d_h

        self.mla = MultiHeadLatentAttentionWrapper(
            hidden_size=D,
            num_heads=H_l,
            scale=layer.softmax_scale,
            qk_nope_head_dim=d_h,
            qk_rope_head_dim=R_D,
            v_head_dim=d_h,
            q_lora_rank=None,
            kv_lora_rank=W,
            mla_modules=MLAModules(
                kv_a_layernorm=nn.Identity(),
                kv_b_proj=self.kv_b_proj,
                rotary_emb=self.rotary_emb,
                o_proj=self.o_proj,
                fused_qkv_a_proj=None,
                kv_a_proj_with_mqa=self.kv_a_proj,
                q_a_layernorm=None,
                q_b_proj=None,
                q_proj=self.q_proj,
                indexer=None,
                is_sparse=False,
                topk_indices_buffer=None,
            ),
            cache_config=vllm_config.cache_config,
            quant_config=quant_config,
            prefix=prefix,
        )
        attn = self.mla.mla_attn
        attn.attn_backend = _relaxed_backend(attn.attn_backend)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.mla(positions, hidden_states)
