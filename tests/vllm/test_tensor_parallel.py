"""Tensor parallelism (TP = 2): two worker processes of the real engine vs the reference model.

Each rank holds half of the query and KV heads: its rows of ``q_proj``, ``k_b_proj``,
``v_b_proj``, its columns of ``o_proj`` (all-reduced), and the whole latent (``kv_a_proj`` is
replicated, so every rank caches the same latent rows). The cases cover what the split touches:

* ``gqa_partial``: Qwen2 (q/k/v biases) 8 query / 2 KV heads, so one KV head per rank, partial
  RoPE (per-KV-head rope slots), two Palu latent groups (one per rank), per-layer ranks and a
  kept ``source`` layer (vLLM's Attention);
* ``mha_full``: full RoPE, split latent, keys rebuilt per rank;
* ``deepseek_shaped``: shared RoPE at 512 + 64 (vLLM's own ``MLAAttention``, which shards
  ``kv_b_proj`` by query head) beside a 256 + 64 layer on our backend and a kept layer;
* ``gqa_partial_int4``: the first case with the INT4 latent cache (against the reference model
  caching the same INT4 rows).

Workers run on the CPU platform through vLLM's multiprocessing executor (gloo all-reduce).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from test_latent_helpers import (  # noqa: E402
    RANDOM_CASES,
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
TP = 2


INT4_GROUP = 8  # divides gqa_partial's latent widths (24, 32, 16)


@pytest.fixture(scope="module", params=[("gqa_partial", None), ("mha_full", None), ("deepseek_shaped", None),
                                        ("gqa_partial", INT4_GROUP)],
                ids=["gqa_partial", "mha_full", "deepseek_shaped", "gqa_partial_int4"])
def case(request, tmp_path_factory):
    name, int4_group = request.param
    latent = convert_random_case(tmp_path_factory.mktemp(name), name)
    overrides = {"latent_kv_cache_dtype": "int4", "latent_kv_int4_group_size": int4_group} if int4_group else None
    engine = chunked_engine(latent, tensor_parallel_size=TP, distributed_executor_backend="mp", hf_overrides=overrides)
    yield name, reference_model(latent, int4_group), engine
    engine.close()


def test_each_rank_holds_half_the_heads(case):
    name, _, engine = case
    ranks = engine.llm.llm_engine.collective_rpc("apply_model", args=(_local_heads,))
    assert len(ranks) == TP
    full = RANDOM_CASES[name][0]["heads"]
    for per_layer in ranks:
        assert per_layer and all(heads == full // TP for heads in per_layer.values()), per_layer


def _local_heads(model) -> dict[str, int]:
    """Query heads per attention layer on this rank."""
    return {name: m.num_heads for name, m in model.named_modules()
            if type(m).__name__ in ("LatentAttention", "MLAAttention", "Attention")}


def test_greedy_matches_reference(case):
    _, ref, engine = case
    check_greedy_matches_reference(engine, ref, random_prompts(VOCAB), N_NEW, prefix_cached=True)


def test_prompt_logprobs_match_reference(case):
    _, ref, engine = case
    check_prompt_logprobs_match_reference(engine, ref, random_prompts(VOCAB)[-1])
