"""Loading and validating diffusion-gemma GGUF files: the values we read, and every refusal."""

from __future__ import annotations

import os
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

import pydgemma
import tiny_gguf
from tiny_gguf import Config

CFG = Config()


def test_tiny_model_hparams(tiny_model_path: Path) -> None:
    m = pydgemma.Model(tiny_model_path)
    hp = m.hparams
    assert m.architecture == "diffusion-gemma"
    assert m.name == "tiny-diffusion-gemma"
    assert dict(hp) == {
        "n_vocab": 96,
        "n_ctx_train": 512,
        "n_embd": 32,
        "n_layer": 6,
        "n_head": 4,
        "n_ff": 48,
        "n_ff_exp": 16,
        "n_expert": 4,
        "n_expert_used": 2,
        "head_dim": 16,
        "head_dim_swa": 8,
        "n_rot": 16,
        "n_rot_swa": 8,
        "sliding_window": 8,
        "canvas_length": 16,
        "rope_freq_base": 1e6,
        "rope_freq_base_swa": 1e4,
        "rms_norm_eps": pytest.approx(1e-6, rel=1e-6),
        "final_logit_softcap": 30.0,
        "has_self_conditioning": True,
        "has_output_weight": False,
    }
    assert hp.n_embd == 32  # attribute access too
    with pytest.raises(TypeError):
        hp["n_embd"] = 1  # read-only


def test_tiny_model_layers(tiny_model_path: Path) -> None:
    m = pydgemma.Model(tiny_model_path)
    assert [(l.is_sliding, l.n_head_kv, l.head_dim, l.has_v_proj) for l in m.layers] == [(True, 2, 8, True)] * 5 + [
        (False, 1, 16, False)
    ]


def test_tiny_model_tensors(tiny_model_path: Path) -> None:
    m = pydgemma.Model(tiny_model_path)
    # 5 sliding layers x 23 + 1 full layer x 22 (no attn_v) + 7 globals (spec section 2 count rule)
    assert len(m.tensors) == 5 * 23 + 22 + 7
    t = m.tensors["blk.5.ffn_gate_up_exps.weight"]
    assert t.shape == (32, 32, 4) and t.type == "f16" and t.n_bytes == 32 * 32 * 4 * 2
    assert m.tensors["blk.0.attn_q.weight"].shape == (32, 4 * 8)
    assert m.tensors["blk.5.attn_q.weight"].shape == (32, 4 * 16)
    assert m.tensors["blk.5.attn_k.weight"].shape == (32, 1 * 16)
    assert m.tensors["token_embd.weight"].shape == (32, 96)
    assert m.tensors["rope_freqs.weight"].shape == (8,) and m.tensors["rope_freqs.weight"].type == "f32"
    assert m.tensors["blk.0.layer_output_scale.weight"].shape == (1,)
    # Offsets and sizes agree with an independent reader (gguf-py).
    reader = gguf.GGUFReader(tiny_model_path)
    for rt in reader.tensors:
        ours = m.tensors[rt.name]
        assert ours.offset == rt.data_offset
        assert ours.n_bytes == rt.n_bytes
        assert ours.shape == tuple(int(x) for x in rt.shape)


def test_metadata_rendering(tiny_model_path: Path) -> None:
    m = pydgemma.Model(tiny_model_path)
    md = m.metadata
    assert md["general.architecture"] == "diffusion-gemma"
    assert md["diffusion-gemma.attention.head_count_kv"] == "[2, 2, 2, 2, 2, 1] (6 items)"
    assert md["diffusion-gemma.attention.sliding_window_pattern"] == "[true, true, true, true, true, false] (6 items)"
    assert md["tokenizer.ggml.tokens"].startswith("['<pad>', '<eos>', '<bos>'") and md["tokenizer.ggml.tokens"].endswith(
        ", ...] (96 items)"
    )
    assert md["diffusion.canvas_length"] == "16"
    assert float(md["diffusion.eb_t_max"]) == pytest.approx(0.8)


