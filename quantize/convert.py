"""Hugging Face DiffusionGemma checkpoint -> GGUF, streaming and atomic.

Memory stays bounded whatever the model size: metadata and tensor infos are written first, then each
tensor is read, converted and written in row chunks (checkpoint.iter_rows). The output goes to a
temporary file beside the target, is validated by the native loader, and only then renamed into
place; on any failure (or Ctrl-C) the target is untouched and the temporary file removed.

With a `split_max_size` the model is written as llama.cpp's gguf-split parts instead
(OUTPUT-00001-of-00003.gguf, ...: gguf-py's own writer decides which tensors go in which part and
writes the split.* keys), all of them in a temporary folder beside the target, validated together
and only then moved into place.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np

from .checkpoint import Checkpoint, CheckpointError, checkpoint_name, TensorEntry, iter_rows, resolve_checkpoint_dir, tensors_equal
from .hf_config import ArchParams, read_arch
from .tensor_map import (DECODER, ENCODER_SCALAR, ENCODER_TEXT, FILE_TYPES, OUT_TYPES, SKIPPED_PREFIXES, Q,
                         expected_tensors, n_bytes, output_type)
from .vocab import read_vocab

ARCH = "diffusion-gemma"


class ConversionError(Exception):
    """The checkpoint cannot be converted; the message says why in one line."""


@dataclass
class PlannedTensor:
    gguf_name: str
    shape: tuple[int, ...]  # torch order
    qtype: Q
    source: TensorEntry | None = None  # a checkpoint tensor, or
    data: np.ndarray | None = None  # generated data, or
    gguf_source: object | None = None  # a tensor of a GGUF file (gguf.ReaderTensor)

    @property
    def n_bytes(self) -> int:
        return n_bytes(self.shape, self.qtype)

    def rows(self, chunk_bytes: int) -> Iterator[np.ndarray]:
        """The tensor as float32 blocks of whole rows [k, row_length], in order."""
        row_len = self.shape[-1]
        if self.data is not None:
            yield self.data.reshape(-1, row_len).astype(np.float32, copy=False)
        elif self.source is not None:
            yield from iter_rows(self.source, chunk_bytes)
        else:
            t = self.gguf_source
            raw = np.asarray(t.data)
            n_rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
            raw = raw.reshape(n_rows, -1)
            step = max(1, chunk_bytes // (4 * row_len))
            for start in range(0, n_rows, step):
                block = raw[start:start + step]
                yield gguf.quants.dequantize(block, t.tensor_type).reshape(-1, row_len).astype(np.float32, copy=False)


@dataclass
class ConversionResult:
    path: Path
    n_tensors: int
    n_bytes: int
    type_counts: dict[str, int]
    arch: ArchParams
    parts: list[Path] = field(default_factory=list)  # the files written: [path], or the parts of a split


ProgressFn = Callable[[str, int, int], None]  # (phase, done_bytes, total_bytes)


def _shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def rope_freqs(a: ArchParams) -> np.ndarray:
    """Per-pair frequency divisors of full-attention layers: 1 for the rotated pairs, 1e30 (no
    rotation) for the rest -- HF's 'proportional' rope with partial_rotary_factor."""
    out = np.full(a.head_dim_full // 2, 1e30, dtype=np.float32)
    out[: a.rotated_pairs] = 1.0
    return out


def plan_tensors(ckpt: Checkpoint, a: ArchParams, requested: Q) -> tuple[list[PlannedTensor], list[tuple[TensorEntry, TensorEntry]]]:
    """The tensors to write, and the (encoder, decoder) pairs whose equality must be checked."""
    expected = expected_tensors(a)
    wanted = {m.hf_name for m in expected}
    tied_pairs: list[tuple[TensorEntry, TensorEntry]] = []
    lm_head = None
    for name, entry in ckpt.tensors.items():
        if name in wanted or name.startswith(SKIPPED_PREFIXES):
            continue
        if name == "lm_head.weight":
            lm_head = entry
        elif name.startswith(ENCODER_TEXT) and not ENCODER_SCALAR.match(name):
            twin = DECODER + name[len(ENCODER_TEXT):]
            if twin not in ckpt.tensors:
                raise ConversionError(f"encoder tensor '{name}' has no decoder twin '{twin}' to be tied to")
            tied_pairs.append((entry, ckpt.tensors[twin]))
        elif name.endswith("rotary_emb.inv_freq") or ".v_norm." in name or ".router.norm." in name:
            continue  # buffers recomputed at run time / norms without weights
        else:
            raise ConversionError(f"unexpected tensor '{name}' in the checkpoint (not part of the DiffusionGemma layout)")

    plan = [PlannedTensor("rope_freqs.weight", (a.head_dim_full // 2,), Q.F32, data=rope_freqs(a))]
    for m in expected:
        entry = ckpt.tensors.get(m.hf_name)
        if entry is None:
            if m.hf_name.startswith(DECODER + "self_conditioning."):
                raise ConversionError(f"checkpoint lacks tensor '{m.hf_name}' (self-conditioning is part of DiffusionGemma)")
            raise ConversionError(f"checkpoint lacks tensor '{m.hf_name}'")
        if entry.shape != m.shape:
            raise ConversionError(
                f"tensor '{m.hf_name}' has shape {_shape_str(entry.shape)} but config.json implies {_shape_str(m.shape)}"
            )
        plan.append(PlannedTensor(m.gguf_name, m.shape, output_type(m.gguf_name, m.shape, requested), source=entry))
        if m.gguf_name == "token_embd.weight" and lm_head is not None:
            if lm_head.shape != entry.shape:
                raise ConversionError(f"lm_head.weight has shape {_shape_str(lm_head.shape)}, expected {_shape_str(entry.shape)}")
            same, _ = tensors_equal(lm_head, entry)
            if not same:  # an untied output head is kept; a tied copy is not written twice
                plan.append(PlannedTensor("output.weight", entry.shape, output_type("output.weight", entry.shape, requested),
                                          source=lm_head))
    return plan, tied_pairs


def _encode(rows: np.ndarray, qtype: Q, name: str = "", first_row: int = 0) -> memoryview:
    """The GGUF bytes of a block of float32 rows (a view, not a copy, where possible)."""
    if qtype == Q.F32:
        out = np.ascontiguousarray(rows, dtype="<f4")
    elif qtype == Q.F16:
        out = rows.astype("<f2")
    else:
        out = np.ascontiguousarray(gguf.quants.quantize(rows, qtype))
    return memoryview(out).cast("B")


def _default_out_type(ckpt: Checkpoint) -> Q:
    """llama.cpp's 'auto': BF16 when the first matrix of the checkpoint is bf16, else F16."""
    for entry in ckpt.tensors.values():
        if len(entry.shape) >= 2:
            return Q.BF16 if entry.dtype == "BF16" else Q.F16
    return Q.F16


def _write_metadata(w: gguf.GGUFWriter, a: ArchParams, ckpt: Checkpoint, file_type: int, name: str) -> None:
    write_arch_metadata(w, a, file_type, name)
    read_vocab(ckpt, a.vocab_size).write(w)


def write_arch_metadata(w: gguf.GGUFWriter, a: ArchParams, file_type: int, name: str) -> None:
    """Every metadata key of spec section 1 but the tokenizer's (general.*, hparams, diffusion.*)."""
    w.add_type("model")
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(a.context_length)
    w.add_embedding_length(a.hidden_size)
    w.add_block_count(a.n_layer)
    w.add_feed_forward_length(a.intermediate_size)
    w.add_expert_feed_forward_length(a.moe_intermediate_size)
    w.add_expert_count(a.n_expert)
    w.add_expert_used_count(a.n_expert_used)
    w.add_head_count(a.n_head)
    w.add_head_count_kv(a.n_kv_per_layer)
    w.add_key_length(a.head_dim_full)
    w.add_value_length(a.head_dim_full)
    w.add_key_length_swa(a.head_dim_swa)
    w.add_value_length_swa(a.head_dim_swa)
    w.add_layer_norm_rms_eps(a.rms_eps)
    w.add_sliding_window(a.sliding_window)
    w.add_sliding_window_pattern(a.sliding)
    w.add_causal_attention(False)
    w.add_shared_kv_layers(0)
    w.add_embedding_length_per_layer_input(0)
    w.add_rope_freq_base(a.rope_theta_full)
    w.add_rope_freq_base_swa(a.rope_theta_swa)
    w.add_rope_dimension_count(a.head_dim_full)
    w.add_rope_dimension_count_swa(a.head_dim_swa)
    w.add_final_logit_softcapping(a.softcap)
    w.add_uint32("diffusion.canvas_length", a.canvas_length)
    for key, value in a.generation.items():
        if isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_float32(key, value)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(target: Path) -> list[Path]:
    """Removes temporary files a killed writer of `target` left behind (their pid no longer runs)."""
    removed = []
    for p in target.parent.glob(f".{target.name}.*.tmp"):
        parts = p.name[len(target.name) + 2:].split(".")
        if parts and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            if p.is_dir() and not p.is_symlink():  # a split's folder of parts
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_output(target: Path) -> Iterator[Path]:
    """A temporary path beside `target`; renamed onto it when the block succeeds, removed otherwise.
    Its name carries our pid, so a later run can tell a dead writer's leftovers from a live one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; give it a normal file's mode
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------
# Split output (llama.cpp's gguf-split layout).

SPLIT_NAME = "{}-{:05d}-of-{:05d}.gguf"  # PREFIX-00001-of-00003.gguf, as gguf-split and gguf-py name parts
SPLIT_NAME_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_SIZE_RE = re.compile(r"^\s*(?P<n>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[kmgt]?)(?P<i>i?)(?P<b>b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """A size in bytes from '40G', '500M', '1.5G', '2GiB' or '1000000'. K, M, G and T are powers of
    1000, as in llama.cpp's --split-max-size; KiB, MiB, GiB and TiB powers of 1024."""
    m = _SIZE_RE.match(str(text))
    if m is None or (m["i"] and not m["unit"]):
        raise ConversionError(f"invalid size '{text}': give bytes or a number with K, M, G or T (e.g. 40G, 500M, 1.5G)")
    power = " kmgt".index(m["unit"].lower()) if m["unit"] else 0
    n = int(float(m["n"]) * (1024 if m["i"] else 1000) ** power)
    if n < 1:
        raise ConversionError(f"invalid size '{text}': it must be at least one byte")
    return n


def split_paths(target: Path, n_parts: int) -> list[Path]:
    """The files of a model of `n_parts` parts written to `target`: [target], or its parts' names
    (out.gguf -> out-00001-of-00003.gguf, ...)."""
    if n_parts == 1:
        return [target]
    stem = target.name[:-len(".gguf")] if target.name.endswith(".gguf") else target.name
    return [target.with_name(SPLIT_NAME.format(stem, i + 1, n_parts)) for i in range(n_parts)]


def split_part_paths(first: Path, n_parts: int) -> list[Path]:
    """The parts of a split model from the path of its first part (as the native loader finds them)."""
    if n_parts == 1:
        return [first]
    m = SPLIT_NAME_RE.match(first.name)
    if m is None:
        raise ConversionError(f"'{first}' is the first of {n_parts} parts but is not named as gguf-split names them")
    return [first.with_name(SPLIT_NAME.format(m["prefix"], i + 1, n_parts)) for i in range(n_parts)]


class _Writer(gguf.GGUFWriter):
    """gguf-py's writer, its split included (which tensors go in which part, the split.* keys),
    writing to the files we name (temporary ones) rather than to names derived from one path."""

    def __init__(self, paths: list[Path] | None, split_max_size: int | None) -> None:
        super().__init__(paths[0] if paths else None, ARCH, split_max_size=split_max_size or 0)
        self._paths = paths

    def format_shard_names(self, path: Path) -> list[Path]:
        if self._paths is None or len(self._paths) != len(self.tensors):
            raise ConversionError(f"internal error: {len(self.tensors)} parts planned, "
                                  f"{len(self._paths or [])} file names given")
        return list(self._paths)


def _add_tensor_infos(w: gguf.GGUFWriter, plan: list[PlannedTensor]) -> None:
    for t in plan:
        w.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), t.n_bytes, raw_dtype=t.qtype)


def n_split_parts(plan: list[PlannedTensor], split_max_size: int | None) -> int:
    """How many parts `plan` takes with at most `split_max_size` bytes of tensor data in each (a
    tensor larger than that gets a part of its own): gguf-py's rule, as llama.cpp's converter splits."""
    if not split_max_size:
        return 1
    w = _Writer(None, split_max_size)
    _add_tensor_infos(w, plan)
    return len(w.tensors)


def output_paths(target: Path, plan: list[PlannedTensor], split_max_size: int | None) -> list[Path]:
    """The files writing `plan` to `target` makes: [target], or the parts of a split. A split that
    fits in one part is one plain file, as llama.cpp's converter writes it."""
    return split_paths(target, n_split_parts(plan, split_max_size))


def check_targets(paths: list[Path], overwrite: bool) -> None:
    for p in paths:
        if p.is_dir():
            raise ConversionError(f"'{p}' is a folder; give the path of the .gguf file to write")
        if p.exists() and not overwrite:
            raise ConversionError(f"'{p}' already exists; use --force (overwrite=True) to replace it")


@contextmanager
def atomic_outputs(target: Path, paths: list[Path]) -> Iterator[list[Path]]:
    """Temporary paths for `paths` (the files of a write to `target`), moved onto them when the block
    succeeds, removed otherwise. One file: atomic_output. Parts: a temporary folder beside the target
    holds them under their final names (so the loader finds them together); the later parts are
    moved first, the first part last."""
    if len(paths) == 1:
        with atomic_output(paths[0]) as tmp:
            yield [tmp]
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    moved: list[Path] = []
    try:
        tmps = [folder / p.name for p in paths]
        yield tmps
        umask = os.umask(0)
        os.umask(umask)
        for tmp, final in reversed(list(zip(tmps, paths))):
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, final)
            moved.append(final)
    except BaseException:
        for p in moved:  # never leave a mix of new and old parts
            p.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_model(target: Path, plan: list[PlannedTensor], write_metadata: Callable[[gguf.GGUFWriter], None],
                encode: Callable[[np.ndarray, Q, str, int], memoryview], progress: ProgressFn | None, chunk_bytes: int,
                split_max_size: int | None = None) -> list[Path]:
    """Writes `plan` to `target`, or to its split parts, atomically, and checks the result loads.
    Returns the files written."""
    paths = output_paths(target, plan, split_max_size)
    with atomic_outputs(target, paths) as tmps:
        write_gguf(tmps, plan, write_metadata, encode, progress, chunk_bytes,
                   split_max_size=split_max_size if len(paths) > 1 else None)
        validate_output(tmps[0], plan)
    return paths


def check_split_max_size(split_max_size: int | None) -> None:
    if split_max_size is not None and (not isinstance(split_max_size, int) or split_max_size < 1):
        raise ConversionError(f"split_max_size must be a positive number of bytes, got {split_max_size!r}")


def convert(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    out_type: str | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    chunk_bytes: int = 64 * 1024 * 1024,
    split_max_size: int | None = None,
) -> ConversionResult:
    """Converts a checkpoint folder (or a repo id in the local HF cache) to a GGUF file.

    `out_type` is one of f32, f16, bf16, q8_0 (default: bf16 for a bf16 checkpoint, else f16).
    `split_max_size` (bytes of tensor data per file) splits the output into llama.cpp's gguf-split
    parts, `output`'s name + -00001-of-0000N.gguf, ... (`parts` of the result); a model that fits in
    one part is written to `output` alone. Raises ConversionError with a one-line message on any problem."""
    check_split_max_size(split_max_size)
    out_path = Path(output)
    if out_path.exists() and not overwrite and split_max_size is None:
        raise ConversionError(f"'{out_path}' already exists; use --force (overwrite=True) to replace it")
    if out_path.is_dir():
        raise ConversionError(f"'{out_path}' is a folder; give the path of the .gguf file to write")
    try:
        ckpt = Checkpoint(resolve_checkpoint_dir(source))
        arch = read_arch(ckpt)
        if out_type is None:
            qtype = _default_out_type(ckpt)
        elif out_type.lower() in OUT_TYPES:
            qtype = OUT_TYPES[out_type.lower()]
        else:
            raise ConversionError(f"unknown output type '{out_type}' (choose from {', '.join(OUT_TYPES)})")
        plan, tied_pairs = plan_tensors(ckpt, arch, qtype)
        check_targets(output_paths(out_path, plan, split_max_size), overwrite)

        tie_total = sum(e.n_bytes for e, _ in tied_pairs)
        done = 0
        for enc, dec in tied_pairs:
            same, diff = tensors_equal(enc, dec)
            if not same:
                raise ConversionError(
                    f"encoder weight '{enc.name}' differs from its decoder twin '{dec.name}' (max abs difference {diff:.3g}); "
                    "DiffusionGemma's encoder and decoder must share their backbone weights"
                )
            done += enc.n_bytes
            if progress:
                progress("checking tied weights", done, tie_total)

        name = arch.name.rstrip("/").split("/")[-1] or checkpoint_name(source, ckpt.folder)
        metadata = lambda w: _write_metadata(w, arch, ckpt, FILE_TYPES[qtype], name)  # noqa: E731
        parts = write_model(out_path, plan, metadata, _encode, progress, chunk_bytes, split_max_size)
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from exc
    type_counts: dict[str, int] = {}
    for t in plan:
        type_counts[t.qtype.name] = type_counts.get(t.qtype.name, 0) + 1
    return ConversionResult(parts[0], len(plan), sum(p.stat().st_size for p in parts), type_counts, arch, parts)


def write_gguf(tmp: Path | list[Path], plan: list[PlannedTensor], write_metadata: Callable[[gguf.GGUFWriter], None],
               encode: Callable[[np.ndarray, Q, str, int], memoryview], progress: ProgressFn | None,
               chunk_bytes: int, split_max_size: int | None = None) -> None:
    """Metadata and tensor infos first, then each tensor's data streamed in row chunks.
    `encode(rows, type, tensor name, index of the first row in the tensor)` gives their bytes.
    With `split_max_size`, `tmp` is the list of the parts' paths (n_split_parts of them): the
    metadata goes to the first, each part gets the split.* keys and its run of tensors."""
    paths = [tmp] if isinstance(tmp, (str, os.PathLike)) else list(tmp)
    w = _Writer([Path(p) for p in paths], split_max_size)
    write_metadata(w)
    _add_tensor_infos(w, plan)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    total = sum(t.n_bytes for t in plan)
    done = 0
    tensors = iter(plan)
    try:
        for f, part in zip(w.fout, w.tensors):
            w.write_padding(f, f.tell())
            for name in part:
                t = next(tensors)
                if t.gguf_name != name:
                    raise ConversionError(f"internal error: tensor '{t.gguf_name}' out of order (expected '{name}')")
                written = 0
                first_row = 0
                for rows in t.rows(chunk_bytes):
                    blob = encode(rows, t.qtype, t.gguf_name, first_row)
                    first_row += rows.shape[0]
                    f.write(blob)
                    written += blob.nbytes
                    if progress:
                        progress("writing", done + written, total)
                if written != t.n_bytes:
                    raise ConversionError(f"internal error: wrote {written} bytes for '{t.gguf_name}', expected {t.n_bytes}")
                done += written
                w.write_padding(f, written)
                if progress:
                    progress("writing", done, total)
    finally:
        w.close()


def validate_output(path: Path, plan: list[PlannedTensor]) -> None:
    """Every file we write must pass the native loader's checks."""
    from pydgemma import Model, ModelError

    try:
        with Model(path, device="cpu") as m:
            if len(m.tensors) != len(plan):
                raise ConversionError(f"internal error: wrote {len(plan)} tensors, the loader sees {len(m.tensors)}")
    except ModelError as exc:
        raise ConversionError(f"internal error: the written file does not load: {exc}") from exc
