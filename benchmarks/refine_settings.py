"""Refinement settings screened layer by layer on SmolLM2: the attention output error they reach.

A full conversion and its perplexity take about 30 minutes per setting on 2 CPU cores; one layer's
refinement takes under a minute. This script refines a few layers of SmolLM2-135M-Instruct, each
from the same closed form, with every setting side by side, and reports the relative error of
the layer's attention output (``converters.math.refine``, E) on the calibration sequences and on
held-out C4 sequences the fit never saw. Each layer is fed the source model's own hidden states
(the symmetric target, ``--refine-target layer``), so settings are compared on the same inputs.
A lower held-out E at the same seconds is a lead for a full conversion, not a perplexity.

Layout and calibration are the grouped recipe's (one latent per KV head, 50% cache, 512 C4
sequences of 256 tokens, q/o free, bfloat16 steps); settings vary steps, sequences per step and
the learning rate.

    python benchmarks/refine_settings.py        # -> results/refine_settings_smollm2.md (~10 min on 2 cores)
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from converters import calibration as calib
from converters.allocation import latent_widths
from converters.convert import ConvertOptions, _convert_attention, calibration_tokens, complete_biases, has_bias
from converters.importers.hf import SourceModel
from converters.importers.smollm2 import smollm2_hf
from converters.options import C4_ONLY_CALIBRATION

RESULTS = Path(__file__).resolve().parent / "results"
GROUPED = dict(rope_mode="full", latent_groups=3, method="activation", preconditioner="root_covariance",
               refine_params="attention", refine_precision="bfloat16", kv_ratio=0.5, calibration_samples=512,
               **C4_ONLY_CALIBRATION)
HELD_OUT = dict(calibration_samples=64, calibration_seed=99)  # other C4 draws (a few may repeat a calibration one)
# (steps, sequences per step, Adam learning rate): the grouped recipe's 1500 x 4, then the same
# refinement time spent on smaller steps
SETTINGS = [(1500, 4, 3e-3), (3000, 2, 3e-3), (3000, 2, 4.5e-3), (6000, 1, 3e-3)]


def refine(source, i, hidden, held, layer, tensors, bias: bool, steps: int, batch: int, lr: float) -> dict:
    """Layer i refined from the closed form ``tensors``; E before, after, and on the held-out inputs."""
    t0 = time.perf_counter()
    fitted, fit, _ = calib.refine_latent_layer(source, i, hidden, layer, dict(tensors), bias, steps=steps, lr=lr,
                                               batch=batch, params="attention", seed=i, precision="bfloat16")
    seconds = time.perf_counter() - t0
    _, check, _ = calib.refine_latent_layer(source, i, held, layer, fitted, bias, steps=0, lr=lr, batch=batch)  # E only
    return dict(before=fit.error_before, after=fit.error_after, held=check.error_before, seconds=seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 15])
    ap.add_argument("--out", type=Path, default=RESULTS / "refine_settings_smollm2.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t_run = time.perf_counter()
    source = SourceModel(smollm2_hf())
    opts = ConvertOptions(**GROUPED)
    hidden = calib.embed(source, calibration_tokens(source, opts))
    held = calib.embed(source, calibration_tokens(source, ConvertOptions(**{**GROUPED, **HELD_OUT})))
    widths = latent_widths(opts, source.dims, source.qk_norm)
    rows = []
    for i in range(max(args.layers) + 1):
        if i in args.layers:
            layer, tensors = _convert_attention(i, widths[i], opts, source, hidden)
            tensors = complete_biases(layer, tensors, opts, source)
            for n, (steps, batch, lr) in enumerate(SETTINGS, 1):
                rows.append(dict(layer=i, steps=steps, batch=batch, lr=lr,
                                 **refine(source, i, hidden, held, layer, tensors, has_bias(opts, source), steps, batch, lr)))
                r = rows[-1]
                logging.info("layer %d, setting %d/%d (%d x %d, lr %g): E %.4f -> %.4f, held-out %.4f, %.1f s",
                             i, n, len(SETTINGS), steps, batch, lr, r["before"], r["after"], r["held"], r["seconds"])
        module = calib.source_layer_module(source, i)  # the source's layer: the next layer's inputs
        hidden, held = calib.run_layer(module, hidden), calib.run_layer(module, held)
    write(args.out, rows, time.perf_counter() - t_run)


def write(out: Path, rows: list[dict], seconds: float) -> None:
    lines = [
        "# Refinement settings on SmolLM2-135M-Instruct, layer by layer",
        "",
        f"Written by `benchmarks/refine_settings.py` in {seconds:.0f} s (2 CPU cores). One latent per KV head, 50% cache, "
        "q/o free, bfloat16 steps; calibration 512 C4 sequences of 256 tokens (seed 0), held out 64 other draws "
        "(seed 99); each layer fed the source model's hidden states and refined from the same closed form. "
        "E = relative error of the layer's attention output (closed form: `E before`).",
        "",
        "| layer | steps x sequences | lr | E before | E after (calibration) | E held out | held out / first setting | refinement s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        first = next(f for f in rows if f["layer"] == r["layer"])
        lines.append(f"| {r['layer']} | {r['steps']} x {r['batch']} | {r['lr']:g} | {r['before']:.4f} | {r['after']:.4f} | "
                     f"{r['held']:.4f} | {r['held'] / first['held']:.3f} | {r['seconds']:.1f} |")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
