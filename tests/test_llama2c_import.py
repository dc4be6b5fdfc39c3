"""llama2.c importer: the real stories260K model and tokenizer, imported to an HF Llama directory."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from converters.importers import llama2c as l2c
from converters.importers.llama2c import import_llama2c, packaged_stories260k, read_llama2c_header
from converters.importers.llama2c_tokenizer import (
    llama2c_decode,
    llama2c_encode,
    read_llama2c_tokenizer,
)
from tests.helpers import load_hf, load_tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODEL_DIR = DATA / "models" / "stories260K"
MODEL_BIN = MODEL_DIR / "stories260K.bin"
TOK_BIN = MODEL_DIR / "tok512.bin"
EXPECTED = MODEL_DIR / "expected_greedy_200.txt"
TINYSTORIES_A = DATA / "text" / "tinystories_a.txt"
TINYSTORIES_SAMPLE = DATA / "text" / "tinystories_sample.txt"

pytestmark = [pytest.mark.skipif(not MODEL_BIN.is_file(), reason=f"shared data not found at {DATA}"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return import_llama2c(MODEL_BIN, TOK_BIN, tmp_path_factory.mktemp("imp") / "stories260K")


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return load_hf(hf_dir)


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return load_tokenizer(hf_dir)


@pytest.fixture(scope="module")
def vocab():
    return read_llama2c_tokenizer(TOK_BIN, vocab_size=512)


# --------------------------------------------------------------------------------- the import

def test_packaged_copy_is_byte_identical():
    model, tok = packaged_stories260k()
    assert model.read_bytes() == MODEL_BIN.read_bytes()
    assert tok.read_bytes() == TOK_BIN.read_bytes()
    shipped = model.parent
    assert (shipped / "expected_greedy_200.txt").read_bytes() == EXPECTED.read_bytes()
    notice = (shipped / "NOTICE").read_text()
    assert "MIT" in notice and "clebert/llama2.zig" in notice


def test_output_files_and_config(hf_dir):
    assert sorted(p.name for p in hf_dir.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 172, 5)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (8, 4, 8)
    assert (cfg["vocab_size"], cfg["max_position_embeddings"]) == (512, 512)
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["torch_dtype"]) == (10000.0, 1e-5, "float32")
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    from safetensors import safe_open

    with safe_open(hf_dir / "model.safetensors", "np") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").dtype == np.float32
    assert "lm_head.weight" not in keys  # tied
    assert len(keys) == 1 + 5 * 9 + 1
    assert not list(hf_dir.parent.glob(".stories260K.*"))  # no temp dir left behind


def test_greedy_200_matches_llama2c(hf_model, hf_tok, vocab):
    """`run stories260K.bin -z tok512.bin -t 0.0 -n 200`: llama2.c runs forward at positions
    0..199 (BOS at 0) and prints the token sampled at each, i.e. 200 new tokens after BOS."""
    expected = EXPECTED.read_bytes()
    out = hf_model.generate(torch.tensor([[1]]), max_new_tokens=200, do_sample=False)
    ids = out[0].tolist()
    assert len(ids) == 201  # no early stop: the model never sampled BOS/EOS here
    assert llama2c_decode(vocab, ids) == expected
    assert hf_tok.decode(ids, skip_special_tokens=True).encode() == expected


def test_rope_permutation_matches_interleaved_reference(hf_model):
    """HF attention on the permuted weights == llama2.c's interleaved RoPE on the raw weights."""
    h = read_llama2c_header(MODEL_BIN)
    t = l2c._load_tensors(MODEL_BIN, h)
    torch.manual_seed(0)
    x = torch.randn(5, h.dim, dtype=torch.float64)  # 5 positions
    hd = h.head_dim
    pos = torch.arange(5, dtype=torch.float64)[:, None]
    freq = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = torch.cos(pos * freq), torch.sin(pos * freq)  # [5, hd/2]

    def interleaved(w, n):  # llama2.c: rotate pairs (2i, 2i+1)
        v = (x @ torch.from_numpy(np.array(w, dtype=np.float64)).T).view(5, n, hd // 2, 2)
        a, b = v[..., 0], v[..., 1]
        c, s = cos[:, None], sin[:, None]
        return torch.stack([a * c - b * s, a * s + b * c], -1).view(5, n * hd)

    def half_split(w, n):  # HF: rotate (i, i + hd/2)
        v = (x @ w.double().T).view(5, n, hd)
        a, b = v[..., : hd // 2], v[..., hd // 2:]
        c, s = cos[:, None], sin[:, None]
        return torch.cat([a * c - b * s, b * c + a * s], -1).view(5, n * hd)

    attn = hf_model.model.layers[2].self_attn
    for w_raw, w_hf, n in ((t["wq"][2], attn.q_proj.weight, h.n_heads), (t["wk"][2], attn.k_proj.weight, h.n_kv_heads)):
        ref = interleaved(w_raw, n).view(5, n, hd // 2, 2)
        got = half_split(w_hf, n).view(5, n, 2, hd // 2).transpose(2, 3)  # back to pair order
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        # q.k dot products per head (what attention uses) are layout independent
        torch.testing.assert_close(got.reshape(5, n, hd).norm(dim=-1), ref.reshape(5, n, hd).norm(dim=-1))


def test_unshared_classifier(tmp_path, hf_model):
    """Negative vocab_size in the header: a separate wcls follows the RoPE tables."""
    raw = bytearray(MODEL_BIN.read_bytes())
    hdr = list(struct.unpack_from("<7i", raw))
    hdr[5] = -hdr[5]
    struct.pack_into("<7i", raw, 0, *hdr)
    emb = np.frombuffer(bytes(raw[28:28 + 512 * 64 * 4]), dtype="<f4").reshape(512, 64)
    wcls = (2.0 * emb).astype("<f4")
    bin_ = tmp_path / "untied.bin"
    bin_.write_bytes(bytes(raw) + wcls.tobytes())
    out = import_llama2c(bin_, TOK_BIN, tmp_path / "untied")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == 512
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 403, 407, 261]])
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, 2.0 * hf_model(ids).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ the tokenizer

def _tinystories_lines(n=None):
    lines = [ln for ln in TINYSTORIES_A.read_text(encoding="utf-8").split("\n") if ln.strip()]
    return lines[:n] if n else lines


def test_tokenizer_matches_llama2c_encode_on_tinystories(hf_tok, vocab):
    lines = _tinystories_lines()
    assert len(lines) > 300
    stories = [s.strip() for s in TINYSTORIES_SAMPLE.read_text(encoding="utf-8").split("<|endoftext|>")]
    for text in lines + stories:
        assert hf_tok(text).input_ids == llama2c_encode(vocab, text, bos=True), text[:60]


@pytest.mark.parametrize("text", [
    "", " ", "a", "Hello\n\nworld", "  two leading spaces", "trailing space ",
    "He said, \u201cWow!\u201d", "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f600", "tab\there",
])
def test_tokenizer_edge_cases(hf_tok, vocab, text):
    ids = hf_tok(text).input_ids
    assert ids == llama2c_encode(vocab, text, bos=True)
    assert hf_tok.decode(ids, skip_special_tokens=True) == text  # lossless round trip
    if not any(3 + 0x80 <= i < 3 + 0x100 for i in ids):  # llama2.c's safe_printf drops lone
        assert llama2c_decode(vocab, ids) == text.encode()  # non-ASCII bytes (byte fallback)


def test_tokenizer_special_tokens(hf_tok):
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.unk_token_id) == (1, 2, 0)
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert len(hf_tok) == 512
    assert hf_tok("Once upon a time").input_ids[0] == 1  # BOS prepended like Llama
    assert hf_tok("Once", add_special_tokens=False).input_ids == [403]  # " Once": dummy space
    assert hf_tok.convert_ids_to_tokens([3, 13, 258]) == ["<0x00>", "<0x0A>", "<0xFF>"]


