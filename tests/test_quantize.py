"""pydgemma-quantize quantize: the per-tensor policy (spec section 5), the bytes and errors of every
type against ggml's and gguf-py's own code, and quantized models that load and generate."""

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
from pydgemma.quantize import ConversionError, convert
from pydgemma.quantize.policy import use_more_bits
from pydgemma.quantize.quantize import quantize
from test_convert import ggml_encode

Q = gguf.GGMLQuantizationType

# Relative RMS error expected of each type on Gaussian weights, from its format: a b-bit grid over a
# block's range (~2 x 2.5 sigma for 32 values) has step/sqrt(12) error; f16/bf16 round to 2^-11/2^-8.
EXPECTED_ERROR = {Q.Q8_0: 0.006, Q.Q6_K: 0.02, Q.Q5_K: 0.045, Q.Q4_K: 0.09, Q.Q5_0: 0.045, Q.NVFP4: 0.11,
                  Q.F16: 3e-4, Q.BF16: 2.3e-3}


def test_use_more_bits_layers_match_the_spec() -> None:
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(25) if use_more_bits(i, 25)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23, 24]


@pytest.mark.slow
def test_q4_k_m_plan_of_the_real_26b_shapes(tmp_path: Path) -> None:
    """The spec's Q4_K_M table, on a header-only file with the real shapes (no weights read)."""
    path = tiny_gguf.write_gguf(tmp_path / "real.gguf", tiny_gguf.REAL_26B, header_only=True)
    choices = quantize(path, None, mix="Q4_K_M", dry_run=True).plan
    plan = {c.name: c.qtype for c in choices}
    shapes = {c.name: c.shape for c in choices}
    assert len(plan) == 692
    more_bits_layers = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
    v_layers = [il for il in range(30) if il % 6 != 5]  # attn_v exists on the 25 sliding layers
    for name, qtype in plan.items():
        m = re.match(r"blk\.(\d+)\.(.+)", name)
        rest = m.group(2) if m else name
        il = int(m.group(1)) if m else -1
        if len(shapes[name]) == 1 or rest == "ffn_gate_inp.weight":  # norms, scales, scalars, router
            expected = Q.F32
        elif name == "token_embd.weight":
            expected = Q.Q6_K
        elif rest == "attn_v.weight":
            expected = Q.Q6_K if use_more_bits(v_layers.index(il), 25) else Q.Q4_K
        elif rest in ("ffn_down.weight", "ffn_down_exps.weight"):  # rows of 2112 / 704: no k-quant fits
            expected = Q.Q8_0 if il in more_bits_layers else Q.Q5_0
        elif name == "self_cond_down.weight":
            expected = Q.Q5_0
        else:  # attn_q, attn_k, attn_output, ffn_gate, ffn_up, ffn_gate_up_exps, self_cond_gate/up
            expected = Q.Q4_K
        assert qtype == expected, name
    assert sum(1 for n, t in plan.items() if n.endswith("attn_v.weight") and t == Q.Q6_K) == 13


