"""A Hugging Face safetensors checkpoint, read lazily: tensor by tensor, in row chunks.

Tensors are read with plain file reads into small buffers (never a whole-file mapping), so the
memory a conversion needs is bounded by the chunk size, whatever the checkpoint size.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

# safetensors dtype -> (numpy dtype used to read the raw bytes, element size)
_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),  # read as raw 16-bit words, widened to f32 by to_float32()
    "F64": (np.dtype("<f8"), 8),
}

MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(Exception):
    """The checkpoint folder or one of its files is missing, unreadable or malformed."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype name: F32, F16, BF16, ...
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset of the data in `path`
    n_bytes: int

    @property
    def rows(self) -> int:
        """Number of rows when the tensor is seen as [rows, last dimension]."""
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    @property
    def row_length(self) -> int:
        return self.shape[-1] if self.shape else 1


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Widens raw values read for `dtype` to float32 (exactly: every bf16/f16 value is an f32 value)."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"'{path}' is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER_BYTES:
                raise CheckpointError(f"'{path}' is not a safetensors file (header size {n})")
            text = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read '{path}': {exc.strerror or exc}") from exc
    if len(text) != n:
        raise CheckpointError(f"'{path}' is truncated inside its header")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"'{path}' has a malformed safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"'{path}' has a malformed safetensors header")
    return header, 8 + n


def _entries_of(path: Path) -> list[TensorEntry]:
    header, data_start = _read_header(path)
    size = path.stat().st_size
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            if not isinstance(dtype, str) or isinstance(info["shape"], (str, bytes)):
                raise TypeError(dtype)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"'{path}': malformed entry for tensor '{name}'") from exc
        if dtype not in _DTYPES:
            raise CheckpointError(f"'{path}': tensor '{name}' has unsupported dtype {dtype}")
        if any(d < 0 for d in shape) or begin < 0 or end < begin:
            raise CheckpointError(f"'{path}': tensor '{name}' has an invalid shape or offsets")
        n_bytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][1]
        if end - begin != n_bytes:
            raise CheckpointError(f"'{path}': tensor '{name}' has {end - begin} bytes, its shape needs {n_bytes}")
        if data_start + end > size:
            raise CheckpointError(
                f"'{path}' is truncated: tensor '{name}' ends at byte {data_start + end} but the file has {size}"
            )
        entries.append(TensorEntry(name, dtype, shape, path, data_start + begin, n_bytes))
    return entries


class Checkpoint:
    """The config files and the tensor index of a checkpoint folder (single or sharded safetensors)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder '{self.folder}' does not exist or is not a folder")
        files = sorted(self.folder.glob("*.safetensors"))
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"cannot read '{index}': {exc}") from exc
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.folder / n).is_file()]
            if missing:
                raise CheckpointError(f"'{index}' lists shard '{missing[0]}', which is missing")
            files = [self.folder / n for n in names]
        if not files:
            raise CheckpointError(f"no .safetensors files in '{self.folder}'")
        self.tensors: dict[str, TensorEntry] = {}
        for path in files:
            for entry in _entries_of(path):
                if entry.name in self.tensors:
                    raise CheckpointError(f"tensor '{entry.name}' appears in two shards")
                self.tensors[entry.name] = entry

    def json(self, name: str, *, required: bool = True) -> dict | None:
        path = self.folder / name
        if not path.is_file():
            if required:
                raise CheckpointError(f"'{self.folder}' has no {name}")
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read '{path}': {exc}") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"'{path}' is not a JSON object")
        return data

    def text(self, name: str) -> str | None:
        path = self.folder / name
        return path.read_text(encoding="utf-8") if path.is_file() else None

    @property
    def total_bytes(self) -> int:
        return sum(e.n_bytes for e in self.tensors.values())


def iter_rows(entry: TensorEntry, chunk_bytes: int = 64 * 1024 * 1024) -> Iterator[np.ndarray]:
    """Yields the tensor as float32 blocks of whole rows, [k, row_length], at most ~chunk_bytes of
    float32 each, in row-major order."""
    np_dtype, item = _DTYPES[entry.dtype]
    row_len = max(entry.row_length, 1)
    rows_per_chunk = max(1, chunk_bytes // (4 * row_len))
    with open(entry.path, "rb") as f:
        f.seek(entry.offset)
        remaining = entry.rows
        while remaining > 0:
            k = min(rows_per_chunk, remaining)
            count = k * row_len
            raw = np.fromfile(f, dtype=np_dtype, count=count)
            if raw.size != count:
                raise CheckpointError(f"'{entry.path}' ended while reading tensor '{entry.name}'")
            yield to_float32(raw, entry.dtype).reshape(k, row_len)
            remaining -= k


def read_tensor(entry: TensorEntry) -> np.ndarray:
    """The whole tensor as float32 in its own shape (only for small tensors)."""
    out = np.concatenate(list(iter_rows(entry)), axis=0) if entry.rows else np.zeros((0, entry.row_length), np.float32)
    return out.reshape(entry.shape)


def tensors_equal(a: TensorEntry, b: TensorEntry) -> tuple[bool, float]:
    """Whether two tensors hold the same values (streamed); returns (equal, max abs difference)."""
    if a.shape != b.shape:
        return False, float("inf")
    worst = 0.0
    for xa, xb in zip(iter_rows(a), iter_rows(b)):
        if not np.array_equal(xa, xb):
            worst = max(worst, float(np.max(np.abs(xa - xb))))
    return worst == 0.0, worst


def checkpoint_name(source: str | os.PathLike[str], folder: Path) -> str:
    """The model's name when its config has none: a repo's name, else the folder's."""
    from pydgemma.hub import is_hub_ref, parse_ref

    ref = parse_ref(os.fspath(source)) if is_hub_ref(source) else None
    return ref.repo.split("/")[-1] if ref is not None else folder.name


def resolve_checkpoint_dir(spec: str | os.PathLike[str], *, offline: bool | None = None) -> Path:
    """A local folder, or a Hugging Face repo id ("org/name[@revision]"): its safetensors, config
    and tokenizer files downloaded into the Hugging Face cache (resumable), or found there when
    offline (`offline`, default $HF_HUB_OFFLINE). See pydgemma.hub."""
    from pydgemma.hub import HubError, fetch_checkpoint, parse_ref

    path = Path(spec).expanduser()
    if path.exists():
        return path
    try:
        ref = parse_ref(str(spec))
        if ref is None:
            raise CheckpointError(f"checkpoint folder '{spec}' does not exist")
        return fetch_checkpoint(ref, offline=offline)
    except HubError as exc:
        raise CheckpointError(str(exc)) from None
