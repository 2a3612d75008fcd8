"""Random but valid DiffusionGemma GGUF files of any known shape, written straight in a mix's types.

    python -m pydgemma.models.synthetic --preset diffusiongemma-26B-A4B -t Q4_K_M -o dg26b-q4km.gguf

No checkpoint and no quantizer are involved: every tensor's type comes from the quant policy
(``quantize.policy.choose``), and its bytes are built directly, block by block, with numpy: random
quant values under block scales chosen so that the dequantized weights have a standard deviation
of about WEIGHT_STD (0.02) and mean ~0, never NaN or Inf. The file is streamed tensor by tensor in
chunks of rows (memory stays at a few chunks whatever the model size), written atomically and
checked by the native loader, exactly as the converter's output (``quantize.convert``: the same
metadata writer, tensor layout and rope_freqs).

The weights are noise: good for load, memory, speed and sampler plumbing at real scale, not for
text. What is realistic: norm weights ~1, router and expert scales ~1, layer scalars ~1, a router
that spreads tokens over all experts, q/k norm weights of head_dim**-0.25 (the attention scale is
1.0, so unit weights would make every softmax one-hot), and a tokenizer with byte fallback, the
chat special tokens, a few hundred BPE merges of English and pseudo-word fillers up to the vocab.
"""

from __future__ import annotations

import functools
import math
import os
import queue
import shutil
import signal
import sys
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, TypeVar

import gguf
import numpy as np
import typer

from pydgemma.gguf.schema import schema
from pydgemma.quantize.convert import (ConversionError, PlannedTensor, ProgressFn, check_split_max_size, check_targets,
                                       output_paths, parse_size, rope_freqs, write_arch_metadata, write_model)
from pydgemma.quantize.hf_config import ArchParams
from pydgemma.quantize.policy import MIXES, Q, choose
from pydgemma.quantize.tensor_map import layout
from pydgemma.quantize.vocab import (FORCED_USER_DEFINED, TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED,
                                     Vocab)

from . import registry
from .registry import Preset
from .tiny_checkpoint import CHAT_TEMPLATE, SPECIAL_TOKENS

__all__ = ["SyntheticError", "SyntheticResult", "plan", "random_blocks", "synthetic_vocab", "write", "WEIGHT_STD"]

WEIGHT_STD = 0.02  # of every weight matrix, as dequantized
ROUTER_STD = 1.0  # router logits come out ~N(0, 1): the router's input is rms-normed and scaled by n_embd**-0.5


class SyntheticError(Exception):
    """The file cannot be written; the message says why in one line."""


# ------------------------------------------------------------------------------------------------
# Quantized blocks, built directly (block layouts: ggml-common.h; gguf.quants dequantizes them).

def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n]


_JITTER = (0.8 + np.arange(256, dtype=np.float32) * np.float32(0.4 / 255)).astype(np.float32)  # a byte -> [0.8, 1.2]
_SIGN = np.where(np.arange(256) & 1, -1.0, 1.0).astype(np.float32)  # a byte -> a random sign


def _f16_table(values: np.ndarray) -> np.ndarray:
    """256 float values (one per random byte) as the uint16 bits of their float16."""
    return values.astype("<f2").view(np.uint16)


def _uniform_rms(levels: int) -> float:
    """RMS of (q - (levels-1)/2) for q uniform over 0..levels-1."""
    return math.sqrt((levels * levels - 1) / 12)


# Every block field that must be finite is looked up from a random byte in a 256-entry table built
# here: fast (one gather per field) and finite by construction. Each type's tables give the
# dequantized values a standard deviation of `std` (the block's bytes are otherwise random).
_SC_RMS = math.sqrt(sum(k * k for k in range(16, 32)) / 16)  # k-quant 6-bit sub-block scales = mins: 16..31
_Q6_SC = np.where(np.arange(256) & 128, -1, 1) * (8 + (np.arange(256) & 7))  # Q6_K int8 sub-block scales: +-(8..15)
_Q6_SC_RMS = math.sqrt(sum(k * k for k in range(8, 16)) / 8)
_Q8_RMS = math.sqrt(sum(max(k, -127) ** 2 for k in range(-128, 128)) / 256)
_NVFP4_RMS = math.sqrt(sum(v * v for v in gguf.quants.NVFP4.kvalues) / 16)


