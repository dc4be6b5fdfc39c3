"""Refinement settings screened on a converted prefix of SmolLM2: what the whole model scores.

The layer screen (``refine_settings.py``) judges a setting by one layer's attention-output error on
held-out text, fed the source model's hidden states. Twice a setting that fit layers about 10%
better there scored clearly worse on the whole conversion (steps of 2 sequences,
``results/smollm2_quality_c4_batch2.md``; the latent factors at twice the rate with Adam's beta2 at
0.99, ``results/smollm2_quality_c4_latent_lr.md``). The recipe fits each layer to the source
model's stream fed the converted one (``--refine-target model``), so each layer also answers for
what the layers before it left; a one-layer screen fed the source's states sees none of that.

This screen runs the converter itself, with the grouped recipe's options and each setting, on the
first layers, and scores the model with its first d layers converted and the rest the source's, for
each depth d of ``--depths``, on text the calibration never saw: WikiText-2 validation (the tables
score WikiText-2 test) in windows of 1024 tokens, as a multiple of the source's on the same windows.
One conversion of the deepest prefix gives every depth: layer i's conversion reads only the layers
before it, so the deeper conversion's first d layers are exactly what converting d layers gives
(``hybrid``). ``--test`` also scores the deepest on WikiText-2 test, the tables' protocol.

    python benchmarks/prefix_screen.py        # the recipe and the two settings the whole model rejected
    python benchmarks/prefix_screen.py --resume --settings 1500x4@2e-3    # one more setting beside the stored rows
    python benchmarks/prefix_screen.py --depths 6 12 18 24 30 --test --out depths.md    # where a setting wins or loses
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

from converters.cli import WIKITEXT
from converters.convert import ConvertOptions, convert
from converters.importers.smollm2 import smollm2_hf
from converters.options import DEFAULT_CALIBRATION_TEXTS
from latentkv import checkpoint as ckpt
from latentkv import format as fmt
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
                             "refine_residual_weight": s.residual,
                             "calibration_seed": seed, "keep_layers": list(range(prefix, layers))})


def hybrid(converted: Path, source: Path, depth: int, out: Path) -> Path:
    """``converted`` with its layers from ``depth`` on the source's again: what converting only layers
    [0, depth) writes, since each layer's conversion reads only the layers before it."""
    config = json.loads((converted / "config.json").read_text())
    layers = config["latent_kv"]["layers"]
    layers[depth:] = [fmt.SourceLayer(softmax_scale=fmt.default_softmax_scale(config["head_dim"])).model_dump()
                      for _ in layers[depth:]]
    restored = lambda name: ".self_attn." in name and int(name.split(".")[2]) >= depth  # noqa: E731
    latent, original = ckpt.TensorReader(converted), ckpt.TensorReader(source)
    dtype = latent.get("model.embed_tokens.weight", dtype=None).dtype  # the converted checkpoint's
    out.mkdir(parents=True, exist_ok=True)
    writer = ckpt.ShardedWriter(out)
    for name in latent.names():
        if not restored(name):
            writer.add(name, latent.get(name, dtype=None))
    for name in filter(restored, original.names()):
        writer.add(name, original.get(name, dtype))
    writer.close()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    ckpt.copy_tokenizer_files(converted, out)
    ckpt.validate_checkpoint(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", type=setting, nargs="+", default=SETTINGS,
                    help=f"{SETTING_FORMAT}; the first is the one the others are compared with")
    ap.add_argument("--depths", type=int, nargs="+", default=[12], help="layers converted (from the first), each scored")
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 validation windows of 1024 tokens")
    ap.add_argument("--test", action="store_true", help="also score the deepest on 8 windows of WikiText-2 test")
    ap.add_argument("--calibration-seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "prefix_screen_smollm2.md")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of --out (its .json) and add the settings it lacks: a screen that grows")
    args = ap.parse_args()
    args.depths = sorted(set(args.depths))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # the converter's progress
    t_run = time.perf_counter()
    src = smollm2_hf()
    tokenizer = AutoTokenizer.from_pretrained(src)
    texts = {"valid": load_eval_windows(WIKI_VALID, tokenizer, 1024, mode="raw", max_windows=args.windows)}
    if args.test:
        texts["test"] = load_eval_windows(WIKITEXT, tokenizer, 1024, mode="raw", max_windows=8)
    sources = {text: score(src, windows)[0] for text, windows in texts.items()}
    logging.info("source: perplexity %s", sources)
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    rows = stored_rows(args, sources["valid"]) if args.resume else []
    todo = [s for s in args.settings if s._asdict() not in [r["setting"] for r in rows]]
    deepest = args.depths[-1]
    with tempfile.TemporaryDirectory() as tmp:
        for n, s in enumerate(todo, 1):
            t0 = time.perf_counter()
            converted = Path(tmp) / "converted"
            convert(src, converted, options(s, deepest, layers, args.calibration_seed), overwrite=True, progress=False)
            seconds = time.perf_counter() - t0
            ratios = {str(d): score(hybrid(converted, src, d, Path(tmp) / f"depth{d}") if d < deepest else converted,
                               texts["valid"])[0] / sources["valid"] for d in args.depths}
            test = score(converted, texts["test"])[0] / sources["test"] if args.test else None
            rows.append(dict(setting=s._asdict(), ratios=ratios, test=test, seconds=seconds))
            logging.info("setting %d/%d %s: x source by depth %s%s, converted in %.0f s", n, len(todo), s,
                         {d: round(r, 4) for d, r in ratios.items()}, f", test {test:.4f}" if test else "", seconds)
            write(args, rows, sources, time.perf_counter() - t_run)