def test_model_properties_and_close(tiny_model_path: Path) -> None:
    with pydgemma.Model(tiny_model_path, n_threads=3, device="cpu") as m:
        assert m.device == "CPU"
        assert m.n_threads == 3
        assert m.file_size == os.path.getsize(tiny_model_path)
        assert "tiny.gguf" in repr(m)
    default = pydgemma.Model(tiny_model_path)
    assert default.n_threads == physical_cores()


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may use."""
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
    return len(cores)


def test_no_mmap_load_reads_the_same(tiny_model_path: Path) -> None:
    a = pydgemma.Model(tiny_model_path, use_mmap=True)
    b = pydgemma.Model(tiny_model_path, use_mmap=False)
    assert dict(a.hparams) == dict(b.hparams) and a.tensors == b.tensors and a.metadata == b.metadata


@pytest.mark.parametrize("alignment", [None, 16, 8])
def test_weights_run_read_into_memory_or_from_a_file_of_small_alignment(make_gguf, alignment) -> None:
    """Without a mapping, or with a general.alignment under ggml's 32 bytes, the weights cannot be a
    view of the file (ggml aborts on an unaligned host buffer): they are copied, and the logits are
    the same bits."""
    base = pydgemma.Model(make_gguf())
    want = base.context(n_ctx=64)
    want.prefill(np.arange(10))
    want = want.denoise(np.arange(16))
    path = make_gguf(alignment=alignment)
    for use_mmap in (True, False):
        ctx = pydgemma.Model(path, use_mmap=use_mmap).context(n_ctx=64)
        ctx.prefill(np.arange(10))
        assert np.array_equal(ctx.denoise(np.arange(16)), want)


def test_split_experts_and_alternate_self_cond_norm_name(make_gguf) -> None:
    path = make_gguf(split_experts=True, self_cond_norm="self_cond_norm")
    m = pydgemma.Model(path)
    assert "blk.0.ffn_gate_exps.weight" in m.tensors and "blk.0.ffn_gate_up_exps.weight" not in m.tensors
    assert m.hparams["has_self_conditioning"] is True


def test_without_self_conditioning_and_with_output_weight(make_gguf) -> None:
    m = pydgemma.Model(make_gguf(self_cond=False, output_weight=True))
    assert m.hparams["has_self_conditioning"] is False
    assert m.hparams["has_output_weight"] is True


def test_scalar_head_count_kv_and_bf16(make_gguf) -> None:
    cfg = tiny_gguf.tiny(n_head_kv_full=2)
    path = make_gguf(
        cfg=cfg,
        set_keys={"diffusion-gemma.attention.head_count_kv": ("uint32", 2)},
        tensor_types={"token_embd.weight": gguf.GGMLQuantizationType.BF16},
    )
    m = pydgemma.Model(path)
    assert [l.n_head_kv for l in m.layers] == [2] * 6
    assert m.tensors["token_embd.weight"].type == "bf16"


@pytest.mark.slow
def test_real_26b_layout_validates(tmp_path: Path) -> None:
    """The full-size DiffusionGemma 26B-A4B layout (header only, sparse data) passes validation."""
    q = gguf.GGMLQuantizationType
    path = tiny_gguf.write_gguf(
        tmp_path / "real.gguf", tiny_gguf.REAL_26B, header_only=True,
        tensor_types={"token_embd.weight": q.Q6_K, "blk.0.ffn_down_exps.weight": q.Q8_0, "blk.1.attn_q.weight": q.Q4_K},
    )
    m = pydgemma.Model(path)
    assert len(m.tensors) == 692  # the count stated in the spec
    hp = m.hparams
    assert (hp.n_vocab, hp.n_embd, hp.n_layer, hp.n_expert, hp.n_expert_used) == (262144, 2816, 30, 128, 8)
    assert [l.index for l in m.layers if not l.is_sliding] == [5, 11, 17, 23, 29]
    assert m.tensors["blk.5.attn_q.weight"].shape == (2816, 8192)
    assert m.tensors["blk.0.attn_k.weight"].shape == (2816, 2048)
    assert m.tensors["blk.0.ffn_gate_up_exps.weight"].shape == (2816, 1408, 128)
    assert m.tensors["blk.0.ffn_down_exps.weight"].shape == (704, 2816, 128)
    assert m.tensors["rope_freqs.weight"].shape == (256,)
    assert m.tensors["token_embd.weight"].type == "q6_K"
    assert m.file_size > 40 * 2**30  # the sparse file has the full size of the data section


# ------------------------------------------------------------------------------------------------
# Refusals: each gives ModelError with a precise one-line message.


def load_error(path: os.PathLike[str] | str) -> pydgemma.ModelError:
    with pytest.raises(pydgemma.ModelError) as info:
        pydgemma.Model(path)
    message = str(info.value)
    assert "\n" not in message
    return info.value


def test_nonexistent_path(tmp_path: Path) -> None:
    err = load_error(tmp_path / "nope.gguf")
    assert str(err) == f"cannot open '{tmp_path / 'nope.gguf'}': No such file or directory"
    assert err.status == "DG_ERR_IO"


def test_directory(tmp_path: Path) -> None:
    err = load_error(tmp_path)
    assert str(err) == f"cannot open '{tmp_path}': is a directory, expected a .gguf file"


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert str(load_error(path)).startswith("not a GGUF file")


def test_wrong_magic(tmp_path: Path, tiny_model_path: Path) -> None:
    path = tmp_path / "bad_magic.gguf"
    data = bytearray(tiny_model_path.read_bytes())
    data[:4] = b"GGML"
    path.write_bytes(bytes(data))
    err = load_error(path)
    assert str(err) == f"not a GGUF file: '{path}' does not start with the GGUF magic"
    assert err.status == "DG_ERR_FORMAT"


def test_text_file() -> None:
    assert str(load_error("/etc/hostname")) == "not a GGUF file: '/etc/hostname' does not start with the GGUF magic"


def test_truncated_tensor_data(tmp_path: Path, tiny_model_path: Path) -> None:
    data = tiny_model_path.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: len(data) - 4096])
    reader = gguf.GGUFReader(tiny_model_path)
    end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    assert str(load_error(path)) == f"file truncated: tensor data ends at byte {end} but file has {len(data) - 4096}"


def test_truncated_header(tmp_path: Path, tiny_model_path: Path) -> None:
    path = tmp_path / "header.gguf"
    path.write_bytes(tiny_model_path.read_bytes()[:200])
    err = load_error(path)
    assert str(err).startswith(f"invalid GGUF file '{path}': ")
    assert err.status == "DG_ERR_FORMAT"


def test_unsupported_gguf_version(tmp_path: Path, tiny_model_path: Path) -> None:
    data = bytearray(tiny_model_path.read_bytes())
    data[4:8] = (99).to_bytes(4, "little")
    path = tmp_path / "v99.gguf"
    path.write_bytes(bytes(data))
    assert re.match(r"invalid GGUF file '.*': .*version", str(load_error(path)))


def test_custom_alignment(make_gguf) -> None:
    path = make_gguf(alignment=64)
    m = pydgemma.Model(path)
    assert m.metadata["general.alignment"] == "64"
    assert all(t.offset % 64 == 0 for t in m.tensors.values())


def test_alignment_of_wrong_type_is_refused_not_aborted(make_gguf) -> None:
    # ggml's own reader would abort the process on this file; the core must refuse it instead.
    path = make_gguf(set_keys={"general.alignment": ("string", "64")})
    assert str(load_error(path)) == f"invalid GGUF file '{path}': key 'general.alignment' has type str, expected u32"


def test_wrong_architecture(make_gguf) -> None:
    err = load_error(make_gguf(arch="llama"))
    assert str(err) == "unsupported architecture 'llama': this runtime runs 'diffusion-gemma' GGUF files"


REQUIRED_KEYS = [
    "general.architecture",
    "diffusion-gemma.context_length",
    "diffusion-gemma.embedding_length",
    "diffusion-gemma.block_count",
    "diffusion-gemma.feed_forward_length",
    "diffusion-gemma.expert_feed_forward_length",
    "diffusion-gemma.expert_count",
    "diffusion-gemma.expert_used_count",
    "diffusion-gemma.attention.head_count",
    "diffusion-gemma.attention.head_count_kv",
    "diffusion-gemma.attention.key_length",
    "diffusion-gemma.attention.value_length",
    "diffusion-gemma.attention.key_length_swa",
    "diffusion-gemma.attention.value_length_swa",
    "diffusion-gemma.attention.layer_norm_rms_epsilon",
    "diffusion-gemma.attention.sliding_window",
    "diffusion-gemma.attention.sliding_window_pattern",
    "diffusion-gemma.rope.freq_base",
    "diffusion-gemma.rope.dimension_count_swa",
    "diffusion-gemma.final_logit_softcapping",
    "diffusion.canvas_length",
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
]


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_required_key(make_gguf, key: str) -> None:
    assert str(load_error(make_gguf(drop_keys=(key,)))) == f"missing required key '{key}'"


def test_optional_keys_may_be_missing(make_gguf) -> None:
    optional = (
        "diffusion-gemma.rope.freq_base_swa",
        "diffusion-gemma.rope.dimension_count",
        "diffusion-gemma.attention.causal",
        "diffusion.eb_max_steps",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
        "general.name",
    )
    m = pydgemma.Model(make_gguf(drop_keys=optional))
    assert m.hparams["rope_freq_base_swa"] == 1e4  # default
    assert m.hparams["n_rot"] == m.hparams["head_dim"]  # default


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("diffusion-gemma.embedding_length", ("string", "big"),
         "key 'diffusion-gemma.embedding_length' has type str, expected an unsigned integer"),
        ("diffusion-gemma.attention.sliding_window_pattern", ("array", [1, 1, 1, 1, 1, 0]),
         "key 'diffusion-gemma.attention.sliding_window_pattern' has type array of i32, expected an array of bool"),
        ("diffusion-gemma.final_logit_softcapping", ("uint32", 30),
         "key 'diffusion-gemma.final_logit_softcapping' has type u32, expected a float"),
        ("diffusion.canvas_length", ("uint32", 0), "key 'diffusion.canvas_length' has invalid value 0"),
        ("diffusion-gemma.attention.sliding_window_pattern", ("array", [True] * 5),
         "attention.sliding_window_pattern has 5 entries, expected block_count = 6"),
        ("diffusion-gemma.attention.head_count_kv", ("array", [2, 2, 2, 2, 2, 3]),
         "layer 5: head_count_kv = 3 must divide head_count = 4"),
        ("diffusion-gemma.attention.value_length", ("uint32", 8),
         "attention.value_length must equal attention.key_length"),
        ("diffusion-gemma.expert_used_count", ("uint32", 5), "expert_used_count (5) exceeds expert_count (4)"),
        ("tokenizer.ggml.model", ("string", "llama"), "unsupported tokenizer.ggml.model 'llama' (expected 'gemma4')"),
        ("diffusion.eb_t_min", ("string", "low"), "key 'diffusion.eb_t_min' has type str, expected a float"),
        ("tokenizer.ggml.scores", ("array", [0.0] * 3),
         "tokenizer.ggml.scores has 3 entries but the vocabulary has 96 tokens"),
    ],
)
def test_bad_key_values(make_gguf, key: str, value, message: str) -> None:
    assert str(load_error(make_gguf(set_keys={key: value}))) == message


@pytest.mark.parametrize(
    "name",
    [
        "token_embd.weight",
        "output_norm.weight",
        "rope_freqs.weight",
        "blk.3.attn_k.weight",
        "blk.0.attn_norm.weight",
        "blk.5.attn_q_norm.weight",
        "blk.2.ffn_gate_inp.scale",
        "blk.4.ffn_down_exps.scale",
        "blk.1.layer_output_scale.weight",
        "blk.5.enc_layer_output_scale.weight",
        "blk.0.post_ffw_norm.weight",
    ],
)
def test_missing_tensor(make_gguf, name: str) -> None:
    assert str(load_error(make_gguf(drop_tensors=(name,)))) == f"missing tensor '{name}'"


def test_missing_experts(make_gguf) -> None:
    err = load_error(make_gguf(drop_tensors=("blk.2.ffn_gate_up_exps.weight",)))
    assert str(err) == (
        "missing tensor 'blk.2.ffn_gate_up_exps.weight' (or both 'blk.2.ffn_gate_exps.weight' and 'blk.2.ffn_up_exps.weight')"
    )
    err = load_error(make_gguf(split_experts=True, drop_tensors=("blk.0.ffn_up_exps.weight",)))
    assert "missing tensor 'blk.0.ffn_gate_up_exps.weight'" in str(err)


def test_incomplete_self_conditioning(make_gguf) -> None:
    err = load_error(make_gguf(drop_tensors=("self_cond_up.weight",)))
    assert str(err) == "incomplete self-conditioning tensors: missing tensor 'self_cond_up.weight'"
    err = load_error(make_gguf(drop_tensors=("self_cond_pre_norm.weight",)))
    assert str(err).startswith("incomplete self-conditioning tensors: missing tensor 'self_cond_pre_norm.weight'")


def test_attn_v_optional_but_shape_checked(make_gguf) -> None:
    m = pydgemma.Model(make_gguf(drop_tensors=("blk.0.attn_v.weight",)))
    assert m.layers[0].has_v_proj is False
    err = load_error(make_gguf(reshape={"blk.1.attn_v.weight": (8, 32)}))
    assert str(err) == "tensor 'blk.1.attn_v.weight' has shape [32, 8], expected [32, 16]"


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("token_embd.weight", (95, 32), "tensor 'token_embd.weight' has shape [32, 95], expected [32, 96]"),
        ("blk.5.attn_q.weight", (32, 32), "tensor 'blk.5.attn_q.weight' has shape [32, 32], expected [32, 64]"),
        ("blk.0.ffn_gate_up_exps.weight", (4, 16, 32),
         "tensor 'blk.0.ffn_gate_up_exps.weight' has shape [32, 16, 4], expected [32, 32, 4]"),
        ("blk.0.layer_output_scale.weight", (2,), "tensor 'blk.0.layer_output_scale.weight' has shape [2], expected [1]"),
        ("rope_freqs.weight", (4,), "tensor 'rope_freqs.weight' has shape [4], expected [8]"),
        # numpy (48, 32) is GGUF ne [32, 48]; the down projection must be [n_ff=48, n_embd=32]
        ("self_cond_down.weight", (48, 32), "tensor 'self_cond_down.weight' has shape [32, 48], expected [48, 32]"),
    ],
)
def test_misshaped_tensor(make_gguf, name: str, shape, message: str) -> None:
    assert str(load_error(make_gguf(reshape={name: shape}))) == message


def test_quantized_norm_is_unsupported(make_gguf) -> None:
    err = load_error(make_gguf(tensor_types={"blk.0.attn_norm.weight": gguf.GGMLQuantizationType.Q8_0}))
    assert str(err) == (
        "unsupported tensor type: 'blk.0.attn_norm.weight' is q8_0; norms, scales and rope frequencies must be f32, f16 or bf16"
    )
    assert err.status == "DG_ERR_UNSUPPORTED"


def test_quantized_matrices_load(make_gguf) -> None:
    q = gguf.GGMLQuantizationType
    m = pydgemma.Model(make_gguf(tensor_types={"blk.0.ffn_gate.weight": q.Q8_0, "token_embd.weight": q.Q4_0}))
    assert m.tensors["blk.0.ffn_gate.weight"].type == "q8_0"
    assert m.tensors["blk.0.ffn_gate.weight"].n_bytes == 48 * 32 // 32 * 34
    assert m.tensors["token_embd.weight"].type == "q4_0"


def test_unknown_device(tiny_model_path: Path) -> None:
    with pytest.raises(pydgemma.ModelError) as info:
        pydgemma.Model(tiny_model_path, device="tpu7")
    assert str(info.value).startswith("unknown device 'tpu7' (available: auto, CPU")
    assert info.value.status == "DG_ERR_INVALID_ARG"


def test_bad_thread_count(tiny_model_path: Path) -> None:
    with pytest.raises(pydgemma.ModelError, match="n_threads must be at least 1"):
        pydgemma.Model(tiny_model_path, n_threads=0)


FUZZ_CORPUS = Path(__file__).resolve().parent.parent / "native" / "fuzz" / "corpus"


@pytest.mark.parametrize("path", sorted(FUZZ_CORPUS.glob("*.gguf")), ids=lambda p: p.name)
def test_fuzzer_findings_are_refused(path: Path) -> None:
    """Inputs on which ggml's own reader aborts or divides by zero are refused with a message."""
    err = load_error(path)
    assert err.status == "DG_ERR_FORMAT"
    assert re.fullmatch(rf"invalid GGUF file '{re.escape(str(path))}': (metadata entry \d+ has an empty key|"
                        r"metadata entry \d+ has a NUL byte in its key|tensor '[^']+' has a zero-sized dimension)", str(err)), str(err)


