"""The real vLLM 0.32.0 engine on latentkv's CPU platform, checked against HF transformers.

Subject: wiki-mha-6M (HF LlamaForCausalLM, MHA 8x32), float32 everywhere, greedy.
Three engine start-ups in all (~25 s each on two cores): a plain ``LLM``, an ``LLM``
with chunked prefill + prefix caching, and a ``vllm serve`` subprocess.
"""

import gc
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from test_latent_helpers import http_json, vllm_serve  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT.parent / "shared" / "data" / "models" / "wiki-mha-6M"
TEXT = ROOT.parent / "shared" / "data" / "text" / "wiki.test.raw"  # held out from training
MAX_NEW_TOKENS = 24
BLOCK_SIZE = 16
KV_CACHE_BYTES = 64 << 20  # ~5k tokens of this model's fp32 cache
ENGINE_ARGS = dict(
    model=str(MODEL),
    dtype="float32",
    max_model_len=512,
    block_size=BLOCK_SIZE,
    kv_cache_memory_bytes=KV_CACHE_BYTES,
    seed=0,
)
# Chunked prefill in steps of at most this many tokens: the long prompts need 2-5 steps.
CHUNK_TOKENS = 32
PREFIX_TOKENS = 5 * BLOCK_SIZE  # whole blocks: only full blocks are prefix-cached


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> dict[str, list[int]]:
    """Token-id prompts cut from held-out WikiText-2: odd lengths, and a pair
    sharing a PREFIX_TOKENS-token prefix (for prefix caching)."""
    ids = tokenizer(TEXT.read_text()[:40_000]).input_ids
    prefix = ids[3000 : 3000 + PREFIX_TOKENS]
    return {
        "short": ids[100:105],
        "odd": ids[500:523],
        "two_chunks": ids[900:961],
        "long": ids[1500:1650],
        "prefix_a": prefix + ids[4000:4011],
        "prefix_b": prefix + ids[5000:5017],
    }


def hf_greedy_continuation(model, ids: list[int]) -> list[int]:
    """Plain greedy decoding with HF transformers: argmax of the full forward pass,
    MAX_NEW_TOKENS times. No EOS handling (the engine runs with ignore_eos, which
    does not mask EOS either)."""
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(MAX_NEW_TOKENS):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_greedy(prompts, hf_model) -> dict[str, list[int]]:
    return {name: hf_greedy_continuation(hf_model, ids) for name, ids in prompts.items()}


def attention_impl_names(model) -> list[str]:
    # Runs in the worker (pickled by reference: must stay a module-level function).
    return sorted({type(m.impl).__name__ for m in model.modules() if hasattr(m, "impl")})


def _run_engine(batches: list[list[str]], prompts, **overrides):
    """Start an LLM, generate each batch in turn (later batches see earlier ones'
    cached blocks), shut it down. Returns (outputs by name, attention impl names)."""
    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    with pytest.MonkeyPatch.context() as mp:
        # apply_model() ships a function to the worker: allowed only with this flag.
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        llm = LLM(**ENGINE_ARGS, **overrides)
        try:
            results = {}
            for batch in batches:
                outs = llm.generate(
                    [{"prompt_token_ids": prompts[n]} for n in batch], params,
                    use_tqdm=False,
                )
                results.update(zip(batch, outs))
            impls = llm.apply_model(attention_impl_names)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    return results, impls


@pytest.fixture(scope="module")
def baseline(prompts):
    """No prefix caching, whole-prompt prefill, everything in one batch."""
    from vllm.platforms import current_platform

    from vllm_latentkv.platform.cpu import LatentKVCpuPlatform

    assert isinstance(current_platform, LatentKVCpuPlatform), (
        f"vLLM resolved {type(current_platform).__name__} before LATENTKV_CPU_PLATFORM=1 "
        "was set (tests/conftest.py sets it; something imported vLLM earlier?)"
    )
    return _run_engine(
        [list(prompts)], prompts,
        enable_prefix_caching=False, enable_chunked_prefill=False,
        max_num_batched_tokens=512,
    )


@pytest.fixture(scope="module")
def chunked_cached(prompts):
    """Chunked prefill in CHUNK_TOKENS steps + prefix caching. The second batch
    shares prefix_a's first PREFIX_TOKENS tokens and repeats prefix_a."""
    first = ["short", "odd", "two_chunks", "long", "prefix_a"]
    results, impls = _run_engine(
        [first, ["prefix_b"], ["prefix_a"]], prompts,
        enable_prefix_caching=True, enable_chunked_prefill=True,
        max_num_batched_tokens=CHUNK_TOKENS, max_num_seqs=4,
    )
    return results, impls


def test_generate_greedy_matches_hf(baseline, hf_greedy):
    results, impls = baseline
    assert impls == [["TorchPagedAttentionImpl"]]
    for name, ref in hf_greedy.items():
        got = list(results[name].outputs[0].token_ids)
        assert got == ref, f"{name}: vLLM {got} != HF {ref}"


def test_chunked_prefill_and_prefix_caching_match_plain_run(
    chunked_cached, baseline, prompts, hf_greedy
):
    results, impls = chunked_cached
    assert impls == [["TorchPagedAttentionImpl"]]
    # The conditions under test really happened: prompts longer than a step...
    assert max(len(p) for p in prompts.values()) > 4 * CHUNK_TOKENS
    # ...and later requests served from cached blocks (the last batch's prefix_a
    # overwrote the first one's result, all of it but the last block is cached).
    assert results["prefix_b"].num_cached_tokens == PREFIX_TOKENS
    assert results["prefix_a"].num_cached_tokens >= PREFIX_TOKENS
    plain, _ = baseline
    for name in prompts:
        got = list(results[name].outputs[0].token_ids)
        assert got == list(plain[name].outputs[0].token_ids) == hf_greedy[name], name


# --- vllm serve ---------------------------------------------------------------

SERVE_PROMPTS = ["The history of", "In 1999 the band released", " = Robert Boulter = \n"]
SERVED_NAME = "wiki-mha-6M"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    with vllm_serve(MODEL, log_path, served_name=SERVED_NAME, max_model_len=512, kv_cache_bytes=KV_CACHE_BYTES,
                    ready_timeout=240) as (base, proc):
        yield base
    assert proc.returncode is not None


def test_serve_completions_greedy_matches_hf(server, tokenizer, hf_model):
    resp = http_json(server + "/v1/completions", {
        "model": SERVED_NAME, "prompt": SERVE_PROMPTS, "max_tokens": MAX_NEW_TOKENS,
        "temperature": 0, "ignore_eos": True, "return_token_ids": True,
    })
    choices = sorted(resp["choices"], key=lambda c: c["index"])
    assert len(choices) == len(SERVE_PROMPTS)
    for prompt, choice in zip(SERVE_PROMPTS, choices):
        ids = tokenizer(prompt).input_ids
        ref = hf_greedy_continuation(hf_model, ids)
        assert choice["prompt_token_ids"] == ids, prompt
        assert choice["token_ids"] == ref, prompt
        assert choice["text"] == tokenizer.decode(ref), prompt


def test_serve_lists_served_model(server):
    assert [m["id"] for m in http_json(server + "/v1/models")["data"]] == [SERVED_NAME]
