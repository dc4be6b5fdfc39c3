"""``vllm serve ./converted`` (plain command, plugin found through its entry point) on 127.0.0.1:
/v1/completions greedy text == the reference model's generate."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm")

from test_latent_helpers import convert_to, make_stories_source, reference_greedy, reference_model  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

N_NEW = 24
PROMPTS = ["Once upon a time", "Lily and Tom went to the park", "The little dog was"]
NAME = "stories260k-latent"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    src = make_stories_source(tmp / "src")
    return convert_to(src, tmp / "latent", rope_mode="partial", rope_strategy="high", rope_pairs=2, svd="joint", kv_ratio=0.5)


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve-log") / "serve.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(converted), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", NAME, "--dtype", "float32", "--max-model-len", "256",
           "--kv-cache-memory-bytes", str(4 << 20)]
    env = {**os.environ, "LATENTKV_CPU_PLATFORM": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(base + "/health", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve not healthy in 300 s:\n{log_path.read_text()[-4000:]}")
                time.sleep(1)
        yield base, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def test_completions_greedy_matches_reference(server, converted):
    from transformers import AutoTokenizer

    base, log_path = server
    tok = AutoTokenizer.from_pretrained(converted)
    ref = reference_model(converted)
    resp = _post(base + "/v1/completions", {"model": NAME, "prompt": PROMPTS, "max_tokens": N_NEW, "temperature": 0,
                                            "ignore_eos": True, "return_token_ids": True})
    choices = sorted(resp["choices"], key=lambda c: c["index"])
    for prompt, choice in zip(PROMPTS, choices):
        ids = tok(prompt).input_ids
        want = reference_greedy(ref, ids, N_NEW)
        assert choice["token_ids"] == want, prompt
        # the server detokenizes incrementally: its text keeps the leading space decode() drops
        assert choice["text"] == tok.decode(ids + want)[len(tok.decode(ids)):], prompt
    assert "LatentKVForCausalLM" in log_path.read_text()  # the plugin's architecture was resolved
