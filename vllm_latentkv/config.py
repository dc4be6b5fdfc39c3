"""The latent-KV config in vLLM processes: registration and serve-time cache options.

The transformers config class is :class:`latentkv.modeling.LatentKVConfig` (model type
``latentkv``); :func:`register_config` makes ``AutoConfig`` know it in every vLLM process.

Serve-time overrides of the ``latent_kv`` section (the checkpoint is never edited):

* ``--hf-overrides '{"latent_kv_cache_dtype": "int4"}'`` (what the Helm chart uses) and
  ``--hf-overrides '{"latent_kv_int4_group_size": 64}'``: flat keys, highest priority.
* ``--hf-overrides '{"latent_kv": {"cache_dtype": "int4", "int4_group_size": 32}}'``: vLLM
  *replaces* a dict-valued attribute with the override dict, so a ``latent_kv`` section
  without ``format_version`` is taken as a partial override and merged into the section
  read from the checkpoint's ``config.json``.

* ``--hf-overrides '{"latent_kv_token_filter": {"skip_fraction": 0.25}}'``: Token Filtering
  (``latentkv.token_filter``) on, with these options; ``false`` turns a checkpoint's default off.

Only ``cache_dtype``, ``int4_group_size`` and ``token_filter`` may be overridden this way: the
other fields describe the weights and must come from the checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from latentkv import format as fmt

OVERRIDABLE = ("cache_dtype", "int4_group_size", "token_filter")
FLAT_OVERRIDES = {"latent_kv_cache_dtype": "cache_dtype", "latent_kv_int4_group_size": "int4_group_size",
                  "latent_kv_token_filter": "token_filter"}


def register_config() -> None:
    """``AutoConfig.register("latentkv", LatentKVConfig)`` (idempotent; imported lazily)."""
    from latentkv.modeling import register_with_transformers

    register_with_transformers()


def _checkpoint_section(model: str | os.PathLike | None, revision: str | None = None) -> dict[str, Any]:
    """The ``latent_kv`` section of the checkpoint's own config.json (local dir or HF cache)."""
    if model is None:
        raise fmt.FormatError("a partial latent_kv override needs the checkpoint's config.json, but no model path is known")
    path = Path(model) / "config.json"
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(model), "config.json", revision=revision))
    section = json.loads(path.read_text()).get("latent_kv")
    if not isinstance(section, dict):
        raise fmt.FormatError(f"{path} has no latent_kv section: not a latentkv checkpoint")
    return section


def resolve_config_dict(hf_config: Any, model: str | os.PathLike | None = None, revision: str | None = None) -> dict[str, Any]:
    """config dict with the serve-time overrides applied to its ``latent_kv`` section."""
    config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    section = config.get("latent_kv")
    if isinstance(section, dict) and "format_version" not in section:
        bad = sorted(set(section) - set(OVERRIDABLE))
        if bad:
            raise fmt.FormatError(
                f"--hf-overrides latent_kv may only set {', '.join(OVERRIDABLE)}; got {', '.join(bad)}"
            )
        section = {**_checkpoint_section(model, revision), **section}
    if isinstance(section, dict):
        section = dict(section)
        for flat, key in FLAT_OVERRIDES.items():
            if config.get(flat) is not None:
                section[key] = config[flat]
        if section.get("token_filter") is False:  # turns a checkpoint's default off
            section["token_filter"] = None
    config["latent_kv"] = section
    return config


def resolve_spec(hf_config: Any, model: str | os.PathLike | None = None, revision: str | None = None) -> tuple[fmt.LatentKVSpec, fmt.ModelDims]:
    """Parse and cross-check the (overridden) latent_kv section; raises FormatError naming the problem."""
    return fmt.load_spec(resolve_config_dict(hf_config, model, revision))
