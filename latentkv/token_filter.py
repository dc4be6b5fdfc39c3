"""Token Filtering: skip the attention of tokens whose key and value add nothing new (online).

A RECONSTRUCTION. The source paper (Lee, Byeon, Kim, Hong 2025, "Leveraging KV Similarity for
Online Structured Pruning in LLMs", ``../shared/seeds/004_*``) is public only as an abstract; no
code, no full text. What it states: redundancy is measured online, without calibration data, by
the joint similarity of a token's key and value to what the layer has seen; a variance-aware
fusion weights key and value similarity across heads so that a token some heads still find novel
is kept; redundant tokens' attention is skipped. Secondary summaries add running-average anchors
(g about 0.9), cosine similarity, tail-focused layer-wise thresholds and a warm-up. Everything
else below is our choice, each an option with its default.

Per request, filtered layer l and head h (a KV head, or a latent group; see ``features``):

    sK_h = cos(k_h, A^K_h),  sV_h = cos(v_h, A^V_h)                  against the anchors before this token
    w_K = 1 / (var_h sK + eps),  w_V = 1 / (var_h sV + eps)         (variance-aware fusion: the assumed form)
    s = (w_K mean_h sK + w_V mean_h sV) / (w_K + w_V)
    skip the token's attention sub-layer (output 0, residual passes) if s > tau_l and past the warm-up;
    fusion "veto": also keep it whenever std_h sK or std_h sV exceeds ``veto_std``
    A^K_h <- g A^K_h + (1 - g) k_h (likewise A^V), every token; the first token sets them
    tau_l: the (1 - f) quantile of the warm-up tokens' scores, then tau <- tau + eta (1[s > tau] - f)
           per token (a stochastic-approximation quantile tracker: skips a fraction f, O(1) state)

A skipped token's K/V (or latent) is cached as always: later tokens still attend to it. Prefill
decides position by position with the state of the positions before it, so prefill and decode make
the same decisions. State per request and layer: two anchors per head, tau, a token count and the
warm-up scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

EPS = 1e-6


@dataclass(frozen=True)
class TokenFilterOptions:
    skip_fraction: float = 0.25  # f: target fraction of tokens skipped in each filtered layer
    layers: Literal["later_half", "all"] | tuple[int, ...] = "later_half"  # "tail-focused"
    decay: float = 0.9  # g of the anchors' running average
    warmup: int = 16  # the first tokens of a request are never skipped
    fusion: Literal["inverse_variance", "veto"] = "inverse_variance"
    veto_std: float = 0.25  # fusion "veto": keep a token whose similarity spread over heads exceeds this
    tracker_rate: float = 0.02  # eta of the threshold tracker
    features: Literal["latent", "heads"] = "latent"  # latent layers: the cached latent, or rebuilt per-head K/V
    score: Literal["kv", "key"] = "kv"  # "key": the key-only baseline (KeyDiff-style, key vs its anchor)
    random_seed: int | None = None  # set: skip a random fraction f instead (the random baseline)

    def filtered_layers(self, num_layers: int) -> set[int]:
        if self.layers == "later_half":
            return set(range(num_layers // 2, num_layers))
        if self.layers == "all":
            return set(range(num_layers))
        return set(self.layers)


@dataclass
class FilterState:
    """One request batch's state in one layer (tensors [B, ...])."""

    anchor_k: torch.Tensor | None = None  # [B, heads, d]
    anchor_v: torch.Tensor | None = None
    tau: torch.Tensor | None = None  # [B]
    seen: int = 0  # tokens of the request so far
    warmup_scores: list[torch.Tensor] = field(default_factory=list)  # [B] each
    generator: torch.Generator | None = None


def fused_similarity(k: torch.Tensor, v: torch.Tensor, anchor_k: torch.Tensor, anchor_v: torch.Tensor,
                     opts: TokenFilterOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v, anchors [B, heads, d] -> (fused score [B], veto [B] bool: keep regardless)."""
    s_k = F.cosine_similarity(k.float(), anchor_k, dim=-1)  # [B, heads]
    if opts.score == "key":
        return s_k.mean(-1), torch.zeros_like(s_k[:, 0], dtype=torch.bool)
    s_v = F.cosine_similarity(v.float(), anchor_v, dim=-1)
    var_k, var_v = s_k.var(-1, unbiased=False), s_v.var(-1, unbiased=False)
    w_k, w_v = 1 / (var_k + EPS), 1 / (var_v + EPS)
    fused = (w_k * s_k.mean(-1) + w_v * s_v.mean(-1)) / (w_k + w_v)
    veto = torch.zeros_like(fused, dtype=torch.bool)
    if opts.fusion == "veto":
        veto = (var_k.sqrt() > opts.veto_std) | (var_v.sqrt() > opts.veto_std)
    return fused, veto


def keep_mask(k: torch.Tensor, v: torch.Tensor, state: FilterState, opts: TokenFilterOptions,
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """This step's tokens k, v [B, T, heads, d] in order -> keep [B, T] (float 0/1); updates ``state``.

    ``valid`` [B, T] (bool) marks real tokens (left padding is neither scored nor counted).
    """
    B, T = k.shape[:2]
    keep = torch.ones(B, T, device=k.device)
    for t in range(T):
        kt, vt = k[:, t].float(), v[:, t].float()
        ok = torch.ones(B, dtype=torch.bool, device=k.device) if valid is None else valid[:, t].bool()
        if state.anchor_k is None:  # the first token: anchors start at it, nothing to compare with
            state.anchor_k, state.anchor_v = kt.clone(), vt.clone()
            state.tau = torch.ones(B, device=k.device)
            state.seen = 1
            continue
        score, veto = fused_similarity(kt, vt, state.anchor_k, state.anchor_v, opts)
        if opts.random_seed is not None:
            if state.generator is None:
                state.generator = torch.Generator().manual_seed(opts.random_seed)
            score = torch.rand(B, generator=state.generator).to(k.device)
        if state.seen < opts.warmup:
            state.warmup_scores.append(score)
            if state.seen + 1 == opts.warmup:  # the threshold starts at the warm-up's (1 - f) quantile
                state.tau = torch.quantile(torch.stack(state.warmup_scores, 1), 1 - opts.skip_fraction, dim=1)
        else:
            skip = (score > state.tau) & ~veto & ok
            keep[:, t] = (~skip).float()
            step = opts.tracker_rate * ((score > state.tau).float() - opts.skip_fraction)
            state.tau = torch.where(ok, state.tau + step, state.tau)
        g = torch.where(ok, torch.tensor(opts.decay, device=k.device), torch.tensor(1.0, device=k.device))[:, None, None]
        state.anchor_k = g * state.anchor_k + (1 - g) * kt
        state.anchor_v = g * state.anchor_v + (1 - g) * vt
        state.seen += 1
    return keep
