"""llama2.c tokenizer (``tok*.bin``) -> Hugging Face ``tokenizers`` tokenizer.

llama2.c tokenizer file format (``tokenizer.py`` export in karpathy/llama2.c)::

    int32 max_token_length
    repeat vocab_size times:  float32 score, int32 n_bytes, n_bytes of token text (UTF-8)

Ids 0/1/2 are ``<unk>`` / BOS (stored as ``"\\n<s>\\n"``) / EOS (``"\\n</s>\\n"``), ids 3..258
are the byte-fallback tokens ``<0x00>``..``<0xFF>``, spaces are literal (no ``▁``).

llama2.c's ``encode()`` (run.c), which this module reproduces:

    tokens = [BOS] if bos
    if text: tokens += [id(" ")]              # sentencepiece's dummy-space prefix
    for each UTF-8 code point c in text:
        tokens += [id(c)] if c in vocab else [byte + 3 for byte in utf8(c)]   # byte fallback
    repeat:                                    # BPE, "merges by highest score"
        among adjacent pairs (a, b) with str(a)+str(b) in vocab, take the one whose merged
        token has the highest score (leftmost on ties); replace it by the merged token
    until no pair merges

An HF BPE model does the same thing when its merges are ranked by the score of the merged token
(every split of a vocab token into two vocab tokens is a merge rule) and the whole text is one
"word" (no pre-tokenizer, so merges may cross spaces exactly as in llama2.c). The dummy space is
a ``Prepend(" ")`` normalizer (it leaves empty text empty, as llama2.c does) and BOS comes from a
``TemplateProcessing`` post-processor. Decoding: ``ByteFallback`` turns ``<0xNN>`` into bytes,
``Fuse`` joins the pieces and ``Strip(" ", 1, 0)`` drops the leading space of the first token,
which is llama2.c's "drop the leading space of the token after BOS" when BOS is skipped.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Llama2cVocab",
    "read_llama2c_tokenizer",
    "llama2c_encode",
    "llama2c_decode",
    "derive_merges",
    "build_hf_tokenizer",
    "write_hf_tokenizer_files",
    "UNK_ID",
    "BOS_ID",
    "EOS_ID",
]

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# HF names of the three special tokens (llama2.c stores BOS/EOS as "\n<s>\n" / "\n</s>\n").
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
N_BYTE_TOKENS = 256
BYTE_OFFSET = 3  # llama2.c: byte b is token b + 3


@dataclass(frozen=True)
class Llama2cVocab:
    """The contents of a llama2.c tokenizer file."""

    pieces: list[bytes]  # raw token bytes as stored (BOS = b"\n<s>\n", ...)
    scores: list[float]
    max_token_length: int

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)


def read_llama2c_tokenizer(path: Path, vocab_size: int | None = None) -> Llama2cVocab:
    """Parse a llama2.c tokenizer file.

    The file does not store its vocabulary size: it is the number of records. When
    ``vocab_size`` (from the model header) is given, the file must hold exactly that many.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c tokenizer file not found: {path}")
    data = path.read_bytes()
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes is too short for a llama2.c tokenizer "
                         "(needs at least the 4-byte max_token_length header)")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if max_len <= 0:
        raise ValueError(f"{path}: max_token_length in the header is {max_len}, must be positive")
    pieces: list[bytes] = []
    scores: list[float] = []
    off = 4
    while off < len(data):
        if off + 8 > len(data):
            raise ValueError(f"{path}: truncated record header for token {len(pieces)} at byte {off}")
        score, n = struct.unpack_from("<fi", data, off)
        off += 8
        if n < 0 or n > max_len or off + n > len(data):
            raise ValueError(f"{path}: token {len(pieces)} at byte {off - 8} has length {n} "
                             f"(max_token_length {max_len}, {len(data) - off} bytes left): "
                             "file is truncated or not a llama2.c tokenizer")
        pieces.append(data[off:off + n])
        scores.append(float(score))
        off += n
        if vocab_size is not None and len(pieces) > vocab_size:
            raise ValueError(f"{path}: holds more than the model's vocab_size={vocab_size} tokens")
    if vocab_size is not None and len(pieces) != vocab_size:
        raise ValueError(f"{path}: holds {len(pieces)} tokens but the model's vocab_size is "
                         f"{vocab_size} (tokenizer and checkpoint do not belong together?)")
    if len(pieces) < BYTE_OFFSET + N_BYTE_TOKENS:
        raise ValueError(f"{path}: {len(pieces)} tokens, fewer than the 3 special + 256 byte tokens "
                         "a llama2.c sentencepiece tokenizer has")
    for b in range(N_BYTE_TOKENS):
        want = f"<0x{b:02X}>".encode()
        if pieces[BYTE_OFFSET + b] != want:
            raise ValueError(f"{path}: token {BYTE_OFFSET + b} is {pieces[BYTE_OFFSET + b]!r}, "
                             f"expected the byte-fallback token {want!r}")
    return Llama2cVocab(pieces=pieces, scores=scores, max_token_length=max_len)


# ---------------------------------------------------------------------------------------------
# Direct port of llama2.c's encode()/decode() (run.c), the reference the HF tokenizer must match.
# ---------------------------------------------------------------------------------------------

