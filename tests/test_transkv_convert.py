"""TransKV checkpoints: narrower per-head K/V from projections of rotated keys and of values."""

from __future__ import annotations

import pytest
import torch

from converters.convert import ConvertOptions, convert
from latentkv.modeling import LatentKVCache
from tests.helpers import load_hf, load_latent, make_hf_model

CALIB = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_full_width_transkv_equals_source(family, tmp_path):
    src = make_hf_model(tmp_path / "src", family, kv_heads=2)
    out = tmp_path / "tk"
    convert(src, out, ConvertOptions(method="transkv", kv_ratio=1.0), progress=False, calibration_ids=CALIB)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(6))
    model = load_latent(out)
    assert all(layer.kind == "reduced_head" and layer.k_head_dim == 16 for layer in model.config.spec.layers)
    assert (model(ids).logits - load_hf(src)(ids).logits).abs().max().item() < 1e-4


def test_reduced_transkv_cache_and_decode(tmp_path):
    src = make_hf_model(tmp_path / "src", "llama", kv_heads=2)
    out = tmp_path / "tk"
    convert(src, out, ConvertOptions(method="transkv", kv_ratio=0.5, transkv_scale="reduced"), progress=False, calibration_ids=CALIB)
    model = load_latent(out)
    layer = model.config.spec.layers[0]
    assert (layer.k_head_dim, layer.v_head_dim) == (8, 8) and layer.softmax_scale == pytest.approx(8**-0.5)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(7))
    full = model(ids).logits
    cache = LatentKVCache(model.config.num_hidden_layers)
    steps = [model(ids[:, :6], past_key_values=cache).logits] + [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(6, 12)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-4
    assert cache.bytes_per_token(0) == 2 * (8 + 8) * 4  # G (r_k + r_v) fp32 values: half the source's 2 x 2 x 16
