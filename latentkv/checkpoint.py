"""Reading and writing checkpoint directories: safetensors (single or sharded), atomically.

Readers look at safetensors headers and memory-map tensors one at a time, so a 7B-class model is
never in memory at once. Writers put everything into a temporary directory beside the target
and rename it at the end: a failed conversion leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from latentkv import format as fmt

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


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out_dir`` only if the block succeeds."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists; pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            backup = out_dir.with_name(out_dir.name + ".old.tmp")
            out_dir.rename(backup)
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
