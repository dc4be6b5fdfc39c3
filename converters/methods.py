"""Factorisation methods: build the ``Factorizer`` of one layer from the options and its statistics.

    svd         plain SVD of [W_k,nope; W_v] (joint) or of each (split)                 (MHA2MLA)
    activation  svd_r[W P] with a pre-conditioner P of LatentLLM Table 1, for every role
                (identity, diag_hessian, diag_l1, diag_l2, covariance, root_covariance)
    latentllm   split latent: key latent by the attention-aware joint Q/K HOSVD (it needs the
                query rows that pair with the compressed key dims), value latent by the
                output-aware joint V/O decomposition with o_proj (LatentLLM eq. 10-16)

A ``Factorizer`` is called by ``latent_attention._factorize_kv`` once per latent group and role
("k" then "v" when split, "kv" when joint) with the group's index, from which the latentllm
factorizer takes the group's query heads and o_proj columns.

Also here: per-layer latent widths from the rank allocation (uniform / LoRC / error budget).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from converters.latent_attention import Factorizer, LatentPlan, plain_svd
from converters.math import activation_svd as asvd
from converters.math.joint_qk import attention_aware_key_latent
from converters.math.joint_vo import output_aware_value_latent
from converters.math.preconditioners import preconditioner
from latentkv import format as fmt
from latentkv.rope import pair_dims

if TYPE_CHECKING:
    from converters.calibration import AttentionStats
    from converters.importers.hf import AttentionWeights

METHOD_NAMES = {"svd": "mha2mla", "activation": "mha2mla+activation-svd", "latentllm": "mha2mla+latentllm", "transkv": "transkv"}


def _precond(kind: str, stats: "AttentionStats", damping: float, centred: bool = False):
    sqrt_method = "cholesky" if kind == "root_covariance" else "eigh"
    return preconditioner(kind, stats.inputs, damping=damping, sqrt_method=sqrt_method, centred=centred)


def activation_factorizer(stats: "AttentionStats", kind: str, damping: float, centred: bool = False) -> Factorizer:
    """svd_r[[blocks] P], A = V^T P^-1 (every role); P computed once per layer.

    centred: P from the centred covariance (eq. 44-47); the caller then moves the mean error into
    the up-projection biases (``build_latent_layer(..., input_mean=mu)``, eq. 43).
    """
    cache: dict = {}

    def factorize(blocks: list[torch.Tensor], rank: int, role: str, group: int):
        if "P" not in cache:
            cache["P"] = _precond(kind, stats, damping, centred)
        P, P_inv = cache["P"]
        W = torch.cat(blocks, dim=0)
        A, B = asvd.activation_aware_lowrank(W, rank, P, P_inv)
        return A, list(B.split([b.shape[0] for b in blocks], dim=0))

    return factorize


def nope_query_rows(src: "AttentionWeights", plan: LatentPlan, dims: fmt.ModelDims):
    """(W_q [H d, D], b_q [H d] or None): the query rows that multiply the compressed key dims."""
    H, G, d_h = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
    if plan.rope_mode != "partial":
        return src.wq, src.bq  # full: all dims; shared: q_h . k_nope,g over all d_h dims
    n_f = d_h // 2
    nope = []
    for p in plan.pairs:
        kept = set(pair_dims(p, n_f))
        nope.append([d for d in range(d_h) if d not in kept])
    rep = H // G
    index = torch.tensor([h * d_h + d for h in range(H) for d in nope[h // rep]], dtype=torch.long)
    wq = src.wq.index_select(0, index)
    bq = src.bq.index_select(0, index) if src.bq is not None else None
    return wq, bq


def latentllm_factorizer(
    stats: "AttentionStats", src: "AttentionWeights", plan: LatentPlan, dims: fmt.ModelDims, damping: float
) -> Factorizer:
    """Attention-aware key latent (joint Q/K) and output-aware value latent (joint V/O)."""
    H, G, d_h = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
    n_grp = plan.groups
    per, q_per = G // n_grp, H // n_grp
    wq, bq = nope_query_rows(src, plan, dims)
    d_q = wq.shape[0] // H

    def key(block, rank, j):  # latent group j: KV heads [j per, (j + 1) per), their query heads
        if rank > min(block.shape):
            raise ValueError(f"rank {rank} is impossible for a [{block.shape[0]}, {block.shape[1]}] key block (max {min(block.shape)})")
        wq_j = wq[j * q_per * d_q : (j + 1) * q_per * d_q]
        bq_j = bq[j * q_per * d_q : (j + 1) * q_per * d_q] if bq is not None else None
        res = attention_aware_key_latent(wq_j, block, stats.inputs, rank, num_kv_heads=per, damping=damping,
                                         b_q=bq_j, sqrt_method="cholesky")
        return res.A_k, [res.B_k]

    def value(block, rank, j):
        wo_j = src.wo[:, j * q_per * d_h : (j + 1) * q_per * d_h]
        res = output_aware_value_latent(block, wo_j, stats.inputs, rank, num_kv_heads=per, damping=damping,
                                        sqrt_method="cholesky")
        return res.A_v, [res.B_v]

    def factorize(blocks: list[torch.Tensor], rank: int, role: str, group: int):
        if role == "k":
            return key(blocks[0], rank, group)
        if role == "v" or (role == "kv" and len(blocks) == 1):  # no NoPE key dims left: values only
            return value(blocks[0], rank, group)
        raise ValueError("latentllm builds split latents (key and value latents); use svd='split'")

    return factorize


def make_factorizer(opts, stats, src, plan: LatentPlan, dims: fmt.ModelDims) -> Factorizer:
    """The factorizer of one layer for ``opts.method`` (``stats`` is None only for svd)."""
    if opts.method == "svd":
        return plain_svd
    if stats is None:
        raise ValueError(f"method {opts.method!r} needs calibration statistics")
    if opts.method == "activation":
        return activation_factorizer(stats, opts.preconditioner, opts.damping, opts.centred)
    if opts.method == "latentllm":
        return latentllm_factorizer(stats, src, plan, dims, opts.damping)
    raise ValueError(f"method {opts.method!r} has no factorizer (transkv builds reduced heads instead)")


def method_info(opts, params: dict) -> fmt.MethodInfo:
    return fmt.MethodInfo(name=METHOD_NAMES.get(opts.method, opts.method), params=params)


# ---- rank allocation ---------------------------------------------------------------------------

def metric_preconditioner(opts, stats: "AttentionStats"):
    """The P whose truncation the method makes (for the error curve of budgeted ranks)."""
    if opts.method == "svd":
        eye = torch.eye(stats.inputs.dim, dtype=torch.float64)
        return eye, eye
    kind = opts.preconditioner if opts.method == "activation" else "root_covariance"
    return _precond(kind, stats, opts.damping)


def width_error_curve(opts, stats: "AttentionStats", wk_nope: torch.Tensor, wv: torch.Tensor, joint: bool) -> torch.Tensor:
    """Activation loss E||(W - B A) x||^2 of the layer's latent at every width w = 0..max (float64)."""
    P, P_inv = metric_preconditioner(opts, stats)
    C = stats.inputs.autocorrelation(0.0)
    if joint or wk_nope.shape[0] == 0:
        W = torch.cat([wk_nope, wv], dim=0) if wk_nope.shape[0] else wv
        return asvd.activation_error_curve(W, P, P_inv, C)
    ek = asvd.activation_error_curve(wk_nope, P, P_inv, C)
    ev = asvd.activation_error_curve(wv, P, P_inv, C)
    w_max = 2 * min(len(ek) - 1, len(ev) - 1)
    return torch.stack([ek[w // 2] + ev[w - w // 2] for w in range(w_max + 1)])
