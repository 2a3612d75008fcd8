"""Hugging Face tensor names -> GGUF tensor names, expected shapes and output types (spec section 2), from
the layout's schema (pydgemma/gguf/diffusion_gemma_schema.json: names, sources, symbolic shapes).

Only `model.decoder.*` backbone tensors are written: the encoder's backbone is tied to the decoder's,
and contributes just its per-layer `layer_scalar` (as `enc_layer_output_scale`). Vision tensors are
skipped. Shapes are in torch order ([out, in]); GGUF stores the same bytes with the dims reversed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf

from pydgemma.gguf.schema import Layout, schema

from .hf_config import ArchParams

Q = gguf.GGMLQuantizationType

DECODER = "model.decoder."
ENCODER_TEXT = "model.encoder.language_model."
SKIPPED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.", "model.vision_tower.",
                    "model.embed_vision.")


def layout(a: ArchParams) -> Layout:
    """The hyper-parameters the schema's symbolic shapes resolve against."""
    return Layout(n_embd=a.hidden_size, n_vocab=a.vocab_size, n_ff=a.intermediate_size,
                  n_ff_exp=a.moe_intermediate_size, n_expert=a.n_expert, n_head=a.n_head, n_rot=a.head_dim_full,
                  head_dim=tuple(a.head_dim_swa if s else a.head_dim_full for s in a.sliding),
                  n_head_kv=tuple(a.n_kv_per_layer), sliding=tuple(a.sliding))


# The encoder's own per-layer scalar; everything else of the encoder's text model is tied.
ENCODER_SCALAR = re.compile(r"model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar$")


@dataclass(frozen=True)
class Mapping:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]  # torch order, as the config implies it


def expected_tensors(a: ArchParams) -> list[Mapping]:
    """Every checkpoint tensor the converter writes, in output order (rope_freqs is generated, an untied
    output head is added by the converter): the schema's tensors that have a Hugging Face source."""
    return [Mapping(t.source, t.name, t.shape) for t in schema().tensors(layout(a)) if t.source is not None]


OUT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {Q.F32: 0, Q.F16: 1, Q.BF16: 32, Q.Q8_0: 7}  # general.file_type (llama_ftype)


def output_type(gguf_name: str, shape: tuple[int, ...], requested: Q) -> Q:
    """The dtype policy of spec section 2: norms, scales, the router and every 1-D tensor stay F32;
    a Q8_0 request falls back to F16 where the row length is not a multiple of 32."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return Q.F32
    if gguf_name.endswith("ffn_gate_inp.weight"):
        return Q.F32
    if requested == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
        return Q.F16
    return requested


def n_bytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    count = 1
    for d in shape:
        count *= d
    return count // block * size
