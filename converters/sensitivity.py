"""Layer sensitivity judged by the model's output: KL to the source with one layer converted.

For layer l and candidate latent width w, the model M_{l,w} is the source with only layer l's
attention replaced by its conversion at width w. Its cost is the mean next-token KL divergence
from the source over calibration tokens t,

    D_l(w) = 1/T sum_t KL( p_src(. | x_<t) || p_{l,w}(. | x_<t) ),

what Palu (section 3.3) approximates with a Fisher estimate and we measure directly. Choosing one
width per layer to minimise sum_l D_l(w_l) within the cache budget (``allocation.allocate_widths``)
assumes the layers' effects add up: true to second order for small perturbations, the assumption
of HAWQ-style mixed-precision allocation. Keeping a layer uncompressed is a choice with D = 0.

Cost: layer l's candidates each run layers l..L-1 and the output head on ``samples`` calibration
sequences, so the pass is about L/2 forward passes per candidate width; the source model is held
in memory (float32 on ``device``) for it.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from converters import calibration as calib
from converters.importers.hf import SourceModel
from latentkv.attention import rms_norm

log = logging.getLogger("latentkv.convert")


class OutputHead:
    """The source model's final norm and lm_head: hidden states -> next-token log-probabilities."""

    def __init__(self, source: SourceModel, device: str):
        self.norm = source.tensor("model.norm.weight", torch.float32).to(device)
        name = "model.embed_tokens.weight" if source.dims.tie_word_embeddings else "lm_head.weight"
        self.weight = source.tensor(name, torch.float32).to(device)
        self.eps = source.rms_norm_eps

    @torch.no_grad()
    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(rms_norm(h, self.norm, self.eps) @ self.weight.T, dim=-1)


@torch.no_grad()
def mean_kl(head: OutputHead, hidden: torch.Tensor, reference: list[torch.Tensor]) -> float:
    """Mean per-token KL(reference || head(hidden)) over sequences; ``reference`` holds each
    sequence's source log-probabilities [S, V] (one sequence at a time bounds the memory)."""
    total = 0.0
    for h, ref in zip(hidden, reference):
        logp = head.log_probs(h)
        total += (ref.exp() * (ref - logp)).sum().item()
    return total / (hidden.shape[0] * hidden.shape[1])


@torch.no_grad()
def layer_sensitivities(
    source: SourceModel,
    candidates: dict[int, list[int]],
    convert_at: Callable[[int, int], nn.Module],
    inputs: list[torch.Tensor],
    device: str = "cpu",
) -> dict[int, dict[int, float]]:
    """D_l(w) for every layer l and width w in ``candidates`` (module docstring).

    ``inputs[l]`` [n, S, D] are the source model's hidden states entering layer l on the
    calibration sequences the KL is measured on; ``convert_at(l, w)`` builds layer l converted at
    width w as a decoder layer.
    """
    L = source.dims.num_hidden_layers
    layers = [calib.source_layer_module(source, i).to(device) for i in range(L)]
    head = OutputHead(source, device)
    final = calib.run_layer(layers[-1], inputs[-1].to(device))
    reference = [head.log_probs(h) for h in final]
    total = sum(len(w) for w in candidates.values())
    done, t0 = 0, time.perf_counter()
    out: dict[int, dict[int, float]] = {}
    for i, widths in candidates.items():
        out[i] = {}
        for w in widths:
            h = calib.run_layer(convert_at(i, w).to(device), inputs[i].to(device))
            for later in layers[i + 1:]:
                h = calib.run_layer(later, h)
            out[i][w] = mean_kl(head, h, reference)
            done += 1
        rate = done / (time.perf_counter() - t0)
        log.info("output sensitivity: layer %d, KL by width %s (%d/%d candidates, %.2f/s)",
                 i, {w: round(d, 4) for w, d in out[i].items()}, done, total, rate)
    return out
