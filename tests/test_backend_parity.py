"""The backend under test against the CPU's custom-op path: denoising logits, the device step's
sampler reductions, whole generations, and the step's traffic.

Unset PYDGEMMA_TEST_DEVICE (every test run): the CPU with stock ggml ops only (cpu_kernels="none",
what every other backend runs) against the CPU with our kernels. PYDGEMMA_TEST_DEVICE=Vulkan0 (CI's
Vulkan lane on lavapipe): that device against the CPU.

Tolerances (per-token relative L2 of logits, median and 95th percentile; `_TOL`):
* CPU stock vs custom: our GELU/softcap differ from the stock f32 ops by a few ulps (1e-7), which
  six layers carry to ~1e-6; a near-tied expert choice can flip for a token (seen ~1e-3).
* Vulkan, F32 weights: ggml-vulkan's matrix products round their activations to F16 (11-bit
  mantissa, 2.4e-4 relative per element): measured on lavapipe 0.9-1.4e-3 per token (median), up to
  6e-3 for a token whose expert choice flipped; bounds 3e-3 / 1e-2.
* Vulkan, Q8_0 weights: the reference is the CPU, whose Q8_0 products quantize their activations to
  8-bit blocks (an error up to 1/254 of each 32-value block's maximum, ~0.5 % per element), while
  Vulkan without integer dot products (lavapipe) multiplies F16 activations: measured 1.7-2.4e-2
  (median), 2.4-6e-2 (p95); bounds 3e-2 / 8e-2 (with self-conditioning 4e-2 / 1e-1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pydgemma
from step_bytes import step_bytes_to_device
from conftest import device_under_test
from pydgemma.generate import generate_ids
from pydgemma.sampler import Sampler

DEVICE = device_under_test()
ON_CPU = DEVICE.upper() == "CPU"
# (median, 95th percentile) of per-token relative L2 against the CPU's custom-op path, by weights and step kind
if ON_CPU:
    _TOL = {(w, k): (1e-5, 1e-4) for w in ("f32", "q8_0") for k in ("plain", "self_cond")}
else:
    _TOL = {("f32", "plain"): (3e-3, 1e-2), ("f32", "self_cond"): (3e-3, 1e-2),
            ("q8_0", "plain"): (3e-2, 8e-2), ("q8_0", "self_cond"): (4e-2, 1e-1)}
MODELS = ["f32", "q8_0", "odd-f32", "odd-q8_0"]


@pytest.fixture(scope="module")
def paths(converted: dict[str, Path], converted_odd: dict[str, Path]) -> dict[str, Path]:
    return {"f32": converted["f32"], "q8_0": converted["q8_0"], "odd-f32": converted_odd["f32"],
            "odd-q8_0": converted_odd["q8_0"]}


def under_test(path: Path) -> pydgemma.Context:
    model = pydgemma.Model(path, device=DEVICE)
    return model.context(n_ctx=160, cpu_kernels="none", kv_type="f32")


# Our self-conditioning kernel keeps the probabilities in F32 where ggml's product rounds them to
# F16 (tests/test_cpu_kernels.py measures that difference); the reference leaves it out, so that
# both sides round alike and only the op implementations differ.
REFERENCE_KERNELS = [k for k in pydgemma.CPU_KERNELS if k != "self_cond_mix"]


def reference(path: Path) -> pydgemma.Context:
    return pydgemma.Model(path, device="cpu").context(n_ctx=160, cpu_kernels=REFERENCE_KERNELS, kv_type="f32")


def per_token(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a.astype(np.float64) - b, axis=-1) / np.linalg.norm(b.astype(np.float64), axis=-1)


def entropy_f64(logits: np.ndarray) -> np.ndarray:
    """Entropy of softmax rows in float64, exact however sharp the row (log1p of the tail)."""
    x = logits.astype(np.float64)
    d = x - x.max(axis=1, keepdims=True)
    e = np.exp(d)
    k = (d == 0).sum(axis=1)
    r = np.where(d < 0, e, 0.0).sum(axis=1)
    v = (e * d).sum(axis=1)
    return np.log(k) + np.log1p(r / k) - v / (k + r)


def inverse_cdf_f64(logits: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first id whose cumulative probability reaches u, and how far u is from the nearest CDF step."""
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(axis=1, keepdims=True))
    cdf = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)
    draws = (cdf < u[:, None]).sum(axis=1)
    margin = np.abs(cdf - u[:, None]).min(axis=1)
    return np.minimum(draws, logits.shape[1] - 1), margin


