"""Triton kernels of the latentkv vLLM plugin (pure torch + triton; importable without vLLM).

Each kernel sits beside a plain PyTorch reference (`*_ref`) that the tests in tests/kernels
compare against. To run them on CPU, set TRITON_INTERPRET=1 before this package is imported.
The INT4 cache format they read and write is defined in pure torch by `latentkv.int4`.
"""

from .full_rope_decode import (
    full_rope_decode_attention,
    full_rope_decode_attention_int4,
    full_rope_decode_attention_ref,
)
from .latent_decode import (
    latent_decode_attention,
    latent_decode_attention_int4,
    latent_decode_attention_ref,
)
from .latent_cache import (
    latent_cache_write,
    latent_cache_write_int4,
    latent_cache_write_int4_ref,
    latent_cache_write_ref,
)

__all__ = [
    "full_rope_decode_attention",
    "full_rope_decode_attention_int4",
    "full_rope_decode_attention_ref",
    "latent_cache_write",
    "latent_cache_write_int4",
    "latent_cache_write_int4_ref",
    "latent_cache_write_ref",
    "latent_decode_attention",
    "latent_decode_attention_int4",
    "latent_decode_attention_ref",
]
