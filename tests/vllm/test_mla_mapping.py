"""``shared``-RoPE latent layers as DeepSeek MLA weights (``vllm_latentkv.mla_mapping``).

The mapping is checked here, one layer at a time and in float64, against a plain-PyTorch copy of
what vLLM's MLA layer computes (``MultiHeadLatentAttentionWrapper.forward`` ->
``MLAAttention``: prefill ``forward_mha`` = up-projection with ``kv_b_proj`` and ordinary attention;
decode = ``W_UK_T``/``W_UV`` from ``split_kv_b_proj``, MQA over [kv_c | k_pe] cache rows): one
layer of a converted random GQA Llama, MLA math == the reference ``latentkv.modeling.LatentAttention``.
The real ``MLAAttention`` in the engine is tested in ``test_vllm_mla_engine.py``.
"""

from __future__ import annotations

import pytest
import torch

from latentkv import format as fmt
from tests.helpers import PLAIN_SVD
from vllm_latentkv.mla_mapping import (
    PairRotaryEmbedding,
    kv_b_weight,
    mla_unsupported_reason,
    mla_weights,
    rope_inv_freq,
)

pytestmark = [pytest.mark.vllm]

VOCAB = 128


def _convert(tmp, *, heads, kv_heads, head_dim, hidden, rope_pairs, **opts):
    from tests.helpers import load_latent, make_hf_model
    from converters.convert import ConvertOptions, convert

    src = make_hf_model(tmp / "src", "llama", heads=heads, kv_heads=kv_heads, head_dim=head_dim, hidden=hidden,
                        layers=1, vocab=VOCAB)
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    convert(src, tmp / "latent", ConvertOptions(rope_mode="shared", rope_pairs=rope_pairs, **{**PLAIN_SVD, **opts}), progress=False,
            calibration_ids=ids)
    model = load_latent(tmp / "latent", dtype=torch.float64)
    cfg = model.config
    return model, cfg.spec, cfg.dims


# -- vLLM's MLA layer, transcribed (fp64) ----------------------------------------------------------

def vllm_mla_layer(w, rotary_emb, x, positions, *, H, d_nope, d_rope, d_v, W, scale, decode_last: bool):
    """``MultiHeadLatentAttentionWrapper.forward`` (q_lora_rank None, kv_a_layernorm identity) over the
    tokens x [T, D] of one request; decode_last: the last token decodes (absorbed MQA) against all
    T cache rows, else all T tokens prefill (forward_mha, causal)."""
    T = x.shape[0]
    kv_lora = x @ w["kv_a_proj_with_mqa"].T
    kv_c, k_pe = kv_lora.split([W, d_rope], dim=-1)
    k_pe = k_pe.unsqueeze(1)
    q = (x @ w["q_proj"].T).view(-1, H, d_nope + d_rope)
    q[..., d_nope:], k_pe = rotary_emb(positions, q[..., d_nope:], k_pe)
    kv_b = w["kv_b_proj"]
    if not decode_last:  # forward_mha
        kv_nope = (kv_c @ kv_b.T).view(-1, H, d_nope + d_v)
        k_nope, v = kv_nope.split([d_nope, d_v], dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, H, -1)), dim=-1)
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale).transpose(0, 1)
    else:  # process_weights_after_loading + forward_mqa + _v_up_proj
        W_UK, W_UV = kv_b.T.view(W, H, d_nope + d_v).split([d_nope, d_v], dim=-1)  # split_kv_b_proj
        W_UK_T, W_UV = W_UK.permute(1, 2, 0), W_UV.transpose(0, 1)  # [H, P, L], [H, L, V]
        q_nope, q_pe = q[-1:].split([d_nope, d_rope], dim=-1)
        ql_nope = torch.bmm(q_nope.transpose(0, 1), W_UK_T).transpose(0, 1)  # [1, H, L]
        mqa_q = torch.cat((ql_nope, q_pe), dim=-1)
        cache = torch.cat((kv_c, k_pe[:, 0]), dim=-1)  # [S, L + R]: the paged cache rows
        probs = ((mqa_q @ cache.T) * scale).softmax(-1)  # [1, H, S]
        o_lat = probs @ kv_c  # [1, H, L]
        o = torch.bmm(o_lat.transpose(0, 1), W_UV).transpose(0, 1)
        T = 1
    return o.reshape(T, H * d_v) @ w["o_proj"].T


def _layer_tensors(attn) -> dict[str, torch.Tensor]:
    return {n: getattr(attn, n).weight.detach() for n in ("q_proj", "kv_a_proj", "k_b_proj", "v_b_proj", "o_proj")}


