"""benchmarks/serving.py: the pure parts (prompts, percentiles, ratios, table) on synthetic timings.
The engine run itself is the benchmark (`python benchmarks/serving.py --cpu-smoke`), not a test."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("serving_bench", REPO / "benchmarks" / "serving.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["serving_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


sb = _load()
R = sb.TimedResult


def _results(ttft: float, tpot: float, n: int, tokens: int = 11, prompt: int = 0) -> list:
    """n requests with TTFT `ttft` and exactly `tpot` seconds per output token after the first."""
    return [R(ok=True, ttft_s=ttft, latency_s=ttft + tpot * (tokens - 1), completion_tokens=tokens, prompt_tokens=prompt,
              itl_s=[tpot] * (tokens - 1)) for _ in range(n)]


def _point(variant, context, ttft, tpot, wall=1.0, n=4):
    res = _results(ttft, tpot, n, prompt=context)
    return sb.Point(variant, context, sb.summarize_point(res, wall), sb.check_prompt_tokens(res, context), res)


def test_make_prompts_exact_length_distinct_and_avoid_specials():
    ps = sb.make_prompts(448, 6, vocab_size=512, seed=0, avoid={0, 1, 2})
    assert len(ps) == 6 and all(len(p) == 448 for p in ps)
    assert len({tuple(p[:16]) for p in ps}) == 6  # no shared prefix block
    assert all(3 <= t < 512 and t not in {0, 1, 2} for p in ps for t in p)
    assert ps == sb.make_prompts(448, 6, vocab_size=512, seed=0, avoid={0, 1, 2})  # deterministic
    assert ps != sb.make_prompts(448, 6, vocab_size=512, seed=1, avoid={0, 1, 2})
    with pytest.raises(ValueError):
        sb.make_prompts(0, 1, 512)
    big = sb.make_prompts(64, 2, vocab_size=128256, avoid={128000, 128001})
    assert max(t for p in big for t in p) < 32000  # reserved/special ids of large vocabularies stay out


def test_percentile_is_load_test_linear_interpolation():
    xs = [0.4, 0.1, 0.3, 0.2]
    assert sb.percentile(xs, 50) == pytest.approx(0.25)
    assert sb.percentile(xs, 90) == pytest.approx(0.37)  # rank 2.7 -> 0.3 + 0.7 * 0.1


def test_tpot_from_synthetic_timings():
    p = _point("source", 1024, ttft=0.5, tpot=0.030)
    assert p.summary["tpot_s_p50"] == pytest.approx(0.030)
    assert p.summary["itl_s_p50"] == pytest.approx(0.030) and p.summary["itl_count"] == 4 * 10
    assert p.summary["ttft_s_p90"] == pytest.approx(0.5)
    assert p.summary["latency_s_p50"] == pytest.approx(0.5 + 0.3)
    assert p.prompt_tokens_ok


def test_ratios_vs_source_same_context():
    pts = [
        _point("source", 1024, 0.2, 0.020, wall=2.0), _point("source", 32768, 4.0, 0.060, wall=8.0),
        _point("converted", 1024, 0.2, 0.016, wall=1.6), _point("converted", 32768, 3.0, 0.020, wall=4.0),
        _point("converted+int4", 32768, 3.2, 0.015, wall=2.0),
    ]
    r = sb.add_ratios(pts)
    assert r[("source", 32768)]["decode_speedup"] == pytest.approx(1.0)
    assert r[("converted", 32768)]["decode_speedup"] == pytest.approx(3.0)
    assert r[("converted", 1024)]["decode_speedup"] == pytest.approx(1.25)
    assert r[("converted+int4", 32768)]["decode_speedup"] == pytest.approx(4.0)
    assert r[("converted", 32768)]["ttft_ratio"] == pytest.approx(0.75)
    assert r[("converted+int4", 32768)]["throughput_ratio"] == pytest.approx(4.0)  # same tokens, 1/4 the wall
    lines = sb.speedup_summary(pts)
    assert any("converted: " in s and "32768" in s and "**3.00x**" in s for s in lines)
    assert any("converted+int4" in s and "**4.00x**" in s for s in lines)


def test_ratio_missing_baseline_is_nan():
    assert math.isnan(sb.ratio(1.0, 0.0)) and math.isnan(sb.ratio(math.nan, 1.0))
    r = sb.add_ratios([_point("converted", 64, 0.1, 0.01)])
    assert math.isnan(r[("converted", 64)]["decode_speedup"])


def test_markdown_table_rows_ordered_and_formatted():
    variants = [sb.Variant("source", "s", None, 640), sb.Variant("converted", "c", None, 160),
                sb.Variant("converted+int4", "c", {"latent_kv_cache_dtype": "int4"}, 60)]
    pts = [_point("converted", 128, 0.1, 0.010), _point("source", 128, 0.1, 0.020),
           _point("source", 64, 0.1, 0.020), _point("converted+int4", 128, 0.1, 0.005)]
    table = sb.format_markdown_table(pts, variants)
    lines = table.splitlines()
    assert lines[0].startswith("| context | variant |") and set(lines[1]) <= {"|", "-"}
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert [ln.split("|")[1:3] for ln in lines[2:]] == [
        [" 64 ", " source "], [" 128 ", " source "], [" 128 ", " converted "], [" 128 ", " converted+int4 "]]
    assert "| 160 (25.0%) |" in table and "| 640 (100.0%) |" in table
    row = lines[3]  # source @128
    assert "| 4/4 |" in row and "| 100.00 / 100.00 |" in row and "| 20.00 / 20.00 | - | 20.00 / 20.00 |" in row
    assert "| 1.00x | - | 1.00x |" in row  # no server metrics in synthetic points
    assert "| 2.00x |" in lines[4] and "| 4.00x |" in lines[5]


def test_prompt_length_mismatch_and_failures_flagged():
    res = _results(0.1, 0.01, 2, prompt=127) + [R(ok=False, latency_s=0.0, error="not started: time limit")]
    assert not sb.check_prompt_tokens(res, 128)
    assert sb.check_prompt_tokens(_results(0.1, 0.01, 2, prompt=0), 128)  # server gave no usage
    p = sb.Point("source", 128, sb.summarize_point(res, 1.0), False, res)
    table = sb.format_markdown_table([p])
    assert "2/3 (prompt len!)" in table


def test_all_failed_point_renders_dashes():
    res = [R(ok=False, latency_s=0.0, error="x")]
    p = sb.Point("source", 64, sb.summarize_point(res, 1.0), True, res)
    table = sb.format_markdown_table([p])
    assert "| 64 | source | - | 0/1 |" in table
    assert table.splitlines()[-1].count("|") == table.splitlines()[0].count("|")


def test_cpu_smoke_preset_args():
    a = sb.parse_args(["--cpu-smoke"])
    assert a.cpu_platform and a.dtype == "float32" and a.tag == "cpu_smoke"
    assert a.contexts == [64, 128, 256, 448] and a.int4_group_size == 8
    assert max(a.contexts) + a.max_tokens <= 512  # stories260K max_position_embeddings
    g = sb.parse_args(["--source", "s", "--converted", "c"])
    assert g.contexts == [1024, 2048, 4096, 8192, 16384, 32768] and not g.cpu_platform
    with pytest.raises(SystemExit):
        sb.parse_args([])


def test_log_errors_picks_root_cause_not_frames():
    log = "\n".join(["INFO start", "WARNING ulimit error thing", '  File "x.py", line 1, in f',
                     "(EngineCore) ValueError: latent width 8 is not a multiple of int4_group_size (16)",
                     "RuntimeError: Engine core initialization failed."])
    got = sb.log_errors(log)
    assert "ValueError: latent width 8" in got and "RuntimeError" in got
    assert "File " not in got and "ulimit" not in got
    assert sb.log_errors("a\nb") == "a\nb"  # no error lines: the tail


def test_itl_separates_decode_steps_from_prefill_stalls():
    """A request stalled behind other prefills: TPOT (mean) grows, the pooled ITL median does not."""
    steady = R(ok=True, ttft_s=0.1, latency_s=0.1 + 0.01 * 10, completion_tokens=11, itl_s=[0.01] * 10)
    stalled = R(ok=True, ttft_s=0.1, latency_s=0.1 + 0.01 * 9 + 0.5, completion_tokens=11, itl_s=[0.01] * 9 + [0.5])
    s = sb.summarize_point([steady, stalled, R(ok=False, latency_s=0.0, error="x", itl_s=[9.0])], 1.0)
    assert s["itl_s_p50"] == pytest.approx(0.01) and s["itl_count"] == 20  # failed request ignored
    assert s["tpot_s_p90"] > 0.05
    assert s["itl_s_p90"] == pytest.approx(0.01)  # rank 17.1 of 20 sorted values, one of them 0.5


def test_timed_request_counts_tokens_per_chunk(monkeypatch):
    """SSE parsing: first token -> TTFT; a chunk with k token ids counts as k intervals; usage wins."""
    import io

    events = [
        {"choices": [{"text": "", "token_ids": [5]}]},
        {"choices": [{"text": "a", "token_ids": [6]}]},
        {"choices": [{"text": "bc", "token_ids": [7, 8]}]},
        {"choices": [], "usage": {"prompt_tokens": 64, "completion_tokens": 4}},
    ]
    body = b"".join(b"data: " + sb.json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    sent = {}

    class Resp(io.BytesIO):
        def __iter__(self):
            return iter(self.getvalue().splitlines(keepends=True))

    def fake_request(base, path, payload, key, timeout):
        sent.update(payload)
        return Resp(body)

    monkeypatch.setattr(sb.lt, "_request", fake_request)
    r = sb.timed_request("http://127.0.0.1:1", "m", [5] * 64, 4, 10.0)
    assert r.ok and r.completion_tokens == 4 and r.prompt_tokens == 64 and r.ttft_s is not None
    assert len(r.itl_s) == 3 and r.itl_s[1] == r.itl_s[2]
    assert len(r.token_times) == 4 and r.token_times[0] == pytest.approx(r.ttft_s) and r.token_times[2] == r.token_times[3]
    assert sent["prompt"] == [5] * 64 and sent["ignore_eos"] and sent["return_token_ids"] and sent["temperature"] == 0.0


METRICS_BEFORE = """# HELP vllm:inter_token_latency_seconds Histogram of inter-token latency in seconds.
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_bucket{engine="0",le="0.01",model_name="source"} 3.0
vllm:inter_token_latency_seconds_sum{engine="0",model_name="source"} 1.5
vllm:inter_token_latency_seconds_count{engine="0",model_name="source"} 100.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="source"} 2.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="source"} 10.0
vllm:num_requests_running{engine="0",model_name="source"} 0.0
"""
METRICS_AFTER = METRICS_BEFORE.replace("_sum{engine=\"0\",model_name=\"source\"} 1.5",
                                       "_sum{engine=\"0\",model_name=\"source\"} 3.5").replace(
    "_count{engine=\"0\",model_name=\"source\"} 100.0", "_count{engine=\"0\",model_name=\"source\"} 200.0")


def test_server_metrics_delta_means():
    before, after = sb.parse_prometheus(METRICS_BEFORE), sb.parse_prometheus(METRICS_AFTER)
    assert before["vllm:inter_token_latency_seconds_sum"] == 1.5
    assert "vllm:num_requests_running" not in before
    assert not any(k.endswith("_bucket") for k in before)
    m = sb.server_means(before, after)
    assert m["inter_token_latency_seconds_mean"] == pytest.approx(2.0 / 100)
    assert math.isnan(m["time_to_first_token_seconds_mean"])  # no new observations
    assert math.isnan(m["request_time_per_output_token_seconds_mean"])
    # two label sets (e.g. two engines) add up
    two = sb.parse_prometheus(METRICS_BEFORE + METRICS_BEFORE.replace('engine="0"', 'engine="1"'))
    assert two["vllm:inter_token_latency_seconds_count"] == 200.0


def test_burst_fraction_and_table_flag():
    assert sb.burst_fraction([0.0001] * 3 + [0.01] * 7, 0.01) == pytest.approx(0.3)
    assert math.isnan(sb.burst_fraction([0.01], math.nan))
    p = _point("source", 64, 0.1, 0.010)
    p.summary.update(server_inter_token_latency_seconds_mean=0.012, itl_burst_fraction=0.5)
    q = _point("converted", 64, 0.1, 0.005)
    q.summary.update(server_inter_token_latency_seconds_mean=0.004, itl_burst_fraction=0.0)
    rows = {ln.split("|")[2].strip(): ln for ln in sb.format_markdown_table([p, q]).splitlines()[2:]}
    assert "(bursty 50%)" in rows["source"] and "bursty" not in rows["converted"]
    assert "| 12.00 |" in rows["source"] and "| 2.00x | 3.00x |" in rows["converted"]  # ITL 10/5, server 12/4


def test_steady_decode_counts_only_after_every_prefill_of_the_wave():
    # request a: first token at 0.1, then one token every 0.01 s, but stalled 0.2 s while b prefills
    a_times = [0.1, 0.11, 0.12, 0.32] + [0.32 + 0.01 * i for i in range(1, 7)]
    # request b: sent at the same moment, first token at 0.31 (after its prefill), then every 0.01 s
    b_times = [0.31 + 0.01 * i for i in range(10)]
    # b's tokens arrive in bursts of two: only endpoints are used
    b_burst = [b_times[0]] + [b_times[i + 1 - (i % 2)] for i in range(1, 9)] + [b_times[9]]  # 2,3 | 4,5 | ... together
    a = R(ok=True, latency_s=a_times[-1], ttft_s=0.1, completion_tokens=10, t_start=100.0, token_times=a_times)
    b = R(ok=True, latency_s=b_times[-1], ttft_s=0.31, completion_tokens=10, t_start=100.0, token_times=b_burst)
    got = sb.steady_decode_tpot([a, b, R(ok=False, latency_s=0.0, error="x")])
    assert got == [pytest.approx(0.01), pytest.approx(0.01)]
    tpot_a = (a_times[-1] - 0.1) / 9
    assert tpot_a > 0.03  # the plain TPOT sees the stall
    assert sb.steady_decode_tpot([R(ok=False, latency_s=0.0)]) == []


def test_decode_s_prefers_steady_and_falls_back_to_tpot():
    assert sb.decode_s({"steady_tpot_s_p50": 0.01, "tpot_s_p50": 0.03}) == 0.01
    assert sb.decode_s({"steady_tpot_s_p50": math.nan, "tpot_s_p50": 0.03}) == 0.03
    assert sb.decode_s({"steady_tpot_s_p90": 0.02, "tpot_s_p90": 0.05}, 90) == 0.02
    s = sb.summarize_point(_results(0.1, 0.02, 2), 1.0, steady=[0.01, 0.03])
    assert s["steady_tpot_s_p50"] == pytest.approx(0.02) and s["steady_count"] == 2


def test_client_timing_suspect_flags_streams_delivered_at_once():
    ok = {"steady_tpot_s_p50": 0.005, "server_inter_token_latency_seconds_mean": 0.006, "itl_burst_fraction": 0.0}
    assert not sb.client_timing_suspect(ok)
    assert sb.client_timing_suspect({**ok, "steady_tpot_s_p50": 0.00001})  # whole stream at once
    assert not sb.client_timing_suspect({**ok, "itl_burst_fraction": 0.5})  # bursts: only the ITL column
    assert sb.client_timing_suspect({**ok, "steady_tpot_s_p50": 0.004, "itl_burst_fraction": 0.5})  # < 80%, bursty
    assert not sb.client_timing_suspect({**ok, "steady_tpot_s_p50": 0.004})  # < 80% but smooth: prefill stalls
    assert not sb.client_timing_suspect({"steady_tpot_s_p50": 0.005})  # no server metrics: nothing to compare
    p = _point("source", 64, 0.1, 0.00001)
    p.summary.update(server_inter_token_latency_seconds_mean=0.004, itl_burst_fraction=0.9)
    table = sb.format_markdown_table([p])
    assert "(suspect)" in table and "(bursty 90%)" in table
    q = _point("converted", 64, 0.1, 0.005)
    assert math.isnan(sb.add_ratios([p, q])[("converted", 64)]["decode_speedup"])  # no ratio against a suspect point


def test_remeasured_point_is_marked():
    p = _point("source", 64, 0.1, 0.01)
    p.discarded = [{"steady_tpot_s_p50": 0.00001}]
    assert "| 4/4 (attempt 2) |" in sb.format_markdown_table([p])
    assert sb.parse_args(["--cpu-smoke"]).suspect_retries == 1
