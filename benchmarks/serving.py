#!/usr/bin/env python3
"""Serving benchmark: source vs converted (latent KV) vs converted + INT4 cache, through `vllm serve`.

For each variant one `vllm serve MODEL` subprocess is started on 127.0.0.1 (free port, bounded wait
for /health, stopped by process group). The INT4 variant is the converted model with
``--hf-overrides '{"latent_kv_cache_dtype": "int4", "latent_kv_int4_group_size": G}'``.
At every context N, requests whose prompt is exactly N token ids (``/v1/completions`` with
``prompt`` = list of ints, greedy, ``ignore_eos``, ``max_tokens`` M, streaming with vLLM's
``return_token_ids`` so every token is timed) are sent in waves of C concurrent requests; each
request has a different prompt and prefix caching is off, so every request prefills N tokens.
Per (variant, N) it reports medians and p90 of time to first token (TTFT), decode time per output
token, end-to-end latency and output tokens/s, and the ratios to the source measured in the same
run. Decode ms/token is measured per request over the tokens that arrive after every request of
its wave has its first token (pure batched decode at context N, first/last arrival only);
cross-checks: pooled client inter-token latencies, vLLM's own inter-token-latency histogram from
/metrics (engine-core timestamps), and plain TPOT = (latency - TTFT) / (tokens - 1).
Writes ``benchmarks/results/serving_<tag>.md`` (table), ``.png`` (decode ms/token and speed-up vs
context) and ``.json`` (every request).

GPU box (one model pair, contexts 1K..32K; the source's max_position_embeddings must be at least
32768 + max_tokens, else end --contexts lower):

    python benchmarks/serving.py --source /models/Llama-3.1-8B-Instruct \
        --converted /models/llama-3.1-8b-latent --int4-group-size 32 --tag llama8b_h100 \
        [--concurrency 4 --num-requests 16 --max-tokens 128 --serve-args "--gpu-memory-utilization 0.9"]

CPU smoke (this repo's stories260K, real vLLM engine on the latentkv CPU reference platform;
says nothing about GPU speed):

    python benchmarks/serving.py --cpu-smoke

The HTTP layer (no proxies, no redirects), RequestResult, summarize() and percentile() come from
examples/load_test.py; the streaming parser here adds per-token times. Only 127.0.0.1 is contacted; request counts, per-request timeouts, per-point wall time and server start time are
bounded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768]
CPU_SMOKE_CONTEXTS = [64, 128, 256, 448]
BURSTY = 0.2  # flag client ITLs when more than this share of tokens arrived in bursts
CPU_NOTE = (
    "**CPU reference platform run: these numbers say nothing about GPU speed.** The latentkv CPU "
    "platform's attention is a pure-PyTorch python loop over requests and layers, so decode time "
    "here is dominated by interpreter overhead, not by KV-cache bytes read; it only shows that the "
    "benchmark runs end to end against the real vLLM engine for all three variants."
)


def _load_client():
    """examples/load_test.py (not a package): the bounded HTTP client and percentile math."""
    name = "latentkv_load_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "load_test.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


lt = _load_client()
percentile = lt.percentile


# --------------------------------------------------------------------------------------------
# Pure parts (tests/test_serving_benchmark.py)
# --------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    model: str
    hf_overrides: dict | None = None
    cache_bytes_per_token: int | None = None  # KV-cache bytes per token (all layers), if known


@dataclass
class Point:
    """One (variant, context) measurement: summarize() of load_test plus bookkeeping."""

    variant: str
    context: int
    summary: dict
    prompt_tokens_ok: bool = True  # every successful request reported usage.prompt_tokens == context
    results: list = field(default_factory=list)
    discarded: list = field(default_factory=list)  # summaries of earlier attempts whose client timing was suspect


def make_prompts(n_tokens: int, count: int, vocab_size: int, seed: int = 0, avoid: set[int] | frozenset = frozenset(),
                 low: int = 3, high: int = 32000) -> list[list[int]]:
    """`count` different prompts of exactly `n_tokens` token ids in [low, min(vocab_size, high)), none
    in `avoid` (BOS/EOS/pad; the cap keeps large vocabularies' special/reserved ids, which sit at the
    top, out). Different first tokens keep requests from sharing any cached prefix block."""
    if n_tokens < 1 or count < 1:
        raise ValueError("n_tokens and count must be >= 1")
    pool = [t for t in range(low, min(vocab_size, high)) if t not in avoid]
    if len(pool) < 2:
        raise ValueError(f"vocabulary too small ({vocab_size}) for synthetic prompts")
    rng = random.Random(f"{seed}:{n_tokens}")
    prompts = []
    for i in range(count):
        p = [rng.choice(pool) for _ in range(n_tokens)]
        p[0] = pool[i % len(pool)]
        prompts.append(p)
    return prompts


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))


def decode_s(summary: dict, q: int = 50) -> float:
    """Decode seconds per output token: the steady (all prefills done) per-request TPOT when the
    waves schedule measured it, else the plain per-request TPOT."""
    x = summary.get(f"steady_tpot_s_p{q}", math.nan)
    return x if _finite(x) else summary.get(f"tpot_s_p{q}", math.nan)


def client_timing_suspect(summary: dict) -> bool:
    """The client did not see tokens when the engine made them (e.g. whole streams delivered at once
    because the API server or the client was short of CPU): its decode time per token is under half
    the engine's mean inter-token latency, or under 80% of it while most tokens came in bursts. (The
    engine's mean includes stalls behind prefills, so a steady decode somewhat below it is normal, and
    bursts alone are harmless: decode ms/token uses only the first and last arrival.)"""
    server = summary.get("server_inter_token_latency_seconds_mean", math.nan)
    d = decode_s(summary)
    if not (_finite(server) and _finite(d)):
        return False
    bf = summary.get("itl_burst_fraction", math.nan)
    return d < 0.5 * server or (_finite(bf) and bf > BURSTY and d < 0.8 * server)


def ratio(num: float, den: float) -> float:
    """num / den, NaN when either side is missing or den is 0."""
    if not (_finite(num) and _finite(den)) or den == 0:
        return math.nan
    return num / den


def add_ratios(points: list[Point], baseline: str = "source") -> dict[tuple[str, int], dict]:
    """Per (variant, context): decode speed-up = baseline decode_s p50 / the variant's (steady
    decode seconds per token, median over requests), the same for the pooled client inter-token
    latency p50, the server's mean inter-token latency and TPOT p50 (includes prefill stalls),
    TTFT and latency ratios (variant p50 / baseline p50) and throughput ratio (variant tok/s /
    baseline tok/s)."""
    base = {p.context: p.summary for p in points if p.variant == baseline}
    out = {}
    for p in points:
        b = base.get(p.context, {})
        s = p.summary
        out[(p.variant, p.context)] = {
            "decode_speedup": (math.nan if client_timing_suspect(b) or client_timing_suspect(s)
                               else ratio(decode_s(b) if b else math.nan, decode_s(s))),
            "itl_speedup": ratio(b.get("itl_s_p50", math.nan), s.get("itl_s_p50", math.nan)),
            "tpot_speedup": ratio(b.get("tpot_s_p50", math.nan), s.get("tpot_s_p50", math.nan)),
            "server_itl_speedup": ratio(b.get("server_inter_token_latency_seconds_mean", math.nan),
                                        s.get("server_inter_token_latency_seconds_mean", math.nan)),
            "ttft_ratio": ratio(s.get("ttft_s_p50", math.nan), b.get("ttft_s_p50", math.nan)),
            "latency_ratio": ratio(s.get("latency_s_p50", math.nan), b.get("latency_s_p50", math.nan)),
            "throughput_ratio": ratio(s.get("throughput_tok_s", math.nan), b.get("throughput_tok_s", math.nan)),
        }
    return out


def _ms(x) -> str:
    return f"{x * 1000:.2f}" if _finite(x) else "-"


def _x(x) -> str:
    return f"{x:.2f}x" if _finite(x) else "-"


def format_markdown_table(points: list[Point], variants: list[Variant] | None = None, baseline: str = "source") -> str:
    """Markdown table, one row per (context, variant), contexts ascending, variants in run order."""
    ratios = add_ratios(points, baseline)
    order = {v.name: i for i, v in enumerate(variants or [])}
    cache = {v.name: v.cache_bytes_per_token for v in variants or []}
    base_cache = cache.get(baseline)
    rows = sorted(points, key=lambda p: (p.context, order.get(p.variant, len(order)), p.variant))
    head = ("| context | variant | KV bytes/token (vs source) | ok/requests | TTFT p50 / p90 (ms) "
            "| **decode ms/token** p50 / p90 | client ITL p50 / p90 (ms) | server ITL mean (ms) "
            "| TPOT incl. stalls p50 / p90 (ms) | latency p50 / p90 (ms) | output tok/s "
            "| **decode speed-up vs source** | server ITL speed-up | tok/s vs source |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for p in rows:
        s, r = p.summary, ratios[(p.variant, p.context)]
        cb = cache.get(p.variant)
        cache_txt = "-" if cb is None else (f"{cb} ({cb / base_cache:.1%})" if base_cache else f"{cb}")
        ok = (f"{s.get('succeeded', 0)}/{s.get('requests', 0)}" + ("" if p.prompt_tokens_ok else " (prompt len!)")
              + (f" (attempt {len(p.discarded) + 1})" if p.discarded else ""))
        tput = s.get("throughput_tok_s", math.nan)
        bf = s.get("itl_burst_fraction", math.nan)
        burst = f" (bursty {bf:.0%})" if _finite(bf) and bf > BURSTY else ""
        lines.append(
            f"| {p.context} | {p.variant} | {cache_txt} | {ok} "
            f"| {_ms(s.get('ttft_s_p50'))} / {_ms(s.get('ttft_s_p90'))} "
            f"| {_ms(decode_s(s, 50))} / {_ms(decode_s(s, 90))}{' (suspect)' if client_timing_suspect(s) else ''} "
            f"| {_ms(s.get('itl_s_p50'))} / {_ms(s.get('itl_s_p90'))}{burst} "
            f"| {_ms(s.get('server_inter_token_latency_seconds_mean'))} "
            f"| {_ms(s.get('tpot_s_p50'))} / {_ms(s.get('tpot_s_p90'))} "
            f"| {_ms(s.get('latency_s_p50'))} / {_ms(s.get('latency_s_p90'))} "
            f"| {tput:.1f} | {_x(r['decode_speedup'])} | {_x(r['server_itl_speedup'])} "
            f"| {_x(r['throughput_ratio'])} |"
            if s.get("succeeded") else
            f"| {p.context} | {p.variant} | {cache_txt} | {ok} |" + " - |" * 10
        )
    return "\n".join(lines)


def speedup_summary(points: list[Point], baseline: str = "source") -> list[str]:
    """One line per non-baseline variant: decode speed-up at the largest context measured."""
    ratios = add_ratios(points, baseline)
    out = []
    names = []
    for p in points:
        if p.variant != baseline and p.variant not in names:
            names.append(p.variant)
    for name in names:
        ctxs = sorted(c for (v, c), r in ratios.items() if v == name and _finite(r["decode_speedup"]))
        if ctxs:
            c = ctxs[-1]
            r = ratios[(name, c)]
            suspect = any(client_timing_suspect(p.summary) for p in points
                          if p.context == c and p.variant in (name, baseline))
            out.append(f"- {name}: decode speed-up vs {baseline} at context {c}: "
                       f"**{r['decode_speedup']:.2f}x** (decode ms/token p50 ratio; server mean inter-token "
                       f"latency ratio {_x(r['server_itl_speedup'])}, client ITL p50 ratio {_x(r['itl_speedup'])}, "
                       f"TPOT incl. stalls p50 ratio {_x(r['tpot_speedup'])})"
                       + (": client timing suspect at this point (see table), use the server ratio" if suspect else ""))
    return out


def check_prompt_tokens(results, context: int) -> bool:
    """Every successful request reported exactly `context` prompt tokens (0 = server gave no usage)."""
    return all(r.prompt_tokens in (context, 0) for r in results if r.ok)


# --------------------------------------------------------------------------------------------
# Server and requests
# --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class ServerStartError(RuntimeError):
    pass


def log_errors(log: str, max_lines: int = 25) -> str:
    """The lines of a vllm serve log that say what went wrong (exceptions and ERROR records,
    not traceback frames), or the log's tail when there are none."""
    keep = [ln for ln in log.splitlines()
            if ("Error" in ln or " ERROR " in ln or "Exception" in ln) and not ln.lstrip().startswith("File ")
            and "ulimit" not in ln]
    return "\n".join(keep[-max_lines:]) if keep else "\n".join(log.splitlines()[-max_lines:])


