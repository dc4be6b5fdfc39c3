"""Latent (MLA-style) attention of a latent-KV checkpoint in vLLM, with a real latent cache.

Symbols (one layer; the format's symbol table is ``latentkv.format``; this rank of TP size P
holds H_l = H / P query heads and G_l = G / P KV heads; the latent is replicated):

    x            [T, D]                     this step's tokens, all requests concatenated
    q_proj       [H (d_n + R_D), D]         column-parallel by query head: [q_nope | q_rope]
    kv_a_proj    [W + R_H R_D, D]           replicated: [c (W) | k_rope (R_H x R_D)]
    k_b_proj     [G d_n, r_k / n_grp]       column-parallel by KV head (W_uk)
    v_b_proj     [G d_h, r_v / n_grp]       column-parallel by KV head (W_uv)
    o_proj       [D, H d_h]                 row-parallel
    cache row    [c | RoPE(k_rope) | key scales] per token (``cache.py``; INT4: packed latent + fp16 tail)

One way, as vLLM's own MLA layer: this layer projects (queries normed and rotated, the latent,
the rotated rope keys and, for partial RoPE on q/k-norm sources, the key scales, all by
``latentkv.attention``), hands them to the backend's :class:`LatentKVAttentionImpl` (cache write,
attention on our kernels or in PyTorch, W_uv) and applies o_proj. The Impl receives the
up-projections in their run-time form once, in :meth:`LatentAttention.process_weights_after_loading`.
The math is ``latentkv.attention``'s (its docstring has the equations; the reference model uses the
same functions). Key-scale layers need every KV head's W_uk on each rank: no tensor parallelism yet.
"""

from __future__ import annotations

import torch
from torch import nn

from latentkv import attention as attn
from latentkv import format as fmt
from latentkv.token_filter import TokenFilterOptions
from vllm_latentkv._vllm import (
    AttentionLayerBase,
    ColumnParallelLinear,
    QuantizationConfig,
    ReplicatedLinear,
    RowParallelLinear,
    VllmConfig,
    current_platform,
    direct_register_custom_op,
    get_forward_context,
)
from vllm_latentkv.attention import ATTENTION_OP
from vllm_latentkv.attention.backend import LatentKVAttentionBackend, LatentKVAttentionImpl
from vllm_latentkv.attention.cache import LatentCacheLayout
from vllm_latentkv.attention.tp import tp_split


