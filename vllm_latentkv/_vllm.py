"""The vLLM internals latentkv's backends and layers use, imported in one place.

Pinned to vLLM 0.32.0 (``pyproject.toml``, extra ``serve``). A version bump should
only have to touch this module.

Import this module only after vLLM has resolved ``vllm.platforms.current_platform``
(i.e. from attention backends, layers and models, which vLLM imports by qualname):
``vllm.v1.attention.backend`` resolves the platform on import, so importing it from
the platform plugin's own module would recurse. The platform class therefore imports
``vllm.platforms.cpu`` directly.
"""

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.kv_cache_interface import AttentionSpec

__all__ = [
    "AttentionBackend",
    "AttentionBackendEnum",
    "AttentionImpl",
    "AttentionLayer",
    "AttentionMetadataBuilder",
    "AttentionSpec",
    "AttentionType",
    "CommonAttentionMetadata",
    "MultipleOf",
    "VllmConfig",
    "init_logger",
    "register_backend",
]
