"""Decode on the Triton kernels == the torch path, in the engine.

Subjects: random one-layer GQA models (4 query / 2 KV heads, head_dim 16):
* Llama, full RoPE, split latent (32 = 16 key + 16 value) in two Palu groups: decode rebuilds and
  rotates the keys per KV head from its group's key latent (``full_rope_decode_attention[_int4]``);
* Llama, partial RoPE (2 pairs per KV head), joint latent of 32 in two Palu groups: absorbed
  decode (``latent_decode_attention[_int4]``);
* Qwen2 (key bias) and Qwen3 (per-KV-head key RMSNorm), full RoPE with the default joint latent:
  the bias and the norm are applied to the rebuilt keys inside the full-RoPE kernel.

The kernels run on CPU under the Triton interpreter, which must be switched on before they are
decorated (at the first import of ``vllm_latentkv.kernels``) and would then route every other
engine test of the process through Triton too; so the engines run in a child process started
with ``TRITON_INTERPRET=1`` (this file is its script). In it one engine per cache dtype (fp32,
INT4), and one fp32 engine with tensor parallelism 2 (each rank's heads read their rope slots or
key-latent groups of the row), generate the same batch twice, with ``LATENTKV_TRITON=0`` (torch
decode) and ``=1`` (Triton decode; the backend reads the variable at every step), and count the
kernel calls in every worker. Checks: the kernel ran only in the Triton runs and on every rank,
greedy tokens are identical, the per-step logprobs of the chosen tokens agree, and the fp32
tokens (TP 1 and 2) are the reference model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

N_NEW = 6
INT4_GROUP = 16
PROMPTS = {"one": 1, "short": 5, "pages": 37}  # 37 + 6 tokens: three 16-token pages, a boundary crossed


def _prompts(vocab: int = 256) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPTS.values()]


# kind: (source family, conversion, runs as (cache, TP size))
MODELS = {
    "full": ("llama", dict(rope_mode="full", svd="split", ranks=[32], latent_groups=2),
             (("fp32", 1), ("int4", 1), ("fp32", 2), ("fp32-tf", 1))),
    "partial": ("llama", dict(rope_mode="partial", rope_strategy="high", rope_pairs=2, svd="joint", ranks=[32],
                              latent_groups=2), (("fp32", 1), ("int4", 1), ("fp32", 2), ("fp32-tf", 1))),
    # the default joint latent, with the key bias (Qwen2) or the per-KV-head key norm (Qwen3) in the kernel
    "full_joint_qwen2": ("qwen2", dict(rope_mode="full", svd="joint", ranks=[32], latent_groups=2), (("fp32", 1),)),
    "full_joint_qwen3": ("qwen3", dict(rope_mode="full", svd="joint", ranks=[32]), (("fp32", 1),)),
}
# "fp32-tf": Token Filtering on (half of the tokens skipped after a 2-token warm-up): a skipped decode
# row reaches the kernel with an attended length of 0 (its early exit)
TOKEN_FILTER = {"skip_fraction": 0.5, "layers": "all", "warmup": 2, "anchor_window": 4, "threshold_window": 8}
KERNELS = ("full_rope_decode_attention", "full_rope_decode_attention_int4", "latent_decode_attention",
           "latent_decode_attention_int4")


def _kernel(kind: str, cache: str) -> str:
    return ("full_rope_decode_attention" if kind.startswith("full") else "latent_decode_attention") + (
        "_int4" if cache == "int4" else "")


def _count_kernel_calls(model) -> None:
    """In each worker process: wrap the decode kernels with call counters (once per process)."""
    from vllm_latentkv import kernels

    if hasattr(kernels, "calls"):
        return
    kernels.calls = {k: 0 for k in KERNELS}
    for name in kernels.calls:
        fn = getattr(kernels, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            kernels.calls[_name] += 1
            return _fn(*args, **kwargs)

        setattr(kernels, name, counted)


def _kernel_calls(model) -> dict[str, int]:
    from vllm_latentkv import kernels

    return dict(kernels.calls)


def _use_triton(mode: str, model) -> None:
    """Set LATENTKV_TRITON in the worker and redo the step that reads it (once, after loading)."""
    from vllm_latentkv.attention.layer import LatentAttention

    os.environ["LATENTKV_TRITON"] = mode
    for module in model.modules():
        if isinstance(module, LatentAttention):
            module.process_weights_after_loading()


def _child(models: dict[str, str], out: str) -> None:
    """Runs in the child process (TRITON_INTERPRET=1 set by the parent before any import)."""
    import functools

    from vllm import SamplingParams

    from test_latent_helpers import Engine

    params = SamplingParams(temperature=0.0, max_tokens=N_NEW, ignore_eos=True, logprobs=0)
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    int4 = {"latent_kv_cache_dtype": "int4", "latent_kv_int4_group_size": INT4_GROUP}
    results = {}
    for kind, cache, tp in ((kind, cache, tp) for kind in models for cache, tp in MODELS[kind][2]):
        overrides = int4 if cache == "int4" else {"latent_kv_token_filter": TOKEN_FILTER} if cache == "fp32-tf" else None
        tp_args = dict(tensor_parallel_size=tp, distributed_executor_backend="mp") if tp > 1 else {}
        engine = Engine(Path(models[kind]), hf_overrides=overrides, max_num_batched_tokens=64, enable_prefix_caching=False,
                        skip_tokenizer_init=True, **tp_args)
        try:
            engine.llm.apply_model(_count_kernel_calls)
            for mode in ("0", "1"):
                engine.llm.apply_model(functools.partial(_use_triton, mode))
                before = engine.llm.apply_model(_kernel_calls)
                outs = engine.llm.generate(prompts, params, use_tqdm=False)
                after = engine.llm.apply_model(_kernel_calls)
                results[f"{kind}/{cache}/tp{tp}/{mode}"] = {
                    "tokens": [list(o.outputs[0].token_ids) for o in outs],
                    "logprobs": [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                                 for o in outs],
                    "calls": [{k: a[k] - b[k] for k in a} for a, b in zip(after, before)],  # per worker
                }
        finally:
            engine.close()
    Path(out).write_text(json.dumps(results))


@pytest.mark.vllm
@pytest.mark.slow
def test_triton_decode_equals_torch_decode(tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("triton")
    from test_latent_helpers import convert_to, latent_spec, make_random_llama, reference_greedy, reference_model

    sources = {family: make_random_llama(tmp_path / f"src_{family}", family, heads=4, kv_heads=2, head_dim=16, layers=1)
               for family in {family for family, _, _ in MODELS.values()}}
    models = {kind: convert_to(sources[family], tmp_path / kind, **opts) for kind, (family, opts, _) in MODELS.items()}
    specs = {kind: latent_spec(path)[0] for kind, path in models.items()}
    full, partial = specs["full"].layers[0], specs["partial"].layers[0]
    assert full.rope_mode == "full" and not full.latent.joint and full.latent.groups == 2
    assert partial.rope_mode == "partial" and partial.qk_nope_head_dim == 12 and partial.latent.groups == 2
    assert specs["full_joint_qwen2"].attention_bias and specs["full_joint_qwen2"].layers[0].latent.joint
    assert specs["full_joint_qwen3"].qk_norm and specs["full_joint_qwen3"].layers[0].latent.joint

    out = tmp_path / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "LATENTKV_CPU_PLATFORM": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("LATENTKV_TRITON", None)
    proc = subprocess.run([sys.executable, __file__, json.dumps({k: str(v) for k, v in models.items()}), str(out)], env=env, cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())

    import torch

    for kind, cache, tp in ((kind, cache, tp) for kind in models for cache, tp in MODELS[kind][2]):
        run, kernel = f"{kind}/{cache}/tp{tp}", _kernel(kind, cache)
        torch_run, triton_run = results[f"{run}/0"], results[f"{run}/1"]
        assert len(triton_run["calls"]) == tp, run
        for worker_calls, torch_calls in zip(triton_run["calls"], torch_run["calls"]):
            assert sum(torch_calls.values()) == 0, run
            assert worker_calls[kernel] >= N_NEW - 1, run  # every TP rank decodes on the kernel
            assert sum(worker_calls.values()) == worker_calls[kernel], run
        assert triton_run["tokens"] == torch_run["tokens"], run
        torch.testing.assert_close(torch.tensor(triton_run["logprobs"]), torch.tensor(torch_run["logprobs"]),
                                   atol=1e-4, rtol=1e-4, msg=run)
    for kind, model in models.items():
        for cache, tp in MODELS[kind][2]:
            if cache.startswith("fp32"):
                ref = reference_model(model, token_filter=TOKEN_FILTER if cache == "fp32-tf" else None)
                want = [reference_greedy(ref, p, N_NEW) for p in _prompts()]
                assert results[f"{kind}/{cache}/tp{tp}/1"]["tokens"] == want, (kind, cache, tp)
        if ("fp32-tf", 1) in MODELS[kind][2]:  # the filter skipped something on the kernel path
            assert results[f"{kind}/fp32-tf/tp1/1"]["logprobs"] != results[f"{kind}/fp32/tp1/1"]["logprobs"], kind


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]), sys.argv[2])
