"""Wall time and peak memory of converting a random bf16 checkpoint with Llama-3.2-1B shapes.

The weights are random (no real 1B model can be fetched here); what is measured is the
converter's streaming: it should hold about one layer (plus one output shard) in memory.

    python benchmarks/convert_llama1b_shapes.py     # writes benchmarks/results/convert_llama1b_shapes.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

RESULTS = Path(__file__).resolve().parent / "results"
# Llama-3.2-1B: hidden 2048, 16 layers, 32 query / 8 KV heads of 64, SwiGLU 8192, vocab 128256, tied.
CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
    rope_theta=500000.0, torch_dtype="bfloat16",
    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
)


def write_random_checkpoint(out: Path, shard_layers: int = 4, config: dict = CONFIG) -> int:
    """Random bf16 weights with the shapes of ``config``, in shards of a few layers; returns bytes written."""
    c = config
    D, F, H, G, d = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: (torch.randn(*s, generator=gen) * 0.02).to(torch.bfloat16)  # noqa: E731
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config))
    weight_map, total, shard = {}, 0, {}

    def flush(k: int) -> None:
        nonlocal shard, total
        name = f"model-{k:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in shard})
        total += sum(t.numel() * 2 for t in shard.values())
        shard = {}

    shard = {"model.embed_tokens.weight": rand(c["vocab_size"], D), "model.norm.weight": torch.ones(D, dtype=torch.bfloat16)}
    flush(0)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shard.update({
            p + "self_attn.q_proj.weight": rand(H * d, D), p + "self_attn.k_proj.weight": rand(G * d, D),
            p + "self_attn.v_proj.weight": rand(G * d, D), p + "self_attn.o_proj.weight": rand(D, H * d),
            p + "mlp.gate_proj.weight": rand(F, D), p + "mlp.up_proj.weight": rand(F, D), p + "mlp.down_proj.weight": rand(D, F),
            p + "input_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
        })
        if (i + 1) % shard_layers == 0:
            flush(i + 1)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def measure(code: str) -> tuple[float, float]:
    """Run Python ``code`` in a fresh interpreter: (wall seconds, its own peak RSS in GiB)."""
    probe = code + "\nimport resource; print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    seconds = time.perf_counter() - t0
    peak_kib = int(out.rsplit("PEAK_KIB", 1)[1].split()[0])
    return seconds, peak_kib / 2**20


def cli_run(src: Path, out: Path, args: str) -> str:
    argv = ["convert", str(src), str(out), *args.split()]
    return f"from converters.cli import main; assert main({argv!r}) == 0"


def calibrated_run(src: Path, out: Path, samples: int, seq_len: int) -> str:
    """Activation-aware conversion; random token ids stand in for text (the model has no tokenizer)."""
    return (
        "import torch\nfrom converters.convert import ConvertOptions, convert\n"
        f"ids = torch.randint(0, {CONFIG['vocab_size']}, ({samples}, {seq_len}), generator=torch.Generator().manual_seed(0))\n"
        f"convert({str(src)!r}, {str(out)!r}, ConvertOptions(rope_mode='full', kv_ratio=0.25, method='activation', refine_steps=0,"
        " preconditioner='root_covariance'), calibration_ids=ids, overwrite=True)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "convert_llama1b_shapes.md")
    parser.add_argument("--convert-args", default="--rope-mode partial --rope-strategy high --rope-pairs 8 --kv-ratio 0.25")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        size = write_random_checkpoint(src)
        runs = [
            (f"`latentkv convert {args.convert_args}` (plain SVD, no calibration)", cli_run(src, out, args.convert_args)),
            ("full RoPE, kv 0.25, root-covariance activation SVD, calibration 16 x 256 tokens", calibrated_run(src, Path(tmp) / "out2", 16, 256)),
        ]
        for label, code in runs:
            seconds, peak = measure(code)
            rows.append(f"| {size / 2**30:.2f} GiB | {label} | {seconds:.1f} s | {peak:.2f} GiB |")
            print(rows[-1], flush=True)
    text = "\n".join([
        "# Converting a checkpoint with Llama-3.2-1B shapes (random bf16 weights)",
        "",
        "Written by `benchmarks/convert_llama1b_shapes.py` on this machine (2 CPU cores, shared).",
        "",
        "| source size | conversion | wall time | peak RSS of the converter process |",
        "|---|---|---|---|",
        *rows,
        "",
        "The source is read one tensor at a time. Peak memory is about two output shards (a shard is assembled, then",
        "serialised, in memory; 1 GiB default, `--shard-size`) plus one layer's working set (and, when calibrating,",
        "the calibration hidden states N x L x D in fp32), not the model size: a 7B-class model converts in a few GiB.",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
