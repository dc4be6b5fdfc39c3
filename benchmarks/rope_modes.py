"""Perplexity of the real stories260K model converted at several KV-cache ratios.

One table for the converter-core and RoPE-modes issues: every RoPE strategy / mode with both SVD
variants (plain SVD, MHA2MLA) and, for comparison, the root-covariance activation-aware SVD, next
to the source model. Calibration on converters/data/text/tinystories_a.txt, evaluation on
converters/data/text/tinystories_sample.txt (different TinyStories text, each story from BOS).

    python benchmarks/rope_modes_stories260k.py      # writes benchmarks/results/rope_modes_stories260k.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import latentkv.modeling  # noqa: F401
from converters.convert import ConvertOptions, convert
from converters.importers.llama2c import import_llama2c, packaged_stories260k
from latentkv.cli import DATA
from latentkv.evaluate import perplexity
from latentkv.text import load_calibration_samples, load_eval_windows

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = (0.75, 0.5, 0.375, 0.25)
# (label, options); stories260K has 4 KV heads x 4 pairs: one kept pair per KV head = 8 of 64 values.
SETTINGS = [
    ("partial S_high, 1 pair/head", dict(rope_mode="partial", rope_strategy="high", rope_pairs=1)),
    ("partial S_low, 1 pair/head", dict(rope_mode="partial", rope_strategy="low", rope_pairs=1)),
    ("partial S_uniform, 1 pair/head", dict(rope_mode="partial", rope_strategy="uniform", rope_pairs=1)),
    ("partial S_2-norm, 1 pair/head", dict(rope_mode="partial", rope_strategy="2norm", rope_pairs=1)),
    ("partial S_2-norm, 2 pairs/head", dict(rope_mode="partial", rope_strategy="2norm", rope_pairs=2)),
    ("shared, 4 components", dict(rope_mode="shared", rope_pairs=4)),
    ("shared, 8 components", dict(rope_mode="shared", rope_pairs=8)),
    ("full", dict(rope_mode="full")),
]
METHODS = [
    ("SVD_joint", dict(svd="joint", method="svd")),
    ("SVD_split", dict(svd="split", method="svd")),
    ("root-cov joint", dict(svd="joint", method="activation", preconditioner="root_covariance")),
]


def evaluate(model_dir: Path, windows) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return perplexity(model, windows, batch_size=8, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "rope_modes_stories260k.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a tiny model: threads only add contention on a shared 2-core machine
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = import_llama2c(*packaged_stories260k(), tmp / "src")
        tokenizer = AutoTokenizer.from_pretrained(src)
        windows = load_eval_windows(DATA / "text" / "tinystories_sample.txt", tokenizer, 512)
        calib = load_calibration_samples(DATA / "text" / "tinystories_a.txt", tokenizer, 32, 256, seed=0)
        source_ppl = evaluate(src, windows)
        rows, t0 = [], time.perf_counter()
        for label, setting in SETTINGS:
            for method, mopts in METHODS:
                cells = []
                for ratio in RATIOS:
                    opts = ConvertOptions(kv_ratio=ratio, **setting, **mopts)
                    try:
                        convert(src, tmp / "out", opts, overwrite=True, progress=False, calibration_ids=calib)
                        cells.append(f"{evaluate(tmp / 'out', windows):.2f}")
                    except ValueError as e:  # e.g. the rope keys alone exceed the ratio
                        cells.append("n/a" if "no room" in str(e) else f"error: {e}")
                rows.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
        seconds = time.perf_counter() - t0
    header = [
        "# stories260K: perplexity by RoPE mode, SVD variant and KV-cache ratio",
        "",
        f"Written by `benchmarks/rope_modes_stories260k.py` ({seconds:.0f} s). One-shot conversion, no fine-tuning.",
        "Calibration: 32 x 256 tokens of `tinystories_a.txt`; evaluation: `tinystories_sample.txt` (5 stories, each from BOS).",
        f"Source model perplexity: **{source_ppl:.3f}**. KV ratio = cached values per token / source's (64 per layer);",
        "`n/a`: the kept rope keys alone exceed that ratio. With one pair per head S_uniform = {0} = S_high (same rows).",
        "",
        "| RoPE | decomposition | " + " | ".join(f"KV {r:.1%}" for r in RATIOS) + " |",
        "|---|---|" + "---|" * len(RATIOS),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header + rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
