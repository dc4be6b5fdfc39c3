"""The vLLM internals latentkv's backends and layers use, imported in one place.

Pinned to vLLM 0.32.0 (``pyproject.toml``, extra ``serve``). A version bump should
only have to touch this module.

Import this module only after vLLM has resolved ``vllm.platforms.current_platform``
(i.e. from attention backends, layers and models, which vLLM imports by qualname):
``vllm.v1.attention.backend`` resolves the platform on import, so importing it from
the platform plugin's own module would recurse. The platform class therefore imports
``vllm.platforms.cpu`` directly. The two entry points vLLM calls while it starts, the CPU platform
(``platform/cpu.py``) and ``vllm_latentkv.register`` (registries only), are the only other modules
that import vLLM.
"""

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.platforms import current_platform
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

# --- latent model and attention layer (vllm_latentkv.model, vllm_latentkv.attention) ---
from vllm.config import CacheConfig, get_current_vllm_config
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mla import MLAModules, MultiHeadLatentAttentionWrapper
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    extract_layer_index,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.compilation.decorators import support_torch_compile
from vllm.v1.kv_cache_interface import MLAAttentionSpec

__all__ = [
    "AttentionBackend",
    "AttentionBackendEnum",
    "AttentionImpl",
    "AttentionLayer",
    "AttentionMetadataBuilder",
    "AttentionSpec",
    "Attention",
    "AttentionLayerBase",
    "AttentionType",
    "CacheConfig",
    "ColumnParallelLinear",
    "IntermediateTensors",
    "LlamaMLP",
    "LogitsProcessor",
    "MLAAttentionSpec",
    "PPMissingLayer",
    "ParallelLMHead",
    "QuantizationConfig",
    "RMSNorm",
    "ReplicatedLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "default_weight_loader",
    "extract_layer_index",
    "get_current_vllm_config",
    "get_forward_context",
    "get_pp_group",
    "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_world_size",
    "is_pp_missing_parameter",
    "make_empty_intermediate_tensors_factory",
    "make_layers",
    "maybe_prefix",
    "CommonAttentionMetadata",
    "MultipleOf",
    "VllmConfig",
    "init_logger",
    "register_backend",
]
