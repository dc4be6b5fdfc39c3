"""Text sources for evaluation and calibration.

Pipeline (each step a plain function, so callers can stop anywhere)::

    read_documents(path)              -> list[str]         plain text or JSON lines
    tokenize_documents(tok, docs)     -> list[list[int]]   BOS + tokens, one list per document
    eval_windows(token_docs, S)       -> list[LongTensor]  non-overlapping windows, <= S tokens
    calibration_samples(token_docs, N, L, seed) -> LongTensor [N, L]

Documents:
  * plain text containing ``<|endoftext|>`` (TinyStories): split on that separator;
  * other plain text: paragraphs separated by blank lines;
  * JSON lines (``.jsonl``/``.json``, or ``fmt="jsonl"``): one document per line, from the field
    ``text_field`` (default ``"text"``).
  Each document is stripped of surrounding whitespace; empty documents are dropped.

Windows (``eval_windows``):
  * ``mode="document"`` (default; use it for TinyStories): every document is its own token
    stream ``[BOS, t1, t2, ...]``, cut into consecutive windows of at most ``seq_len`` tokens; a
    short document is one short window. Only the first window of a document starts with BOS.
  * ``mode="stream"``: the documents' token lists (each with its BOS) are concatenated and cut
    into full windows of exactly ``seq_len`` tokens; the incomplete tail is dropped.
  * ``mode="raw"`` (``load_eval_windows`` only; use it for WikiText-2 and PTB): the file's whole
    text, read as it is (JSON lines: the documents joined by blank lines), is tokenized once
    without special tokens and cut into full windows of ``seq_len`` tokens. This is the protocol
    of GPTQ, LatentLLM and most compression papers (their "wikitext2 perplexity"), minus the one
    BOS they put at the very start; it scores every token of the test set once.
  The first token of each window is context only (it is never predicted), see
  ``latentkv.evaluate.perplexity``.

Calibration (``calibration_samples``): N sequences of exactly L tokens from the concatenated
stream; each starts at a randomly chosen document start (``align="document"``, so position 0 is
that document's BOS, as at inference) or at a random token offset (``align="token"``), drawn
with a ``torch.Generator`` seeded by ``seed`` (same inputs + seed -> same samples) and without
repeats until every start has been drawn once. Several texts
(``load_calibration_samples``) share the N sequences, interleaved.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = [
    "read_documents",
    "tokenize_documents",
    "eval_windows",
    "calibration_starts",
    "calibration_samples",
    "split_documents",
    "check_tokenizer_matches",
    "load_eval_windows",
    "calibration_shares",
    "load_calibration_samples",
    "ENDOFTEXT",
]

ENDOFTEXT = "<|endoftext|>"  # TinyStories document separator
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def read_documents(
    path: str | Path,
    *,
    fmt: Literal["auto", "text", "jsonl"] = "auto",
    text_field: str = "text",
) -> list[str]:
    """Read a text file or a JSON-lines file into a list of non-empty documents (see module doc)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text file not found: {path}")
    if not path.is_file():
        raise ValueError(f"not a file: {path}")
    if fmt == "auto":
        fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".json") else "text"
    if fmt not in ("text", "jsonl"):
        raise ValueError(f"unknown text format {fmt!r}; use 'text', 'jsonl' or 'auto'")
    raw = path.read_text(encoding="utf-8")
    if not raw.strip():
        raise ValueError(f"text file is empty (or only whitespace): {path}")

    if fmt == "jsonl":
        docs = _read_jsonl(raw, path, text_field)
    else:
        parts = raw.split(ENDOFTEXT) if ENDOFTEXT in raw else _BLANK_LINE.split(raw)
        docs = [p.strip() for p in parts]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"no non-empty documents in {path}")
    return docs


def _read_jsonl(raw: str, path: Path, field: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one JSON object "
                             "per line (or pass fmt='text' for a plain-text file)") from None
        if not isinstance(obj, dict) or field not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
            raise ValueError(f"{path}:{lineno}: no field {field!r} in this JSON line (it has: {keys}); "
                             "choose the text field with --text-field / text_field=")
        if not isinstance(obj[field], str):
            raise ValueError(f"{path}:{lineno}: field {field!r} is a {type(obj[field]).__name__}, "
                             "not a string")
        docs.append(obj[field].strip())
    return docs


def split_documents(docs: Sequence[str], n_heldout: int) -> tuple[list[str], list[str]]:
    """(calibration part, held-out part): the last ``n_heldout`` documents are held out."""
    if not 0 < n_heldout < len(docs):
        raise ValueError(f"cannot hold out {n_heldout} of {len(docs)} documents "
                         "(need 0 < n_heldout < number of documents)")
    return list(docs[:-n_heldout]), list(docs[-n_heldout:])


