"""Decode on the Triton kernels == the torch path, in the engine.

Subjects: a random one-layer GQA Llama (4 query / 2 KV heads, head_dim 16) converted twice:
* full RoPE, split latent (32 = 16 key + 16 value) in two Palu groups: decode rebuilds and rotates
  the keys per KV head from its group's key latent (``full_rope_decode_attention[_int4]``);
* partial RoPE (2 pairs per KV head), joint latent of 32 in two Palu groups: absorbed decode
  (``latent_decode_attention[_int4]``).

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


KERNELS = {"full/fp32": "full_rope_decode_attention", "full/int4": "full_rope_decode_attention_int4",
           "partial/fp32": "latent_decode_attention", "partial/int4": "latent_decode_attention_int4"}
CONVERSIONS = {"full": dict(rope_mode="full", svd="split", ranks=[32], latent_groups=2),
               "partial": dict(rope_mode="partial", rope_strategy="high", rope_pairs=2, svd="joint", ranks=[32],
                               latent_groups=2)}


def _count_kernel_calls(model) -> None:
    """In each worker process: wrap the decode kernels with call counters (once per process)."""
    from vllm_latentkv import kernels

    if hasattr(kernels, "calls"):
        return
    kernels.calls = {k: 0 for k in KERNELS.values()}
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
    os.environ["LATENTKV_TRITON"] = mode  # the backend reads it at every step, in the worker


def _child(models: dict[str, str], out: str) -> None:
    """Runs in the child process (TRITON_INTERPRET=1 set by the parent before any import)."""
    import functools

    from vllm import SamplingParams

    from test_latent_helpers import Engine

    params = SamplingParams(temperature=0.0, max_tokens=N_NEW, ignore_eos=True, logprobs=0)
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    int4 = {"latent_kv_cache_dtype": "int4", "latent_kv_int4_group_size": INT4_GROUP}
    runs = [(kind, cache, overrides, tp) for kind in models for cache, overrides, tp in
            (("fp32", None, 1), ("int4", int4, 1), ("fp32", None, 2))]
    results = {}
    for kind, cache, overrides, tp in runs:
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

    src = make_random_llama(tmp_path / "src", "llama", heads=4, kv_heads=2, head_dim=16, layers=1)
    models = {kind: convert_to(src, tmp_path / kind, **opts) for kind, opts in CONVERSIONS.items()}
    full, partial = (latent_spec(models[k])[0].layers[0] for k in ("full", "partial"))
    assert full.rope_mode == "full" and not full.latent.joint and full.latent.groups == 2
    assert partial.rope_mode == "partial" and partial.qk_nope_head_dim == 12 and partial.latent.groups == 2

    out = tmp_path / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "LATENTKV_CPU_PLATFORM": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("LATENTKV_TRITON", None)
    proc = subprocess.run([sys.executable, __file__, json.dumps({k: str(v) for k, v in models.items()}), str(out)], env=env, cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())

    import torch

    for case, kernel in KERNELS.items():
        for tp in (1, 2) if case.endswith("fp32") else (1,):
            run = f"{case}/tp{tp}"
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
        ref = reference_model(model)
        want = [reference_greedy(ref, p, N_NEW) for p in _prompts()]
        assert results[f"{kind}/fp32/tp1/0"]["tokens"] == want, kind
        assert results[f"{kind}/fp32/tp2/1"]["tokens"] == want, kind


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]), sys.argv[2])
