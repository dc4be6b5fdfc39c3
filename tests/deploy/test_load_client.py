"""examples/load_test.py: statistics on synthetic timings, and a real run against
`vllm serve` of the shared test model on the CPU reference platform (LATENTKV_CPU_PLATFORM=1).
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / ".." / "shared" / "data" / "models" / "wiki-mha-6M"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


lt = _load("load_test")
R = lt.RequestResult


# ---------------------------------------------------------------- statistics (no server) ----
def test_percentile_linear_interpolation():
    xs = [float(i) for i in range(1, 11)]  # 1..10, shuffled order must not matter
    shuffled = xs[5:] + xs[:5]
    assert lt.percentile(shuffled, 0) == 1.0
    assert lt.percentile(shuffled, 100) == 10.0
    assert lt.percentile(shuffled, 50) == pytest.approx(5.5)  # rank 4.5
    assert lt.percentile(shuffled, 90) == pytest.approx(9.1)  # rank 8.1
    assert lt.percentile(shuffled, 99) == pytest.approx(9.91)  # rank 8.91
    assert lt.percentile([3.0], 99) == 3.0
    assert math.isnan(lt.percentile([], 50))
    with pytest.raises(ValueError):
        lt.percentile(xs, 101)


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    xs = rng.exponential(size=37).tolist()
    for q in (1, 50, 90, 99, 99.9):
        assert lt.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_summarize_synthetic():
    results = [
        R(ok=True, latency_s=1.0, ttft_s=0.1, completion_tokens=10, prompt_tokens=5),
        R(ok=True, latency_s=2.0, ttft_s=0.2, completion_tokens=19, prompt_tokens=5),
        R(ok=True, latency_s=3.0, ttft_s=0.3, completion_tokens=28, prompt_tokens=5),
        R(ok=False, latency_s=0.5, error="HTTPError: 500"),
    ]
    s = lt.summarize(results, wall_time_s=4.0)
    assert (s["requests"], s["succeeded"], s["failed"]) == (4, 3, 1)
    assert s["completion_tokens"] == 57 and s["prompt_tokens"] == 15
    assert s["throughput_tok_s"] == pytest.approx(57 / 4.0)  # failed requests excluded
    assert s["requests_per_s"] == pytest.approx(3 / 4.0)
    assert s["latency_s_p50"] == pytest.approx(2.0)
    assert s["latency_s_p90"] == pytest.approx(2.8)
    assert s["latency_s_p99"] == pytest.approx(2.98)
    assert s["latency_s_mean"] == pytest.approx(2.0)
    assert s["ttft_s_p50"] == pytest.approx(0.2)
    # time per output token: (latency - ttft) / (tokens - 1) = 0.1 for every request
    assert s["tpot_s_p50"] == pytest.approx(0.1) and s["tpot_s_p99"] == pytest.approx(0.1)
    assert s["errors"] == ["HTTPError: 500"]
    table = lt.format_table(s)
    assert "p50 (ms)" in table and "2000.0" in table and "14.2 tok/s" in table


def test_summarize_non_streaming_has_no_ttft():
    s = lt.summarize([R(ok=True, latency_s=1.0, completion_tokens=8)], wall_time_s=1.0)
    assert math.isnan(s["ttft_s_p50"]) and s["throughput_tok_s"] == pytest.approx(8.0)
    assert "-" in lt.format_table(s)


@pytest.mark.parametrize("url", ["ftp://x", "127.0.0.1:8000", "http://"])
def test_rejects_non_http_base_url(url):
    with pytest.raises(ValueError):
        lt.run_load_test(url, model="m", n_requests=1)


def test_base_url_accepts_v1_suffix():
    assert lt._normalize_base_url("http://h:1/v1/") == "http://h:1"
    assert lt._normalize_base_url("https://h/prefix") == "https://h/prefix"


# ------------------------------------------------------------- real server (CPU platform) ----
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    pytest.importorskip("vllm")
    if not (MODEL_DIR / "config.json").exists():
        pytest.skip(f"test model not found at {MODEL_DIR}")
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    env = {
        **os.environ,
        "LATENTKV_CPU_PLATFORM": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(MODEL_DIR.resolve()),
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", "wiki-mha-6M", "--max-model-len", "512",
        # float32: on CPUs with AMX, vLLM 0.32 routes bf16 linears to sgl-kernel's
        # _C::convert_weight_packed, which the CPU reference platform does not define (yet).
        "--dtype", os.environ.get("LATENTKV_TEST_SERVE_DTYPE", "float32"),
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + float(os.environ.get("LATENTKV_SERVE_START_TIMEOUT", "300"))
    try:
        while not _healthy(base + "/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                why = "exited" if proc.poll() is not None else "not healthy in time"
                pytest.fail(f"vllm serve {why}; log tail:\n{tail}")
            time.sleep(1.0)
        yield base
    finally:
        # Stop the server we started (its own process group: API server + engine core).
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.mark.vllm
@pytest.mark.slow
def test_load_test_against_real_server(vllm_server):
    result = lt.run_load_test(
        vllm_server, n_requests=8, concurrency=4, max_tokens=16,
        request_timeout_s=120, max_duration_s=300,
    )
    s = result.summary
    assert s["failed"] == 0, s["errors"]
    assert s["succeeded"] == 8
    assert all(r.completion_tokens > 0 for r in result.results)
    assert 0 < s["latency_s_p50"] <= s["latency_s_p90"] <= s["latency_s_p99"]
    assert 0 < s["ttft_s_p50"] <= s["ttft_s_p90"] <= s["ttft_s_p99"]
    assert all(r.ttft_s <= r.latency_s for r in result.results)
    assert s["throughput_tok_s"] > 0
    print("\n" + lt.format_table(s))


@pytest.mark.vllm
@pytest.mark.slow
def test_load_test_cli_non_streaming(vllm_server):
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "load_test.py"), "--base-url", vllm_server + "/v1",
         "-n", "4", "-c", "2", "--max-tokens", "8", "--no-stream"],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "requests 4/4 ok" in proc.stdout and "latency" in proc.stdout