def llama2c_encode(vocab: Llama2cVocab, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    """Token ids exactly as llama2.c's ``encode(t, text, bos, eos, ...)`` produces them."""
    lookup = {p: i for i, p in enumerate(vocab.pieces)}  # str_lookup (first id for duplicates
    # would be bsearch-dependent in C; llama2.c vocabularies have unique pieces)
    scores = vocab.scores
    tokens: list[int] = []
    if bos:
        tokens.append(BOS_ID)
    if text:
        tokens.append(lookup[b" "])  # add_dummy_prefix
    for ch in text:  # full code points
        cb = ch.encode("utf-8")
        tid = lookup.get(cb)
        if tid is not None:
            tokens.append(tid)
        else:
            tokens.extend(b + BYTE_OFFSET for b in cb)
    pieces = vocab.pieces
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            tid = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if tid is not None and scores[tid] > best_score:
                best_score, best_id, best_idx = scores[tid], tid, i
        if best_idx == -1:
            break
        tokens[best_idx:best_idx + 2] = [best_id]
    if eos:
        tokens.append(EOS_ID)
    return tokens


def llama2c_decode(vocab: Llama2cVocab, ids: list[int]) -> bytes:
    """Bytes llama2.c prints for ``ids`` (a sequence that starts with its first token, usually
    BOS, which itself is not printed): each token's piece, without the leading space when the
    previous token is BOS, ``<0xNN>`` as the raw byte; non-printable single bytes are skipped
    (``safe_printf``)."""
    out = bytearray()
    for prev, tok in zip(ids[:-1], ids[1:]):
        piece = vocab.pieces[tok]
        if prev == BOS_ID and piece.startswith(b" "):
            piece = piece[1:]
        if BYTE_OFFSET <= tok < BYTE_OFFSET + N_BYTE_TOKENS:
            piece = bytes([tok - BYTE_OFFSET])
        if len(piece) == 1 and not (32 <= piece[0] < 127 or piece[0] in b" \t\n\v\f\r"):
            continue  # safe_printf: C isprint/isspace in the "C" locale
        out += piece
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# HF tokenizer
# ---------------------------------------------------------------------------------------------

def _hf_vocab_strings(vocab: Llama2cVocab) -> list[str]:
    names: list[str] = []
    for i, p in enumerate(vocab.pieces):
        if i < len(SPECIAL_TOKENS):
            names.append(SPECIAL_TOKENS[i])
            continue
        try:
            names.append(p.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"token {i} ({p!r}) is not valid UTF-8; an HF BPE vocabulary needs "
                             "text tokens") from e
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate token strings in the llama2.c vocabulary: {dup[:5]!r}")
    return names


def derive_merges(vocab: Llama2cVocab) -> list[tuple[str, str]]:
    """Ordered BPE merges equivalent to llama2.c's "merge the pair whose result scores highest".

    Every split of a (non-special, non-byte) token into two vocabulary tokens is a merge rule;
    rules are ranked by the merged token's score, highest first (ties: lower merged id first).
    """
    names = _hf_vocab_strings(vocab)
    first_text = BYTE_OFFSET + N_BYTE_TOKENS
    ids = {n: i for i, n in enumerate(names) if i >= first_text}  # byte/special never merge
    rules: list[tuple[float, int, int, tuple[str, str]]] = []
    for tid in range(first_text, vocab.vocab_size):
        s = names[tid]
        for k in range(1, len(s)):  # code-point splits; both halves must be vocab tokens
            a, b = s[:k], s[k:]
            if a in ids and b in ids:
                rules.append((-vocab.scores[tid], tid, k, (a, b)))
    rules.sort()
    return [r[3] for r in rules]


def build_hf_tokenizer(vocab: Llama2cVocab):
    """A ``tokenizers.Tokenizer`` that encodes and decodes like llama2.c (see module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    names = _hf_vocab_strings(vocab)
    bpe = models.BPE(
        vocab={n: i for i, n in enumerate(names)},
        merges=derive_merges(vocab),
        unk_token=SPECIAL_TOKENS[UNK_ID],
        byte_fallback=True,
        fuse_unk=True,
        ignore_merges=False,
    )
    tok = Tokenizer(bpe)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.normalizer = normalizers.Prepend(" ")  # llama2.c's dummy-space prefix (skipped for "")
    tok.pre_tokenizer = None  # whole text is one BPE word: merges may cross spaces, as in run.c
    bos = SPECIAL_TOKENS[BOS_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, BOS_ID)],
    )
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok


def write_hf_tokenizer_files(vocab: Llama2cVocab, out_dir: Path, *, model_max_length: int) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``.

    ``tokenizer_class`` is ``PreTrainedTokenizerFast`` on purpose: ``LlamaTokenizer(Fast)``
    would rebuild a ``▁``-metaspace pipeline and not use the one in tokenizer.json.
    """
    out_dir = Path(out_dir)
    tok = build_hf_tokenizer(vocab)
    tok.save(str(out_dir / "tokenizer.json"))
    unk, bos, eos = SPECIAL_TOKENS
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": added,
        "legacy": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
