"""Refinement settings screened layer by layer on SmolLM2: the attention output error they reach.

A full conversion and its perplexity take about 30 minutes per setting on 2 CPU cores; one layer's
refinement takes about a minute. This script refines a few layers of SmolLM2-135M-Instruct, each
from the same closed form, with every setting side by side, and reports the relative error of
the layer's attention output (``converters.math.refine``, E) on the calibration sequences and on
two held-out texts the fit never saw: other C4 documents, and WikiText-2 validation (the
perplexity tables score WikiText-2 test). Each layer is fed the source model's own hidden states
(the symmetric target, ``--refine-target layer``), so settings are compared on the same inputs.

A lower held-out E is a lead, not a perplexity: 3000 steps of 2 sequences reached a lower E than
1500 of 4 on both layers and both held-out texts here, yet the full conversion with them scored
worse (``results/smollm2_quality_c4_batch2.md``).

Layout and calibration are the grouped recipe's (one latent per KV head, 50% cache, 512 C4
sequences of 256 tokens, q/o free, bfloat16 steps); settings vary steps, sequences per step, the
learning rate, the latent factors' rate as a multiple of it (``--refine-latent-lr-ratio``) and
Adam's beta2 (``--refine-adam-beta2``).

    python benchmarks/refine_settings.py        # -> results/refine_settings_smollm2.md (~9 min on 2 cores)
    python benchmarks/refine_settings.py --settings 1500x4@3e-3 1000x4@3e-3 1000x4@6e-3 1000x4@1e-2 \
        --out benchmarks/results/refine_settings_lr_smollm2.md    # fewer steps at a higher rate
    python benchmarks/refine_settings.py --settings 1500x4@3e-3 1500x4@3e-3,latent=2,beta2=0.99 \
        --out optimizer_screen.md    # the optimizer's settings (their whole-model score: results/smollm2_quality_c4_latent_lr.md)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from converters import calibration as calib
from converters.allocation import latent_widths
from converters.convert import ConvertOptions, _convert_attention, calibration_tokens, complete_biases, has_bias
from converters.importers.hf import SourceModel
from converters.importers.smollm2 import smollm2_hf
from converters.options import C4_ONLY_CALIBRATION, DEFAULT_CALIBRATION_TEXTS
from smollm2_quality import GROUPED_BF16

RESULTS = Path(__file__).resolve().parent / "results"
# the grouped recipe of smollm2_quality.py at a 50% cache, calibrated on C4 alone; its steps, lr and
# target give way to SETTINGS and the symmetric target below
GROUPED = {**GROUPED_BF16, **C4_ONLY_CALIBRATION, "kv_ratio": 0.5}
HELD_OUT = 64  # sequences per held-out text, never fitted to


class Setting(NamedTuple):
    steps: int
    batch: int  # calibration sequences per step
    lr: float
    latent: float = 1.0  # --refine-latent-lr-ratio
    beta2: float = 0.999  # --refine-adam-beta2
    residual: float = 1.0  # --refine-residual-weight (prefix_screen.py only: this screen feeds the source's states)


# the grouped recipe's 1500 x 4, then about the same refinement time spent on smaller steps (--settings: others)
SETTINGS = [Setting(1500, 4, 3e-3), Setting(3000, 2, 3e-3), Setting(6000, 1, 3e-3)]
SETTING_FORMAT = ("STEPSxSEQUENCES@LR[,latent=RATIO][,beta2=BETA2][,residual=ALPHA], e.g. 1000x4@6e-3 or "
                  "1500x4@3e-3,latent=2,beta2=0.99")


def setting(text: str) -> Setting:
    """"1500x4@3e-3,latent=2,beta2=0.99" -> Setting(1500, 4, 0.003, latent=2.0, beta2=0.99)."""
    try:
        head, *extras = text.split(",")
        shape, lr = head.split("@")
        steps, batch = shape.split("x")
        optional = dict(item.split("=") for item in extras)
        if not set(optional) <= {"latent", "beta2", "residual"}:
            raise ValueError(optional)
        return Setting(int(steps), int(batch), float(lr), **{key: float(value) for key, value in optional.items()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write a setting as {SETTING_FORMAT}") from None


def held_out_texts(source: SourceModel, opts: ConvertOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The calibration hidden states, and held-out ones by text: C4 documents drawn with the
    calibration ones (so none is a calibration document) and WikiText-2 validation, the other text
    of the converter's default mix (the perplexity tables score WikiText-2 test)."""
    c4 = calibration_tokens(source, opts.model_copy(update={"calibration_samples": opts.calibration_samples + HELD_OUT}))
    wiki = calibration_tokens(source, opts.model_copy(update={"calibration_samples": HELD_OUT,
                                                              "calibration_text": [str(DEFAULT_CALIBRATION_TEXTS[1])]}))
    return calib.embed(source, c4[:-HELD_OUT]), {"C4": calib.embed(source, c4[-HELD_OUT:]),
                                                "WikiText-2 valid": calib.embed(source, wiki)}


