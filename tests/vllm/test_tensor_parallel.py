"""Tensor parallelism (TP = 2): two worker processes of the real engine vs the reference model.

Each rank holds half of the query and KV heads: its rows of ``q_proj``, ``k_b_proj``,
``v_b_proj``, its columns of ``o_proj`` (all-reduced), and the whole latent (``kv_a_proj`` is
replicated, so every rank caches the same latent rows). The cases cover what the split touches:

* ``gqa_partial``: Qwen2 (q/k/v biases) 8 query / 2 KV heads, so one KV head per rank, partial
  RoPE (per-KV-head rope slots), two Palu latent groups (one per rank), per-layer ranks and a
  kept ``source`` layer (vLLM's Attention);
* ``mha_full``: full RoPE, split latent, keys rebuilt per rank;
* ``deepseek_shaped``: shared RoPE at 512 + 64 (vLLM's own ``MLAAttention``, which shards
  ``kv_b_proj`` by query head) beside a 256 + 64 layer on our backend and a kept layer.

Workers run on the CPU platform through vLLM's multiprocessing executor (gloo all-reduce).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from test_latent_helpers import (  # noqa: E402
    calibration_ids,
    check_greedy_matches_reference,
    check_prompt_logprobs_match_reference,
    chunked_engine,
    convert_to,
    make_random_llama,
    random_prompts,
    reference_model,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

N_NEW = 12
VOCAB = 256
TP = 2

CASES = {
    "gqa_partial": (
        dict(family="qwen2", heads=8, kv_heads=2, head_dim=16, layers=3),
        dict(rope_mode="partial", rope_strategy="high", rope_pairs=2, svd="joint", ranks=[24, 32, 16],
             latent_groups=2, keep_layers=[1]),
    ),
    "mha_full": (
        dict(family="llama", heads=4, kv_heads=4, head_dim=16, layers=2),
        dict(rope_mode="full", svd="split", ranks=[64, 48]),
    ),
    "deepseek_shaped": (
        dict(family="llama", heads=4, kv_heads=2, head_dim=128, hidden=512, layers=3),
        dict(rope_mode="shared", rope_pairs=32, svd="joint", ranks=[512, 256, 512], keep_layers=[2]),
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    name = request.param
    model_args, opts = CASES[name]
    tmp = tmp_path_factory.mktemp(name)
    src = make_random_llama(tmp / "src", vocab=VOCAB, **model_args)
    if opts["rope_mode"] == "shared":
        opts = {**opts, "calibration_ids": calibration_ids(VOCAB)}
    latent = convert_to(src, tmp / "latent", **opts)
    engine = chunked_engine(latent, tensor_parallel_size=TP, distributed_executor_backend="mp")
    yield name, reference_model(latent), engine
    engine.close()


def test_each_rank_holds_half_the_heads(case):
    name, _, engine = case
    ranks = engine.llm.llm_engine.collective_rpc("apply_model", args=(_local_heads,))
    assert len(ranks) == TP
    full = CASES[name][0]["heads"]
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
