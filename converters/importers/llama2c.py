"""Import a llama2.c "legacy" checkpoint (+ its tokenizer) as a Hugging Face Llama directory.

llama2.c legacy format (``export.py --version 0`` / ``legacy_export`` in karpathy/llama2.c)::

    header: 7 x int32 LE   dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
    fp32 arrays, row-major (out x in), in this order:
      token_embedding [V, D]
      rms_att  [L, D]
      wq [L, D, D]        wk [L, KV, D]      wv [L, KV, D]      wo [L, D, D]
      rms_ffn  [L, D]
      w1 [L, H, D]        w2 [L, D, H]       w3 [L, H, D]
      rms_final [D]
      freq_cis_real [S, hd/2]   freq_cis_imag [S, hd/2]
      wcls [V, D]         only when the header's vocab_size is negative (unshared classifier)

    D = dim, H = hidden_dim, L = n_layers, V = |vocab_size|, S = seq_len,
    hd = D / n_heads (head_dim), KV = n_kv_heads * hd

HF names: w1 -> mlp.gate_proj, w3 -> mlp.up_proj, w2 -> mlp.down_proj, rms_att ->
input_layernorm, rms_ffn -> post_attention_layernorm, rms_final -> model.norm.

RoPE layout: llama2.c rotates interleaved pairs (2i, 2i+1) of each head; HF Llama rotates
(i, i + hd/2) ("rotate_half"). Both use frequency theta^(-2i/hd) for pair i, so re-ordering the
output rows of wq / wk inside each head to [even rows..., odd rows...] makes HF's attention
compute exactly llama2.c's. This is llama2.c's own ``permute_original`` in its HF export:
    w.reshape(n_heads, hd/2, 2, in).transpose(1, 2).reshape(n_heads * hd, in)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.importers.llama2c_tokenizer import (
    BOS_ID,
    EOS_ID,
    read_llama2c_tokenizer,
    write_hf_tokenizer_files,
)
from latentkv.checkpoint import atomic_output_dir

__all__ = ["Llama2cHeader", "read_llama2c_header", "import_llama2c", "packaged_stories260k"]

HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
HEADER_BYTES = 4 * len(HEADER_FIELDS)
ROPE_THETA = 10000.0  # llama2.c hard-codes it in run.c
RMS_NORM_EPS = 1e-5


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # as stored: negative means the classifier is not shared
    seq_len: int

    @property
    def shared_classifier(self) -> bool:
        return self.vocab_size > 0

    @property
    def n_vocab(self) -> int:
        return abs(self.vocab_size)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(llama2.c name, shape) of every fp32 array after the header, in file order."""
        D, H, L, V, S, KV = self.dim, self.hidden_dim, self.n_layers, self.n_vocab, self.seq_len, self.kv_dim
        shapes = [
            ("token_embedding", (V, D)),
            ("rms_att", (L, D)),
            ("wq", (L, D, D)),
            ("wk", (L, KV, D)),
            ("wv", (L, KV, D)),
            ("wo", (L, D, D)),
            ("rms_ffn", (L, D)),
            ("w1", (L, H, D)),
            ("w2", (L, D, H)),
            ("w3", (L, H, D)),
            ("rms_final", (D,)),
            ("freq_cis_real", (S, self.head_dim // 2)),
            ("freq_cis_imag", (S, self.head_dim // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("wcls", (V, D)))
        return shapes

    def expected_file_bytes(self) -> int:
        return HEADER_BYTES + 4 * sum(int(np.prod(s)) for _, s in self.tensor_shapes())


def _validate_header(h: Llama2cHeader, path: Path, file_bytes: int) -> None:
    where = f"{path}: llama2.c header {h}"
    for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "seq_len"):
        if getattr(h, name) <= 0:
            raise ValueError(f"{where}: {name}={getattr(h, name)} must be positive "
                             "(not a llama2.c legacy checkpoint? version-1+ files start with a magic number)")
    if h.vocab_size == 0:
        raise ValueError(f"{where}: vocab_size=0 (must be non-zero; negative means unshared classifier)")
    if h.dim % h.n_heads:
        raise ValueError(f"{where}: dim={h.dim} is not divisible by n_heads={h.n_heads}")
    if h.n_heads % h.n_kv_heads:
        raise ValueError(f"{where}: n_heads={h.n_heads} is not divisible by n_kv_heads={h.n_kv_heads}")
    if h.head_dim % 2:
        raise ValueError(f"{where}: head_dim={h.head_dim} is odd; RoPE needs an even head size")
    want = h.expected_file_bytes()
    if file_bytes != want:
        kind = "truncated" if file_bytes < want else "longer than the header implies"
        raise ValueError(f"{where}: file is {file_bytes:,} bytes but the header implies {want:,} "
                         f"bytes ({kind}; shared classifier={h.shared_classifier})")


def read_llama2c_header(path: Path) -> Llama2cHeader:
    """Read and validate the header of a legacy llama2.c checkpoint (sizes vs file length too)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint not found: {path}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte llama2.c header")
    with open(path, "rb") as f:
        vals = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    h = Llama2cHeader(**{k: int(v) for k, v in zip(HEADER_FIELDS, vals)})
    _validate_header(h, path, size)
    return h


def _permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Per head, reorder output rows from interleaved pairs (2i, 2i+1) to half-split (i, i+hd/2)."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    # w: [n_heads, hd/2 (pair i), 2 (even/odd), in] -> [n_heads, 2, hd/2, in]
    return w.reshape(n_heads, hd // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def _load_tensors(path: Path, h: Llama2cHeader) -> dict[str, np.ndarray]:
    """Map the fp32 arrays of a validated checkpoint (numpy memmap; no pickle)."""
    flat = np.memmap(path, dtype="<f4", mode="r", offset=HEADER_BYTES)
    out: dict[str, np.ndarray] = {}
    off = 0
    for name, shape in h.tensor_shapes():
        n = int(np.prod(shape))
        out[name] = flat[off:off + n].reshape(shape)
        off += n
    return out


def _check_rope_tables(t: dict[str, np.ndarray], h: Llama2cHeader, path: Path) -> None:
    """The stored freq_cis tables must be RoPE with theta=10000 (what HF's config will say)."""
    hd = h.head_dim
    inv = 1.0 / ROPE_THETA ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(h.seq_len, dtype=np.float64)[:, None] * inv[None, :]
    err = max(np.abs(t["freq_cis_real"] - np.cos(ang)).max(), np.abs(t["freq_cis_imag"] - np.sin(ang)).max())
    if err > 1e-3:
        raise ValueError(f"{path}: stored RoPE tables differ from theta={ROPE_THETA:g} by {err:.3g}; "
                         "this importer only supports llama2.c's default RoPE base")


def _hf_state_dict(t: dict[str, np.ndarray], h: Llama2cHeader) -> dict[str, np.ndarray]:
    sd: dict[str, np.ndarray] = {"model.embed_tokens.weight": t["token_embedding"]}
    for i in range(h.n_layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = _permute_rope_rows(t["wq"][i], h.n_heads)
        sd[p + "self_attn.k_proj.weight"] = _permute_rope_rows(t["wk"][i], h.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = t["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = t["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = t["w1"][i]
        sd[p + "mlp.down_proj.weight"] = t["w2"][i]
        sd[p + "mlp.up_proj.weight"] = t["w3"][i]
        sd[p + "input_layernorm.weight"] = t["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
    sd["model.norm.weight"] = t["rms_final"]
    if not h.shared_classifier:  # tied: lm_head.weight is omitted, as HF/vLLM expect
        sd["lm_head.weight"] = t["wcls"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def _hf_config(h: Llama2cHeader) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h.dim,
        "intermediate_size": h.hidden_dim,
        "num_hidden_layers": h.n_layers,
        "num_attention_heads": h.n_heads,
        "num_key_value_heads": h.n_kv_heads,
        "head_dim": h.head_dim,
        "vocab_size": h.n_vocab,
        "max_position_embeddings": h.seq_len,
        "hidden_act": "silu",
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_THETA,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": h.shared_classifier,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _generation_config() -> dict:
    # llama2.c stops when the model samples BOS: TinyStories-style training data delimits
    # documents with BOS only, so the model ends a story by predicting BOS, never EOS.
    return {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, BOS_ID], "do_sample": False}


def import_llama2c(model_bin: Path, tokenizer_bin: Path, out_dir: Path, *, overwrite: bool = False) -> Path:
    """Convert a llama2.c legacy checkpoint + tokenizer into an HF Llama directory.

    Writes config.json, generation_config.json, model.safetensors (fp32), tokenizer.json and
    tokenizer_config.json. Everything is validated before anything is written; files go to a
    temporary directory beside ``out_dir`` that is renamed into place at the end, so a failure
    leaves no half-written output. An existing ``out_dir`` is refused unless ``overwrite``.
    Returns ``out_dir``.
    """
    from safetensors.numpy import save_file

    model_bin, tokenizer_bin, out_dir = Path(model_bin), Path(tokenizer_bin), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory already exists: {out_dir} (pass overwrite=True to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path exists and is not a directory: {out_dir}")
    h = read_llama2c_header(model_bin)
    vocab = read_llama2c_tokenizer(tokenizer_bin, vocab_size=h.n_vocab)
    tensors = _load_tensors(model_bin, h)
    _check_rope_tables(tensors, h, model_bin)
    state = _hf_state_dict(tensors, h)

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(_hf_config(h), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(), indent=2) + "\n")
        write_hf_tokenizer_files(vocab, tmp, model_max_length=h.seq_len)
    return out_dir


def packaged_stories260k() -> tuple[Path, Path]:
    """(model .bin, tokenizer .bin) of the stories260K copy shipped in converters/data/stories260K."""
    d = Path(__file__).resolve().parent.parent / "data" / "stories260K"
    model, tok = d / "stories260K.bin", d / "tok512.bin"
    for p in (model, tok):
        if not p.is_file():
            raise FileNotFoundError(f"packaged stories260K file missing: {p} (broken installation?)")
    return model, tok
