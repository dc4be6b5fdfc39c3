"""Random Llama-family models converted in each RoPE mode, in the engine vs the reference model.

* GQA (Qwen2 with q/k/v biases, 8 query / 2 KV heads): partial RoPE, per-layer ranks, two Palu
  latent groups, and layer 1 kept as a ``source`` layer (vLLM's Attention beside latent layers);
* MHA (Llama, 4/4 heads): full RoPE (cache = latent only, keys rebuilt), split latent,
  per-layer ranks;
* GQA (Llama, 4/2 heads): shared RoPE (one rope head), calibrated on random token ids.

Each: greedy continuations and teacher-forced prompt logprobs through the engine == reference.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from latentkv import format as fmt  # noqa: E402
from test_latent_helpers import (  # noqa: E402
    RANDOM_VOCAB,
    check_greedy_matches_reference,
    check_prompt_logprobs_match_reference,
    chunked_engine,
    convert_random_case,
    latent_spec,
    random_prompts,
    reference_model,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

N_NEW = 16
VOCAB = RANDOM_VOCAB


@pytest.fixture(scope="module", params=["gqa_partial", "mha_full", "gqa_shared"])
def case(request, tmp_path_factory):
    name = request.param
    latent = convert_random_case(tmp_path_factory.mktemp(name), name)
    engine = chunked_engine(latent)
    yield name, latent, reference_model(latent), engine
    engine.close()


def test_checkpoint_is_what_the_case_says(case):
    name, latent, _, engine = case
    spec, dims = latent_spec(latent)
    kinds = [layer.kind for layer in spec.layers]
    widths = [layer.latent.width for layer in spec.layers if isinstance(layer, fmt.LatentLayer)]
    assert len(set(widths)) == len(widths), f"per-layer ranks expected, got {widths}"
    caches = engine.layer_caches()
    latent_caches = [shape[-1] for impl, _, shape in caches.values() if impl == "LatentKVAttentionImpl"]
    assert latent_caches == [fmt.cache_values_per_token(layer, spec, dims) for layer in spec.layers if layer.kind == "latent"]
    if name == "gqa_partial":
        assert kinds == ["latent", "source", "latent"] and spec.attention_bias
        assert spec.layers[0].latent.groups == 2
    if name == "mha_full":
        assert all(layer.rope_mode == "full" and not layer.latent.joint for layer in spec.layers)
        assert latent_caches == widths  # latent only, no rope keys
    if name == "gqa_shared":
        assert all(layer.rope_mode == "shared" and layer.num_rope_heads == 1 for layer in spec.layers)


def test_greedy_matches_reference(case):
    _, _, ref, engine = case
    check_greedy_matches_reference(engine, ref, random_prompts(VOCAB), N_NEW)


def test_prompt_logprobs_match_reference(case):
    _, _, ref, engine = case
    check_prompt_logprobs_match_reference(engine, ref, random_prompts(VOCAB)[-1])