def _check_layer(model, spec, dims, T=12):
    attn = model.model.layers[0].self_attn
    layer = spec.layers[0]
    assert mla_unsupported_reason(layer, spec, dims, head_sizes=None) is None
    w = mla_weights(_layer_tensors(attn), layer, dims)
    rot = PairRotaryEmbedding(rope_inv_freq(layer, spec))
    H, d_h = dims.num_attention_heads, dims.head_dim
    kw = dict(H=H, d_nope=layer.qk_nope_head_dim, d_rope=layer.rope_head_dim, d_v=d_h, W=layer.latent.width,
              scale=layer.softmax_scale)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, dims.hidden_size, generator=g, dtype=torch.float64)
    pos = torch.arange(T)
    with torch.no_grad():
        ref = attn(x[None], pos[None], None, None, "expand")[0]
        prefill = vllm_mla_layer(w, rot, x, pos, decode_last=False, **kw)
        decode = vllm_mla_layer(w, rot, x, pos, decode_last=True, **kw)
        ref_absorb = attn(x[None], pos[None], None, None, "absorb")[0]
    # the reference attends in float32 (``.float()``): float32-level agreement, relative to the output size
    tol = dict(rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(prefill, ref, **tol)
    torch.testing.assert_close(decode, ref[-1:], **tol)
    torch.testing.assert_close(decode, ref_absorb[-1:], **tol)
    assert ref.abs().max() > 1e-3  # not a vacuous comparison


@pytest.mark.parametrize("latent", [dict(svd="joint", rank=24), dict(svd="split", rank=40),
                                    dict(svd="joint", rank=24, latent_groups=2)], ids=["joint", "split", "groups2"])
def test_small_gqa_layer_equals_reference(tmp_path, latent):
    try:
        model, spec, dims = _convert(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, rope_pairs=4, **latent)
    except Exception as e:  # a latent shape the converter does not offer in shared mode
        if latent.get("latent_groups", 1) > 1 or latent["svd"] == "split":
            pytest.skip(f"converter: {e}")
        raise
    layer = spec.layers[0]
    assert layer.rope_mode == "shared" and layer.num_rope_heads == 1
    _check_layer(model, spec, dims)


def test_deepseek_v3_shaped_layer_equals_reference(tmp_path):
    """d_h 128, R_D 64, W 512: DeepSeek-V3's (qk_nope 128, qk_rope 64, v 128, kv_lora_rank 512)."""
    model, spec, dims = _convert(tmp_path, heads=4, kv_heads=2, head_dim=128, hidden=512, rope_pairs=32,
                                 svd="joint", rank=512)
    layer = spec.layers[0]
    assert (layer.qk_nope_head_dim, layer.rope_head_dim, layer.latent.width) == (128, 64, 512)
    assert mla_unsupported_reason(layer, spec, dims) is None  # 576: FlashMLA's size
    _check_layer(model, spec, dims, T=9)


def test_kv_b_weight_layout_gqa():
    """Query head h gets [W_uk[g(h)] ; W_uv[g(h)]] (vLLM reads kv_b_proj.weight.T as [L, H, P + V])."""
    dims = fmt.ModelDims(hidden_size=32, num_attention_heads=6, num_key_value_heads=2, head_dim=4,
                         num_hidden_layers=1, intermediate_size=8, vocab_size=8)
    layer = fmt.LatentLayer(rope_mode="shared", rope_pairs=[[0]], qk_nope_head_dim=4,
                            latent=fmt.LatentRanks(joint=True, k_rank=5, v_rank=5), softmax_scale=0.5)
    k_b, v_b = torch.randn(2 * 4, 5), torch.randn(2 * 4, 5)
    w = kv_b_weight(k_b, v_b, layer, dims)
    assert w.shape == (6 * 8, 5)
    per_head = w.T.view(5, 6, 8)
    for h in range(6):
        g = h // 3
        torch.testing.assert_close(per_head[:, h, :4].T, k_b.view(2, 4, 5)[g])
        torch.testing.assert_close(per_head[:, h, 4:].T, v_b.view(2, 4, 5)[g])
    # one rank's heads (TP shard of the column-parallel kv_b_proj)
    torch.testing.assert_close(kv_b_weight(k_b, v_b, layer, dims, heads=range(3, 6)), w[3 * 8:])


def test_unsupported_reasons():
    dims = fmt.ModelDims(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                         num_hidden_layers=1, intermediate_size=8, vocab_size=8)
    spec_kw = dict(format_version=1, source=dict(architecture="LlamaForCausalLM", model_type="llama"),
                   method=dict(name="svd"), rope_inv_freq=[1.0] * 64)
    shared = fmt.LatentLayer(rope_mode="shared", rope_pairs=[list(range(32))], qk_nope_head_dim=128,
                             latent=fmt.LatentRanks(joint=True, k_rank=512, v_rank=512), softmax_scale=0.1)
    spec = fmt.LatentKVSpec(layers=[shared], **spec_kw)
    assert mla_unsupported_reason(shared, spec, dims) is None
    assert "bias" in mla_unsupported_reason(shared, fmt.LatentKVSpec(layers=[shared], attention_bias=True, **spec_kw), dims)
    assert "int4" in mla_unsupported_reason(shared, fmt.LatentKVSpec(layers=[shared], cache_dtype="int4", **spec_kw), dims)
    partial = fmt.LatentLayer(rope_mode="partial", rope_pairs=[[0], [1]], qk_nope_head_dim=126,
                              latent=fmt.LatentRanks(joint=True, k_rank=64, v_rank=64), softmax_scale=0.1)
    assert "shared" in mla_unsupported_reason(partial, spec, dims)
    narrow = shared.model_copy(update={"latent": fmt.LatentRanks(joint=True, k_rank=100, v_rank=100)})
    assert "not in" in mla_unsupported_reason(narrow, spec, dims)
    assert mla_unsupported_reason(narrow, spec, dims, head_sizes=None) is None
    assert "not latent" in mla_unsupported_reason(fmt.SourceLayer(softmax_scale=0.1), spec, dims)


def test_pair_rotary_embedding_uses_our_pairs():
    """Pair j of the rope head turns by position * rope_inv_freq[rope_pairs[0][j]] (half-split)."""
    freqs = torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=torch.float64)
    rot = PairRotaryEmbedding(freqs[[3, 0]])
    q = torch.zeros(1, 2, 4, dtype=torch.float64)
    q[..., 1] = 1.0  # pair 1 (frequency 1.0), first coordinate
    k = q[:, :1].clone()
    qr, kr = rot(torch.tensor([2]), q, k)
    expected = torch.tensor([0.0, torch.cos(torch.tensor(2.0)), 0.0, torch.sin(torch.tensor(2.0))], dtype=torch.float64)
    torch.testing.assert_close(qr[0, 0], expected)
    torch.testing.assert_close(kr[0, 0], expected)
