"""What the INT4 latent cache costs in perplexity, and what a Hadamard-rotated latent buys back.

Through the real vLLM engine (CPU reference platform): the real stories260K converted in full RoPE
mode at half the cache, with and without `--hadamard` (a block Hadamard folded into the weights:
the same model in fp32), served with an fp32 cache and with the INT4 latent cache at two group
sizes. Perplexity is teacher-forced through the engine (prompt logprobs: every score reads the
cache) on the five stories of tinystories_sample.txt, each from BOS.

    python benchmarks/int4_cache_quality.py   # writes benchmarks/results/int4_cache_quality.md
"""

from __future__ import annotations

import gc
import math
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = (8, 16)
METHODS = {
    "plain SVD": dict(method="svd"),
    "centred root-covariance": dict(method="activation", preconditioner="root_covariance", centred=True),
}


def story_ids(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from converters.cli import DATA
    from latentkv.text import load_eval_windows

    windows = load_eval_windows(DATA / "text" / "tinystories_sample.txt", AutoTokenizer.from_pretrained(model_dir), 512)
    return [w.tolist() for w in windows]


def engine_perplexity(model_dir: Path, stories: list[list[int]], overrides: dict | None) -> float:
    """exp(mean NLL) of every story token after the first, through a fresh in-process engine."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=512, kv_cache_memory_bytes=64 << 20, seed=0,
              distributed_executor_backend="uni", hf_overrides=overrides or {})
    try:
        outs = llm.generate([{"prompt_token_ids": s} for s in stories], SamplingParams(max_tokens=1, prompt_logprobs=0),
                            use_tqdm=False)
        nll = [-d[t].logprob for out, s in zip(outs, stories) for d, t in zip(out.prompt_logprobs[1:], s[1:])]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return math.exp(sum(nll) / len(nll))


def main() -> None:
    os.environ.setdefault("LATENTKV_CPU_PLATFORM", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from converters.convert import ConvertOptions, convert
    from converters.importers.llama2c import import_llama2c, packaged_stories260k
    from converters.cli import DATA

    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = import_llama2c(*packaged_stories260k(), tmp / "src")
        stories = story_ids(src)
        source_ppl = engine_perplexity(src, stories, None)
        for label, method in METHODS.items():
            cells = {}
            for hadamard in (False, True):
                out = tmp / f"latent-{hadamard}"
                opts = ConvertOptions(rope_mode="full", kv_ratio=0.5, hadamard=hadamard, refine_steps=0,
                                      calibration_text=str(DATA / "text" / "tinystories_a.txt"), **method)
                convert(src, out, opts, overwrite=True, progress=False)
                if not hadamard:  # the rotation does not change the fp32 model
                    cells["fp32"] = engine_perplexity(out, stories, None)
                for g in GROUPS:
                    overrides = {"latent_kv_cache_dtype": "int4", "latent_kv_int4_group_size": g}
                    cells[(hadamard, g)] = engine_perplexity(out, stories, overrides)
            row = [f"{cells['fp32']:.3f}"]
            for g in GROUPS:
                plain, rotated = cells[(False, g)], cells[(True, g)]
                row += [f"{plain:.3f} (+{plain / cells['fp32'] - 1:.1%})", f"{rotated:.3f} (+{rotated / cells['fp32'] - 1:.1%})"]
            rows.append(f"| {label} | " + " | ".join(row) + " |")
            print(rows[-1], flush=True)
    head = ["| conversion | fp32 cache | " + " | ".join(f"INT4 g{g} | INT4 g{g} + Hadamard" for g in GROUPS) + " |",
            "|---|---|" + "---|---|" * len(GROUPS)]
    text = [
        "# INT4 latent cache: perplexity cost and the Hadamard rotation",
        "",
        f"Written by `benchmarks/int4_cache_quality.py` ({time.perf_counter() - t0:.0f} s). Real vLLM 0.32 engine on the",
        "CPU reference platform; stories260K converted in full RoPE mode at a 50% cache (32-value latent per layer);",
        "perplexity teacher-forced through the engine on the 5 stories of `tinystories_sample.txt` (each from BOS).",
        f"Source model through the same engine: **{source_ppl:.3f}**. In parentheses: the INT4 cost over the same",
        "checkpoint's fp32 cache. The INT4 cache holds 4-bit latents with one fp16 scale per group (rope keys stay fp16).",
        "",
        *head,
        *rows,
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "int4_cache_quality.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
