"""llama.cpp's imatrix GGUF format: ``Imatrix``, reading and writing the files, and the per-tensor
importance llama-quantize derives from them. No runtime: the quantizer reads these, the collector
(imatrix.py) writes them.

The file is what llama.cpp's tools/imatrix writes: no architecture key, ``general.type =
"imatrix"``, ``imatrix.datasets`` (array of strings), ``imatrix.chunk_count`` and
``imatrix.chunk_size`` (uint32), and per weight, in name order, ``<weight>.in_sum2`` (F32,
ne = [n_per_row, n_mat]) and ``<weight>.counts`` (F32, ne = [1, n_mat]). `read_imatrix` reads those
files (ours or llama.cpp's), and `importance` turns them into the per-tensor weights llama-quantize
gives ggml's quantizers: in_sum2 / count, or 1 where a matrix got no data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from .convert import ConversionError, atomic_output


@dataclass
class Imatrix:
    entries: dict[str, tuple[np.ndarray, np.ndarray]]  # weight -> (in_sum2 [n_mat, ne0], counts [n_mat])
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0



class _ImatrixWriter(gguf.GGUFWriter):
    def add_architecture(self) -> None:  # imatrix files carry no general.architecture
        pass


def write_imatrix(path: str | os.PathLike[str], im: Imatrix, *, overwrite: bool = False) -> Path:
    """Writes `im` in llama.cpp's imatrix GGUF format, atomically."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise ConversionError(f"'{out}' already exists; use --force (overwrite=True) to replace it")
    if not im.entries:
        raise ConversionError("no importance data was collected")
    with atomic_output(out) as tmp:
        w = _ImatrixWriter(tmp, "")
        w.add_type(gguf.GGUFType.IMATRIX)
        w.add_array(gguf.Keys.IMatrix.DATASETS, list(im.datasets))
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(im.chunk_count))
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(im.chunk_size))
        for name in sorted(im.entries):
            sums, counts = im.entries[name]
            n_mat = counts.size
            w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(sums, dtype=np.float32).reshape(n_mat, -1))
            w.add_tensor(f"{name}.counts", np.asarray(counts, dtype=np.float32).reshape(n_mat, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Reads an imatrix GGUF (ours or llama-imatrix's)."""
    p = Path(path)
    try:
        reader = gguf.GGUFReader(p)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read '{p}' as an imatrix GGUF: {exc} (a legacy .dat imatrix must first be "
                              "converted with llama.cpp's convert_legacy_imatrix_to_gguf.py)") from exc
    kind = reader.fields.get(gguf.Keys.General.TYPE)
    if kind is not None and kind.contents() != gguf.GGUFType.IMATRIX:
        raise ConversionError(f"'{p}' is a GGUF of type '{kind.contents()}', not an imatrix")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            ne0 = int(t.shape[0])  # gguf-py gives ne order: [n_per_row, n_mat]
            sums[t.name[: -len(".in_sum2")]] = np.asarray(t.data, dtype=np.float32).reshape(-1, ne0)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    if not sums:
        raise ConversionError(f"'{p}' holds no '<weight>.in_sum2' tensors: not an imatrix")
    entries = {}
    for name in sorted(sums):
        if name not in counts or counts[name].size != sums[name].shape[0]:
            raise ConversionError(f"'{p}': '{name}.in_sum2' has no matching '{name}.counts'")
        entries[name] = (sums[name], counts[name])

    def field_value(key: str, default):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    datasets = field_value(gguf.Keys.IMatrix.DATASETS, [])
    return Imatrix(entries, list(datasets) if isinstance(datasets, list) else [str(datasets)],
                   int(field_value(gguf.Keys.IMatrix.CHUNK_COUNT, 0)), int(field_value(gguf.Keys.IMatrix.CHUNK_SIZE, 0)))


def importance(im: Imatrix) -> dict[str, np.ndarray]:
    """Per-weight importance [n_mat, ne0] float32, as llama-quantize computes it from a file."""
    out = {}
    for name, (sums, counts) in im.entries.items():
        c = np.asarray(counts, dtype=np.float64).reshape(-1, 1)
        values = np.where(c > 0, np.asarray(sums, dtype=np.float64) / np.where(c > 0, c, 1), 1.0)
        out[name] = values.astype(np.float32)
    return out
