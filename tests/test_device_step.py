"""The device step's C ABI as a caller meets it: the loop written with Context.step and
Sampler.decide is dg_generate, and bad input is refused with one clear message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pydgemma
from pydgemma.generate import generate_ids
from pydgemma.sampler import Sampler


@pytest.fixture(scope="module")
def model(converted: dict[str, Path]) -> pydgemma.Model:
    return pydgemma.Model(converted["f32"])


def test_the_step_loop_by_hand_is_dg_generate(model: pydgemma.Model) -> None:
    prompt = model.tokenize("count: one two", add_special=True)
    gen = generate_ids(model.context(n_ctx=128), prompt, max_new_tokens=32, sampler={"seed": 11, "max_steps": 6}, eos_ids=[])
    ctx = model.context(n_ctx=128)
    ctx.prefill(prompt)
    sampler = Sampler(model, seed=11, max_steps=6)
    tokens, steps = [], []
    for c in range(2):
        canvas = sampler.new_canvas()
        first = True
        while True:
            rows = ctx.step(canvas, sampler.temperature, sampler.uniforms(), self_cond=not first)
            info = sampler.decide(rows, canvas)
            first = False
            if info.stop:
                break
        steps.append(info.step + 1)
        tokens += info.argmax.tolist()
        if c == 0:
            ctx.commit(info.argmax)
    assert gen.tokens == tokens and gen.steps == steps
    assert ctx.step_stats["steps"] == sum(steps)


def test_uniforms_are_one_per_position_and_seeded(model: pydgemma.Model) -> None:
    a, b, c = (Sampler(model, seed=s) for s in (1, 1, 2))
    for s in (a, b, c):
        s.new_canvas()
    ua, ub, uc = a.uniforms(), b.uniforms(), c.uniforms()
    assert ua.shape == (model.hparams["canvas_length"],) and ua.dtype == np.float32
    assert np.all((ua > 0) & (ua < 1)) and np.array_equal(ua, ub) and not np.array_equal(ua, uc)
    canvas = a.new_canvas()
    a.step(np.zeros((a.canvas_len, a.n_vocab), np.float32), canvas)
    assert not np.array_equal(a.uniforms(), ua)  # the next step draws afresh


def test_bad_step_input_is_refused(model: pydgemma.Model) -> None:
    ctx = model.context(n_ctx=64)
    C = model.hparams["canvas_length"]
    canvas = np.zeros(C, np.int32)
    u = np.full(C, 0.5, np.float32)
    with pytest.raises(pydgemma.PydgemmaError, match="self_cond needs a previous step"):
        ctx.step(canvas, 0.8, u, self_cond=True)
    with pytest.raises(pydgemma.PydgemmaError, match=r"uniform 1 at index 3 is not in \(0, 1\)"):
        ctx.step(canvas, 0.8, np.where(np.arange(C) == 3, 1.0, 0.5).astype(np.float32))
    with pytest.raises(pydgemma.PydgemmaError, match="temperature must be positive"):
        ctx.step(canvas, 0.0, u)
    with pytest.raises(pydgemma.PydgemmaError, match="uniforms must have shape"):
        ctx.step(canvas, 0.8, u[:-1])
    with pytest.raises(pydgemma.PydgemmaError, match="out of range"):
        ctx.step(np.full(C, model.hparams["n_vocab"], np.int32), 0.8, u)
    ctx.step(canvas, 0.8, u)
    ctx.step(canvas, 0.8, u, self_cond=True)  # now there is a previous step
    with pytest.raises(pydgemma.PydgemmaError, match="self_cond needs a previous step"):
        ctx.step(canvas[:-1], 0.8, u[:-1], self_cond=True)  # of another length
    ctx.commit(canvas)
    with pytest.raises(pydgemma.PydgemmaError, match="self_cond needs a previous step"):
        ctx.step(canvas, 0.8, u, self_cond=True)  # a commit starts a new canvas


def test_bad_decide_input_is_refused(model: pydgemma.Model) -> None:
    s = Sampler(model, seed=0)
    canvas = s.new_canvas()
    C, V = s.canvas_len, s.n_vocab
    good = pydgemma.StepRows(np.zeros(C, np.int32), np.zeros(C, np.int32), np.zeros(C, np.float32))
    bad = pydgemma.StepRows(good.argmax, np.full(C, V, np.int32), good.entropy)
    with pytest.raises(pydgemma.PydgemmaError, match=f"id {V} at index 0 is out of range"):
        s.decide(bad, canvas)
    with pytest.raises(pydgemma.PydgemmaError, match="must have shape"):
        s.decide(pydgemma.StepRows(good.argmax[:-1], good.draws, good.entropy), canvas)
    info = s.decide(good, canvas)
    assert info.step == 0 and info.n_accepted == C and np.all(canvas == 0)  # zero entropy everywhere: all kept


def test_reduce_logits_refuses_other_shapes(model: pydgemma.Model) -> None:
    ctx = model.context(n_ctx=32)
    V = model.hparams["n_vocab"]
    with pytest.raises(pydgemma.PydgemmaError, match="logits must have shape"):
        ctx.reduce_logits(np.zeros((4, V + 1), np.float32), 1.0, np.full(4, 0.5, np.float32))
    with pytest.raises(pydgemma.PydgemmaError, match="uniforms must have shape"):
        ctx.reduce_logits(np.zeros((4, V), np.float32), 1.0, np.full(3, 0.5, np.float32))
