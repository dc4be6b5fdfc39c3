"""The latent model in the real vLLM 0.32 engine (CPU platform) against the reference model.

Subject: stories260K (real pretrained, GQA 8q/4kv, head_dim 8) converted with partial RoPE
(2 pairs per KV head, "high"), joint SVD, 50% KV ratio: W = 16 latent + 4 x 4 rope values per
token and layer. Oracle: ``latentkv.modeling`` via ``AutoModelForCausalLM`` and its own
``generate`` (latent cache, absorbed decode). float32 everywhere, greedy.

Engine start-ups: one fp32 engine with chunked prefill (32-token steps) and prefix caching
on, one INT4 engine, one engine of the source Llama (KV capacity baseline).
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
    check_16_concurrent_match_sequential,
    latent_spec,
    make_stories_latent,
    reference_greedy,
    reference_logprobs,
    reference_model,
    text_ids,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

N_NEW = 24
CHUNK = 32  # max_num_batched_tokens of the fp32 engine: long prompts take several steps
INT4_GROUP = 16  # the stories260K latent is 16 wide; the default group of 32 does not divide it
INT4_OVERRIDES = {"latent_kv_cache_dtype": "int4", "latent_kv_int4_group_size": INT4_GROUP}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return make_stories_latent(tmp_path_factory.mktemp("stories"))


@pytest.fixture(scope="module")
def ref(paths):
    return reference_model(paths[1])


@pytest.fixture(scope="module")
def prompts(paths) -> dict[str, list[int]]:
    src = paths[0]
    prefix = text_ids(src, 400, 4 * BLOCK_SIZE)
    return {
        "one": text_ids(src, 0, 1),
        "short": text_ids(src, 10, 5),
        "odd": text_ids(src, 50, 23),
        "chunks": text_ids(src, 100, 97),  # 4 prefill steps of CHUNK tokens
        "prefix_a": prefix + text_ids(src, 700, 11),
        "prefix_b": prefix + text_ids(src, 900, 19),
    }


@pytest.fixture(scope="module")
def ref_greedy(ref, prompts):
    return {name: reference_greedy(ref, ids, N_NEW) for name, ids in prompts.items()}


@pytest.fixture(scope="module")
def engine(paths):
    e = Engine(paths[1], enable_chunked_prefill=True, max_num_batched_tokens=CHUNK, enable_prefix_caching=True, max_num_seqs=16)
    yield e
    e.close()


@pytest.fixture(scope="module")
def engine_int4(paths):
    e = Engine(paths[1], hf_overrides=INT4_OVERRIDES, max_num_batched_tokens=256)
    yield e
    e.close()


def test_cache_holds_only_latent_and_rope_keys(engine, paths):
    spec, dims = latent_spec(paths[1])
    caches = engine.layer_caches()
    assert len(caches) == dims.num_hidden_layers
    for name, (impl, dtype, shape) in caches.items():
        assert impl == "LatentKVAttentionImpl", name
        assert dtype == "torch.float32"
        # [blocks, 1, block_size, W + R_H * R_D] with W + R = the format's values per token
        assert shape[1:] == (1, BLOCK_SIZE, fmt.cache_values_per_token(spec.layers[0], spec, dims)) == (1, BLOCK_SIZE, 32)


def test_greedy_matches_reference_with_chunked_prefill_and_prefix_caching(engine, prompts, ref_greedy):
    first = ["one", "short", "odd", "chunks", "prefix_a"]
    outs = dict(zip(first, engine.greedy([prompts[n] for n in first], N_NEW)))
    # later batches hit the prefix cache: prefix_b shares 4 full blocks, prefix_a is repeated
    outs["prefix_b"] = engine.greedy([prompts["prefix_b"]], N_NEW)[0]
    again = engine.greedy([prompts["prefix_a"]], N_NEW)[0]
    assert outs["prefix_b"].num_cached_tokens == 4 * BLOCK_SIZE
    assert again.num_cached_tokens >= 4 * BLOCK_SIZE
    assert max(len(p) for p in prompts.values()) > 3 * CHUNK
    for name, out in outs.items():
        assert list(out.outputs[0].token_ids) == ref_greedy[name], name
    assert list(again.outputs[0].token_ids) == ref_greedy["prefix_a"]


def test_text_matches_reference_generate(engine, paths, ref):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths[1])
    for prompt in ["Once upon a time", "Lily and Tom went to the park", "The little dog"]:
        ids = tok(prompt).input_ids
        out = engine.greedy([ids], N_NEW)[0]
        assert out.outputs[0].text == tok.decode(reference_greedy(ref, ids, N_NEW)), prompt


def test_16_concurrent_mixed_requests_match_sequential(engine, paths, ref):
    check_16_concurrent_match_sequential(engine, paths[0], ref)


def test_prompt_logprobs_match_reference(engine, paths, ref):
    ids = text_ids(paths[0], 3000, 120)
    got, want = engine.prompt_logprobs(ids), reference_logprobs(ref, ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


# --- INT4 latent cache ----------------------------------------------------------------------------

def test_int4_cache_is_packed(engine_int4):
    from latentkv.int4 import int4_row_bytes

    row = int4_row_bytes(16, 16, INT4_GROUP)  # 8 B nibbles + 1 fp16 scale + 16 fp16 rope keys = 42 B
    for name, (impl, dtype, shape) in engine_int4.layer_caches().items():
        assert (impl, dtype, shape[1:]) == ("LatentKVAttentionImpl", "torch.uint8", (1, BLOCK_SIZE, row)), name


def test_int4_engine_equals_reference_with_int4_cache(engine_int4, paths, prompts):
    """Correctness of the INT4 path: the engine == the reference model with ``cache_dtype: int4``
    (latents quantized by ``latentkv.int4``, rope keys rounded to fp16)."""
    ids = text_ids(paths[0], 3000, 120)
    ref = reference_model(paths[1], int4_group=INT4_GROUP)
    want = reference_logprobs(ref, ids)
    greedy = {n: reference_greedy(ref, p, N_NEW) for n, p in prompts.items()}
    diff = (engine_int4.prompt_logprobs(ids) - want).abs()
    # a latent value on a rounding boundary of the quantizer may land on the other level
    assert diff.max() < 1e-2 and diff.mean() < 1e-4, (diff.max(), diff.mean())
    outs = engine_int4.greedy(list(prompts.values()), N_NEW)
    same = sum(a == b for n, o in zip(prompts, outs) for a, b in zip(o.outputs[0].token_ids, greedy[n]))
    assert same >= 0.9 * N_NEW * len(prompts)  # rounding ties of the quantizer may flip a token


def test_int4_quality(engine_int4, paths, ref, prompts, ref_greedy):
    """Quality of INT4 vs the fp32 cache (stories260K: 16-wide latent, one fp16 scale per 16 values).

    Measure: perplexity of 3 held-out 120-token TinyStories windows, teacher forced through the
    engine (prompt logprobs; every score reads the INT4 cache) within +15% of the fp32
    reference's (measured: 46.4 vs 41.2, +13%). Greedy token agreement with the fp32 reference
    over the first 8 tokens is printed, not bounded: this 260K-parameter model's logits are so
    flat that 4-bit latents flip argmaxes early (measured 23%).
    """
    names = list(prompts)
    outs = engine_int4.greedy([prompts[n] for n in names], N_NEW)
    agree = sum(
        a == b for n, o in zip(names, outs) for a, b in zip(list(o.outputs[0].token_ids)[:8], ref_greedy[n][:8])
    ) / (8 * len(names))
    nll_int4, nll_ref = [], []
    for start in (3000, 5000, 7000):
        ids = text_ids(paths[0], start, 120)
        nll_int4.append(-engine_int4.prompt_logprobs(ids).mean())
        nll_ref.append(-reference_logprobs(ref, ids).mean())
    ppl_int4, ppl_ref = torch.stack(nll_int4).mean().exp().item(), torch.stack(nll_ref).mean().exp().item()
    print(f"INT4: greedy agreement {agree:.0%} (first 8 tokens), perplexity {ppl_int4:.3f} vs fp32 {ppl_ref:.3f}")
    assert ppl_int4 <= 1.15 * ppl_ref


# --- KV capacity ----------------------------------------------------------------------------------

def test_kv_capacity_follows_bytes_per_token(engine, engine_int4, paths):
    from vllm_latentkv.attention.cache import cache_bytes_per_token

    src, latent = paths
    spec, dims = latent_spec(latent)
    report = fmt.kv_bytes_report(spec, dims, element_bytes=4)
    int4_spec = spec.model_copy(update={"cache_dtype": "int4", "int4_group_size": INT4_GROUP})
    expected = {
        "converted": report["bytes_per_token"],
        "int4": cache_bytes_per_token(int4_spec, dims, torch.float32),
    }
    assert expected["converted"] == cache_bytes_per_token(spec, dims, torch.float32) == 5 * 32 * 4
    assert expected["int4"] == 5 * 42
    base = Engine(src, max_num_batched_tokens=256)
    try:
        got_source = base.num_blocks * BLOCK_SIZE
    finally:
        base.close()
    got = {"converted": engine.num_blocks * BLOCK_SIZE, "int4": engine_int4.num_blocks * BLOCK_SIZE}
    # capacity = floor(budget / page bytes) whole blocks of BLOCK_SIZE tokens
    assert got_source == KV_BYTES // (BLOCK_SIZE * report["source_bytes_per_token"]) * BLOCK_SIZE
    for k, bpt in expected.items():
        assert got[k] == KV_BYTES // (BLOCK_SIZE * bpt) * BLOCK_SIZE, k
    assert abs(got["converted"] / got_source - 2) < 0.01  # 50% KV ratio (up to whole blocks)
