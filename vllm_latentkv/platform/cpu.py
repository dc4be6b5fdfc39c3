"""LatentKVCpuPlatform: vLLM 0.32.0's CpuPlatform made to run on the CUDA wheel.

Development and CI aid, not a production path (see :mod:`vllm_latentkv.platform`).
On top of vLLM's CpuPlatform it

* defines the CPU-build ``torch.ops._C`` ops the engine calls, in PyTorch
  (:mod:`.ops`), and replaces the block table's Triton slot-mapping kernel;
* returns pure-PyTorch attention backends (:mod:`.torch_attn`);
* runs eagerly: no torch.compile, no CUDA graphs, ``custom_ops=["none"]`` so that
  every layer takes its ``forward_native`` path;
* sizes the KV cache from an explicit byte budget (default 1 GiB) instead of
  from ``gpu_memory_utilization`` x total RAM.

Attention backend choice (``get_attn_backend_cls``), in order:

1. a layer built with ``Attention(..., attn_backend=Cls)`` never asks the platform;
2. a backend named with ``--attention-backend NAME`` / ``attention_config.backend``
   is used if it is registered from outside vLLM (vLLM's own backends need compiled
   kernels and are ignored with a log line, as vLLM's CpuPlatform does);
3. vLLM's own MLA layers (``use_mla``: ``MLAAttention``, as DeepSeek models and
   latentkv's ``shared``-RoPE layers of DeepSeek's size build it) get vLLM's reference
   ``CPU_MLA`` backend, whose one compiled op (``_C::mla_decode_kvcache``) :mod:`.ops`
   defines; latentkv's own latent layers name their backend themselves (step 1);
4. everything else gets :class:`~.torch_attn.TorchPagedAttentionBackend`.
"""

import os

from vllm.logger import init_logger
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

from latentkv.settings import settings
from vllm_latentkv.platform import ops

TORCH_ATTN_NAME = "TORCH_PAGED_ATTN"
TORCH_ATTN_PATH = "vllm_latentkv.platform.torch_attn.TorchPagedAttentionBackend"
DEFAULT_KV_CACHE_BYTES = 1 << 30

# A child of vLLM's "vllm" logger: its handler and VLLM_LOGGING_LEVEL apply.
logger = init_logger("vllm.latentkv.platform")

_SLOT_MAPPING_KERNEL = "vllm.v1.worker.block_table.ComputeSlotMappingKernel.kernel"


def _register_torch_backend() -> None:
    # Attention(...) looks its backend up by name in AttentionBackendEnum, so the
    # name must exist in every process that builds layers. Registering a path
    # imports nothing.
    if TORCH_ATTN_NAME not in AttentionBackendEnum.__members__:
        register_backend(TORCH_ATTN_NAME, TORCH_ATTN_PATH)


class LatentKVCpuPlatform(CpuPlatform):
    @classmethod
    def import_kernels(cls) -> None:
        # vLLM's CPU kernels live in a library the CUDA wheel does not ship.
        ops.register_cpu_ops()

    @classmethod
    def register_triton_kernel_overrides(cls) -> None:
        # No GPU driver: vLLM's Triton kernels are placeholders. CpuPlatform's own
        # overrides call C++ kernels of the CPU build, and its slot-mapping one
        # takes its arguments in another order than the kernel (so it fails even
        # with them). Replace only the kernel every step launches; speculative
        # decoding and Mamba kernels stay unsupported.
        from vllm.triton_utils.dispatcher import register_kernels

        register_kernels({_SLOT_MAPPING_KERNEL: ops.compute_slot_mapping_kernel})

    @classmethod
    def apply_config_platform_defaults(cls, vllm_config) -> None:
        # Runs before vLLM picks its compilation defaults, so eager mode sticks.
        from vllm.config import CompilationMode, CUDAGraphMode

        compilation = vllm_config.compilation_config
        if not settings().cpu_compile:
            compilation.mode = CompilationMode.NONE
            if vllm_config.model_config is not None:
                vllm_config.model_config.enforce_eager = True
        compilation.cudagraph_mode = CUDAGraphMode.NONE
        # "none": no layer may call a compiled custom op; forward_native everywhere.
        compilation.custom_ops = ["none"]
        vllm_config.kernel_config.enable_jit_warmup = False

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)
        from vllm.config import CompilationMode, CUDAGraphMode

        compilation = vllm_config.compilation_config
        if not settings().cpu_compile:  # else vLLM's CPU choice stands: Dynamo traced once, Inductor
            compilation.mode = CompilationMode.NONE
        compilation.cudagraph_mode = CUDAGraphMode.NONE
        compilation.custom_ops = ["none"]
        # vLLM's default ("auto") binds each CPU worker's OpenMP threads to a NUMA node of its
        # own and so refuses TP > 1 on one-node machines; a reference platform gains nothing
        # from binding. An explicit VLLM_CPU_OMP_THREADS_BIND still wins.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        cache = vllm_config.cache_config
        if cache.kv_cache_memory_bytes is None:
            # Without a budget the CPU worker reserves gpu_memory_utilization of
            # all RAM (0.9 by default) and fails when other processes hold some.
            cache.kv_cache_memory_bytes = DEFAULT_KV_CACHE_BYTES
        logger.info(
            "latentkv CPU reference platform (development/CI aid, not for production): "
            "eager PyTorch, KV cache budget %.2f GiB (--kv-cache-memory-bytes).",
            cache.kv_cache_memory_bytes / (1 << 30),
        )

    @classmethod
    def get_attn_backend_cls(
        cls,
        selected_backend,
        attn_selector_config,
        num_heads: int | None = None,
    ) -> str:
        _register_torch_backend()
        cfg = attn_selector_config
        if cfg.use_sparse:
            raise NotImplementedError(
                "sparse attention is not supported by the latentkv CPU platform"
            )
        if selected_backend is not None and selected_backend.name != TORCH_ATTN_NAME:
            path = selected_backend.get_path()
            if not path.startswith("vllm."):
                return path
            cls._log_ignored(selected_backend)
        if cfg.use_mla:
            logger.info_once("Using vLLM's CPU_MLA backend for MLA layers.")
            return AttentionBackendEnum.CPU_MLA.get_path()
        return cls._torch_backend_path(cfg)

    @staticmethod
    def _log_ignored(selected_backend) -> None:
        logger.info_once(
            "Ignoring attention backend %s: vLLM's own backends need compiled "
            "kernels the latentkv CPU platform does not have.",
            selected_backend.name,
        )

    @staticmethod
    def _torch_backend_path(cfg) -> str:
        from vllm_latentkv.platform.torch_attn import TorchPagedAttentionBackend

        reasons = TorchPagedAttentionBackend.validate_configuration(
            device_capability=None, **cfg._asdict()
        )
        if reasons:
            raise ValueError(
                f"{TORCH_ATTN_NAME} cannot run this attention layer "
                f"({cfg!r}): {'; '.join(reasons)}"
            )
        logger.info_once("Using %s attention backend.", TORCH_ATTN_NAME)
        return TORCH_ATTN_PATH


# Every process resolves the platform before building layers: define the ops and
# the backend name now, so that workers have them whatever they import first.
ops.register_cpu_ops()
_register_torch_backend()
