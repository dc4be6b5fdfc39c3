"""Shared pieces of the engine tests in tests/vllm (latent models, ``vllm serve``).

Engines run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uni executor): one process
instead of three, which halves the start-up time on two cores.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
TEXT = SHARED / "text" / "tinystories_a.txt"
BLOCK_SIZE = 16
KV_BYTES = 4 << 20


def make_stories_source(out: Path) -> Path:
    from converters.importers.llama2c import import_llama2c, packaged_stories260k

    return import_llama2c(*packaged_stories260k(), out)


def convert_to(src: Path, out: Path, **opts) -> Path:
    from converters.convert import ConvertOptions, convert
    from tests.helpers import PLAIN_SVD  # here, not at the top: engine subprocesses import this file without the repo on sys.path

    calibration_ids = opts.pop("calibration_ids", None)
    convert(src, out, ConvertOptions(**{**PLAIN_SVD, **opts}), progress=False, calibration_ids=calibration_ids)
    return out


def make_stories_latent(tmp: Path) -> tuple[Path, Path]:
    """(source, converted) stories260K: partial RoPE (2 pairs per KV head, "high"), joint SVD, 50% KV ratio."""
    src = make_stories_source(tmp / "src")
    latent = convert_to(src, tmp / "latent", rope_mode="partial", rope_strategy="high", rope_pairs=2, svd="joint",
                        kv_ratio=0.5)
    return src, latent


def make_random_llama(out: Path, family: str = "llama", *, heads: int, kv_heads: int, head_dim: int = 16,
                      hidden: int = 64, layers: int = 3, vocab: int = 256, seed: int = 0) -> Path:
    """A random Llama/Qwen2/Qwen3 HF model (Qwen2: q/k/v biases, made non-zero so bias bugs show;
    Qwen3: per-head q/k RMSNorm, gains made non-uniform so norm bugs show)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif "q_norm" in name or "k_norm" in name:  # gains around 1.5: peaky scores despite the norm
                p.add_(0.5 + torch.randn_like(p) * 0.4)
            elif "proj" in name:  # larger weights: peakier attention, greedy paths that depend on it
                p.mul_(4.0)
    model.save_pretrained(out)
    return out


def reference_model(path: Path, int4_group: int | None = None, token_filter: dict | None = None):
    """The reference model of a checkpoint; with ``int4_group``, as if its config asked for the INT4
    latent cache with that group size (the reference then caches what that cache holds); with
    ``token_filter``, as if it had that Token Filtering default."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import latentkv.modeling  # noqa: F401  (registers the latentkv model type)

    config = AutoConfig.from_pretrained(path)
    if int4_group is not None:
        config.latent_kv = {**config.latent_kv, "cache_dtype": "int4", "int4_group_size": int4_group}
    if token_filter is not None:
        config.latent_kv = {**config.latent_kv, "token_filter": token_filter}
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # the engine runs with ignore_eos
    model.generation_config.pad_token_id = 0
    return model


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """The reference model's own generate (latent cache, absorbed decode), greedy."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, one full forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@functools.lru_cache(maxsize=4)
def _text_ids(tokenizer_path: str) -> tuple[int, ...]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    return tuple(tok(TEXT.read_text()[:20000]).input_ids)


def text_ids(tokenizer_path: Path, start: int, length: int) -> list[int]:
    """Token ids of TinyStories text (tokenized once per tokenizer)."""
    return list(_text_ids(str(tokenizer_path))[start:start + length])


class Engine:
    """An in-process vllm.LLM, shut down explicitly (module fixtures own one each)."""

    def __init__(self, model: Path, **kwargs):
        from vllm import LLM

        args = dict(model=str(model), dtype="float32", max_model_len=256, block_size=BLOCK_SIZE,
                    kv_cache_memory_bytes=KV_BYTES, seed=0, distributed_executor_backend="uni")
        args.update(kwargs)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
            self.llm = LLM(**args)

    def greedy(self, prompts: list[list[int]], n: int | list[int]) -> list:
        from vllm import SamplingParams

        ns = n if isinstance(n, list) else [n] * len(prompts)
        params = [SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True) for k in ns]
        return self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    def prompt_logprobs(self, ids: list[int]) -> torch.Tensor:
        from vllm import SamplingParams

        out = self.llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                use_tqdm=False)[0]
        return torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])])

    @property
    def num_blocks(self) -> int:
        return self.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks

    def layer_caches(self) -> dict:
        """Per attention layer: (impl class, cache dtype, cache shape)."""
        def probe(model):
            return {
                name: (type(m.impl).__name__, str(m.kv_cache.dtype), tuple(m.kv_cache.shape))
                for name, m in model.named_modules() if hasattr(m, "impl") and hasattr(m, "kv_cache")
            }
        return self.llm.apply_model(probe)[0]

    def close(self) -> None:
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            del self.llm
            gc.collect()


def chunked_engine(model: Path, **kwargs) -> Engine:
    """An engine with chunked prefill in 48-token steps and prefix caching, no tokenizer."""
    return Engine(model, max_num_batched_tokens=48, enable_chunked_prefill=True, enable_prefix_caching=True,
                  skip_tokenizer_init=True, **kwargs)


