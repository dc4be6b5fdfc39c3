"""HF ``generate`` through the latent cache gives the tokens a full recompute gives, on the real stories260K.

Guards the cache hand-over between transformers' generate() and the reference model: transformers 5.24
renamed the cache from ``past_key_values`` to ``cache`` (see ``latentkv.modeling.CACHE_NAME``), and a model
that kept the old name started a fresh cache at every decode step and wrote gibberish.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import converters
from converters.convert import ConvertOptions, convert
from latentkv.modeling import CACHE_NAME, LatentKVCache
from tests.helpers import load_latent

CAL = str(Path(converters.__file__).parent / "data" / "text" / "tinystories_a.txt")
NEW = 64  # new tokens per generate
CONVERSIONS = {
    # the demo's conversion (README, `latentkv demo`): keys rebuilt from the latent, values absorbed
    "full": dict(rope_mode="full", kv_ratio=0.5, method="activation", centred=True),
    # MHA2MLA partial RoPE: one rotated pair per KV head cached next to the latent, fully absorbed decode
    "partial": dict(rope_mode="partial", rope_strategy="2norm", rope_pairs=1, kv_ratio=0.5),
}
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["Once upon a time", "Lily and Ben went to the park. They saw a big dog", "The sun"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from converters.importers.llama2c import import_llama2c, packaged_stories260k

    root = tmp_path_factory.mktemp("gen")
    src = import_llama2c(*packaged_stories260k(), root / "stories260K")
    for name, kw in CONVERSIONS.items():
        convert(src, root / name, ConvertOptions(calibration_text=CAL, calibration_samples=16, **kw), progress=False)
    return root


@pytest.fixture(scope="module")
def tokenizer(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted / "full")


def _generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, **kw)


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_generate_with_cache_equals_without(converted, tokenizer, name):
    model = load_latent(converted / name)
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    out = _generate(model, ids, return_dict_in_generate=True)
    no_cache = _generate(model, ids, use_cache=False)
    assert no_cache.shape == (1, ids.shape[1] + NEW)
    assert out.sequences.tolist() == no_cache.tolist(), tokenizer.decode(out.sequences[0])
    cache = out[CACHE_NAME]  # the cache generate decoded with: every token went through it
    assert isinstance(cache, LatentKVCache)
    assert cache.get_seq_length() == ids.shape[1] + NEW - 1  # the last token is sampled, never fed back


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_batched_left_padded_generate(converted, tokenizer, name):
    model = load_latent(converted / name)
    rows = [tokenizer(p).input_ids for p in PROMPTS]
    width = max(map(len, rows))
    pad = 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    batched = _generate(model, ids, attention_mask=mask, pad_token_id=pad)
    assert batched.tolist() == _generate(model, ids, attention_mask=mask, pad_token_id=pad, use_cache=False).tolist()
    for i, row in enumerate(rows):  # the padding changes nothing: each row continues as it does alone
        assert batched[i, width:].tolist() == _generate(model, torch.tensor([row]))[0, len(row):].tolist(), PROMPTS[i]


@pytest.mark.parametrize("name", list(CONVERSIONS))
@pytest.mark.parametrize("arg", ["past_key_values", "cache"])
def test_forward_step_with_the_returned_cache(converted, tokenizer, name, arg):
    """model(ids, use_cache=True), then one token with the cache it returned, equals one full forward."""
    model = load_latent(converted / name)
    ids = tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        prefill = model(ids[:, :-1], use_cache=True)
        cache = prefill[CACHE_NAME]
        assert isinstance(cache, LatentKVCache) and cache.get_seq_length() == ids.shape[1] - 1
        step = model(ids[:, -1:], **{arg: cache}).logits[0, -1]
        full = model(ids).logits[0, -1]
    assert cache.get_seq_length() == ids.shape[1]
    assert (step - full).abs().max().item() < 1e-4
    assert torch.equal(prefill.logits[0, -1], model(ids[:, :-1]).logits[0, -1])
