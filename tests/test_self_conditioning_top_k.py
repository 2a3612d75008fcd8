"""Approximate self-conditioning over each row's top k tokens (context option sc_top_k)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pydgemma
from pydgemma.errors import PydgemmaError


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def setup(converted: dict[str, Path]):
    model = pydgemma.Model(converted["f32"])
    V, C = model.hparams["n_vocab"], model.hparams["canvas_length"]
    rng = np.random.default_rng(7)
    prompt = rng.integers(3, V, 12)
    canvas = rng.integers(3, V, C)
    sc = (rng.standard_normal((C, V)) * 3).astype(np.float32)
    return model, prompt, canvas, sc


def _denoise(model, prompt, canvas, sc, k: int) -> np.ndarray:
    # F32 KV entries: the paths' float32 differences are not rounded to F16 in between (the table of
    # this F32 model is F32: the embedding itself, as the top-k path reads it)
    ctx = model.context(n_ctx=64, sc_top_k=k, kv_type="f32")
    ctx.prefill(prompt)
    return ctx.denoise(canvas, sc)


def test_top_1_is_the_argmax_embedding(setup) -> None:
    """k = 1 puts all weight on each row's most likely token: exactly the exact path fed one-hot
    logits (every other logit -1e30, whose softmax weight is exactly 0 in float32)."""
    model, prompt, canvas, sc = setup
    one_hot = np.full_like(sc, -1e30)
    one_hot[np.arange(len(sc)), sc.argmax(axis=1)] = 0.0
    exact = _denoise(model, prompt, canvas, one_hot, 0)
    assert _rel(_denoise(model, prompt, canvas, sc, 1), exact) < 1e-6
    assert _rel(_denoise(model, prompt, canvas, sc, 0), exact) > 1e-3  # the input really matters


def test_top_k_over_the_whole_vocabulary_is_exact(setup) -> None:
    model, prompt, canvas, sc = setup
    V = model.hparams["n_vocab"]
    assert _rel(_denoise(model, prompt, canvas, sc, V), _denoise(model, prompt, canvas, sc, 0)) < 1e-5


@pytest.mark.slow
def test_top_k_drift_shrinks_with_k(setup) -> None:
    model, prompt, canvas, sc = setup
    exact = _denoise(model, prompt, canvas, sc, 0)
    errors = [_rel(_denoise(model, prompt, canvas, sc, k), exact) for k in (4, 64, 256)]
    assert errors[0] > errors[1] > errors[2] > 0


def test_bad_k_is_refused(setup) -> None:
    model = setup[0]
    with pytest.raises(PydgemmaError, match="exceeds the vocabulary"):
        model.context(n_ctx=64, sc_top_k=model.hparams["n_vocab"] + 1)
    with pytest.raises(PydgemmaError, match="sc_top_k must be 0"):
        model.context(n_ctx=64, sc_top_k=-1)


@pytest.mark.slow
def test_cli_run_with_top_k(converted: dict[str, Path]) -> None:
    r = subprocess.run([sys.executable, "-m", "pydgemma", "run", "-m", str(converted["f32"]), "-p", "hi", "--seed", "1",
                        "--steps", "4", "--sc-top-k", "8", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    steps = json.loads(r.stdout)["steps"]
    assert len(steps) == 1 and 1 <= steps[0] <= 4
    r = subprocess.run([sys.executable, "-m", "pydgemma", "run", "-m", str(converted["f32"]), "-p", "hi",
                        "--sc-top-k", "100000000"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "exceeds the vocabulary" in r.stderr


@pytest.mark.slow
def test_drift_measures_the_approximation(converted: dict[str, Path], tmp_path: Path) -> None:
    """`pydgemma-quantize drift --sc-top-k K` with the same file as reference and model measures the
    approximation alone: nothing over the whole vocabulary, something for k = 1."""
    from pydgemma.quantize.drift import measure

    f32 = converted["f32"]
    V = pydgemma.Model(f32).hparams["n_vocab"]
    whole = measure(f32, ref_path=f32, canvases=2, max_steps=3, task="none", sc_top_k=V)
    assert whole["settings"]["sc_top_k"] == V
    assert whole["teacher_forced"]["kl"]["max"] < 1e-6 and whole["teacher_forced"]["top1"] == 1.0
    top1 = measure(f32, ref_path=f32, canvases=2, max_steps=3, task="none", sc_top_k=1)
    assert top1["teacher_forced"]["kl"]["mean"] > 1e-4
