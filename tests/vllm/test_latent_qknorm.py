"""q/k-norm sources (Qwen3: per-head q/k RMSNorm) in the engine vs the reference model.

Subject: a random GQA Qwen3 (4 query / 2 KV heads, head_dim 16, norm gains made non-uniform),
converted three ways; one engine each (chunked prefill in 48-token steps, prefix caching):

* full RoPE, split latent, layer 1 kept as a ``source`` layer ([d_h] norms in vLLM's Attention):
  rebuilt keys normed per KV head with the [G, d_h] gains, then rotated;
* partial RoPE with NoPE dims (2 pairs per KV head, d_n = 12), layer 1 kept: the cache row is
  ``[latent | rope keys | G key scales]``, the NoPE score scaled by the cached key scale;
* partial RoPE with every pair kept (d_n = 0): the rope key is the whole key, normed before RoPE;
* TransKV (``reduced_head`` layers, [d_h] norms before RoPE and the reduction), layer 1 kept.

Each: cache row width == the format's values per token, greedy continuations and teacher-forced
prompt logprobs == reference (float32). One more engine: the partial-with-NoPE checkpoint with
the INT4 cache (key scales stored in fp16 after the rope keys) == the reference whose cache
stores what the INT4 cache stores.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from latentkv import format as fmt  # noqa: E402
from test_latent_helpers import (  # noqa: E402
    Engine,
    calibration_ids,
    check_greedy_matches_reference,
    check_prompt_logprobs_match_reference,
    chunked_engine,
    convert_to,
    latent_spec,
    make_random_llama,
    random_prompts,
    reference_greedy,
    reference_logprobs,
    reference_model,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

N_NEW = 16
VOCAB = 256
SOURCE = dict(family="qwen3", heads=4, kv_heads=2, head_dim=16, layers=3)
CASES = {
    "full": dict(rope_mode="full", svd="split", ranks=[48, 40, 56], keep_layers=[1]),
    "partial_nope": dict(rope_mode="partial", rope_strategy="high", rope_pairs=2, svd="joint", ranks=[24, 32, 20],
                         keep_layers=[1]),
    "partial_all_pairs": dict(rope_mode="partial", rope_strategy="high", rope_pairs=8, svd="joint", ranks=[24, 32, 20]),
    "transkv": dict(method="transkv", kv_ratio=0.5, keep_layers=[1],
                    calibration_ids=calibration_ids(VOCAB)),
}
INT4_GROUP = 4  # divides the partial_nope latent widths 24 and 20


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_random_llama(tmp_path_factory.mktemp("qwen3") / "src", vocab=VOCAB, **SOURCE)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, source, tmp_path_factory):
    name = request.param
    latent = convert_to(source, tmp_path_factory.mktemp(name) / "latent", **dict(CASES[name]))
    engine = chunked_engine(latent)
    yield name, latent, reference_model(latent), engine
    engine.close()


def test_cache_rows_hold_what_the_format_says(case):
    name, latent, _, engine = case
    spec, dims = latent_spec(latent)
    assert spec.qk_norm and spec.source.model_type == "qwen3"
    caches = engine.layer_caches()
    rows = [shape[-1] for impl, _, shape in caches.values() if impl == "LatentKVAttentionImpl"]
    latent_layers = [layer for layer in spec.layers if layer.kind == "latent"]
    assert rows == [fmt.cache_values_per_token(layer, spec, dims) for layer in latent_layers]
    G = dims.num_key_value_heads
    if name == "full":
        assert rows == [layer.latent.width for layer in latent_layers]
    elif name == "partial_nope":
        assert all(fmt.caches_key_scale(layer, spec) for layer in latent_layers)
        assert rows == [layer.latent.width + G * layer.rope_head_dim + G for layer in latent_layers]
    elif name == "partial_all_pairs":
        assert latent_layers and all(layer.qk_nope_head_dim == 0 and not fmt.caches_key_scale(layer, spec)
                                     for layer in latent_layers)
    if name == "transkv":
        assert [layer.kind for layer in spec.layers] == ["reduced_head", "source", "reduced_head"]
        assert rows == [] and len(caches) == 3
    elif name != "partial_all_pairs":
        assert [layer.kind for layer in spec.layers] == ["latent", "source", "latent"]


def test_greedy_matches_reference(case):
    _, _, ref, engine = case
    check_greedy_matches_reference(engine, ref, random_prompts(VOCAB), N_NEW, prefix_cached=True)


def test_prompt_logprobs_match_reference(case):
    _, _, ref, engine = case
    check_prompt_logprobs_match_reference(engine, ref, random_prompts(VOCAB)[-1])


# --- INT4 cache with key scales --------------------------------------------------------------------

def test_int4_cache_with_key_scales_equals_int4_reference(source, tmp_path_factory):
    from latentkv.int4 import int4_row_bytes

    latent = convert_to(source, tmp_path_factory.mktemp("int4") / "latent", **CASES["partial_nope"])
    spec, dims = latent_spec(latent)
    G = dims.num_key_value_heads
    ref = reference_model(latent, int4_group=INT4_GROUP)
    ids = random_prompts(VOCAB)[-1]
    want = reference_logprobs(ref, ids)
    greedy = [reference_greedy(ref, p, N_NEW) for p in random_prompts(VOCAB)]
    engine = Engine(latent, hf_overrides={"latent_kv_cache_dtype": "int4", "latent_kv_int4_group_size": INT4_GROUP},
                    max_num_batched_tokens=48, enable_chunked_prefill=True, skip_tokenizer_init=True)
    try:
        rows = [shape[-1] for impl, dtype, shape in engine.layer_caches().values() if impl == "LatentKVAttentionImpl"]
        latent_layers = [layer for layer in spec.layers if layer.kind == "latent"]
        # packed latent + fp16 (rope keys | G key scales)
        assert rows == [int4_row_bytes(layer.latent.width, G * layer.rope_head_dim + G, INT4_GROUP)
                        for layer in latent_layers]
        diff = (engine.prompt_logprobs(ids) - want).abs()
        outs = engine.greedy(random_prompts(VOCAB), N_NEW)
    finally:
        engine.close()
    # a latent value on a rounding boundary of the quantizer may land on the other level
    assert diff.max() < 1e-2 and diff.mean() < 1e-3, (diff.max(), diff.mean())
    same = sum(a == b for o, g in zip(outs, greedy) for a, b in zip(o.outputs[0].token_ids, g))
    assert same >= 0.9 * N_NEW * len(greedy)
