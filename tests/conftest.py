"""Suite-wide environment.

vLLM picks its platform once per process, the first time anything touches
``vllm.platforms.current_platform`` (many vLLM imports do). Tests that run the real
engine on these CPU-only machines need latentkv's CPU platform, so it is selected
here, before any test module is imported. Set LATENTKV_CPU_PLATFORM=0 to keep
vLLM's own platform detection (e.g. on a GPU machine).
"""

import os

os.environ.setdefault("LATENTKV_CPU_PLATFORM", "1")
