"""Attention-output-aware refinement of a converted layer's latent factors.

The closed forms minimise a proxy of the layer's error: ||W - B A||_F (plain SVD) or
||(W - B A) P||_F with an activation pre-conditioner P (LatentLLM eq. 5-9). Neither sees what the
layer computes,

    o(x) = W_o [softmax_t(scale * s(q_h, k_t)) v_t]_h,    s = RoPE(q) . RoPE(k)  (NoPE parts unrotated)

with RoPE between the key up-projection and the score (full mode) and the softmax's non-linearity
in every mode. Starting from the closed form, ``fit_to_outputs`` moves the chosen parameters theta
(the latent down-projection A = kv_a_proj, including its rope-key rows, and the up-projections
B_k = k_b_proj, B_v = v_b_proj) to minimise the relative error of the layer's output against the
source layer's on calibration inputs X:

    E(theta) = sum_x ||o_theta(x) - o_src(x)||^2 / sum_x ||o_src(x)||^2

by Adam on mini-batches of calibration sequences with a cosine learning-rate decay. The loss is
the layer's attention output after W_o, the quantity the residual stream receives, as in the
layer-wise reconstruction of GPTQ / llm-compressor's sequential pipeline, but through the softmax.
Where the closed form is exact (full rank) the gradient is zero and nothing moves.

That objective is symmetric: student and source see the same inputs X. The asymmetric one of
GPTAQ (GPTQv2, Li et al., ICML 2025), ``--refine-target model``, feeds the student the converted
model's hidden states h and asks for the source model's own residual stream after the attention,

    E(theta) = sum ||o_theta(h) - [o_src(h_src) + (h_src - h)]||^2 / sum ||o_src(h_src) + (h_src - h)||^2,

so each layer also cancels what the layers before it left in the stream. ``--refine-residual-weight``
alpha damps that part of the target to alpha (h_src - h), asking each layer to cancel only part of
the stream error (much of which no attention layer can predict from its inputs). Both compare the
attention's output; ``--refine-objective block`` compares what the whole decoder layer adds
instead, f(h + o_theta(h)) - h against f(h_src + o_src(h_src)) - h with f the source's frozen MLP
half (the block reconstruction of AutoRound and OmniQuant), so an error counts as much as the MLP
passes it on to the next layers. This file sees only ``predict`` and fixed ``targets``;
``converters.calibration.refine_latent_layer`` builds them.

Mixed precision (``--refine-precision``): the steps' forward and backward passes may run under
bfloat16 autocast, as AutoRound's layer-wise tuning does by default, while the parameters, Adam's
moments, the loss and both checks of E stay float32. On SmolLM2 the default recipe scores the same
either way (``benchmarks/results/smollm2_quality_default_bf16.md``); whether it is faster depends on
the CPU: ``benchmarks/refine_precision_time.py`` measures it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass
class FitReport:
    error_before: float  # E(theta_0) on all calibration inputs
    error_after: float  # E(theta) after the last step
    steps: int
    seconds: float
    precision: str = "float32"  # of the steps' forward and backward passes
    outputs: torch.Tensor | None = field(default=None, repr=False)  # predict(inputs) with the returned parameters


@torch.no_grad()
def predictions(predict: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, chunk: int = 8,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """predict(x) for every sequence of ``inputs``, in chunks, written into ``out`` (a new tensor
    by default; ``inputs`` itself to update the streams in place: each chunk is read before it is
    overwritten). Calibration streams are hundreds of MB: one output tensor, no concatenation."""
    for s in range(0, inputs.shape[0], chunk):
        y = predict(inputs[s : s + chunk])
        if out is None:
            out = y.new_empty((inputs.shape[0], *y.shape[1:]))
        out[s : s + chunk] = y
    return out


@torch.no_grad()
def error_of(outputs: torch.Tensor, targets: torch.Tensor, chunk: int = 8) -> float:
    """E = sum ||o - y||^2 / sum ||y||^2, summed in float64 chunk by chunk (no full-size temporaries)."""
    squared = lambda t: t.pow(2).sum(dtype=torch.float64)  # noqa: E731
    spans = [slice(s, s + chunk) for s in range(0, targets.shape[0], chunk)]
    error = sum(squared(outputs[s] - targets[s]) for s in spans)
    return float(error / max(sum(squared(targets[s]) for s in spans), 1e-30))


def fit_to_outputs(
    predict: Callable[[torch.Tensor], torch.Tensor],
    params: list[nn.Parameter],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch: int,
    seed: int = 0,
    autocast: torch.dtype | None = None,
    lr_scales: list[float] | None = None,
    beta2: float = 0.999,
) -> FitReport:
    """Adam on ``params`` minimising E over mini-batches of ``batch`` sequences of ``inputs`` [N, L, D].

    ``predict(x)`` must be differentiable in ``params``; ``targets`` [N, L, D] are fixed. The
    parameters keep the best iterate seen on the whole calibration set (checked at the end
    against the start), so a learning rate that is too high cannot make the layer worse.
    ``autocast``: the lower precision the steps' passes run in (None: the parameters' own); E is
    always measured without it. The report keeps the last check's predictions (``outputs``), which
    callers reuse rather than run the layer again. ``lr_scales``: each parameter's rate as a multiple
    of ``lr`` (default: all ``lr``); ``beta2``: Adam's second-moment decay.
    """
    t0 = time.perf_counter()
    start = [p.detach().clone() for p in params]
    start_outputs = predictions(predict, inputs)
    before = error_of(start_outputs, targets)
    if steps <= 0 or before == 0.0:
        return FitReport(before, before, 0, time.perf_counter() - t0, outputs=start_outputs)
    scale = targets.pow(2).mean().clamp_min(1e-30)  # the loss in units of E, so one lr fits all layers
    lr_scales = lr_scales or [1.0] * len(params)  # one Adam group per distinct rate
    groups = [{"params": [p for p, s in zip(params, lr_scales) if s == scale], "lr": lr * scale}
              for scale in dict.fromkeys(lr_scales)]
    opt = torch.optim.Adam(groups, lr=lr, betas=(0.9, beta2), foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    g = torch.Generator().manual_seed(seed)
    n = inputs.shape[0]
    for _ in range(steps):
        pick = torch.randperm(n, generator=g)[: min(batch, n)]
        with torch.autocast(inputs.device.type, dtype=autocast, enabled=autocast is not None):
            prediction = predict(inputs[pick])
        loss = (prediction.float() - targets[pick]).pow(2).mean() / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    outputs = predictions(predict, inputs)
    after = error_of(outputs, targets)
    if not after < before:  # never return a layer worse than the closed form
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        after, outputs = before, start_outputs
    precision = str(autocast or params[0].dtype).removeprefix("torch.")
    return FitReport(before, after, steps, time.perf_counter() - t0, precision, outputs)


def cpu_has(probe: str) -> bool:
    """torch.cpu's ``probe`` (e.g. "_is_amx_tile_supported"); the probes are private: an absent one counts as no."""
    return getattr(torch.cpu, probe, lambda: False)()


def mixed_precision(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``--refine-precision`` on ``device``: None for float32; for auto,
    bfloat16 where its steps are the faster ones (CUDA GPUs with native bfloat16, CPUs with AMX),
    else None. A CPU with AVX512-BF16 but no AMX computes bfloat16 natively too, yet ran the steps
    1.6-1.8x slower than float32 (``benchmarks/results/refine_precision_time_avx512-bf16.md``)."""
    if precision != "auto":
        return None if precision == "float32" else getattr(torch, precision)
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    elif device.type == "cpu":
        native = cpu_has("_is_amx_tile_supported")
    else:
        native = False
    return torch.bfloat16 if native else None