def test_overrides_and_dry_run_cli(tmp_path: Path, converted: dict[str, Path]) -> None:
    r = subprocess.run([sys.executable, "-m", "pydgemma.quantize", "quantize", str(converted["f32"]), "-t", "Q8_0",
                        "--dry-run", "--tensor-type", r"ffn_down_exps=F16", "--tensor-type", r"^token_embd=Q5_0"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^blk\.0\.ffn_down_exps\.weight\s+\S+\s+F16\s", r.stdout, re.M)
    assert re.search(r"^token_embd\.weight\s+\S+\s+Q5_0\s", r.stdout, re.M)
    assert "dry run: nothing written" in r.stdout and not list(tmp_path.iterdir())
    everything = quantize(converted["f32"], None, mix="Q8_0", overrides=[(r"\.weight$", Q.F16)], dry_run=True).plan
    assert {c.qtype for c in everything if len(c.shape) == 1} == {Q.F32}  # overrides never touch norms/scales
    bad = subprocess.run([sys.executable, "-m", "pydgemma.quantize", "quantize", str(converted["f32"]), "-t", "Q8_0",
                          "--dry-run", "--tensor-type", "attn=Q9_9"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr == "error: --tensor-type 'attn=Q9_9': unknown type 'Q9_9'\n"


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """An F32 GGUF whose rows are multiples of 256, so every k-quant and NVFP4 applies."""
    from pydgemma.models.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    spec = TinySpec(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, head_dim=64, global_head_dim=128)
    root = tmp_path_factory.mktemp("wide256")
    path = convert(build_tiny_checkpoint(root / "hf", spec), root / "f32.gguf", out_type="f32").path
    values = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(path).tensors}
    return path, values


@pytest.mark.parametrize("mix", ["Q4_K_M", pytest.param("Q5_K_M", marks=pytest.mark.slow),
                                 pytest.param("Q6_K", marks=pytest.mark.slow), "Q8_0", "NVFP4", "F16", "BF16"])
def test_round_trip_errors_and_bytes(wide, tmp_path: Path, mix: str) -> None:
    path, source = wide
    result = quantize(path, tmp_path / f"{mix}.gguf", mix=mix)
    types_seen = set()
    for t in gguf.GGUFReader(result.path).tensors:
        src = source[t.name]
        if t.tensor_type == Q.F32:
            np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type), src)
            continue
        types_seen.add(t.tensor_type)
        # the bytes are ggml's own (ggml_quantize_chunk through ggml-python)
        assert t.data.tobytes() == ggml_encode(src, t.tensor_type), t.name
        if t.tensor_type == Q.Q8_0:  # and Q8_0 is bit-identical to gguf-py's reference quantizer
            assert t.data.tobytes() == gguf.quants.quantize(src.reshape(-1, src.shape[-1]), Q.Q8_0).tobytes()
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(src.shape)  # gguf-py's decoder
        err = float(np.sqrt(np.mean((back - src) ** 2) / np.mean(src**2)))
        assert err <= EXPECTED_ERROR[t.tensor_type], (t.name, t.tensor_type.name, err)
    main = {"Q4_K_M": Q.Q4_K, "Q5_K_M": Q.Q5_K, "Q6_K": Q.Q6_K, "Q8_0": Q.Q8_0, "NVFP4": Q.NVFP4, "F16": Q.F16,
            "BF16": Q.BF16}[mix]
    assert main in types_seen
    m = pydgemma.Model(result.path)  # the native loader accepts it
    assert m.metadata["general.file_type"] == str({"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7, "NVFP4": 39,
                                                   "F16": 1, "BF16": 32}[mix])


@pytest.mark.parametrize("mix", [pytest.param("Q4_K_M", marks=pytest.mark.slow), "Q8_0", "NVFP4"])
def test_quantized_models_generate(wide, tmp_path: Path, mix: str) -> None:
    path, _ = wide
    q = quantize(path, tmp_path / f"{mix}.gguf", mix=mix).path
    model = pydgemma.Model(q)
    gen = model.generate("hello", max_new_tokens=16, seed=1, max_steps=8)
    assert len(gen.steps) == 1 and 1 <= gen.steps[0] <= 8 and gen.n_forwards == gen.steps[0]  # one canvas of 16
    assert len(gen.tokens) < 16 if gen.hit_eos else len(gen.tokens) == 16
    assert all(0 <= t < model.hparams["n_vocab"] for t in gen.tokens)


@pytest.mark.slow
def test_more_bits_means_closer_logits(wide, tmp_path: Path) -> None:
    """First-step logits against the F32 file: Q8_0 closer than Q4_K_M."""
    path, _ = wide
    ids = pydgemma.Model(path).tokenize("hello")
    canvas = np.arange(20, 36)

    def logits(p: Path) -> np.ndarray:
        ctx = pydgemma.Model(p).context(n_ctx=64)
        ctx.prefill(ids)
        return ctx.denoise(canvas)

    ref = logits(path)
    errors = {mix: float(np.linalg.norm(logits(quantize(path, tmp_path / f"{mix}.gguf", mix=mix).path) - ref)
                         / np.linalg.norm(ref)) for mix in ("Q8_0", "Q4_K_M")}
    assert errors["Q8_0"] < errors["Q4_K_M"], errors


def test_from_the_hf_checkpoint_equals_from_the_f32_gguf(hf_tiny: Path, converted: dict[str, Path], tmp_path: Path) -> None:
    a = quantize(hf_tiny, tmp_path / "a.gguf", mix="Q8_0").path
    b = quantize(converted["f32"], tmp_path / "b.gguf", mix="Q8_0").path
    ta = [(t.name, t.tensor_type, t.data.tobytes()) for t in gguf.GGUFReader(a).tensors]
    tb = [(t.name, t.tensor_type, t.data.tobytes()) for t in gguf.GGUFReader(b).tensors]
    assert ta == tb


def test_refusals_leave_nothing(converted: dict[str, Path], wide, tmp_path: Path) -> None:
    q8 = quantize(converted["f32"], tmp_path / "q8.gguf", mix="Q8_0").path
    with pytest.raises(ConversionError, match="never from an already quantized one"):
        quantize(q8, tmp_path / "again.gguf", mix="Q4_K_M")
    with pytest.raises(ConversionError, match="unknown type 'Q3_X'"):
        quantize(converted["f32"], tmp_path / "x.gguf", mix="Q3_X")
    # a type that needs an importance matrix fails in the native quantizer, mid-file
    with pytest.raises(ConversionError, match="needs an importance matrix"):
        quantize(wide[0], tmp_path / "iq.gguf", mix="Q8_0", overrides=[("ffn_up", Q.IQ2_XXS)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8.gguf"]


GGUF_FINDINGS = Path(__file__).resolve().parent / "fuzz" / "gguf_findings"


@pytest.mark.parametrize("finding", sorted(GGUF_FINDINGS.glob("*.gguf")), ids=lambda p: p.name)
def test_gguf_fuzzer_findings_are_refused(finding: Path) -> None:
    """Corrupt inputs are refused by the native loader before gguf-py could over-allocate."""
    with pytest.raises(ConversionError) as info:
        quantize(finding, None, mix="Q8_0", dry_run=True)
    assert "\n" not in str(info.value)