class LatentAttention(nn.Module, AttentionLayerBase):
    """Attention of a ``latent`` layer; it is its own vLLM attention layer (cache owner)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        spec: fmt.LatentKVSpec,
        dims: fmt.ModelDims,
        layer_idx: int,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        token_filter: TokenFilterOptions | None = None,
    ) -> None:
        super().__init__()
        layer = spec.layers[layer_idx]
        assert isinstance(layer, fmt.LatentLayer)
        where = f"latent_kv.layers[{layer_idx}]"
        self.tp, self.rank = tp_split(where, dims.num_attention_heads, dims.num_key_value_heads)
        if fmt.caches_key_scale(layer, spec) and self.tp > 1:
            raise NotImplementedError(
                f"{where}: key scales (partial RoPE on a q/k-norm source) need every KV head's W_uk on each "
                "rank; tensor parallelism is not supported for them yet"
            )
        hf_config = vllm_config.model_config.hf_config if vllm_config.model_config is not None else None
        eps = float(getattr(hf_config, "rms_norm_eps", 1e-6))
        self.heads = attn.LatentHeads.of(layer, spec, dims, eps, tp=self.tp, rank=self.rank)
        self.layer, self.layer_name, self.layer_idx = layer, prefix, layer_idx
        self.G, self.d_h = dims.num_key_value_heads, dims.head_dim
        self.H_l, self.G_l = dims.num_attention_heads // self.tp, self.G // self.tp
        self.num_heads = self.H_l
        self._make_projections(layer, spec, dims, quant_config, prefix)
        self._register(vllm_config, spec, where, prefix, self._checked(token_filter, where))

    def _make_projections(self, layer, spec, dims, quant_config, prefix) -> None:
        h, lat, bias, D = self.heads, layer.latent, spec.attention_bias, dims.hidden_size
        H, G, d_h = dims.num_attention_heads, self.G, self.d_h
        self.W = lat.width
        self.q_proj = ColumnParallelLinear(D, H * (h.d_n + h.R_D), bias=bias, quant_config=quant_config, prefix=f"{prefix}.q_proj")
        self.kv_a_proj = ReplicatedLinear(D, self.W + h.R_H * h.R_D, bias=bias, quant_config=quant_config, prefix=f"{prefix}.kv_a_proj")
        self.k_b_proj = (
            ColumnParallelLinear(lat.k_rank // lat.groups, G * h.d_n, bias=bias, quant_config=None, prefix=f"{prefix}.k_b_proj")
            if h.d_n else None
        )
        self.v_b_proj = ColumnParallelLinear(lat.v_rank // lat.groups, G * d_h, bias=bias, quant_config=None, prefix=f"{prefix}.v_b_proj")
        self.o_proj = RowParallelLinear(H * d_h, D, bias=False, quant_config=quant_config, prefix=f"{prefix}.o_proj")
        if spec.qk_norm:
            # [G, d_h] gains; this rank keeps its KV heads' rows for queries / NoPE keys, and all
            # G rows for k_norm when the (replicated) rope keys of every head are normed here.
            first = self.rank * self.G_l
            self.q_norm = _Gains(G, d_h, first, self.G_l)
            self.k_norm = _Gains(G, d_h, 0, G) if h.R_H else _Gains(G, d_h, first, self.G_l)
        else:
            self.q_norm = self.k_norm = None

    def _register(self, vllm_config: VllmConfig, spec, where: str, prefix: str,
                  token_filter: TokenFilterOptions | None) -> None:
        """vLLM attention-layer plumbing: the cache layout and spec, the backend, the static forward context."""
        model_dtype = vllm_config.model_config.dtype if vllm_config.model_config is not None else torch.get_default_dtype()
        cache_dtype = vllm_config.cache_config.cache_dtype if vllm_config.cache_config is not None else "auto"
        elt_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(cache_dtype, model_dtype)
        self.layout = LatentCacheLayout.for_layer(self.layer, spec, elt_dtype, where)
        self.attn_backend = LatentKVAttentionBackend
        self.impl = LatentKVAttentionImpl(self.heads, self.layout, cache_dtype, token_filter, self.layer_idx)
        self.kv_cache = torch.tensor([])
        ctx = vllm_config.compilation_config.static_forward_context
        if prefix in ctx:
            raise ValueError(f"Duplicate layer name: {prefix}")
        ctx[prefix] = self

    def _checked(self, opts: TokenFilterOptions | None, where: str) -> TokenFilterOptions | None:
        """This layer's Token Filtering options (``latentkv.token_filter``; None: not filtered), if it can run."""
        if opts is not None and opts.features == "heads" and self.tp > 1:
            raise NotImplementedError(
                f"{where}: Token Filtering with features='heads' decides on each rank's own KV heads, so "
                "tensor-parallel ranks would disagree; use features='latent' (the default: the replicated latent)"
            )
        return opts

    # -- AttentionLayerBase -------------------------------------------------------------------
    def get_attn_backend(self):
        return self.attn_backend

    def get_kv_cache_spec(self, vllm_config: VllmConfig):
        return self.layout.make_spec(vllm_config.cache_config.block_size)

    def process_weights_after_loading(self, act_dtype: torch.dtype | None = None) -> None:
        """Hand the Impl the up-projections and gains in their run-time form (vLLM calls this after loading)."""
        k_gain = rope_k_gain = None
        if self.k_norm is not None:
            rope_k_gain = self.k_norm.weight if self.heads.R_H else None
            # this rank's KV heads' rows (k_norm holds all G rows when there are rope keys to norm)
            k_gain = self.k_norm.weight[self.rank * self.G_l : (self.rank + 1) * self.G_l] if self.heads.R_H else self.k_norm.weight
        weights = attn.LatentWeights.of(
            self.G_l, self.heads.d_n, self.d_h, self.k_b_proj, self.v_b_proj,
            q_gain=self.q_norm.weight if self.q_norm is not None else None, k_gain=k_gain, rope_k_gain=rope_k_gain,
        )
        self.impl.prepare(weights, self.v_b_proj.weight.device)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        T = hidden_states.shape[0]
        h = self.heads
        if self.impl.weights is None:  # a caller that skipped vLLM's loader hook
            self.process_weights_after_loading()
        w = self.impl.weights
        q, _ = self.q_proj(hidden_states)
        q_nope, q_rope = attn.queries(q.view(T, self.H_l, -1), positions, self.impl.heads, w)
        kv, _ = self.kv_a_proj(hidden_states)
        c, k_rope = kv.split((self.W, h.R_H * h.R_D), dim=-1)
        tail = k_rope
        if h.R_H:
            k_rope, key_scale = attn.new_rope_keys(c, k_rope.view(T, h.R_H, h.R_D), positions, self.impl.heads, w)
            tail = k_rope.flatten(1) if key_scale is None else torch.cat((k_rope.flatten(1), key_scale), dim=-1)
        o = torch.empty(T, self.H_l, self.d_h, dtype=torch.float32, device=hidden_states.device)
        # Cache write and attention: one opaque op (vLLM's unified-attention pattern), so that
        # torch.compile traces the projections around it and piecewise CUDA graphs split at it.
        _attention_op(q_nope, q_rope, c, tail.to(c.dtype), o, self.layer_name)
        out, _ = self.o_proj(o.to(hidden_states.dtype).view(T, self.H_l * self.d_h))
        return out


