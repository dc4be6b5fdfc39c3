"""vLLM plugin for latent-KV checkpoints.

vLLM calls :func:`register` (entry point ``vllm.general_plugins: latentkv``) in
every process it starts: API server, engine core, workers. Importing this
package must stay cheap and must not import vLLM: the converters and the CLI
import ``vllm_latentkv`` on machines without vLLM.

The CPU reference platform (``vllm.platform_plugins: latentkv_cpu``) lives in
:mod:`vllm_latentkv.platform`; it is independent of :func:`register`.
"""

_registered = False


def register() -> None:
    """Register latentkv's models and attention backends with vLLM.

    Idempotent: vLLM may call it more than once per process.
    """
    global _registered
    if _registered:
        return
    _register_latent_model()  # vLLM is imported inside, never at module level
    _registered = True  # only once it worked: a failed attempt may be retried


def _register_latent_model() -> None:
    """The latent-KV architecture, its config type and its attention backend (idempotent).

    Touches nothing a non-latent model uses: a new architecture name, a new model type and a
    new backend name. Imports only vLLM's registries; the model module is imported lazily.
    """
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from vllm.config import CompilationConfig

    from vllm_latentkv.attention import ATTENTION_OP, BACKEND_NAME, BACKEND_PATH
    from vllm_latentkv.config import register_config

    register_config()
    if f"vllm::{ATTENTION_OP}" not in CompilationConfig._attention_ops:  # piecewise graphs split at our attention
        CompilationConfig._attention_ops.append(f"vllm::{ATTENTION_OP}")
    if "LatentKVForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("LatentKVForCausalLM", "vllm_latentkv.model:LatentKVForCausalLM")
    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_PATH)


def is_registered() -> bool:
    """Whether :func:`register` has run in this process."""
    return _registered
