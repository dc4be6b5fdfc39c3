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
    assert sum(s.budget for s in steps[:5]) < 600  # ten minutes
    for s in steps:  # the GPU commands read only prepared models and repo files
        models = [a for a in s.gpu if str(tmp_path) in a]
        assert all(a.startswith(str(tmp_path / "models")) or a == str(tmp_path) for a in models), s.gpu


def test_run_without_a_gpu_refuses(tmp_path):
    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr
    assert not (tmp_path / "summary.md").exists()


def test_steps_stop_at_the_deadline_and_later_ones_are_skipped(tmp_path, monkeypatch):
    mod = _module()
    py = sys.executable

    def sleeper(seconds):
        return [py, "-c", f"import time; time.sleep({seconds}); print('slept {seconds}')"]

    monkeypatch.setattr(mod, "steps", lambda out: [
        mod.Step("quick", 5, gpu=sleeper(0.5), cpu=sleeper(0.5)),
        mod.Step("slow", 30, gpu=sleeper(30), cpu=sleeper(30)),  # gets only what is left of the budget
        mod.Step("late", 5, gpu=sleeper(0), cpu=sleeper(0)),
    ])
    done = mod.run_steps(tmp_path, budget=12, dry=False)
    assert [s.status for s in done][0] == "passed" and done[0].result == "slept 0.5"
    assert done[1].status.startswith("stopped at its") and 9 <= done[1].seconds <= 13
    assert done[2].status.startswith("skipped")
    mod.write_summary(tmp_path, done, 12, dry=False)
    assert "| late | skipped" in (tmp_path / "summary.md").read_text()