def test_the_device_is_there() -> None:
    assert DEVICE.upper() in [d.name.upper() for d in pydgemma.devices()]  # the CPU is always one
    ctx = under_test(Path(__file__).parent.parent / "models" / "demo" / "sudoku4-q8_0.gguf")
    assert ctx.model.device.upper() == DEVICE.upper() and ctx.kernels == []


@pytest.mark.parametrize("name", MODELS)
def test_denoise_logits_match(paths: dict[str, Path], name: str) -> None:
    """Prefill, a first step, a step with self-conditioning, a commit, the next canvas's first step."""
    outs = []
    for ctx in (under_test(paths[name]), reference(paths[name])):
        V, C = ctx.model.hparams["n_vocab"], ctx.model.hparams["canvas_length"]
        r = np.random.default_rng(7)  # the same inputs for both
        ctx.prefill(r.integers(0, V, 37))
        canvas = r.integers(0, V, C)
        first = ctx.denoise(canvas)
        second = ctx.denoise(canvas, first / 0.6)
        ctx.commit(canvas)
        third = ctx.denoise(r.integers(0, V, C))
        outs.append((first, second, third))
    (a1, a2, a3), (b1, b2, b3) = outs
    for got, want, kind in ((a1, b1, "plain"), (a2, b2, "self_cond"), (a3, b3, "plain")):
        e = per_token(got, want)
        med, p95 = _TOL["q8_0" if "q8_0" in name else "f32", kind]
        assert np.median(e) < med and np.quantile(e, 0.95) < p95, (kind, float(np.median(e)), float(e.max()))


def test_step_reductions_on_scripted_logits(paths: dict[str, Path]) -> None:
    """Mixed sharpness (down to entropies of 1e-30), ties at the maximum, -1e4 logits."""
    ctx = under_test(paths["odd-f32"])
    V = ctx.model.hparams["n_vocab"]
    rng = np.random.default_rng(11)
    n = 512
    logits = (rng.standard_normal((n, V)) * rng.uniform(0.05, 40.0, (n, 1))).astype(np.float32)
    logits[::17, 5] = logits[::17].max(axis=1)  # ties at the maximum
    logits[3, :100] = -1e4
    u = rng.uniform(0.0, 1.0, n).astype(np.float32)
    t = 0.7
    rows = ctx.reduce_logits(logits, t, u)
    processed = logits / np.float32(t)
    # the argmax is a maximum; without a tie, the one. (Tied maxima: the host sampler and our CPU kernel
    # take the first, as torch.argmax does; ggml's argmax takes one of them, on the CPU the last.)
    np.testing.assert_array_equal(processed[np.arange(n), rows.argmax], processed.max(axis=1))
    untied = (processed == processed.max(axis=1, keepdims=True)).sum(axis=1) == 1
    assert untied.sum() >= n - n // 17 - 1
    np.testing.assert_array_equal(rows.argmax[untied], processed.argmax(axis=1)[untied])
    exact = entropy_f64(processed)
    assert exact.min() < 1e-20  # sharp rows are in the test
    # relative 1e-5 wherever float32 holds the value with full precision (normal numbers; below that
    # its subnormals step by 1.4e-45)
    np.testing.assert_allclose(rows.entropy, exact, rtol=1e-5, atol=1e-5 * np.finfo(np.float32).tiny)
    draws, margin = inverse_cdf_f64(processed, u)
    clear = margin > 1e-5  # float32 CDFs may put a uniform this close to a step on either side
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(rows.draws[clear], draws[clear])
    assert np.all((rows.draws >= 0) & (rows.draws < V))


def test_categorical_draws_pass_a_chi_square_test(paths: dict[str, Path]) -> None:
    """24,576 draws from one distribution (softmax of a fixed row / t) on the device."""
    import torch

    ctx = under_test(paths["f32"])
    V = ctx.model.hparams["n_vocab"]
    rng = np.random.default_rng(5)
    row = (rng.standard_normal(V) * 2.0).astype(np.float32)
    n = 24_576
    t = 0.8
    rows = ctx.reduce_logits(np.tile(row, (n, 1)), t, rng.uniform(0.0, 1.0, n).astype(np.float32))
    x = row.astype(np.float64) / np.float32(t)
    p = np.exp(x - x.max())
    p /= p.sum()
    expected = p * n
    observed = np.bincount(rows.draws, minlength=V).astype(np.float64)
    # pool the ids expected fewer than 5 times into one bin
    small = expected < 5
    exp_bins = np.append(expected[~small], expected[small].sum())
    obs_bins = np.append(observed[~small], observed[small].sum())
    chi2 = float(((obs_bins - exp_bins) ** 2 / exp_bins).sum())
    dof = len(exp_bins) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(chi2 / 2, dtype=torch.float64)))
    assert dof > 50 and p_value > 1e-3, (chi2, dof, p_value)
    assert observed[p == 0].sum() == 0


