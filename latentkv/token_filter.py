"""Token Filtering: skip the attention of tokens whose key and value add nothing new (online).

A RECONSTRUCTION. The source paper (Lee, Byeon, Kim, Hong 2025, "Leveraging KV Similarity for
Online Structured Pruning in LLMs", ``../shared/seeds/004_*``) is public only as an abstract; no
code, no full text. What it states: redundancy is measured online, without calibration data, by
the joint similarity of a token's key and value to what the layer has seen; a variance-aware
fusion weights key and value similarity across heads so that a token some heads still find novel
is kept; redundant tokens' attention is skipped. Secondary summaries add running-average anchors
(g about 0.9), cosine similarity, tail-focused layer-wise thresholds and a warm-up. Everything
else below is our choice, each an option with its default.

Per request, filtered layer l and head h (a KV head, or a latent group; see ``features``), for the
token at index t of the request (x = its key or value feature):

    A_t  = sum_{j=1..W} g^(j-1) x_(t-j)                 anchor: running average of the tokens before t (a)
    sK_h = cos(k_t,h, A^K_t,h),  sV_h = cos(v_t,h, A^V_t,h)
    w_K = 1 / (var_h sK + eps),  w_V = 1 / (var_h sV + eps)         (variance-aware fusion: the assumed form)
    s_t = (w_K mean_h sK + w_V mean_h sV) / (w_K + w_V)
    tau_t = the (1 - f) quantile of s over the Q tokens before t     (a layer-wise threshold skipping f)
    skip t's attention sub-layer (its output is 0, the residual passes) if s_t > tau_t, t >= warm-up;
    fusion "veto": also keep it whenever std_h sK or std_h sV exceeds ``veto_std``.

``skip="key"`` (a second reading, reference model only): a skipped token keeps its attention
output but is left out as a key and value of its layer, for itself and every later token, as a
KV-similarity eviction would; its latent is still cached.

(a) The running average ``A <- g A + (1 - g) x`` truncated to its last W terms: cosine similarity
ignores the scale, and with g = 0.9 the terms beyond W = 64 weigh under 0.12% together.

A skipped token's K/V (or latent) is cached as always: later tokens still attend to it. Why the
windows: the decision for token t is a pure function of the features of tokens t - Q - W .. t,
which the KV cache holds. So no per-request state has to be kept anywhere: a serving engine
recomputes it from the cache (vLLM: from the paged latent cache, see
``vllm_latentkv.attention.backend``), and it survives preemption, chunked prefill and prefix-cache
hits by construction; prefill (all positions at once) and decode (one at a time) make the same
decisions. Per decode step and filtered layer this reads Q + W + 1 cached rows (193 by default),
against the whole context the attention itself reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

EPS = 1e-6


@dataclass(frozen=True)
class TokenFilterOptions:
    skip_fraction: float = 0.25  # f: target fraction of tokens skipped in each filtered layer
    layers: Literal["later_half", "all"] | tuple[int, ...] = "later_half"  # "tail-focused"
    decay: float = 0.9  # g of the anchors' running average
    anchor_window: int = 64  # W: tokens in the anchor's running average
    threshold_window: int = 128  # Q: earlier tokens whose scores set the threshold
    warmup: int = 16  # the first tokens of a request are never skipped
    fusion: Literal["inverse_variance", "veto"] = "inverse_variance"
    veto_std: float = 0.25  # fusion "veto": keep a token whose similarity spread over heads exceeds this
    features: Literal["latent", "heads"] = "latent"  # latent layers: the cached latent, or rebuilt per-head K/V
    score: Literal["kv", "key"] = "kv"  # "key": the key-only baseline (KeyDiff-style, key vs its anchor)
    random_seed: int | None = None  # set: skip a random fraction f instead (the random baseline)
    # what a skipped token loses in its layer: "query" its attention output (the reading,
    # the default) or "key": later tokens (and itself) do not attend to it (a reading closer to
    # KV-similarity eviction; the reference model only)
    skip: Literal["query", "key"] = "query"

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.skip_fraction < 1:
            problems.append(f"skip_fraction must be in [0, 1), got {self.skip_fraction}")
        if not 0 < self.decay < 1:
            problems.append(f"decay must be in (0, 1), got {self.decay}")
        if self.anchor_window < 1 or self.threshold_window < 1 or self.warmup < 2:
            problems.append("anchor_window and threshold_window must be >= 1 and warmup >= 2 "
                            f"(got {self.anchor_window}, {self.threshold_window}, {self.warmup})")
        if problems:
            raise ValueError("token filter: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict) -> "TokenFilterOptions":
        """From a config / --hf-overrides dict (lists become tuples); unknown keys are an error."""
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"token filter: unknown option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(cls.__dataclass_fields__)}")
        d = dict(d)
        if isinstance(d.get("layers"), list):
            d["layers"] = tuple(d["layers"])
        return cls(**d)

    @property
    def context(self) -> int:
        """Tokens before the newest whose features a decision needs (Q + W)."""
        return self.threshold_window + self.anchor_window

    def filtered_layers(self, num_layers: int) -> set[int]:
        if self.layers == "later_half":
            return set(range(num_layers // 2, num_layers))
        if self.layers == "all":
            return set(range(num_layers))
        return set(self.layers)


def anchors(x: torch.Tensor, valid: torch.Tensor, count: int, opts: TokenFilterOptions) -> torch.Tensor:
    """A_t for the last ``count`` positions: x [B, S, heads, d], valid [B, S] -> [B, count, heads, d].

    The terms are added j = 1, 2, .. in the same order for every call, so a position's anchor is
    the same number whether it is computed in a prefill or in a decode step."""
    S = x.shape[1]
    x = x.float() * valid[..., None, None]
    out = torch.zeros_like(x[:, S - count:])
    for j in range(1, opts.anchor_window + 1):
        lo = S - count - j  # x_(t-j) for the first of the positions
        if lo + count <= 0:
            break
        shifted = x[:, max(lo, 0): lo + count]
        out[:, count - shifted.shape[1]:] += opts.decay ** (j - 1) * shifted
    return out


def fused_similarity(k, v, anchor_k, anchor_v, opts: TokenFilterOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v, anchors [..., heads, d] -> (fused score [...], veto [...] bool: keep regardless)."""
    s_k = F.cosine_similarity(k.float(), anchor_k, dim=-1, eps=EPS)  # [..., heads]
    no_veto = torch.zeros_like(s_k[..., 0], dtype=torch.bool)
    if opts.score == "key":
        return s_k.mean(-1), no_veto
    s_v = F.cosine_similarity(v.float(), anchor_v, dim=-1, eps=EPS)
    var_k, var_v = s_k.var(-1, unbiased=False), s_v.var(-1, unbiased=False)
    w_k, w_v = 1 / (var_k + EPS), 1 / (var_v + EPS)
    fused = (w_k * s_k.mean(-1) + w_v * s_v.mean(-1)) / (w_k + w_v)
    if opts.fusion == "veto":
        return fused, (var_k.sqrt() > opts.veto_std) | (var_v.sqrt() > opts.veto_std)
    return fused, no_veto


