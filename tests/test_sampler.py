"""The native entropy-bound sampler against transformers' EntropyBoundSampler,
LinearTemperatureScheduleLogitsProcessor and StableAndConfidentStoppingCriteria on identical logits,
plus the distribution of its samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import pydgemma
import tiny_gguf
from pydgemma.sampler import Sampler, default_params


def hf_classes():
    from transformers.models.diffusion_gemma import generation_diffusion_gemma as g

    return g


def random_logits(rng, canvas: int, vocab: int, scale: float) -> np.ndarray:
    # mixed sharpness: some positions nearly one-hot, some flat, as in a real denoising step
    sharp = rng.uniform(0.2, 4.0, size=(canvas, 1))
    return (rng.standard_normal((canvas, vocab)) * scale * sharp).astype(np.float32)


def test_temperature_schedule_matches_transformers() -> None:
    g = hf_classes()
    for steps, t_min, t_max in ((48, 0.4, 0.8), (5, 0.1, 1.5), (1, 0.3, 0.3)):
        proc = g.LinearTemperatureScheduleLogitsProcessor(t_min=t_min, t_max=t_max, max_denoising_steps=steps)
        s = Sampler(canvas_len=2, n_vocab=3, max_steps=steps, t_min=t_min, t_max=t_max, seed=0)
        canvas = s.new_canvas()
        for cur_step in range(steps, 0, -1):  # transformers counts the remaining steps
            scores = torch.ones(1, 2, 3)
            expected_t = float(1.0 / proc(None, scores, cur_step=cur_step)[0, 0, 0])
            assert s.temperature == pytest.approx(expected_t, rel=1e-6)
            info = s.step(np.ones((2, 3), np.float32), canvas)
            assert info.temperature == pytest.approx(expected_t, rel=1e-6)
        assert info.stop  # max_steps reached


@pytest.mark.parametrize("bound", [0.01, 0.1, 0.5, 2.0])
def test_entropies_argmax_and_accept_masks_match_transformers(bound: float) -> None:
    g = hf_classes()
    rng = np.random.default_rng(int(bound * 100))
    canvas_len, vocab, steps = 64, 97, 8
    s = Sampler(canvas_len=canvas_len, n_vocab=vocab, max_steps=steps, entropy_bound=bound, seed=5,
                stability_threshold=1, confidence_threshold=0.005)
    hf = g.EntropyBoundSampler(g.EntropyBoundSamplerConfig(entropy_bound=bound), canvas_length=canvas_len,
                               vocab_size=vocab, max_denoising_steps=steps)
    canvas = s.new_canvas()
    for step in range(steps):
        raw = random_logits(rng, canvas_len, vocab, 3.0)
        t = s.temperature
        logits = raw.copy()
        before = canvas.copy()
        info = s.step(logits, canvas)
        processed = torch.from_numpy(raw)[None] / t
        np.testing.assert_array_equal(logits, processed[0].numpy())  # processed in place, bit for bit
        hf_entropy = torch.distributions.Categorical(logits=processed).entropy()[0].numpy()
        exact = torch.distributions.Categorical(logits=processed.double()).entropy()[0].numpy()
        # ours accumulates in double: within f32 rounding of the exact value; transformers' f32
        # computation is off by up to ~1e-5 absolute on sharp rows
        np.testing.assert_allclose(info.entropy, exact, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(info.entropy, hf_entropy, rtol=2e-5, atol=1e-5)
        np.testing.assert_array_equal(info.argmax, processed.argmax(-1)[0].numpy())
        # the same draws through transformers' acceptance give the same canvas of accepted tokens
        accepted = hf.accept_canvas(torch.from_numpy(before)[None].long(), torch.from_numpy(info.draws)[None].long(),
                                    processed, cur_step=steps - step)
        hf_mask = hf.accepted_token_mask[0].numpy()
        np.testing.assert_array_equal(info.accepted, hf_mask)
        assert info.n_accepted == hf_mask.sum() >= 1  # the lowest-entropy position is always accepted
        np.testing.assert_array_equal(canvas[hf_mask], accepted[0].numpy()[hf_mask])
        assert np.all((canvas >= 0) & (canvas < vocab))
        assert info.mean_entropy == pytest.approx(float(hf_entropy.mean()), rel=1e-5)


def test_stop_decisions_match_transformers() -> None:
    """A scripted sequence: noisy, then confident but changing, then confident and repeated."""
    g = hf_classes()
    canvas_len, vocab = 16, 11
    for stability in (0, 1, 2):
        crit = g.StableAndConfidentStoppingCriteria(stability_threshold=stability, confidence_threshold=0.005)
        s = Sampler(canvas_len=canvas_len, n_vocab=vocab, max_steps=20, seed=1, stability_threshold=stability,
                    confidence_threshold=0.005, t_min=1.0, t_max=1.0)
        canvas = s.new_canvas()
        rng = np.random.default_rng(stability)
        targets = [rng.integers(0, vocab, canvas_len) for _ in range(3)]
        script = [("noisy", None), ("noisy", None), ("sharp", 0), ("sharp", 1), ("sharp", 2), ("sharp", 2), ("sharp", 2)]
        for kind, target in script:
            if kind == "noisy":
                raw = rng.standard_normal((canvas_len, vocab)).astype(np.float32)
            else:
                raw = np.full((canvas_len, vocab), -30.0, np.float32)
                raw[np.arange(canvas_len), targets[target]] = 30.0
            processed = torch.from_numpy(raw.copy())[None]
            info = s.step(raw, canvas)
            expected = bool(crit(processed.argmax(-1), processed)[0])
            assert info.converged == expected, (stability, kind, target)
        assert info.converged  # the last steps are stable and confident


def test_samples_follow_the_softmax() -> None:
    """Chi-square of 20,000 draws (many rows of the same logits) against softmax(logits / t)."""
    vocab, rows = 8, 20000
    base = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0], np.float32)
    s = Sampler(canvas_len=rows, n_vocab=vocab, max_steps=4, t_min=0.5, t_max=0.9, seed=123)
    canvas = s.new_canvas()
    t = s.temperature
    info = s.step(np.tile(base, (rows, 1)), canvas)
    expected = np.exp(base / t - np.max(base / t))
    expected /= expected.sum()
    counts = np.bincount(info.draws, minlength=vocab)
    chi2 = float(((counts - rows * expected) ** 2 / (rows * expected)).sum())
    assert chi2 < 24.32, (chi2, counts, rows * expected)  # the 0.1 % critical value for 7 degrees of freedom
    # the initial canvas and re-noised positions are uniform over the vocabulary too
    uniform = np.bincount(s.new_canvas(), minlength=vocab)
    chi2_uniform = float(((uniform - rows / vocab) ** 2 / (rows / vocab)).sum())
    assert chi2_uniform < 24.32


def test_deterministic_for_a_seed_whatever_the_threads() -> None:
    rng = np.random.default_rng(7)
    raw = random_logits(rng, 256, 1000, 2.0)

    def run(seed: int, threads: int):
        s = Sampler(canvas_len=256, n_vocab=1000, seed=seed, n_threads=threads, max_steps=3)
        canvas = s.new_canvas()
        first = canvas.copy()
        info = s.step(raw.copy(), canvas)
        return first, canvas, info.draws

    a, b, c = run(1, 1), run(1, 2), run(2, 2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[2], c[2])


def test_defaults_come_from_the_model(tiny_model_path: Path, make_gguf) -> None:
    # tiny_gguf writes eb_max_steps 48, eb_t_min 0.4, eb_t_max 0.8 and no other eb_* key
    p = default_params(pydgemma.Model(tiny_model_path))
    assert (p["max_steps"], p["stability_threshold"]) == (48, 1)
    assert p["t_min"] == pytest.approx(0.4) and p["t_max"] == pytest.approx(0.8)
    assert p["entropy_bound"] == pytest.approx(0.1) and p["confidence_threshold"] == pytest.approx(0.005)
    custom = make_gguf(set_keys={"diffusion.eb_max_steps": ("uint32", 12), "diffusion.eb_entropy_bound": ("float32", 0.25),
                                 "diffusion.eb_t_max": ("float32", 1.2)})
    p = default_params(pydgemma.Model(custom))
    assert p["max_steps"] == 12 and p["entropy_bound"] == pytest.approx(0.25) and p["t_max"] == pytest.approx(1.2)
    assert default_params()["max_steps"] == 48  # no model: the built-in defaults


def test_bad_settings_and_inputs() -> None:
    with pytest.raises(pydgemma.PydgemmaError, match="t_min <= t_max"):
        Sampler(canvas_len=4, n_vocab=4, t_min=0.9, t_max=0.5)
    with pytest.raises(pydgemma.PydgemmaError, match="max_steps"):
        Sampler(canvas_len=4, n_vocab=4, max_steps=0)
    s = Sampler(canvas_len=4, n_vocab=4)
    with pytest.raises(pydgemma.PydgemmaError, match="logits must be"):
        s.step(np.zeros((4, 5), np.float32), s.new_canvas())
    with pytest.raises(TypeError, match="unknown sampler setting"):
        Sampler(canvas_len=4, n_vocab=4, temperature=1.0)