def random_prompts(vocab: int) -> list[list[int]]:
    """Four random token-id prompts (lengths 1, 7, 40, 70), the same on every call."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (1, 7, 40, 70)]


def calibration_ids(vocab: int) -> torch.Tensor:
    """Random calibration token ids [8, 64] (shared RoPE, TransKV), the same on every call."""
    return torch.randint(3, vocab, (8, 64), generator=torch.Generator().manual_seed(0))


RANDOM_VOCAB = 256
# Random models and how they are converted: (make_random_llama arguments, convert options).
RANDOM_CASES = {
    # q/k/v biases, per-layer ranks, two Palu latent groups, layer 1 kept (vLLM's Attention)
    "gqa_partial": (
        dict(family="qwen2", heads=8, kv_heads=2, head_dim=16, layers=3),
        dict(rope_mode="partial", rope_strategy="high", rope_pairs=2, svd="joint", ranks=[24, 32, 16],
             latent_groups=2, keep_layers=[1]),
    ),
    # cache = latent only, keys rebuilt; split latent
    "mha_full": (
        dict(family="llama", heads=4, kv_heads=4, head_dim=16, layers=3),
        dict(rope_mode="full", svd="split", ranks=[64, 48, 96]),
    ),
    "gqa_shared": (
        dict(family="llama", heads=4, kv_heads=2, head_dim=16, layers=2),
        dict(rope_mode="shared", rope_pairs=4, svd="joint", ranks=[32, 24]),
    ),
    # layer 0: 512 latent + 64 shared rope, DeepSeek-V3's cache row (vLLM's MLAAttention);
    # layer 1: 256 + 64 (our backend); layer 2 kept
    "deepseek_shaped": (
        dict(family="llama", heads=4, kv_heads=2, head_dim=128, hidden=512, layers=3),
        dict(rope_mode="shared", rope_pairs=32, svd="joint", ranks=[512, 256, 512], keep_layers=[2]),
    ),
}


def convert_random_case(tmp: Path, name: str) -> Path:
    """RANDOM_CASES[name] saved under tmp/src and converted to tmp/latent (shared RoPE calibrated
    on random ids); returns the converted checkpoint."""
    model_args, opts = RANDOM_CASES[name]
    src = make_random_llama(tmp / "src", vocab=RANDOM_VOCAB, **model_args)
    if opts["rope_mode"] == "shared":
        opts = {**opts, "calibration_ids": calibration_ids(RANDOM_VOCAB)}
    return convert_to(src, tmp / "latent", **opts)


def check_greedy_matches_reference(engine: Engine, ref, prompts: list[list[int]], n: int, *,
                                   prefix_cached: bool = False) -> None:
    """Greedy continuations of ``prompts`` through the engine == the reference's; with
    ``prefix_cached``, the last prompt once more, now served from the prefix cache, gives the same."""
    outs = engine.greedy(prompts, n)
    for p, out in zip(prompts, outs):
        assert list(out.outputs[0].token_ids) == reference_greedy(ref, p, n), len(p)
    if prefix_cached:
        again = engine.greedy([prompts[-1]], n)[0]  # prefix-cached prompt: rows (and key scales) read back
        assert again.num_cached_tokens > 0
        assert list(again.outputs[0].token_ids) == list(outs[-1].outputs[0].token_ids)


def check_16_concurrent_match_sequential(engine: Engine, src: Path, ref, checked=(0, 7, 13)) -> None:
    """16 mixed requests (1 to 120 tokens, 4 to 24 new) batched together give the tokens each gives
    alone, and those are the reference model's for the ``checked`` ones."""
    lengths = [1, 3, 8, 15, 16, 17, 31, 33, 47, 64, 65, 80, 99, 120, 5, 40]
    reqs = [text_ids(src, 2000 + 37 * i, n) for i, n in enumerate(lengths)]
    n_new = [4 + (7 * i) % 21 for i in range(16)]
    together = engine.greedy(reqs, n_new)
    alone = [engine.greedy([p], n)[0] for p, n in zip(reqs, n_new)]
    for i, (a, b) in enumerate(zip(together, alone)):
        assert len(a.outputs[0].token_ids) == n_new[i]
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids), i
    for i in checked:
        assert list(together[i].outputs[0].token_ids) == reference_greedy(ref, reqs[i], n_new[i]), i


def check_prompt_logprobs_match_reference(engine: Engine, ref, ids: list[int]) -> None:
    """Teacher-forced prompt logprobs through the engine == the reference's (float32)."""
    torch.testing.assert_close(engine.prompt_logprobs(ids), reference_logprobs(ref, ids), atol=5e-4, rtol=1e-4)


def latent_spec(path: Path):
    from latentkv import format as fmt

    return fmt.load_spec(json.loads((path / "config.json").read_text()))


# --- vllm serve subprocess ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, payload: dict | None = None, timeout: float = 60) -> dict:
    """GET (no payload) or POST a JSON payload; the JSON answer ({} if empty)."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = resp.read()
    return json.loads(body) if body else {}


def stop_server(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (vLLM's graceful shutdown), then SIGKILL the whole process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:  # engine core and worker share the server's new session / group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


@contextlib.contextmanager
def vllm_serve(model: Path, log_path: Path, *, served_name: str, max_model_len: int, kv_cache_bytes: int,
               ready_timeout: float, extra_args: tuple[str, ...] = ()):
    """``vllm serve model`` (float32, CPU platform) on a free 127.0.0.1 port, output in ``log_path``;
    yields (base URL, process) once /health answers, stopped with :func:`stop_server` on exit."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name,
        "--dtype", "float32", "--max-model-len", str(max_model_len),
        "--kv-cache-memory-bytes", str(kv_cache_bytes), *extra_args,
    ]
    env = {**os.environ, "LATENTKV_CPU_PLATFORM": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(base + "/health", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve not healthy in {ready_timeout:g} s:\n{log_path.read_text()[-4000:]}")
                time.sleep(1)
        yield base, proc
    finally:
        stop_server(proc)