class Server:
    """`vllm serve` in its own process group on 127.0.0.1; a context manager."""

    def __init__(self, variant: Variant, *, max_model_len: int, dtype: str, extra_args: list[str], env: dict,
                 log_path: Path, start_timeout_s: float):
        self.variant, self.log_path, self.start_timeout_s = variant, log_path, start_timeout_s
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", variant.model,
            "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", variant.name,
            "--max-model-len", str(max_model_len), "--dtype", dtype, "--seed", "0",
            "--no-enable-prefix-caching", *extra_args,
        ]
        if variant.hf_overrides:
            self.cmd += ["--hf-overrides", json.dumps(variant.hf_overrides)]
        self.env = env
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{self.variant.name}] {shlex.join(self.cmd)}\n  log: {self.log_path}", flush=True)
        with open(self.log_path, "wb") as fh:
            self.proc = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True, cwd=str(ROOT))
        t0 = time.monotonic()
        while not _healthy(self.base_url + "/health"):
            if self.proc.poll() is not None or time.monotonic() - t0 > self.start_timeout_s:
                why = "exited" if self.proc.poll() is not None else f"not healthy within {self.start_timeout_s:.0f} s"
                self.stop()
                raise ServerStartError(f"vllm serve ({self.variant.name}) {why}; errors in its log:\n"
                                       + log_errors(self.log_path.read_text(errors="replace")))
            time.sleep(1.0)
        print(f"[{self.variant.name}] healthy after {time.monotonic() - t0:.0f} s", flush=True)
        return self

    def stop(self) -> None:
        """SIGTERM the process group, wait until every process of it is gone (engine core and
        workers too, so the next variant starts on a quiet machine), SIGKILL after 60 s."""
        p = self.proc
        if p is None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            p.poll()
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=20)

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class TimedResult(lt.RequestResult):
    """load_test's RequestResult plus the time between consecutive output tokens (inter-token
    latencies): a streamed chunk of k tokens after dt seconds counts as k intervals of dt / k."""

    itl_s: list = field(default_factory=list)
    t_start: float = 0.0  # time.perf_counter() when the request was sent
    token_times: list = field(default_factory=list)  # seconds after t_start at which each output token arrived


