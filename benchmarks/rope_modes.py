"""Perplexity of a real model converted in each RoPE mode at several KV-cache ratios.

One table per subject for the converter-core and RoPE-modes issues: RoPE strategies / modes with
plain SVD (MHA2MLA) and, for comparison, the root-covariance activation-aware SVD, next to the
source model. One-shot conversion, no fine-tuning.

* ``stories260k``: the real stories260K (GQA 8q/4kv, head_dim 8). Calibration on
  tinystories_a.txt, evaluation on tinystories_sample.txt (other TinyStories text, each story from BOS).
* ``wiki-mha-6M``: ../shared/data/models/wiki-mha-6M (MHA 8 heads, head_dim 32, the realistic head
  size). Calibration on C4 documents, evaluation on held-out WikiText-2 test text (24 x 256 tokens).

    python benchmarks/rope_modes.py --subject stories260k    # -> results/rope_modes_stories260k.md
    python benchmarks/rope_modes.py --subject wiki-mha-6M    # -> results/rope_modes_wiki-mha-6M.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import latentkv.modeling  # noqa: F401
from converters.convert import ConvertOptions, convert
from converters.importers.llama2c import import_llama2c, packaged_stories260k
from converters.cli import DATA
from latentkv.evaluate import perplexity
from latentkv.text import load_calibration_samples, load_eval_windows

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ROOT_COV = dict(svd="joint", method="activation", preconditioner="root_covariance")
METHODS = [
    ("SVD_joint", dict(svd="joint", method="svd")),
    ("SVD_split", dict(svd="split", method="svd")),
    ("root-cov joint", ROOT_COV),
    ("root-cov joint, NoPE fit", dict(ROOT_COV, nope_scaling="fit")),  # partial / shared only
]


@dataclass(frozen=True)
class Subject:
    source: Callable[[Path], Path]  # tmp dir -> HF model dir
    calibration: Callable[[object], torch.Tensor]  # tokenizer -> [N, L] ids
    windows: Callable[[object], list[torch.Tensor]]  # tokenizer -> evaluation windows
    text_note: str
    settings: list[tuple[str, dict]]  # (label, RoPE options); equal cache sizes share a rope width
    ratios: tuple[float, ...]
    methods: list[tuple[str, dict]]


def _partial(pairs: int, strategy: str = "2norm") -> tuple[str, dict]:
    return (f"partial S_{strategy}, {pairs} pair{'s' if pairs > 1 else ''}/head", dict(rope_mode="partial", rope_strategy=strategy, rope_pairs=pairs))


def _shared(components: int) -> tuple[str, dict]:
    return (f"shared, {components} components", dict(rope_mode="shared", rope_pairs=components))


FULL = ("full", dict(rope_mode="full"))

SUBJECTS = {
    # 4 KV heads x 4 pairs: one kept pair per KV head = 8 of 64 values = shared with 4 components.
    "stories260k": Subject(
        source=lambda tmp: import_llama2c(*packaged_stories260k(), tmp / "src"),
        calibration=lambda tok: load_calibration_samples(DATA / "text" / "tinystories_a.txt", tok, 32, 256, seed=0),
        windows=lambda tok: load_eval_windows(DATA / "text" / "tinystories_sample.txt", tok, 512),
        text_note="Calibration: 32 x 256 tokens of `tinystories_a.txt`; evaluation: `tinystories_sample.txt` "
                  "(5 stories, each from BOS).\nWith one pair per head S_uniform = {0} = S_high (same rows).",
        settings=[_partial(1, "high"), _partial(1, "low"), _partial(1, "uniform"), _partial(1), _partial(2),
                  _shared(4), _shared(8), FULL],
        ratios=(0.75, 0.5, 0.375, 0.25),
        methods=METHODS,
    ),
    # 8 KV heads x 16 pairs: one kept pair per head = 16 of 512 values = shared with 8 components.
    "wiki-mha-6M": Subject(
        source=lambda tmp: SHARED / "models" / "wiki-mha-6M",
        calibration=lambda tok: load_calibration_samples(SHARED / "text" / "c4_sample.jsonl", tok, 32, 256, seed=0),
        windows=lambda tok: load_eval_windows(SHARED / "text" / "wiki.test.raw", tok, 256, mode="stream", max_windows=24),
        text_note="Calibration: 32 x 256 tokens of `c4_sample.jsonl`; evaluation: `wiki.test.raw` "
                  "(24 windows of 256 tokens, never trained on).",
        settings=[_partial(1), _partial(2), _partial(4), _shared(8), _shared(16), _shared(32), FULL],
        ratios=(0.5, 0.25, 0.125),
        methods=[METHODS[0], METHODS[2], METHODS[3]],
    ),
}


def evaluate(model_dir: Path, windows) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return perplexity(model, windows, batch_size=8, progress=False)


def run(subject: Subject, tmp: Path) -> tuple[float, list[str]]:
    """Source perplexity and one table row per (setting, method)."""
    src = subject.source(tmp)
    tokenizer = AutoTokenizer.from_pretrained(src)
    windows, calib = subject.windows(tokenizer), subject.calibration(tokenizer)
    source_ppl = evaluate(src, windows)
    rows = []
    cases = [(s, m) for s in subject.settings for m in subject.methods
             if not (s[1]["rope_mode"] == "full" and m[1].get("nope_scaling") == "fit")]  # full: nothing NoPE'd
    for (label, setting), (method, mopts) in tqdm(cases, desc="settings x methods", unit="row"):
        cells = []
        for ratio in subject.ratios:
            opts = ConvertOptions(kv_ratio=ratio, refine_steps=0, **setting, **mopts)  # the closed forms
            try:
                convert(src, tmp / "out", opts, overwrite=True, progress=False, calibration_ids=calib)
                cells.append(f"{evaluate(tmp / 'out', windows):.2f}")
            except ValueError as e:  # e.g. the rope keys alone exceed the ratio
                cells.append("n/a" if "no room" in str(e) else f"error: {e}")
        rows.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
        tqdm.write(rows[-1])
    return source_ppl, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subject", choices=sorted(SUBJECTS), default="stories260k")
    parser.add_argument("--out", type=Path, help="default: results/rope_modes_<subject>.md")
    args = parser.parse_args()
    subject = SUBJECTS[args.subject]
    out = args.out or RESULTS / f"rope_modes_{args.subject}.md"
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny models: threads only add contention on a shared 2-core machine
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        source_ppl, rows = run(subject, Path(tmp))
    header = [
        f"# {args.subject}: perplexity by RoPE mode, SVD variant and KV-cache ratio",
        "",
        f"Written by `benchmarks/rope_modes.py --subject {args.subject}` ({time.perf_counter() - t0:.0f} s). "
        "One-shot conversion, no fine-tuning.",
        subject.text_note,
        f"Source model perplexity: **{source_ppl:.3f}**. KV ratio = cached values per token / the source's;",
        "`n/a`: the kept rope keys alone exceed that ratio. Rows with the same rope width (k pairs per head x "
        "heads = 2 x shared components) cost the same cache.",
        "`NoPE fit`: `--nope-scaling fit`, each pair's NoPE'd key part scaled by a factor fitted to the source "
        "layer's attention output (`converters/math/nope_scaling.py`); full RoPE NoPEs nothing.",
        "",
        "| RoPE | decomposition | " + " | ".join(f"KV {r:.1%}" for r in subject.ratios) + " |",
        "|---|---|" + "---|" * len(subject.ratios),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header + rows) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
