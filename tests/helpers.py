"""Small real checkpoints for tests: random Llama-family models saved by transformers itself."""

from __future__ import annotations

from pathlib import Path

import torch

# Most conversion tests were written for MHA2MLA's plain SVD (needs no calibration data on
# random models); the converter's default is the calibrated, refined recipe, so they ask for it.
PLAIN_SVD = dict(method="svd", refine_steps=0)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


def make_hf_model(out: Path, family: str = "llama", *, kv_heads: int = 2, heads: int = 4, head_dim: int = 16,
                  hidden: int = 64, layers: int = 2, vocab: int = 128, seed: int = 0, dtype=torch.float32) -> Path:
    """Save a random HF model (Llama, Mistral, Qwen2 with q/k/v biases, Qwen3 with q/k norms) to ``out``."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
    extra = {"sliding_window": None} if family == "mistral" else {}
    config_cls, model_cls = classes[family]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                        max_position_embeddings=256, tie_word_embeddings=False, **extra)
    model = model_cls(config)
    with torch.no_grad():  # make biases and norm gains matter: a zero bias hides bias bugs
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.to(dtype).save_pretrained(out)
    return out


def load_latent(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    import latentkv.modeling  # noqa: F401

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def load_hf(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
