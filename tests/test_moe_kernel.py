"""Our Q8_0 expert kernel (x86 with AVX-512 VNNI) against ggml's own mul_mat_id: the integer dot
products are exact and the float steps are ggml's, in ggml's order, so the logits are identical."""

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
    env.pop("DGEMMA_NO_MOE_KERNEL", None)
    if not kernel:
        env["DGEMMA_NO_MOE_KERNEL"] = "1"
    subprocess.run([sys.executable, "-c", _SCRIPT, str(model), str(out)], check=True, env=env, timeout=300)
    return np.load(out)


def test_q8_0_experts_match_ggml_bit_for_bit(converted: dict[str, Path], tmp_path: Path) -> None:
    """On a CPU without AVX-512 VNNI both runs take ggml's path (and agree trivially)."""
    ours = _logits(converted["q8_0"], tmp_path / "ours.npy", kernel=True)
    ggml_path = _logits(converted["q8_0"], tmp_path / "ggml.npy", kernel=False)
    assert ours.shape[0] == 3 and np.isfinite(ours).all()
    np.testing.assert_array_equal(ours, ggml_path)
    if _vnni():
        import gguf

        experts = [t for t in gguf.GGUFReader(converted["q8_0"]).tensors if "_exps.weight" in t.name]
        # every expert tensor qualifies for the kernel, so the comparison above covered it
        assert experts and all(t.tensor_type.name == "Q8_0" and int(t.shape[0]) % 32 == 0 for t in experts)
