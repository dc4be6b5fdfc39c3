"""Seconds per refinement step in float32 and in bfloat16 steps, side by side, on this machine's CPU.

``--refine-precision auto`` picks bfloat16 steps on CPUs with AMX and float32 on others. Whether
bfloat16 is faster depends on the CPU: on one 2-core machine an 8B-shaped layer's steps ran 2.4x
faster in bfloat16 (``results/convert_8b_layer_time.md``), on a 2-core AVX512-BF16 machine without
AMX 1.6-1.8x slower (``results/refine_precision_time_avx512-bf16.md``), though that CPU computes
bfloat16 natively too. This script measures it for the layers users convert:

* SmolLM2-135M-Instruct, one latent per KV head (the grouped recipe: q/o free, model target);
* SmolLM2-135M-Instruct, one joint latent (``ConvertOptions``' default recipe);
* a Llama-3.1-8B-shaped layer (random bf16 weights), the default recipe.

Each layer is refined from its closed form at a 50% cache, ``--steps`` Adam steps of 4 sequences of
256 tokens, the two precisions alternating ``--repeats`` times (which goes first alternates too), so
both see the same machine state. A step's seconds = (fit seconds - twice those of a 0-step fit,
which only measures E on the 8 calibration sequences) / steps; the table gives medians.

    python benchmarks/refine_precision_time.py    # -> results/refine_precision_time_<cpu kind>.md (~12 min on 2 cores)

The file is named by the CPU's kind (``amx``, ``avx512-bf16``: AVX512-BF16 without AMX, ``no-bf16``),
so each kind of machine keeps its own.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from convert_8b_layer_time import LLAMA_8B
from convert_llama1b_shapes import write_random_checkpoint
from converters import calibration as calib
from converters.allocation import latent_widths
from converters.convert import ConvertOptions, _convert_attention, calibration_tokens, complete_biases, has_bias
from converters.importers.hf import SourceModel
from converters.importers.smollm2 import smollm2_hf
from converters.math.refine import cpu_has, mixed_precision
from converters.options import C4_ONLY_CALIBRATION
from smollm2_quality import GROUPED_BF16

RESULTS = Path(__file__).resolve().parent / "results"
PRECISIONS = ("float32", "bfloat16")
SEQUENCES = 8  # calibration sequences: a step draws 4 of them; the step's cost does not depend on how many
LAYERS = {  # label -> (options at a 50% cache, True for SmolLM2's real weights / False for the 8B shape)
    "SmolLM2-135M, one latent per KV head (grouped recipe)": ({**GROUPED_BF16, **C4_ONLY_CALIBRATION, "refine_steps": 1500}, True),
    "SmolLM2-135M, one joint latent (default recipe)": ({}, True),
    "Llama-3.1-8B-shaped, one joint latent (default recipe)": ({}, False),
}


def cpu_kind() -> str:
    """amx / avx512-bf16 / no-bf16, from torch's CPU probes (the first is what auto reads)."""
    if cpu_has("_is_amx_tile_supported"):
        return "amx"
    return "avx512-bf16" if cpu_has("_is_avx512_bf16_supported") else "no-bf16"


def auto_precision() -> str:
    """The steps' precision ``--refine-precision auto`` picks on this CPU: float32 or bfloat16."""
    return str(mixed_precision("auto", "cpu") or torch.float32).removeprefix("torch.")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else ():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def layer_and_inputs(source: SourceModel, opts: ConvertOptions, ids: torch.Tensor | None):
    """Layer 0's closed form and its calibration inputs (the embeddings; a step's cost does not depend
    on their values)."""
    ids = calibration_tokens(source, opts) if ids is None else ids
    hidden = calib.embed(source, ids)
    layer, tensors = _convert_attention(0, latent_widths(opts, source.dims, source.qk_norm)[0], opts, source, hidden)
    return hidden, layer, complete_biases(layer, tensors, opts, source)


def refine_layer0(source, opts, hidden, layer, tensors, steps: int, precision: str, reference=None):
    """Layer 0 refined from its closed form with ``opts``' settings, ``steps`` steps in ``precision``
    (the model target when ``reference`` is given): the fit's report."""
    _, report, _ = calib.refine_latent_layer(
        source, 0, hidden, layer, dict(tensors), has_bias(opts, source), steps=steps, lr=opts.refine_lr,
        batch=opts.refine_batch, params=opts.refine_params, precision=precision, reference=reference,
        residual_weight=opts.refine_residual_weight)
    return report


