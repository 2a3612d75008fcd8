"""The converter against the reference: transformers' own tensors, ggml's own quantizers, and the
Hugging Face tokenizer. Every converted file must also pass the native loader."""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import pydgemma
from pydgemma.quantize import ConversionError, convert

Q = gguf.GGMLQuantizationType

# GGUF name suffix -> HF name suffix (decoder), written out from the spec's section 2 table.
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate_inp.weight": "router.proj.weight",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj",
    "ffn_down_exps.weight": "experts.down_proj",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "layer_output_scale.weight": "layer_scalar",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.decoder.embed_tokens.weight",
    "output_norm.weight": "model.decoder.norm.weight",
    "self_cond_pre_norm.weight": "model.decoder.self_conditioning.pre_norm.weight",
    "self_cond_gate.weight": "model.decoder.self_conditioning.gate_proj.weight",
    "self_cond_up.weight": "model.decoder.self_conditioning.up_proj.weight",
    "self_cond_down.weight": "model.decoder.self_conditioning.down_proj.weight",
}
F32_ALWAYS = re.compile(r"(_norm\.weight|\.scale|ffn_gate_inp\.weight|layer_output_scale\.weight|rope_freqs\.weight)$")


def hf_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    assert m, gguf_name
    il, rest = m.groups()
    if rest == "enc_layer_output_scale.weight":
        return f"model.encoder.language_model.layers.{il}.layer_scalar"
    return f"model.decoder.layers.{il}.{LAYER_NAMES[rest]}"


_reference_cache: dict[Path, dict[str, np.ndarray]] = {}


