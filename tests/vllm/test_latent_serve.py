"""``vllm serve ./converted`` (plain command, plugin found through its entry point) on 127.0.0.1:
/v1/completions greedy text == the reference model's generate."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from test_latent_helpers import (  # noqa: E402
    KV_BYTES,
    http_json,
    make_stories_latent,
    reference_greedy,
    reference_model,
    vllm_serve,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

N_NEW = 24
PROMPTS = ["Once upon a time", "Lily and Tom went to the park", "The little dog was"]
NAME = "stories260k-latent"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return make_stories_latent(tmp_path_factory.mktemp("serve"))[1]


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with vllm_serve(converted, log_path, served_name=NAME, max_model_len=256, kv_cache_bytes=KV_BYTES,
                    ready_timeout=300) as (base, _):
        yield base, log_path


def test_completions_greedy_matches_reference(server, converted):
    from transformers import AutoTokenizer

    base, log_path = server
    tok = AutoTokenizer.from_pretrained(converted)
    ref = reference_model(converted)
    resp = http_json(base + "/v1/completions", {"model": NAME, "prompt": PROMPTS, "max_tokens": N_NEW, "temperature": 0,
                                                "ignore_eos": True, "return_token_ids": True}, timeout=120)
    choices = sorted(resp["choices"], key=lambda c: c["index"])
    for prompt, choice in zip(PROMPTS, choices):
        ids = tok(prompt).input_ids
        want = reference_greedy(ref, ids, N_NEW)
        assert choice["token_ids"] == want, prompt
        # the server detokenizes incrementally: its text keeps the leading space decode() drops
        assert choice["text"] == tok.decode(ids + want)[len(tok.decode(ids)):], prompt
    assert "LatentKVForCausalLM" in log_path.read_text()  # the plugin's architecture was resolved
