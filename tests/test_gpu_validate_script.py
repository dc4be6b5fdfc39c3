"""scripts/gpu_validate.py: the plan it would run fits its budget, and it refuses to run without a GPU.
(Its CPU dry run, `scripts/gpu_validate.sh dry-run`, exercises every step's plumbing; minutes, so not here.)"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_validate.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_validate", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_required_steps_fit_ten_minutes_and_name_prepared_models(tmp_path):
    steps = _module().steps(tmp_path)
    names = [s.name for s in steps]
    assert names[:5] == ["kernels", "engine", "speed", "speed-25", "memory"] and names[-1] == "speed-b1"
    assert sum(s.budget for s in steps[:5]) <= 620  # about ten minutes with start-up
    for s in steps:  # the GPU commands read only prepared models and repo files
        models = [a for a in s.gpu if str(tmp_path) in a]
        assert all(a.startswith(str(tmp_path / "models")) or a == str(tmp_path) for a in models), s.gpu


def test_run_without_a_gpu_refuses(tmp_path):
    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr
    assert not (tmp_path / "summary.md").exists()