def _uniform(index: torch.Tensor, layer: int, seed: int) -> torch.Tensor:
    """A uniform [0, 1) number per (token index, layer, seed), stateless (the random baseline)."""
    h = (index.long() * 2654435761 + layer * 40503 + seed * 97) % 4294967296
    h = (h ^ (h >> 13)) * 1274126177 % 4294967296
    return (h % 1000003).float() / 1000003


def keep_last(k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, index: torch.Tensor, count: int,
              opts: TokenFilterOptions, layer: int = 0) -> torch.Tensor:
    """Decisions for the last ``count`` tokens -> keep [B, count] bool.

    k, v [B, S, heads, d]: the features of the tokens up to the newest, at least the
    ``opts.context`` before the first decided one where the request has them (more are ignored);
    valid [B, S] bool: real tokens (not padding, not before the request's start);
    index [B, S]: each token's index in its request (for the warm-up).
    """
    B, S = valid.shape
    need = min(count + opts.threshold_window, S)  # positions whose score matters
    index_new = index[:, S - count:]
    if opts.random_seed is not None:
        skip = _uniform(index_new, layer, opts.random_seed) < opts.skip_fraction
        return ~(skip & (index_new >= opts.warmup) & valid[:, S - count:])
    a_k = anchors(k, valid, need, opts)
    a_v = anchors(v, valid, need, opts) if opts.score == "kv" else a_k
    score, veto = fused_similarity(k[:, S - need:], v[:, S - need:], a_k, a_v, opts)  # [B, need]
    scorable = valid[:, S - need:] & (index[:, S - need:] >= 1)  # the first token has no anchor
    score = torch.where(scorable, score, torch.full_like(score, float("nan")))
    # the threshold of each new token: the quantile of the (up to) Q scores before it
    padded = F.pad(score, (opts.threshold_window - (need - count), 0), value=float("nan"))
    earlier = padded.unfold(1, opts.threshold_window, 1)[:, :count]  # [B, count, Q]
    tau = torch.nanquantile(earlier, 1 - opts.skip_fraction, dim=-1)
    new = score[:, need - count:]
    skip = (new > tau) & ~veto[:, need - count:] & (index_new >= opts.warmup) & valid[:, S - count:]
    return ~skip