def _kquant_scales(b: np.ndarray) -> None:
    """The 12 bytes of 6-bit scales and mins of Q4_K/Q5_K blocks (in place): 8 scales in 16..31 from the
    random bits there, and each sub-block's min equal to its scale (with dmin = d * (levels-1)/2 every
    sub-block is centred on 0)."""
    sc = (b[:, 4:12] & np.uint8(15)) | np.uint8(16)
    lo, hi = sc[:, :4], sc[:, 4:]
    packed = lo | np.uint8(64)  # bits 6-7 of bytes 0-7 are bits 4-5 of scales/mins 4-7: 0b01 for 16..31
    b[:, 4:8] = packed
    b[:, 8:12] = packed
    b[:, 12:16] = (hi & np.uint8(15)) * np.uint8(17)  # low nibbles of scale and min 4-7


@functools.cache
def _tables(qtype: Q, std: float) -> dict[str, np.ndarray]:
    if qtype == Q.Q8_0:
        return {"d": _f16_table(std / _Q8_RMS * _JITTER * _SIGN)}  # the sign cancels the int8 mean of -0.5
    if qtype == Q.Q5_0:  # the random sign cancels the -0.5 mean of (q - 16)
        return {"d": _f16_table(std / math.sqrt(_uniform_rms(32) ** 2 + 0.25) * _JITTER * _SIGN)}
    if qtype == Q.Q5_1:
        d = (std / _uniform_rms(32) * _JITTER).astype(np.float16)
        return {"d": d.view(np.uint16), "m": _f16_table(d.astype(np.float32) * np.float32(-15.5))}
    if qtype in (Q.Q4_K, Q.Q5_K):
        levels = 16 if qtype == Q.Q4_K else 32
        d = (std / (_SC_RMS * _uniform_rms(levels)) * _JITTER).astype(np.float16)
        return {"d": d.view(np.uint16), "dmin": _f16_table(d.astype(np.float32) * np.float32((levels - 1) / 2))}
    if qtype == Q.Q6_K:
        return {"d": _f16_table(std / (_Q6_SC_RMS * math.sqrt(_uniform_rms(64) ** 2 + 0.25)) * _JITTER),
                "sc": _Q6_SC.astype(np.int8).view(np.uint8)}
    if qtype == Q.NVFP4:  # UE4M3 holds twice the scale (the kvalues are doubled); never 0x7F (NaN)
        return {"d": gguf.quants.NVFP4.fp32_to_ue4m3((2 * std / _NVFP4_RMS * _JITTER).astype(np.float32))}
    raise KeyError(qtype)


def _fill_blocks(qtype: Q, b: np.ndarray, std: float) -> None:
    """Makes random bytes b [n_blocks, type_size] valid blocks of `qtype` (block layouts: ggml-common.h)."""
    t = _tables(qtype, std)
    if qtype == Q.NVFP4:  # 4 UE4M3 sub-block scales, then 32 bytes of E2M1 nibbles
        b[:, 0:4] = t["d"][b[:, 0:4]]
        return
    if qtype == Q.Q8_0:  # d, then 32 int8 (never -128: ggml's quantizer does not write it either)
        flat = b.reshape(-1).view(np.int8)
        np.maximum(flat, np.int8(-127), out=flat)
    if qtype == Q.Q6_K:  # ql[128], qh[64], int8 scales[16], d
        b[:, 192:208] = t["sc"][b[:, 192:208]]
        b.view(np.uint16)[:, 104] = t["d"][b[:, 208]]
        return
    h = b.view(np.uint16)  # the first fields: d (all), then m (Q5_1) or dmin (Q4_K, Q5_K)
    key = b[:, 0]
    if qtype in (Q.Q4_K, Q.Q5_K):  # d, dmin, scales[12], (qh[32]), qs[128]
        h[:, 1] = t["dmin"][key]
        _kquant_scales(b)
    elif qtype == Q.Q5_1:  # d, m, qh[4], qs[16]
        h[:, 1] = t["m"][key]
    h[:, 0] = t["d"][key]  # Q8_0, Q5_0 (d, qh[4], qs[16]) and the above


