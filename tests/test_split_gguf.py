"""llama.cpp's gguf-split files (PREFIX-00001-of-00003.gguf, ...): written by the converter and the
quantizer (gguf-py's own split rule and split.* keys, byte for byte), loaded by the native loader as
one model whose logits and generations are bit-identical to the single file's, and every malformed
split refused with one line that names the part."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

import pydgemma
from pydgemma.quantize import ConversionError, convert
from pydgemma.quantize.convert import ARCH, PlannedTensor, _encode, parse_size, write_model
from pydgemma.quantize.quantize import quantize

from test_forward_parity import run_flow

VT = gguf.GGUFValueType
SPLIT_KEYS = {"split.no": VT.UINT16, "split.count": VT.UINT16, "split.tensors.count": VT.INT32}
PART_BYTES = {"f32": 200_000, "q8_0": 60_000}  # tensor data per part: the tiny model in 7-9 parts


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory, hf_tiny: Path) -> dict[str, tuple[Any, Any]]:
    """hf_tiny converted to F32 and Q8_0, each as one file and split: {type: (single, split)} results."""
    root = tmp_path_factory.mktemp("split")
    return {t: (convert(hf_tiny, root / f"{t}.gguf", out_type=t),
                convert(hf_tiny, root / f"{t}-split.gguf", out_type=t, split_max_size=size))
            for t, size in PART_BYTES.items()}


def fields(path: Path) -> dict[str, Any]:
    """A GGUF's metadata as {key: (value types, contents)}, gguf-py's bookkeeping left out."""
    r = gguf.GGUFReader(path)
    return {k: (tuple(f.types), f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def tensors_of(paths: list[Path]) -> list[tuple[str, int, bytes]]:
    return [(t.name, int(t.tensor_type), bytes(t.data.tobytes())) for p in paths for t in gguf.GGUFReader(p).tensors]


def flow(model: pydgemma.Model, seed: int = 0) -> list[np.ndarray]:
    """Prefill, then per canvas denoise without and with self-conditioning, commit: every step's logits."""
    hp = model.hparams
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, hp["n_vocab"], 37)
    canvases = [rng.integers(0, hp["n_vocab"], hp["canvas_length"]) for _ in range(2)]
    return run_flow(model.context(n_ctx=128), prompt, canvases)[0]


def load_error(path: Path) -> pydgemma.ModelError:
    with pytest.raises(pydgemma.ModelError) as info:
        pydgemma.Model(path, device="cpu")
    message = str(info.value)
    assert "\n" not in message and message
    return info.value


# ------------------------------------------------------------------------------------------------
# Writing.


