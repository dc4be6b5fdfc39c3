"""Rotary position embedding in Hugging Face's half-split layout, with any frequency table.

A rope vector of width 2n holds n frequency pairs: pair i is (x[i], x[i + n]) and turns by the
angle ``position * inv_freq[i]``. Latent layers keep only some pairs, chosen per rope head, so
the frequency table is given per head: ``inv_freq: [n]`` (all heads alike) or ``[heads, n]``.
"""

from __future__ import annotations

from typing import Any

import torch


def source_inv_freq(config: Any) -> torch.Tensor:
    """The source model's RoPE inverse frequencies [head_dim / 2], rope scaling included.

    Uses transformers' own initialisers so that Llama 3 style scaling matches the source
    exactly. Scalings that change the attention temperature or depend on the sequence length
    cannot be frozen into a table and are rejected.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(
            f"rope_type {rope_type!r} is not supported: only default, linear and llama3 scaling have a fixed "
            "frequency table; convert a model without that rope scaling"
        )
    if rope_type == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        # float32 like transformers' default initialiser, so converted and source models agree bit for bit
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return (1.0 / (base**exponent)).to(torch.float64)
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    if attention_scaling != 1.0:
        raise ValueError(f"rope_type {rope_type!r} scales attention by {attention_scaling}; not supported")
    return inv_freq.to(torch.float64)


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Apply RoPE.

    x: [B, T, heads, 2n]; positions: [B, T] (int); inv_freq: [n] or [heads, n] (float64 or float32).
    Angles are computed in float64 so long positions do not lose precision.
    """
    n = x.shape[-1] // 2
    freqs = inv_freq.to(device=x.device, dtype=torch.float64)
    if freqs.dim() == 1:
        freqs = freqs[None]  # [1, n]: one table broadcast over the heads (cos/sin are the costly part)
    angle = positions.to(torch.float64)[..., None, None] * freqs  # [B, T, heads or 1, n]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :n], x[..., n:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def pair_dims(pairs: list[int], n_f: int) -> list[int]:
    """Source head dims of the given frequency pairs, in the half-split order [firsts | seconds]."""
    return list(pairs) + [p + n_f for p in pairs]
