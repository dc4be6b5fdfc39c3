"""Per-head attention of ``source`` and TransKV ``reduced_head`` layers: vLLM's ``Attention``.

    source        q, k [*, d_h] rotated with the source frequencies; cache K, V [G, d_h] each
    reduced_head  q' = P_K^T RoPE(q), k' = P_K^T RoPE(k) (k_reduce [G, d_h, r_k]), v [G, r_v]
                  (P_V folded into v_proj/o_proj); vLLM's ``Attention`` with head size r_k.
                  The CPU platform's paged backend stores K and V at one head size, so when
                  r_k != r_v both are zero-padded to max(r_k, r_v) (exact; the cache then holds
                  2 G max(r_k, r_v) values per token instead of G (r_k + r_v)).
    q/k norms     (q/k-norm sources, Qwen3) per-head RMSNorm with [d_h] gains on q and k before RoPE,
                  as in the source model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentkv import attention as attn
from latentkv import format as fmt
from vllm_latentkv.attention.tp import tp_split
from vllm_latentkv._vllm import (
    Attention,
    CacheConfig,
    ColumnParallelLinear,
    QuantizationConfig,
    RowParallelLinear,
)


class HeadAttention(nn.Module):
    def __init__(
        self,
        spec: fmt.LatentKVSpec,
        dims: fmt.ModelDims,
        layer_idx: int,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        layer = spec.layers[layer_idx]
        where = f"latent_kv.layers[{layer_idx}]"
        H, G, d_h = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
        tp, rank = tp_split(where, H, G)
        self.H_l, self.G_l, self.d_h = H // tp, G // tp, d_h
        self.reduced = isinstance(layer, fmt.ReducedHeadLayer)
        self.d_k = layer.k_head_dim if self.reduced else d_h
        self.d_v = layer.v_head_dim if self.reduced else d_h
        self.d_c = max(self.d_k, self.d_v)  # cached head size (K and V padded alike)
        bias, D = spec.attention_bias, dims.hidden_size
        self.q_proj = ColumnParallelLinear(D, H * d_h, bias=bias, quant_config=quant_config, prefix=f"{prefix}.q_proj")
        self.k_proj = ColumnParallelLinear(D, G * d_h, bias=bias, quant_config=quant_config, prefix=f"{prefix}.k_proj")
        self.v_proj = ColumnParallelLinear(D, G * self.d_v, bias=bias, quant_config=quant_config, prefix=f"{prefix}.v_proj")
        self.o_proj = RowParallelLinear(H * self.d_v, D, bias=False, quant_config=quant_config, prefix=f"{prefix}.o_proj")
        if self.reduced:
            self.k_reduce = nn.Parameter(torch.empty(self.G_l, d_h, self.d_k), requires_grad=False)
            g0 = rank * self.G_l

            def load_k_reduce(param: nn.Parameter, loaded: torch.Tensor) -> None:
                param.data.copy_(loaded[g0 : g0 + self.G_l])

            self.k_reduce.weight_loader = load_k_reduce
        self.source_freqs = torch.tensor(spec.rope_inv_freq, dtype=torch.float64)
        self.eps = eps
        if spec.qk_norm:  # replicated [d_h] gains, default loader
            self.q_norm = _HeadGain(d_h)
            self.k_norm = _HeadGain(d_h)
        else:
            self.q_norm = self.k_norm = None
        self.attn = Attention(
            self.H_l, self.d_c, layer.softmax_scale, num_kv_heads=self.G_l,
            cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        T = hidden_states.shape[0]
        q, _ = self.q_proj(hidden_states)
        k, _ = self.k_proj(hidden_states)
        v, _ = self.v_proj(hidden_states)
        q, k = attn.head_queries_keys(
            q.view(T, self.H_l, self.d_h), k.view(T, self.G_l, self.d_h), positions, self.source_freqs, self.eps,
            q_gain=self.q_norm.weight if self.q_norm is not None else None,
            k_gain=self.k_norm.weight if self.k_norm is not None else None,
            k_reduce=self.k_reduce if self.reduced else None,
        )
        v = v.view(T, self.G_l, self.d_v)
        pad = self.d_c
        q, k, v = (F.pad(x, (0, pad - x.shape[-1])) for x in (q, k, v))
        o = self.attn(q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1))
        o = o.view(T, self.H_l, pad)[..., : self.d_v].reshape(T, self.H_l * self.d_v)
        out, _ = self.o_proj(o)
        return out


class _HeadGain(nn.Module):
    """The [d_h] gain of a per-head RMSNorm (applied by ``latentkv.attention.head_queries_keys``)."""

    def __init__(self, d_h: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_h), requires_grad=False)
