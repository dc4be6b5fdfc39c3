"""The plugin entry points: inert without LATENTKV_CPU_PLATFORM, loadable by vLLM's
own loader, idempotent, and free of eager vLLM imports."""

import subprocess
import sys

import pytest

from vllm_latentkv.platform import ENV_VAR, PLATFORM_QUALNAME, cpu_platform_plugin

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("value", [None, "", "0", "false", "no"])
def test_platform_plugin_is_inert_without_env_var(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, value)
    assert cpu_platform_plugin() is None


@pytest.mark.parametrize("value", ["1", "true", "ON"])
def test_platform_plugin_returns_cpu_platform_subclass(monkeypatch, value):
    pytest.importorskip("vllm")
    from vllm.platforms.cpu import CpuPlatform
    from vllm.utils.import_utils import resolve_obj_by_qualname

    monkeypatch.setenv(ENV_VAR, value)
    assert cpu_platform_plugin() == PLATFORM_QUALNAME
    assert issubclass(resolve_obj_by_qualname(PLATFORM_QUALNAME), CpuPlatform)


def test_vllm_loads_both_entry_points():
    # vLLM only logs a plugin that fails to load (e.g. a stale editable install
    # that maps vllm_latentkv to a namespace package): check with its own loader.
    pytest.importorskip("vllm")
    import vllm_latentkv
    from vllm.plugins import (
        DEFAULT_PLUGINS_GROUP,
        PLATFORM_PLUGINS_GROUP,
        load_plugins_by_group,
    )

    assert load_plugins_by_group(DEFAULT_PLUGINS_GROUP).get("latentkv") is vllm_latentkv.register
    assert load_plugins_by_group(PLATFORM_PLUGINS_GROUP).get("latentkv_cpu") is cpu_platform_plugin


def test_register_is_idempotent():
    import vllm_latentkv

    vllm_latentkv.register()
    vllm_latentkv.register()
    assert vllm_latentkv.is_registered()


def test_importing_the_plugin_does_not_import_vllm():
    code = (
        "import sys, vllm_latentkv, vllm_latentkv.platform, vllm_latentkv.platform.ops, "
        "vllm_latentkv.platform.paged_attention\n"
        "vllm_latentkv.platform.cpu_platform_plugin()\n"
        "assert not [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')], "
        "sorted(m for m in sys.modules if m.startswith('vllm'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_mla_layers_get_vllms_reference_cpu_mla_backend():
    pytest.importorskip("vllm")
    import torch
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from vllm_latentkv.platform import cpu

    cfg = AttentionSelectorConfig(
        head_size=576, dtype=torch.float32, kv_cache_dtype="auto", block_size=16, use_mla=True
    )
    # Whatever backend was asked for (or none): vLLM's own would need compiled kernels.
    for selected in (None, AttentionBackendEnum.FLASHMLA):
        assert cpu.LatentKVCpuPlatform.get_attn_backend_cls(selected, cfg) == (
            AttentionBackendEnum.CPU_MLA.get_path()
        )


def test_standard_layers_get_the_torch_backend_and_bad_configs_fail_clearly():
    pytest.importorskip("vllm")
    import torch
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from vllm_latentkv.platform.cpu import TORCH_ATTN_PATH, LatentKVCpuPlatform

    cfg = AttentionSelectorConfig(
        head_size=40, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=None
    )
    assert LatentKVCpuPlatform.get_attn_backend_cls(None, cfg) == TORCH_ATTN_PATH
    with pytest.raises(ValueError, match="kv_cache_dtype not supported"):
        LatentKVCpuPlatform.get_attn_backend_cls(None, cfg._replace(kv_cache_dtype="fp8"))


def test_selected_backend_honoured_only_when_out_of_tree(monkeypatch):
    pytest.importorskip("vllm")
    import torch
    from vllm.v1.attention.backends import registry
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from vllm_latentkv.platform.cpu import TORCH_ATTN_PATH, LatentKVCpuPlatform

    cfg = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto",
                                  block_size=None)
    enum = registry.AttentionBackendEnum
    # vLLM's own backends need compiled kernels: ignored, as vLLM's CpuPlatform does.
    assert LatentKVCpuPlatform.get_attn_backend_cls(enum.FLASH_ATTN, cfg) == TORCH_ATTN_PATH
    monkeypatch.setitem(registry._ATTN_OVERRIDES, enum.CUSTOM, "somepkg.attn.MyBackend")
    assert LatentKVCpuPlatform.get_attn_backend_cls(enum.CUSTOM, cfg) == "somepkg.attn.MyBackend"
