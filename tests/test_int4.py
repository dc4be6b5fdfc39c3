"""The INT4 latent-cache format (``latentkv.int4``, pure torch): pack/unpack, quantizer properties and error."""

import pytest
import torch

from tests.helpers import PLAIN_SVD

from latentkv.int4 import (
    dequantize_int4,
    int4_pack_rows,
    int4_row_bytes,
    int4_unpack_rows,
    pack_int4,
    quantize_int4,
    unpack_int4,
)


def test_pack_roundtrip_and_nibble_order():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3).view(3, 16)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 8)
    assert packed[0, 0].item() == (0 | (1 << 4))  # q = -8, -7 -> u = 0 (low), 1 (high)
    assert torch.equal(unpack_int4(packed), q)


def test_row_bytes():
    assert int4_row_bytes(512, 64, 32) == 256 + 32 + 128  # DeepSeek-sized row: 416 vs 1152 in bf16
    assert int4_row_bytes(48, 8, 16) == 24 + 6 + 16
    with pytest.raises(ValueError):
        int4_row_bytes(48, 8, 32)
    with pytest.raises(ValueError):
        int4_row_bytes(48, 8, 12)


def test_quantizer_properties():
    x = torch.randn(64, 64) * torch.logspace(-3, 3, 64).unsqueeze(1)
    x[0, :32] = 0.0
    q, s = quantize_int4(x, 32)
    assert q.min() >= -8 and q.max() <= 7
    assert torch.all(q[0, :32] == 0)
    xh = dequantize_int4(q, s, 32)
    # the largest-magnitude element of every group maps to -8 (all 16 levels used) ...
    g = x.view(64, 2, 32)
    idx = g.abs().argmax(-1, keepdim=True)
    assert torch.all(q.view(64, 2, 32).gather(-1, idx)[1:] == -8)
    # ... so it is reproduced up to the fp16 rounding of the scale, and the error of every
    # element is at most half a step (or one step for an opposite-sign element clamped at +7)
    step = s.float().abs().unsqueeze(-1)
    err = (xh - x).view(64, 2, 32).abs()
    assert torch.all(err <= step * 1.0 + 1e-6 * g.abs())
    # rows round-trip
    rope = torch.randn(64, 8)
    lat, rp = int4_unpack_rows(int4_pack_rows(x, rope, 32), 64, 8, 32)
    assert torch.equal(lat, xh) and torch.equal(rp, rope.half())


@pytest.mark.parametrize("group_size", [16, 32, 64])
def test_quantizer_error_beats_absmax7(group_size):
    """Relative RMS error on Gaussian data: signed absmax (the kernels' rule) ~0.076/0.086/0.095
    for G = 16/32/64, about 11% below the textbook max|x|/7 rule (0.085/0.097/0.108). Student-t
    (3 dof) data: 0.100/0.128/0.160 vs 0.113/0.145/0.181."""
    x = torch.randn(4096, 128, generator=torch.Generator().manual_seed(0))
    errs = {}
    for scheme in ("signed_absmax", "absmax7"):
        q, s = quantize_int4(x, group_size, scheme)
        errs[scheme] = ((dequantize_int4(q, s, group_size) - x).pow(2).mean() / x.pow(2).mean()).sqrt().item()
    assert errs["signed_absmax"] < 0.1
    assert errs["signed_absmax"] < 0.93 * errs["absmax7"]


def test_reference_model_attends_to_what_an_int4_cache_holds(tmp_path):
    """cache_dtype int4: the reference quantizes latents as they are cached (prefill and decode alike)."""
    import json

    from converters.convert import ConvertOptions, convert
    from latentkv.modeling import LatentKVCache
    from tests.helpers import load_latent, make_hf_model

    src = make_hf_model(tmp_path / "src", "llama", kv_heads=2)
    out = tmp_path / "latent"
    convert(src, out, ConvertOptions(rope_mode="partial", rope_strategy="high", rope_pairs=2, rank=16, **PLAIN_SVD), progress=False)
    ids = torch.randint(0, 128, (1, 14), generator=torch.Generator().manual_seed(0))
    fp32 = load_latent(out)(ids).logits
    config = json.loads((out / "config.json").read_text())
    config["latent_kv"].update(cache_dtype="int4", int4_group_size=8)
    (out / "config.json").write_text(json.dumps(config))
    model = load_latent(out)
    quantized = model(ids).logits
    assert 1e-6 < (quantized - fp32).abs().max().item() < 0.5  # 4-bit latents move the logits, a little
    cache = LatentKVCache(model.config.num_hidden_layers)
    steps = [model(ids[:, :6], past_key_values=cache).logits] + [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(6, 14)]
    assert (torch.cat(steps, 1) - quantized).abs().max().item() < 1e-4
