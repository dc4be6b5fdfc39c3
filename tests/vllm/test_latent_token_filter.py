"""Token Filtering in the real vLLM engine (CPU platform) against the reference model.

Subject: stories260K converted with partial RoPE at a 50% cache (``make_stories_latent``), with
Token Filtering switched on at serve time by ``--hf-overrides`` (the checkpoint has no default):
half of the tokens skipped in every layer, short windows (anchor 8, threshold 16 tokens) so that
the decisions read rows across block boundaries, chunk boundaries and prefix-cache hits. The
decisions are recomputed from the paged cache each step (no per-request state), so the engine
with chunked prefill and prefix caching must give the reference model's greedy tokens and prompt
logprobs, and 16 concurrent requests their sequential results. float32, greedy.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from test_latent_helpers import (  # noqa: E402
    BLOCK_SIZE,
    Engine,
    check_16_concurrent_match_sequential,
    make_stories_latent,
    reference_greedy,
    reference_logprobs,
    reference_model,
    text_ids,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

FILTER = {"skip_fraction": 0.5, "layers": "all", "warmup": 4, "anchor_window": 8, "threshold_window": 16}
N_NEW = 24


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return make_stories_latent(tmp_path_factory.mktemp("stories"))


@pytest.fixture(scope="module")
def ref(paths):
    return reference_model(paths[1], token_filter=FILTER)


@pytest.fixture(scope="module")
def engine(paths):
    e = Engine(paths[1], hf_overrides={"latent_kv_token_filter": FILTER}, enable_chunked_prefill=True,
               max_num_batched_tokens=32, enable_prefix_caching=True, max_num_seqs=16)
    yield e
    e.close()


def test_filter_changes_the_reference_output(paths, ref):
    """The option is live: the filtered reference differs from the dense one (else equality proves nothing)."""
    dense = reference_model(paths[1])
    assert dense.token_filter is None and ref.token_filter is not None
    ids = text_ids(paths[0], 3000, 120)
    assert (reference_logprobs(ref, ids) - reference_logprobs(dense, ids)).abs().max() > 0.05
    keeps = [layer.last_keep for layer in ref.model.layers]
    assert all(k is not None and 0.3 < float(1 - k[0, 4:].mean()) < 0.7 for k in keeps)


def test_prompt_logprobs_match_reference(engine, paths, ref):
    ids = text_ids(paths[0], 3000, 120)  # 4 chunks of 32 tokens
    torch.testing.assert_close(engine.prompt_logprobs(ids), reference_logprobs(ref, ids), atol=2e-4, rtol=1e-4)


def test_greedy_matches_reference_with_chunks_and_prefix_hits(engine, paths, ref):
    src = paths[0]
    prefix = text_ids(src, 400, 4 * BLOCK_SIZE)
    prompts = [text_ids(src, 10, 5), text_ids(src, 100, 97), prefix + text_ids(src, 700, 11)]
    outs = engine.greedy(prompts, N_NEW)
    hit = engine.greedy([prefix + text_ids(src, 900, 19)], N_NEW)[0]  # shares 4 full blocks: decisions read cached rows
    assert hit.num_cached_tokens == 4 * BLOCK_SIZE
    for p, out in zip(prompts + [prefix + text_ids(src, 900, 19)], outs + [hit]):
        assert list(out.outputs[0].token_ids) == reference_greedy(ref, p, N_NEW)


def test_16_concurrent_requests_match_sequential(engine, paths, ref):
    check_16_concurrent_match_sequential(engine, paths[0], ref, checked=(3, 9, 13))


def test_rebuilt_head_features_match_reference(paths):
    """features="heads": keys and values rebuilt per KV head from the cached rows (rotated rope keys
    included) decide; prompt logprobs across chunks and greedy tokens equal the reference's."""
    heads = {**FILTER, "features": "heads"}
    ref = reference_model(paths[1], token_filter=heads)
    e = Engine(paths[1], hf_overrides={"latent_kv_token_filter": heads}, enable_chunked_prefill=True,
               max_num_batched_tokens=32)
    try:
        ids = text_ids(paths[0], 5000, 100)
        torch.testing.assert_close(e.prompt_logprobs(ids), reference_logprobs(ref, ids), atol=2e-4, rtol=1e-4)
        assert list(e.greedy([ids[:40]], N_NEW)[0].outputs[0].token_ids) == reference_greedy(ref, ids[:40], N_NEW)
    finally:
        e.close()


def test_filtering_a_kept_source_layer_is_refused(tmp_path, paths):
    """vLLM filters latent layers only: a filtered source layer fails at load, naming the latent layers."""
    from test_latent_helpers import convert_to

    mixed = convert_to(paths[0], tmp_path / "mixed", rope_mode="partial", rope_strategy="high", rope_pairs=2,
                       kv_ratio=0.5, keep_layers=[4])
    with pytest.raises(Exception, match=r"non-latent layers \[4\].*latent layers are \[0, 1, 2, 3\]"):
        Engine(mixed, hf_overrides={"latent_kv_token_filter": {"layers": "all"}})
