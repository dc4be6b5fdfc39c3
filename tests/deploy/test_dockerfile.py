"""deploy/Dockerfile: hadolint clean, the facts the chart relies on, and a build context
(deploy/Dockerfile.dockerignore) that is enough for the README's `pip install -e ".[serve]"`.
There is no Docker engine in CI, so the image itself is not built here."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / "deploy" / "Dockerfile.dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and heredoc bodies dropped."""
    out, lines, i = [], DOCKERFILE.read_text().splitlines(), 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        m = re.search(r"<<-?'?(\w+)'?", line)
        if m:  # skip the heredoc body
            while i < len(lines) and lines[i].strip() != m.group(1):
                i += 1
            i += 1
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_hadolint(hadolint_bin):
    proc = subprocess.run(
        [hadolint_bin, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_image_is_pinned_vllm_release():
    ins = instructions()
    args = dict((a.split("=", 1)[0], a.split("=", 1)[1]) for k, a in ins if k == "ARG" and "=" in a)
    froms = [a for k, a in ins if k == "FROM"]
    assert froms == ["${VLLM_IMAGE}"]
    assert args["VLLM_IMAGE"] == "vllm/vllm-openai:v0.32.0"


def test_installs_like_the_readme_and_runs_as_non_root():
    ins = instructions()
    run = " ".join(a for k, a in ins if k == "RUN")
    torch_at = run.index("pip install torch==2.13.0")
    pkg_at = run.index('pip install -e ".[serve]"')
    assert torch_at < pkg_at, "torch must be installed first (README order)"
    users = [a for k, a in ins if k == "USER"]
    assert users[-1] == "${APP_UID}:${APP_GID}"
    args = dict((a.split("=", 1)[0], a.split("=", 1)[1]) for k, a in ins if k == "ARG" and "=" in a)
    assert int(args["APP_UID"]) > 0 and int(args["APP_GID"]) > 0  # numeric: runAsNonRoot can verify


def test_healthcheck_and_entrypoint():
    ins = dict(instructions())
    assert "/health" in ins["HEALTHCHECK"]
    assert ins["ENTRYPOINT"] == '["vllm", "serve"]'
    assert ins["CMD"].startswith('["/models/converted"')
    assert ins["EXPOSE"] == "8000"


def test_readme_install_commands_match():
    readme = REPO / "README.md"
    if not readme.exists():
        pytest.skip("README.md not written yet")
    text = readme.read_text()
    for cmd in ("pip install torch==2.13.0", 'pip install -e ".[serve]"'):
        if cmd not in text:
            pytest.fail(f"README no longer says {cmd!r}: update deploy/Dockerfile to match")


def _context_files() -> list[Path]:
    """Files Docker would send for `docker build -f deploy/Dockerfile .` (last match wins)."""
    patterns = [
        ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]

    def ignored(rel: str) -> bool:
        verdict = False
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        for pat in patterns:
            neg = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            if pat.startswith("**/"):
                hit = any(fnmatch.fnmatch(p, pat[3:]) for p in parts)
            else:
                hit = any(fnmatch.fnmatch(p, pat) for p in prefixes)
            if hit:
                verdict = not neg
        return verdict

    return [
        p for p in REPO.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(REPO).parts and not ignored(p.relative_to(REPO).as_posix())
    ]


def test_build_context_is_small_and_sufficient(tmp_path):
    files = _context_files()
    rel = {p.relative_to(REPO).as_posix() for p in files}
    assert "pyproject.toml" in rel
    assert not any(r.startswith(("tests/", "deploy/", "benchmarks/", ".git/")) for r in rel)
    assert not any(r.endswith((".safetensors", ".pyc")) for r in rel)
    ctx = tmp_path / "ctx"
    for p in files:
        dst = ctx / p.relative_to(REPO)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst)
    # Build the wheel from exactly that context: the editable install in the image needs the
    # same metadata (packages + the vllm.general_plugins entry point).
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(ctx)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("latentkv-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        eps = next(n for n in names if n.endswith("entry_points.txt"))
        entry_points = zf.read(eps).decode()
    assert "vllm_latentkv/__init__.py" in names
    assert "[vllm.general_plugins]" in entry_points and "vllm_latentkv:register" in entry_points
