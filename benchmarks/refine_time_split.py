"""Where the grouped recipe's conversion time goes on this CPU, and the least it could take here.

The grouped recipe (one latent per KV head, 512 C4 sequences, 1500 Adam steps per layer with q/o free,
the damped model target) converts SmolLM2 in 24-25 minutes on a 2-core CPU with AMX and in 44 on a
2-core AVX512-BF16 CPU without it (``results/smollm2_quality_c4_residual.md``). This script splits
that time, on layer 0 and the recipe's options at a 50% cache, into

* one Adam step (4 sequences of 256 tokens; its cost does not depend on the layer), timed without
  the profiler (median of ``--repeats`` fits), and shared out by torch.profiler's self CPU time
  into matrix multiplies, the attention kernels, Adam, and the rest (element-wise ops, indexing,
  autograd's bookkeeping);
* each layer's fixed passes over the 512 calibration sequences: the closed form (statistics and
  factorisation), and the refinement's own (the source attention for the targets, the student
  before and after, the MLP for both streams), timed as a one-step fit less one step.

From those it estimates the whole conversion (30 layers x (fixed + steps x step)) and a floor: the
same with every step reduced to its matrix multiplies and attention kernels, which no fusion of
the rest removes. The steps run in the precision ``--refine-precision auto`` picks here.

    python benchmarks/refine_time_split.py    # -> results/refine_time_split_<cpu kind>.md (about a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from converters.allocation import latent_widths
from converters import calibration as calib
from converters.convert import ConvertOptions, _convert_attention, calibration_tokens, complete_biases
from converters.importers.hf import SourceModel
from converters.importers.smollm2 import smollm2_hf
from converters.options import C4_ONLY_CALIBRATION
from refine_precision_time import auto_precision, cpu_kind, cpu_name, refine_layer0
from smollm2_quality import ROWS

RESULTS = Path(__file__).resolve().parent / "results"
RECIPE_ROW = "full-3groups-rootcov-refined-model-1500-qo-512seq-lr3e-3-residual0.5"
STEP_SEQUENCES = 8  # the step timings' calibration set: a step draws 4 of them whatever the set's size
MATMULS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm"}
PARTS = ("matrix multiplies", "attention kernels", "Adam", "the rest")


def part_of(event) -> str:
    """Which part of a step a profiled op belongs to (by its own name, or Adam's for what Adam calls)."""
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer."):
            return "Adam"
        parent = parent.cpu_parent
    if event.name in MATMULS:
        return "matrix multiplies"
    return "attention kernels" if "scaled_dot_product" in event.name or "flash_attention" in event.name else "the rest"


def refine(source, opts, hidden, layer, tensors, steps: int, reference=None) -> float:
    """Seconds of the refinement of layer 0 with ``steps`` steps (the model target when ``reference`` is
    given), all of it: the targets, the fit with its E checks, the streams through the MLP."""
    t0 = time.perf_counter()
    refine_layer0(source, opts, hidden, layer, tensors, steps, opts.refine_precision, reference)
    return time.perf_counter() - t0


def step_seconds(source, opts, hidden, layer, tensors, steps: int, repeats: int) -> float:
    """Median seconds of one step: (a ``steps``-step refinement - a 1-step one) / (steps - 1), so
    everything but the steps (the targets, E before and after, the MLP) cancels."""
    base = refine(source, opts, hidden, layer, tensors, 1)
    return statistics.median((refine(source, opts, hidden, layer, tensors, steps) - base) / (steps - 1)
                             for _ in range(repeats))


def step_shares(source, opts, hidden, layer, tensors, steps: int) -> dict[str, float]:
    """Each part's share of the self CPU time of a profiled ``steps``-step refinement, a 1-step one's subtracted."""
    def profiled(n):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            refine(source, opts, hidden, layer, tensors, n)
        totals = defaultdict(float)
        for event in prof.events():
            totals[part_of(event)] += event.self_cpu_time_total
        return totals

    base, fit = profiled(1), profiled(steps)
    per_step = {part: max(fit[part] - base[part], 0.0) for part in PARTS}
    total = sum(per_step.values())
    return {part: t / total for part, t in per_step.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="Adam steps per timed fit")
    ap.add_argument("--repeats", type=int, default=3, help="timed fits of each kind")
    ap.add_argument("--out", type=Path, help="default: results/refine_time_split_<cpu kind>.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t_run = time.perf_counter()
    opts = ConvertOptions(**{**ROWS[RECIPE_ROW][0], **C4_ONLY_CALIBRATION, "kv_ratio": 0.5, "refine_precision": "auto"})
    source = SourceModel(smollm2_hf())
    hidden = calib.embed(source, calibration_tokens(source, opts))
    width = latent_widths(opts, source.dims, source.qk_norm)[0]
    logging.info("closed form of layer 0 on %d x %d calibration tokens, %d times", *hidden.shape[:2], args.repeats)
    closed = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        layer, tensors = _convert_attention(0, width, opts, source, hidden)
        closed.append(time.perf_counter() - t0)
    tensors = complete_biases(layer, tensors, opts, source)
    small = hidden[:STEP_SEQUENCES]
    logging.info("%d-step fits in %s, %d times", args.steps, auto_precision(), args.repeats)
    step = step_seconds(source, opts, small, layer, tensors, args.steps, args.repeats)
    shares = step_shares(source, opts, small, layer, tensors, args.steps)
    logging.info("one-step fits on all %d sequences (the refinement's fixed passes), %d times", len(hidden), args.repeats)
    reference = hidden.clone()  # a second stream, as the model target has: both go through the MLP
    passes = statistics.median(refine(source, opts, hidden, layer, tensors, 1, reference) - step
                               for _ in range(args.repeats))
    write(args.out or RESULTS / f"refine_time_split_{cpu_kind()}.md", opts, step, shares,
          statistics.median(closed), passes, source.dims.num_hidden_layers, hidden.shape, args,
          time.perf_counter() - t_run)


def write(out: Path, opts, step, shares, closed, passes, layers, shape, args, seconds) -> None:
    command = " ".join(["benchmarks/refine_time_split.py", *sys.argv[1:]])
    steps = opts.refine_steps
    fixed = closed + passes
    floor_step = step * (shares["matrix multiplies"] + shares["attention kernels"])
    estimate, floor = layers * (fixed + steps * step), layers * (fixed + steps * floor_step)
    lines = [
        f"# The grouped recipe's conversion time, split ({cpu_kind()} CPU)",
        "",
        f"Written by `{command}` in {seconds:.0f} s on {cpu_name()} ({torch.get_num_threads()} threads, torch "
        f"{torch.__version__}). SmolLM2-135M-Instruct, layer 0, smollm2_quality.py's row `{RECIPE_ROW}` at a 50% "
        f"cache ({shape[0]} x {shape[1]} calibration tokens, {steps} steps of {opts.refine_batch} sequences) with "
        f"steps in {auto_precision()} (what `--refine-precision auto` picks here); medians of {args.repeats} timings.",
        "",
        "| one step | ms | share |",
        "|---|---|---|",
        *(f"| {part} | {1e3 * step * shares[part]:.1f} | {100 * shares[part]:.0f}% |" for part in PARTS),
        f"| **step** (timed without the profiler) | **{1e3 * step:.1f}** | 100% |",
        "",
        "| each layer's fixed passes over the calibration set | s |",
        "|---|---|",
        f"| closed form (statistics, factorisation) | {closed:.1f} |",
        f"| refinement's passes (targets, student before and after, MLP for both streams) | {passes:.1f} |",
        "",
        "| whole conversion, estimated | s | min |",
        "|---|---|---|",
        f"| {layers} layers x (fixed + {steps} steps) | {estimate:.0f} | {estimate / 60:.1f} |",
        f"| floor: steps reduced to their matrix multiplies and attention kernels | {floor:.0f} | {floor / 60:.1f} |",
        "",
        f"The shares are of torch.profiler's self CPU time over {args.steps} profiled steps (a 1-step refinement's "
        "subtracted), applied to the unprofiled step. The estimate leaves out tokenising, the embeddings and writing the checkpoint "
        "(seconds), and later layers' steps cost what layer 0's do (the same shapes).",
    ]
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
