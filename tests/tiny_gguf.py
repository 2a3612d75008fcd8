"""Writes diffusion-gemma GGUF files for tests with the `gguf` package, independently of our core.

The layout is docs/spec/gguf-diffusion-gemma.md sections 1-2 as
pydgemma/gguf/diffusion_gemma_schema.json holds it (the one source the loader's C++ tables are
generated from): tensor names, shapes, the metadata keys, their order and GGUF types come from there,
the values from a `Config`. `write_gguf` can drop or change any key or tensor so that the
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

from pydgemma.gguf.schema import Layout, schema

ARCH = schema().architecture


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
    vector: bool  # stored as F32: norms, scales, frequencies and the router (the schema's f32)


def layout(cfg: Config) -> Layout:
    pattern = cfg.pattern()
    return Layout(n_embd=cfg.n_embd, n_vocab=cfg.n_vocab, n_ff=cfg.n_ff, n_ff_exp=cfg.n_ff_exp, n_expert=cfg.n_expert,
                  n_head=cfg.n_head, n_rot=cfg.head_dim,
                  head_dim=tuple(cfg.head_dim_swa if s else cfg.head_dim for s in pattern),
                  n_head_kv=tuple(cfg.n_head_kv_swa if s else cfg.n_head_kv_full for s in pattern), sliding=pattern)


def tensor_specs(cfg: Config, *, self_cond: bool = True, self_cond_norm: str = "self_cond_pre_norm",
                 split_experts: bool = False, output_weight: bool = False) -> Iterator[TensorSpec]:
    """Every tensor of the layout, in the converter's order (rope_freqs first)."""
    for t in schema().tensors(layout(cfg), output_weight=output_weight, self_cond=self_cond,
                              self_cond_norm=f"{self_cond_norm}.weight", split_experts=split_experts):
        yield TensorSpec(t.name, t.shape, t.spec.f32)


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


def hparams(cfg: Config) -> dict[str, Any]:
    """The loader's hyper-parameters (dg_hparams names, the schema's `hparam`) that a file of `cfg` sets."""
    return dict(n_ctx_train=cfg.context_length, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_ff=cfg.n_ff,
                n_ff_exp=cfg.n_ff_exp, n_expert=cfg.n_expert, n_expert_used=cfg.n_expert_used, n_head=cfg.n_head,
                head_dim=cfg.head_dim, head_dim_swa=cfg.head_dim_swa, rms_norm_eps=cfg.rms_eps,
                sliding_window=cfg.sliding_window, rope_freq_base=cfg.rope_theta, rope_freq_base_swa=cfg.rope_theta_swa,
                n_rot=cfg.head_dim, n_rot_swa=cfg.head_dim_swa, final_logit_softcap=cfg.softcap,
                canvas_length=cfg.canvas_length)


def metadata(cfg: Config) -> list[tuple[str, str, Any]]:
    """(key, gguf writer method, value) in the order the converter writes them: the schema's keys, with
    their GGUF types, that a tiny file carries."""
    A = ARCH
    tokens = vocab(cfg)
    hp = hparams(cfg)
    values = {k.name: hp[k.hparam] for k in schema().keys if k.hparam in hp}
    values.update({
        "general.type": "model", "general.name": "tiny-diffusion-gemma",
        f"{A}.attention.head_count_kv": [cfg.n_head_kv_swa if s else cfg.n_head_kv_full for s in cfg.pattern()],
        f"{A}.attention.sliding_window_pattern": list(cfg.pattern()), f"{A}.attention.causal": False,
        "diffusion.eb_max_steps": 48, "diffusion.eb_t_min": 0.4, "diffusion.eb_t_max": 0.8,
        "tokenizer.ggml.model": schema().tokenizer_model, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [-1000.0] * len(tokens),
        "tokenizer.ggml.token_type": [3 if t.startswith("<") and not t.startswith("<0x") else 1 for t in tokens],
        "tokenizer.ggml.merges": ["t o", "to k"], "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.mask_token_id": 4, "tokenizer.ggml.add_bos_token": True,
    })
    unknown = sorted(set(values) - {k.name for k in schema().keys})
    if unknown:
        raise KeyError(f"'{unknown[0]}' is not a metadata key of the schema")
    return [(k.name, k.written_as.lower(), values[k.name]) for k in schema().keys if k.name in values]


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