def steady_decode_tpot(wave: list) -> list[float]:
    """Per request of one wave (requests started together): decode seconds per token counted only
    after the LAST request of the wave got its first token, i.e. once every prefill of the wave is
    done and the batch is pure decode at this context. Uses only the first and last token arrival
    after that moment, so tokens delivered in bursts do not matter. Requests with fewer than
    2 tokens after it give nothing."""
    ok = [r for r in wave if r.ok and r.token_times]
    if not ok:
        return []
    ready = max(r.t_start + r.token_times[0] for r in ok)
    out = []
    for r in ok:
        after = [r.t_start + t for t in r.token_times if r.t_start + t > ready]
        if len(after) >= 2 and after[-1] > after[0]:
            out.append((after[-1] - after[0]) / (len(after) - 1))
    return out


def timed_request(base_url: str, model: str, prompt: list[int], max_tokens: int, timeout: float) -> TimedResult:
    """One streamed greedy completion of exactly `max_tokens` tokens (ignore_eos), timing every
    token: vLLM's `return_token_ids` puts each step's token ids into its chunk (also chunks whose
    text is still empty), so TTFT is the first token, not the first printable text."""
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
               "stream_options": {"include_usage": True}, "ignore_eos": True, "min_tokens": max_tokens,
               "return_token_ids": True}
    t0 = time.perf_counter()
    try:
        with lt._request(base_url, "/v1/completions", payload, None, timeout) as resp:
            ttft, last, itl, usage, times = None, None, [], None, []
            for event in lt.sse_events(resp):
                if event.get("usage"):
                    usage = event["usage"]
                k = sum(len(c.get("token_ids") or []) or int(bool(c.get("text"))) for c in event.get("choices", []))
                if not k:
                    continue
                now = time.perf_counter()
                times += [now - t0] * k
                if ttft is None:
                    ttft, k = now - t0, k - 1  # the first token's wait is the TTFT
                if k:
                    itl += [(now - last) / k] * k
                last = now
            latency = time.perf_counter() - t0
            return TimedResult(ok=True, latency_s=latency, ttft_s=ttft,
                               completion_tokens=int(usage["completion_tokens"]) if usage else len(itl) + (ttft is not None),
                               prompt_tokens=int(usage.get("prompt_tokens", 0)) if usage else 0, itl_s=itl,
                               t_start=t0, token_times=times)
    except Exception as exc:  # noqa: BLE001 - every failure is a data point
        return TimedResult(ok=False, latency_s=time.perf_counter() - t0, error=lt.failure_text(exc))


