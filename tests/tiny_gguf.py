"""Writes diffusion-gemma GGUF files for tests with the `gguf` package, independently of our core.

The layout follows shared/spec/gguf-diffusion-gemma.md sections 1-2 as written there (the spec is
the oracle here, not our C++ tables). `write_gguf` can drop or change any key or tensor so that the
loader's negative paths can be exercised one by one, and can write a header-only sparse file with
the real 26B-A4B shapes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np

ARCH = "diffusion-gemma"


@dataclass(frozen=True)
class Config:
    n_vocab: int = 96
    n_embd: int = 32
    n_layer: int = 6
    n_head: int = 4
    n_head_kv_swa: int = 2
    n_head_kv_full: int = 1
    head_dim_swa: int = 8
    head_dim: int = 16
    n_ff: int = 48
    n_ff_exp: int = 16
    n_expert: int = 4
    n_expert_used: int = 2
    sliding_window: int = 8
    context_length: int = 512
    canvas_length: int = 16
    partial_rotary_factor: float = 0.25
    rope_theta: float = 1e6
    rope_theta_swa: float = 1e4
    rms_eps: float = 1e-6
    softcap: float = 30.0
    sliding_pattern: tuple[bool, ...] = field(default=())  # default: 5 sliding then 1 full, repeated

    def pattern(self) -> tuple[bool, ...]:
        if self.sliding_pattern:
            return self.sliding_pattern
        return tuple((il % 6) != 5 for il in range(self.n_layer))


# The DiffusionGemma 26B-A4B sizes (spec section 0).
REAL_26B = Config(
    n_vocab=262144, n_embd=2816, n_layer=30, n_head=16, n_head_kv_swa=8, n_head_kv_full=2,
    head_dim_swa=256, head_dim=512, n_ff=2112, n_ff_exp=704, n_expert=128, n_expert_used=8,
    sliding_window=1024, context_length=262144, canvas_length=256,
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy / torch order (the reverse of GGUF ne)
    vector: bool  # norms, scales, frequencies: F32


def tensor_specs(cfg: Config, *, self_cond: bool = True, self_cond_norm: str = "self_cond_pre_norm",
                 split_experts: bool = False, output_weight: bool = False) -> Iterator[TensorSpec]:
    """Every tensor of the layout, in the converter's order (rope_freqs first)."""
    E, V, F, X, N = cfg.n_embd, cfg.n_vocab, cfg.n_ff, cfg.n_ff_exp, cfg.n_expert
    yield TensorSpec("rope_freqs.weight", (cfg.head_dim // 2,), True)
    yield TensorSpec("token_embd.weight", (V, E), False)
    if output_weight:
        yield TensorSpec("output.weight", (V, E), False)
    yield TensorSpec("output_norm.weight", (E,), True)
    if self_cond:
        yield TensorSpec(f"{self_cond_norm}.weight", (E,), True)
        yield TensorSpec("self_cond_gate.weight", (F, E), False)
        yield TensorSpec("self_cond_up.weight", (F, E), False)
        yield TensorSpec("self_cond_down.weight", (E, F), False)
    for il, sliding in enumerate(cfg.pattern()):
        hd = cfg.head_dim_swa if sliding else cfg.head_dim
        kv = cfg.n_head_kv_swa if sliding else cfg.n_head_kv_full
        p = f"blk.{il}."
        yield TensorSpec(p + "attn_norm.weight", (E,), True)
        yield TensorSpec(p + "attn_q.weight", (cfg.n_head * hd, E), False)
        yield TensorSpec(p + "attn_k.weight", (kv * hd, E), False)
        if sliding:
            yield TensorSpec(p + "attn_v.weight", (kv * hd, E), False)
        yield TensorSpec(p + "attn_output.weight", (E, cfg.n_head * hd), False)
        yield TensorSpec(p + "attn_q_norm.weight", (hd,), True)
        yield TensorSpec(p + "attn_k_norm.weight", (hd,), True)
        yield TensorSpec(p + "post_attention_norm.weight", (E,), True)
        yield TensorSpec(p + "ffn_norm.weight", (E,), True)
        yield TensorSpec(p + "ffn_gate.weight", (F, E), False)
        yield TensorSpec(p + "ffn_up.weight", (F, E), False)
        yield TensorSpec(p + "ffn_down.weight", (E, F), False)
        yield TensorSpec(p + "post_ffw_norm_1.weight", (E,), True)
        yield TensorSpec(p + "pre_ffw_norm_2.weight", (E,), True)
        yield TensorSpec(p + "post_ffw_norm_2.weight", (E,), True)
        yield TensorSpec(p + "post_ffw_norm.weight", (E,), True)
        yield TensorSpec(p + "ffn_gate_inp.weight", (N, E), True)  # router: F32 (a matrix)
        yield TensorSpec(p + "ffn_gate_inp.scale", (E,), True)
        if split_experts:
            yield TensorSpec(p + "ffn_gate_exps.weight", (N, X, E), False)
            yield TensorSpec(p + "ffn_up_exps.weight", (N, X, E), False)
        else:
            yield TensorSpec(p + "ffn_gate_up_exps.weight", (N, 2 * X, E), False)
        yield TensorSpec(p + "ffn_down_exps.weight", (N, E, X), False)
        yield TensorSpec(p + "ffn_down_exps.scale", (N,), True)
        yield TensorSpec(p + "layer_output_scale.weight", (1,), True)
        yield TensorSpec(p + "enc_layer_output_scale.weight", (1,), True)


def rope_freqs(cfg: Config) -> np.ndarray:
    rotated = int(cfg.head_dim * cfg.partial_rotary_factor / 2)
    out = np.full(cfg.head_dim // 2, 1e30, dtype=np.float32)
    out[:rotated] = 1.0
    return out


def vocab(cfg: Config) -> list[str]:
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>"]
    pieces = [f"<0x{i:02X}>" for i in range(min(256, max(0, cfg.n_vocab - len(special))))]
    tokens = (special + pieces)[: cfg.n_vocab]
    tokens += [f"tok{i}" for i in range(len(tokens), cfg.n_vocab)]
    return tokens


def metadata(cfg: Config) -> list[tuple[str, str, Any]]:
    """(key, gguf writer method, value) in the order the converter writes them."""
    A = ARCH
    tokens = vocab(cfg)
    kv = [cfg.n_head_kv_swa if s else cfg.n_head_kv_full for s in cfg.pattern()]
    return [
        ("general.type", "string", "model"),
        ("general.name", "string", "tiny-diffusion-gemma"),
        (f"{A}.context_length", "uint32", cfg.context_length),
        (f"{A}.embedding_length", "uint32", cfg.n_embd),
        (f"{A}.block_count", "uint32", cfg.n_layer),
        (f"{A}.feed_forward_length", "uint32", cfg.n_ff),
        (f"{A}.expert_feed_forward_length", "uint32", cfg.n_ff_exp),
        (f"{A}.expert_count", "uint32", cfg.n_expert),
        (f"{A}.expert_used_count", "uint32", cfg.n_expert_used),
        (f"{A}.attention.head_count", "uint32", cfg.n_head),
        (f"{A}.attention.head_count_kv", "array", kv),
        (f"{A}.attention.key_length", "uint32", cfg.head_dim),
        (f"{A}.attention.value_length", "uint32", cfg.head_dim),
        (f"{A}.attention.key_length_swa", "uint32", cfg.head_dim_swa),
        (f"{A}.attention.value_length_swa", "uint32", cfg.head_dim_swa),
        (f"{A}.attention.layer_norm_rms_epsilon", "float32", cfg.rms_eps),
        (f"{A}.attention.sliding_window", "uint32", cfg.sliding_window),
        (f"{A}.attention.sliding_window_pattern", "array", list(cfg.pattern())),
        (f"{A}.attention.causal", "bool", False),
        (f"{A}.rope.freq_base", "float32", cfg.rope_theta),
        (f"{A}.rope.freq_base_swa", "float32", cfg.rope_theta_swa),
        (f"{A}.rope.dimension_count", "uint32", cfg.head_dim),
        (f"{A}.rope.dimension_count_swa", "uint32", cfg.head_dim_swa),
        (f"{A}.final_logit_softcapping", "float32", cfg.softcap),
        ("diffusion.canvas_length", "uint32", cfg.canvas_length),
        ("diffusion.eb_max_steps", "uint32", 48),
        ("diffusion.eb_t_min", "float32", 0.4),
        ("diffusion.eb_t_max", "float32", 0.8),
        ("tokenizer.ggml.model", "string", "gemma4"),
        ("tokenizer.ggml.tokens", "array", tokens),
        ("tokenizer.ggml.scores", "array", [-1000.0] * len(tokens)),
        ("tokenizer.ggml.token_type", "array", [3 if t.startswith("<") and not t.startswith("<0x") else 1 for t in tokens]),
        ("tokenizer.ggml.merges", "array", ["t o", "to k"]),
        ("tokenizer.ggml.bos_token_id", "uint32", 2),
        ("tokenizer.ggml.eos_token_id", "uint32", 1),
        ("tokenizer.ggml.padding_token_id", "uint32", 0),
        ("tokenizer.ggml.mask_token_id", "uint32", 4),
        ("tokenizer.ggml.add_bos_token", "bool", True),
    ]


def write_gguf(
    path: str | os.PathLike[str],
    cfg: Config = Config(),
    *,
    arch: str = ARCH,
    drop_keys: tuple[str, ...] = (),
    set_keys: dict[str, tuple[str, Any]] | None = None,
    drop_tensors: tuple[str, ...] = (),
    reshape: dict[str, tuple[int, ...]] | None = None,
    tensor_types: dict[str, gguf.GGMLQuantizationType] | None = None,
    header_only: bool = False,
    alignment: int | None = None,
    seed: int = 0,
    **layout: Any,
) -> Path:
    """Writes a diffusion-gemma GGUF. Matrices are F16 and vectors F32 unless `tensor_types` says
    otherwise (any type gguf-py can quantize). `header_only` writes metadata and tensor infos and extends the
    file to its full size without data (a sparse file), for real-size layouts."""
    path = Path(path)
    set_keys = set_keys or {}
    reshape = reshape or {}
    tensor_types = tensor_types or {}
    w = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    written = set()
    for key, kind, value in metadata(cfg):
        if key in set_keys:
            kind, value = set_keys[key]
        getattr(w, f"add_{kind}")(key, value)
        written.add(key)
    for key, (kind, value) in set_keys.items():
        if key not in written:
            getattr(w, f"add_{kind}")(key, value)
    for key in drop_keys:
        w.kv_data[0].pop(key)

    rng = np.random.default_rng(seed)
    specs = [s for s in tensor_specs(cfg, **layout) if s.name not in drop_tensors]
    for spec in specs:
        shape = reshape.get(spec.name, spec.shape)
        qtype = tensor_types.get(spec.name, gguf.GGMLQuantizationType.F32 if spec.vector else gguf.GGMLQuantizationType.F16)
        if header_only:
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n_bytes = math.prod(shape) // block * type_size
            w.add_tensor_info(spec.name, shape, np.dtype(np.float32), n_bytes, raw_dtype=qtype)
            continue
        if spec.name == "rope_freqs.weight" and shape == spec.shape:
            data = rope_freqs(cfg)
        else:
            data = rng.standard_normal(shape).astype(np.float32) * 0.1
        if qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(spec.name, data.astype(np.float16))
        elif qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(spec.name, data.astype(np.float32))
        else:  # BF16 and the quantized types, through gguf-py's reference quantizers
            w.add_tensor(spec.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    if header_only:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None
        end = w.fout[0].tell()
        total = sum(w.ggml_pad(ti.nbytes, w.data_alignment) for ti in w.tensors[0].values())
        w.close()
        os.truncate(path, w.ggml_pad(end, w.data_alignment) + total)
        return path

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny(**changes: Any) -> Config:
    return replace(Config(), **changes)
