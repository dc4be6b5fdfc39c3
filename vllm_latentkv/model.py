"""LatentKVForCausalLM: vLLM model of a latent-KV checkpoint (``latentkv.format``).

A Llama-family decoder whose attention per layer is the kind the checkpoint says: ``latent``
(:class:`~vllm_latentkv.attention.layer.LatentAttention`, latent cache), ``source`` or
``reduced_head`` (:class:`~vllm_latentkv.attention.head.HeadAttention`, vLLM's Attention).
Written like vLLM's ``llama.py``: ``prefix`` threaded through every layer, parallel linear
layers (query heads sharded over TP, latent replicated), ``load_weights`` with
``stacked_params_mapping``. The checkpoint is validated against its config at construction
(``latentkv.checkpoint.validate_checkpoint``), so a broken ``latent_kv`` section or a
mismatched tensor fails with an error that names it.

Serve-time cache options: see :mod:`vllm_latentkv.config`.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from latentkv import format as fmt
from vllm_latentkv._vllm import (
    IntermediateTensors,
    LlamaMLP,
    LogitsProcessor,
    ParallelLMHead,
    PPMissingLayer,
    RMSNorm,
    VllmConfig,
    VocabParallelEmbedding,
    default_weight_loader,
    extract_layer_index,
    get_pp_group,
    init_logger,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
    support_torch_compile,
)
from vllm_latentkv.attention.head import HeadAttention
from vllm_latentkv.attention.layer import LatentAttention
from vllm_latentkv.attention.mla import LatentMLAAttention, use_vllm_mla
from vllm_latentkv.config import resolve_spec

logger = init_logger(__name__)


def load_latent_spec(vllm_config: VllmConfig) -> tuple[fmt.LatentKVSpec, fmt.ModelDims]:
    """The checkpoint's spec (serve-time overrides applied), checked against its tensors."""
    mc = vllm_config.model_config
    spec, dims = resolve_spec(mc.hf_config, mc.model, getattr(mc, "revision", None))
    if Path(mc.model).is_dir():
        from latentkv.checkpoint import validate_checkpoint

        validate_checkpoint(mc.model)  # tensor names and shapes vs config: raises naming the problem
    filtered_layers(spec)
    return spec, dims


def filtered_layers(spec: fmt.LatentKVSpec) -> set[int]:
    """The layers Token Filtering filters; raises FormatError unless they are latent layers (ours)."""
    opts = spec.token_filter_options()
    if opts is None:
        return set()
    if opts.skip != "query":
        raise fmt.FormatError(f"token_filter.skip={opts.skip!r} is a reference-model research option; vLLM serves "
                              "skip='query' (the default)")
    layers = opts.filtered_layers(len(spec.layers))
    outside = sorted(i for i in layers if i >= len(spec.layers))
    other = sorted(i for i in layers if i < len(spec.layers) and not isinstance(spec.layers[i], fmt.LatentLayer))
    if outside or other:
        latent = [i for i, layer in enumerate(spec.layers) if isinstance(layer, fmt.LatentLayer)]
        raise fmt.FormatError(
            f"token_filter.layers names {'layers ' + str(outside) + ' past the last layer' if outside else ''}"
            f"{' and ' if outside and other else ''}{'non-latent layers ' + str(other) if other else ''}: in vLLM "
            f"Token Filtering reads the latent cache, so it filters latent layers only; this checkpoint's latent "
            f"layers are {latent}: pass them as token_filter.layers"
        )
    return layers


class LatentKVDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, spec: fmt.LatentKVSpec, dims: fmt.ModelDims, filtered: set[int],
                 prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        idx = extract_layer_index(prefix)
        token_filter = spec.token_filter_options() if idx in filtered else None
        if token_filter is None and use_vllm_mla(spec.layers[idx], spec, dims):  # shared RoPE of DeepSeek's size: vLLM's own MLA layer
            self.self_attn = LatentMLAAttention(vllm_config, spec, dims, idx, quant_config, prefix=f"{prefix}.self_attn")
        elif isinstance(spec.layers[idx], fmt.LatentLayer):  # Token Filtering runs in our backend, not in vLLM's MLA
            self.self_attn = LatentAttention(vllm_config, spec, dims, idx, quant_config, prefix=f"{prefix}.self_attn",
                                             token_filter=token_filter)
        else:
            self.self_attn = HeadAttention(spec, dims, idx, vllm_config.cache_config, quant_config, prefix=f"{prefix}.self_attn",
                                           eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(
            hidden_size=dims.hidden_size,
            intermediate_size=dims.intermediate_size,
            hidden_act=getattr(config, "hidden_act", "silu"),
            quant_config=quant_config,
            prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(dims.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(dims.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(  # as vLLM's LlamaModel: the token count is the dynamic dim
    dynamic_arg_dims={"input_ids": {0: "b"}, "positions": {0: "b"}, "intermediate_tensors": {0: "b"},
                      "inputs_embeds": {0: "b"}},
)
class LatentKVModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.spec, self.dims = load_latent_spec(vllm_config)
        self.filtered = filtered_layers(self.spec)
        self.config = config
        if get_pp_group().is_first_rank or (config.tie_word_embeddings and get_pp_group().is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(self.dims.vocab_size, self.dims.hidden_size, quant_config=vllm_config.quant_config)
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            self.dims.num_hidden_layers,
            lambda prefix: LatentKVDecoderLayer(vllm_config, self.spec, self.dims, self.filtered, prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(self.dims.hidden_size, eps=config.rms_norm_eps) if get_pp_group().is_last_rank else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], self.dims.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden_states, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LatentKVForCausalLM(nn.Module):
    packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    # (param name, checkpoint name, shard id)
    stacked_params_mapping = [(".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = LatentKVModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        dims = self.model.dims
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(dims.vocab_size, dims.hidden_size, quant_config=vllm_config.quant_config, prefix=maybe_prefix(prefix, "lm_head"))
            if dims.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
            self.logits_processor = LogitsProcessor(dims.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        spec = self.model.spec
        kinds = [layer.kind for layer in spec.layers]
        logger.info(
            "latentkv: %d layers (%s), cache_dtype=%s%s", len(kinds),
            ", ".join(f"{k}={kinds.count(k)}" for k in sorted(set(kinds))), spec.cache_dtype,
            f" (group {spec.int4_group_size})" if spec.cache_dtype == "int4" else "",
        )
        if spec.token_filter is not None:
            logger.info("latentkv: Token Filtering on layers %s: %s", sorted(self.model.filtered), spec.token_filter_options())

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.model.dims.tie_word_embeddings:
                continue
            for param_name, ckpt_name, shard_id in self.stacked_params_mapping:
                if ckpt_name not in name:
                    continue
                name = name.replace(ckpt_name, param_name)
                if is_pp_missing_parameter(name, self):
                    break
                param = params[name]
                param.weight_loader(param, tensor, shard_id)
                break
            else:
                if is_pp_missing_parameter(name, self):
                    continue
                if name not in params:
                    raise fmt.FormatError(f"checkpoint tensor {name} has no parameter in LatentKVForCausalLM")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        for mod_name, module in self.named_modules():  # parameters filled from other checkpoint tensors
            for derived in getattr(module, "derived_parameters", ()):
                loaded.add(f"{mod_name}.{derived}")
        return loaded