# ---------------------------------------------------------------------------------- errors

def _write(tmp_path, name, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _with_header(**changes) -> bytes:
    raw = bytearray(MODEL_BIN.read_bytes())
    hdr = dict(zip(l2c.HEADER_FIELDS, struct.unpack_from("<7i", raw)))
    hdr.update(changes)
    struct.pack_into("<7i", raw, 0, *hdr.values())
    return bytes(raw)


def _assert_nothing_written(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_truncated_checkpoint(tmp_path):
    bad = _write(tmp_path, "trunc.bin", MODEL_BIN.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"truncated"):
        import_llama2c(bad, TOK_BIN, tmp_path / "out")
    _assert_nothing_written(tmp_path, "out")
    tiny = _write(tmp_path, "tiny.bin", b"\x01\x02")
    with pytest.raises(ValueError, match=r"shorter than the 28-byte"):
        import_llama2c(tiny, TOK_BIN, tmp_path / "out")


@pytest.mark.parametrize("changes, message", [
    (dict(n_heads=7), r"dim=64 is not divisible by n_heads=7"),
    (dict(n_kv_heads=3), r"n_heads=8 is not divisible by n_kv_heads=3"),
    (dict(dim=-64), r"dim=-64 must be positive"),
    (dict(n_layers=0), r"n_layers=0 must be positive"),
    (dict(vocab_size=0), r"vocab_size=0"),
    (dict(n_heads=64, n_kv_heads=64), r"head_dim=1 is odd"),
    (dict(n_layers=6), r"header implies"),
])
def test_bad_header(tmp_path, changes, message):
    bad = _write(tmp_path, "bad.bin", _with_header(**changes))
    with pytest.raises(ValueError, match=message):
        import_llama2c(bad, TOK_BIN, tmp_path / "out")
    _assert_nothing_written(tmp_path, "out")


def test_bad_tokenizer(tmp_path):
    trunc = _write(tmp_path, "tok.bin", TOK_BIN.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"truncated"):
        import_llama2c(MODEL_BIN, trunc, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        import_llama2c(MODEL_BIN, tmp_path / "missing.bin", tmp_path / "out")
    _assert_nothing_written(tmp_path, "out")


def test_tokenizer_vocab_size_mismatch(tmp_path):
    bad = _write(tmp_path, "v.bin", _with_header(vocab_size=511)[: -64 * 4])  # consistent but 511
    with pytest.raises(ValueError, match=r"holds more than the model's vocab_size=511"):
        import_llama2c(bad, TOK_BIN, tmp_path / "out")
    _assert_nothing_written(tmp_path, "out")


def test_existing_out_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        import_llama2c(MODEL_BIN, TOK_BIN, out)
    assert (out / "keep.txt").exists()
    import_llama2c(MODEL_BIN, TOK_BIN, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(l2c, "write_hf_tokenizer_files", boom)
    with pytest.raises(OSError, match="simulated"):
        import_llama2c(MODEL_BIN, TOK_BIN, out)
    _assert_nothing_written(tmp_path, "out")
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OSError, match="simulated"):
        import_llama2c(MODEL_BIN, TOK_BIN, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # old output untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
