"""``shared``-RoPE layers of DeepSeek's size served by vLLM's own MLA layer, in the real engine.

Subject: a random GQA Llama (4 query / 2 KV heads, head_dim 128, 3 layers) converted with
``--rope-mode shared --rope-pairs 32 --svd joint --ranks 512,256,512 --keep-layers 2``:

* layer 0: a 512-wide latent plus one shared 64-dim rope key per token, DeepSeek-V3's cache row:
  vLLM's own ``MLAAttention``. On a GPU it runs on FlashMLA / Triton MLA; on the CPU platform the
  same layer code (weight absorption, chunked-context prefill, cache writes) runs on vLLM's
  reference ``CPU_MLA`` backend, whose one compiled op the platform defines in PyTorch. Only the
  GPU decode kernels themselves are not exercised here;
* layer 1: 256 + 64, a size vLLM's CPU MLA kernel lacks: our latent backend;
* layer 2: kept as a source layer: vLLM's standard attention.

All three share one KV-cache manager.

Oracle: ``latentkv.modeling`` (float32), greedy and teacher-forced logprobs.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from test_latent_helpers import (  # noqa: E402
    RANDOM_VOCAB,
    check_greedy_matches_reference,
    check_prompt_logprobs_match_reference,
    chunked_engine,
    convert_random_case,
    random_prompts,
    reference_model,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

N_NEW = 12
VOCAB = RANDOM_VOCAB
CACHE_ROW = 512 + 64  # kv_lora_rank + qk_rope_head_dim


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    return convert_random_case(tmp_path_factory.mktemp("deepseek_shaped"), "deepseek_shaped")


@pytest.fixture(scope="module")
def ref(latent):
    return reference_model(latent)


@pytest.fixture(scope="module")
def engine(latent):
    e = chunked_engine(latent)
    yield e
    e.close()


def test_each_layer_gets_its_attention(engine):
    caches = engine.layer_caches()
    impl, _, shape = caches["model.layers.0.self_attn.mla.mla_attn"]  # vLLM's MLAAttention in the wrapper
    assert impl == "CPUMLAImpl" and shape[-1] == CACHE_ROW
    impl, _, shape = caches["model.layers.1.self_attn"]
    assert impl == "LatentKVAttentionImpl" and shape[-1] == 256 + 64
    assert caches["model.layers.2.self_attn.attn"][0] == "TorchPagedAttentionImpl"
    assert len(caches) == 3


def test_greedy_matches_reference_with_chunked_prefill_and_prefix_caching(engine, ref):
    check_greedy_matches_reference(engine, ref, random_prompts(VOCAB), N_NEW, prefix_cached=True)


def test_prompt_logprobs_match_reference(engine, ref):
    check_prompt_logprobs_match_reference(engine, ref, random_prompts(VOCAB)[-1])


def test_switch_off_serves_the_same_layers_on_our_backend(latent, engine, monkeypatch):
    monkeypatch.setenv("LATENTKV_VLLM_MLA", "0")
    ours = chunked_engine(latent)
    try:
        impls = {name: impl for name, (impl, _, _) in ours.layer_caches().items()}
        assert impls["model.layers.0.self_attn"] == impls["model.layers.1.self_attn"] == "LatentKVAttentionImpl"
        prompts = random_prompts(VOCAB)
        got = [list(o.outputs[0].token_ids) for o in ours.greedy(prompts, N_NEW)]
        want = [list(o.outputs[0].token_ids) for o in engine.greedy(prompts, N_NEW)]
        assert got == want
    finally:
        ours.close()