def stored_rows(args: argparse.Namespace, source_ppl: float) -> list[dict]:
    """The rows of an earlier screen at ``--out`` (``--resume``). Conversions and scores are deterministic,
    so a stored row is the row this run would measure (its seconds are from its own sitting)."""
    path = args.out.with_suffix(".json")
    if not path.exists():
        return []
    stored = json.loads(path.read_text())
    same = dict(source=round(source_ppl, 6), depths=args.depths, windows=args.windows, test=args.test,
                seed=args.calibration_seed)
    if {key: stored.get(key) for key in same} != same:
        raise SystemExit(f"{path} screened {({key: stored.get(key) for key in same})}, this run asks for {same}: "
                         "drop --resume or write to another --out")
    return [{**r, "setting": Setting(**r["setting"])._asdict()} for r in stored["rows"]]  # fields added since: defaults


def write(args: argparse.Namespace, rows: list[dict], sources: dict[str, float], seconds: float) -> None:
    command = " ".join(["benchmarks/prefix_screen.py", *sys.argv[1:]])
    ratio = lambda r, d: r["ratios"][str(d)]  # noqa: E731  (keyed by strings, as JSON stores them)
    asked = [s._asdict() for s in args.settings]  # rows in --settings order (stored ones it omits last): its first leads
    rows = sorted(rows, key=lambda r: asked.index(r["setting"]) if r["setting"] in asked else len(asked))
    test = f" WikiText-2 test (8 windows, the tables' protocol), source {sources['test']:.3f}: the deepest." if args.test else ""
    lines = [
        "# Refinement settings on converted prefixes of SmolLM2-135M-Instruct",
        "",
        f"Written by `{command}` in {seconds:.0f} s (2 CPU cores). The grouped recipe (one latent per KV head, 50% cache, "
        f"model target, q/o free, bfloat16 steps, {GROUPED['calibration_samples']} C4 sequences of 256 tokens, "
        f"calibration seed {args.calibration_seed}); the first d layers converted, the others the source's. Perplexity "
        f"as a multiple of the source's on WikiText-2 validation ({args.windows} windows of 1024 tokens, source "
        f"{sources['valid']:.3f}); `/ first`: over the first setting's at the same depth.{test}",
        "",
        "| steps x sequences | lr | latent lr x | Adam beta2 | residual weight | "
        + " | ".join(f"d={d} | / first" for d in args.depths) + (" | test |" if args.test else " |") + " convert s |",
        "|---|---|---|---|---|" + "---|---|" * len(args.depths) + ("---|" if args.test else "") + "---|",
    ]
    for r in rows:
        s = r["setting"]
        cells = " | ".join(f"{ratio(r, d):.4f} | {ratio(r, d) / ratio(rows[0], d):.4f}" for d in args.depths)
        lines.append(f"| {s['steps']} x {s['batch']} | {s['lr']:g} | {s['latent']:g} | {s['beta2']:g} | {s['residual']:g} | {cells} | "
                     + (f"{r['test']:.4f} | " if args.test else "") + f"{r['seconds']:.0f} |")
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(dict(
        command=command, source=round(sources["valid"], 6), depths=args.depths, windows=args.windows, test=args.test,
        seed=args.calibration_seed, sources=sources, rows=rows), indent=1) + "\n")
    print(args.out.read_text(), flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
