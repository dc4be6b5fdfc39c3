"""Import a Llama-architecture GGUF file (llama.cpp) as a Hugging Face Llama safetensors directory.

GGUF stores the same weights as a Hugging Face ``LlamaForCausalLM`` under other names, often
block-quantised, with the model's hyper-parameters and tokenizer in key/value metadata. The
import reads the file with ``gguf.GGUFReader`` (memory-mapped), dequantises one tensor at a time
with ``gguf.quants.dequantize`` and writes it straight into the output shards, so peak memory
is about one fp32 tensor plus the shard being assembled.

Tensor names (``N`` is the layer)::

    token_embd.weight          model.embed_tokens.weight
    blk.N.attn_norm.weight     model.layers.N.input_layernorm.weight
    blk.N.attn_q.weight        model.layers.N.self_attn.q_proj.weight     rows un-permuted, n_head
    blk.N.attn_k.weight        model.layers.N.self_attn.k_proj.weight     rows un-permuted, n_head_kv
    blk.N.attn_v.weight        model.layers.N.self_attn.v_proj.weight
    blk.N.attn_output.weight   model.layers.N.self_attn.o_proj.weight
    blk.N.ffn_norm.weight      model.layers.N.post_attention_layernorm.weight
    blk.N.ffn_gate.weight      model.layers.N.mlp.gate_proj.weight
    blk.N.ffn_up.weight        model.layers.N.mlp.up_proj.weight
    blk.N.ffn_down.weight      model.layers.N.mlp.down_proj.weight
    output_norm.weight         model.norm.weight
    output.weight              lm_head.weight        absent when the embeddings are tied
    (.bias of attn_q/k/v/output and of ffn_gate/up/down likewise, all or none of each group)

``rope_freqs.weight`` (Llama 3.1's per-frequency RoPE factors) is accepted only when every
factor is 1 (then it changes nothing and is dropped): the ``llama3`` rope_scaling parameters
Hugging Face needs are not stored in GGUF. Any other tensor name is refused rather than dropped.

Shapes: GGUF lists dimensions fastest-varying first (ggml's ``ne``), the reverse of torch's
order. A 2-D weight of ``ne = [in, out]`` is stored row-major as ``[out, in]``, exactly
``nn.Linear.weight``; ``GGUFReader`` already exposes the data in that (numpy) order and
``dequantize`` keeps it, so no transpose is needed, only the reversed ``ne`` to compare shapes.

The Q/K row permutation: llama.cpp applies RoPE to adjacent pairs (2i, 2i+1) of each head
("GPT-J"/interleaved style), Hugging Face Llama to (i, i + d/2) ("rotate_half"). With the same
frequency for pair i in both, the two compute the same attention when each head's output rows
of q_proj/k_proj are re-ordered. ``convert_hf_to_gguf.py`` does that on the way in::

    w.reshape(n_head, 2, d // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)

(row ``h*d_h + 2i + j`` of the GGUF tensor is HF row ``h*d_h + j*d_h/2 + i``), using
``n_head_kv`` for K. The import applies the inverse, ``reshape(n_head, d // n_head // 2, 2,
*rest).swapaxes(1, 2)``, which is transformers' own ``reverse_permute_weights``; a q/k bias, a
vector of the same rows, gets the same re-ordering.

config.json comes from the ``llama.*`` metadata; rope scaling other than none/linear, per-layer
head counts, MoE ("expert_count") and partial rotary dimensions are refused with the reason.
The tokenizer (and the chat template, ``tokenizer.chat_template``) is rebuilt by transformers'
own GGUF tokenizer conversion and saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from latentkv.checkpoint import CheckpointError, ShardedWriter, atomic_output_dir

__all__ = ["import_gguf", "read_gguf_config", "supported_quant_types", "SUPPORTED_ARCHITECTURE"]

log = logging.getLogger("latentkv.import_gguf")

SUPPORTED_ARCHITECTURE = "llama"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Per-layer GGUF tensor -> HF module name (the .weight / .bias suffix is carried over).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_ATTN_BIAS = ("attn_q", "attn_k", "attn_v", "attn_output")  # HF's attention_bias: all four or none
_MLP_BIAS = ("ffn_gate", "ffn_up", "ffn_down")  # HF's mlp_bias: all three or none


# ----------------------------------------------------------------------------------- reading

def _gguf():
    """The ``gguf`` package (llama.cpp's gguf-py on PyPI), imported on first use."""
    try:
        import gguf
    except ImportError:
        raise ImportError("importing GGUF files needs the `gguf` package: pip install gguf") from None
    return gguf


def _open(gguf_path: Path):
    gguf = _gguf()
    if not gguf_path.is_file():
        raise CheckpointError(f"GGUF file not found: {gguf_path}")
    try:
        return gguf.GGUFReader(str(gguf_path), "r")
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on junk
        raise CheckpointError(f"{gguf_path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def _value(field) -> Any:
    """A metadata value as a Python scalar, string or list."""
    v = field.contents()
    return v.item() if isinstance(v, np.generic) else v


def _meta(reader, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise CheckpointError(f"GGUF metadata lacks {key!r}, which a Llama model needs")
        return default
    return _value(field)


_DEQUANT_OK: dict[int, bool] = {}


def _can_dequantize(qtype) -> bool:
    """Whether the installed gguf package dequantises ``qtype`` (probed on one zero block)."""
    gguf = _gguf()
    if int(qtype) not in _DEQUANT_OK:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            out = gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
            ok = np.asarray(out).dtype.kind == "f" and np.asarray(out).size == block
        except (NotImplementedError, KeyError, ValueError, TypeError):
            ok = False
        _DEQUANT_OK[int(qtype)] = ok
    return _DEQUANT_OK[int(qtype)]


def supported_quant_types() -> list[str]:
    """Names of the GGML tensor types the installed gguf package can dequantise."""
    gguf = _gguf()
    return [t.name for t in gguf.GGMLQuantizationType if t in gguf.GGML_QUANT_SIZES and _can_dequantize(t)]


def _rope_scaling(reader, where: str) -> dict | None:
    """HF rope_scaling from GGUF metadata; only none and linear exist in both worlds unambiguously."""
    p = f"{SUPPORTED_ARCHITECTURE}.rope."
    kind = _meta(reader, p + "scaling.type", None)
    factor = _meta(reader, p + "scaling.factor", None)
    legacy = _meta(reader, p + "scale_linear", None)  # older GGUFs: linear factor without a type
    if kind in (None, "none"):
        if legacy is not None and float(legacy) != 1.0:
            return {"rope_type": "linear", "factor": _f32(legacy)}
        if kind is None and factor is not None and float(factor) != 1.0:
            raise CheckpointError(f"{where}: rope.scaling.factor={factor} without a scaling type; "
                                  "cannot tell how to apply it")
        return None
    if kind == "linear":
        if factor is None:
            raise CheckpointError(f"{where}: linear rope scaling without rope.scaling.factor")
        return None if float(factor) == 1.0 else {"rope_type": "linear", "factor": _f32(factor)}
    raise CheckpointError(
        f"{where}: rope scaling type {kind!r} is not supported by the GGUF importer (it handles none and "
        "linear); import the original Hugging Face checkpoint instead"
    )


@dataclass(frozen=True)
class _Plan:
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]  # torch order
    permute_heads: int | None  # un-permute rows per head for RoPE (q: n_head, k: n_head_kv)


def read_gguf_config(gguf_path: Path, reader=None) -> dict:
    """The Hugging Face config.json (a dict) of a Llama GGUF file, validated; no tensor is read."""
    gguf_path = Path(gguf_path)
    reader = reader if reader is not None else _open(gguf_path)
    config, _ = _plan(reader, gguf_path)
    return config


def _plan(reader, gguf_path: Path) -> tuple[dict, list[_Plan]]:
    """Check the whole file (metadata, tensor names, shapes, types) before anything is written."""
    where = str(gguf_path)
    arch = _meta(reader, "general.architecture", None)
    if arch != SUPPORTED_ARCHITECTURE:
        raise CheckpointError(
            f"{where}: GGUF architecture is {arch!r}; the GGUF importer supports only {SUPPORTED_ARCHITECTURE!r} "
            "(Llama-family models as llama.cpp writes them: Llama, SmolLM, TinyLlama, Mistral without sliding window)"
        )
    a = SUPPORTED_ARCHITECTURE + "."
    n_layers = int(_meta(reader, a + "block_count"))
    hidden = int(_meta(reader, a + "embedding_length"))
    ffn = int(_meta(reader, a + "feed_forward_length"))
    n_head = _meta(reader, a + "attention.head_count")
    n_kv = _meta(reader, a + "attention.head_count_kv", n_head)
    for key, v in (("head_count", n_head), ("head_count_kv", n_kv)):
        if isinstance(v, list):  # llama.cpp allows per-layer head counts; HF Llama does not
            if len(set(v)) != 1:
                raise CheckpointError(f"{where}: per-layer attention.{key} {v} is not supported (HF Llama has one)")
    n_head = int(n_head[0] if isinstance(n_head, list) else n_head)
    n_kv = int(n_kv[0] if isinstance(n_kv, list) else n_kv)
    if _meta(reader, a + "expert_count", 0):
        raise CheckpointError(f"{where}: a mixture-of-experts Llama (expert_count > 0) is not supported")
    if n_head <= 0 or n_kv <= 0 or n_head % n_kv:
        raise CheckpointError(f"{where}: head_count={n_head} is not a positive multiple of head_count_kv={n_kv}")
    head_dim = int(_meta(reader, a + "attention.key_length", hidden // n_head))
    v_dim = int(_meta(reader, a + "attention.value_length", head_dim))
    if v_dim != head_dim:
        raise CheckpointError(f"{where}: key_length {head_dim} != value_length {v_dim}; HF Llama needs them equal")
    rope_dim = int(_meta(reader, a + "rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise CheckpointError(f"{where}: RoPE on {rope_dim} of {head_dim} head dims (partial rotary) is not supported")
    if head_dim % 2:
        raise CheckpointError(f"{where}: head_dim {head_dim} is odd; RoPE needs an even head size")
    rope_scaling = _rope_scaling(reader, where)

    tensors = {t.name: t for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _meta(reader, a + "vocab_size", None)
    if vocab is None:
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    if vocab is None:
        raise CheckpointError(f"{where}: no vocab size (no {a}vocab_size, tokenizer or token_embd.weight)")
    vocab = int(vocab)

    qo, kv = n_head * head_dim, n_kv * head_dim
    hf_shapes = {
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (qo, hidden), "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, qo),
        "self_attn.q_proj.bias": (qo,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.bias": (hidden,),
        "mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden),
        "mlp.down_proj.weight": (hidden, ffn),
        "mlp.gate_proj.bias": (ffn,), "mlp.up_proj.bias": (ffn,), "mlp.down_proj.bias": (hidden,),
        "model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden),
    }

    plans: list[_Plan] = []
    refused: list[str] = []
    for name, t in tensors.items():
        m = _LAYER_RE.match(name)
        if name in _GLOBAL_NAMES:
            hf = _GLOBAL_NAMES[name]
            shape, heads = hf_shapes[hf], None
        elif m and m.group(2) in _LAYER_NAMES and int(m.group(1)) < n_layers:
            i, part, kind = int(m.group(1)), m.group(2), m.group(3)
            module = _LAYER_NAMES[part]
            if kind == "bias" and part.endswith("_norm"):
                refused.append(f"{name} (norm bias: HF Llama's RMSNorm has none)")
                continue
            hf = f"model.layers.{i}.{module}.{kind}"
            shape = hf_shapes[f"{module}.{kind}"]
            heads = {"attn_q": n_head, "attn_k": n_kv}.get(part)
        elif name == "rope_freqs.weight":
            if not _rope_freqs_are_identity(t):
                refused.append(f"{name} (Llama 3.1-style RoPE frequency factors; the llama3 rope_scaling "
                               "parameters cannot be recovered from GGUF, import the HF checkpoint instead)")
            else:
                log.info("dropping %s: every factor is 1, so it does not change RoPE", name)
            continue
        else:
            refused.append(name)
            continue
        got = tuple(int(d) for d in reversed(t.shape))  # GGUF ne order is fastest-first
        if got != shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {got} (torch order); "
                                  f"the metadata implies {shape} for {hf}")
        if not _can_dequantize(t.tensor_type):
            raise CheckpointError(
                f"{where}: tensor {name} is stored as {t.tensor_type.name}, which the installed gguf package cannot "
                f"dequantise; supported types: {', '.join(supported_quant_types())}"
            )
        plans.append(_Plan(name, hf, shape, heads))
    if refused:
        raise CheckpointError(f"{where}: tensors a Hugging Face Llama has no place for: {', '.join(sorted(refused))}")

    have = {p.hf_name for p in plans}
    required = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{m}.weight" for i in range(n_layers) for m in _LAYER_NAMES.values()]
    missing = [n for n in required if n not in have]
    if missing:
        raise CheckpointError(f"{where}: missing tensors for {', '.join(missing[:5])}"
                              f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
    biases = {}
    for group, parts in (("attention_bias", _ATTN_BIAS), ("mlp_bias", _MLP_BIAS)):
        names = [f"blk.{i}.{p}.bias" for i in range(n_layers) for p in parts]
        present = sum(n in tensors for n in names)
        if present not in (0, len(names)):
            raise CheckpointError(f"{where}: {present} of the {len(names)} biases of {', '.join(parts)} are present; "
                                  f"HF Llama's {group} needs all of them or none")
        biases[group] = present > 0

    tied = "lm_head.weight" not in have
    bos = _meta(reader, "tokenizer.ggml.bos_token_id", None)
    eos = _meta(reader, "tokenizer.ggml.eos_token_id", None)
    pad = _meta(reader, "tokenizer.ggml.padding_token_id", None)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": int(_meta(reader, a + "context_length")),
        "hidden_act": "silu",
        "rms_norm_eps": _f32(_meta(reader, a + "attention.layer_norm_rms_epsilon")),
        # llama.cpp's default base when a file leaves it out
        "rope_theta": _f32(_meta(reader, a + "rope.freq_base", 10000.0)),
        **({"rope_scaling": rope_scaling} if rope_scaling else {}),  # a null key makes newer transformers warn
        "attention_bias": biases["attention_bias"],
        "mlp_bias": biases["mlp_bias"],
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": tied,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "use_cache": True,
    }
    return config, plans


def _f32(x: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def _rope_freqs_are_identity(t) -> bool:
    gguf = _gguf()
    if not _can_dequantize(t.tensor_type):
        return False
    return bool(np.all(gguf.quants.dequantize(t.data, t.tensor_type) == 1.0))


# ----------------------------------------------------------------------------------- converting

def _unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf.py's ``permute``: per head, rows (2i + j) -> (j * d_h/2 + i).

    llama.cpp rotates adjacent pairs; HF Llama rotates the two halves of each head. ``w`` is a
    q/k weight [rows, in] or bias [rows].
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantize(t, plan: _Plan) -> torch.Tensor:
    gguf = _gguf()
    arr = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    if np.may_share_memory(arr, t.data):
        # F32 tensors come back as a view of the read-only memory map: copy them off it.
        arr = arr.copy()
    w = torch.from_numpy(arr).reshape(plan.shape)
    if plan.permute_heads is not None:
        w = _unpermute_rope_rows(w, plan.permute_heads)
    return w


def _load_tokenizer(gguf_path: Path, reader, model_max_length: int):
    """transformers' own GGUF tokenizer conversion (the chat template comes along)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:  # transformers raises a variety of errors for tokenizers it cannot convert
        raise CheckpointError(
            f"{gguf_path}: transformers could not convert the GGUF tokenizer ({type(e).__name__}: {e})"
        ) from e
    tok.model_max_length = model_max_length
    _apply_add_special(tok, reader)
    return tok


def _apply_add_special(tok, reader) -> None:
    """Make the tokenizer add BOS/EOS exactly when llama.cpp would (tokenizer.ggml.add_bos/eos_token).

    transformers' conversion does not read these flags: a byte-level (Llama 3 style) vocabulary
    comes out never adding BOS although the file asks for it, and the model was trained with it.
    """
    for which in ("bos", "eos"):
        want = _meta(reader, f"tokenizer.ggml.add_{which}_token", None)
        attr = f"add_{which}_token"
        if want is None or bool(getattr(tok, attr, None)) == bool(want):
            continue
        token_id = getattr(tok, f"{which}_token_id", None)
        try:
            setattr(tok, attr, bool(want))  # transformers' fast tokenizers rebuild their post-processor
        except AttributeError:
            pass
        ids = tok("a")["input_ids"]
        got = (ids[:1] if which == "bos" else ids[-1:]) == [token_id]
        if token_id is not None and got != bool(want):
            log.warning("the GGUF says %s=%s but the converted tokenizer could not be made to follow it",
                        attr, bool(want))


_SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _drop_tokens_beyond_vocab(out: Path, vocab_size: int) -> list[str]:
    """Remove added tokens whose id has no embedding row; returns their text.

    transformers builds a byte-level GGUF tokenizer with GPT2Tokenizer, whose default special
    token "<|endoftext|>" is appended as a new token when the GGUF vocabulary lacks it (Llama 3
    files, for one). Its id is then vocab_size: text containing it would index past the
    embedding, and servers reject tokenizers longer than the model's vocabulary.
    """
    path = out / "tokenizer.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    extra = [t for t in data.get("added_tokens", []) if t["id"] >= vocab_size]
    if not extra:
        return []
    dropped = {t["content"] for t in extra}
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < vocab_size]
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        for t in extra:
            if vocab.get(t["content"]) == t["id"]:
                del vocab[t["content"]]
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = out / name
        if not p.is_file():
            continue
        cfg = json.loads(p.read_text(encoding="utf-8"))
        for role in _SPECIAL_ROLES:
            v = cfg.get(role)
            if (v.get("content") if isinstance(v, dict) else v) in dropped:
                cfg[role] = None
        if isinstance(cfg.get("added_tokens_decoder"), dict):
            cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) < vocab_size}
        p.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return sorted(dropped)


def _save_tokenizer(tok, reader, out: Path, vocab_size: int) -> None:
    tok.save_pretrained(str(out))
    dropped = _drop_tokens_beyond_vocab(out, vocab_size)
    if dropped:
        log.warning("dropped tokenizer token(s) %s: transformers' GGUF tokenizer conversion adds them, but the "
                    "model's vocabulary (%d) has no embedding row for them", dropped, vocab_size)
        from transformers import AutoTokenizer

        if len(AutoTokenizer.from_pretrained(str(out))) > vocab_size:
            raise CheckpointError(f"the converted tokenizer is still longer than the vocabulary ({vocab_size})")
    # Do not write hub/loader bookkeeping that save_pretrained may copy from the load kwargs.
    cfg_path = out / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        for key in ("is_local", "local_files_only", "gguf_file", "name_or_path"):
            cfg.pop(key, None)
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    template = _meta(reader, "tokenizer.chat_template", None)
    if template and not _has_chat_template(out):
        # Older transformers versions drop it on save; the model is unusable for chat without it.
        (out / "chat_template.jinja").write_text(template)


def _has_chat_template(d: Path) -> bool:
    if (d / "chat_template.jinja").is_file():
        return True
    cfg = d / "tokenizer_config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("chat_template"))


def _generation_config(reader, config: dict) -> dict:
    eos = config["eos_token_id"]
    # Chat models also end a turn with EOT/EOM tokens (Llama 3: <|eot_id|>, <|eom_id|>); llama.cpp
    # stops on all of them, so generation should too.
    extra = [_meta(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("eot", "eom")]
    stops = [int(x) for x in [eos, *extra] if x is not None]
    stops = list(dict.fromkeys(stops))
    gen: dict[str, Any] = {"bos_token_id": config["bos_token_id"]}
    gen["eos_token_id"] = stops[0] if len(stops) == 1 else (stops or None)
    if config["pad_token_id"] is not None:
        gen["pad_token_id"] = config["pad_token_id"]
    return gen


def import_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    shard_bytes: int | None = None,
) -> Path:
    """Convert a Llama GGUF file into a Hugging Face ``LlamaForCausalLM`` directory; returns ``out_dir``.

    Writes config.json, generation_config.json, the tokenizer (tokenizer.json,
    tokenizer_config.json, chat_template.jinja when the GGUF has a chat template) and the weights
    in ``dtype`` (float32, float16 or bfloat16) as safetensors. The file is checked completely
    (architecture, metadata, tensor names, shapes, quantisation types) before anything is
    written, and the output appears only when everything succeeded.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists; pass --overwrite to replace it")
    torch_dtype = DTYPES[dtype]
    reader = _open(gguf_path)
    config, plans = _plan(reader, gguf_path)
    config["torch_dtype"] = dtype
    tok = _load_tokenizer(gguf_path, reader, config["max_position_embeddings"])
    by_name = {t.name: t for t in reader.tensors}

    writer_kwargs: dict[str, Any] = {} if shard_bytes is None else {"shard_bytes": shard_bytes}
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, **writer_kwargs)
        bar = tqdm(plans, desc=f"import {gguf_path.name}", unit="tensor", disable=not progress, dynamic_ncols=True)
        for plan in bar:
            writer.add(plan.hf_name, _dequantize(by_name[plan.gguf_name], plan).to(torch_dtype))
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(reader, config), indent=2) + "\n")
        _save_tokenizer(tok, reader, tmp, config["vocab_size"])
    log.info("imported %s (%d tensors, %s) into %s", gguf_path.name, len(plans), dtype, out_dir)
    return out_dir
