"""Refinement settings screened on a converted prefix of SmolLM2: what the whole model scores.

The layer screen (``refine_settings.py``) judges a setting by one layer's attention-output error on
held-out text, fed the source model's hidden states. Twice a setting that fit layers about 10%
better there scored clearly worse on the whole conversion (steps of 2 sequences,
``results/smollm2_quality_c4_batch2.md``; the latent factors at twice the rate with Adam's beta2 at
0.99, ``results/smollm2_quality_c4_latent_lr.md``). The recipe fits each layer to the source
model's stream fed the converted one (``--refine-target model``), so each layer also answers for
what the layers before it left; a one-layer screen fed the source's states sees none of that.

This screen runs the converter itself, with the grouped recipe's options and each setting, on the
first ``--prefix`` layers only (the rest kept as the source's, ``--keep-layers``), and scores the
model's perplexity on text the calibration never saw: WikiText-2 validation (the tables score
WikiText-2 test) in windows of 1024 tokens, as a multiple of the source's on the same windows.
A prefix of 12 layers costs about 40% of a full conversion.

    python benchmarks/prefix_screen.py        # the recipe and the two settings the whole model rejected
    python benchmarks/prefix_screen.py --resume --settings 1500x4@2e-3    # one more setting beside the stored rows
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from converters.convert import ConvertOptions, convert
from converters.importers.smollm2 import smollm2_hf
from converters.options import DEFAULT_CALIBRATION_TEXTS
from latentkv.text import load_eval_windows
from refine_settings import GROUPED, SETTING_FORMAT, Setting, setting
from smollm2_quality import score

RESULTS = Path(__file__).resolve().parent / "results"
WIKI_VALID = DEFAULT_CALIBRATION_TEXTS[1]
# the recipe, then the two settings its whole-model rows rejected (1.215x and 1.217x against 1.199x at seed 0)
SETTINGS = [Setting(1500, 4, 3e-3), Setting(3000, 2, 3e-3), Setting(1500, 4, 3e-3, latent=2.0, beta2=0.99)]


def options(s: Setting, prefix: int, layers: int, seed: int) -> ConvertOptions:
    """The grouped recipe (model target, q/o free, bfloat16 steps, 512 C4 sequences) with setting ``s``,
    converting layers [0, prefix) only."""
    return ConvertOptions(**{**GROUPED, "refine_steps": s.steps, "refine_batch": s.batch, "refine_lr": s.lr,
                             "refine_latent_lr_ratio": s.latent, "refine_adam_beta2": s.beta2,
                             "calibration_seed": seed, "keep_layers": list(range(prefix, layers))})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", type=setting, nargs="+", default=SETTINGS,
                    help=f"{SETTING_FORMAT}; the first is the one the others are compared with")
    ap.add_argument("--prefix", type=int, default=12, help="layers converted (from the first)")
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 validation windows of 1024 tokens")
    ap.add_argument("--calibration-seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "prefix_screen_smollm2.md")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of --out (its .json) and add the settings it lacks: a screen that grows")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # the converter's progress
    t_run = time.perf_counter()
    src = smollm2_hf()
    windows = load_eval_windows(WIKI_VALID, AutoTokenizer.from_pretrained(src), 1024, mode="raw",
                                max_windows=args.windows)
    source_ppl, _, tokens = score(src, windows)
    logging.info("source: perplexity %.3f on %d WikiText-2 validation tokens", source_ppl, tokens)
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    rows = stored_rows(args, source_ppl) if args.resume else []
    todo = [s for s in args.settings if s._asdict() not in [r["setting"] for r in rows]]
    with tempfile.TemporaryDirectory() as tmp:
        for n, s in enumerate(todo, 1):
            t0 = time.perf_counter()
            convert(src, Path(tmp) / "prefix", options(s, args.prefix, layers, args.calibration_seed),
                    overwrite=True, progress=False)
            seconds = time.perf_counter() - t0
            ppl = score(Path(tmp) / "prefix", windows)[0]
            rows.append(dict(setting=s._asdict(), perplexity=ppl, ratio=ppl / source_ppl, seconds=seconds))
            logging.info("setting %d/%d %s: perplexity %.3f (%.4fx the source), converted in %.0f s",
                         n, len(todo), s, ppl, ppl / source_ppl, seconds)
            write(args, rows, source_ppl, tokens, time.perf_counter() - t_run)


def stored_rows(args: argparse.Namespace, source_ppl: float) -> list[dict]:
    """The rows of an earlier screen at ``--out`` (``--resume``). Conversions and scores are deterministic,
    so a stored row is the row this run would measure (its seconds are from its own sitting)."""
    path = args.out.with_suffix(".json")
    if not path.exists():
        return []
    stored = json.loads(path.read_text())
    same = dict(source=round(source_ppl, 6), prefix=args.prefix, windows=args.windows, seed=args.calibration_seed)
    if {key: stored.get(key) for key in same} != same:
        raise SystemExit(f"{path} screened {({key: stored.get(key) for key in same})}, this run asks for {same}: "
                         "drop --resume or write to another --out")
    return stored["rows"]


def write(args: argparse.Namespace, rows: list[dict], source_ppl: float, tokens: int, seconds: float) -> None:
    command = " ".join(["benchmarks/prefix_screen.py", *sys.argv[1:]])
    lines = [
        "# Refinement settings on a converted prefix of SmolLM2-135M-Instruct",
        "",
        f"Written by `{command}` in {seconds:.0f} s (2 CPU cores). The grouped recipe (one latent per KV head, 50% cache, "
        f"model target, q/o free, bfloat16 steps, {GROUPED['calibration_samples']} C4 sequences of 256 tokens, "
        f"calibration seed {args.calibration_seed}) on layers 0-{args.prefix - 1}, the others kept as the source's; "
        f"perplexity on {tokens} tokens of WikiText-2 validation ({args.windows} windows of 1024), source "
        f"{source_ppl:.3f}. `/ first`: the ratio over the first setting's.",
        "",
        "| steps x sequences | lr | latent lr x | Adam beta2 | perplexity | x source | / first | convert s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["setting"]
        lines.append(f"| {s['steps']} x {s['batch']} | {s['lr']:g} | {s['latent']:g} | {s['beta2']:g} | "
                     f"{r['perplexity']:.3f} | {r['ratio']:.4f} | {r['ratio'] / rows[0]['ratio']:.4f} | {r['seconds']:.0f} |")
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(dict(
        command=command, source=round(source_ppl, 6), tokens=tokens, prefix=args.prefix, windows=args.windows,
        seed=args.calibration_seed, rows=rows), indent=1) + "\n")
    print(args.out.read_text(), flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
