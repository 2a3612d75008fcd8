"""The diffusion-gemma GGUF layout (`diffusion_gemma_schema.json`, spec: docs/spec/gguf-diffusion-gemma.md
sections 1-2) as frozen dataclasses, its expansion for given hyper-parameters, and the C++ tables the
native loader validates files with, generated from it:

    python -m pydgemma.gguf.schema --emit-cpp > native/src/gguf_schema_tables.inc

tests/test_schema.py regenerates that file and fails on any difference.
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

SCHEMA_FILE = Path(__file__).with_name("diffusion_gemma_schema.json")
CPP_TABLES = "native/src/gguf_schema_tables.inc"  # relative to the repository root
LAYER_PREFIX = "blk.{i}."


@dataclass(frozen=True)
class KeySpec:
    name: str
    type: str  # a KeyType of gguf_schema.h: UINT, FLOAT, BOOL, STRING, UINT_OR_ARRAY, ..._ARRAY
    check: str  # required (the loader refuses a file without it), optional (type-checked when present), none
    written_as: str  # the GGUF value type writers give it (a gguf.GGUFValueType name: UINT32, ARRAY, ...)
    hparam: str | None = None  # the loader's hyper-parameter (dg_hparams field) it sets

    @property
    def required(self) -> bool:
        return self.check == "required"


@dataclass(frozen=True)
class Dim:
    """A symbolic tensor dimension: the product of `product` (hyper-parameter names and integers),
    divided by `divisor`."""

    name: str
    product: tuple[Union[int, str], ...]
    divisor: int = 1

    def resolve(self, values: Mapping[str, int]) -> int:
        n = 1
        for factor in self.product:
            n *= factor if isinstance(factor, int) else values[factor]
        return n // self.divisor


@dataclass(frozen=True)
class TensorSpec:
    name: str  # the GGUF name; a per-layer one starts with "blk.{i}."
    dims: tuple[str, ...]  # symbolic (Dim names), in GGUF ne order: the reverse of the torch shape
    need: str  # REQUIRED, OPTIONAL, SELF_COND, SELF_COND_NORM, EXPERTS_FUSED, EXPERTS_SPLIT
    kind: str  # MATRIX (any type) or VECTOR (a float type)
    f32: bool  # the converter always stores it as F32
    source: str | None  # the Hugging Face tensor it comes from ("{i}": the layer), None when none
    written: str  # always, generated, sliding_layers, untied_output, never

    @property
    def per_layer(self) -> bool:
        return self.name.startswith(LAYER_PREFIX)

    @property
    def short_name(self) -> str:
        """The name without the "blk.{i}." of a per-layer tensor (as the C++ table has it)."""
        return self.name[len(LAYER_PREFIX):] if self.per_layer else self.name


@dataclass(frozen=True)
class Layout:
    """The hyper-parameters the symbolic dims resolve against (the names of the loader's dg_hparams);
    head_dim, n_head_kv and sliding have one entry per layer."""

    n_embd: int
    n_vocab: int
    n_ff: int
    n_ff_exp: int
    n_expert: int
    n_head: int
    n_rot: int  # rope.dimension_count: the full-attention head_dim
    head_dim: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    sliding: tuple[bool, ...]

    @property
    def n_layer(self) -> int:
        return len(self.sliding)

    def values(self, il: int | None) -> dict[str, int]:
        out = {"n_embd": self.n_embd, "n_vocab": self.n_vocab, "n_ff": self.n_ff, "n_ff_exp": self.n_ff_exp,
               "n_expert": self.n_expert, "n_head": self.n_head, "n_rot": self.n_rot}
        if il is not None:
            out["head_dim"] = self.head_dim[il]
            out["n_head_kv"] = self.n_head_kv[il]
        return out


@dataclass(frozen=True)
class Tensor:
    """One tensor of a file: a spec expanded for a layout (and a layer)."""

    spec: TensorSpec
    name: str
    ne: tuple[int, ...]  # GGUF order
    layer: int | None
    source: str | None

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy / torch order (the reverse of ne)."""
        return tuple(reversed(self.ne))


@dataclass(frozen=True)
class Schema:
    spec: str
    architecture: str
    tokenizer_model: str
    key_types: tuple[str, ...]  # in the order of gguf_schema.h's enums
    dims: Mapping[str, Dim]
    needs: tuple[str, ...]
    kinds: tuple[str, ...]
    keys: tuple[KeySpec, ...]  # in the order the converter writes them
    global_tensors: tuple[TensorSpec, ...]
    layer_tensors: tuple[TensorSpec, ...]

    @property
    def required_keys(self) -> tuple[KeySpec, ...]:
        return tuple(k for k in self.keys if k.check == "required")

    @property
    def optional_keys(self) -> tuple[KeySpec, ...]:
        return tuple(k for k in self.keys if k.check == "optional")

    def key(self, name: str) -> KeySpec:
        for k in self.keys:
            if k.name == name:
                return k
        raise KeyError(f"'{name}' is not a metadata key of the {self.architecture} layout")

    def tensor(self, name: str) -> TensorSpec:
        for t in self.global_tensors + self.layer_tensors:
            if t.name == name:
                return t
        raise KeyError(f"'{name}' is not a tensor of the {self.architecture} layout")

    def ne(self, spec: TensorSpec, layout: Layout, il: int | None = None) -> tuple[int, ...]:
        values = layout.values(il)
        return tuple(self.dims[d].resolve(values) for d in spec.dims)

    def tensors(self, layout: Layout, *, output_weight: bool = False, self_cond: bool = True,
                self_cond_norm: str = "self_cond_pre_norm.weight", split_experts: bool = False) -> list[Tensor]:
        """The tensors a writer writes for `layout`, in file order: generated ones (rope_freqs) first, as
        llama.cpp's converter emits them, then the table's order, layer by layer. The options pick what the
        layout leaves open: an untied output head, self-conditioning (and which of its norm names), fused
        or split experts."""

        def wanted(t: TensorSpec, il: int | None) -> bool:
            if t.need in ("SELF_COND", "SELF_COND_NORM") and not self_cond:
                return False
            if t.need == "SELF_COND_NORM":
                return t.name == self_cond_norm
            if t.need == "EXPERTS_FUSED":
                return not split_experts
            if t.need == "EXPERTS_SPLIT":
                return split_experts
            if t.written == "untied_output":
                return output_weight
            if t.written == "sliding_layers":
                return il is not None and layout.sliding[il]
            return t.written != "never"

        def expand(t: TensorSpec, il: int | None) -> Tensor:
            name = t.name if il is None else t.name.replace("{i}", str(il))
            source = t.source if il is None or t.source is None else t.source.replace("{i}", str(il))
            return Tensor(t, name, self.ne(t, layout, il), il, source)

        out = [expand(t, None) for t in self.global_tensors if wanted(t, None)]
        for il in range(layout.n_layer):
            out += [expand(t, il) for t in self.layer_tensors if wanted(t, il)]
        return [t for t in out if t.spec.written == "generated"] + [t for t in out if t.spec.written != "generated"]


def _names(entries: Sequence[Mapping]) -> tuple[str, ...]:
    return tuple(e["name"] for e in entries)


def _tensor(e: Mapping) -> TensorSpec:
    return TensorSpec(e["name"], tuple(e["dims"]), e["need"], e["kind"], bool(e["f32"]), e["source"], e["written"])


@functools.cache
def schema() -> Schema:
    """The layout, read once from diffusion_gemma_schema.json."""
    raw = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    written_as = {t["name"]: t["written_as"] for t in raw["key_types"]}
    return Schema(
        spec=raw["spec"],
        architecture=raw["architecture"],
        tokenizer_model=raw["tokenizer_model"],
        key_types=_names(raw["key_types"]),
        dims={d["name"]: Dim(d["name"], tuple(d["product"]), int(d.get("divisor", 1))) for d in raw["dims"]},
        needs=_names(raw["needs"]),
        kinds=_names(raw["kinds"]),
        keys=tuple(KeySpec(k["name"], k["type"], k["check"], written_as[k["type"]], k.get("hparam"))
                   for k in raw["keys"]),
        global_tensors=tuple(_tensor(t) for t in raw["global_tensors"]),
        layer_tensors=tuple(_tensor(t) for t in raw["layer_tensors"]),
    )


# ------------------------------------------------------------------------------------------------
# The C++ tables.

def _cpp_string(s: str) -> str:
    return json.dumps(s)  # the names are plain ASCII: a JSON string is a C++ string literal


def emit_cpp(s: Schema | None = None) -> str:
    """native/src/gguf_schema_tables.inc: the tables gguf_schema.h declares, included by gguf_schema.cpp
    inside namespace dg::schema, and static_asserts that the header's enums are the schema's."""
    s = s or schema()
    lines = [
        "// Generated from pydgemma/gguf/diffusion_gemma_schema.json by",
        "// `python -m pydgemma.gguf.schema --emit-cpp`. Do not edit: tests/test_schema.py fails on any difference.",
        f"// Spec: {s.spec} sections 1 and 2.",
        "",
        f"static_assert(std::string_view(kArchitecture) == {_cpp_string(s.architecture)});",
        f"static_assert(std::string_view(kTokenizerModel) == {_cpp_string(s.tokenizer_model)});",
    ]
    for enum, names in (("KeyType", s.key_types), ("Dim", tuple(s.dims)), ("Need", s.needs), ("Kind", s.kinds)):
        for index, name in enumerate(names):
            lines.append(f"static_assert(static_cast<int>({enum}::{name}) == {index});")

    def key_table(table: str, count: str, keys: Sequence[KeySpec]) -> None:
        width = max(len(_cpp_string(k.name)) for k in keys) + 2
        lines.extend(["", f"const KeySpec {table}[] = {{"])
        lines.extend([f"    {{{(_cpp_string(k.name) + ',').ljust(width)} KeyType::{k.type}}}," for k in keys])
        lines.extend(["};", f"const size_t {count} = sizeof({table}) / sizeof({table}[0]);"])

    def tensor_table(table: str, count: str, tensors: Sequence[TensorSpec]) -> None:
        rows = []
        for t in tensors:
            dims = list(t.dims) + ["NONE"] * (3 - len(t.dims))
            rows.append((_cpp_string(t.short_name) + ",", "{" + ", ".join(f"Dim::{d}" for d in dims) + "},",
                         f"Need::{t.need},", f"Kind::{t.kind}"))
        widths = [max(len(r[c]) for r in rows) + 1 for c in range(3)]
        lines.extend(["", f"const TensorSpec {table}[] = {{"])
        lines.extend("    {" + "".join(r[c].ljust(widths[c]) for c in range(3)) + r[3] + "}," for r in rows)
        lines.extend(["};", f"const size_t {count} = sizeof({table}) / sizeof({table}[0]);"])

    key_table("kRequiredKeys", "kNumRequiredKeys", s.required_keys)
    key_table("kOptionalKeys", "kNumOptionalKeys", s.optional_keys)
    tensor_table("kGlobalTensors", "kNumGlobalTensors", s.global_tensors)
    tensor_table("kLayerTensors", "kNumLayerTensors", s.layer_tensors)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["--emit-cpp"]:
        sys.stderr.write("usage: python -m pydgemma.gguf.schema --emit-cpp > " + CPP_TABLES + "\n")
        return 2
    sys.stdout.write(emit_cpp())
    return 0


if __name__ == "__main__":
    sys.exit(main())
