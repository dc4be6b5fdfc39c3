"""Hugging Face Llama-family checkpoints (Llama, Mistral, Qwen2, Qwen3, SmolLM), read lazily.

Tensors are memory-mapped from safetensors (single file or sharded) and read one at a time, in
whatever dtype they are stored (fp32/fp16/bf16); nothing loads the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from latentkv import format as fmt
from latentkv.checkpoint import CheckpointError, TensorReader, read_header, weight_files
from latentkv.rope import source_inv_freq

SUPPORTED_ARCHITECTURES = fmt.SOURCE_ARCHITECTURES


@dataclass
class AttentionWeights:
    """One source layer's attention, nn.Linear convention: W [out, in]."""

    wq: torch.Tensor  # [H d_h, D]
    wk: torch.Tensor  # [G d_h, D]
    wv: torch.Tensor  # [G d_h, D]
    wo: torch.Tensor  # [D, H d_h]
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # [d_h]
    k_norm: torch.Tensor | None = None


class SourceModel:
    """A source checkpoint directory: config, dimensions, RoPE table and lazy tensors."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if self.dir.is_file() and self.dir.suffix == ".gguf":
            raise CheckpointError(f"{self.dir} is a GGUF file; import it first with `latentkv import-gguf {self.dir} DIR`, "
                                  "then convert DIR")
        if not self.dir.is_dir():
            raise CheckpointError(f"source model directory {self.dir} does not exist")
        self.config_dict = fmt.read_config(self.dir)
        self.architecture = self._architecture()
        self.model_type = SUPPORTED_ARCHITECTURES[self.architecture]
        self._reject_unsupported_features()
        try:
            self.dims = fmt.model_dims(self.config_dict)
        except KeyError as e:
            raise CheckpointError(f"{self.dir}/config.json lacks the field {e}") from None
        self.hf_config = self._hf_config()
        self.inv_freq = source_inv_freq(self.hf_config)
        self.reader = TensorReader(self.dir)
        self.attention_bias = "model.layers.0.self_attn.q_proj.bias" in self.reader
        self.qk_norm = "model.layers.0.self_attn.q_norm.weight" in self.reader
        self.rms_norm_eps = float(self.config_dict.get("rms_norm_eps", 1e-6))
        self._check_files()

    def _architecture(self) -> str:
        archs = self.config_dict.get("architectures") or []
        for arch in archs:
            if arch in SUPPORTED_ARCHITECTURES:
                return arch
        if self.config_dict.get("model_type") == fmt.MODEL_TYPE:
            raise CheckpointError(f"{self.dir} is already a latentkv checkpoint; convert the original model instead")
        raise CheckpointError(
            f"unsupported architecture {archs or self.config_dict.get('model_type')!r} in {self.dir}; "
            f"latentkv converts {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def _reject_unsupported_features(self) -> None:
        c = self.config_dict
        window = c.get("sliding_window")
        if window is not None and (c.get("use_sliding_window", True)) and window < c.get("max_position_embeddings", 0):
            raise CheckpointError(
                f"{self.dir} uses sliding-window attention (window {window}); the latent format has no sliding "
                "window yet. Convert a model without it, or set sliding_window to null if the model does not need it."
            )
        if c.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"hidden_act {c.get('hidden_act')!r} is not supported (only silu, the Llama family's)")

    def _hf_config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.dir)

    def _check_files(self) -> None:
        names = set(self.reader.names())
        for i in range(self.dims.num_hidden_layers):
            for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
                name = f"model.layers.{i}.self_attn.{part}.weight"
                if name not in names:
                    raise CheckpointError(f"source checkpoint is missing tensor {name}")
        for path in set(weight_files(self.dir).values()):
            for name, info in read_header(path).items():
                if info["dtype"] not in ("F32", "F16", "BF16"):
                    raise CheckpointError(f"tensor {name} has dtype {info['dtype']}; only fp32/fp16/bf16 sources are supported")

    @property
    def dtype(self) -> torch.dtype:
        stored = self.reader.dtype_name("model.embed_tokens.weight")
        return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[stored]

    def tensor(self, name: str, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
        t = self.reader.get(name, dtype=dtype)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"source tensor {name} contains NaN or Inf values; the checkpoint is corrupt")
        return t

    def attention(self, i: int) -> AttentionWeights:
        p = f"model.layers.{i}.self_attn."
        get = lambda n: self.tensor(p + n) if p + n in self.reader else None  # noqa: E731
        return AttentionWeights(
            wq=get("q_proj.weight"), wk=get("k_proj.weight"), wv=get("v_proj.weight"), wo=get("o_proj.weight"),
            bq=get("q_proj.bias"), bk=get("k_proj.bias"), bv=get("v_proj.bias"),
            q_norm=get("q_norm.weight"), k_norm=get("k_norm.weight"),
        )

    def non_attention_names(self) -> list[str]:
        """Every tensor the conversion copies unchanged (embeddings, norms, MLPs, lm_head)."""
        return [n for n in self.reader.names() if ".self_attn." not in n and not n.endswith("rotary_emb.inv_freq")]

    def layer_names(self, i: int) -> list[str]:
        prefix = f"model.layers.{i}."
        return [n for n in self.reader.names() if n.startswith(prefix)]
