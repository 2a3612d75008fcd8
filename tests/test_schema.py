"""The layout's one source, pydgemma/gguf/diffusion_gemma_schema.json, against what reads it: the C++
tables generated from it (checked in), the native loader's checks, the converter and the tests' writer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import pydgemma
import tiny_gguf
from pydgemma.gguf.schema import CPP_TABLES, SCHEMA_FILE, emit_cpp, schema

ROOT = Path(__file__).resolve().parents[1]
S = schema()


def load_error(path: Path) -> pydgemma.ModelError:
    with pytest.raises(pydgemma.ModelError) as info:
        pydgemma.Model(path)
    return info.value


def test_generated_cpp_tables_are_the_checked_in_ones() -> None:
    checked_in = (ROOT / CPP_TABLES).read_text(encoding="utf-8")
    assert emit_cpp() == checked_in, (f"{CPP_TABLES} is stale: regenerate it with "
                                      f"`python -m pydgemma.gguf.schema --emit-cpp > {CPP_TABLES}`")


def test_the_generator_command_writes_the_tables() -> None:
    out = subprocess.run([sys.executable, "-m", "pydgemma.gguf.schema", "--emit-cpp"], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    assert out.stdout == emit_cpp()


def test_header_enums_are_the_schemas() -> None:
    header = (ROOT / "native/src/gguf_schema.h").read_text(encoding="utf-8")
    for enum, names in (("KeyType", S.key_types), ("Dim", tuple(S.dims)), ("Need", S.needs), ("Kind", S.kinds)):
        body = re.search(r"enum class %s : uint8_t \{(.*?)\};" % enum, header, re.S)
        assert body is not None, enum
        members = tuple(re.findall(r"^\s*([A-Z][A-Z0-9_]*),", body.group(1), re.M))
        assert members == names, enum
    assert f'kArchitecture = "{S.architecture}"' in header
    assert f'kTokenizerModel = "{S.tokenizer_model}"' in header


def test_the_schema_is_self_consistent() -> None:
    for k in S.keys:
        assert k.type in S.key_types and k.check in ("required", "optional", "none"), k
    assert len({k.name for k in S.keys}) == len(S.keys)
    for t in S.global_tensors + S.layer_tensors:
        assert t.per_layer == (t in S.layer_tensors), t.name
        assert 1 <= len(t.dims) <= 3 and all(d in S.dims and d != "NONE" for d in t.dims), t.name
        assert t.need in S.needs and t.kind in S.kinds, t.name
        assert t.kind != "VECTOR" or t.f32, t.name  # every vector is stored as F32
        assert (t.source is None) == (t.written in ("generated", "never")), t.name
        assert t.source is None or ("{i}" in t.source) == t.per_layer, t.name


def test_the_spec_is_in_the_repository() -> None:
    assert (ROOT / S.spec).is_file()
    assert "## 2. Tensors" in (ROOT / S.spec).read_text(encoding="utf-8")


def test_the_format_layer_imports_nothing_of_pydgemma() -> None:
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('alone', {str(SCHEMA_FILE.with_name('schema.py'))!r})\n"
            "m = sys.modules['alone'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "assert m.schema().architecture == 'diffusion-gemma' and m.emit_cpp()\n"
            "print(sorted(n for n in sys.modules if n.startswith('pydgemma') or n in ('numpy', 'gguf', 'cffi')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------
# The schema against the native loader.

CFG = tiny_gguf.Config()  # 6 layers: 0-4 sliding, 5 full


def test_a_file_written_from_the_schema_loads(tiny_model_path: Path) -> None:
    expected = S.tensors(tiny_gguf.layout(CFG))
    with pydgemma.Model(tiny_model_path, device="cpu") as m:
        assert [(n, t.shape) for n, t in m.tensors.items()] == [(t.name, t.ne) for t in expected]


@pytest.mark.parametrize("options", [dict(split_experts=True), dict(self_cond_norm="self_cond_norm"),
                                     dict(self_cond=False), dict(output_weight=True)])
def test_every_layout_the_schema_allows_loads(make_gguf, options: dict) -> None:
    with pydgemma.Model(make_gguf(**options), device="cpu") as m:
        assert len(m.tensors) == len(list(tiny_gguf.tensor_specs(CFG, **options)))


def test_each_keys_hparam_is_the_loaders(tiny_model_path: Path) -> None:
    written = tiny_gguf.hparams(CFG)
    with pydgemma.Model(tiny_model_path, device="cpu") as m:
        for k in S.keys:
            if k.hparam is not None:
                want = written[k.hparam]
                assert m.hparams[k.hparam] == (float(np.float32(want)) if isinstance(want, float) else want), k.name


@pytest.mark.parametrize("key", [k.name for k in S.required_keys])
def test_each_required_key_is_required(make_gguf, key: str) -> None:
    assert str(load_error(make_gguf(drop_keys=(key,)))) == f"missing required key '{key}'"


@pytest.mark.parametrize("key", [k.name for k in S.optional_keys])
def test_each_optional_key_is_optional_and_type_checked(make_gguf, key: str) -> None:
    written = {k for k, _, _ in tiny_gguf.metadata(CFG)}
    if key in written:
        pydgemma.Model(make_gguf(drop_keys=(key,)), device="cpu").close()
    wrong = ("uint32", 7) if S.key(key).type == "STRING" else ("string", "wrong")
    err = load_error(make_gguf(set_keys={key: wrong}))
    assert str(err).startswith(f"key '{key}' has type "), str(err)


def _required_tensors() -> list[str]:
    names = [t.name for t in S.tensors(tiny_gguf.layout(CFG)) if t.layer in (None, 0, 5)]
    return [n for n in names if S.tensor(re.sub(r"^blk\.\d+\.", "blk.{i}.", n)).need == "REQUIRED"]


@pytest.mark.parametrize("name", _required_tensors())
def test_each_required_tensor_is_required(make_gguf, name: str) -> None:
    assert str(load_error(make_gguf(drop_tensors=(name,)))) == f"missing tensor '{name}'"


@pytest.mark.parametrize("tensor", [t for t in S.tensors(tiny_gguf.layout(CFG)) if t.layer in (None, 0, 5)],
                         ids=lambda t: t.name)
def test_each_tensor_has_the_schemas_shape(make_gguf, tensor) -> None:
    """The loader resolves every symbolic dim (on a sliding and a full layer) as the schema does."""
    wrong = (tensor.shape[0] + 1,) + tensor.shape[1:]
    err = load_error(make_gguf(reshape={tensor.name: wrong}))
    expected = "[" + ", ".join(map(str, tensor.ne)) + "]"
    assert str(err).endswith(f"expected {expected}"), str(err)
    assert str(err).startswith(f"tensor '{tensor.name}' has shape "), str(err)


# ------------------------------------------------------------------------------------------------
# The schema against the converter.

def test_the_converter_writes_the_schemas_tensors(hf_tiny: Path, converted: dict[str, Path]) -> None:
    from pydgemma.quantize.checkpoint import Checkpoint
    from pydgemma.quantize.hf_config import read_arch
    from pydgemma.quantize.tensor_map import layout

    expected = S.tensors(layout(read_arch(Checkpoint(hf_tiny))))
    for path in converted.values():
        reader = gguf.GGUFReader(path)
        assert [(t.name, tuple(int(n) for n in t.shape)) for t in reader.tensors] == [(t.name, t.ne) for t in expected]
        f32 = {t.name for t in expected if t.spec.f32}
        for t in reader.tensors:
            if t.name in f32:
                assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name


def test_the_converter_writes_the_schemas_keys_and_types(converted: dict[str, Path]) -> None:
    reader = gguf.GGUFReader(converted["f32"])
    written = {name: field for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert {k.name for k in S.required_keys} <= set(written)
    for name, field in written.items():
        assert field.types[0] == gguf.GGUFValueType[S.key(name).written_as], name
    order = [S.keys.index(S.key(name)) for name in written]
    assert order == sorted(order), "the converter writes the keys in the schema's order"
