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
    calibration_ids,
    check_greedy_matches_reference,
    check_prompt_logprobs_match_reference,
    chunked_engine,
    convert_to,
    latent_spec,
    make_random_llama,
    random_prompts,
    reference_model,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

N_NEW = 16
VOCAB = 256
HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 16, 3


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transkv")
    src = make_random_llama(tmp / "src", "llama", heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, layers=LAYERS,
                            vocab=VOCAB)
    latent = convert_to(src, tmp / "latent", method="transkv", kv_ratio=0.5, calibration_ids=calibration_ids(VOCAB))
    engine = chunked_engine(latent)
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
    check_greedy_matches_reference(engine, ref, random_prompts(VOCAB), N_NEW, prefix_cached=True)


def test_prompt_logprobs_match_reference(subject):
    _, ref, engine = subject
    check_prompt_logprobs_match_reference(engine, ref, random_prompts(VOCAB)[-1])
