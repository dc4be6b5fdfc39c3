"""Files a conversion leaves: readable by the user who serves them, nothing left by a killed run."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from converters.cli import main
from tests.helpers import PLAIN_SVD

FLAGS = ["--rope-mode", "full", "--rank", "16", "--method", PLAIN_SVD["method"], "--refine-steps", "0"]


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    from converters.importers.llama2c import import_llama2c, packaged_stories260k

    return import_llama2c(*packaged_stories260k(), tmp_path_factory.mktemp("s") / "stories260K")


def _modes(root):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_output_modes_follow_the_umask(stories, tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        assert main(["convert", str(stories), str(tmp_path / "out"), *FLAGS]) == 0
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "out")
    assert modes.pop("out") == dir_mode
    assert "model.safetensors" in modes and "config.json" in modes
    assert set(modes.values()) == {file_mode}, modes


def test_imported_model_is_readable(stories):
    modes = _modes(stories)
    assert modes.pop(stories.name) == 0o755 and set(modes.values()) == {0o644}, modes


_HOLD_TEMPORARY = """
import sys, time
from latentkv.checkpoint import atomic_output_dir
with atomic_output_dir(sys.argv[1]) as tmp:
    (tmp / "model.safetensors").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_a_killed_conversions_temporary_is_removed_by_the_next(stories, tmp_path, caplog):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_TEMPORARY, str(out)], stdout=subprocess.PIPE, text=True)
    tmp = proc.stdout.readline().strip()
    assert tmp and os.path.isdir(tmp)
    # while its writer runs, a second conversion to the same OUT leaves the temporary alone
    assert main(["convert", str(stories), str(out), *FLAGS]) == 0
    assert os.path.isdir(tmp)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(tmp)  # SIGKILL runs no cleanup
    with caplog.at_level("WARNING", logger="latentkv.checkpoint"):
        assert main(["convert", str(stories), str(out), *FLAGS, "--overwrite"]) == 0
    assert not os.path.exists(tmp)
    assert "interrupted conversion" in caplog.text and tmp in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_temporary_from_another_host_is_reported_not_removed(stories, tmp_path, caplog):
    stale = tmp_path / ".out.abc123.tmp"
    stale.mkdir()
    (stale / ".latentkv-owner").write_text("some-other-host 12345\n")
    with caplog.at_level("WARNING", logger="latentkv.checkpoint"):
        assert main(["convert", str(stories), str(tmp_path / "out"), *FLAGS]) == 0
    assert stale.is_dir()
    assert str(stale) in caplog.text and "another host" in caplog.text
