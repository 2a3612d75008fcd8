"""Our CPU kernels against the stock ggml ops they replace. The context's KernelPolicy picks them
(``cpu_kernels``, ``DGEMMA_NO_CPU_KERNELS``); ``ctx.kernels`` says which ran.

* q8_0_matmul (x86 AVX-512 VNNI): the integer dot products are exact and the float steps are
  ggml's, in ggml's order, so logits are identical bit for bit.
* self_cond_mix (AVX-512): ggml rounds the probabilities to F16 first, we keep them F32, so the two
  differ by that rounding only.
* activations (any CPU): GELU and softcap within a few float32 ulps of the stock f32 ops.
* sampler (any CPU): the step's reductions in double precision, the host sampler's own arithmetic
  (tests/test_device_step.py and tests/test_backend_parity.py).

Tests of an AVX-512 kernel skip on a CPU without it (they would compare ggml with itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pydgemma
from cpu_flags import AVX512, AVX512_VNNI, has_avx512, has_avx512_vnni, lacking

ALL = set(pydgemma.CPU_KERNELS)


def _logits(path: Path, kernels, sc_table: str = "auto") -> tuple[np.ndarray, list[str]]:
    """F32 KV entries: the kernels' float32-ulp differences are not rounded to F16 in between."""
    model = pydgemma.Model(path)
    V, C = model.hparams["n_vocab"], model.hparams["canvas_length"]
    rng = np.random.default_rng(3)
    ctx = model.context(n_ctx=128, cpu_kernels=kernels, kv_type="f32", sc_table=sc_table)
    ctx.prefill(rng.integers(3, V, 30))
    canvas = rng.integers(3, V, C)
    first = ctx.denoise(canvas)
    second = ctx.denoise(canvas, first / 0.6)
    ctx.commit(second.argmax(-1).astype(np.int32))
    third = ctx.denoise(canvas)
    return np.stack([first, second, third]), ctx.kernels