def refine(source, i, hidden, held: dict, layer, tensors, opts: ConvertOptions, steps: int, batch: int, lr: float,
           latent_lr_ratio: float, beta2: float) -> dict:
    """Layer i refined from the closed form ``tensors``: E before and after on the calibration
    inputs, after on each held-out text, and the refinement's seconds."""
    t0, bias = time.perf_counter(), has_bias(opts, source)
    fitted, fit, _ = calib.refine_latent_layer(source, i, hidden, layer, dict(tensors), bias, steps=steps, lr=lr,
                                               batch=batch, params=opts.refine_params, seed=i,
                                               precision=opts.refine_precision, latent_lr_ratio=latent_lr_ratio,
                                               beta2=beta2)
    seconds = time.perf_counter() - t0
    checks = {text: calib.refine_latent_layer(source, i, h, layer, fitted, bias, steps=0, lr=lr, batch=batch)[1]
              for text, h in held.items()}  # steps=0: E only
    return dict(before=fit.error_before, after=fit.error_after, seconds=seconds,
                held={text: c.error_before for text, c in checks.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 15])
    ap.add_argument("--settings", type=setting, nargs="+", default=SETTINGS,
                    help=f"{SETTING_FORMAT}; the first is the one the others are compared with")
    ap.add_argument("--out", type=Path, default=RESULTS / "refine_settings_smollm2.md")
    args = ap.parse_args()
    if any(s.residual != 1 for s in args.settings):  # h_src - h = 0 here: alpha would change nothing
        ap.error("residual= weighs the converted stream's error, and this screen feeds each layer the source's "
                 "states: screen it with benchmarks/prefix_screen.py")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t_run = time.perf_counter()
    source = SourceModel(smollm2_hf())
    opts = ConvertOptions(**GROUPED)
    hidden, held = held_out_texts(source, opts)
    widths = latent_widths(opts, source.dims, source.qk_norm)
    rows = []
    for i in range(max(args.layers) + 1):
        if i in args.layers:
            layer, tensors = _convert_attention(i, widths[i], opts, source, hidden)
            tensors = complete_biases(layer, tensors, opts, source)
            for n, (steps, batch, lr, ratio, beta2, _) in enumerate(args.settings, 1):
                r = dict(layer=i, steps=steps, batch=batch, lr=lr, ratio=ratio, beta2=beta2,
                         **refine(source, i, hidden, held, layer, tensors, opts, steps, batch, lr, ratio, beta2))
                rows.append(r)
                logging.info("layer %d, setting %d/%d (%d x %d, lr %g, latent x%g, beta2 %g): E %.4f -> %.4f, held out %s, "
                             "%.1f s", i, n, len(args.settings), steps, batch, lr, ratio, beta2, r["before"], r["after"],
                             ", ".join(f"{t} {e:.4f}" for t, e in r["held"].items()), r["seconds"])
        module = calib.source_layer_module(source, i)  # the source's layer: the next layer's inputs
        hidden = calib.run_layer(module, hidden)
        held = {text: calib.run_layer(module, h) for text, h in held.items()}
    write(args.out, rows, time.perf_counter() - t_run)


def write(out: Path, rows: list[dict], seconds: float) -> None:
    command = " ".join(["benchmarks/refine_settings.py", *sys.argv[1:]])
    texts = list(rows[0]["held"])
    lines = [
        "# Refinement settings on SmolLM2-135M-Instruct, layer by layer",
        "",
        f"Written by `{command}` in {seconds:.0f} s (2 CPU cores). One latent per KV head, 50% cache, "
        f"q/o free, bfloat16 steps; calibration {GROUPED['calibration_samples']} C4 sequences of 256 tokens (seed 0); "
        f"held out {HELD_OUT} other C4 documents drawn with them and {HELD_OUT} WikiText-2 validation sequences; each "
        "layer fed the source model's hidden states and refined from the same closed form. E = relative error of the "
        "layer's attention output (closed form: `E before`); `/ first` = E held out over the first setting's.",
        "",
        "| layer | steps x sequences | lr | latent lr x | Adam beta2 | E before | E after (calibration) | "
        + " | ".join(f"E {t} | / first" for t in texts) + " | refinement s |",
        "|---|---|---|---|---|---|---|" + "---|---|" * len(texts) + "---|",
    ]
    for r in rows:
        first = next(f for f in rows if f["layer"] == r["layer"])
        held = " | ".join(f"{r['held'][t]:.4f} | {r['held'][t] / first['held'][t]:.3f}" for t in texts)
        lines.append(f"| {r['layer']} | {r['steps']} x {r['batch']} | {r['lr']:g} | {r['ratio']:g} | {r['beta2']:g} | "
                     f"{r['before']:.4f} | {r['after']:.4f} | "
                     f"{held} | {r['seconds']:.1f} |")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
