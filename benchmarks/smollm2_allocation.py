"""Does a rank allocation judged on calibration text carry over to other text? SmolLM2, 50% cache.

``--rank-allocation kl`` picks each layer's latent width to minimise the model's output KL to the
source, measured on calibration sequences (the shipped C4 sample). This benchmark scores the
uniform widths and the kl widths side by side on three texts: C4 windows that share no token with
the calibration sequences (the calibration's own kind of text), WikiText-2 test and PTB test;
for each, the perplexity as a ratio to the source's and the mean next-token KL to the source.

Rows (full RoPE, root covariance, 50% cache):
* uniform / kl, closed form (``--refine-steps 0``): the kl widths come from the allocation itself;
* uniform / kl, refined (the default 100 steps): the kl row reuses the closed-form row's widths
  through ``--ranks`` and ``--keep-layers``, which is what ``--rank-allocation kl`` with refinement
  converts (its candidates are measured on the closed form) without paying the KL pass twice;
* uniform / kl, closed form, and uniform refined, calibrated on WikiText-2 validation text instead
  of C4: does the allocation help when the calibration text is the kind of text served, and how
  much does the calibration text itself move the default recipe?

    python benchmarks/smollm2_allocation.py      # -> results/smollm2_allocation.{md,json} (~30 min on 2 cores)
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
from converters.importers.smollm2 import smollm2_hf
from latentkv.text import calibration_starts, load_eval_windows, read_documents, tokenize_documents

RESULTS = Path(__file__).resolve().parent / "results"
C4 = WIKITEXT.parent / "c4_sample.jsonl"  # shipped with latentkv
SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"
PTB = SHARED_TEXT / "ptb.test.txt"
WIKI_VALID = SHARED_TEXT / "wiki.valid.raw"
CLOSED = dict(rope_mode="full", method="activation", preconditioner="root_covariance", refine_steps=0)
SEQ = 1024


def c4_heldout_windows(tokenizer, n: int, opts: ConvertOptions) -> list[torch.Tensor]:
    """The first ``n`` windows of the C4 sample's token stream that overlap no calibration sequence."""
    docs = tokenize_documents(tokenizer, read_documents(C4, text_field="text"))
    stream = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    used = torch.zeros(len(stream), dtype=torch.bool)
    L = opts.calibration_seq_len
    for s in calibration_starts(docs, opts.calibration_samples, L, seed=opts.calibration_seed):
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
        kl_dir = Path(tmp) / "kl-closed"
        rows = [
            ("uniform, closed form", Path(tmp) / "uniform-closed", lambda: dict(kv_ratio=0.5, **CLOSED)),
            ("kl, closed form", kl_dir, lambda: dict(kv_ratio=0.5, **CLOSED, rank_allocation="kl")),
            ("uniform, refined", Path(tmp) / "uniform-refined", lambda: dict(kv_ratio=0.5, **{**CLOSED, "refine_steps": 100})),
            ("kl widths, refined", Path(tmp) / "kl-refined",
             lambda: dict(zip(("ranks", "keep_layers"), widths(kl_dir)), **{**CLOSED, "refine_steps": 100})),
            # the same two closed forms calibrated (statistics and the allocation's KL) on WikiText-2 valid
            ("uniform, closed form, WikiText-2 valid calibration", Path(tmp) / "uniform-wiki",
             lambda: dict(kv_ratio=0.5, **CLOSED, calibration_text=str(WIKI_VALID))),
            ("kl, closed form, WikiText-2 valid calibration", Path(tmp) / "kl-wiki",
             lambda: dict(kv_ratio=0.5, **CLOSED, rank_allocation="kl", calibration_text=str(WIKI_VALID))),
            ("uniform, refined, WikiText-2 valid calibration", Path(tmp) / "uniform-refined-wiki",
             lambda: dict(kv_ratio=0.5, **{**CLOSED, "refine_steps": 100}, calibration_text=str(WIKI_VALID))),
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
        "# Rank allocation judged on calibration text, scored on other text (SmolLM2-135M-Instruct, 50% cache)",
        "",
        f"Written by `benchmarks/smollm2_allocation.py --windows {args.windows}` in {seconds:.0f} s (2 CPU cores). "
        "Full RoPE, root covariance; calibration and the kl allocation's KL: the shipped C4 sample unless the row "
        "says otherwise (32 x 256 tokens, the allocation's KL on the first 8). Each text: the first "
        f"{args.windows} windows of {SEQ} tokens; C4 windows share no token with the calibration sequences. "
        "Source perplexity: " + ", ".join(f"{n} {source_ppl[n]:.3f}" for n in names) + ".",
        "",
        "| row | " + " | ".join(f"{n}: x source | {n}: KL" for n in names) + " | convert s |",
        "|---|" + "---|---|" * len(names) + "---|",
    ]
    for r in results:
        cells = " | ".join(f"{r[n]['x_source']:.3f} | {r[n]['kl']:.4f}" for n in names)
        lines.append(f"| {r['row']} | {cells} | {r['convert_seconds']} |")
    lines += ["", "Widths picked by the kl allocations (layer 0 first; `keep` = uncompressed):", ""]
    for r in results:
        if r["row"].startswith("kl, "):
            w, kept = r["widths"]
            lines.append(f"- {r['row']}: " + ", ".join("keep" if i in kept else str(x) for i, x in enumerate(w)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"source": source_ppl, "rows": results}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
