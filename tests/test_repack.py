"""Quantized matmul weights in ggml's CPU repack buffer (Model(repack=True), the default) against
weights read straight from the file mapping.

ggml picks its repacked kernels by the instruction set it was compiled for. What holds on every
x86-64 CPU with AVX2: a repacked model is as close to the F32 model as the plain one. Where ggml's
CPU build reports AVX-512, its repacked Q4_K kernels differ from the plain ones in summation order
only (measured: ~2e-7 per token); its AVX2 kernels compute differently (measured on a Zen 3: 1.8e-2
per token) without being worse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pydgemma


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model wide enough (rows of 256) for real Q4_K tensors, which ggml repacks on x86."""
    from pydgemma.models.tiny_checkpoint import TinySpec, build_tiny_checkpoint
    from pydgemma.quantize import convert
    from pydgemma.quantize.quantize import quantize

    work = tmp_path_factory.mktemp("repack")
    spec = TinySpec(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_attention_heads=4,
                    head_dim=64, global_head_dim=64, canvas_length=32)
    f32 = convert(build_tiny_checkpoint(work / "hf", spec), work / "f32.gguf", out_type="f32").path
    quantize(f32, work / "q4_k_m.gguf", mix="Q4_K_M")
    return {"f32": f32, "q4_k_m": work / "q4_k_m.gguf"}


def _logits(path: Path, repack: bool, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ctx = pydgemma.Model(path, repack=repack).context(n_ctx=64, kv_type="f32")  # no F16 rounding of the differences
    ctx.prefill(rng.integers(3, 512, 20))
    canvas = rng.integers(3, 512, 32)
    first = ctx.denoise(canvas)
    return np.stack([first, ctx.denoise(canvas, first / 0.7)])


def _per_token(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)).ravel()


def _ggml_cpu_features() -> tuple[str, ...]:
    return next(d.features for d in pydgemma.devices() if d.name == "CPU")


def test_repacked_weights_are_as_close_to_f32_as_plain_ones(models: dict[str, Path]) -> None:
    exact = _logits(models["f32"], False)
    plain, repacked = _logits(models["q4_k_m"], False), _logits(models["q4_k_m"], True)
    to_plain, to_repacked = _per_token(plain, exact), _per_token(repacked, exact)
    # Q4_K_M on rows of 256 is ~0.3 per token from F32; repacking may move a token either way, but
    # not the model: medians and 90th percentiles within 5 % of each other
    assert 0.05 < np.median(to_plain) < 1.0
    assert np.median(to_repacked) <= 1.05 * np.median(to_plain)
    assert np.quantile(to_repacked, 0.9) <= 1.05 * np.quantile(to_plain, 0.9)
    if "REPACK" in _ggml_cpu_features() and "AVX2" in _ggml_cpu_features():
        # ggml has tiled Q4_K kernels here: a different kernel really ran
        assert not np.array_equal(repacked, plain)


@pytest.mark.skipif("AVX512" not in _ggml_cpu_features(),
                    reason="ggml's AVX2 repacked Q4_K kernels compute differently from its plain ones (not only in "
                           "summation order); the test above covers them")
@pytest.mark.slow
def test_avx512_repacked_kernels_move_logits_far_less_than_the_quantization(models: dict[str, Path]) -> None:
    """The repacked AVX-512 Q4_K kernels sum in another order than the plain ones. Each product's
    activations are then rounded to Q8_K for the next, so ulp differences flip roundings and cascade
    through this random model: per token ~1.5e-2 on most prompts (measured on 8 prompts, before and
    after the in-place KV cache; one prompt happened to stay at 2e-7). What holds on every prompt:
    repacking moves the logits by less than a tenth of what the quantization itself does (~0.3)."""
    exact = _logits(models["f32"], False)
    for seed in (0, 1, 2):
        plain, repacked = _logits(models["q4_k_m"], False, seed), _logits(models["q4_k_m"], True, seed)
        quantization = np.median(_per_token(plain, _logits(models["f32"], False, seed)))
        assert 0.05 < quantization < 1.0
        assert np.median(_per_token(repacked, plain)) < 0.1 * quantization, seed
        assert not np.array_equal(repacked, plain)
    assert exact.shape == plain.shape
