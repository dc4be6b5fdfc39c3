"""Perplexity and greedy generation for any causal LM that returns HF-style logits.

The model is only called as ``model(input_ids).logits`` with ``input_ids: [B, S]`` and
``logits: [B, S, V]`` (HF ``*ForCausalLM`` and latentkv's reference model both qualify).

Perplexity = exp(mean NLL over predicted tokens): in a window ``[x0, x1, ..., x_{n-1}]`` the
logits at position i predict x_{i+1}, so a window of n tokens contributes n - 1 predictions and
its first token (the BOS of a document window) is context only. The mean is over all predicted
tokens of all windows (token-weighted), summed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["perplexity", "nll_sum", "greedy_generate", "load_model", "evaluate_perplexity", "generate_text", "chat_answers"]


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _as_windows(windows: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(windows, torch.Tensor):
        if windows.dim() != 2:
            raise ValueError(f"windows tensor must be [N, S], got shape {tuple(windows.shape)}")
        windows = list(windows.unbind(0))
    out = []
    for i, w in enumerate(windows):
        w = torch.as_tensor(w, dtype=torch.long)
        if w.dim() != 1 or w.numel() < 2:
            raise ValueError(f"window {i}: need a 1-D sequence of at least 2 tokens, got shape {tuple(w.shape)}")
        out.append(w)
    if not out:
        raise ValueError("no evaluation windows")
    return out


@torch.inference_mode()
def nll_sum(
    model: torch.nn.Module,
    windows: torch.Tensor | Sequence[torch.Tensor],
    *,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "perplexity",
) -> tuple[float, int]:
    """(sum of NLL in nats over predicted tokens, number of predicted tokens)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    wins = _as_windows(windows)
    dev = _model_device(model)
    total_pred = sum(len(w) - 1 for w in wins)
    nll = 0.0  # python float = float64 accumulator
    count = 0
    bar = tqdm(total=total_pred, desc=desc, unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True)
    try:
        for b in range(0, len(wins), batch_size):
            batch = wins[b:b + batch_size]
            lens = torch.tensor([len(w) for w in batch])
            # Right padding needs no attention mask in a causal LM: pad tokens sit after every
            # real token, so they cannot influence real positions; their predictions are masked.
            ids = torch.zeros(len(batch), int(lens.max()), dtype=torch.long)
            for i, w in enumerate(batch):
                ids[i, : len(w)] = w
            logits = model(ids.to(dev)).logits  # [B, S, V]
            targets = ids[:, 1:].to(dev)  # label = next token
            valid = (torch.arange(ids.shape[1] - 1)[None, :] < (lens[:, None] - 1)).to(dev)
            tok_nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            ).view_as(targets)
            nll += tok_nll[valid].double().sum().item()
            n = int(valid.sum())
            count += n
            bar.set_postfix(windows=f"{min(b + batch_size, len(wins))}/{len(wins)}",
                            ppl=f"{math.exp(nll / count):.4g}", refresh=False)
            bar.update(n)
    finally:
        bar.close()
    return nll, count


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor | Sequence[torch.Tensor],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """exp(mean next-token NLL) over ``windows`` (list of 1-D LongTensors, or an [N, S] tensor)."""
    total, count = nll_sum(model, windows, batch_size=batch_size, progress=progress)
    return math.exp(total / count)


@torch.inference_mode()
def greedy_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    stop_token_ids: Iterable[int] = (),
) -> torch.Tensor:
    """Argmax decoding without a KV cache (full recompute each step) for models that lack HF
    ``generate``. ``input_ids``: [S] or [1, S]; returns [1, S + n] with n <= max_new_tokens,
    stopping after a token in ``stop_token_ids`` (which is included)."""
    ids = input_ids.view(1, -1).to(_model_device(model), torch.long)
    stop = set(stop_token_ids)
    for _ in range(max_new_tokens):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        ids = torch.cat([ids, nxt], dim=1)
        if int(nxt) in stop:
            break
    return ids


# ---- whole checkpoints (the command line's eval and demo) ----------------------------------------

def load_model(model_dir: str | Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import latentkv.modeling  # noqa: F401  (registers the latentkv model type)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def evaluate_perplexity(model_dir: str | Path, text: str | Path, seq_len: int, max_windows: int | None, batch_size: int,
                        text_field: str = "text", windows: str = "raw") -> tuple[float, int]:
    """(perplexity, tokens scored) of a model on a text, windows as ``latentkv.text`` defines them."""
    from latentkv.text import check_tokenizer_matches, load_eval_windows

    model, tokenizer = load_model(model_dir)
    check_tokenizer_matches(tokenizer, model.config)
    wins = load_eval_windows(text, tokenizer, seq_len, max_windows=max_windows, mode=windows, text_field=text_field)
    total, count = nll_sum(model, wins, batch_size=batch_size)
    return math.exp(total / count), count


def generate_text(model_dir: str | Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation through the model's own cache (the latent cache for latentkv models)."""
    import torch

    model, tokenizer = load_model(model_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def chat_answers(model_dir: str | Path, question: str, max_new_tokens: int) -> tuple[str, str]:
    """Greedy chat answers (with the model's cache, without any cache): equal when the cache is right."""
    import torch

    model, tokenizer = load_model(model_dir)
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    answers = []
    for use_cache in (True, False):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=use_cache)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers[0], answers[1]
