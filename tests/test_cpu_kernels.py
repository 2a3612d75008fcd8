"""Our CPU kernels against ggml's own ops (DGEMMA_NO_CPU_KERNELS=1 switches them off).

* Q8_0 matmuls and routed experts (x86 with AVX-512 VNNI): the integer dot products are exact and
  the float steps are ggml's, in ggml's order, so logits are identical bit for bit.
* Self-conditioning's probabilities x F16 embedding (AVX-512): ggml rounds the probabilities to F16
  first, we keep them F32, so the two differ by that rounding only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

_SCRIPT = r"""
import sys, numpy as np, pydgemma
model = pydgemma.Model(sys.argv[1])
V, C = model.hparams["n_vocab"], model.hparams["canvas_length"]
rng = np.random.default_rng(3)
ctx = model.context(n_ctx=128)
ctx.prefill(rng.integers(3, V, 30))
canvas = rng.integers(3, V, C)
first = ctx.denoise(canvas)
second = ctx.denoise(canvas, first / 0.6)
ctx.commit(second.argmax(-1).astype(np.int32))
third = ctx.denoise(canvas)
np.save(sys.argv[2], np.stack([first, second, third]))
"""


def _vnni() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return all(f in flags.split() for f in ("avx512f", "avx512vl", "avx512bw", "avx512_vnni"))


def _logits(model: Path, out: Path, *, kernel: bool) -> np.ndarray:
    env = dict(os.environ)
    env.pop("DGEMMA_NO_CPU_KERNELS", None)
    if not kernel:
        env["DGEMMA_NO_CPU_KERNELS"] = "1"
    subprocess.run([sys.executable, "-c", _SCRIPT, str(model), str(out)], check=True, env=env, timeout=300)
    return np.load(out)


def _avx512() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512f" in flags.split()


def test_q8_0_matmuls_match_ggml_bit_for_bit(converted: dict[str, Path], tmp_path: Path) -> None:
    """Steps without self-conditioning (the first, and one after a commit). On a CPU without
    AVX-512 VNNI both runs take ggml's path (and agree trivially)."""
    ours = _logits(converted["q8_0"], tmp_path / "ours.npy", kernel=True)
    ggml_path = _logits(converted["q8_0"], tmp_path / "ggml.npy", kernel=False)
    assert ours.shape[0] == 3 and np.isfinite(ours).all()
    np.testing.assert_array_equal(ours[[0, 2]], ggml_path[[0, 2]])
    if _vnni():
        import gguf

        matrices = [t for t in gguf.GGUFReader(converted["q8_0"]).tensors if t.name.endswith(".weight") and
                    len(t.shape) >= 2 and "norm" not in t.name and "ffn_gate_inp" not in t.name]
        # every matmul weight qualifies for the kernels, so the comparison above covered them
        assert matrices and all(t.tensor_type.name == "Q8_0" and int(t.shape[0]) % 32 == 0 for t in matrices)


def test_self_conditioning_mix_differs_by_f16_rounding_only(converted: dict[str, Path], tmp_path: Path) -> None:
    ours = _logits(converted["f16"], tmp_path / "ours.npy", kernel=True)[1]
    ggml_path = _logits(converted["f16"], tmp_path / "ggml.npy", kernel=False)[1]
    per_token = np.linalg.norm(ours - ggml_path, axis=-1) / np.linalg.norm(ggml_path, axis=-1)
    assert np.median(per_token) < 1e-3 and per_token.max() < 1e-2
    if _avx512():
        assert not np.array_equal(ours, ggml_path)  # the kernel really ran
