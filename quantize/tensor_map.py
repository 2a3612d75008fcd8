"""Hugging Face tensor names -> GGUF tensor names, expected shapes and output types (spec section 2).

Only `model.decoder.*` backbone tensors are written: the encoder's backbone is tied to the decoder's,
and contributes just its per-layer `layer_scalar` (as `enc_layer_output_scale`). Vision tensors are
skipped. Shapes are in torch order ([out, in]); GGUF stores the same bytes with the dims reversed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import gguf

from .hf_config import ArchParams

Q = gguf.GGMLQuantizationType

DECODER = "model.decoder."
ENCODER_TEXT = "model.encoder.language_model."
SKIPPED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.", "model.vision_tower.",
                    "model.embed_vision.")

Shape = Callable[[ArchParams, int], tuple[int, ...]]


def _hd(a: ArchParams, il: int) -> int:
    return a.head_dim_swa if a.sliding[il] else a.head_dim_full


def _kv(a: ArchParams, il: int) -> int:
    return a.n_kv_per_layer[il] * _hd(a, il)


E: Shape = lambda a, il: (a.hidden_size,)  # noqa: E731  (a norm or scale over the hidden size)

# (HF name after "model.decoder.layers.{i}.", GGUF name after "blk.{i}.", torch shape)
LAYER_TENSORS: list[tuple[str, str, Shape]] = [
    ("input_layernorm.weight",              "attn_norm.weight",           E),
    ("self_attn.q_proj.weight",             "attn_q.weight",              lambda a, il: (a.n_head * _hd(a, il), a.hidden_size)),
    ("self_attn.k_proj.weight",             "attn_k.weight",              lambda a, il: (_kv(a, il), a.hidden_size)),
    ("self_attn.v_proj.weight",             "attn_v.weight",              lambda a, il: (_kv(a, il), a.hidden_size)),
    ("self_attn.o_proj.weight",             "attn_output.weight",         lambda a, il: (a.hidden_size, a.n_head * _hd(a, il))),
    ("self_attn.q_norm.weight",             "attn_q_norm.weight",         lambda a, il: (_hd(a, il),)),
    ("self_attn.k_norm.weight",             "attn_k_norm.weight",         lambda a, il: (_hd(a, il),)),
    ("post_attention_layernorm.weight",     "post_attention_norm.weight", E),
    ("pre_feedforward_layernorm.weight",    "ffn_norm.weight",            E),
    ("mlp.gate_proj.weight",                "ffn_gate.weight",            lambda a, il: (a.intermediate_size, a.hidden_size)),
    ("mlp.up_proj.weight",                  "ffn_up.weight",              lambda a, il: (a.intermediate_size, a.hidden_size)),
    ("mlp.down_proj.weight",                "ffn_down.weight",            lambda a, il: (a.hidden_size, a.intermediate_size)),
    ("post_feedforward_layernorm_1.weight", "post_ffw_norm_1.weight",     E),
    ("pre_feedforward_layernorm_2.weight",  "pre_ffw_norm_2.weight",      E),
    ("post_feedforward_layernorm_2.weight", "post_ffw_norm_2.weight",     E),
    ("post_feedforward_layernorm.weight",   "post_ffw_norm.weight",       E),
    ("router.proj.weight",                  "ffn_gate_inp.weight",        lambda a, il: (a.n_expert, a.hidden_size)),
    ("router.scale",                        "ffn_gate_inp.scale",         E),
    ("experts.gate_up_proj",                "ffn_gate_up_exps.weight",    lambda a, il: (a.n_expert, 2 * a.moe_intermediate_size, a.hidden_size)),
    ("experts.down_proj",                   "ffn_down_exps.weight",       lambda a, il: (a.n_expert, a.hidden_size, a.moe_intermediate_size)),
    ("router.per_expert_scale",             "ffn_down_exps.scale",        lambda a, il: (a.n_expert,)),
    ("layer_scalar",                        "layer_output_scale.weight",  lambda a, il: (1,)),
]

GLOBAL_TENSORS: list[tuple[str, str, Shape]] = [
    ("embed_tokens.weight",                  "token_embd.weight",         lambda a, il: (a.vocab_size, a.hidden_size)),
    ("norm.weight",                          "output_norm.weight",        E),
    ("self_conditioning.pre_norm.weight",    "self_cond_pre_norm.weight", E),
    ("self_conditioning.gate_proj.weight",   "self_cond_gate.weight",     lambda a, il: (a.intermediate_size, a.hidden_size)),
    ("self_conditioning.up_proj.weight",     "self_cond_up.weight",       lambda a, il: (a.intermediate_size, a.hidden_size)),
    ("self_conditioning.down_proj.weight",   "self_cond_down.weight",     lambda a, il: (a.hidden_size, a.intermediate_size)),
]

# The encoder's own per-layer scalar; everything else of the encoder's text model is tied.
ENCODER_SCALAR = re.compile(r"model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar$")


@dataclass(frozen=True)
class Mapping:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]  # torch order, as the config implies it


def expected_tensors(a: ArchParams) -> list[Mapping]:
    """Every checkpoint tensor the converter writes, in output order (rope_freqs is generated)."""
    out = [Mapping(DECODER + hf, gg, shape(a, 0)) for hf, gg, shape in GLOBAL_TENSORS]
    for il in range(a.n_layer):
        for hf, gg, shape in LAYER_TENSORS:
            if hf == "self_attn.v_proj.weight" and not a.sliding[il]:
                continue  # full-attention layers take V from the raw K projection
            out.append(Mapping(f"{DECODER}layers.{il}.{hf}", f"blk.{il}.{gg}", shape(a, il)))
        out.append(Mapping(f"{ENCODER_TEXT}layers.{il}.layer_scalar", f"blk.{il}.enc_layer_output_scale.weight", (1,)))
    return out


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
