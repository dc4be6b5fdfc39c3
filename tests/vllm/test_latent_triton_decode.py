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
INT4) generates the same batch twice, with ``LATENTKV_TRITON=0`` (torch decode) and ``=1``
(Triton decode; the backend reads the variable at every step), and counts the kernel calls.
Checks: the kernel ran only in the Triton runs, greedy tokens are identical, the per-step
logprobs of the chosen tokens agree, and the fp32 tokens are the reference model's.
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


def _child(models: dict[str, str], out: str) -> None:
    """Runs in the child process (TRITON_INTERPRET=1 set by the parent before any import)."""
    from vllm import SamplingParams

    from test_latent_helpers import Engine
    from vllm_latentkv import kernels

    calls = {k: 0 for k in KERNELS.values()}
    for name in calls:
        fn = getattr(kernels, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        setattr(kernels, name, counted)

    params = SamplingParams(temperature=0.0, max_tokens=N_NEW, ignore_eos=True, logprobs=0)
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    results = {}
    for (kind, model), (cache, overrides) in ((m, c) for m in models.items() for c in (
            ("fp32", None), ("int4", {"latent_kv_cache_dtype": "int4", "latent_kv_int4_group_size": INT4_GROUP}))):
        engine = Engine(Path(model), hf_overrides=overrides, max_num_batched_tokens=64, enable_prefix_caching=False,
                        skip_tokenizer_init=True)
        try:
            for mode in ("0", "1"):
                os.environ["LATENTKV_TRITON"] = mode
                before = dict(calls)
                outs = engine.llm.generate(prompts, params, use_tqdm=False)
                results[f"{kind}/{cache}/{mode}"] = {
                    "tokens": [list(o.outputs[0].token_ids) for o in outs],
                    "logprobs": [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                                 for o in outs],
                    "calls": {k: calls[k] - before[k] for k in calls},
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
        torch_run, triton_run = results[f"{case}/0"], results[f"{case}/1"]
        assert sum(torch_run["calls"].values()) == 0, case
        assert triton_run["calls"][kernel] >= N_NEW - 1, case
        assert sum(triton_run["calls"].values()) == triton_run["calls"][kernel], case
        assert triton_run["tokens"] == torch_run["tokens"], case
        torch.testing.assert_close(torch.tensor(triton_run["logprobs"]), torch.tensor(torch_run["logprobs"]),
                                   atol=1e-4, rtol=1e-4, msg=case)
    for kind, model in models.items():
        ref = reference_model(model)
        assert results[f"{kind}/fp32/0"]["tokens"] == [reference_greedy(ref, p, N_NEW) for p in _prompts()], kind


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]), sys.argv[2])
