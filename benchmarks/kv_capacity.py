"""KV-cache capacity of the vLLM engine: source model vs latent conversion vs latent + INT4 cache.

Converts stories260K (partial RoPE, 2 pairs per KV head, joint SVD, 50% KV ratio), starts the
real vLLM engine (latentkv CPU platform) on each variant with the same ``kv_cache_memory_bytes``
and reads the engine's own capacity (``num_gpu_blocks x block_size`` tokens). Expected:
``floor(budget / (block_size x bytes_per_token)) x block_size`` with bytes per token from
``latentkv.format.kv_bytes_report`` (float32 elements) and, for INT4, the kernels' packed row
``latentkv.int4.int4_row_bytes`` per layer.

    LATENTKV_CPU_PLATFORM=1 python benchmarks/kv_capacity.py   # writes benchmarks/results/kv_capacity.md
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("LATENTKV_CPU_PLATFORM", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "kv_capacity.md"
BUDGET = 64 << 20
BLOCK = 16
INT4_GROUP = 16


def engine_capacity(model: Path, **kwargs) -> int:
    from vllm import LLM

    llm = LLM(model=str(model), dtype="float32", max_model_len=256, block_size=BLOCK, kv_cache_memory_bytes=BUDGET,
              distributed_executor_backend="uni", seed=0, **kwargs)
    try:
        return llm.llm_engine.vllm_config.cache_config.num_gpu_blocks * BLOCK
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def main() -> int:
    import json

    import torch

    from converters.convert import ConvertOptions, convert
    from converters.importers.llama2c import import_llama2c, packaged_stories260k
    from latentkv import format as fmt
    from vllm_latentkv.attention.cache import cache_bytes_per_token

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src = import_llama2c(*packaged_stories260k(), tmp / "src")
        latent = tmp / "latent"
        convert(src, latent, ConvertOptions(rope_mode="partial", rope_strategy="high", rope_pairs=2, svd="joint", kv_ratio=0.5,
                                            method="svd", refine_steps=0),
                progress=False)
        spec, dims = fmt.load_spec(json.loads((latent / "config.json").read_text()))
        report = fmt.kv_bytes_report(spec, dims, element_bytes=4)
        int4_spec = spec.model_copy(update={"cache_dtype": "int4", "int4_group_size": INT4_GROUP})
        rows = [
            ("source Llama (fp32)", src, {}, report["source_bytes_per_token"]),
            ("latent, fp32 cache", latent, {}, report["bytes_per_token"]),
            (f"latent, INT4 cache (group {INT4_GROUP})", latent,
             {"hf_overrides": {"latent_kv_cache_dtype": "int4", "latent_kv_int4_group_size": INT4_GROUP}},
             cache_bytes_per_token(int4_spec, dims, torch.float32)),
        ]
        results = []
        for name, path, kwargs, bpt in rows:
            got = engine_capacity(path, **kwargs)
            expected = BUDGET // (BLOCK * bpt) * BLOCK
            results.append((name, bpt, expected, got))
    lines = [
        "# KV-cache capacity: source vs latent vs latent + INT4 (vLLM 0.32 engine, CPU platform)",
        "",
        f"stories260K (5 layers, GQA 8q/4kv, head_dim 8), converted with partial RoPE (2 pairs per KV head), "
        f"joint SVD, kv_ratio 0.5: per layer W = 16 latent + 4 x 4 rope values. "
        f"`kv_cache_memory_bytes` = {BUDGET} ({BUDGET >> 20} MiB), block_size {BLOCK}, float32 model. "
        "Expected = floor(budget / (block_size x bytes/token)) x block_size; bytes/token from "
        "`latentkv.format.kv_bytes_report` (4-byte elements) and, for INT4, `latentkv.int4.int4_row_bytes` "
        "(W/2 packed bytes + 2 W/G scale bytes + 2 R rope bytes per layer).",
        "",
        "| variant | bytes/token | expected tokens | engine tokens | vs source |",
        "|---|---:|---:|---:|---:|",
    ]
    base = results[0][3]
    for name, bpt, expected, got in results:
        lines.append(f"| {name} | {bpt} | {expected:,} | {got:,} | {got / base:.2f}x |")
    ok = all(e == g for _, _, e, g in results)
    lines += ["", f"Engine capacity == arithmetic for every variant: **{ok}**.", ""]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