SERVER_METRICS = ("vllm:inter_token_latency_seconds", "vllm:time_to_first_token_seconds",
                  "vllm:request_time_per_output_token_seconds")


def parse_prometheus(text: str, names=SERVER_METRICS) -> dict[str, float]:
    """`<name>_sum` and `<name>_count` of the given histograms, summed over label sets."""
    out: dict[str, float] = {}
    wanted = {f"{n}{suffix}" for n in names for suffix in ("_sum", "_count")}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key = line.split("{", 1)[0].split(" ", 1)[0]
        if key in wanted:
            try:
                out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
    return out


def server_means(before: dict[str, float], after: dict[str, float], names=SERVER_METRICS) -> dict[str, float]:
    """Mean of each histogram over the observations between two scrapes (NaN if none)."""
    out = {}
    for n in names:
        cnt = after.get(f"{n}_count", 0.0) - before.get(f"{n}_count", 0.0)
        tot = after.get(f"{n}_sum", 0.0) - before.get(f"{n}_sum", 0.0)
        out[n.split(":", 1)[1] + "_mean"] = tot / cnt if cnt > 0 else math.nan
    return out


def scrape(base_url: str) -> dict[str, float]:
    """The server's /metrics (engine-side timings: inter-token latency from engine-core timestamps,
    so not disturbed by a starved API server or client); {} if unavailable."""
    try:
        with lt._request(base_url, "/metrics", None, None, 10.0) as resp:
            return parse_prometheus(resp.read().decode("utf-8", "replace"))
    except Exception:  # noqa: BLE001
        return {}


def burst_fraction(itl: list[float], reference_s: float) -> float:
    """Share of client inter-token latencies under 10% of the server's mean: tokens that reached the
    client in bursts (client or API server starved of CPU), so client-side per-token timing is off."""
    if not itl or not _finite(reference_s) or reference_s <= 0:
        return math.nan
    return sum(x < 0.1 * reference_s for x in itl) / len(itl)


def summarize_point(results: list, wall_time_s: float, steady: list[float] | None = None) -> dict:
    """load_test.summarize (latency, TTFT, TPOT percentiles, throughput) plus percentiles of all
    inter-token latencies of the successful requests pooled (`itl_s_p50` ...): the decode step time."""
    s = lt.summarize(results, wall_time_s)
    itl = [x for r in results if r.ok for x in getattr(r, "itl_s", None) or []]
    for q in (50, 90, 99):
        s[f"itl_s_p{q}"] = percentile(itl, q)
    s["itl_s_mean"] = sum(itl) / len(itl) if itl else math.nan
    s["itl_count"] = len(itl)
    for q in (50, 90):
        s[f"steady_tpot_s_p{q}"] = percentile(steady or [], q)
    s["steady_count"] = len(steady or [])
    return s


