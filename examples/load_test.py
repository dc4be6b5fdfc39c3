#!/usr/bin/env python3
"""Concurrent load test for a vLLM (OpenAI-compatible) server, e.g. a latentkv deployment.

Sends N completion requests, at most C at a time, to ONE base URL and reports latency
percentiles (p50/p90/p99), time to first token (streaming) and throughput:

    python examples/load_test.py --base-url http://127.0.0.1:8000 -n 64 -c 8 --max-tokens 128

Bounded by construction: a fixed request count, a per-request timeout and a wall-clock limit
after which no new request starts. Only the given base URL is contacted (redirects are refused).
Standard library only, so it runs in any pod with Python 3.10+.

Importable:

    from examples.load_test import run_load_test, format_table
    result = run_load_test("http://127.0.0.1:8000", n_requests=8, concurrency=4)
    print(format_table(result.summary))

Token counts come from the server's `usage` (requested with stream_options.include_usage when
streaming); if a server omits it, streamed text chunks are counted instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_PROMPT = "The history of the city begins"


# --------------------------------------------------------------------------------------------
# Pure statistics (unit-tested on synthetic timings)
# --------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default "linear" method): rank = q/100 * (n - 1)."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    rank = q / 100 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


@dataclass
class RequestResult:
    ok: bool
    latency_s: float  # request sent -> last byte
    ttft_s: float | None = None  # request sent -> first generated text (streaming only)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


@dataclass
class LoadTestResult:
    results: list[RequestResult]
    wall_time_s: float
    summary: dict = field(default_factory=dict)


def summarize(results: list[RequestResult], wall_time_s: float) -> dict:
    """Aggregate per-request results measured over `wall_time_s` seconds of wall clock.

    throughput_tok_s = sum(completion tokens of successful requests) / wall time
    requests_per_s   = successful requests / wall time
    """
    ok = [r for r in results if r.ok]
    lat = [r.latency_s for r in ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    out_tokens = sum(r.completion_tokens for r in ok)
    # Decode speed of one request: tokens after the first over the time after the first token.
    tpot = [
        (r.latency_s - r.ttft_s) / (r.completion_tokens - 1)
        for r in ok
        if r.ttft_s is not None and r.completion_tokens > 1
    ]
    wall = max(wall_time_s, 1e-9)
    summary = {
        "requests": len(results),
        "succeeded": len(ok),
        "failed": len(results) - len(ok),
        "wall_time_s": wall_time_s,
        "completion_tokens": out_tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "throughput_tok_s": out_tokens / wall,
        "requests_per_s": len(ok) / wall,
    }
    for name, xs in (("latency_s", lat), ("ttft_s", ttft), ("tpot_s", tpot)):
        for q in (50, 90, 99):
            summary[f"{name}_p{q}"] = percentile(xs, q)
        summary[f"{name}_mean"] = sum(xs) / len(xs) if xs else math.nan
    errors = sorted({r.error for r in results if r.error})
    summary["errors"] = errors[:5]
    return summary


def format_table(summary: dict) -> str:
    """Plain-text table of a summary() dict."""

    def ms(x: float) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1000:9.1f}"

    rows = [
        ("metric", "p50 (ms)", "p90 (ms)", "p99 (ms)", "mean (ms)"),
        *(
            (label, *(ms(summary[f"{key}_p{q}"]) for q in (50, 90, 99)), ms(summary[f"{key}_mean"]))
            for label, key in (
                ("latency", "latency_s"),
                ("time to first token", "ttft_s"),
                ("time per output token", "tpot_s"),
            )
        ),
    ]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    line = "+".join("-" * (w + 2) for w in widths)
    text = [line]
    for i, r in enumerate(rows):
        text.append("|".join(f" {str(c).rjust(w) if j else str(c).ljust(w)} " for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            text.append(line)
    text.append(line)
    text.append(
        f"requests {summary['succeeded']}/{summary['requests']} ok, {summary['failed']} failed | "
        f"wall {summary['wall_time_s']:.2f} s | output tokens {summary['completion_tokens']} | "
        f"throughput {summary['throughput_tok_s']:.1f} tok/s, {summary['requests_per_s']:.2f} req/s"
    )
    for e in summary.get("errors", []):
        text.append(f"error: {e}")
    return "\n".join(text)


# --------------------------------------------------------------------------------------------
# HTTP (stdlib; refuses redirects so only the given base URL is ever contacted)
# --------------------------------------------------------------------------------------------
class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401
        raise urllib.error.HTTPError(req.full_url, code, f"refusing redirect to {newurl}", headers, fp)


_OPENER = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))


def _normalize_base_url(base_url: str) -> str:
    parsed = urllib.parse.urlparse(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"base URL must be http(s)://host[:port], got {base_url!r}")
    path = parsed.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urllib.parse.urlunparse((parsed.scheme, parsed.netloc, path, "", "", ""))


def sse_events(resp):
    """The JSON events of a server-sent-event stream ("data: {...}" lines), until "data: [DONE]"."""
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _request(base_url: str, path: str, payload: dict | None, api_key: str | None, timeout: float):
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(base_url + path, data=data, headers=headers, method="POST" if data else "GET")
    return _OPENER.open(req, timeout=timeout)


def first_model(base_url: str, api_key: str | None = None, timeout: float = 10.0) -> str:
    """id of the first model the server lists at /v1/models."""
    with _request(_normalize_base_url(base_url), "/v1/models", None, api_key, timeout) as resp:
        data = json.load(resp)["data"]
    if not data:
        raise RuntimeError("server lists no models")
    return data[0]["id"]


def one_request(
    base_url: str,
    model: str,
    prompt: str | list[int],
    max_tokens: int,
    stream: bool,
    api_key: str | None,
    timeout: float,
    extra_body: dict | None = None,
) -> RequestResult:
    """One completion. `prompt` may be text or a list of token ids (vLLM takes both);
    `extra_body` adds request fields, e.g. {"ignore_eos": True} (vLLM sampling extras)."""
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": stream}
    payload.update(extra_body or {})
    if stream:
        payload["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    try:
        with _request(base_url, "/v1/completions", payload, api_key, timeout) as resp:
            if not stream:
                body = json.load(resp)
                usage = body.get("usage") or {}
                return RequestResult(
                    ok=True,
                    latency_s=time.perf_counter() - t0,
                    completion_tokens=int(usage.get("completion_tokens", 0)),
                    prompt_tokens=int(usage.get("prompt_tokens", 0)),
                )
            ttft, chunks, usage = None, 0, None
            for event in sse_events(resp):
                if event.get("usage"):
                    usage = event["usage"]
                if any(c.get("text") for c in event.get("choices", [])):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
            latency = time.perf_counter() - t0
            return RequestResult(
                ok=True,
                latency_s=latency,
                ttft_s=ttft,
                completion_tokens=int(usage["completion_tokens"]) if usage else chunks,
                prompt_tokens=int(usage.get("prompt_tokens", 0)) if usage else 0,
            )
    except Exception as exc:  # noqa: BLE001 - every failure is a data point, not a crash
        return RequestResult(ok=False, latency_s=time.perf_counter() - t0, error=failure_text(exc))


def failure_text(exc: Exception, limit: int = 300) -> str:
    """The exception as one line, with the start of the server's body for an HTTP error."""
    detail = ""
    if isinstance(exc, urllib.error.HTTPError):
        try:
            detail = ": " + exc.read().decode("utf-8", "replace")[:limit]
        except Exception:  # noqa: BLE001 - the body is a courtesy
            pass
    return f"{type(exc).__name__}: {exc}{detail}"