def tokenize_documents(tokenizer: Any, docs: Sequence[str], *, add_bos: bool = True) -> list[list[int]]:
    """Token ids per document with an HF tokenizer; ``add_bos`` prepends ``tokenizer.bos_token_id``.

    Special tokens are added here, not by the tokenizer (``add_special_tokens=False``), so every
    document gets exactly one BOS whatever the tokenizer's own template does. The tokenizer's
    normalizer still runs (for llama2.c tokenizers that is the dummy-space prefix).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no BOS token; "
                         "pass add_bos=False to tokenize without one")
    enc = tokenizer(list(docs), add_special_tokens=False, verbose=False)["input_ids"]  # long documents are cut later
    return [([bos] if add_bos else []) + list(ids) for ids in enc]


def eval_windows(
    token_docs: Sequence[Sequence[int]],
    seq_len: int,
    *,
    mode: Literal["document", "stream"] = "document",
    max_windows: int | None = None,
) -> list[torch.Tensor]:
    """Non-overlapping evaluation windows (1-D LongTensors), in text order, at most ``max_windows``."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: a window needs at least 2 tokens (context + one predicted)")
    if max_windows is not None and max_windows <= 0:
        raise ValueError(f"max_windows={max_windows} must be positive (or None for all)")
    n_tokens = sum(len(d) for d in token_docs)
    windows: list[torch.Tensor] = []
    if mode == "document":
        for doc in token_docs:
            for s in range(0, len(doc), seq_len):
                chunk = doc[s:s + seq_len]
                if len(chunk) >= 2:  # a lone trailing token has nothing to predict
                    windows.append(torch.tensor(chunk, dtype=torch.long))
        if not windows:
            raise ValueError(f"not enough text: {n_tokens} tokens in {len(token_docs)} documents, "
                             "no document has the 2 tokens a window needs")
    elif mode == "stream":
        stream = [t for d in token_docs for t in d]
        if len(stream) < seq_len:
            raise ValueError(f"not enough text for one window: {len(stream)} tokens, "
                             f"{seq_len} needed (seq_len)")
        t = torch.tensor(stream, dtype=torch.long)
        windows = list(t[: len(stream) // seq_len * seq_len].view(-1, seq_len).unbind(0))
    else:
        raise ValueError(f"unknown window mode {mode!r}; use 'document' or 'stream'")
    return windows[:max_windows] if max_windows is not None else windows


def calibration_starts(
    token_docs: Sequence[Sequence[int]],
    n_samples: int,
    seq_len: int,
    *,
    seed: int = 0,
    align: Literal["document", "token"] = "document",
) -> list[int]:
    """Where each of ``calibration_samples``' sequences starts in the concatenated token stream."""
    if n_samples <= 0 or seq_len <= 0:
        raise ValueError(f"n_samples={n_samples} and seq_len={seq_len} must be positive")
    n_tokens = sum(len(d) for d in token_docs)
    if n_tokens < seq_len:
        raise ValueError(f"not enough text for one calibration sequence: {n_tokens} tokens, "
                         f"{seq_len} needed (seq_len)")
    if align == "document":
        starts = torch.tensor([0] + [len(d) for d in token_docs[:-1]], dtype=torch.long).cumsum(0)
        starts = starts[starts + seq_len <= n_tokens]  # room for L tokens after the start
    elif align == "token":
        starts = torch.arange(n_tokens - seq_len + 1)
    else:
        raise ValueError(f"unknown align {align!r}; use 'document' or 'token'")
    g = torch.Generator().manual_seed(seed)
    return starts[_draws_without_repeats(len(starts), n_samples, g)].tolist()


def _draws_without_repeats(n_choices: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` uniform draws from ``range(n_choices)``, none repeated until every choice has been drawn.

    A repeated calibration sequence adds no text, and plain uniform draws of 512 sequences from the
    1,000 documents of the shipped C4 sample repeat many. Drawn in rounds: each round
    draws as many as are still missing and keeps the first draw of each choice not yet taken, then a
    new pass starts once every choice is taken. A draw with no repeat is therefore the plain uniform
    draw (the default 32 sequences are, at seed 0), so samples and tables from before this change
    reproduce wherever they had no repeat.
    """
    picked: list[int] = []
    taken: set[int] = set()
    while len(picked) < n:
        for i in torch.randint(n_choices, (n - len(picked),), generator=generator).tolist():
            if i in taken:
                continue
            picked.append(i)
            taken.add(i)
            if len(taken) == n_choices:  # every choice drawn once: the next round starts a new pass
                taken.clear()
                break
    return torch.tensor(picked, dtype=torch.long)


def calibration_samples(
    token_docs: Sequence[Sequence[int]],
    n_samples: int,
    seq_len: int,
    *,
    seed: int = 0,
    align: Literal["document", "token"] = "document",
) -> torch.Tensor:
    """``n_samples`` sequences of exactly ``seq_len`` tokens, reproducible from ``seed`` -> [N, L]."""
    starts = calibration_starts(token_docs, n_samples, seq_len, seed=seed, align=align)
    stream = torch.tensor([t for d in token_docs for t in d], dtype=torch.long)
    return torch.stack([stream[s:s + seq_len] for s in starts])


def check_tokenizer_matches(tokenizer: Any, model_config: Any) -> None:
    """Raise if ``tokenizer`` cannot belong to a model with ``model_config`` (an HF config, a dict,
    or anything with ``vocab_size``).

    The tokenizer's size (``len(tokenizer)``, added tokens included) must equal the model's
    ``vocab_size``, except that models may pad their embedding to a few more rows than the
    tokenizer uses (e.g. to a multiple of 64/128): up to max(128, 1%) extra rows are accepted.
    """
    vocab = model_config.get("vocab_size") if isinstance(model_config, dict) else getattr(model_config, "vocab_size", None)
    if vocab is None:
        raise ValueError("model config has no vocab_size")
    n_tok = len(tokenizer)
    if n_tok > vocab:
        raise ValueError(f"tokenizer has {n_tok} tokens but the model's vocab_size is {vocab}: token ids "
                         f"up to {n_tok - 1} would be out of range. Wrong tokenizer for this model?")
    if vocab - n_tok > max(128, vocab // 100):
        raise ValueError(f"tokenizer has {n_tok} tokens but the model's vocab_size is {vocab}; this is "
                         "more than embedding padding explains. Wrong tokenizer for this model?")


def load_eval_windows(
    path: str | Path,
    tokenizer: Any,
    seq_len: int,
    *,
    max_windows: int | None = None,
    mode: Literal["document", "stream", "raw"] = "document",
    fmt: Literal["auto", "text", "jsonl"] = "auto",
    text_field: str = "text",
) -> list[torch.Tensor]:
    """read_documents -> tokenize_documents (BOS per document) -> eval_windows; or, with
    ``mode="raw"``, the whole text as one token stream without BOS (see the module doc)."""
    if mode != "raw":
        docs = read_documents(path, fmt=fmt, text_field=text_field)
        return eval_windows(tokenize_documents(tokenizer, docs), seq_len, mode=mode, max_windows=max_windows)
    docs = read_documents(path, fmt=fmt, text_field=text_field) if _is_jsonl(path, fmt) else None
    raw = "\n\n".join(docs) if docs is not None else Path(path).read_text(encoding="utf-8")
    if not raw.strip():
        raise ValueError(f"text file is empty (or only whitespace): {path}")
    stream = tokenizer(raw, add_special_tokens=False, verbose=False)["input_ids"]  # long on purpose: no length warning
    return eval_windows([stream], seq_len, mode="stream", max_windows=max_windows)


def _is_jsonl(path: str | Path, fmt: str) -> bool:
    return fmt == "jsonl" or (fmt == "auto" and Path(path).suffix.lower() in (".jsonl", ".json"))


def calibration_shares(n_samples: int, n_texts: int) -> list[int]:
    """How many of ``n_samples`` calibration sequences each of ``n_texts`` texts gives (the first get the rest)."""
    return [n_samples // n_texts + (i < n_samples % n_texts) for i in range(n_texts)]


def load_calibration_samples(
    paths: str | Path | Sequence[str | Path],
    tokenizer: Any,
    n_samples: int,
    seq_len: int,
    *,
    seed: int = 0,
    align: Literal["document", "token"] = "document",
    fmt: Literal["auto", "text", "jsonl"] = "auto",
    text_field: str = "text",
) -> torch.Tensor:
    """read_documents -> tokenize_documents (BOS per document) -> calibration_samples -> [N, L].

    Several texts are mixed: each gives its :func:`calibration_shares` of the N sequences (each
    drawn with ``seed``), interleaved row by row, so that any first n rows mix the texts too.
    """
    if n_samples <= 0 or seq_len <= 0:  # before reading/tokenizing anything
        raise ValueError(f"n_samples={n_samples} and seq_len={seq_len} must be positive")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not 0 < len(paths) <= n_samples:
        raise ValueError(f"{len(paths)} calibration texts for {n_samples} sequences: give 1 to {n_samples} texts")
    texts = [read_documents(path, fmt=fmt, text_field=text_field) for path in paths]  # every file checked first
    parts = [calibration_samples(tokenize_documents(tokenizer, docs), n, seq_len, seed=seed, align=align)
             for docs, n in zip(texts, calibration_shares(n_samples, len(paths)))]
    return torch.stack([rows[j] for j in range(len(parts[0])) for rows in parts if j < len(rows)])
