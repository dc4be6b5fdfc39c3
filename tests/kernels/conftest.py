"""Kernel tests run the Triton kernels on CPU through the Triton interpreter, or natively on a GPU.

``LATENTKV_KERNEL_DEVICE=cuda`` (``scripts/gpu_validate.sh``): no interpreter; every kernel a test
module imported is wrapped so that its tensor arguments go to the GPU for the launch and results
(and the tensors it writes, such as caches) come back to the CPU, where the references run; bf16
joins the dtypes under test (``kernel_helpers.KERNEL_DTYPES``). Otherwise:

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

import functools
import os

KERNEL_DEVICE = os.environ.get("LATENTKV_KERNEL_DEVICE", "cpu")
_SAVED = os.environ.get("TRITON_INTERPRET")
if KERNEL_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_finish(session):
    if _SAVED is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _SAVED


@pytest.fixture(autouse=True)
def _interpret_and_seed(monkeypatch, request):
    if KERNEL_DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        _run_kernels_on(KERNEL_DEVICE, request.module, monkeypatch)
    torch.manual_seed(0)


def _run_kernels_on(device: str, module, monkeypatch) -> None:
    """Wrap the public kernels (not the *_ref references) a test module imported: tensors to
    ``device`` for the launch, written arguments and results back to the CPU."""
    from vllm_latentkv import kernels

    for name in kernels.__all__:
        fn = getattr(module, name, None)
        if fn is not None and not name.endswith("_ref"):
            monkeypatch.setattr(module, name, _on_device(fn, device))


def _on_device(fn, device: str):
    def move(x):
        return x.to(device) if isinstance(x, torch.Tensor) else x

    def back(x):
        if isinstance(x, torch.Tensor):
            return x.cpu()
        return type(x)(back(v) for v in x) if isinstance(x, tuple) else x

    @functools.wraps(fn)
    def launch(*args, **kwargs):
        moved_args, moved_kwargs = [move(a) for a in args], {k: move(v) for k, v in kwargs.items()}
        out = fn(*moved_args, **moved_kwargs)
        torch.cuda.synchronize()
        for orig, dev in zip(list(args) + list(kwargs.values()), moved_args + list(moved_kwargs.values())):
            if isinstance(orig, torch.Tensor) and orig.device.type == "cpu":
                orig.copy_(dev.cpu())  # kernels that write (caches) wrote the device copy
        return back(out)

    return launch
