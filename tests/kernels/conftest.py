"""Kernel tests run the Triton kernels on CPU through the Triton interpreter.

TRITON_INTERPRET must be set before the kernels are decorated (at import of
vllm_latentkv.kernels), so it is set here, at conftest import, before any test module of this
directory is collected. If another part of the suite imports vllm_latentkv.kernels earlier
without it, the kernel launchers raise a RuntimeError that says so.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