BLOCK_TYPES = (Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.NVFP4)


def random_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator, std: float = WEIGHT_STD) -> np.ndarray:
    """`n_blocks` random blocks of `qtype` as bytes [n_blocks, type_size]: random quants, finite scales,
    dequantizing to values of standard deviation ~`std` and mean ~0."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    b = _random_bytes(rng, n_blocks * size).reshape(n_blocks, size)
    _fill_blocks(qtype, b, std)
    return b


def _dense(qtype: Q, shape: tuple[int, int], rng: np.random.Generator, std: float) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= np.float32(std)
    if qtype == Q.F32:
        return x.view(np.uint8)
    if qtype == Q.F16:
        return x.astype("<f2").view(np.uint8)
    return gguf.quants.quantize(x, qtype)  # BF16


# ------------------------------------------------------------------------------------------------
# The plan: names and shapes from the layout's schema (as the converter writes them), types from the quant policy.

def _vector(name: str, n: int, a: ArchParams, rng: np.random.Generator) -> np.ndarray:
    def uniform(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, n).astype(np.float32)

    if name == "rope_freqs.weight":
        return rope_freqs(a)
    if name.endswith(("attn_q_norm.weight", "attn_k_norm.weight")):
        return uniform(0.9, 1.1) * np.float32(n ** -0.25)  # n is the layer's head_dim
    if name.endswith("_norm.weight"):
        return uniform(0.9, 1.1)
    if name.endswith(("ffn_gate_inp.scale", "ffn_down_exps.scale")):
        return uniform(0.8, 1.2)
    return uniform(0.9, 1.1)  # layer_output_scale, enc_layer_output_scale


@dataclass
class SyntheticTensor(PlannedTensor):
    arch: ArchParams | None = None
    seed: int = 0

    def rows(self, chunk_bytes: int) -> Iterator[np.ndarray]:
        """The tensor's GGUF bytes, already encoded, as uint8 blocks of whole rows [k, row bytes]."""
        return _ahead(self._chunks(chunk_bytes))

    def _chunks(self, chunk_bytes: int) -> Iterator[np.ndarray]:
        assert self.arch is not None
        key = np.random.SeedSequence([self.seed, zlib.crc32(self.gguf_name.encode())])  # order-free per tensor
        rng = np.random.Generator(np.random.SFC64(key))
        row_len = self.shape[-1]
        n_rows = math.prod(self.shape[:-1])
        row_bytes = self.n_bytes // n_rows
        if len(self.shape) == 1:
            yield _vector(self.gguf_name, row_len, self.arch, rng).view(np.uint8).reshape(1, -1)
            return
        std = ROUTER_STD if self.gguf_name.endswith("ffn_gate_inp.weight") else WEIGHT_STD
        step = max(1, chunk_bytes // row_bytes)
        block = gguf.GGML_QUANT_SIZES[self.qtype][0]
        for start in range(0, n_rows, step):
            k = min(step, n_rows - start)
            if self.qtype in BLOCK_TYPES:
                out = random_blocks(self.qtype, k * row_len // block, rng, std)
            else:
                out = _dense(self.qtype, (k, row_len), rng, std)
            yield out.reshape(k, row_bytes)


T = TypeVar("T")


def _ahead(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """`items`, made in a background thread up to `depth` ahead, so that making the next chunk overlaps
    writing this one (numpy's bit generators and ufuncs, and file writes, release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(x: object) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failure(exc))

    worker = threading.Thread(target=run, name="synthetic-chunks", daemon=True)
    worker.start()
    try:
        while True:
            x = q.get()
            if x is done:
                return
            if isinstance(x, _Failure):
                raise x.exc
            yield x
    finally:
        stop.set()
        worker.join()


@dataclass
class _Failure:
    exc: BaseException


def _as_preset(preset: Preset | str) -> Preset:
    if isinstance(preset, Preset):
        return preset
    try:
        return registry.get(preset)
    except KeyError as exc:
        raise SyntheticError(exc.args[0]) from None


def _mix(mix: str) -> str:
    m = mix.upper()
    if m not in MIXES:
        raise SyntheticError(f"unknown type '{mix}' (choose from {', '.join(MIXES)})")
    return m


def plan(preset: Preset | str, mix: str, seed: int = 0) -> list[SyntheticTensor]:
    """The tensors of `preset` in file order (rope_freqs first, as the converter writes them), each
    with the type `mix` gives it. Nothing is generated until a tensor's rows are read."""
    p, m = _as_preset(preset), _mix(mix)
    a = p.arch()
    tensors = [(t.name, t.shape) for t in schema().tensors(layout(a))]
    choices = choose(m, [(name, tuple(reversed(shape))) for name, shape in tensors])
    return [SyntheticTensor(name, shape, c.qtype, arch=a, seed=seed) for (name, shape), c in zip(tensors, choices)]


# ------------------------------------------------------------------------------------------------
# The tokenizer.

# English to learn BPE merges from, so that ordinary text tokenizes into word-sized pieces.
_SAMPLE_TEXT = """\
The quick brown fox jumps over the lazy dog. A diffusion language model writes a whole block of
text at once: it starts from noise and refines every position of the canvas over a few denoising
steps, then appends the block to the prompt. The encoder reads the prompt once and fills the cache;
the decoder reads the cache and the canvas, attends in both directions and predicts a token for
every position. This is a synthetic model with random weights: it is good for measuring speed and
memory, and for testing that files load and run, but what it writes is not meant to be read.
What is the capital of France? Write a short poem about the sea. Please answer the question in one
sentence. Thank you for your help with this problem; here is the code and the output of the test.
def main(): return print("hello, world") if __name__ == "__main__" else None
"""
_BASE_PIECES = ["\u2581", "\n", "\t"] + [chr(c) for c in range(0x21, 0x7F)]
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@functools.lru_cache(maxsize=4)
def _train_merges(text: str, n_merges: int) -> tuple[tuple[str, str], ...]:
    """Byte-pair merges learned from `text`, most frequent pair first (ties in text order)."""
    words: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        for i, w in enumerate(line.split(" ")):
            if w:
                words[tuple(("\u2581" if i else "") + w)] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best, _ = max(pairs.items(), key=lambda kv: kv[1])  # max keeps the first of equals
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return tuple(merges)


def _pseudo_words(taken: set[str]) -> Iterator[str]:
    """'\u2581ba', '\u2581be', ... '\u2581bab', ...: unique, readable fillers."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    for length in range(1, 8):
        for index in range(len(syllables) ** length):
            word, i = "", index
            for _ in range(length):
                i, r = divmod(i, len(syllables))
                word = syllables[r] + word
            piece = "\u2581" + word
            if piece not in taken:
                yield piece


MIN_VOCAB = 4 + len(SPECIAL_TOKENS) + 256 + len(_BASE_PIECES) + 1


def synthetic_vocab(n_vocab: int) -> Vocab:
    """A Gemma-style vocabulary of `n_vocab` tokens: <pad> <eos> <bos> <unk> = 0-3, the chat specials of
    the tiny checkpoint (<mask> = 4, <|turn>, <turn|>, ...), <0x00>..<0xFF>, single characters, BPE
    merges learned from a short English sample, then pseudo-word fillers."""
    if n_vocab < MIN_VOCAB:
        raise SyntheticError(f"a vocabulary of {n_vocab} tokens is too small: the special, byte and character "
                             f"tokens alone take {MIN_VOCAB - 1}")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", *SPECIAL_TOKENS]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + list(_BASE_PIECES)
    types = [TOKEN_USER_DEFINED if t in FORCED_USER_DEFINED else TOKEN_CONTROL for t in specials]
    types += [TOKEN_BYTE] * 256 + [TOKEN_NORMAL] * len(_BASE_PIECES)
    merges = []
    taken = set(tokens)
    for left, right in _train_merges(_SAMPLE_TEXT, min(n_vocab - len(tokens), 2000)):
        if left + right not in taken:
            tokens.append(left + right)
            types.append(TOKEN_NORMAL)
            taken.add(left + right)
        merges.append(f"{left} {right}")
    fillers = _pseudo_words(taken)
    while len(tokens) < n_vocab:
        tokens.append(next(fillers))
        types.append(TOKEN_NORMAL)
    ids = {t: i for i, t in enumerate(specials)}
    special_ids = {"pad_token": ids["<pad>"], "eos_token": ids["<eos>"], "bos_token": ids["<bos>"],
                   "unk_token": ids["<unk>"], "mask_token": ids["<mask>"]}
    return Vocab(tokens=tokens, token_types=types, merges=merges, special_ids=special_ids, add_bos=True,
                 chat_template=CHAT_TEMPLATE)


# ------------------------------------------------------------------------------------------------
# Writing.

@dataclass
class SyntheticResult:
    path: Path
    preset: Preset
    mix: str
    n_tensors: int
    n_bytes: int  # of the whole file
    type_counts: dict[str, int]
    seconds: float
    parts: list[Path] = field(default_factory=list)  # the files written: [path], or the parts of a split


def planned_bytes(tensors: list[SyntheticTensor]) -> int:
    return sum(t.n_bytes for t in tensors)


def _existing_ancestor(path: Path) -> Path:
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(_existing_ancestor(path)).free
    except OSError:
        return -1


def write(
    preset: Preset | str,
    mix: str,
    output: str | os.PathLike[str],
    *,
    seed: int = 0,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    chunk_bytes: int = 32 * 1024 * 1024,
    split_max_size: int | None = None,
) -> SyntheticResult:
    """Writes a random `preset` model in `mix` (Q4_K_M, Q8_0, NVFP4, F16, ... : quantize.policy.MIXES) to
    `output`, atomically, and checks it with the native loader; with `split_max_size` (bytes of tensor
    data per file) as llama.cpp's gguf-split parts. Raises SyntheticError (one line)."""
    started = time.monotonic()
    p, m = _as_preset(preset), _mix(mix)
    try:
        check_split_max_size(split_max_size)
    except ConversionError as exc:
        raise SyntheticError(str(exc)) from None
    out_path = Path(output)
    if out_path.is_dir():
        raise SyntheticError(f"'{out_path}' is a folder; give the path of the .gguf file to write")
    if out_path.exists() and not overwrite and split_max_size is None:
        raise SyntheticError(f"'{out_path}' already exists; use --force (overwrite=True) to replace it")
    folder = _existing_ancestor(out_path)
    if not folder.is_dir():
        raise SyntheticError(f"cannot write '{out_path}': '{folder}' is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SyntheticError(f"cannot write '{out_path}': no permission to write in '{folder}'")
    tensors = plan(p, m, seed)
    a = tensors[0].arch
    assert a is not None
    try:
        check_targets(output_paths(out_path, tensors, split_max_size), overwrite)
    except ConversionError as exc:
        raise SyntheticError(str(exc)) from None
    free = _free_bytes(out_path)
    needed = planned_bytes(tensors) + 64 * 1024 * 1024  # the tensors and, generously, the metadata
    if 0 <= free < needed:
        raise SyntheticError(f"not enough disk space for '{out_path}': it needs {needed / 2**30:.2f} GiB, "
                             f"{free / 2**30:.2f} GiB are free")
    vocab = synthetic_vocab(a.vocab_size)

    def write_metadata(w: gguf.GGUFWriter) -> None:
        write_arch_metadata(w, a, MIXES[m][0], p.name)
        vocab.write(w)

    def already_encoded(rows: np.ndarray, qtype: Q, name: str = "", first_row: int = 0) -> memoryview:
        return memoryview(rows).cast("B")

    try:
        parts = write_model(out_path, tensors, write_metadata, already_encoded, progress, chunk_bytes, split_max_size)
    except ConversionError as exc:
        raise SyntheticError(str(exc)) from exc
    except OSError as exc:
        raise SyntheticError(f"cannot write '{out_path}': {exc.strerror or exc}") from None
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    return SyntheticResult(parts[0], p, m, len(tensors), sum(f.stat().st_size for f in parts), counts,
                           time.monotonic() - started, parts)


# ------------------------------------------------------------------------------------------------
# The command.

def _preset_lines() -> str:
    return "\n\n".join(f"  {n}: {registry.get(n).description}" for n in registry.names())


app = typer.Typer(
    name="python -m pydgemma.models.synthetic",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command(help=f"""Write a random but valid DiffusionGemma GGUF of a known shape, directly in a quant mix.

Every tensor gets the type the quantization policy gives it (as 'pydgemma-quantize quantize' would);
its blocks are random quants under finite scales (weights ~N(0, 0.02^2) once dequantized). The file
loads and runs like a real one: for measuring load time, memory and speed at real scale without
the real weights. Its output is noise, not text.

Streams tensor by tensor (bounded memory, at about disk speed), atomically (a temporary file beside
OUTPUT, renamed when the native loader accepts it).

Presets:

{_preset_lines()}

Examples:

  python -m pydgemma.models.synthetic --preset diffusiongemma-26B-A4B -t Q4_K_M -o dg26b-q4km.gguf

  python -m pydgemma.models.synthetic --preset diffusiongemma-26B-A4B -t NVFP4 --dry-run

  python -m pydgemma.models.synthetic --preset tiny -t F16 -o tiny-f16.gguf --seed 3
""")
def synthetic(
    preset: str = typer.Option(..., "--preset", "-p", help=f"The shape: {', '.join(registry.names())}.",
                               show_default=False),
    mix: str = typer.Option(..., "--type", "-t", help=f"The quant mix: {', '.join(MIXES)}.", show_default=False),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="The .gguf file to write.", show_default=False),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same file."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (tensor, type, bytes) and write nothing."),
    split_max_size: Optional[str] = typer.Option(None, "--split-max-size", help="Write llama.cpp gguf-split parts of at "
                                                 "most this much tensor data each (40G, 500M, 1.5G, 2GiB or bytes): "
                                                 "-o out.gguf writes out-00001-of-0000N.gguf, ...", show_default=False),
    force: bool = typer.Option(False, "--force", "-f", help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    from rich.console import Console

    from pydgemma.progress import phase_progress

    if dry_run:
        tensors = plan(preset, mix, seed)
        width = max(len(t.gguf_name) for t in tensors)
        typer.echo(f"{'tensor':{width}}  {'shape':>16}  {'type':7}  {'bytes':>14}")
        for t in tensors:
            shape = "x".join(map(str, reversed(t.shape)))
            typer.echo(f"{t.gguf_name:{width}}  {shape:>16}  {t.qtype.name:7}  {t.n_bytes:>14,}")
        total = planned_bytes(tensors)
        typer.echo(f"dry run: nothing written: {len(tensors)} tensors, {total:,} bytes ({total / 2**30:.2f} GiB)")
        return
    if output is None:
        raise SyntheticError("give the output file (-o), or --dry-run")
    try:
        split = parse_size(split_max_size) if split_max_size is not None else None
    except ConversionError as exc:
        raise SyntheticError(str(exc)) from None
    with phase_progress(not quiet and Console(stderr=True).is_terminal) as report:
        result = write(preset, mix, output, seed=seed, overwrite=force, progress=report, split_max_size=split)
    if not quiet:
        types = ", ".join(f"{n} {name.lower()}" for name, n in sorted(result.type_counts.items()))
        where = result.path if len(result.parts) == 1 else f"{len(result.parts)} parts, {result.path} ..."
        typer.echo(f"wrote {where}: {result.preset.name} {result.mix}, {result.n_tensors} tensors ({types}), "
                   f"{result.n_bytes / 2**30:.2f} GiB, {result.seconds:.1f} s")


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so the temporary output file is removed


def main() -> None:
    from pydgemma.cli_runner import run_app

    signal.signal(signal.SIGTERM, _terminate)
    run_app(app, (SyntheticError,))


if __name__ == "__main__":
    main()
    sys.exit(0)
