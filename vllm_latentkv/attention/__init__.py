"""Latent-KV attention for vLLM: layer (``layer.py``), backend (``backend.py``), cache layout
and spec (``cache.py``, INT4 page bytes), per-head layers (``head.py``), vLLM-MLA layers (``mla.py``),
tensor-parallel head split shared by the layers (``tp.py``). The attention math itself is ``latentkv.attention``'s.

Importing this package imports vLLM; :mod:`vllm_latentkv` itself does not.
"""

BACKEND_NAME = "LATENTKV_MLA"  # registered by vllm_latentkv.register; the CPU platform's MLA hook looks it up
BACKEND_PATH = "vllm_latentkv.attention.backend.LatentKVAttentionBackend"
# The custom op of a latent layer's cache write + attention (``layer.py``): opaque to torch.compile,
# and a splitting op of vLLM's piecewise compilation (added by vllm_latentkv.register).
ATTENTION_OP = "latentkv_attention"