def run_point(base_url: str, model: str, prompts: list[list[int]], *, max_tokens: int, concurrency: int,
              request_timeout_s: float, max_duration_s: float, schedule: str = "waves") -> tuple[dict, list]:
    """Send every prompt, at most `concurrency` in flight, and summarize.

    schedule "waves": groups of `concurrency` requests start together and the next group starts
    when the whole group is done, so prefills happen at the start of a wave and the rest of it is
    clean batched decode at this context; "closed": a new request starts as soon as one ends
    (steady serving load; other requests' prefills interleave with decode steps).
    No request starts after `max_duration_s` (it is recorded as failed)."""
    deadline = time.perf_counter() + max_duration_s

    def task(prompt):
        if time.perf_counter() > deadline:
            return TimedResult(ok=False, latency_s=0.0, error="not started: time limit")
        return timed_request(base_url, model, prompt, max_tokens, request_timeout_s)

    groups = [prompts[i:i + concurrency] for i in range(0, len(prompts), concurrency)] if schedule == "waves" else [prompts]
    before = scrape(base_url)
    t0 = time.perf_counter()
    results, steady = [], []
    with ThreadPoolExecutor(max_workers=min(concurrency, len(prompts))) as pool:
        for g in groups:
            wave = list(pool.map(task, g))
            results += wave
            if schedule == "waves":
                steady += steady_decode_tpot(wave)
    wall = time.perf_counter() - t0
    s = summarize_point(results, wall, steady)
    s.update({f"server_{k}": v for k, v in server_means(before, scrape(base_url)).items()})
    s["itl_burst_fraction"] = burst_fraction([x for r in results if r.ok for x in r.itl_s],
                                             s["server_inter_token_latency_seconds_mean"])
    return s, results


def model_info(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    return cfg.get("text_config", cfg) if "vocab_size" not in cfg else cfg


def cache_bytes(source: Path, converted: Path, dtype: str, group: int, check_int4: bool = True) -> dict[str, int | None]:
    """KV-cache bytes per token of the three variants (format arithmetic; None if unavailable)."""
    out = {"source": None, "converted": None, "converted+int4": None}
    try:
        import torch

        from latentkv import format as fmt
        from vllm_latentkv.attention.cache import cache_bytes_per_token

        cfg = json.loads((converted / "config.json").read_text())
        tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
            dtype if dtype != "auto" else str(cfg.get("torch_dtype", cfg.get("dtype", "bfloat16"))).replace("torch.", ""),
            torch.bfloat16)
        spec, dims = fmt.load_spec(cfg)
        elt = torch.empty((), dtype=tdt).element_size()
        rep = fmt.kv_bytes_report(spec, dims, element_bytes=elt)
        out["source"] = rep["source_bytes_per_token"]
        out["converted"] = cache_bytes_per_token(spec, dims, tdt)
        try:
            out["converted+int4"] = cache_bytes_per_token(
                spec.model_copy(update={"cache_dtype": "int4", "int4_group_size": group}), dims, tdt)
        except ValueError as exc:  # the plugin would refuse this group size: say so before any server starts
            if not check_int4:
                return out
            raise SystemExit(f"--int4-group-size {group} does not fit {converted}: {exc}") from exc
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - a missing column, not a failed benchmark
        print(f"note: KV bytes/token not computed ({type(exc).__name__}: {exc})", flush=True)
    return out


