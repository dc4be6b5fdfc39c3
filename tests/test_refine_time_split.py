"""benchmarks/refine_time_split.py: the sorting of profiled ops into a step's parts, on a real
torch.profiler trace of a small Adam step (the SmolLM2 run itself is the benchmark, not a test)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from refine_time_split import part_of  # noqa: E402


def test_profiled_ops_fall_into_the_step_parts():
    torch.manual_seed(0)
    proj = torch.nn.Linear(32, 32)
    opt = torch.optim.Adam(proj.parameters(), foreach=True)
    x, q = torch.randn(64, 32), torch.randn(1, 2, 16, 16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss = proj(x).pow(2).mean() + F.scaled_dot_product_attention(q, q, q, is_causal=True).sum()
        loss.backward()
        opt.step()
    parts: dict[str, set[str]] = {}
    for event in prof.events():
        parts.setdefault(part_of(event), set()).add(event.name)
    assert parts["matrix multiplies"] & {"aten::mm", "aten::addmm"}
    assert any("scaled_dot_product" in name for name in parts["attention kernels"])
    assert any(name.startswith("aten::_foreach_") for name in parts["Adam"])  # called by Adam.step, not by the loss
    assert "aten::pow" in parts["the rest"]
    assert not any(name.startswith("aten::_foreach_") for name in parts["the rest"])
