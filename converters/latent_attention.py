"""Build one layer's latent attention from its source attention (pure tensors in, tensors out).

Symbols as in ``latentkv.format``: H, G, d_h, n_f = d_h / 2, D; weights W [out, in].

    partial  q_h = W_q,h rows reordered [nope dims | kept pair dims]; k_rope,g = W_k,g[kept]
             W_k,nope = W_k,g[not kept] stacked over g                (MHA2MLA section 3.1-3.2)
    shared   k_rope,(i,j) = sum_g U_i[g, j] W_k,g[pair i];  q_rope,h,(i,j) = U_i[g(h), j] W_q,h[pair i]
             W_k,nope = (I - Pi) W_k with Pi_i = sum_{j kept} U_i[:, j] U_i[:, j]^T per pair   (RoRoPE)
    full     no rope keys are cached: W_k (all dims) is compressed; keys are rebuilt and rotated

then W_k,nope and W_v are factorised, jointly (one latent) or split, optionally per group of KV
heads (Palu), by a ``Factorizer``: plain SVD here, activation-aware ones in ``converters.methods``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from converters.importers.hf import AttentionWeights
from converters.math.hadamard import block_hadamard
from converters.math.lowrank import joint_factors
from converters.math.nope_scaling import kept_projection_shared
from latentkv import format as fmt
from latentkv.rope import pair_dims

# (blocks to compress, rank, role "kv" | "k" | "v", latent group) -> (A [rank, D], up-projection of each block)
Factorizer = Callable[[list[torch.Tensor], int, str, int], tuple[torch.Tensor, list[torch.Tensor]]]


def plain_svd(blocks: list[torch.Tensor], rank: int, role: str, group: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return joint_factors(blocks, rank)


@dataclass
class LatentPlan:
    """What to build for one layer."""

    rope_mode: Literal["partial", "shared", "full"]
    joint: bool
    k_rank: int
    v_rank: int
    groups: int = 1
    pairs: list[list[int]] | None = None  # partial: kept pairs per KV head
    rotation: torch.Tensor | None = None  # shared: U [n_f, G, G]
    components: list[tuple[int, int]] | None = None  # shared: kept (pair, component)
    nope_scale: torch.Tensor | None = None  # [n_f]: factor of each pair's NoPE'd key part (math/nope_scaling.py)
    hadamard: bool = False  # rotate the latent by a block Hadamard (better INT4 caches, same model)


@dataclass
class ModeParts:
    """What a RoPE mode makes of the source attention before the latent is factorised."""

    direct: dict[str, torch.Tensor]  # tensors taken as they are (queries, q/k norms), by name
    d_n: int  # NoPE dims per head
    rope_pairs: list[list[int]]  # the format's rope_pairs
    wk_rope: torch.Tensor  # [R_H R_D, D] rope key rows (cached, not compressed)
    bk_rope: torch.Tensor | None
    wk_nope: torch.Tensor  # [G d_n, D] the key rows the latent compresses
    bk_nope: torch.Tensor | None


def _rows(w: torch.Tensor | None, heads: int, dims_per_head: list[list[int]], d_h: int) -> torch.Tensor | None:
    """Gather per-head rows: w [heads d_h, ...], dims_per_head[h] -> [sum len, ...] (head-major)."""
    if w is None:
        return None
    index = torch.tensor([h * d_h + d for h in range(heads) for d in dims_per_head[h]], dtype=torch.long)
    return w.index_select(0, index)


def build_latent_layer(
    src: AttentionWeights,
    plan: LatentPlan,
    dims: fmt.ModelDims,
    factorize: Factorizer = plain_svd,
    input_mean: torch.Tensor | None = None,
) -> tuple[fmt.LatentLayer, dict[str, torch.Tensor]]:
    """Spec and tensors (names relative to ``self_attn.``) of the converted layer, float64.

    With ``input_mean`` mu (the centred methods), the up-projection biases absorb the mean error of
    the factorisation, b^ = b + (W - B A) mu (LatentLLM eq. 43): the layer is exact on the mean input.
    """
    parts = _mode_parts(src, plan, dims)
    tensors = dict(parts.direct)
    latent_a, k_b, v_b = _factorize_kv(parts.wk_nope, src.wv, plan, dims, factorize)
    d_n = parts.d_n
    layer = fmt.LatentLayer(
        rope_mode=plan.rope_mode,
        rope_pairs=parts.rope_pairs,
        qk_nope_head_dim=d_n,
        latent=fmt.LatentRanks(joint=plan.joint, k_rank=plan.k_rank if d_n else (plan.v_rank if plan.joint else 0), v_rank=plan.v_rank, groups=plan.groups),
        softmax_scale=fmt.default_softmax_scale(dims.head_dim),
    )
    if plan.hadamard:
        latent_a, k_b, v_b = _rotate_latent(latent_a, k_b, v_b, layer.latent)
    tensors["kv_a_proj.weight"] = torch.cat([latent_a, parts.wk_rope], dim=0)
    if d_n:
        tensors["k_b_proj.weight"] = k_b
    tensors["v_b_proj.weight"] = v_b
    tensors["o_proj.weight"] = src.wo
    if src.bq is not None or src.bk is not None or src.bv is not None or input_mean is not None:
        zeros = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        G, d_h = dims.num_key_value_heads, dims.head_dim
        rope_bias = parts.bk_rope if parts.bk_rope is not None else zeros(parts.wk_rope.shape[0])
        tensors["kv_a_proj.bias"] = torch.cat([zeros(latent_a.shape[0]), rope_bias])
        if "q_proj.bias" not in tensors:
            tensors["q_proj.bias"] = zeros(tensors["q_proj.weight"].shape[0])
        bv = src.bv if src.bv is not None else zeros(G * d_h)
        bk = parts.bk_nope if parts.bk_nope is not None else zeros(G * d_n)
        if input_mean is not None:  # eq. 43, per up-projection
            lat = layer.latent
            mu = input_mean.to(torch.float64)
            bv = bv + (src.wv - _reconstruct(latent_a[lat.v_slice], v_b, G, lat.groups)) @ mu
            if d_n:
                bk = bk + (parts.wk_nope - _reconstruct(latent_a[lat.k_slice], k_b, G, lat.groups)) @ mu
        tensors["v_b_proj.bias"] = bv
        if d_n:
            tensors["k_b_proj.bias"] = bk
    return layer, tensors


def _rotate_latent(a: torch.Tensor, k_b, v_b, lat: fmt.LatentRanks):
    """Rotate every latent chunk by a block Hadamard R: (R A, B R^T) is the same layer (see math.hadamard)."""
    a = a.clone()
    ups = {"k": k_b, "v": v_b}
    parts = [("v", lat.v_slice)] if lat.joint else [("k", lat.k_slice), ("v", lat.v_slice)]
    for name, part in parts:
        if ups[name] is None or part.stop == part.start:
            continue
        width = (part.stop - part.start) // lat.groups
        R = block_hadamard(width)
        chunks = a[part].view(lat.groups, width, -1)
        a[part] = torch.einsum("ij,gjd->gid", R, chunks).reshape(-1, a.shape[1])
        ups[name] = ups[name] @ R.T  # every KV head's up-projection reads one chunk of this width
        if lat.joint:
            ups["k"] = ups["k"] @ R.T if ups["k"] is not None else None
    return a, ups["k"], ups["v"]


def _reconstruct(a: torch.Tensor, up: torch.Tensor, G: int, n_grp: int) -> torch.Tensor:
    """The weight a latent factorisation stands for: head g's rows = up_g @ a[chunk(g)] -> [G out, D]."""
    chunks = a.view(n_grp, -1, a.shape[1]).repeat_interleave(G // n_grp, dim=0)  # [G, r', D]
    return torch.einsum("gor,grd->god", up.view(G, -1, up.shape[1]), chunks).reshape(-1, a.shape[1])


def compressed_blocks(src: AttentionWeights, plan: LatentPlan, dims: fmt.ModelDims) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_k,nope [G d_n, D], W_v [G d_h, D]): the weights the latent of this RoPE mode compresses."""
    return _mode_parts(src, plan, dims).wk_nope, src.wv


def _mode_parts(src: AttentionWeights, plan: LatentPlan, dims: fmt.ModelDims) -> ModeParts:
    builders = {"partial": _partial_parts, "shared": _shared_parts, "full": _full_parts}
    return builders[plan.rope_mode](src, plan, dims)


def _factorize_kv(wk_nope, wv, plan: LatentPlan, dims: fmt.ModelDims, factorize: Factorizer):
    """Latent down-projection and per-KV-head up-projections, per latent group.

    Returns (A [W, D], k_b [G d_n, r_k / n_grp] or None, v_b [G d_h, r_v / n_grp]).
    """
    G, n_grp = dims.num_key_value_heads, plan.groups
    per = G // n_grp
    d_n = wk_nope.shape[0] // G
    d_h = dims.head_dim
    k_groups = wk_nope.view(n_grp, per * d_n, wk_nope.shape[1])
    v_groups = wv.view(n_grp, per * d_h, -1)
    a_k, a_v, b_k, b_v = [], [], [], []
    for j in range(n_grp):
        if plan.joint:
            blocks = [k_groups[j], v_groups[j]] if d_n else [v_groups[j]]
            A, ups = factorize(blocks, plan.v_rank // n_grp, "kv", j)
            a_v.append(A)
            if d_n:
                b_k.append(ups[0])
            b_v.append(ups[-1])
        else:
            if d_n:
                A, (up,) = factorize([k_groups[j]], plan.k_rank // n_grp, "k", j)
                a_k.append(A)
                b_k.append(up)
            A, (up,) = factorize([v_groups[j]], plan.v_rank // n_grp, "v", j)
            a_v.append(A)
            b_v.append(up)
    latent_a = torch.cat(a_k + a_v, dim=0)
    k_b = torch.cat(b_k, dim=0) if b_k else None
    return latent_a, k_b, torch.cat(b_v, dim=0)


# ---- the three RoPE modes ----------------------------------------------------------------------

def _norm_rows(norm: torch.Tensor | None, order: list[list[int]]) -> torch.Tensor | None:
    """Per-KV-head RMSNorm gains in each head's dim order: [d_h] -> [G, d_h]."""
    if norm is None:
        return None
    return torch.stack([norm[o] for o in order])


