"""Hand-made hostile GGUF headers: counts and lengths near integer limits, bad tensor infos. Each is
refused with one line (DG_ERR_FORMAT), without a crash or a huge allocation."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import pydgemma
import tiny_gguf


def small(tmp_path: Path) -> bytes:
    cfg = tiny_gguf.tiny(n_vocab=16, n_embd=8, n_layer=2, n_head=2, n_head_kv_swa=1, n_head_kv_full=1, head_dim_swa=4,
                         head_dim=8, n_ff=8, n_ff_exp=4, n_expert=2, n_expert_used=1, sliding_window=4, canvas_length=4,
                         sliding_pattern=(True, False))
    return tiny_gguf.write_gguf(tmp_path / "small.gguf", cfg).read_bytes()


def layout(data: bytes) -> dict:
    """Byte offsets of the header fields and of each tensor info (a minimal GGUF v3 walker)."""
    pos = 8
    n_tensors, n_kv = struct.unpack_from("<QQ", data, pos)
    out = {"n_tensors": pos, "n_kv": pos + 8, "first_key_len": pos + 16, "tensors": []}
    pos += 16
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip_value(t: int) -> None:
        nonlocal pos
        if t == 8:
            (n,) = struct.unpack_from("<Q", data, pos)
            pos += 8 + n
        elif t == 9:
            sub, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(count):
                skip_value(sub)
        else:
            pos += sizes[t]

    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + klen
        (t,) = struct.unpack_from("<I", data, pos)
        pos += 4
        skip_value(t)
    for _ in range(n_tensors):
        info = {"name": pos}
        (nlen,) = struct.unpack_from("<Q", data, pos)
        info["name_text"] = data[pos + 8:pos + 8 + nlen].decode()
        pos += 8 + nlen
        info["n_dims"] = pos
        (nd,) = struct.unpack_from("<I", data, pos)
        pos += 4
        info["ne"] = pos
        pos += 8 * nd
        info["type"] = pos
        pos += 4
        info["offset"] = pos
        pos += 8
        out["tensors"].append(info)
    return out


def refused(tmp_path: Path, data: bytes, name: str) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(pydgemma.ModelError) as info:
        pydgemma.Model(path)
    assert info.value.status == "DG_ERR_FORMAT"
    assert "\n" not in str(info.value)
    return str(info.value)


def patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_the_valid_file_loads(tmp_path: Path) -> None:
    data = small(tmp_path)
    (tmp_path / "ok.gguf").write_bytes(data)
    assert len(pydgemma.Model(tmp_path / "ok.gguf").tensors) == len(layout(data)["tensors"])


@pytest.mark.parametrize("field", ["n_tensors", "n_kv"])
@pytest.mark.parametrize("value", [2**63 - 1, 2**64 - 1, 2**32])
def test_counts_near_integer_limits(tmp_path: Path, field: str, value: int) -> None:
    data = small(tmp_path)
    msg = refused(tmp_path, patched(data, layout(data)[field], "<Q", value), "counts.gguf")
    assert msg.startswith("invalid GGUF file")


@pytest.mark.parametrize("value", [2**63, 2**64 - 1, 2**40])
def test_string_length_near_integer_limits(tmp_path: Path, value: int) -> None:
    data = small(tmp_path)
    assert refused(tmp_path, patched(data, layout(data)["first_key_len"], "<Q", value), "strlen.gguf").startswith(
        "invalid GGUF file")


def test_tensor_info_attacks(tmp_path: Path) -> None:
    data = small(tmp_path)
    t0, t1 = layout(data)["tensors"][:2]
    assert "number of dimensions" in refused(tmp_path, patched(data, t0["n_dims"], "<I", 5), "ndims.gguf")
    assert "invalid ggml type" in refused(tmp_path, patched(data, t0["type"], "<I", 99), "type.gguf")
    assert "offset" in refused(tmp_path, patched(data, t1["offset"], "<Q", 2**63 + 32), "overflow.gguf")
    assert "offset" in refused(tmp_path, patched(data, t1["offset"], "<Q",
                                                 struct.unpack_from("<Q", data, t1["offset"])[0] + 1), "misaligned.gguf")
    assert "zero-sized dimension" in refused(tmp_path, patched(data, t0["ne"], "<Q", 0), "zero.gguf")
    huge = patched(data, t0["ne"], "<Q", 2**62)
    msg = refused(tmp_path, huge, "huge.gguf")
    assert msg.startswith("invalid GGUF file") or msg.startswith("file truncated")
    # a second tensor renamed to the first one's name
    name0, name1 = t0["name_text"], t1["name_text"]
    assert len(name0) == len(name1), (name0, name1)  # rope_freqs.weight, token_embd.weight: renamed in place
    dup = data[: t1["name"] + 8] + name0.encode() + data[t1["name"] + 8 + len(name1):]
    assert "duplicate tensor name" in refused(tmp_path, dup, "dup.gguf")


def test_metadata_array_of_the_wrong_type(tmp_path: Path, make_gguf) -> None:
    path = make_gguf(set_keys={"tokenizer.ggml.tokens": ("array", list(range(96)))})
    with pytest.raises(pydgemma.ModelError) as info:
        pydgemma.Model(path)
    assert str(info.value) == "key 'tokenizer.ggml.tokens' has type array of i32, expected an array of strings"