def plot(points: list[Point], variants: list[Variant], path: Path, title: str, cpu: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = add_ratios(points)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for v in variants:
        ps = sorted((p for p in points if p.variant == v.name and _finite(decode_s(p.summary))),
                    key=lambda p: p.context)
        if not ps:
            continue
        xs = [p.context for p in ps]
        a.plot(xs, [decode_s(p.summary, 50) * 1000 for p in ps], "o-", label=v.name)
        a.fill_between(xs, [decode_s(p.summary, 50) * 1000 for p in ps],
                       [decode_s(p.summary, 90) * 1000 for p in ps], alpha=0.15)
        line = b.plot(xs, [ratios[(v.name, c)]["decode_speedup"] for c in xs], "o-", label=v.name)[0]
        srv = [p.summary.get("server_inter_token_latency_seconds_mean", math.nan) for p in ps]
        if any(_finite(x) for x in srv):
            a.plot(xs, [x * 1000 for x in srv], "x--", color=line.get_color(), alpha=0.7, label=f"{v.name} (server ITL mean)")
            b.plot(xs, [ratios[(v.name, c)]["server_itl_speedup"] for c in xs], "x--", color=line.get_color(),
                   alpha=0.7, label=f"{v.name} (server ITL)")
    ctxs = sorted({p.context for p in points})
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        if ctxs:
            ax.set_xticks(ctxs, [f"{c // 1024}K" if c >= 1024 and c % 1024 == 0 else str(c) for c in ctxs])
            ax.minorticks_off()
        ax.set_xlabel("context (prompt tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    a.set_ylabel("decode ms / output token (p50, band to p90)")
    b.set_ylabel("decode speed-up vs source (p50 ratio)")
    b.axhline(1.0, color="grey", lw=0.8)
    fig.suptitle(title + ("\nCPU reference platform: says nothing about GPU speed" if cpu else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_cpu_smoke_models(workdir: Path, group: int) -> tuple[Path, Path]:
    """Real stories260K imported and converted (partial RoPE, 1 pair per KV head, kv_ratio 0.25:
    latent width 8 per layer, so INT4 group 8 fits)."""
    sys.path.insert(0, str(ROOT))
    from converters.convert import ConvertOptions, convert
    from converters.importers.llama2c import import_llama2c, packaged_stories260k

    src = import_llama2c(*packaged_stories260k(), workdir / "stories260K")
    conv = workdir / "stories260K-latent"
    convert(src, conv, ConvertOptions(rope_mode="partial", rope_strategy="high", rope_pairs=1, kv_ratio=0.25, method="svd",
                                         refine_steps=0),
            progress=False)
    return src, conv


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--source", type=Path, help="source HF checkpoint directory")
    p.add_argument("--converted", type=Path, help="latent-KV checkpoint converted from --source")
    p.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)), help="prompt lengths in tokens")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default %(default)s)")
    p.add_argument("--num-requests", type=int, default=16, help="measured requests per context (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per variant before measuring")
    p.add_argument("--schedule", choices=("waves", "closed"), default="waves",
                   help="waves: groups of --concurrency requests start together (clean batched decode); "
                   "closed: a new request as soon as one ends (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (ignore_eos)")
    p.add_argument("--int4-group-size", type=int, default=32, help="must divide the latent width (latentkv inspect)")
    p.add_argument("--variants", default="source,converted,converted+int4")
    p.add_argument("--dtype", default="auto", help="vllm serve --dtype (default %(default)s)")
    p.add_argument("--serve-args", default="", help="extra vllm serve arguments, one shell-quoted string "
                   "(e.g. \"--gpu-memory-utilization 0.85 --max-num-seqs 16\")")
    p.add_argument("--cpu-platform", action="store_true", help="LATENTKV_CPU_PLATFORM=1 for the servers")
    p.add_argument("--cpu-smoke", action="store_true", help="stories260K on the CPU platform, small contexts")
    p.add_argument("--suspect-retries", type=int, default=1,
                   help="measure a context again when the client's decode time is under half the engine's "
                   "(streams reached the client late); every attempt is reported")
    p.add_argument("--start-retries", type=int, default=1, help="retries of a server start that fails")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for /health")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--point-timeout", type=float, default=900.0, help="no request of a context starts after this")
    p.add_argument("--tag", default=None, help="output name: benchmarks/results/serving_<tag>.md/.png/.json")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.cpu_smoke:
        a.cpu_platform = True
        a.dtype = "float32"
        if a.contexts == ",".join(map(str, DEFAULT_CONTEXTS)):
            a.contexts = ",".join(map(str, CPU_SMOKE_CONTEXTS))
        for k, default, smoke in (("concurrency", 4, 2), ("num_requests", 16, 8), ("max_tokens", 128, 48),
                                  ("int4_group_size", 32, 8), ("warmup", 2, 2)):
            if getattr(a, k) == default:
                setattr(a, k, smoke)
        a.tag = a.tag or "cpu_smoke"
    elif not (a.source and a.converted):
        p.error("--source and --converted are required (or --cpu-smoke)")
    a.contexts = [int(c) for c in a.contexts.split(",") if c.strip()]
    a.tag = a.tag or "run"
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    # SIGTERM -> SystemExit in the main thread, so the running server's context manager stops it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    if a.cpu_platform:
        env["LATENTKV_CPU_PLATFORM"] = "1"
        env.pop("VLLM_TARGET_DEVICE", None)  # it would make vLLM skip the out-of-tree platform
    a.out_dir.mkdir(parents=True, exist_ok=True)
    stem = a.out_dir / f"serving_{a.tag}"
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="latentkv_serving_") as tmp:
        tmp = Path(tmp)
        if a.cpu_smoke and not (a.source and a.converted):
            a.source, a.converted = build_cpu_smoke_models(tmp, a.int4_group_size)
        a.source, a.converted = a.source.resolve(), a.converted.resolve()
        cb = cache_bytes(a.source, a.converted, a.dtype, a.int4_group_size, "converted+int4" in a.variants)
        all_variants = {
            "source": Variant("source", str(a.source), None, cb["source"]),
            "converted": Variant("converted", str(a.converted), None, cb["converted"]),
            "converted+int4": Variant("converted+int4", str(a.converted),
                                      {"latent_kv_cache_dtype": "int4", "latent_kv_int4_group_size": a.int4_group_size},
                                      cb["converted+int4"]),
        }
        unknown = [v for v in a.variants.split(",") if v.strip() and v.strip() not in all_variants]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(all_variants)}")
        variants = [all_variants[v.strip()] for v in a.variants.split(",") if v.strip()]
        info = model_info(a.source)
        vocab = int(info["vocab_size"])
        avoid = set()
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = info.get(k)
            avoid.update(v if isinstance(v, list) else [v] if v is not None else [])
        max_model_len = max(a.contexts) + a.max_tokens
        limit = info.get("max_position_embeddings")
        if limit and max_model_len > limit:
            raise SystemExit(f"max context {max(a.contexts)} + max_tokens {a.max_tokens} > max_position_embeddings "
                             f"{limit} of the source: use a largest context of at most {limit - a.max_tokens}")
        prompts = {n: make_prompts(n, a.num_requests, vocab, a.seed, avoid) for n in a.contexts}
        warm = make_prompts(min(a.contexts), max(a.warmup, 1), vocab, a.seed + 1, avoid)
        points: list[Point] = []
        extra = shlex.split(a.serve_args)
        failures: dict[str, str] = {}
        for v in variants:
            for attempt in range(1 + a.start_retries):
                try:
                    points += measure_variant(v, a, env, tmp / f"serve_{v.name}.log", max_model_len, extra, warm, prompts)
                    failures.pop(v.name, None)
                    break
                except ServerStartError as exc:  # a start that fails is retried; a measurement is not
                    failures[v.name] = str(exc)
                    print(f"[{v.name}] start attempt {attempt + 1} failed:\n{exc}", flush=True)
                    keep = a.out_dir / f"serving_{a.tag}_{v.name.replace('+', '_')}.log"
                    keep.write_bytes((tmp / f"serve_{v.name}.log").read_bytes())
                    print(f"  full log kept in {keep}", flush=True)
                    time.sleep(5)
    elapsed = time.monotonic() - t_start
    write_outputs(a, stem, variants, points, elapsed, failures)
    ok = not failures and all(p.summary["failed"] == 0 and p.prompt_tokens_ok for p in points)
    return 0 if ok else 1