def reference_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every parameter and buffer of the checkpoint as transformers loads it, in float32."""
    if folder not in _reference_cache:
        import torch
        from transformers import DiffusionGemmaForBlockDiffusion

        model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype="auto")
        _reference_cache[folder] = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    return _reference_cache[folder]


def gguf_values(t: gguf.ReaderTensor) -> np.ndarray:
    """A GGUF tensor dequantized to float32 in numpy (torch) order."""
    shape = tuple(int(d) for d in reversed(t.shape))
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)


def ggml_encode(values: np.ndarray, qtype: Q) -> bytes:
    """The bytes ggml itself (ggml_quantize_chunk, via ggml-python) produces for `values`."""
    import ggml

    rows = values.reshape(-1, values.shape[-1]).astype(np.float32)
    if qtype == Q.F32:
        return rows.tobytes()
    n_rows, n_per_row = rows.shape
    size = ggml.ggml_row_size(int(qtype), n_per_row) * n_rows
    buf = (ctypes.c_uint8 * size)()
    src = np.ascontiguousarray(rows)
    written = ggml.ggml_quantize_chunk(int(qtype), src.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                       ctypes.cast(buf, ctypes.c_void_p), 0, n_rows, n_per_row, None)
    assert written == size
    return bytes(buf)


def rope_freqs_reference(head_dim: int, partial: float) -> np.ndarray:
    rotated = int(head_dim * partial / 2)
    return np.array([1.0] * rotated + [1e30] * (head_dim // 2 - rotated), dtype=np.float32)


# ------------------------------------------------------------------------------------------------


def test_f32_tensors_equal_the_checkpoint_exactly(hf_tiny: Path, converted: dict[str, Path]) -> None:
    ref = reference_tensors(hf_tiny)
    reader = gguf.GGUFReader(converted["f32"])
    names = {t.name for t in reader.tensors}
    # the layout: 5 sliding layers x 23 + 1 full layer x 22 + 7 globals
    assert len(names) == 5 * 23 + 22 + 7
    for t in reader.tensors:
        assert t.tensor_type == Q.F32, t.name
        values = gguf_values(t)
        if t.name == "rope_freqs.weight":
            np.testing.assert_array_equal(values, rope_freqs_reference(32, 0.25))
            continue
        expected = ref[hf_name(t.name)]
        assert values.shape == expected.shape, t.name
        np.testing.assert_array_equal(values, expected, err_msg=t.name)


def test_every_parameter_of_the_text_model_is_written(hf_tiny: Path, converted: dict[str, Path]) -> None:
    ref = reference_tensors(hf_tiny)
    written = {hf_name(t.name) for t in gguf.GGUFReader(converted["f32"]).tensors if t.name != "rope_freqs.weight"}
    text_params = {k for k in ref if k.startswith("model.decoder.") and "rotary_emb" not in k}
    text_params |= {k for k in ref if re.fullmatch(r"model\.encoder\.language_model\.layers\.\d+\.layer_scalar", k)}
    assert text_params == written


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
def test_converted_types_match_ggml(hf_tiny: Path, converted: dict[str, Path], out_type: str) -> None:
    requested = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[out_type]
    ref = reference_tensors(hf_tiny)
    for t in gguf.GGUFReader(converted[out_type]).tensors:
        if t.name == "rope_freqs.weight":
            continue
        expected = ref[hf_name(t.name)]
        want_type = Q.F32 if (expected.ndim == 1 or F32_ALWAYS.search(t.name)) else requested
        assert t.tensor_type == want_type, t.name
        assert bytes(t.data.tobytes()) == ggml_encode(expected, want_type), t.name
        values = gguf_values(t)
        err = np.abs(values - expected)
        if want_type == Q.F16:
            assert np.all(err <= np.abs(expected) * 2.0**-11 + 2.0**-24), t.name
        elif want_type == Q.BF16:
            assert np.all(err <= np.abs(expected) * 2.0**-8), t.name
        elif want_type == Q.Q8_0:
            # d = amax/127 is stored as f16 (relative error <= 2^-11), so |x - q*d'| <= d/2 + 127*d*2^-11
            blocks = expected.reshape(-1, 32)
            d = np.abs(blocks).max(axis=1, keepdims=True) / 127
            bound = d * (0.5 + 127 * 2.0**-11) * (1 + 1e-6) + 1e-7
            assert np.all(err.reshape(-1, 32) <= bound), t.name


def test_bf16_checkpoint_defaults_to_bf16_and_is_exact(hf_tiny_bf16: Path, tmp_path: Path) -> None:
    result = convert(hf_tiny_bf16, tmp_path / "b.gguf")
    ref = reference_tensors(hf_tiny_bf16)
    for t in gguf.GGUFReader(result.path).tensors:
        if t.name == "rope_freqs.weight":
            continue
        expected = ref[hf_name(t.name)]
        assert t.tensor_type == (Q.F32 if expected.ndim == 1 or F32_ALWAYS.search(t.name) else Q.BF16), t.name
        np.testing.assert_array_equal(gguf_values(t), expected, err_msg=t.name)


def test_default_type_of_an_fp32_checkpoint_is_f16(hf_tiny: Path, tmp_path: Path) -> None:
    result = convert(hf_tiny, tmp_path / "d.gguf")
    assert result.type_counts == {"F16": 57, "F32": 87}
    reader = gguf.GGUFReader(result.path)
    assert reader.fields["general.file_type"].contents() == 1


def field(reader: gguf.GGUFReader, key: str):
    f = reader.fields[key]
    return f.contents(), [gguf.GGUFValueType(t) for t in f.types]


def test_metadata_keys_and_types(hf_tiny: Path, converted: dict[str, Path]) -> None:
    cfg = json.loads((hf_tiny / "config.json").read_text())
    text = cfg["text_config"]
    r = gguf.GGUFReader(converted["q8_0"])
    V = gguf.GGUFValueType
    A = "diffusion-gemma"
    expected = {
        "general.architecture": ("diffusion-gemma", [V.STRING]),
        "general.type": ("model", [V.STRING]),
        "general.file_type": (7, [V.UINT32]),
        "general.quantization_version": (2, [V.UINT32]),
        f"{A}.context_length": (text["max_position_embeddings"], [V.UINT32]),
        f"{A}.embedding_length": (64, [V.UINT32]),
        f"{A}.block_count": (6, [V.UINT32]),
        f"{A}.feed_forward_length": (96, [V.UINT32]),
        f"{A}.expert_feed_forward_length": (32, [V.UINT32]),
        f"{A}.expert_count": (4, [V.UINT32]),
        f"{A}.expert_used_count": (2, [V.UINT32]),
        f"{A}.attention.head_count": (4, [V.UINT32]),
        f"{A}.attention.head_count_kv": ([2, 2, 2, 2, 2, 1], [V.ARRAY, V.INT32]),
        f"{A}.attention.key_length": (32, [V.UINT32]),
        f"{A}.attention.value_length": (32, [V.UINT32]),
        f"{A}.attention.key_length_swa": (16, [V.UINT32]),
        f"{A}.attention.value_length_swa": (16, [V.UINT32]),
        f"{A}.attention.sliding_window": (text["sliding_window"], [V.UINT32]),
        f"{A}.attention.sliding_window_pattern": ([True] * 5 + [False], [V.ARRAY, V.BOOL]),
        f"{A}.attention.causal": (False, [V.BOOL]),
        f"{A}.rope.dimension_count": (32, [V.UINT32]),
        f"{A}.rope.dimension_count_swa": (16, [V.UINT32]),
        f"{A}.final_logit_softcapping": (30.0, [V.FLOAT32]),
        "diffusion.canvas_length": (16, [V.UINT32]),
        "diffusion.eb_max_steps": (48, [V.UINT32]),
        "diffusion.eb_stability_threshold": (1, [V.UINT32]),
        "tokenizer.ggml.model": ("gemma4", [V.STRING]),
        "tokenizer.ggml.add_bos_token": (True, [V.BOOL]),
        "tokenizer.ggml.add_space_prefix": (False, [V.BOOL]),
    }
    for key, (value, types) in expected.items():
        got, got_types = field(r, key)
        assert got_types == types, key
        assert got == value, key
    approx = {
        f"{A}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{A}.rope.freq_base": 1e6,
        f"{A}.rope.freq_base_swa": 1e4,
        "diffusion.eb_t_min": 0.4,
        "diffusion.eb_t_max": 0.8,
        "diffusion.eb_entropy_bound": 0.1,
        "diffusion.eb_confidence_threshold": 0.005,
    }
    for key, value in approx.items():
        got, got_types = field(r, key)
        assert got_types == [V.FLOAT32] and got == pytest.approx(value, rel=1e-6), key
    assert field(r, "tokenizer.ggml.scores")[1] == [V.ARRAY, V.FLOAT32]
    assert set(field(r, "tokenizer.ggml.scores")[0]) == {-1000.0}
    assert field(r, "tokenizer.ggml.token_type")[1] == [V.ARRAY, V.INT32]
    assert field(r, "tokenizer.ggml.merges")[1] == [V.ARRAY, V.STRING]


def test_tokenizer_metadata_matches_hf(hf_tiny: Path, converted: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_tiny)
    r = gguf.GGUFReader(converted["f32"])
    tokens = field(r, "tokenizer.ggml.tokens")[0]
    types = field(r, "tokenizer.ggml.token_type")[0]
    n_vocab = reference_tensors(hf_tiny)["model.decoder.embed_tokens.weight"].shape[0]
    assert len(tokens) == n_vocab == len(types)
    assert tokens[: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert field(r, "tokenizer.ggml.bos_token_id")[0] == tok.bos_token_id == 2
    assert field(r, "tokenizer.ggml.eos_token_id")[0] == tok.eos_token_id == 1
    assert field(r, "tokenizer.ggml.unknown_token_id")[0] == tok.unk_token_id == 3
    assert field(r, "tokenizer.ggml.padding_token_id")[0] == tok.pad_token_id == 0
    assert field(r, "tokenizer.ggml.mask_token_id")[0] == tok.convert_tokens_to_ids("<mask>")
    forced = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'}
    for i, (piece, kind) in enumerate(zip(tokens, types)):
        if piece in forced:
            assert kind == 4, piece  # USER_DEFINED: must render in detokenized text
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            assert kind == 6, piece  # BYTE
        elif i in tok.all_special_ids:
            assert kind == 3, piece  # CONTROL
        elif i >= len(tok):
            assert kind == 5  # padding rows
        else:
            assert kind in (1, 4), piece
    assert field(r, "tokenizer.chat_template")[0] == tok.chat_template


def bpe_encode(text: str, tokens: list[str], types: list[int], merges: list[str]) -> list[int]:
    """A reference Gemma BPE over the GGUF vocabulary: special tokens split out first, spaces
    become '▁', merges applied by rank, unknown symbols fall back to <0xXX> byte tokens."""
    ids = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    specials = sorted((t for t, k in zip(tokens, types) if k in (3, 4)), key=len, reverse=True)
    out: list[int] = []
    pattern = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
    pos = 0
    pieces = []
    for m in (pattern.finditer(text) if pattern else []):
        pieces.append((text[pos:m.start()], False))
        pieces.append((m.group(0), True))
        pos = m.end()
    pieces.append((text[pos:], False))
    for piece, special in pieces:
        if special:
            out.append(ids[piece])
            continue
        if not piece:
            continue
        symbols = list(piece.replace(" ", "▁"))
        while len(symbols) > 1:
            best = min(range(len(symbols) - 1), key=lambda i: ranks.get((symbols[i], symbols[i + 1]), 1 << 60))
            if (symbols[best], symbols[best + 1]) not in ranks:
                break
            symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
        for s in symbols:
            if s in ids:
                out.append(ids[s])
            else:
                out.extend(ids[f"<0x{b:02X}>"] for b in s.encode("utf-8"))
    return out


TRICKY = [
    "Hello world",
    "  leading and   multiple    spaces ",
    "line one\nline two\n\n\tindented\r\n",
    "emoji 🎉🚀 and ☃",
    "中文字符和日本語のテキスト",
    "bytes: \x00\x7f é ß ﬁ 𝔘",
    "<|turn>user\nhi<turn|>\n<|turn>model\n",
    "<|channel>thought\nhmm<channel|>answer",
    "def f(x):\n    return x ** 2  # comment",
    "1234567890 3.14159",
    "",
]


@pytest.mark.parametrize("text", TRICKY)
def test_gguf_vocab_reproduces_hf_token_ids(hf_tiny: Path, converted: dict[str, Path], text: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_tiny)
    r = gguf.GGUFReader(converted["f32"])
    tokens = field(r, "tokenizer.ggml.tokens")[0]
    types = field(r, "tokenizer.ggml.token_type")[0]
    merges = field(r, "tokenizer.ggml.merges")[0]
    expected = tok.encode(text, add_special_tokens=False)
    assert bpe_encode(text, tokens, types, merges) == expected


def test_native_loader_accepts_every_conversion(hf_tiny: Path, converted: dict[str, Path]) -> None:
    cfg = json.loads((hf_tiny / "config.json").read_text())["text_config"]
    for out_type, path in converted.items():
        m = pydgemma.Model(path)
        hp = m.hparams
        assert (hp.n_embd, hp.n_layer, hp.n_head, hp.n_ff, hp.n_ff_exp) == (64, 6, 4, 96, 32), out_type
        assert (hp.n_expert, hp.n_expert_used, hp.head_dim, hp.head_dim_swa) == (4, 2, 32, 16)
        assert hp.n_vocab == reference_tensors(hf_tiny)["model.decoder.embed_tokens.weight"].shape[0]
        assert hp.sliding_window == cfg["sliding_window"] and hp.canvas_length == 16
        assert hp.has_self_conditioning and not hp.has_output_weight
        assert [l.is_sliding for l in m.layers] == [True] * 5 + [False]


def test_cli_convert_then_info(hf_tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.gguf"
    bin_dir = Path(sys.executable).parent
    quantize = shutil.which("pydgemma-quantize", path=str(bin_dir)) or shutil.which("pydgemma-quantize")
    assert quantize, "pydgemma-quantize is not installed"
    r = subprocess.run([quantize, "convert", str(hf_tiny), "-o", str(out), "--type", "q8_0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "144 tensors" in r.stdout
    info = subprocess.run([sys.executable, "-m", "pydgemma", "info", "-m", str(out), "--json"], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["hparams"]["n_layer"] == 6 and data["hparams"]["n_embd"] == 64
    assert data["tensor_types"]["q8_0"]["count"] == 57
    again = subprocess.run([quantize, "convert", str(hf_tiny), "-o", str(out)], capture_output=True, text=True)
    assert again.returncode == 1
    assert again.stderr == f"error: '{out}' already exists; use --force (overwrite=True) to replace it\n"
