"""Reading and writing checkpoint directories: safetensors (single or sharded), atomically.

Readers look at safetensors headers and memory-map tensors one at a time, so a 7B-class model is
never in memory at once. Writers put everything into a temporary directory beside the target
and rename it at the end: a failed conversion leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from latentkv import format as fmt

log = logging.getLogger("latentkv.checkpoint")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# A shard is assembled in memory before it is written, so the shard size bounds peak memory too.
DEFAULT_SHARD_BYTES = 1024**3
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)
_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read."""


def weight_files(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (reads the index of a sharded checkpoint)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = {name: model_dir / shard for name, shard in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise CheckpointError(f"{index} names shard {path.name}, which does not exist")
        return files
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return {name: single for name in read_header(single)}
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise CheckpointError(
            f"{model_dir} has only PyTorch pickle weights; latentkv reads safetensors only "
            "(pickles can run code). Save the model with `save_pretrained(..., safe_serialization=True)`."
        )
    raise CheckpointError(f"no {SINGLE_NAME} or {INDEX_NAME} in {model_dir}")


def read_header(path: Path) -> dict[str, dict]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets), checked."""
    try:
        with open(path, "rb") as f:
            size_bytes = f.read(8)
            if len(size_bytes) != 8:
                raise CheckpointError(f"{path} is truncated: no safetensors header")
            (n,) = struct.unpack("<Q", size_bytes)
            file_size = path.stat().st_size
            if n > file_size - 8:
                raise CheckpointError(f"{path} is truncated or corrupt: header of {n} bytes in a {file_size}-byte file")
            header = json.loads(f.read(n))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not JSON") from None
    header.pop("__metadata__", None)
    data_size = file_size - 8 - n
    for name, info in header.items():
        end = info["data_offsets"][1]
        if end > data_size:
            raise CheckpointError(f"{path} is truncated: tensor {name} ends at byte {end}, the data has {data_size}")
    return header


def tensor_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in set(weight_files(model_dir).values()):
        for name, info in read_header(path).items():
            shapes[name] = tuple(info["shape"])
    return shapes


def validate_checkpoint(model_dir: str | Path) -> tuple[fmt.LatentKVSpec, fmt.ModelDims]:
    """Check config and tensor names/shapes of a latent checkpoint; raise naming the problem."""
    config = fmt.read_config(model_dir)
    spec, dims = fmt.load_spec(config)
    fmt.check_tensor_shapes(tensor_shapes(model_dir), spec, dims)
    return spec, dims


class TensorReader:
    """Memory-mapped access to the tensors of a checkpoint, one at a time.

    Each read opens the file and closes it again: a handle kept open keeps every page it ever
    touched mapped into the process, so reading a whole model would end up resident.
    """

    def __init__(self, model_dir: str | Path):
        self.files = weight_files(model_dir)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        if name not in self.files:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint")
        with safe_open(str(self.files[name]), framework="pt") as f:
            t = f.get_tensor(name)
        return t if dtype is None else t.to(dtype)

    def dtype_name(self, name: str) -> str:
        """The stored dtype of a tensor as safetensors names it (F32, F16, BF16, ...), from the header."""
        return read_header(self.files[name])[name]["dtype"]


class ShardedWriter:
    """Writes tensors into shards of at most ``shard_bytes`` and an index, like Hugging Face."""

    def __init__(self, out_dir: Path, shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, str]] = []  # per shard: tensor names
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"tensor {name} has NaN or Inf values; refusing to write it")
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        k = len(self.shards)
        save_file(self.pending, str(self.out_dir / f"shard-{k:05d}.safetensors"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            (self.out_dir / "shard-00000.safetensors").rename(self.out_dir / SINGLE_NAME)
            return
        n = len(self.shards)
        weight_map = {}
        for k, names in enumerate(self.shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.out_dir / f"shard-{k:05d}.safetensors").rename(self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))


# A temporary output directory holds this file while its conversion runs: the owner's host and
# process id tell a later conversion whether the directory was left behind by a killed one.
_OWNER_FILE = ".latentkv-owner"


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_modes(root: Path) -> None:
    """Directories 0777 and files 0666 less the umask, as ``save_pretrained`` would leave them.

    mkdtemp makes its directory 0700 (and some writers 0600 files); renamed into place unchanged,
    a checkpoint written by root would be unreadable by the user who serves it (the Helm chart's
    vLLM runs as UID 10001).
    """
    mask = _current_umask()
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _owner_alive(tmp: Path) -> bool | None:
    """Whether the conversion that owns ``tmp`` still runs: None when it cannot be told (another host)."""
    try:
        host, pid = (tmp / _OWNER_FILE).read_text().split()
    except (OSError, ValueError):
        return False  # no owner file: a killed writer of an older version, or killed before writing it
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete temporary directories that killed conversions to ``out_dir`` left beside it."""
    for tmp in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
        if not tmp.is_dir():
            continue
        alive = _owner_alive(tmp)
        if alive is False:
            log.warning("removing %s, left by an interrupted conversion to %s", tmp, out_dir)
            shutil.rmtree(tmp, ignore_errors=True)
        elif alive is None:
            log.warning("%s was left by a conversion on another host; delete it by hand if that one has stopped", tmp)


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out_dir`` only if the block succeeds.

    The result is readable like any ``save_pretrained`` output (modes follow the umask), and the
    temporaries of earlier conversions to the same ``out_dir`` that were killed are removed first.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists; pass --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        (tmp / _OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        yield tmp
        (tmp / _OWNER_FILE).unlink()
        _publish_modes(tmp)
        if out_dir.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
            out_dir.rename(backup / "previous")
            tmp.rename(out_dir)
            shutil.rmtree(backup)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
