"""Broken latent checkpoints fail at load with an error naming the problem; serve-time overrides.

Unit level: ``vllm_latentkv.model.load_latent_spec`` (what the model runs at construction) and
``vllm_latentkv.config.resolve_spec``. Engine level: one in-process ``vllm.LLM`` on a checkpoint
with a mis-shaped tensor.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("vllm")

from latentkv import format as fmt  # noqa: E402
from test_latent_helpers import Engine, convert_to, make_random_llama  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    src = make_random_llama(tmp / "src", heads=4, kv_heads=2, head_dim=16, layers=2, vocab=128)
    return convert_to(src, tmp / "latent", rope_mode="partial", rope_strategy="high", rope_pairs=2, svd="joint", rank=32)


def _copy(good, tmp_path, edit_config=None, edit_tensors=None):
    out = tmp_path / "broken"
    shutil.copytree(good, out)
    if edit_config:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        tensors = load_file(out / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _vllm_config(path, **overrides):
    from latentkv.modeling import LatentKVConfig

    hf = LatentKVConfig.from_pretrained(path)
    for k, v in overrides.items():  # what vLLM's --hf-overrides does
        setattr(hf, k, v)
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf, model=str(path), revision=None))


def _load(path, **overrides):
    from vllm_latentkv.model import load_latent_spec

    return load_latent_spec(_vllm_config(path, **overrides))


def test_good_checkpoint_loads(good):
    spec, dims = _load(good)
    assert spec.cache_dtype == "auto" and dims.num_hidden_layers == 2


def test_mis_shaped_tensor(good, tmp_path):
    name = "model.layers.1.self_attn.kv_a_proj.weight"
    bad = _copy(good, tmp_path, edit_tensors=lambda t: t.__setitem__(name, t[name][:-1].contiguous()))
    with pytest.raises(fmt.FormatError, match=rf"tensor {name} has shape"):
        _load(bad)


def test_missing_tensor(good, tmp_path):
    name = "model.layers.0.self_attn.v_b_proj.weight"
    bad = _copy(good, tmp_path, edit_tensors=lambda t: t.pop(name))
    with pytest.raises(fmt.FormatError, match=rf"missing tensor\(s\): {name}"):
        _load(bad)


def test_inconsistent_latent_config(good, tmp_path):
    bad = _copy(good, tmp_path, edit_config=lambda c: c["latent_kv"]["layers"][1].update(qk_nope_head_dim=10))
    with pytest.raises(fmt.FormatError, match=r"latent_kv.layers\[1\].qk_nope_head_dim=10"):
        _load(bad)


def test_invalid_latent_config_field(good, tmp_path):
    bad = _copy(good, tmp_path, edit_config=lambda c: c["latent_kv"]["layers"][0]["latent"].update(groups=3))
    with pytest.raises(fmt.FormatError, match=r"latent_kv.layers.0.latent"):
        _load(bad)


# --- serve-time overrides ---------------------------------------------------------------------

def test_flat_override_selects_int4(good):
    spec, _ = _load(good, latent_kv_cache_dtype="int4", latent_kv_int4_group_size=16)
    assert (spec.cache_dtype, spec.int4_group_size) == ("int4", 16)


def test_nested_partial_override_is_merged_with_the_checkpoint(good):
    # vLLM replaces a dict-valued attribute with the --hf-overrides dict
    spec, _ = _load(good, latent_kv={"cache_dtype": "int4"})
    assert spec.cache_dtype == "int4" and len(spec.layers) == 2


def test_override_of_weight_fields_is_rejected(good):
    with pytest.raises(fmt.FormatError, match="may only set cache_dtype, int4_group_size, token_filter; got layers"):
        _load(good, latent_kv={"layers": []})


def test_token_filter_override_and_off_switch(good):
    spec, _ = _load(good, latent_kv_token_filter={"skip_fraction": 0.3, "layers": [1]})
    assert spec.token_filter_options().skip_fraction == 0.3
    spec, _ = _load(good, latent_kv={"token_filter": {"skip_fraction": 0.3}})  # nested, merged
    assert spec.token_filter_options().skip_fraction == 0.3
    spec, _ = _load(good, latent_kv_token_filter=False)
    assert spec.token_filter_options() is None


def test_bad_token_filter_override_is_rejected(good):
    with pytest.raises(fmt.FormatError, match="unknown option.*skip_fractoin"):
        _load(good, latent_kv_token_filter={"skip_fractoin": 0.3})


def test_unknown_cache_dtype_is_rejected(good):
    with pytest.raises(fmt.FormatError, match="latent_kv.cache_dtype"):
        _load(good, latent_kv_cache_dtype="int8")


def test_int4_group_must_divide_the_latent(good):
    from vllm_latentkv.attention.cache import LatentCacheLayout

    spec, _ = _load(good, latent_kv_cache_dtype="int4", latent_kv_int4_group_size=64)
    with pytest.raises(ValueError, match=r"layers\[0\].*latent width \(32\).*int4_group_size \(64"):
        LatentCacheLayout.for_layer(spec.layers[0], spec, torch.float32, "latent_kv.layers[0]")


@pytest.mark.slow
def test_engine_refuses_mis_shaped_checkpoint(good, tmp_path):
    name = "model.layers.0.self_attn.k_b_proj.weight"
    bad = _copy(good, tmp_path, edit_tensors=lambda t: t.__setitem__(name, torch.cat([t[name], t[name][:1]])))
    with pytest.raises(Exception, match=rf"tensor {name} has shape"):
        Engine(bad, skip_tokenizer_init=True).close()
