"""The preset registry and the synthetic writer (pydgemma.models.registry, .synthetic): random but valid
GGUF files of a known shape, written straight in a mix's types, that load, run and look like weights."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import pydgemma
from pydgemma.models import registry, synthetic
from pydgemma.models.tiny_checkpoint import TinySpec
from pydgemma.quantize.policy import choose

Q = gguf.GGMLQuantizationType
REAL = "diffusiongemma-26B-A4B"

# The real preset with a few fields scaled down: the real head dims and dense/expert widths stay, so the
# mixes fall back as they do on the real file (Q4_K_M: Q4_K, Q6_K, Q5_0 and Q8_0 blocks all occur).
SCALED = registry.get(REAL).replace(name="dg26b-scaled", vocab_size=2048, hidden_size=256, num_hidden_layers=6,
                                    num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1,
                                    num_experts=8, top_k_experts=2, canvas_length=32)
MIXES = ("Q8_0", "Q4_K_M", "NVFP4", "F16")


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("synthetic")
    return {mix: synthetic.write(SCALED, mix, out / f"scaled-{mix}.gguf", seed=1).path for mix in MIXES}


@pytest.fixture(scope="module")
def readers(written: dict[str, Path]) -> dict[str, gguf.GGUFReader]:
    return {mix: gguf.GGUFReader(path) for mix, path in written.items()}


def expected_hparams(p: registry.Preset) -> dict:
    a = p.arch()
    return {
        "n_vocab": a.vocab_size, "n_ctx_train": a.context_length, "n_embd": a.hidden_size, "n_layer": a.n_layer,
        "n_head": a.n_head, "n_ff": a.intermediate_size, "n_ff_exp": a.moe_intermediate_size,
        "n_expert": a.n_expert, "n_expert_used": a.n_expert_used, "head_dim": a.head_dim_full,
        "head_dim_swa": a.head_dim_swa, "n_rot": a.head_dim_full, "n_rot_swa": a.head_dim_swa,
        "sliding_window": a.sliding_window, "canvas_length": a.canvas_length, "rope_freq_base": a.rope_theta_full,
        "rope_freq_base_swa": a.rope_theta_swa, "rms_norm_eps": pytest.approx(a.rms_eps),
        "final_logit_softcap": a.softcap, "has_self_conditioning": True, "has_output_weight": False,
    }


# ------------------------------------------------------------------------------------------------
# The registry


def test_registry_names_and_lookup() -> None:
    assert {REAL, "tiny", "mid"} <= set(registry.names())
    assert registry.get(REAL).name == REAL
    with pytest.raises(KeyError, match="unknown preset 'nope' .*diffusiongemma-26B-A4B"):
        registry.get("nope")


def test_the_real_preset_is_spec_section_0() -> None:
    a = registry.get(REAL).arch()
    assert (a.vocab_size, a.hidden_size, a.n_layer, a.n_head) == (262144, 2816, 30, 16)
    assert [i for i, s in enumerate(a.sliding) if not s] == [5, 11, 17, 23, 29]
    assert a.n_kv_per_layer == [2 if i in (5, 11, 17, 23, 29) else 8 for i in range(30)]
    assert (a.head_dim_swa, a.head_dim_full, a.intermediate_size, a.moe_intermediate_size) == (256, 512, 2112, 704)
    assert (a.n_expert, a.n_expert_used, a.sliding_window, a.context_length) == (128, 8, 1024, 262144)
    assert (a.rms_eps, a.softcap, a.canvas_length) == (1e-6, 30.0, 256)
    assert (a.rope_theta_swa, a.rope_theta_full, a.partial_rotary_factor, a.rotated_pairs) == (1e4, 1e6, 0.25, 64)
    assert a.generation["diffusion.eb_max_steps"] == 48


def test_the_small_presets_are_the_tests_and_benchmarks_shapes() -> None:
    assert registry.get("tiny").tiny_spec() == TinySpec(vocab_size=512)  # the tiny tokenizer has 512 tokens
    mid = registry.get("mid").arch()
    assert (mid.vocab_size, mid.hidden_size, mid.n_layer, mid.n_expert, mid.n_expert_used, mid.canvas_length) == \
        (32768, 768, 12, 24, 4, 256)
    assert SCALED.arch().head_dim_full == 512 and SCALED.arch().n_layer == 6


# ------------------------------------------------------------------------------------------------
# The 26B plan, without writing it


def use_more_bits(i: int, n: int) -> bool:  # spec section 5, written out again here as the oracle
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def test_the_26b_q4_k_m_plan_is_the_spec_layout() -> None:
    tensors = synthetic.plan(REAL, "Q4_K_M")
    got = {t.gguf_name: (tuple(reversed(t.shape)), t.qtype) for t in tensors}  # GGUF ne order
    assert len(tensors) == len(got) == 25 * 23 + 5 * 22 + 7 == 692
    assert tensors[0].gguf_name == "rope_freqs.weight" and got["rope_freqs.weight"] == ((256,), Q.F32)
    assert got["token_embd.weight"] == ((2816, 262144), Q.Q6_K) and "output.weight" not in got
    assert got["output_norm.weight"] == ((2816,), Q.F32)
    assert got["self_cond_gate.weight"] == got["self_cond_up.weight"] == ((2816, 2112), Q.Q4_K)
    assert got["self_cond_down.weight"] == ((2112, 2816), Q.Q5_0)
    v_ordinal = 0
    for il in range(30):
        full = il % 6 == 5
        hd, kv = (512, 2) if full else (256, 8)
        more = Q.Q8_0 if il in (0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29) else Q.Q5_0
        p = f"blk.{il}."
        assert got[p + "attn_q.weight"] == ((2816, 16 * hd), Q.Q4_K)
        assert got[p + "attn_k.weight"] == ((2816, kv * hd), Q.Q4_K)
        if full:
            assert p + "attn_v.weight" not in got
        else:
            assert got[p + "attn_v.weight"] == ((2816, 2048), Q.Q6_K if use_more_bits(v_ordinal, 25) else Q.Q4_K)
            v_ordinal += 1
        assert got[p + "attn_output.weight"] == ((16 * hd, 2816), Q.Q4_K)
        assert got[p + "attn_q_norm.weight"] == got[p + "attn_k_norm.weight"] == ((hd,), Q.F32)
        assert got[p + "ffn_gate.weight"] == got[p + "ffn_up.weight"] == ((2816, 2112), Q.Q4_K)
        assert got[p + "ffn_down.weight"] == ((2112, 2816), more)
        assert got[p + "ffn_gate_inp.weight"] == ((2816, 128), Q.F32)
        assert got[p + "ffn_gate_inp.scale"] == ((2816,), Q.F32)
        assert got[p + "ffn_gate_up_exps.weight"] == ((2816, 1408, 128), Q.Q4_K)
        assert got[p + "ffn_down_exps.weight"] == ((704, 2816, 128), more)
        assert got[p + "ffn_down_exps.scale"] == ((128,), Q.F32)
        assert got[p + "layer_output_scale.weight"] == got[p + "enc_layer_output_scale.weight"] == ((1,), Q.F32)
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm_1", "pre_ffw_norm_2",
                     "post_ffw_norm_2", "post_ffw_norm"):
            assert got[f"{p}{norm}.weight"] == ((2816,), Q.F32)
    assert v_ordinal == 25
    total = synthetic.planned_bytes(tensors)
    assert 15e9 < total < 17e9, total  # 16.79 GB
    sizes = gguf.GGML_QUANT_SIZES
    assert total == sum(math.prod(ne) // sizes[q][0] * sizes[q][1] for ne, q in got.values())


def test_the_26b_plan_in_the_other_mixes() -> None:
    sizes = {mix: synthetic.planned_bytes(synthetic.plan(REAL, mix)) for mix in ("Q8_0", "NVFP4", "F16")}
    assert 13e9 < sizes["NVFP4"] < 15e9 and 26e9 < sizes["Q8_0"] < 28e9 and 50e9 < sizes["F16"] < 51e9


# ------------------------------------------------------------------------------------------------
# Blocks


@pytest.mark.parametrize("qtype", synthetic.BLOCK_TYPES, ids=lambda q: q.name)
def test_random_blocks_dequantize_to_finite_small_weights(qtype: Q) -> None:
    blocks = synthetic.random_blocks(qtype, 4096, np.random.default_rng(0))
    assert blocks.shape == (4096, gguf.GGML_QUANT_SIZES[qtype][1]) and blocks.dtype == np.uint8
    w = gguf.quants.dequantize(blocks, qtype)
    assert np.isfinite(w).all()
    assert abs(w.std() - synthetic.WEIGHT_STD) < 0.05 * synthetic.WEIGHT_STD
    assert abs(w.mean()) < 0.01 * synthetic.WEIGHT_STD
    assert np.abs(w).max() < 5 * synthetic.WEIGHT_STD
    if qtype == Q.NVFP4:
        assert not (blocks[:, :4] == 0x7F).any()  # E4M3's NaN
    if qtype == Q.Q8_0:
        assert blocks[:, 2:].view(np.int8).min() == -127  # as ggml's quantizer writes them


# ------------------------------------------------------------------------------------------------
# Written files


@pytest.mark.parametrize("mix", MIXES)
def test_the_file_loads_with_the_presets_hparams(written: dict[str, Path], mix: str) -> None:
    with pydgemma.Model(written[mix]) as m:
        assert dict(m.hparams) == expected_hparams(SCALED)
        a = SCALED.arch()
        assert [(L.is_sliding, L.n_head_kv, L.head_dim, L.has_v_proj) for L in m.layers] == \
            [(s, kv, a.head_dim_swa if s else a.head_dim_full, s) for s, kv in zip(a.sliding, a.n_kv_per_layer)]
        assert m.name == SCALED.name
        assert m.metadata["diffusion.eb_max_steps"] == "48"


@pytest.mark.parametrize("mix", MIXES)
def test_each_tensor_has_the_policy_type(readers: dict[str, gguf.GGUFReader], mix: str) -> None:
    r = readers[mix]
    tensors = [(t.name, tuple(int(d) for d in t.shape)) for t in r.tensors]
    assert [(c.name, c.shape) for c in choose(mix, tensors)] == tensors
    assert [t.tensor_type for t in r.tensors] == [c.qtype for c in choose(mix, tensors)]
    assert [(t.gguf_name, tuple(reversed(t.shape))) for t in synthetic.plan(SCALED, mix)] == tensors
    from pydgemma.quantize.policy import MIXES as POLICY_MIXES

    assert r.fields["general.file_type"].contents() == POLICY_MIXES[mix][0]
    assert r.fields["general.name"].contents() == SCALED.name
    if mix == "Q4_K_M":
        assert {t.tensor_type for t in r.tensors} == {Q.F32, Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q8_0}


@pytest.mark.parametrize("mix", MIXES)
def test_weights_look_like_weights(readers: dict[str, gguf.GGUFReader], mix: str) -> None:
    a = SCALED.arch()
    for t in readers[mix].tensors:
        raw = np.asarray(t.data)
        if t.tensor_type != Q.F32:  # a matrix: the first rows (whole rows, so whole blocks)
            w = gguf.quants.dequantize(np.ascontiguousarray(raw.reshape(-1, raw.shape[-1])[:64]), t.tensor_type)
            assert np.isfinite(w).all(), t.name
            assert 0.017 < w.std() < 0.023 and abs(w.mean()) < 0.002, (t.name, w.std(), w.mean())
            continue
        w = raw.astype(np.float64)
        assert np.isfinite(w).all(), t.name
        if t.name == "rope_freqs.weight":
            assert (w[:a.rotated_pairs] == 1).all() and (w[a.rotated_pairs:] == np.float32(1e30)).all()
        elif t.name.endswith("ffn_gate_inp.weight"):
            assert 0.9 < w.std() < 1.1
        elif t.name.endswith(("q_norm.weight", "k_norm.weight")):
            assert np.allclose(w, w.size ** -0.25, rtol=0.11)
        else:  # norms, router / expert scales, layer scalars: about 1
            assert ((w > 0.75) & (w < 1.25)).all(), t.name


@pytest.mark.parametrize("mix", MIXES)
def test_prefill_and_a_denoising_step_give_finite_logits(written: dict[str, Path], mix: str) -> None:
    with pydgemma.Model(written[mix], device="cpu") as m:
        ids = m.chat_prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
        ctx = m.context(n_ctx=128)
        ctx.prefill(ids)
        C, V = m.hparams["canvas_length"], m.hparams["n_vocab"]
        canvas = np.random.default_rng(0).integers(0, V, C).astype(np.int32)
        first = ctx.denoise(canvas)
        second = ctx.denoise(canvas, first)  # with self-conditioning
        for logits in (first, second):
            assert logits.shape == (C, V) and np.isfinite(logits).all()
            assert 0.05 < logits.std() and np.abs(logits).max() <= 30.0
        assert not np.array_equal(first, second)


def test_the_router_spreads_tokens_over_the_experts(readers: dict[str, gguf.GGUFReader]) -> None:
    a = SCALED.arch()
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in readers["Q4_K_M"].tensors}
    r = np.random.default_rng(0).standard_normal((512, a.hidden_size)).astype(np.float32)  # residual rows
    for il in range(a.n_layer):
        w = tensors[f"blk.{il}.ffn_gate_inp.weight"]  # [n_expert, n_embd]
        scale = tensors[f"blk.{il}.ffn_gate_inp.scale"]
        x = r / np.sqrt((r * r).mean(axis=1, keepdims=True) + a.rms_eps) * scale / np.sqrt(a.hidden_size)
        top1 = (x @ w.T).argmax(axis=1)
        counts = np.bincount(top1, minlength=a.n_expert)
        assert (counts > 0).sum() == a.n_expert and counts.max() < 0.3 * len(r), counts


def test_the_tokenizer_and_the_chat_template(written: dict[str, Path]) -> None:
    with pydgemma.Model(written["Q8_0"]) as m:
        text = "The quick brown fox: naïve café, 日本 🚀\n\tdef main():"
        ids = m.tokenize(text, add_special=False)
        assert m.detokenize(ids) == text
        assert len(m.tokenize("The quick brown fox jumps over the lazy dog.", add_special=False)) <= 12  # merges
        assert m.tokenize("<|turn>user", add_special=False)[0] == 5
        prompt = m.chat_prompt_ids([{"role": "user", "content": "Hi"}])
        assert prompt[0] == 2 and prompt.count(2) == 1  # exactly one <bos>
        assert m.detokenize(prompt, render_special=True).endswith("<|turn>model\n<|channel>thought\n<channel|>")
        eog = {m.tokenize(t, add_special=False)[0] for t in ("<eos>", "<turn|>", "<|tool_response>")}
        assert sorted(m.eog_ids) == sorted(eog)
        assert m.token_text(m.hparams["n_vocab"] - 1).strip()  # fillers are words, not empty


def test_the_seed_decides_the_bytes(tmp_path: Path) -> None:
    paths = [synthetic.write("tiny", "Q8_0", tmp_path / f"{i}.gguf", seed=s).path for i, s in enumerate((3, 3, 4))]
    a, b, c = (p.read_bytes() for p in paths)
    assert a == b and a != c and len(a) == len(c)


def test_tiny_f32_and_an_existing_output(tmp_path: Path) -> None:
    path = synthetic.write("tiny", "f32", tmp_path / "tiny.gguf").path
    with pydgemma.Model(path) as m:
        assert dict(m.hparams) == expected_hparams(registry.get("tiny"))
        assert {t.type for t in m.tensors.values()} == {"f32"}
    with pytest.raises(synthetic.SyntheticError, match="already exists"):
        synthetic.write("tiny", "F32", path)
    with pytest.raises(synthetic.SyntheticError, match="too small"):
        synthetic.write(registry.get("tiny").replace(vocab_size=300), "F32", tmp_path / "small.gguf")


# ------------------------------------------------------------------------------------------------
# The command


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pydgemma.models.synthetic", *args], capture_output=True, text=True,
                          timeout=120)


def test_the_command_writes_a_file(tmp_path: Path) -> None:
    out = tmp_path / "tiny-nvfp4.gguf"
    res = run_cli("--preset", "tiny", "-t", "nvfp4", "-o", str(out), "--seed", "2")
    assert res.returncode == 0, res.stderr
    assert f"wrote {out}" in res.stdout and "tiny NVFP4" in res.stdout
    assert pydgemma.Model(out).name == "tiny"
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left


def test_the_help_teaches() -> None:
    res = run_cli("--help")
    assert res.returncode == 0
    for word in ("--preset", "--type", "--seed", "--dry-run", REAL, "tiny", "Q4_K_M", "NVFP4", "Examples"):
        assert word in res.stdout, word


@pytest.mark.parametrize("args, message", [
    (("--preset", "gemma-9000", "-t", "Q4_K_M", "-o", "{tmp}/x.gguf"), "unknown preset 'gemma-9000'"),
    (("--preset", "tiny", "-t", "Q3_XXL", "-o", "{tmp}/x.gguf"), "unknown type 'Q3_XXL'"),
    (("--preset", "tiny", "-t", "Q8_0", "-o", "{tmp}/a-file/x.gguf"), "is not a folder"),
], ids=["preset", "type", "output"])
def test_bad_arguments_are_one_line_errors(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    res = run_cli(*(a.format(tmp=tmp_path) for a in args))
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