def _partial_parts(src: AttentionWeights, plan: LatentPlan, dims: fmt.ModelDims) -> ModeParts:
    H, G, d_h = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
    n_f = d_h // 2
    kept = [pair_dims(p, n_f) for p in plan.pairs]  # rope dims of each KV head, half-split order
    nope = [[d for d in range(d_h) if d not in set(k)] for k in kept]
    order = [n + k for n, k in zip(nope, kept)]  # each KV head: [nope | rope]
    q_order = [order[h // (H // G)] for h in range(H)]
    direct = {"q_proj.weight": _rows(src.wq, H, q_order, d_h)}
    if src.bq is not None:
        direct["q_proj.bias"] = _rows(src.bq, H, q_order, d_h)
    if src.q_norm is not None:
        direct["q_norm.weight"] = _norm_rows(src.q_norm, order)
        direct["k_norm.weight"] = _norm_rows(src.k_norm, order)
    wk_nope, bk_nope = _rows(src.wk, G, nope, d_h), _rows(src.bk, G, nope, d_h)
    if plan.nope_scale is not None:  # row (g, d) belongs to pair d % n_f
        alpha = plan.nope_scale[torch.tensor([d % n_f for n in nope for d in n])]
        wk_nope = (wk_nope.double() * alpha[:, None]).to(wk_nope.dtype)
        bk_nope = (bk_nope.double() * alpha).to(bk_nope.dtype) if bk_nope is not None else None
    return ModeParts(direct=direct, d_n=d_h - len(kept[0]), rope_pairs=[list(p) for p in plan.pairs],
                     wk_rope=_rows(src.wk, G, kept, d_h), bk_rope=_rows(src.bk, G, kept, d_h),
                     wk_nope=wk_nope, bk_nope=bk_nope)


def _shared_parts(src: AttentionWeights, plan: LatentPlan, dims: fmt.ModelDims) -> ModeParts:
    H, G, d_h, D = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim, dims.hidden_size
    n_f = d_h // 2
    U = plan.rotation.to(torch.float64)  # [n_f, G, G]
    comps = plan.components
    pairs = torch.tensor([i for i, _ in comps])
    cols = torch.tensor([j for _, j in comps])
    u = U[pairs, :, cols]  # [K, G]: mixing weights of each kept component over KV heads

    def per_head(w: torch.Tensor, heads: int) -> torch.Tensor:  # [heads d_h, ...] -> [heads, 2 (a/b), n_f, ...]
        return w.view(heads, 2, n_f, *w.shape[1:])

    wk = per_head(src.wk, G)  # [G, 2, n_f, D]
    # k_rope,(i,j) = sum_g U_i[g, j] k_g[pair i]: one rope head of 2K dims, [a parts | b parts]
    wk_rope = torch.einsum("kg,gckd->ckd", u, wk[:, :, pairs]).reshape(2 * len(comps), D)
    # q_rope,h,(i,j) = U_i[g(h), j] q_h[pair i]: absorbs the mixing into the query
    group = torch.arange(H) // (H // G)
    wq = per_head(src.wq, H)
    q_rope = (u.T[group][:, None, :, None] * wq[:, :, pairs]).reshape(H, 2 * len(comps), D)
    q = torch.cat([src.wq.view(H, d_h, D), q_rope], dim=1).reshape(-1, D)  # per head [q (d_h) | q_rope]
    direct = {"q_proj.weight": q}
    bk_rope = None
    if src.bq is not None:
        bq = per_head(src.bq, H)
        bq_rope = (u.T[group][:, None, :] * bq[:, :, pairs]).reshape(H, -1)
        direct["q_proj.bias"] = torch.cat([src.bq.view(H, d_h), bq_rope], dim=1).reshape(-1)
    # NoPE keys: W_k,nope = alpha_i (I - Pi_i) W_k per pair, in each head's own coordinates
    residual = torch.eye(G, dtype=torch.float64) - kept_projection_shared(U, comps)  # [n_f, G, G]
    if plan.nope_scale is not None:
        residual = residual * plan.nope_scale.to(torch.float64)[:, None, None]
    wk_nope = torch.einsum("igh,hcid->gcid", residual, wk).reshape(G * d_h, D)
    bk_nope = None
    if src.bk is not None:
        bk = per_head(src.bk, G)
        bk_rope = torch.einsum("kg,gck->ck", u, bk[:, :, pairs]).reshape(-1)
        bk_nope = torch.einsum("igh,hci->gci", residual, bk).reshape(-1)
    return ModeParts(direct=direct, d_n=d_h, rope_pairs=[[i for i, _ in comps]],
                     wk_rope=wk_rope, bk_rope=bk_rope, wk_nope=wk_nope, bk_nope=bk_nope)


def _full_parts(src: AttentionWeights, plan: LatentPlan, dims: fmt.ModelDims) -> ModeParts:
    G, d_h = dims.num_key_value_heads, dims.head_dim
    direct = {"q_proj.weight": src.wq}
    if src.bq is not None:
        direct["q_proj.bias"] = src.bq
    if src.q_norm is not None:
        direct["q_norm.weight"] = src.q_norm.expand(G, d_h).clone()
        direct["k_norm.weight"] = src.k_norm.expand(G, d_h).clone()
    return ModeParts(direct=direct, d_n=d_h, rope_pairs=[], wk_rope=src.wk.new_zeros(0, src.wk.shape[1]),
                     bk_rope=None, wk_nope=src.wk, bk_nope=src.bk)


def source_layer_tensors(src: AttentionWeights) -> dict[str, torch.Tensor]:
    """A layer left uncompressed keeps its tensors as they are."""
    out = {"q_proj.weight": src.wq, "k_proj.weight": src.wk, "v_proj.weight": src.wv, "o_proj.weight": src.wo}
    for name, t in (("q_proj.bias", src.bq), ("k_proj.bias", src.bk), ("v_proj.bias", src.bv),
                    ("q_norm.weight", src.q_norm), ("k_norm.weight", src.k_norm)):
        if t is not None:
            out[name] = t
    return out
