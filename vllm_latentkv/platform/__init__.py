"""CPU reference platform for vLLM 0.32.0 (development and CI aid, not production).

Setting ``LATENTKV_CPU_PLATFORM=1`` makes the real vLLM engine (``vllm.LLM`` and
``vllm serve``) run on a CPU-only machine with the ordinary PyPI (CUDA) wheel of
vLLM. Nothing here is fast: attention is plain PyTorch and everything runs eagerly.
It exists so that latentkv's model and attention code can be tested against the
real scheduler, KV-cache manager, sampler and OpenAI server without a GPU.

This module is the ``vllm.platform_plugins`` entry point. It must not import vLLM:
vLLM calls :func:`cpu_platform_plugin` while it is still resolving
``vllm.platforms.current_platform``.
"""

ENV_VAR = "LATENTKV_CPU_PLATFORM"
PLATFORM_QUALNAME = "vllm_latentkv.platform.cpu.LatentKVCpuPlatform"


def _enabled() -> bool:
    from latentkv.settings import settings  # no vLLM import: safe while vLLM resolves its platform

    return settings().cpu_platform


def cpu_platform_plugin() -> str | None:
    """Return the platform class path when ``LATENTKV_CPU_PLATFORM`` is set, else None.

    Returning None leaves vLLM's own platform detection untouched. Do not also set
    ``VLLM_TARGET_DEVICE=cpu``: vLLM then picks its built-in CpuPlatform (which needs
    vLLM's CPU build) and never asks out-of-tree platform plugins.
    """
    return PLATFORM_QUALNAME if _enabled() else None