@pytest.mark.parametrize("qtype", list(PART_BYTES))
def test_split_output_is_named_and_sized_as_gguf_split(twins, qtype: str) -> None:
    single, split = twins[qtype]
    n = len(split.parts)
    assert n >= 3
    folder = split.path.parent
    assert split.parts == [folder / f"{qtype}-split-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert split.path == split.parts[0] and single.parts == [single.path]
    assert split.n_bytes == sum(p.stat().st_size for p in split.parts)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file or folder left
    # each part's tensor data stays under the maximum (a larger tensor would get a part of its own)
    for p in split.parts:
        assert sum(int(t.n_bytes) for t in gguf.GGUFReader(p).tensors) <= PART_BYTES[qtype]
    # the same tensors, in the same order, with the same bytes
    assert tensors_of(split.parts) == tensors_of([single.path])


def test_split_keys_and_metadata_are_llama_cpps(twins) -> None:
    """All the metadata in the first part, then split.no (u16), split.count (u16) and
    split.tensors.count (i32); the other parts carry the split.* keys only."""
    single, split = twins["f32"]
    n = len(split.parts)
    total = len(gguf.GGUFReader(single.path).tensors)
    whole = fields(single.path)
    assert not any(k.startswith("split.") for k in whole)
    for i, p in enumerate(split.parts):
        got = fields(p)
        split_part = {k: v for k, v in got.items() if k.startswith("split.")}
        assert split_part == {"split.no": ((VT.UINT16,), i), "split.count": ((VT.UINT16,), n),
                              "split.tensors.count": ((VT.INT32,), total)}
        rest = {k: v for k, v in got.items() if not k.startswith("split.")}
        assert rest == (whole if i == 0 else {})
    assert list(fields(split.parts[0]))[-3:] == list(SPLIT_KEYS)  # gguf-py appends them to the metadata


def write_with_gguf_py(source: Path, out: Path, **split: Any) -> None:
    """`source`'s metadata and tensors written again by gguf-py's own writer, split as `split` says."""
    reader = gguf.GGUFReader(source)
    w = gguf.GGUFWriter(out, ARCH, **split)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = VT(f.types[0])
        w.add_key_value(name, f.contents(), vtype, sub_type=VT(f.types[-1]) if vtype == VT.ARRAY else None)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_parts_are_byte_identical_to_gguf_pys_own_split_writer(twins, tmp_path: Path) -> None:
    """gguf.GGUFWriter(split_max_size=...) given the same metadata and tensors writes the same files."""
    single, split = twins["f32"]
    write_with_gguf_py(single.path, tmp_path / "f32-split.gguf", split_max_size=PART_BYTES["f32"])
    theirs = sorted(tmp_path.glob("f32-split-*.gguf"))
    assert [p.name for p in theirs] == [p.name for p in split.parts]
    for a, b in zip(split.parts, theirs):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_a_split_that_fits_in_one_part_is_the_plain_file(hf_tiny: Path, twins, tmp_path: Path) -> None:
    """As llama.cpp's converter: no split.* keys, OUTPUT's own name, the same bytes as without a split."""
    single, _ = twins["f32"]
    out = convert(hf_tiny, tmp_path / "one.gguf", out_type="f32", split_max_size=10**9)
    assert out.parts == [tmp_path / "one.gguf"]
    assert out.path.read_bytes() == single.path.read_bytes()


def test_existing_parts_are_refused_and_replaced_with_force(hf_tiny: Path, twins, tmp_path: Path) -> None:
    _, split = twins["q8_0"]
    n = len(split.parts)
    second = tmp_path / f"m-00002-of-{n:05d}.gguf"
    second.write_bytes(b"old")
    with pytest.raises(ConversionError, match=f"'{second}' already exists; use --force"):
        convert(hf_tiny, tmp_path / "m.gguf", out_type="q8_0", split_max_size=PART_BYTES["q8_0"])
    assert sorted(tmp_path.iterdir()) == [second]
    (tmp_path / "m.gguf").write_bytes(b"a single file of the same name is no obstacle to parts")
    out = convert(hf_tiny, tmp_path / "m.gguf", out_type="q8_0", split_max_size=PART_BYTES["q8_0"], overwrite=True)
    assert len(out.parts) == n and second.read_bytes() != b"old"
    assert tensors_of(out.parts) == tensors_of(split.parts)


def test_a_failed_split_write_leaves_nothing(twins, tmp_path: Path) -> None:
    """A failure after some parts are written (here: the encoder, in the 4th part) removes them all,
    and a dead writer's temporary folder is cleaned up by the next write."""
    single, split = twins["f32"]
    reader = gguf.GGUFReader(single.path)
    plan = [PlannedTensor(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type, gguf_source=t)
            for t in reader.tensors]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".m.gguf.{int(dead.stdout)}.abc.tmp"
    stale.mkdir()
    (stale / "m-00001-of-00009.gguf").write_bytes(b"left by a killed writer")

    def copy_metadata(w: gguf.GGUFWriter) -> None:
        for name, f in reader.fields.items():
            if not name.startswith("GGUF.") and name != "general.architecture":
                vtype = VT(f.types[0])
                w.add_key_value(name, f.contents(), vtype, sub_type=VT(f.types[-1]) if vtype == VT.ARRAY else None)

    fourth_part = next(t.name for t in gguf.GGUFReader(split.parts[3]).tensors)

    def encode(rows: np.ndarray, qtype, name: str = "", first_row: int = 0) -> memoryview:
        if name == fourth_part:
            raise ConversionError("disk full (simulated)")
        return _encode(rows, qtype, name, first_row)

    with pytest.raises(ConversionError, match="simulated"):
        write_model(tmp_path / "m.gguf", plan, copy_metadata, encode, None, 1 << 20, PART_BYTES["f32"])
    assert list(tmp_path.iterdir()) == []
    parts = write_model(tmp_path / "m.gguf", plan, copy_metadata, _encode, None, 1 << 20, PART_BYTES["f32"])
    assert sorted(tmp_path.iterdir()) == parts and [p.read_bytes() for p in parts] == [p.read_bytes() for p in split.parts]


@pytest.mark.parametrize("text,n", [("40G", 40 * 10**9), ("500M", 500 * 10**6), ("1.5G", 1_500_000_000),
                                    ("2GiB", 2 << 30), ("100k", 100_000), ("40GB", 40 * 10**9), ("1000000", 10**6),
                                    (" 3 T ", 3 * 10**12), ("64MiB", 64 << 20)])
def test_sizes(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "G", "12X", "-1", "0", "0.0001", "1.2.3", "GiB", "1e9", "5 iB"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ConversionError, match="invalid size"):
        parse_size(text)


@pytest.mark.slow
def test_quantize_cli_writes_parts(twins, tmp_path: Path) -> None:
    """pydgemma-quantize quantize --split-max-size: the parts named in the summary, the same tensors
    as the unsplit quantization; and quantizing from the split F32 model equals quantizing from its
    single file."""
    single, split = twins["f32"]
    cmd = [sys.executable, "-m", "pydgemma.quantize", "quantize", "-t", "Q8_0", "--threads", "2"]
    whole = tmp_path / "whole.gguf"
    r = subprocess.run(cmd + [str(single.path), "-o", str(whole)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cmd + [str(single.path), "-o", str(tmp_path / "q.gguf"), "--split-max-size", "0.1M"],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
    assert r.returncode == 0, r.stderr
    parts = sorted(tmp_path.glob("q-*-of-*.gguf"))
    assert len(parts) >= 3 and f"wrote {len(parts)} parts" in r.stdout
    for p in parts:
        assert str(p) in r.stdout
        assert sum(int(t.n_bytes) for t in gguf.GGUFReader(p).tensors) <= 100_000
    assert tensors_of(parts) == tensors_of([whole])
    assert {k: v for k, v in fields(parts[0]).items() if not k.startswith("split.")} == fields(whole)
    # from a split source: every part is read, its split.* keys are not copied
    from_split = quantize(split.path, tmp_path / "from-split.gguf", mix="Q8_0", n_threads=2)
    assert from_split.parts == [tmp_path / "from-split.gguf"]
    assert tensors_of(from_split.parts) == tensors_of([whole]) and fields(from_split.path) == fields(whole)
    assert len(pydgemma.Model(parts[0]).tensors) == len(pydgemma.Model(whole).tensors)


@pytest.mark.slow
def test_convert_cli_writes_parts_and_refuses_a_bad_size(hf_tiny: Path, twins, tmp_path: Path) -> None:
    _, split = twins["f32"]
    cmd = [sys.executable, "-m", "pydgemma.quantize", "convert", str(hf_tiny), "-t", "f32", "-o", str(tmp_path / "f32-split.gguf")]
    r = subprocess.run(cmd + ["--split-max-size", "200000"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
    assert r.returncode == 0, r.stderr
    parts = sorted(tmp_path.glob("f32-split-*.gguf"))
    assert f"wrote {len(parts)} parts:" in r.stdout and all(str(p) in r.stdout for p in parts)
    assert [p.read_bytes() for p in parts] == [p.read_bytes() for p in split.parts]
    for sub in (cmd, [sys.executable, "-m", "pydgemma.quantize", "quantize", str(split.path), "-t", "Q8_0", "-o",
                      str(tmp_path / "q.gguf")]):
        bad = subprocess.run(sub + ["--split-max-size", "12X", "--force"], capture_output=True, text=True)
        assert bad.returncode == 1
        assert bad.stderr.strip().splitlines() == ["error: invalid size '12X': give bytes or a number with K, M, G or T "
                                                   "(e.g. 40G, 500M, 1.5G)"]
    help_text = subprocess.run([sys.executable, "-m", "pydgemma.quantize", "quantize", "--help"], capture_output=True,
                               text=True, env={**os.environ, "COLUMNS": "200"}).stdout
    assert "--split-max-size" in help_text and "out-00001-of-0000N.gguf" in help_text


# ------------------------------------------------------------------------------------------------
# Loading.


@pytest.mark.parametrize("qtype", list(PART_BYTES))
@pytest.mark.parametrize("options", [{}, {"use_mmap": False}, {"repack": False}])
def test_split_logits_are_bit_identical(twins, qtype: str, options: dict) -> None:
    single, split = twins[qtype]
    a = pydgemma.Model(single.path, **options)
    b = pydgemma.Model(split.path, **options)
    ours, theirs = flow(a), flow(b)
    assert len(ours) == 4
    for step, (x, y) in enumerate(zip(ours, theirs)):
        assert np.array_equal(x, y), f"step {step}"


def test_split_generation_is_identical(twins) -> None:
    single, split = twins["q8_0"]
    a = pydgemma.Model(single.path).generate("hello there", max_new_tokens=40, seed=3)
    b = pydgemma.Model(split.path).generate("hello there", max_new_tokens=40, seed=3)
    assert a.tokens == b.tokens and a.text == b.text and a.steps == b.steps


def test_split_model_description(twins) -> None:
    single, split = twins["f32"]
    a, b = pydgemma.Model(single.path), pydgemma.Model(split.path)
    assert b.file_size == sum(p.stat().st_size for p in split.parts)
    assert [(t.name, t.type, t.shape, t.n_bytes) for t in b.tensors.values()] == \
           [(t.name, t.type, t.shape, t.n_bytes) for t in a.tensors.values()]
    assert b.metadata["split.count"] == str(len(split.parts)) and b.metadata["split.no"] == "0"
    assert {k: v for k, v in b.metadata.items() if not k.startswith("split.")} == a.metadata
    assert b.hparams == a.hparams
    # the offsets are in each tensor's own part
    by_name = {t.name: (p, t) for p in split.parts for t in gguf.GGUFReader(p).tensors}
    for name, t in b.tensors.items():
        part, rt = by_name[name]
        assert t.offset == rt.data_offset
        assert t.offset + t.n_bytes <= part.stat().st_size


def test_info_of_a_split_model(twins) -> None:
    _, split = twins["f32"]
    r = subprocess.run([sys.executable, "-m", "pydgemma", "info", "-m", str(split.path), "--json"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    import json

    info = json.loads(r.stdout)
    assert info["file_size"] == sum(p.stat().st_size for p in split.parts) and info["tensor_count"] == 144


# Split files written part by part with gguf-py's plain writer, any key changed: the loader's checks.

def write_parts(folder: Path, single: Path, groups: list[list[str]], *, prefix: str = "m",
                keys: dict[int, dict[str, tuple[Any, VT] | None]] | None = None) -> list[Path]:
    """`single`'s tensors as len(groups) parts (groups[i]: the tensor names of part i), the metadata in
    the first; keys[i] changes part i's split.* keys ({key: (value, type)}, or None to leave it out)."""
    reader = gguf.GGUFReader(single)
    data = {t.name: t for t in reader.tensors}
    n, total = len(groups), sum(len(g) for g in groups)
    paths = [folder / f"{prefix}-{i + 1:05d}-of-{n:05d}.gguf" for i in range(n)]
    for i, (path, names) in enumerate(zip(paths, groups)):
        w = gguf.GGUFWriter(path, ARCH)
        if i == 0:
            for name, f in reader.fields.items():
                if not name.startswith("GGUF.") and name != "general.architecture":
                    vtype = VT(f.types[0])
                    w.add_key_value(name, f.contents(), vtype, sub_type=VT(f.types[-1]) if vtype == VT.ARRAY else None)
        else:
            w.kv_data[0].pop("general.architecture")  # as gguf-split: the later parts carry the split.* keys only
        split_keys: dict[str, tuple[Any, VT] | None] = {"split.no": (i, VT.UINT16), "split.count": (n, VT.UINT16),
                                                         "split.tensors.count": (total, VT.INT32)}
        split_keys.update((keys or {}).get(i, {}))
        for key, kv in split_keys.items():
            if kv is not None:
                w.add_key_value(key, kv[0], kv[1])
        for name in names:
            w.add_tensor(name, np.array(data[name].data), raw_dtype=data[name].tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return paths


@pytest.fixture(scope="module")
def names(twins) -> list[str]:
    return [t.name for t in gguf.GGUFReader(twins["f32"][0].path).tensors]


def thirds(names: list[str]) -> list[list[str]]:
    k = len(names) // 3
    return [names[:k], names[k:2 * k], names[2 * k:]]


def test_hand_written_parts_load_identically(twins, names, tmp_path: Path) -> None:
    """Parts written one by one (in any grouping, even a first part of metadata only, as gguf-split's
    --no-tensor-first-split and gguf-py's small_first_shard write) and a one-part split all load as the model."""
    single = twins["f32"][0].path
    want = flow(pydgemma.Model(single))
    for label, groups in {"thirds": thirds(names), "meta-first": [[], names[:50], names[50:]],
                          "one": [names]}.items():
        folder = tmp_path / label
        folder.mkdir()
        parts = write_parts(folder, single, groups)
        m = pydgemma.Model(parts[0])
        assert m.file_size == sum(p.stat().st_size for p in parts)
        assert all(np.array_equal(x, y) for x, y in zip(flow(m), want)), label


def test_gguf_pys_small_first_shard_loads(twins, tmp_path: Path) -> None:
    single = twins["f32"][0].path
    write_with_gguf_py(single, tmp_path / "s.gguf", split_max_size=300_000, small_first_shard=True)
    parts = sorted(tmp_path.glob("s-*.gguf"))
    assert len(parts) >= 3 and not gguf.GGUFReader(parts[0]).tensors
    assert all(np.array_equal(x, y) for x, y in zip(flow(pydgemma.Model(parts[0])), flow(pydgemma.Model(single))))


def test_a_missing_part(twins, tmp_path: Path) -> None:
    _, split = twins["q8_0"]
    n = len(split.parts)
    for p in split.parts:
        shutil.copy(p, tmp_path / p.name)
    gone = tmp_path / split.parts[1].name
    gone.unlink()
    err = load_error(tmp_path / split.parts[0].name)
    assert err.status == "DG_ERR_IO"
    assert str(err) == f"model split into {n} parts: part 2 '{gone}' not found"


def test_a_later_part_given_as_the_model(twins) -> None:
    _, split = twins["q8_0"]
    n = len(split.parts)
    err = load_error(split.parts[2])
    assert err.status == "DG_ERR_FORMAT"
    assert str(err) == (f"'{split.parts[2]}' is part 3 of a model split into {n} parts: load the model from its "
                        f"first part, '{split.parts[0]}'")


def test_a_truncated_part(twins, tmp_path: Path) -> None:
    _, split = twins["q8_0"]
    for p in split.parts:
        shutil.copy(p, tmp_path / p.name)
    third = tmp_path / split.parts[2].name
    size = third.stat().st_size
    with open(third, "r+b") as f:
        f.truncate(size - 100)
    err = load_error(tmp_path / split.parts[0].name)
    assert err.status == "DG_ERR_FORMAT"
    assert str(err).startswith(f"file truncated: part 3 '{third}': tensor data ends at byte ")
    assert str(err).endswith(f" but file has {size - 100}")


@pytest.mark.parametrize("part,change,message", [
    (2, {"split.no": (1, VT.UINT16)}, "part 3 '{p2}': split.no is 1, expected 2 (it is the file of part 2)"),
    (1, {"split.count": (4, VT.UINT16)}, "part 2 '{p1}': split.count is 4 but the first part's is 3"),
    (1, {"split.tensors.count": (7, VT.INT32)}, "part 2 '{p1}': split.tensors.count is 7 but the first part's is 144"),
    (1, {"split.no": (1, VT.UINT32)}, "part 2 '{p1}': key 'split.no' has type u32, expected u16"),
    (2, {"split.tensors.count": (144, VT.UINT32)}, "part 3 '{p2}': key 'split.tensors.count' has type u32, expected i32"),
    (0, {"split.count": (3, VT.INT32)}, "'{p0}': key 'split.count' has type i32, expected u16"),
    (0, {"split.count": ("3", VT.STRING)}, "'{p0}': key 'split.count' has type str, expected u16"),
    (0, {"split.tensors.count": None}, "'{p0}': has split.* keys but no 'split.tensors.count'"),
    (1, {"split.no": None, "split.count": None, "split.tensors.count": None},
     "part 2 '{p1}' has no split.* keys: it is not a part of the split model '{p0}'"),
    (1, {"split.no": (7, VT.UINT16)}, "part 2 '{p1}': split.no is 7 but split.count is 3 (split.no counts from 0)"),
    (0, {"split.count": (0, VT.UINT16)}, "'{p0}': split.count is 0"),
])
def test_split_keys_that_disagree(twins, names, tmp_path: Path, part: int, change: dict, message: str) -> None:
    paths = write_parts(tmp_path, twins["f32"][0].path, thirds(names), keys={part: change})
    err = load_error(paths[0])
    assert err.status == "DG_ERR_FORMAT"
    assert str(err) == message.format(**{f"p{i}": p for i, p in enumerate(paths)})


def test_a_tensor_in_two_parts(twins, names, tmp_path: Path) -> None:
    groups = thirds(names)
    twice = groups[1][3]
    groups[2].append(twice)
    paths = write_parts(tmp_path, twins["f32"][0].path, groups)
    err = load_error(paths[0])
    assert str(err) == f"tensor '{twice}' is in part 2 '{paths[1]}' and again in part 3 '{paths[2]}'"


def test_the_tensor_count_of_all_parts(twins, names, tmp_path: Path) -> None:
    """split.tensors.count agreed by every part, but one tensor short in fact."""
    groups = thirds(names[:-1])
    paths = write_parts(tmp_path, twins["f32"][0].path, groups, keys={i: {"split.tensors.count": (144, VT.INT32)}
                                                                     for i in range(3)})
    assert str(load_error(paths[0])) == f"split.tensors.count is 144 but the 3 parts of '{paths[0]}' hold 143 tensors"


def test_names_that_disagree_with_the_keys(twins, names, tmp_path: Path) -> None:
    paths = write_parts(tmp_path, twins["f32"][0].path, thirds(names))
    four = tmp_path / "m-00001-of-00004.gguf"
    shutil.copy(paths[0], four)
    assert str(load_error(four)) == f"'{four}' is part 1 of 3 (split.no 0, split.count 3) but its name says part 1 of 4"
    plain = tmp_path / "model.gguf"
    shutil.copy(paths[0], plain)
    assert str(load_error(plain)) == (
        f"'{plain}' is the first part of a model split into 3 parts, but its name does not end in '-00001-of-00003.gguf', "
        "so the other parts cannot be found (keep the names llama.cpp's gguf-split gives the parts)")


def test_a_part_that_is_not_gguf(twins, names, tmp_path: Path) -> None:
    paths = write_parts(tmp_path, twins["f32"][0].path, thirds(names))
    paths[2].write_bytes(b"\0" * 4096)
    assert str(load_error(paths[0])) == f"not a GGUF file: '{paths[2]}' (part 3 of 3) does not start with the GGUF magic"
    paths[2].write_bytes(b"")
    assert str(load_error(paths[0])) == f"not a GGUF file: '{paths[2]}' (part 3 of 3) does not start with the GGUF magic"


def test_a_hostile_part_header(twins, names, tmp_path: Path) -> None:
    """The prescan of hostile headers runs on every part (an empty key would make ggml abort)."""
    paths = write_parts(tmp_path, twins["f32"][0].path, thirds(names), keys={1: {"": (1, VT.UINT32)}})
    err = load_error(paths[0])
    assert err.status == "DG_ERR_FORMAT"
    assert str(err) == f"invalid GGUF file '{paths[1]}' (part 2 of 3): metadata entry 3 has an empty key"


def test_a_part_of_another_architecture_is_not_read_as_metadata(twins, names, tmp_path: Path) -> None:
    """Only the first part's metadata counts: a later part's keys are neither needed nor used."""
    single = twins["f32"][0].path
    paths = write_parts(tmp_path, single, thirds(names), keys={1: {"general.architecture": ("llama", VT.STRING),
                                                                   "diffusion.canvas_length": (999, VT.UINT32)}})
    m = pydgemma.Model(paths[0])
    assert m.hparams == pydgemma.Model(single).hparams and "999" not in m.metadata.values()


def test_synthetic_models_split_too(tmp_path: Path) -> None:
    from pydgemma.models import synthetic

    whole = synthetic.write("tiny", "Q8_0", tmp_path / "whole.gguf", seed=1)
    split = synthetic.write("tiny", "Q8_0", tmp_path / "s.gguf", seed=1, split_max_size=50_000)
    assert len(split.parts) >= 3 and split.parts[0] == tmp_path / f"s-00001-of-{len(split.parts):05d}.gguf"
    assert tensors_of(split.parts) == tensors_of(whole.parts)
    assert split.n_bytes == sum(p.stat().st_size for p in split.parts)
