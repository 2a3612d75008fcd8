"""Quantize a model to a mix (Q4_K_M, Q5_K_M, Q6_K, Q8_0, NVFP4, F16, BF16) with ggml's own
quantizers in the native core, tensor by tensor and chunk by chunk, atomically."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import gguf
import numpy as np

from .checkpoint import Checkpoint, CheckpointError, checkpoint_name, resolve_checkpoint_dir, tensors_equal
from .convert import (ARCH, ConversionError, PlannedTensor, ProgressFn, check_split_max_size, _write_metadata,
                      check_targets, output_paths, plan_tensors, split_part_paths, write_model)
from .hf_config import read_arch
from .imatrix_file import Imatrix, importance, read_imatrix
from .policy import MIXES, Choice, Q, choose

SOURCE_TYPES = (Q.F32, Q.F16, Q.BF16)
SKIPPED_KEYS = {"general.architecture", "general.file_type", "general.alignment"}
SKIPPED_KEY_PREFIXES = ("GGUF.", "quantize.imatrix.", "split.")  # reader bookkeeping; the source's imatrix and split


@dataclass
class QuantizeResult:
    path: Path | None  # None for a dry run; the first part of a split
    plan: list[Choice]
    n_bytes: int  # of the tensor data
    parts: list[Path] = field(default_factory=list)  # the files written: [path], or the parts of a split

    def type_table(self) -> dict[str, tuple[int, int]]:
        """type name -> (tensors, bytes)."""
        out: dict[str, tuple[int, int]] = {}
        for c in self.plan:
            n, b = out.get(c.qtype.name, (0, 0))
            out[c.qtype.name] = (n + 1, b + choice_bytes(c))
        return out


def choice_bytes(c: Choice) -> int:
    block, size = gguf.GGML_QUANT_SIZES[c.qtype]
    return int(np.prod(c.shape)) // block * size


def native_encoder(n_threads: int | None, weights: dict[str, tuple[np.ndarray, int]] | None = None):
    """Encodes float32 rows to a ggml type with the native core (ggml_quantize_chunk). `weights`:
    tensor name -> (importance [n_mat, row length], rows per matrix): rows of matrix m (an expert of
    a 3-D tensor) are quantized with importance[m]."""
    from pydgemma.errors import PydgemmaError
    from pydgemma.quantization import quantize_rows, row_size

    threads = n_threads or os.cpu_count() or 1
    weights = weights or {}

    def encode(rows: np.ndarray, qtype: Q, name: str = "", first_row: int = 0) -> memoryview:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        n_rows, n_per_row = rows.shape
        size = row_size(int(qtype), n_per_row)
        if size == 0:
            raise ConversionError(f"cannot quantize rows of {n_per_row} values to {qtype.name}")
        out = np.empty(n_rows * size, dtype=np.uint8)
        imp, per_mat = weights.get(name, (None, max(1, first_row + n_rows)))
        start = 0
        while start < n_rows:  # one call per matrix the block touches
            mat = (first_row + start) // per_mat
            end = min(n_rows, (mat + 1) * per_mat - first_row)
            try:
                quantize_rows(int(qtype), rows[start:end], out[start * size:end * size],
                              importance=None if imp is None else imp[mat], n_threads=threads)
            except PydgemmaError as exc:
                raise ConversionError(f"{name}: {exc}" if name else str(exc)) from None
            start = end
        return memoryview(out)

    return encode


def imatrix_weights(imatrix: Imatrix, plan: list[PlannedTensor]) -> dict[str, tuple[np.ndarray, int]]:
    """The importance of each planned tensor that has imatrix data, checked against its shape (as
    llama-quantize does: a size mismatch is an error, except for token_embd, quantized without)."""
    values = importance(imatrix)
    out: dict[str, tuple[np.ndarray, int]] = {}
    for t in plan:
        v = values.get(t.gguf_name)
        if v is None or t.qtype in (Q.F32, Q.F16, Q.BF16) or len(t.shape) < 2:
            continue
        n_mat = int(np.prod(t.shape[:-2])) if len(t.shape) > 2 else 1
        if v.size != n_mat * t.shape[-1]:
            if t.gguf_name == "token_embd.weight":
                continue
            raise ConversionError(f"the imatrix entry of '{t.gguf_name}' has {v.shape[0]} x {v.shape[-1]} values; the tensor "
                                  f"needs {n_mat} x {t.shape[-1]} (an imatrix of another model?)")
        out[t.gguf_name] = (np.ascontiguousarray(v.reshape(n_mat, t.shape[-1]), dtype=np.float32), t.shape[-2])
    return out


def _plan_from_gguf(path: Path) -> tuple[gguf.GGUFReader, list[PlannedTensor]]:
    # The native loader validates first: it is fuzzed, reads with bounded memory and names the
    # problem; gguf-py's reader may try to allocate whatever a corrupt header claims.
    from pydgemma import Model, ModelError

    try:
        Model(path, device="cpu").close()
    except ModelError as exc:
        raise ConversionError(str(exc)) from exc
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises whatever a malformed file makes it hit
        raise ConversionError(f"cannot read '{path}' as GGUF: {type(exc).__name__}: {exc}") from exc
    arch = reader.fields.get("general.architecture")
    if arch is None or arch.contents() != ARCH:
        raise ConversionError(f"'{path}' is not a {ARCH} GGUF")
    readers = [reader]
    count = reader.fields.get("split.count")
    if count is not None and int(count.contents()) > 1:  # a split model (the loader has checked its parts)
        for part in split_part_paths(Path(path), int(count.contents()))[1:]:
            try:
                readers.append(gguf.GGUFReader(part))
            except Exception as exc:
                raise ConversionError(f"cannot read '{part}' as GGUF: {type(exc).__name__}: {exc}") from exc
    plan = []
    for t in (t for r in readers for t in r.tensors):
        if t.tensor_type not in SOURCE_TYPES:
            raise ConversionError(f"'{path}': tensor '{t.name}' is {t.tensor_type.name}; quantize from an F32, F16 or "
                                  "BF16 file (or the Hugging Face checkpoint), never from an already quantized one")
        shape = tuple(int(d) for d in reversed(t.shape))
        plan.append(PlannedTensor(t.name, shape, t.tensor_type, gguf_source=t))
    return reader, plan


def _copy_metadata(reader: gguf.GGUFReader, w: gguf.GGUFWriter, file_type: int) -> None:
    for name, field in reader.fields.items():
        if name in SKIPPED_KEYS or name.startswith(SKIPPED_KEY_PREFIXES):
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    w.add_file_type(file_type)


def _gguf_from_hub(source: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """A hub reference with a tag (org/repo:BF16) names a GGUF to quantize: its local path. Without a
    tag it names a checkpoint (resolve_checkpoint_dir fetches it)."""
    from pydgemma.hub import HubError, is_hub_ref, parse_ref, resolve_model

    try:
        if is_hub_ref(source) and parse_ref(os.fspath(source)).quant:
            return resolve_model(source)
    except HubError as exc:
        raise ConversionError(str(exc)) from None
    return source


def quantize(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    *,
    mix: str,
    overrides: Sequence[tuple[str, Q]] = (),
    n_threads: int | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: ProgressFn | None = None,
    chunk_bytes: int = 64 * 1024 * 1024,
    imatrix: str | os.PathLike[str] | Imatrix | None = None,
    split_max_size: int | None = None,
) -> QuantizeResult:
    """Quantizes an HF checkpoint folder or an F32/F16/BF16 GGUF to `mix`. With `dry_run`, only plans.

    `imatrix` (an imatrix GGUF, ours or llama-imatrix's, or an `Imatrix`) gives ggml's quantizers
    per-tensor importance weights (in_sum2 / counts; each expert its own); tensors without data are
    quantized without, and the file records it in the quantize.imatrix.* keys as llama-quantize does.
    `split_max_size` (bytes of tensor data per file) writes llama.cpp's gguf-split parts, `output`'s
    name + -00001-of-0000N.gguf, ... (`parts` of the result). A split source is read from its first part."""
    mix = mix.upper()
    if mix not in MIXES:
        raise ConversionError(f"unknown type '{mix}' (choose from {', '.join(MIXES)})")
    file_type = MIXES[mix][0]
    check_split_max_size(split_max_size)
    src = Path(_gguf_from_hub(source))
    out_path = Path(output) if output is not None else None
    if not dry_run:
        if out_path is None:
            raise ConversionError("give the output file (-o)")
        if out_path.exists() and not overwrite and split_max_size is None:
            raise ConversionError(f"'{out_path}' already exists; use --force (overwrite=True) to replace it")
    try:
        if src.is_file():
            reader, plan = _plan_from_gguf(src)

            def write_metadata(w: gguf.GGUFWriter) -> None:
                _copy_metadata(reader, w, file_type)
        else:
            ckpt = Checkpoint(resolve_checkpoint_dir(source))
            arch = read_arch(ckpt)
            plan, tied_pairs = plan_tensors(ckpt, arch, Q.F32)
            for enc, dec in tied_pairs:
                if not tensors_equal(enc, dec)[0]:
                    raise ConversionError(f"encoder weight '{enc.name}' differs from its decoder twin '{dec.name}'")
            name = arch.name.rstrip("/").split("/")[-1] or checkpoint_name(source, ckpt.folder)

            def write_metadata(w: gguf.GGUFWriter) -> None:
                _write_metadata(w, arch, ckpt, file_type, name)
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from exc

    choices = choose(mix, [(t.gguf_name, tuple(reversed(t.shape))) for t in plan], overrides)
    for t, c in zip(plan, choices):
        t.qtype = c.qtype
    weights: dict[str, tuple[np.ndarray, int]] = {}
    if imatrix is not None:
        im = imatrix if isinstance(imatrix, Imatrix) else read_imatrix(imatrix)
        weights = imatrix_weights(im, plan)
        plain_metadata = write_metadata

        def metadata_with_imatrix(w: gguf.GGUFWriter) -> None:  # plus llama-quantize's quantize.imatrix.* keys
            plain_metadata(w)
            if not isinstance(imatrix, Imatrix):
                w.add_string("quantize.imatrix.file", str(imatrix))
            if im.datasets:
                w.add_string("quantize.imatrix.dataset", im.datasets[0])
            w.add_int32("quantize.imatrix.entries_count", len(im.entries))
            if im.chunk_count > 0:
                w.add_int32("quantize.imatrix.chunks_count", im.chunk_count)

        write_metadata = metadata_with_imatrix
    total = sum(choice_bytes(c) for c in choices)
    if dry_run:
        return QuantizeResult(None, choices, total)
    assert out_path is not None
    check_targets(output_paths(out_path, plan, split_max_size), overwrite)
    parts = write_model(out_path, plan, write_metadata, native_encoder(n_threads, weights), progress, chunk_bytes,
                        split_max_size)
    return QuantizeResult(parts[0], choices, total, parts)
