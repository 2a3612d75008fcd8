"""Which type each tensor gets in each quantization mix (spec section 5), as tables.

Q4_K_M and Q5_K_M follow llama-quantize's generic policy for this architecture; k-quants need a row
length that is a multiple of 256 and fall back otherwise (FALLBACK). Router weights, norms, scales and
every 1-D tensor stay F32 in every mix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import gguf

Q = gguf.GGMLQuantizationType

# mix -> (general.file_type, the type of ordinary matrices)
MIXES: dict[str, tuple[int, Q]] = {
    "F32": (0, Q.F32),
    "F16": (1, Q.F16),
    "BF16": (32, Q.BF16),
    "Q8_0": (7, Q.Q8_0),
    "Q6_K": (18, Q.Q6_K),
    "Q5_K_M": (17, Q.Q5_K),
    "Q4_K_M": (15, Q.Q4_K),
    "NVFP4": (39, Q.NVFP4),
}

# The "more bits" tensors of the _M mixes: attn_v and ffn_down (dense and experts) get Q6_K where
# use_more_bits() holds, and the token embedding Q6_K.
MORE_BITS = {"Q4_K_M": Q.Q6_K, "Q5_K_M": Q.Q6_K}

# A type that cannot take this row length -> what llama-quantize uses instead.
FALLBACK: dict[Q, Q] = {
    Q.Q4_K: Q.Q5_0,
    Q.Q5_K: Q.Q5_1,
    Q.Q6_K: Q.Q8_0,
    Q.NVFP4: Q.Q8_0,
    Q.Q8_0: Q.F16,
    Q.Q5_0: Q.F16,
    Q.Q5_1: Q.F16,
}

ALWAYS_F32 = re.compile(r"(_norm\.weight|\.scale|ffn_gate_inp\.weight|layer_output_scale\.weight|rope_freqs\.weight)$")


def use_more_bits(i: int, n: int) -> bool:
    """llama-quantize's choice of layers that get more bits."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class Choice:
    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row length
    qtype: Q
    note: str = ""


def _fits(qtype: Q, row: int) -> bool:
    return row % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def choose(mix: str, tensors: Sequence[tuple[str, tuple[int, ...]]], overrides: Sequence[tuple[str, Q]] = ()) -> list[Choice]:
    """The type of every tensor (name, GGUF shape) for `mix`, then `overrides` (regex, type) in order."""
    if mix not in MIXES:
        raise ValueError(f"unknown type '{mix}' (choose from {', '.join(MIXES)})")
    base = MIXES[mix][1]
    more = MORE_BITS.get(mix)
    n_layer = 1 + max((int(m.group(1)) for n, _ in tensors if (m := re.match(r"blk\.(\d+)\.", n))), default=-1)
    v_names = [n for n, _ in tensors if n.endswith(".attn_v.weight")]
    out = []
    for name, shape in tensors:
        note = ""
        if len(shape) <= 1 or ALWAYS_F32.search(name):
            qtype = Q.F32
        else:
            qtype = base
            layer = re.match(r"blk\.(\d+)\.", name)
            if more is not None:
                if name in ("token_embd.weight", "output.weight"):
                    qtype = more
                elif name.endswith(".attn_v.weight") and use_more_bits(v_names.index(name), len(v_names)):
                    qtype = more
                elif name.endswith((".ffn_down.weight", ".ffn_down_exps.weight")) and layer and \
                        use_more_bits(int(layer.group(1)), n_layer):
                    qtype = more
        for pattern, forced in overrides:
            if qtype != Q.F32 and re.search(pattern, name):  # norms, scales and the router stay F32
                qtype, note = forced, f"--tensor-type {pattern}"
        if qtype != Q.F32:
            wanted = qtype
            while not _fits(qtype, shape[0]):
                qtype = FALLBACK.get(qtype, Q.F32)
            if qtype != wanted:
                note = f"{wanted.name} needs rows of {gguf.GGML_QUANT_SIZES[wanted][0]}, this one is {shape[0]}"
        out.append(Choice(name, tuple(shape), qtype, note))
    return out


def parse_override(spec: str) -> tuple[str, Q]:
    """'REGEX=TYPE' -> (regex, type)."""
    pattern, sep, type_name = spec.rpartition("=")
    if not sep or not pattern:
        raise ValueError(f"--tensor-type wants REGEX=TYPE, got '{spec}'")
    try:
        re.compile(pattern)
        return pattern, Q[type_name.upper()]
    except re.error as exc:
        raise ValueError(f"--tensor-type '{spec}': bad regular expression ({exc})") from exc
    except KeyError:
        raise ValueError(f"--tensor-type '{spec}': unknown type '{type_name}'") from None
