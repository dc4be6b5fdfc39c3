"""TransKV: a ``reduced_head`` layer from per-KV-head projections of rotated keys and of values.

Per layer and KV head g (TransKV; the authors' code): C_K,g = E[RoPE(k_g) RoPE(k_g)^T] and
C_V,g = E[v_g v_g^T] over calibration tokens (float64); P_K, P_V = their top eigenvectors
(``converters.math.transkv``). At run time q and k are rotated at full width, then projected
by their group's P_K; P_V is folded into v_proj and o_proj. The cache holds G (r_k + r_v)
values per token: ordinary per-head K/V, just narrower.
"""

from __future__ import annotations

import torch

from converters.importers.hf import AttentionWeights, SourceModel
from converters.math.transkv import fold_value_projection, transkv_projections, transkv_softmax_scale
from latentkv import format as fmt
from latentkv.rope import rotate


@torch.no_grad()
def kv_head_autocorrelation(source: SourceModel, i: int, hidden: torch.Tensor, src: AttentionWeights, chunk: int = 8):
    """(C_K, C_V), each [G, d_h, d_h]: mean outer products of rotated keys and of values per KV head."""
    from converters.calibration import attention_inputs

    dims = source.dims
    G, d_h = dims.num_key_value_heads, dims.head_dim
    Ck = torch.zeros(G, d_h, d_h, dtype=torch.float64)
    Cv = torch.zeros(G, d_h, d_h, dtype=torch.float64)
    n = 0
    for _, _, k, v, positions in attention_inputs(source, i, hidden, src, chunk):
        k = rotate(k, positions, source.inv_freq)  # RoPE(k) at each token's position in its sequence: [n, G, d_h]
        k, v = k.double(), v.double()
        Ck += torch.einsum("ngi,ngj->gij", k, k)
        Cv += torch.einsum("ngi,ngj->gij", v, v)
        n += k.shape[0]
    return Ck / n, Cv / n


def build_reduced_layer(
    src: AttentionWeights, Ck: torch.Tensor, Cv: torch.Tensor, r_k: int, r_v: int, dims: fmt.ModelDims, scale: str = "original"
) -> tuple[fmt.ReducedHeadLayer, dict[str, torch.Tensor]]:
    """Spec and tensors (relative to ``self_attn.``) of a TransKV layer with r_k / r_v dims per KV head."""
    if not (1 <= r_k <= dims.head_dim and 1 <= r_v <= dims.head_dim):
        raise ValueError(f"TransKV head dims ({r_k}, {r_v}) must be in [1, head_dim={dims.head_dim}]")
    P_k, P_v = transkv_projections(Ck, Cv, r_k, r_v)
    wv, wo, bv = fold_value_projection(src.wv, src.wo, P_v, b_v=src.bv)
    tensors = {"q_proj.weight": src.wq, "k_proj.weight": src.wk, "k_reduce": P_k, "v_proj.weight": wv, "o_proj.weight": wo}
    if src.bq is not None or src.bk is not None or src.bv is not None:
        zeros = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        tensors["q_proj.bias"] = src.bq if src.bq is not None else zeros(src.wq.shape[0])
        tensors["k_proj.bias"] = src.bk if src.bk is not None else zeros(src.wk.shape[0])
        tensors["v_proj.bias"] = bv if bv is not None else zeros(wv.shape[0])
    if src.q_norm is not None:
        tensors["q_norm.weight"], tensors["k_norm.weight"] = src.q_norm, src.k_norm
    layer = fmt.ReducedHeadLayer(k_head_dim=r_k, v_head_dim=r_v, softmax_scale=transkv_softmax_scale(dims.head_dim, r_k, scale))
    return layer, tensors
