"""The converter is exact where the math says it must be, and lossy only where it chooses to be.

Oracles: the source models run by Hugging Face transformers itself, and an independent
partial-RoPE attention written below from the source weights.
"""

from __future__ import annotations

import pytest
import torch

from converters.convert import ConvertOptions, convert
from latentkv.modeling import LatentKVCache
from tests.helpers import PLAIN_SVD, load_hf, load_latent, make_hf_model

TOL = 1e-4  # fp32 logits, max abs difference


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {
        "llama-mha": make_hf_model(root / "llama-mha", "llama", kv_heads=4),
        "llama-gqa": make_hf_model(root / "llama-gqa", "llama", kv_heads=2),
        "qwen2-gqa": make_hf_model(root / "qwen2-gqa", "qwen2", kv_heads=2),
        "qwen3-gqa": make_hf_model(root / "qwen3-gqa", "qwen3", kv_heads=2),
    }


def _convert(src, tmp_path, **kw):
    out = tmp_path / "latent"
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    convert(src, out, ConvertOptions(**{**PLAIN_SVD, **kw}), progress=False, calibration_ids=ids)
    return out


EXACT_SETTINGS = [
    dict(rope_mode="partial", rope_strategy="high", rope_pairs=8, kv_ratio=1.0),  # all pairs kept
    dict(rope_mode="full", kv_ratio=1.0),
    dict(rope_mode="full", kv_ratio=1.0, svd="split"),
    dict(rope_mode="shared", rope_pairs=16, kv_ratio=1.0),  # every rotated component kept (G=2: 2 x 8)
]


@pytest.mark.parametrize("name", ["llama-mha", "llama-gqa", "qwen2-gqa", "qwen3-gqa"])
@pytest.mark.parametrize("setting", EXACT_SETTINGS, ids=lambda s: f"{s['rope_mode']}-{s.get('svd', 'joint')}")
def test_full_rank_conversion_equals_source(sources, name, setting, tmp_path):
    if setting["rope_mode"] == "shared":
        if name.startswith("qwen3"):  # per-head norms do not commute with mixing heads
            with pytest.raises(ValueError, match="shared RoPE cannot represent q/k-norm sources"):
                _convert(sources[name], tmp_path, **setting)
            return
        setting = dict(setting, rope_pairs=8 * (4 if name == "llama-mha" else 2))
    out = _convert(sources[name], tmp_path, **setting)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    ref = load_hf(sources[name])(ids).logits
    got = load_latent(out)(ids).logits
    assert (got - ref).abs().max().item() < TOL