def _per_token(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.skipif(not has_avx512_vnni(), reason=lacking(AVX512_VNNI, "Q8_0 matmul"))
def test_q8_0_matmuls_match_ggml_bit_for_bit(converted: dict[str, Path]) -> None:
    """Steps without self-conditioning (the first, and one after a commit)."""
    ours, on = _logits(converted["q8_0"], ALL)
    ggml_path, off = _logits(converted["q8_0"], ALL - {"q8_0_matmul"})
    assert "q8_0_matmul" in on and "q8_0_matmul" not in off
    assert np.isfinite(ours).all()
    np.testing.assert_array_equal(ours[[0, 2]], ggml_path[[0, 2]])
    import gguf

    matrices = [t for t in gguf.GGUFReader(converted["q8_0"]).tensors if t.name.endswith(".weight") and
                len(t.shape) >= 2 and "norm" not in t.name and "ffn_gate_inp" not in t.name]
    # every matmul weight qualifies for the kernels, so the comparison above covered them
    assert matrices and all(t.tensor_type.name == "Q8_0" and int(t.shape[0]) % 32 == 0 for t in matrices)


@pytest.mark.skipif(not has_avx512(), reason=lacking(AVX512, "self-conditioning"))
def test_self_conditioning_mix_differs_by_f16_rounding_only(converted: dict[str, Path]) -> None:
    ours, on = _logits(converted["f16"], ALL, sc_table="f16")  # the kernel takes an F16 table
    ggml_path, off = _logits(converted["f16"], ALL - {"self_cond_mix"}, sc_table="f16")
    assert "self_cond_mix" in on and "self_cond_mix" not in off
    per_token = _per_token(ours[1], ggml_path[1])
    assert np.median(per_token) < 1e-3 and per_token.max() < 1e-2
    assert not np.array_equal(ours[1], ggml_path[1])  # the kernel really ran
    np.testing.assert_array_equal(ours[[0, 2]], ggml_path[[0, 2]])  # no self-conditioning: nothing else changed


@pytest.mark.skipif(not has_avx512(), reason=lacking(AVX512, "self-conditioning"))
def test_q8_0_table_mix_keeps_the_probabilities_in_f32(converted: dict[str, Path]) -> None:
    """A Q8_0 table (the default for quantized embeddings): the kernel widens each value to F32 and
    keeps the probabilities F32, where ggml rounds the probabilities to Q8_0 too. Against the exact
    F32 table (measured: 2.8e-3 median per token, ggml's 3.2e-3): the table's rounding, less than ggml."""
    exact, _ = _logits(converted["f32"], ALL, sc_table="f32")
    ours, on = _logits(converted["f32"], ALL, sc_table="q8_0")
    ggml_path, off = _logits(converted["f32"], ALL - {"self_cond_mix"}, sc_table="q8_0")
    assert "self_cond_mix" in on and "self_cond_mix" not in off
    mine, theirs = np.median(_per_token(ours[1], exact[1])), np.median(_per_token(ggml_path[1], exact[1]))
    assert 0 < mine < theirs < 1e-2
    np.testing.assert_array_equal(ours[[0, 2]], ggml_path[[0, 2]])  # no self-conditioning: nothing else changed


def test_activations_match_the_stock_f32_ops(converted: dict[str, Path]) -> None:
    """GELU (every MLP and expert) and the final softcap: a few float32 ulps apart, on any CPU."""
    ours, on = _logits(converted["f32"], ALL)
    stock, off = _logits(converted["f32"], ALL - {"activations"})
    assert "activations" in on and "activations" not in off
    per_token = _per_token(ours, stock)
    assert np.median(per_token) < 1e-6 and per_token.max() < 1e-5
    assert not np.array_equal(ours, stock)  # a different exp really ran


def test_the_policy_follows_the_cpu_and_the_mask(converted: dict[str, Path]) -> None:
    model = pydgemma.Model(converted["q8_0"])
    expected = [k for k in pydgemma.CPU_KERNELS if k not in ({"q8_0_matmul"} if not has_avx512_vnni() else set()) |
                ({"self_cond_mix"} if not has_avx512() else set())]
    assert model.context(n_ctx=32, cpu_kernels="all").kernels == expected
    assert model.context(n_ctx=32, cpu_kernels="none").kernels == []
    assert model.context(n_ctx=32, cpu_kernels=["sampler"]).kernels == ["sampler"]
    with pytest.raises(pydgemma.PydgemmaError, match="unknown CPU kernel 'gemm'"):
        model.context(n_ctx=32, cpu_kernels=["gemm"])


@pytest.mark.parametrize(("value", "kernels"), [("1", []), ("all", []), ("", None), ("0", None),
                                                 ("sampler,activations", ["q8_0_matmul", "self_cond_mix"])])
def test_dgemma_no_cpu_kernels(converted: dict[str, Path], value: str, kernels: list[str] | None) -> None:
    script = "import sys, pydgemma; print(' '.join(pydgemma.Model(sys.argv[1]).context(n_ctx=32).kernels))"
    env = {**os.environ, "DGEMMA_NO_CPU_KERNELS": value}
    r = subprocess.run([sys.executable, "-c", script, str(converted["q8_0"])], capture_output=True, text=True, env=env,
                       timeout=120, check=True)
    everything = pydgemma.Model(converted["q8_0"]).context(n_ctx=32, cpu_kernels="all").kernels
    expected = everything if kernels is None else [k for k in kernels if k in everything]
    assert r.stdout.split() == expected


def test_dgemma_no_cpu_kernels_names_an_unknown_kernel(converted: dict[str, Path]) -> None:
    env = {**os.environ, "DGEMMA_NO_CPU_KERNELS": "sampler,gemm"}
    r = subprocess.run([sys.executable, "-m", "pydgemma", "run", "-m", str(converted["f32"]), "-p", "hi",
                        "--max-tokens", "4"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: DGEMMA_NO_CPU_KERNELS: unknown kernel 'gemm' (known: 1, all, q8_0_matmul, self_cond_mix, activations, sampler)"]
