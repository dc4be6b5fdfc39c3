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
    _registered = True
    # Model and attention-backend registration go here (imports of vLLM inside
    # this function only, never at module level).


def is_registered() -> bool:
    """Whether :func:`register` has run in this process."""
    return _registered