def partial_rope_reference(src_model, pairs_per_head, ids):
    """The source model with RoPE removed outside the kept pairs, written from the HF modules."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    cfg = src_model.config
    H, G, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    n_f = d // 2
    inv_freq = src_model.model.rotary_emb.inv_freq.double()

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kw):
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, H, d).double()
        k = self.k_proj(hidden_states).view(B, T, G, d).double()
        v = self.v_proj(hidden_states).view(B, T, G, d).double()
        angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq  # [T, n_f]
        kept = torch.zeros(G, n_f, dtype=torch.bool)
        for g, pairs in enumerate(pairs_per_head):
            kept[g, pairs] = True
        kept_q = kept.repeat_interleave(H // G, 0)

        def rot(x, keep):  # rotate only kept pairs: NoPE elsewhere
            a, b = x[..., :n_f], x[..., n_f:]
            cos = torch.where(keep, angle[:, None].cos(), torch.ones(()))
            sin = torch.where(keep, angle[:, None].sin(), torch.zeros(()))
            return torch.cat((a * cos - b * sin, b * cos + a * sin), -1)

        q, k = rot(q, kept_q), rot(k, kept)
        k, v = k.repeat_interleave(H // G, 2), v.repeat_interleave(H // G, 2)
        s = torch.einsum("bthd,bshd->bhts", q, k) / d**0.5
        s = s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        o = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v).float()
        return self.o_proj(o.reshape(B, T, H * d)), None

    original = LlamaAttention.forward
    LlamaAttention.forward = forward
    try:
        return src_model(ids).logits
    finally:
        LlamaAttention.forward = original


@pytest.mark.parametrize("name", ["llama-mha", "llama-gqa"])
def test_partial_rope_low_rank_step_is_lossless_at_full_rank(sources, name, tmp_path):
    out = _convert(sources[name], tmp_path, rope_mode="partial", rope_strategy="uniform", rope_pairs=3, kv_ratio=1.0)
    model = load_latent(out)
    pairs = [layer.rope_pairs for layer in model.config.spec.layers]
    assert all(p == pairs[0] for p in pairs)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    ref = partial_rope_reference(load_hf(sources[name]), pairs[0], ids)
    full_rope = load_hf(sources[name])(ids).logits
    got = model(ids).logits
    assert (got - ref).abs().max().item() < TOL
    assert (got - full_rope).abs().max().item() > 10 * TOL  # partial RoPE really changed the model


DECODE_SETTINGS = [
    ("llama-gqa", dict(rope_mode="partial", rope_strategy="2norm", rope_pairs=2, kv_ratio=0.5)),
    ("qwen2-gqa", dict(rope_mode="partial", rope_strategy="low", rope_pairs=2, kv_ratio=0.5, svd="split")),
    ("qwen3-gqa", dict(rope_mode="partial", rope_strategy="high", rope_pairs=2, kv_ratio=0.5)),
    ("llama-mha", dict(rope_mode="shared", rope_pairs=6, kv_ratio=0.4)),
    ("qwen2-gqa", dict(rope_mode="full", kv_ratio=0.5, latent_groups=2)),
    ("qwen3-gqa", dict(rope_mode="full", kv_ratio=0.25, svd="split")),
]


@pytest.mark.parametrize("name,setting", DECODE_SETTINGS, ids=lambda x: x if isinstance(x, str) else x["rope_mode"])
def test_latent_cache_decode_equals_full_forward(sources, name, setting, tmp_path):
    model = load_latent(_convert(sources[name], tmp_path, **setting))
    ids = torch.randint(0, 128, (2, 18), generator=torch.Generator().manual_seed(4))
    full = model(ids).logits
    cache = LatentKVCache(model.config.num_hidden_layers)
    steps = [model(ids[:, :10], past_key_values=cache).logits]  # prefill (expanded path)
    for t in range(10, 18):  # one token at a time: absorbed path
        steps.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    decoded = torch.cat(steps, dim=1)
    assert (decoded - full).abs().max().item() < TOL
    # the cache holds exactly what the format promises
    layer = model.config.spec.layers[0]
    G = model.config.num_key_value_heads
    scale = G if (setting["rope_mode"] == "partial" and name.startswith("qwen3")) else 0
    values = layer.latent.width + layer.num_rope_heads * layer.rope_head_dim + scale
    assert cache.bytes_per_token(0) == values * 4
    assert set(cache.layers[0].entries) <= {"latent", "rope", "key_scale"}


def test_cache_bytes_follow_the_format_in_bf16(sources, tmp_path):
    out = _convert(sources["llama-gqa"], tmp_path, rope_mode="partial", rope_strategy="high", rope_pairs=1, rank=10, dtype="bfloat16")
    model = load_latent(out, dtype=torch.bfloat16)
    cache = LatentKVCache(model.config.num_hidden_layers)
    model(torch.randint(0, 128, (1, 7)), past_key_values=cache)
    # (latent + n_kv x rope dims) x element size = (10 + 2 x 2) x 2 bytes
    assert [cache.bytes_per_token(i) for i in range(2)] == [28, 28]


def test_generate_uses_the_latent_cache(sources, tmp_path):
    model = load_latent(_convert(sources["llama-gqa"], tmp_path, rope_mode="full", kv_ratio=0.5))
    ids = torch.randint(0, 128, (1, 5))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, LatentKVCache)
    assert out.past_key_values.get_seq_length() == 10  # 5 prompt + 5 fed back (the 6th is not cached yet)
    no_cache = ids
    for _ in range(6):  # greedy without any cache gives the same tokens
        no_cache = torch.cat([no_cache, model(no_cache).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out.sequences, no_cache)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sharded_source_and_output(tmp_path, dtype):
    """A sharded fp16/bf16 Mistral source converts into a sharded checkpoint equal to an unsharded one."""
    from transformers import AutoModelForCausalLM

    src = make_hf_model(tmp_path / "src", "mistral", kv_heads=2, layers=3, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")  # Hugging Face's own sharding
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    opts = dict(rope_mode="partial", rope_strategy="high", rope_pairs=8, kv_ratio=1.0, **PLAIN_SVD)
    convert(tmp_path / "sharded", tmp_path / "one", ConvertOptions(**opts), progress=False)
    convert(tmp_path / "sharded", tmp_path / "many", ConvertOptions(shard_bytes=40_000, **opts), progress=False)
    shards = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "many" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(8))
    one, many = load_latent(tmp_path / "one"), load_latent(tmp_path / "many")
    from latentkv.checkpoint import TensorReader

    stored = {"F16": torch.float16, "BF16": torch.bfloat16}
    assert {stored[TensorReader(tmp_path / d).dtype_name("model.layers.0.self_attn.kv_a_proj.weight")] for d in ("one", "many")} == {dtype}
    assert torch.equal(one(ids).logits, many(ids).logits)
    # all pairs kept, full rank: the converted model is the source up to rounding of the stored dtype
    ref = load_hf(src)(ids).logits
    assert (one(ids).logits - ref).abs().max().item() < 0.05


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-gqa"])
def test_centred_bias_update_is_exact_on_the_mean_input(sources, name, tmp_path):
    """LatentLLM eq. 43: with the bias update the compressed K/V projections are exact at the input mean."""
    from converters.calibration import attention_stats, embed
    from converters.importers.hf import SourceModel
    from converters.latent_attention import LatentPlan, _reconstruct, build_latent_layer
    from converters.methods import activation_factorizer

    source = SourceModel(sources[name])
    src = source.attention(0)
    stats = attention_stats(source, 0, embed(source, torch.randint(0, 128, (4, 32))), src)
    plan = LatentPlan(rope_mode="full", joint=True, k_rank=12, v_rank=12)
    mu = stats.inputs.mean
    layer, t = build_latent_layer(src, plan, source.dims, activation_factorizer(stats, "root_covariance", 0.01, True), input_mean=mu)
    A = t["kv_a_proj.weight"]
    k_hat = _reconstruct(A, t["k_b_proj.weight"], 2, 1) @ mu + t["k_b_proj.bias"]
    v_hat = _reconstruct(A, t["v_b_proj.weight"], 2, 1) @ mu + t["v_b_proj.bias"]
    bias = lambda b: b if b is not None else 0  # noqa: E731
    assert torch.allclose(k_hat, src.wk @ mu + bias(src.bk), atol=1e-9)
    assert torch.allclose(v_hat, src.wv @ mu + bias(src.bv), atol=1e-9)
    # and the whole pipeline: a bias-free source gains biases, the checkpoint loads and runs
    out = _convert(sources[name], tmp_path, rope_mode="partial", rope_strategy="high", rope_pairs=2, kv_ratio=0.5,
                   method="activation", centred=True, keep_layers=[1])
    model = load_latent(out)
    assert model.config.spec.attention_bias and model.config.spec.method.params["centred"]
    assert torch.isfinite(model(torch.randint(0, 128, (1, 8))).logits).all()


@pytest.mark.parametrize("setting", [dict(svd="joint"), dict(svd="split", latent_groups=2)], ids=["joint", "split-groups"])
def test_hadamard_rotation_is_the_same_model(sources, setting, tmp_path):
    """The rotation is folded into kv_a_proj and the up-projections: logits unchanged, latent rotated."""
    base = dict(rope_mode="partial", rope_strategy="high", rope_pairs=2, rank=16, **setting)
    plain = load_latent(_convert(sources["qwen2-gqa"], tmp_path / "a", **base))
    rotated = load_latent(_convert(sources["qwen2-gqa"], tmp_path / "b", hadamard=True, **base))
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(9))
    assert (plain(ids).logits - rotated(ids).logits).abs().max().item() < 1e-4
    wa = plain.model.layers[0].self_attn.kv_a_proj.weight[:16]
    wb = rotated.model.layers[0].self_attn.kv_a_proj.weight[:16]
    assert (wa - wb).abs().max().item() > 1e-2  # the cached latent really is a different basis


@pytest.mark.parametrize("kept, carried", [([1, 2], 0), ([1], 2)], ids=["trailing", "middle"])
def test_kept_layers_keep_the_source_and_leave_the_prefix_unchanged(tmp_path, monkeypatch, kept, carried):
    """--keep-layers: a kept layer holds the source's attention exactly, the compressed layers before it
    are what converting every layer gives them, and the calibration streams (both of the model
    target's) are carried through a kept layer only when a compressed layer follows it."""
    import converters.convert as conv
    from safetensors.torch import load_file

    src = make_hf_model(tmp_path / "src", "llama", kv_heads=2, layers=3)
    calls = []
    real = conv._propagate
    monkeypatch.setattr(conv, "_propagate", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    kw = dict(rope_mode="full", kv_ratio=0.5, method="activation", refine_steps=5, refine_target="model")
    partial = load_file(_convert(src, tmp_path / "kept", keep_layers=kept, **kw) / "model.safetensors")
    assert len(calls) == carried  # the refinement hands on its own streams; kept layers need a propagation
    every = load_file(_convert(src, tmp_path / "all", **kw) / "model.safetensors")
    source = load_file(src / "model.safetensors")
    for name, t in partial.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if layer == 0:
            torch.testing.assert_close(t, every[name], atol=0, rtol=0)
        elif layer in kept and ".self_attn." in name:
            torch.testing.assert_close(t, source[name], atol=0, rtol=0)