def measure_variant(v: Variant, a, env: dict, log_path: Path, max_model_len: int, extra: list[str],
                    warm: list[list[int]], prompts: dict[int, list[list[int]]]) -> list[Point]:
    """Start the variant's server, warm it up, measure every context, stop it."""
    points = []
    with Server(v, max_model_len=max_model_len, dtype=a.dtype, extra_args=extra, env=env,
                log_path=log_path, start_timeout_s=a.start_timeout) as srv:
        if a.warmup:
            s, _ = run_point(srv.base_url, v.name, warm[: a.warmup], max_tokens=a.max_tokens,
                             concurrency=a.concurrency, request_timeout_s=a.request_timeout,
                             max_duration_s=a.point_timeout, schedule=a.schedule)
            if s["failed"]:
                print(f"[{v.name}] warm-up: {s['failed']} failed: {s['errors']}", flush=True)
        for n in a.contexts:
            discarded = []
            for attempt in range(1 + a.suspect_retries):
                s, res = run_point(srv.base_url, v.name, prompts[n], max_tokens=a.max_tokens,
                                   concurrency=a.concurrency, request_timeout_s=a.request_timeout,
                                   max_duration_s=a.point_timeout, schedule=a.schedule)
                if not client_timing_suspect(s) or attempt == a.suspect_retries:
                    break
                discarded.append(s)
                print(f"[{v.name}] context {n}: client decode {_ms(decode_s(s))} ms/token vs engine "
                      f"{_ms(s['server_inter_token_latency_seconds_mean'])} ms: client timing suspect, measuring again",
                      flush=True)
            pt = Point(v.name, n, s, check_prompt_tokens(res, n), res, discarded)
            points.append(pt)
            print(f"[{v.name}] context {n}: {s['succeeded']}/{s['requests']} ok, "
                  f"TTFT p50 {_ms(s['ttft_s_p50'])} ms, decode {_ms(decode_s(s))} ms/token, "
                  f"client ITL p50 {_ms(s['itl_s_p50'])} ms, "
                  f"server ITL mean {_ms(s['server_inter_token_latency_seconds_mean'])} ms, "
                  f"TPOT p50 {_ms(s['tpot_s_p50'])} ms, "
                  f"{s['throughput_tok_s']:.1f} tok/s" + ("" if pt.prompt_tokens_ok else " PROMPT LENGTH MISMATCH")
                  + (f" errors: {s['errors']}" if s["errors"] else ""), flush=True)
    return points


def _environment() -> str:
    import importlib.metadata as md

    vers = []
    for pkg in ("vllm", "torch", "transformers"):
        try:
            vers.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001
        pass
    return f"{', '.join(vers)}; {gpu}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible"