@pytest.mark.parametrize("name", MODELS)
def test_step_equals_denoise_then_host_sampler(paths: dict[str, Path], name: str) -> None:
    """On the same device: dg_context_step against dg_denoise (full logits to the host, previous
    processed logits uploaded) followed by the host sampler, over 5 steps with self-conditioning."""
    ctx = under_test(paths[name])
    host = under_test(paths[name])
    m = ctx.model
    prompt = np.random.default_rng(3).integers(0, m.hparams["n_vocab"], 21)
    ctx.prefill(prompt)
    host.prefill(prompt)
    s_dev, s_host = Sampler(m, seed=9, max_steps=5), Sampler(m, seed=9, max_steps=5)
    c_dev, c_host = s_dev.new_canvas(), s_host.new_canvas()
    sc = None
    for k in range(5):
        u = s_dev.uniforms()
        rows = ctx.step(c_dev, s_dev.temperature, u, self_cond=k > 0)
        logits = host.denoise(c_host, sc)
        info = s_host.step(logits, c_host)  # logits -> processed, in place
        sc = logits
        # the same argmaxes where the maximum is unique; at exact ties (the odd model's padded
        # vocabulary rows give identical logits) ggml's argmax may take any maximum, the host the first
        top = logits.max(axis=1)
        assert (logits[np.arange(len(logits)), rows.argmax] == top).all()
        unique = (logits == top[:, None]).sum(axis=1) == 1
        np.testing.assert_array_equal(rows.argmax[unique], info.argmax[unique])
        np.testing.assert_allclose(rows.entropy, info.entropy, rtol=1e-5, atol=1e-5 * np.finfo(np.float32).tiny)
        # the device's float32 reductions against the host's double: equal draws away from CDF steps
        _, margin = inverse_cdf_f64(logits, u)
        clear = margin > 1e-5
        np.testing.assert_array_equal(rows.draws[clear], info.draws[clear])
        decided = s_dev.decide(rows, c_dev)
        if not np.array_equal(rows.draws, info.draws) or not unique.all():
            break  # a draw on a CDF step, or a tied argmax, went the other way: the runs part from here
        np.testing.assert_array_equal(c_dev, c_host)
        assert decided.n_accepted == info.n_accepted and decided.stop == info.stop


@pytest.mark.parametrize("name", [m if not m.startswith("odd") else pytest.param(m, marks=pytest.mark.slow)
                                  for m in MODELS])
def test_generation_works_and_is_deterministic(paths: dict[str, Path], name: str) -> None:
    model = pydgemma.Model(paths[name], device=DEVICE)
    C = model.hparams["canvas_length"]
    prompt = model.tokenize("the device step", add_special=True)
    runs = []
    for _ in range(2):
        ctx = model.context(n_ctx=160, cpu_kernels="none", kv_type="f32")
        runs.append(generate_ids(ctx, prompt, max_new_tokens=2 * C, sampler={"seed": 4, "max_steps": 8}, eos_ids=[]))
    a, b = runs
    assert a.tokens == b.tokens and a.steps == b.steps
    assert len(a.tokens) == 2 * C and all(0 <= t < model.hparams["n_vocab"] for t in a.tokens)
    assert len(a.steps) == 2 and all(1 <= s <= 8 for s in a.steps)
    # per step: in, the canvas, its positions, n uniforms, the temperature and the KV cache's slots
    # and mask rows (tests/step_bytes.py; the view is the same for both canvases); out, 12 bytes a position
    assert a.transfer["from_device"] == 12 * C * a.n_forwards
    assert a.transfer["to_device"] == step_bytes_to_device(model, ctx.info, len(prompt)) * a.n_forwards
    if ON_CPU:
        # Stock ops and our kernels give the same text. On Q8_0 models the comparison keeps ggml's
        # GELU/softcap: ours differ from it by float32 ulps, which the 8-bit quantization of the next
        # product's activations turns into whole rounding steps, and this random model's near-flat
        # logits into other argmaxes (test_denoise_logits_match bounds that difference).
        kernels = REFERENCE_KERNELS if "q8_0" not in name else ["sampler"]
        ref_ctx = pydgemma.Model(paths[name], device="cpu").context(n_ctx=160, cpu_kernels=kernels, kv_type="f32")
        ref = generate_ids(ref_ctx, prompt, max_new_tokens=2 * C, sampler={"seed": 4, "max_steps": 8}, eos_ids=[])
        assert ref_ctx.kernels and a.tokens == ref.tokens and a.steps == ref.steps
