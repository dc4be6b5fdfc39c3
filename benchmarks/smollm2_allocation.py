"""Rank allocation and calibration text, judged on other text: SmolLM2, 50% cache.

``--rank-allocation kl`` picks each layer's latent width to minimise the model's output KL to the
source, measured on calibration sequences; ``care`` is CARE's water-filling on the layers'
activation-error curves. This benchmark scores them beside uniform widths on three texts: C4
windows that share no token with any row's calibration sequences, WikiText-2 test and PTB test;
for each, the perplexity as a ratio to the source's and the mean next-token KL to the source.

Rows (full RoPE, root covariance, 50% cache), calibrated on the shipped C4 sample unless named:
* uniform / kl / care, closed form (``--refine-steps 0``): the widths come from the allocation;
* uniform / kl / care, refined (100 steps on the latent factors, the source layer's output: the default then): the kl and care rows reuse the closed-form
  rows' widths through ``--ranks`` and ``--keep-layers``, which is what the allocation with
  refinement converts (it allocates on the closed form) without paying the kl pass twice;
* uniform, closed form and refined, calibrated on WikiText-2 validation text instead, and on the
  converter's default, half C4 and half WikiText-2 validation: how much does the calibration text
  itself move the recipe?

    python benchmarks/smollm2_allocation.py      # -> results/smollm2_allocation.{md,json} (~40 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import latentkv.modeling  # noqa: F401  (registers the latentkv model type)
from converters.cli import WIKITEXT
from converters.convert import ConvertOptions, convert
from converters.options import C4_ONLY_CALIBRATION as C4_ONLY, DEFAULT_CALIBRATION_TEXTS, LAYER_TARGET_REFINEMENT
from converters.importers.smollm2 import smollm2_hf
from latentkv.text import calibration_shares, calibration_starts, load_eval_windows, read_documents, tokenize_documents
from smollm2_quality import PTB  # the sibling script (benchmarks/ is on the path when run)

RESULTS = Path(__file__).resolve().parent / "results"
C4, WIKI_VALID = DEFAULT_CALIBRATION_TEXTS  # shipped with latentkv
CLOSED = dict(rope_mode="full", method="activation", preconditioner="root_covariance", refine_steps=0)
REFINED = {**CLOSED, **LAYER_TARGET_REFINEMENT}  # the default refinement when the table was written
SEQ = 1024


def c4_heldout_windows(tokenizer, n: int, opts: ConvertOptions) -> list[torch.Tensor]:
    """The first ``n`` windows of the C4 sample's token stream that overlap no calibration sequence
    of C4 alone (all of ``opts.calibration_samples``) or of the default mix (C4's share of them)."""
    docs = tokenize_documents(tokenizer, read_documents(C4, text_field="text"))
    stream = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    used = torch.zeros(len(stream), dtype=torch.bool)
    L = opts.calibration_seq_len
    for count in (opts.calibration_samples, calibration_shares(opts.calibration_samples, len(DEFAULT_CALIBRATION_TEXTS))[0]):
        for s in calibration_starts(docs, count, L, seed=opts.calibration_seed):
            used[s:s + L] = True
    windows = [stream[s:s + SEQ] for s in range(0, len(stream) - SEQ + 1, SEQ) if not used[s:s + SEQ].any()]
    return windows[:n]


@torch.no_grad()
def log_probs(model, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Next-token log-probabilities [SEQ - 1, V] of each window (the last position predicts nothing scored)."""
    return [F.log_softmax(model(w[None]).logits[0, :-1].float(), dim=-1) for w in windows]


def scores(windows: list[torch.Tensor], model: list[torch.Tensor], source: list[torch.Tensor]) -> tuple[float, float]:
    """(perplexity, mean KL(source || model) per token) over ``windows`` from both models' log-probabilities."""
    nll = kl = 0.0
    n = 0
    for w, ref, logp in zip(windows, source, model):
        nll -= logp.gather(-1, w[1:, None]).sum().item()
        kl += (ref.exp() * (ref - logp)).sum().item()
        n += len(w) - 1
    return math.exp(nll / n), kl / n


def widths(model_dir: Path) -> tuple[list[int], list[int]]:
    """The per-layer latent widths of a checkpoint and the layers it keeps uncompressed."""
    config = AutoConfig.from_pretrained(model_dir)
    layers = config.latent_kv["layers"]
    kept = [i for i, layer in enumerate(layers) if layer["kind"] != "latent"]
    full = 2 * config.num_key_value_heads * config.head_dim  # a kept layer's --ranks entry is ignored
    return [layer["latent"]["v_rank"] if i not in kept else full for i, layer in enumerate(layers)], kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8, help="windows of 1024 tokens per text")
    parser.add_argument("--out", type=Path, default=RESULTS / "smollm2_allocation.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    src = smollm2_hf()
    tok = AutoTokenizer.from_pretrained(src)
    texts = {
        "C4 (no calibration token)": c4_heldout_windows(tok, args.windows, ConvertOptions(**CLOSED)),
        "WikiText-2 test": load_eval_windows(WIKITEXT, tok, SEQ, mode="raw", max_windows=args.windows),
        "PTB test": load_eval_windows(PTB, tok, SEQ, mode="raw", max_windows=args.windows),
    }
    source_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    reference = {name: log_probs(source_model, w) for name, w in texts.items()}
    source_ppl = {name: scores(texts[name], reference[name], reference[name])[0] for name in texts}
    del source_model
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        kl_dir, care_dir = Path(tmp) / "kl-closed", Path(tmp) / "care-closed"
        allocated = lambda d: dict(zip(("ranks", "keep_layers"), widths(d)))  # noqa: E731  the closed form's widths
        rows = [
            ("uniform, closed form", Path(tmp) / "uniform-closed", lambda: dict(kv_ratio=0.5, **CLOSED, **C4_ONLY)),
            ("kl, closed form", kl_dir, lambda: dict(kv_ratio=0.5, **CLOSED, **C4_ONLY, rank_allocation="kl")),
            ("care, closed form", care_dir, lambda: dict(kv_ratio=0.5, **CLOSED, **C4_ONLY, rank_allocation="care")),
            ("uniform, refined", Path(tmp) / "uniform-refined", lambda: dict(kv_ratio=0.5, **REFINED, **C4_ONLY)),
            ("kl widths, refined", Path(tmp) / "kl-refined", lambda: dict(**allocated(kl_dir), **REFINED, **C4_ONLY)),
            ("care widths, refined", Path(tmp) / "care-refined", lambda: dict(**allocated(care_dir), **REFINED, **C4_ONLY)),
            ("uniform, closed form, WikiText-2 valid calibration", Path(tmp) / "uniform-wiki",
             lambda: dict(kv_ratio=0.5, **CLOSED, calibration_text=[str(WIKI_VALID)])),
            ("uniform, refined, WikiText-2 valid calibration", Path(tmp) / "uniform-refined-wiki",
             lambda: dict(kv_ratio=0.5, **REFINED, calibration_text=[str(WIKI_VALID)])),
            ("uniform, closed form, default calibration (C4 + WikiText-2 valid)", Path(tmp) / "uniform-mix",
             lambda: dict(kv_ratio=0.5, **CLOSED)),
            ("uniform, refined, default calibration (C4 + WikiText-2 valid): the default recipe", Path(tmp) / "default",
             lambda: dict(kv_ratio=0.5, **REFINED)),
        ]
        for label, out, options in rows:
            t0 = time.perf_counter()
            convert(src, out, ConvertOptions(**options()), overwrite=True, progress=False)
            row = {"row": label, "convert_seconds": round(time.perf_counter() - t0), "widths": widths(out)}
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            for name, windows in texts.items():
                ppl, kl = scores(windows, log_probs(model, windows), reference[name])
                row[name] = {"perplexity": ppl, "x_source": ppl / source_ppl[name], "kl": kl}
            results.append(row)
            logging.info("%s: %s", label, {k: v for k, v in row.items() if k in texts})
    write(results, texts, source_ppl, args, time.perf_counter() - t_start)


def write(results: list[dict], texts: dict, source_ppl: dict, args, seconds: float) -> None:
    names = list(texts)
    lines = [
        "# Rank allocation and calibration text, scored on other text (SmolLM2-135M-Instruct, 50% cache)",
        "",
        f"Written by `benchmarks/smollm2_allocation.py --windows {args.windows}` in {seconds:.0f} s (2 CPU cores). "
        "Full RoPE, root covariance; calibration and the kl allocation's KL: the shipped C4 sample unless the row "
        "says otherwise (32 x 256 tokens, the allocation's KL on the first 8; the default mix: 16 of each text). "
        f"Each text: the first {args.windows} windows of {SEQ} tokens; C4 windows share no token with any row's "
        "calibration sequences. "
        "Source perplexity: " + ", ".join(f"{n} {source_ppl[n]:.3f}" for n in names) + ".",
        "",
        "| row | " + " | ".join(f"{n}: x source | {n}: KL" for n in names) + " | convert s |",
        "|---|" + "---|---|" * len(names) + "---|",
    ]
    for r in results:
        cells = " | ".join(f"{r[n]['x_source']:.3f} | {r[n]['kl']:.4f}" for n in names)
        lines.append(f"| {r['row']} | {cells} | {r['convert_seconds']} |")
    lines += ["", "Widths picked by the allocations (layer 0 first; `keep` = uncompressed):", ""]
    for r in results:
        if r["row"].startswith(("kl, ", "care, ")):
            w, kept = r["widths"]
            lines.append(f"- {r['row']}: " + ", ".join("keep" if i in kept else str(x) for i, x in enumerate(w)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"source": source_ppl, "rows": results}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
