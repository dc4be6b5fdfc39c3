"""The real SmolLM2-135M-Instruct, converted with the default recipe, behind ``vllm serve``:
chat completions equal the reference model's greedy answers, and the engine's KV capacity is the
bytes-per-token arithmetic of the checkpoint."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("vllm")

from test_latent_helpers import convert_to, http_json, reference_model, vllm_serve  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

NAME = "smollm2-latent"
QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow."]
MAX_TOKENS = 24
BLOCK = 16
KV_BUDGET = 64 << 20  # bytes: room for ~1,450 fp32 latent tokens of 30 layers


@pytest.fixture(scope="module")
def converted(smollm2_hf_dir, tmp_path_factory):
    # the default recipe (full RoPE, root-covariance SVD, 50% cache) on fewer calibration
    # sequences: this checks the engine against the reference, not the conversion's quality
    return convert_to(smollm2_hf_dir, tmp_path_factory.mktemp("smollm2") / "latent", method="activation",
                      calibration_samples=8)


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with vllm_serve(converted, log_path, served_name=NAME, max_model_len=512, kv_cache_bytes=KV_BUDGET,
                    ready_timeout=600, extra_args=("--block-size", str(BLOCK))) as (base, _):
        yield base


def reference_chat(ref, tok, question: str) -> str:
    """The reference model's greedy answer through its latent cache, stopping at the chat's end token."""
    import torch

    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = ref.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_chat_completions_equal_the_reference(server, converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    ref = reference_model(converted)
    for question in QUESTIONS:
        resp = http_json(server + "/v1/chat/completions", {
            "model": NAME, "messages": [{"role": "user", "content": question}], "max_tokens": MAX_TOKENS,
            "temperature": 0}, timeout=300)
        answer = resp["choices"][0]["message"]["content"].strip()
        assert answer == reference_chat(ref, tok, question), question
        if "France" in question:
            assert "Paris" in answer, answer


def test_kv_capacity_is_the_bytes_per_token_arithmetic(server, converted):
    import json

    import urllib.request

    from latentkv import format as fmt

    spec, dims = fmt.load_spec(json.loads((converted / "config.json").read_text()))
    report = fmt.kv_bytes_report(spec, dims, element_bytes=4)  # float32 engine
    with urllib.request.urlopen(server + "/metrics", timeout=30) as r:
        metrics = r.read().decode()
    info = re.search(r"^vllm:cache_config_info\{([^}]*)\}", metrics, re.M)
    assert info, "no vllm:cache_config_info in /metrics"
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info.group(1)))
    assert int(labels["block_size"]) == BLOCK
    expected_blocks = KV_BUDGET // (BLOCK * report["bytes_per_token"])
    assert int(labels["num_gpu_blocks"]) == expected_blocks
    # and the same budget holds twice the source's tokens (a 50% cache)
    assert report["bytes_per_token"] * 2 == report["source_bytes_per_token"]