def fit_seconds(source, opts, hidden, layer, tensors, steps: int, precision: str) -> tuple[float, float]:
    """Seconds of a ``steps``-step fit of layer 0 in ``precision`` steps, and the E it reaches."""
    report = refine_layer0(source, opts, hidden, layer, tensors, steps, precision)
    return report.seconds, report.error_after


def time_layer(source: SourceModel, opts: ConvertOptions, steps: int, repeats: int, ids=None) -> dict:
    hidden, layer, tensors = layer_and_inputs(source, opts, ids)
    checks = {p: fit_seconds(source, opts, hidden, layer, tensors, 0, p)[0] for p in PRECISIONS}  # E on all inputs
    per_step = {p: [] for p in PRECISIONS}
    for r in range(repeats):
        for p in PRECISIONS[:: 1 if r % 2 == 0 else -1]:
            seconds, error = fit_seconds(source, opts, hidden, layer, tensors, steps, p)
            per_step[p].append((seconds - 2 * checks[p]) / steps)
            logging.info("repeat %d/%d, %s steps: %.3f s per step (E %.4f)", r + 1, repeats, p, per_step[p][-1], error)
    return dict(median={p: statistics.median(s) for p, s in per_step.items()}, all=per_step,
                batch=opts.refine_batch, recipe_steps=opts.refine_steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="Adam steps per timed fit")
    ap.add_argument("--repeats", type=int, default=3, help="timed fits per precision and layer")
    ap.add_argument("--out", type=Path, help="default: results/refine_precision_time_<cpu kind>.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t_run, rows = time.perf_counter(), {}
    for label, (options, smollm2) in LAYERS.items():
        logging.info("%s: %d steps x %d repeats per precision", label, args.steps, args.repeats)
        opts = ConvertOptions(**{**options, "kv_ratio": 0.5, "calibration_samples": SEQUENCES})
        if smollm2:
            rows[label] = time_layer(SourceModel(smollm2_hf()), opts, args.steps, args.repeats)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            write_random_checkpoint(Path(tmp) / "src", shard_layers=1, config={**LLAMA_8B, "num_hidden_layers": 1})
            ids = torch.randint(0, LLAMA_8B["vocab_size"], (SEQUENCES, 256), generator=torch.Generator().manual_seed(0))
            rows[label] = time_layer(SourceModel(Path(tmp) / "src"), opts, args.steps, args.repeats, ids)
    out = args.out or RESULTS / f"refine_precision_time_{cpu_kind()}.md"
    write(out, rows, args, time.perf_counter() - t_run)


def write(out: Path, rows: dict, args, seconds: float) -> None:
    command = " ".join(["benchmarks/refine_precision_time.py", *sys.argv[1:]])
    lines = [
        f"# Refinement step time, float32 against bfloat16 steps ({cpu_kind()} CPU)",
        "",
        f"Written by `{command}` in {seconds:.0f} s on {cpu_name()} ({torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; CPU kind: {cpu_kind()}, which `--refine-precision auto` reads). Layer 0 of each "
        f"model refined from its closed form at a 50% cache, {args.steps} Adam steps per fit, the precisions "
        f"alternating, {args.repeats} fits each; medians (every fit's value in brackets).",
        "",
        "| layer | sequences per step | float32 s/step | bfloat16 s/step | bfloat16 speed-up | "
        "recipe steps/layer: float32 s | bfloat16 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        f32, bf16 = r["median"]["float32"], r["median"]["bfloat16"]
        each = {p: ", ".join(f"{s:.3f}" for s in r["all"][p]) for p in PRECISIONS}
        lines.append(f"| {label} | {r['batch']} | {f32:.3f} [{each['float32']}] | {bf16:.3f} [{each['bfloat16']}] | "
                     f"{f32 / bf16:.2f}x | {r['recipe_steps']}: {r['recipe_steps'] * f32:.0f} | "
                     f"{r['recipe_steps'] * bf16:.0f} |")
    lines += ["", f"A speed-up under 1 means bfloat16 steps are the slower ones on this CPU; `--refine-precision auto` "
              f"picks {auto_precision()} steps here. The recipe columns are the refinement's step time per layer at "
              "the recipe's steps (the grouped recipe: 1500; the default: 300), without its E checks."]
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
