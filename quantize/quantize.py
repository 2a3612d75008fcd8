"""Quantize a model to a mix (Q4_K_M, Q5_K_M, Q6_K, Q8_0, NVFP4, F16, BF16) with ggml's own
quantizers in the native core, tensor by tensor and chunk by chunk, atomically."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import gguf
import numpy as np

from .checkpoint import Checkpoint, CheckpointError, resolve_checkpoint_dir, tensors_equal
from .convert import (ARCH, ConversionError, PlannedTensor, ProgressFn, _validate, _write_metadata, atomic_output,
                      plan_tensors, write_gguf)
from .hf_config import read_arch
from .policy import MIXES, Choice, Q, choose

SOURCE_TYPES = (Q.F32, Q.F16, Q.BF16)
SKIPPED_KEYS = {"general.architecture", "general.file_type", "general.alignment"}


@dataclass
class QuantizeResult:
    path: Path | None  # None for a dry run
    plan: list[Choice]
    n_bytes: int  # of the tensor data

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


def native_encoder(n_threads: int | None):
    """Encodes float32 rows to a ggml type with the native core (ggml_quantize_chunk)."""
    from pydgemma._native import native

    nat = native()
    threads = n_threads or os.cpu_count() or 1

    def encode(rows: np.ndarray, qtype: Q) -> memoryview:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        n_rows, n_per_row = rows.shape
        row_size = nat.lib.dg_type_row_size(int(qtype), n_per_row)
        if row_size == 0:
            raise ConversionError(f"cannot quantize rows of {n_per_row} values to {qtype.name}")
        out = np.empty(n_rows * row_size, dtype=np.uint8)
        written = nat.ffi.new("size_t *")
        status = nat.lib.dg_quantize(int(qtype), nat.ffi.from_buffer("float[]", rows), nat.ffi.from_buffer(out), n_rows,
                                     n_per_row, nat.ffi.NULL, threads, written)
        if status != 0:
            raise ConversionError(nat.last_error())
        return memoryview(out)

    return encode


def _plan_from_gguf(path: Path) -> tuple[gguf.GGUFReader, list[PlannedTensor]]:
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read '{path}' as GGUF: {exc}") from exc
    arch = reader.fields.get("general.architecture")
    if arch is None or arch.contents() != ARCH:
        raise ConversionError(f"'{path}' is not a {ARCH} GGUF")
    plan = []
    for t in reader.tensors:
        if t.tensor_type not in SOURCE_TYPES:
            raise ConversionError(f"'{path}': tensor '{t.name}' is {t.tensor_type.name}; quantize from an F32, F16 or "
                                  "BF16 file (or the Hugging Face checkpoint), never from an already quantized one")
        shape = tuple(int(d) for d in reversed(t.shape))
        plan.append(PlannedTensor(t.name, shape, t.tensor_type, gguf_source=t))
    return reader, plan


def _copy_metadata(reader: gguf.GGUFReader, w: gguf.GGUFWriter, file_type: int) -> None:
    for name, field in reader.fields.items():
        if name in SKIPPED_KEYS or name.startswith("GGUF."):
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    w.add_file_type(file_type)


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
) -> QuantizeResult:
    """Quantizes an HF checkpoint folder or an F32/F16/BF16 GGUF to `mix`. With `dry_run`, only plans."""
    mix = mix.upper()
    if mix not in MIXES:
        raise ConversionError(f"unknown type '{mix}' (choose from {', '.join(MIXES)})")
    file_type = MIXES[mix][0]
    src = Path(source)
    out_path = Path(output) if output is not None else None
    if not dry_run:
        if out_path is None:
            raise ConversionError("give the output file (-o)")
        if out_path.exists() and not overwrite:
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
            name = arch.name.rstrip("/").split("/")[-1] or ckpt.folder.name

            def write_metadata(w: gguf.GGUFWriter) -> None:
                _write_metadata(w, arch, ckpt, file_type, name)
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from exc

    choices = choose(mix, [(t.gguf_name, tuple(reversed(t.shape))) for t in plan], overrides)
    for t, c in zip(plan, choices):
        t.qtype = c.qtype
    total = sum(choice_bytes(c) for c in choices)
    if dry_run:
        return QuantizeResult(None, choices, total)
    assert out_path is not None
    with atomic_output(out_path) as tmp:
        write_gguf(tmp, plan, write_metadata, native_encoder(n_threads), progress, chunk_bytes)
        _validate(tmp, plan)
    return QuantizeResult(out_path, choices, total)
