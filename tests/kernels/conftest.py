"""Kernel tests run the Triton kernels on CPU through the Triton interpreter.

TRITON_INTERPRET must be set when the kernels are decorated (at import of
vllm_latentkv.kernels and of the test modules), so it is set here, at conftest import, before
the modules of this directory are collected. It is put back as it was once collection has
finished, and set again around each test of this directory (an autouse fixture): the kernels
stay interpreted for the rest of the process (Triton itself reads the variable again during a
launch, for lazy imports), and tests elsewhere (the engine tests read TRITON_INTERPRET to choose
between the Triton and the torch decode path) see the environment they were started with. If another part of the suite imports
vllm_latentkv.kernels before this directory is collected, the launchers raise a RuntimeError
that says so.
"""

import os

_SAVED = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_finish(session):
    if _SAVED is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _SAVED


@pytest.fixture(autouse=True)
def _interpret_and_seed(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
