"""Conversion time per layer of a Llama-3.1-8B-shaped layer, by stage, with every one-shot lever on.

The weights are random bf16 with Llama-3.1-8B's shapes (hidden 4096, 32 query / 8 KV heads of
128, SwiGLU 14336, vocabulary 128256; embeddings tied here, which changes no timing) and only
``--layers`` layers: what is measured is the converter's work per layer, which does not depend on
the values. Calibration is the converter's default size (32 x 256 tokens, random ids). Rows, each
one conversion of the same source at a 50% cache:

* closed form: calibration statistics and the root-covariance SVD (``--refine-steps 0``);
* + refinement: the default recipe (``ConvertOptions``' defaults: 300 Adam steps per layer on the
  latent factors and q/o projections, against the source model's stream), its steps in float32 and
  in bfloat16 mixed precision (``--refine-precision``; its default, auto, picks bfloat16 on CPUs
  with AMX and on GPUs with bfloat16; ``refine_precision_time.py`` compares the two on any CPU);
* + kl allocation: ``--rank-allocation kl`` (closed form), whose cost grows with the depth: each of
  a layer's candidate widths runs the rest of the model and the output head on 8 sequences.

    python benchmarks/convert_8b_layer_time.py          # -> results/convert_8b_layer_time.md (~20 min on 2 cores)

Per-layer seconds are (conversion time - the same conversion's fixed cost) / layers, the fixed cost
(import, embeddings, writing) measured with ``--keep-layers`` on every layer.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from convert_llama1b_shapes import write_random_checkpoint
from converters.allocation import kl_candidates
from converters.convert import ConvertOptions, convert

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
    rope_theta=500000.0, torch_dtype="bfloat16",
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
)
CLOSED_FORM = "closed form (statistics + root-covariance SVD)"
REFINED = {precision: f"+ refinement (the default recipe), {precision} steps" for precision in ("float32", "bfloat16")}
RUNS = {  # label -> options at a 50% cache (method: root covariance, full RoPE: the defaults)
    "fixed cost (every layer kept)": dict(keep_layers=None, refine_steps=0),
    CLOSED_FORM: dict(refine_steps=0),
    **{label: dict(refine_precision=precision) for precision, label in REFINED.items()},
    "closed form + kl allocation": dict(refine_steps=0, rank_allocation="kl"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--no-kl", action="store_true", help="leave out the kl allocation row (the slowest)")
    parser.add_argument("--out", type=Path, default=RESULTS / "convert_8b_layer_time.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = {**LLAMA_8B, "num_hidden_layers": args.layers}
    ids = torch.randint(0, config["vocab_size"], (32, 256), generator=torch.Generator().manual_seed(0))
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        write_random_checkpoint(src, shard_layers=1, config=config)
        for label, kw in RUNS.items():
            if args.no_kl and "rank_allocation" in kw:
                continue
            if kw.get("keep_layers", ()) is None:
                kw = {**kw, "keep_layers": list(range(args.layers))}
            t0 = time.perf_counter()
            convert(src, Path(tmp) / "out", ConvertOptions(kv_ratio=0.5, **kw), calibration_ids=ids, overwrite=True)
            seconds[label] = time.perf_counter() - t0
            logging.info("%s: %.1f s", label, seconds[label])
    fixed = seconds.pop("fixed cost (every layer kept)")
    per_layer = {label: (s - fixed) / args.layers for label, s in seconds.items()}
    rows = [f"| {label} | {seconds[label]:.0f} | {s:.1f} |" for label, s in per_layer.items()]
    whole = 2 * config["num_key_value_heads"] * config["head_dim"]  # source cache values per token and layer
    candidates = len(kl_candidates(whole // 2, whole, 1, whole))
    closed = per_layer[CLOSED_FORM]
    refined = {precision: per_layer[label] - closed for precision, label in REFINED.items()}  # the refinement alone
    steps = ConvertOptions().refine_steps
    by_precision = "; ".join(f"{precision} steps {s:.0f} s more ({s / steps:.2f} s per Adam step of {steps}, "
                             f"the default recipe on 32 layers about {32 * (closed + s) / 60:.0f} min)"
                             for precision, s in refined.items())
    text = "\n".join([
        "# Conversion time per Llama-3.1-8B-shaped layer (random bf16 weights)",
        "",
        f"Written by `benchmarks/convert_8b_layer_time.py --layers {args.layers}{' --no-kl' if args.no_kl else ''}` on this machine (2 CPU cores). "
        "Hidden 4096, 32 query / 8 KV heads of 128, SwiGLU 14336, vocabulary 128256; full RoPE, 50% cache, "
        f"calibration 32 x 256 tokens. Fixed cost of a conversion (every layer kept): {fixed:.0f} s.",
        "",
        "| conversion | wall s | s per layer |",
        "|---|---|---|",
        *rows,
        "",
        f"Per layer on 2 CPU cores: closed form {closed:.0f} s; the refinement in {by_precision}; bfloat16 steps are "
        f"{refined['float32'] / refined['bfloat16']:.1f}x faster. On a GPU (`--refine-device cuda`) the refinement is a "
        "few seconds per layer. "
        "On random weights the refinement finds little to improve (the log's attention output error): only its time "
        "means anything here.",
    ])
    if "closed form + kl allocation" in per_layer:
        text += (f"\nThe kl allocation measured {candidates} candidate widths per layer here at "
                 f"{per_layer['closed form + kl allocation'] - closed:.0f} s per layer of {args.layers}; each candidate runs "
                 "the layers after it and the output head, so on 32 layers its cost grows about 16-fold per layer "
                 "(quadratic in depth): a GPU job for an 8B model.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
