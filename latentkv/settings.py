"""latentkv's environment switches, parsed in one place and one way.

| variable                | values (default first)        | effect                                                      |
|-------------------------|-------------------------------|-------------------------------------------------------------|
| ``LATENTKV_TRITON``     | ``auto`` / ``1`` / ``0``      | our Triton kernels for latent-cache writes and decode: auto  |
|                         |                               | = on CUDA, or on CPU under ``TRITON_INTERPRET=1``; 1 = must  |
|                         |                               | (error if Triton cannot run); 0 = the PyTorch path          |
| ``LATENTKV_VLLM_MLA``   | ``1`` / ``0``                 | serve shared-RoPE layers of DeepSeek's size with vLLM's own  |
|                         |                               | MLA layer (FlashMLA / Triton MLA); 0 = our backend           |
| ``LATENTKV_CPU_PLATFORM`` | ``0`` / ``1``               | run the real vLLM engine on a CPU-only machine (tests, CI)  |
| ``LATENTKV_CPU_COMPILE`` | ``0`` / ``1``                | with the CPU platform: compile the model as vLLM does on CPU |
|                         |                               | (Dynamo traced once, Inductor) instead of running eagerly   |
| ``LATENTKV_CACHE``      | ``~/.cache/latentkv`` / path  | where the SmolLM2 GGUF and its import are kept              |

Booleans accept 1/true/yes/on and 0/false/no/off (any case); anything else is an error that names
the variable. The switches are read when a server builds its layers, never per decode step.
README's "Environment" section repeats this table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{name}={os.environ[name]!r}: expected one of {', '.join(_TRUE + _FALSE)}")


@dataclass(frozen=True)
class Settings:
    triton: Literal["auto", "on", "off"]
    vllm_mla: bool
    cpu_platform: bool
    cpu_compile: bool
    cache_dir: Path
    triton_interpret: bool  # Triton's own TRITON_INTERPRET=1: kernels run on CPU tensors

    @classmethod
    def from_env(cls) -> "Settings":
        triton_raw = os.environ.get("LATENTKV_TRITON", "").strip().lower()
        triton = "auto" if triton_raw in ("", "auto") else ("on" if _flag("LATENTKV_TRITON", True) else "off")
        cache = os.environ.get("LATENTKV_CACHE")
        return cls(
            triton=triton,
            vllm_mla=_flag("LATENTKV_VLLM_MLA", True),
            cpu_platform=_flag("LATENTKV_CPU_PLATFORM", False),
            cpu_compile=_flag("LATENTKV_CPU_COMPILE", False),
            cache_dir=Path(cache) if cache else Path.home() / ".cache" / "latentkv",
            triton_interpret=os.environ.get("TRITON_INTERPRET", "") == "1",
        )


def settings() -> Settings:
    """The switches as the environment sets them now (call when building, not per step)."""
    return Settings.from_env()