def run_load_test(
    base_url: str = DEFAULT_BASE_URL,
    *,
    model: str | None = None,
    n_requests: int = 8,
    concurrency: int = 4,
    prompt: str | list[int] = DEFAULT_PROMPT,
    max_tokens: int = 32,
    stream: bool = True,
    request_timeout_s: float = 120.0,
    max_duration_s: float = 600.0,
    api_key: str | None = None,
    extra_body: dict | None = None,
) -> LoadTestResult:
    """Send `n_requests` completions, at most `concurrency` in flight, and summarize them.

    Requests not started within `max_duration_s` of the start are recorded as failed
    ("not started: time limit"), so the run always ends within about
    max_duration_s + request_timeout_s. `prompt` may be a list of token ids and `extra_body`
    adds fields to every request (see one_request).
    """
    if n_requests < 1 or concurrency < 1:
        raise ValueError("n_requests and concurrency must be >= 1")
    base = _normalize_base_url(base_url)
    model = model or first_model(base, api_key)
    deadline = time.perf_counter() + max_duration_s
    lock = threading.Lock()

    def task(_: int) -> RequestResult:
        if time.perf_counter() > deadline:
            return RequestResult(ok=False, latency_s=0.0, error="not started: time limit")
        return one_request(base, model, prompt, max_tokens, stream, api_key, request_timeout_s, extra_body)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(concurrency, n_requests)) as pool:
        results = list(pool.map(task, range(n_requests)))
    wall = time.perf_counter() - t0
    with lock:
        return LoadTestResult(results=results, wall_time_s=wall, summary=summarize(results, wall))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=os.environ.get("LATENTKV_BASE_URL", DEFAULT_BASE_URL),
                   help="server root or .../v1 (default %(default)s)")
    p.add_argument("--model", help="served model name (default: first of /v1/models)")
    p.add_argument("-n", "--num-requests", type=int, default=8)
    p.add_argument("-c", "--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--no-stream", action="store_true", help="non-streaming requests (no TTFT)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--max-duration", type=float, default=600.0, help="no request starts after this many seconds")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (vllm serve --api-key)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    args = p.parse_args(argv)

    result = run_load_test(
        args.base_url,
        model=args.model,
        n_requests=args.num_requests,
        concurrency=args.concurrency,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        stream=not args.no_stream,
        request_timeout_s=args.request_timeout,
        max_duration_s=args.max_duration,
        api_key=args.api_key,
    )
    if args.json:
        print(json.dumps({**result.summary, "results": [asdict(r) for r in result.results]}, indent=2))
    else:
        print(format_table(result.summary))
    return 0 if result.summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