def latentkv_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, tail: torch.Tensor,
                       output: torch.Tensor, layer_name: str) -> None:
    """The latent layer ``layer_name`` after its projections (``LatentKVAttentionImpl.forward``),
    written into ``output`` [T, H, d_h]; its metadata, cache and slot mapping come from vLLM's
    forward context, as for vLLM's own attention ops."""
    ctx = get_forward_context()
    layer = ctx.no_compile_layers[layer_name]
    meta = ctx.attn_metadata
    if isinstance(meta, list):
        meta = meta[0]
    if isinstance(meta, dict):
        meta = meta.get(layer_name)
    if meta is None:  # profiling / dummy run: nothing cached to attend to
        output.zero_()
        return
    slots = ctx.slot_mapping
    slots = slots.get(layer_name, meta.slot_mapping) if isinstance(slots, dict) else meta.slot_mapping
    output.copy_(layer.impl.forward(q_nope, q_rope, latent, tail, layer.kv_cache, meta, slots))


def latentkv_attention_fake(q_nope, q_rope, latent, tail, output, layer_name) -> None:
    """Shapes only (torch.compile's fake tensors): the op writes ``output`` in place and returns nothing."""
    return None


direct_register_custom_op(
    op_name=ATTENTION_OP,
    op_func=latentkv_attention,
    mutates_args=["output"],
    fake_impl=latentkv_attention_fake,
    dispatch_key=current_platform.dispatch_key,
)
_attention_op = getattr(torch.ops.vllm, ATTENTION_OP)


class _Gains(nn.Module):
    """Per-KV-head RMSNorm gains ``weight`` [n, d_h]: rows [first, first + n) of the checkpoint's [G, d_h]."""

    def __init__(self, G: int, d_h: int, first: int, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, d_h), requires_grad=False)

        def load(param: nn.Parameter, loaded: torch.Tensor) -> None:
            if tuple(loaded.shape) != (G, d_h):
                raise ValueError(f"q/k norm gains have shape {tuple(loaded.shape)}, expected {(G, d_h)}")
            param.data.copy_(loaded[first : first + n])

        self.weight.weight_loader = load