def write_outputs(a, stem: Path, variants: list[Variant], points: list[Point], elapsed: float,
                  failures: dict[str, str] | None = None) -> None:
    cpu = bool(a.cpu_platform)
    title = f"serving benchmark `{a.tag}`: source vs converted vs converted+INT4 (group {a.int4_group_size})"
    md = [f"# {title}", ""]
    if cpu:
        md += [CPU_NOTE, ""]
    md += [
        f"- source: `{a.source}`" + (" (stories260K imported by converters.importers.llama2c)" if a.cpu_smoke else ""),
        f"- converted: `{a.converted}`" + (" (ConvertOptions(rope_mode='partial', rope_strategy='high', rope_pairs=1, "
                                          "kv_ratio=0.25): latent width 8 + 4x2 rope values per layer)" if a.cpu_smoke else ""),
        f"- converted+int4: converted with `--hf-overrides '{json.dumps(variants[-1].hf_overrides or {})}'`"
        if any(v.name == "converted+int4" for v in variants) else "- converted+int4: not run",
        f"- per context: {a.num_requests} requests (each a different prompt of exactly N token ids, "
        f"greedy, ignore_eos, max_tokens {a.max_tokens}), concurrency {a.concurrency} "
        f"(schedule `{a.schedule}`), streaming with per-token timing (`return_token_ids`); "
        f"{a.warmup} warm-up request(s) per server; prefix caching off; `--dtype {a.dtype}`"
        + (f"; extra serve args `{a.serve_args}`" if a.serve_args else ""),
        f"- **decode ms/token** = per request, (last - first token arrival) / (tokens - 1) counting only "
        f"tokens that arrived after every request of its wave had its first token (all prefills done: "
        f"pure batched decode at this context; only two timestamps, so bursty delivery does not matter); "
        f"p50 / p90 over requests" + ("" if a.schedule == "waves" else " (schedule closed: plain TPOT instead)") + "; "
        f"**decode speed-up** = source decode ms/token p50 / variant's, same context, same run",
        f"- client ITL = all gaps between consecutive output tokens at the client, pooled; \"bursty x%\": x% of "
        f"them were under 10% of the server's mean (tokens reached the client in bursts: API server or client "
        f"short of CPU); \"(suspect)\": the client's decode ms/token is under half the server's "
        f"mean inter-token latency (or under 80% of it with most tokens in bursts), i.e. the client did not "
        f"see tokens when they were made: no decode speed-up is computed from it, use the server column (such a point is measured again up to --suspect-retries times, "
        f"\"(attempt k)\" in ok/requests, earlier attempts in the .json); server ITL mean = vLLM's `vllm:inter_token_latency_seconds` histogram (engine-core "
        f"timestamps) over the context's requests, /metrics before vs after; TPOT incl. stalls = (latency - "
        f"TTFT) / (tokens - 1) per request; output tok/s = output tokens / wall time of the context's requests",
        f"- environment: {_environment()}" + ("; LATENTKV_CPU_PLATFORM=1" if cpu else ""),
        f"- run: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {elapsed:.0f} s total "
        f"including server starts",
        f"- command: `python benchmarks/serving.py {shlex.join(sys.argv[1:])}`",
        "",
        format_markdown_table(points, variants),
        "",
        "KV bytes/token: the cache layout's bytes per token over all layers at the serving dtype "
        "(`latentkv.format` / `vllm_latentkv.attention.cache.cache_bytes_per_token`), percentage of the source's.",
        "",
        *speedup_summary(points),
    ]
    if cpu:
        md += ["", "Decode speed-ups above are CPU-platform artefacts (python-loop attention; a 260K-parameter "
               "model whose whole fp32 cache is 1.3 KB per token, so no variant is bound by reading it; the latent "
               "variants add up/down projections and INT4 (de)quantisation as extra python work); the GPU targets (>= 3x at 32K with a 4x "
               "smaller cache, more with INT4) can only be checked on a GPU run."]
    bad = [p for p in points if p.summary["failed"] or not p.prompt_tokens_ok]
    if bad:
        md += ["", "Problems: " + "; ".join(
            f"{p.variant}@{p.context}: {p.summary['failed']} failed {p.summary['errors']}"
            + ("" if p.prompt_tokens_ok else " prompt length mismatch") for p in bad)]
    for name, err in (failures or {}).items():
        md += ["", f"**{name}: the server did not start** (log kept as `serving_{a.tag}_{name.replace('+', '_')}.log`):",
               "", "```", err[-3000:], "```"]
    md_path = stem.with_suffix(".md")
    md_path.write_text("\n".join(md) + "\n")
    plot(points, variants, stem.with_suffix(".png"), f"{a.tag}: decode ms/token vs context", cpu)
    stem.with_suffix(".json").write_text(json.dumps({
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "variants": [asdict(v) for v in variants],
        "points": [{"variant": p.variant, "context": p.context, "summary": p.summary,
                    "prompt_tokens_ok": p.prompt_tokens_ok, "discarded_attempts": p.discarded,
                    "results": [asdict(r) for r in p.results]} for p in points],
        "failures": failures or {},
        "ratios": {f"{v}@{c}": r for (v, c), r in add_ratios(points).items()},
    }, indent=1, default=str))
    print("\n".join(md))
    print(f"\nwrote {md_path}, {stem.with_suffix('.png')}, {stem.with_suffix('.json')}")


if __name__ == "__main__":
    sys.exit(main())
