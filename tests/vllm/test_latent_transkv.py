"""TransKV ``reduced_head`` layers in the engine vs the reference model.

Subject: a random GQA Llama (4 query / 2 KV heads, head_dim 16, 3 layers) converted with
``method="transkv", kv_ratio=0.5`` (calibrated on random token ids): every layer is a
``reduced_head`` layer with r_k = r_v = 8, served by vLLM's ``Attention`` at head size 8
(``vllm_latentkv.attention.head``). One engine: chunked prefill (48-token steps) and prefix
caching on.

Checks: the layers and cache shapes are what the format says, the engine's KV capacity follows
G (r_k + r_v) values per token and layer (half the source's 2 G d_h), greedy continuations and
teacher-forced prompt logprobs == reference (float32).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from latentkv import format as fmt  # noqa: E402
from test_latent_helpers import (  # noqa: E402
    BLOCK_SIZE,
    KV_BYTES,
    Engine,
    convert_to,
    latent_spec,
    make_random_llama,
    reference_greedy,
    reference_logprobs,
    reference_model,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

N_NEW = 16
VOCAB = 256
HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 16, 3


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 7, 40, 70)]


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transkv")
    src = make_random_llama(tmp / "src", "llama", heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, layers=LAYERS,
                            vocab=VOCAB)
    calibration = torch.randint(3, VOCAB, (8, 64), generator=torch.Generator().manual_seed(0))
    latent = convert_to(src, tmp / "latent", method="transkv", kv_ratio=0.5, calibration_ids=calibration)
    engine = Engine(latent, max_num_batched_tokens=48, enable_chunked_prefill=True, enable_prefix_caching=True,
                    skip_tokenizer_init=True)
    yield latent, reference_model(latent), engine
    engine.close()


def test_layers_are_reduced_heads(subject):
    latent, _, engine = subject
    spec, dims = latent_spec(latent)
    assert [layer.kind for layer in spec.layers] == ["reduced_head"] * LAYERS
    assert {(layer.k_head_dim, layer.v_head_dim) for layer in spec.layers} == {(HEAD_DIM // 2, HEAD_DIM // 2)}
    caches = engine.layer_caches()
    assert len(caches) == LAYERS
    for name, (impl, dtype, shape) in caches.items():
        assert impl != "LatentKVAttentionImpl" and dtype == "torch.float32", name
        # per block: K and V of BLOCK_SIZE tokens x G heads at head size r_k (= r_v: no padding)
        per_block = 1
        for n in shape[1:]:
            per_block *= n
        assert per_block == 2 * BLOCK_SIZE * KV_HEADS * (HEAD_DIM // 2), (name, shape)


def test_kv_capacity_follows_reduced_head_width(subject):
    from vllm_latentkv.attention.cache import cache_bytes_per_token

    latent, _, engine = subject
    spec, dims = latent_spec(latent)
    per_layer = [dims.num_key_value_heads * (layer.k_head_dim + layer.v_head_dim) for layer in spec.layers]
    report = fmt.kv_bytes_report(spec, dims, element_bytes=4)
    assert report["values_per_token_per_layer"] == per_layer == [KV_HEADS * HEAD_DIM] * LAYERS
    assert report["bytes_per_token"] == cache_bytes_per_token(spec, dims, torch.float32) == sum(per_layer) * 4
    assert report["ratio"] == 0.5
    # capacity = floor(budget / page bytes) whole blocks of BLOCK_SIZE tokens
    got = engine.num_blocks * BLOCK_SIZE
    assert got == KV_BYTES // (BLOCK_SIZE * report["bytes_per_token"]) * BLOCK_SIZE
    source = KV_BYTES // (BLOCK_SIZE * report["source_bytes_per_token"]) * BLOCK_SIZE
    assert abs(got / source - 2) < 0.01


def test_greedy_matches_reference(subject):
    _, ref, engine = subject
    prompts = _prompts()
    outs = engine.greedy(prompts, N_NEW)
    for p, out in zip(prompts, outs):
        assert list(out.outputs[0].token_ids) == reference_greedy(ref, p, N_NEW), len(p)
    again = engine.greedy([prompts[-1]], N_NEW)[0]
    assert again.num_cached_tokens > 0
    assert list(again.outputs[0].token_ids) == list(outs[-1].outputs[0].token_ids)


def test_prompt_logprobs_match_reference(subject):
    _, ref, engine = subject
    ids = _prompts()[-1]
    torch.testing.assert_close(engine.prompt_logprobs(ids), reference_logprobs(ref, ids), atol=5e-4, rtol=1e-4)
