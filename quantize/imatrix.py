"""Importance matrices ("imatrix") from diffusion activations, in llama.cpp's imatrix GGUF format.

`collect` runs real generations over a calibration text with the native loop (prefill of the
prompt, every denoising step of every canvas, the commits between canvases) while the native
collector (`dg_context_imatrix_*`) sums, for every weight matrix, the squared activations entering
each input channel and counts the rows; MoE experts get per-expert sums and counts over the
(token, slot) pairs routed to them.

The calibration text is tokenized as a whole (no BOS) and cut into chunks of `chunk_size` tokens;
the first token of every chunk is replaced by BOS, as llama-imatrix does, and each chunk is the
prompt of one generation of `max_new_tokens` tokens (seed `seed + chunk index`). A trailing
partial chunk is dropped.

The file (`write_imatrix`) is what llama.cpp's tools/imatrix writes: no architecture key,
``general.type = "imatrix"``, ``imatrix.datasets`` (array of strings), ``imatrix.chunk_count`` and
``imatrix.chunk_size`` (uint32), and per weight, in name order, ``<weight>.in_sum2`` (F32,
ne = [n_per_row, n_mat]) and ``<weight>.counts`` (F32, ne = [1, n_mat]). `read_imatrix` reads
those files (ours or llama.cpp's), and `importance` turns them into the per-tensor weights
llama-quantize gives ggml's quantizers: in_sum2 / count, or 1 where a matrix got no data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from .convert import ConversionError, atomic_output

# The output head's entry: llama-imatrix collects it only with --process-output, and never for a
# head tied to the token embedding; we collect it under the tied name when asked to.
HEAD_NAMES = ("output.weight", "token_embd.weight")


@dataclass
class Imatrix:
    entries: dict[str, tuple[np.ndarray, np.ndarray]]  # weight -> (in_sum2 [n_mat, ne0], counts [n_mat])
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0


ChunkProgress = Callable[[int, int], None]  # (chunks done, chunks in all)


def calibration_chunks(model, text: str, chunk_size: int, n_chunks: int | None = None) -> list[list[int]]:
    """The prompts of `collect`: chunks of `chunk_size` tokens of `text`, each starting with BOS."""
    if chunk_size < 2:
        raise ConversionError(f"--chunk-size must be at least 2, got {chunk_size}")
    tokens = model.tokenize(text, add_special=False, parse_special=False)
    bos = model.tokenize("", add_special=True, parse_special=False)
    available = len(tokens) // chunk_size
    if available == 0:
        raise ConversionError(f"the calibration text has {len(tokens)} tokens, fewer than one chunk of {chunk_size} "
                              "(give more text or a smaller --chunk-size)")
    count = available if n_chunks is None or n_chunks <= 0 else min(n_chunks, available)
    chunks = []
    for i in range(count):
        chunk = tokens[i * chunk_size:(i + 1) * chunk_size]
        if bos:
            chunk[0] = bos[0]
        chunks.append(chunk)
    return chunks


def collect(
    model_path: str | os.PathLike[str],
    text: str,
    *,
    chunks: int | None = None,
    chunk_size: int = 512,
    max_new_tokens: int = 256,
    seed: int = 0,
    max_steps: int | None = None,
    process_output: bool = False,
    dataset: str | None = None,
    device: str = "auto",
    n_threads: int | None = None,
    progress: ChunkProgress | None = None,
) -> Imatrix:
    """Collects an importance matrix over generations prompted by the chunks of `text`."""
    from pydgemma import Model
    from pydgemma.generate import generate_ids

    if max_new_tokens < 1:
        raise ConversionError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    with Model(model_path, device=device, n_threads=n_threads) as model:
        prompts = calibration_chunks(model, text, chunk_size, chunks)
        canvas = model.hparams["canvas_length"]
        n_ctx = chunk_size + -(-max_new_tokens // canvas) * canvas
        if n_ctx > model.hparams["n_ctx_train"]:
            raise ConversionError(f"a chunk of {chunk_size} tokens and {max_new_tokens} new tokens need {n_ctx} positions; "
                                  f"the model has {model.hparams['n_ctx_train']}")
        # F32 KV entries: the activations collected are the model's, not rounded through an F16 cache
        ctx = model.context(n_ctx=n_ctx, n_batch=chunk_size, n_threads=n_threads, kv_type="f32")
        try:
            ctx.imatrix_start()
            if progress:
                progress(0, len(prompts))
            for i, prompt in enumerate(prompts):
                ctx.reset()
                generate_ids(ctx, prompt, max_new_tokens=max_new_tokens,
                             sampler={"seed": seed + i, "max_steps": max_steps})
                if progress:
                    progress(i + 1, len(prompts))
            ctx.imatrix_stop()
            entries = ctx.imatrix()
        finally:
            ctx.close()
    if not process_output:
        entries = {k: v for k, v in entries.items() if k not in HEAD_NAMES}
    return Imatrix(entries, [dataset] if dataset else [], len(prompts), chunk_size)


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