def test_a_context_that_cannot_fit_is_refused_up_front(tmp_path: Path) -> None:
    """The real 26B shapes at 262,144 tokens, by hand: the F16 KV cache is 5 full layers x K,V x 2 B x
    512 dims x 2 heads x 262,144 positions = 5 GiB plus 25 sliding layers' rings of 1,536 slots (the
    window's 1,023 and a 512-token batch, rounded up to 256) x K,V x 2 B x 256 dims x 8 heads = 0.29 GiB;
    the Q8_0 self-conditioning table 262,144 x 2,816 x 34/32 B = 0.73 GiB; the processed logits kept
    between steps, 256 x 262,144 x 4 B = 0.25 GiB. This F16 file's 47 GiB of weights alone do not
    fit this machine."""
    path = tiny_gguf.write_gguf(tmp_path / "real.gguf", tiny_gguf.REAL_26B, header_only=True)
    model = pydgemma.Model(path, device="cpu")
    with pytest.raises(pydgemma.PydgemmaError) as info:
        model.context(n_ctx=262144)
    message = str(info.value)
    assert info.value.status == "DG_ERR_OUT_OF_MEMORY"
    assert re.match(r"n_ctx = 262144 does not fit on CPU: [\d.]+ GiB needed \(weights 0\.00 GiB copied \+ 47\.\d\d GiB "
                    r"mapped, KV cache 5\.29 GiB, self-conditioning table 0\.73 GiB, step state 0\.25 GiB, compute "
                    r"~[\d.]+ GiB\), [\d.]+ GiB free: the weights alone do not fit: use a smaller quantization or another "
                    r"device$", message), message
    plan = model.plan_memory(262144)
    assert plan["kv"] == 5 * 2 * 2 * 512 * 2 * 262144 + 25 * 1536 * 2 * 2 * 256 * 8 and not plan["fits"]