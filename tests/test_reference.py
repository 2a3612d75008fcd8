"""The reference oracle (pydgemma.models.reference) against transformers' own ``generate``.

``generate`` is run on the session's own model with its decoder and encoder calls recorded
(``model.forward`` is what generate calls for each denoising step; ``model.model.encoder`` for the
prompt and for each finished canvas). The recorded canvases and self-conditioning logits are then
replayed through the session, which must reproduce generate's logits exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from pydgemma.models.reference import ReferenceSession  # noqa: E402
from pydgemma.models.tiny_checkpoint import TinySpec, build_model, build_tiny_checkpoint  # noqa: E402

SPEC = TinySpec()  # 5 sliding (window 16) + 1 full layer, canvas 16, use_bidirectional_attention="vision"
C = SPEC.canvas_length
W = SPEC.sliding_window


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> ReferenceSession:
    return ReferenceSession(build_tiny_checkpoint(tmp_path_factory.mktemp("reference") / "tiny"))


def _prompt(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    # Ids below 20 include the image tokens, which make generate warn about missing pixel_values.
    return torch.randint(20, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@contextmanager
def _recording(model):
    """Records each decoder call generate makes (inputs and logits) and each encoder call."""
    rec = SimpleNamespace(decoder=[], encoder=[])
    original = model.forward

    def forward(**kwargs):
        out = original(**kwargs)
        sc = kwargs["self_conditioning_logits"]
        rec.decoder.append(
            SimpleNamespace(
                canvas=kwargs["decoder_input_ids"][0].clone(),
                sc=None if sc is None else sc[0].clone(),
                positions=kwargs["decoder_position_ids"][0].tolist(),
                masks=kwargs["decoder_attention_mask"],
                n_cached=kwargs["past_key_values"].get_seq_length(),
                logits=out.logits[0].clone(),
            )
        )
        return out

    def encoder_hook(_module, _args, kwargs):
        ids, positions = kwargs["input_ids"][0].clone(), kwargs["position_ids"][0].tolist()
        rec.encoder.append(SimpleNamespace(ids=ids, positions=positions))

    model.forward = forward  # generate reads self.forward (L714), so an instance attribute intercepts it
    hook = model.model.encoder.register_forward_pre_hook(encoder_hook, with_kwargs=True)
    try:
        yield rec
    finally:
        del model.forward
        hook.remove()


def _generate(model, prompt, *, canvases: int, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    with _recording(model) as rec:
        # No EOS stop and no adaptive stop: every canvas runs all its steps.
        out = model.generate(
            prompt[None],
            max_new_tokens=canvases * C,
            max_denoising_steps=steps,
            eos_token_id=None,
            stability_threshold=None,
        )
    assert len(rec.decoder) == canvases * steps and len(rec.encoder) == canvases
    return out, rec


def _same(got: np.ndarray, want: torch.Tensor) -> None:
    assert got.dtype == np.float32 and got.shape == tuple(want.shape)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)


def _temperature(gen_config, cur_step: int, steps: int) -> torch.Tensor:
    # LinearTemperatureScheduleLogitsProcessor (L315) with generate's int32 tensor step (L1024).
    step = torch.tensor(cur_step, dtype=torch.int32)
    return gen_config.t_min + (gen_config.t_max - gen_config.t_min) * (step / steps)


@pytest.mark.parametrize("prompt_len", [10, 40])
def test_first_step_equals_generate(session, prompt_len):
    model = session.model
    prompt = _prompt(prompt_len, model.config.text_config.vocab_size)
    _, rec = _generate(model, prompt, canvases=1, steps=1)
    step = rec.decoder[0]
    assert step.sc is None and step.positions == list(range(prompt_len, prompt_len + C))
    assert rec.encoder[0].positions == list(range(prompt_len))

    session.reset()
    session.prefill(prompt.tolist())
    assert session.n_past == prompt_len == session.cache.get_seq_length(layer_idx=0)
    _same(session.denoise(step.canvas.numpy()), step.logits)


def test_sliding_cache_counts_all_tokens_but_keeps_window(session):
    """Fact 1: layer 0 is sliding; its get_seq_length is every token seen, its keys the window."""
    session.reset()
    session.prefill(_prompt(40, session.model.config.text_config.vocab_size).numpy())
    layers = session.cache.layers
    assert [layer.is_sliding for layer in layers] == [True] * 5 + [False]
    assert session.cache.get_seq_length(layer_idx=0) == 40 == session.n_past
    assert [layer.keys.shape[-2] for layer in layers] == [W - 1] * 5 + [40]


@pytest.mark.parametrize("prompt_len", [10, 40])
def test_canvas_sees_window_of_prefix_in_sliding_layers(session, prompt_len):
    """Fact 2: no decoder mask; sliding layers hand the canvas min(n_past, W-1) prefix keys."""
    seen, masks = [], []
    attns = [layer.self_attn for layer in session.model.model.decoder.layers]
    assert not any(a.is_causal for a in attns)
    record_mask = lambda _m, _a, kwargs: masks.append(kwargs["attention_mask"])  # noqa: E731
    hooks = [attn.register_forward_pre_hook(record_mask, with_kwargs=True) for attn in attns]
    for attn in attns:
        original = attn.append_to_cache

        def append(*args, _original=original, **kwargs):
            keys, values = _original(*args, **kwargs)
            seen.append(keys.shape[-2])
            return keys, values

        attn.append_to_cache = append
    try:
        session.reset()
        session.prefill(_prompt(prompt_len, session.model.config.text_config.vocab_size).numpy())
        session.denoise(np.arange(100, 100 + C))
    finally:
        for attn in attns:
            del attn.append_to_cache
        for hook in hooks:
            hook.remove()
    assert masks == [None] * 6
    assert seen == [min(prompt_len, W - 1) + C] * 5 + [prompt_len + C]


def test_self_conditioning_step_equals_generate(session):
    """Fact 5: sc is the previous step's processed logits (raw / T); replaying it reproduces step k."""
    model, steps = session.model, 3
    prompt = _prompt(40, model.config.text_config.vocab_size, seed=1)
    _, rec = _generate(model, prompt, canvases=1, steps=steps)
    session.reset()
    session.prefill(prompt.numpy())
    for k, step in enumerate(rec.decoder):
        if k == 0:
            assert step.sc is None
        else:
            processed = rec.decoder[k - 1].logits / _temperature(model.generation_config, steps - k + 1, steps)
            torch.testing.assert_close(step.sc, processed, rtol=0, atol=0)
        sc = None if step.sc is None else step.sc.numpy()
        _same(session.denoise(step.canvas.numpy(), sc_logits=sc), step.logits)
    assert session.n_past == 40  # denoising never writes the cache


def test_two_canvas_flow_equals_generate(session):
    """prefill, denoise, commit(canvas 1), denoise(canvas 2) reproduce generate's second canvas."""
    model, steps, P = session.model, 2, 40
    prompt = _prompt(P, model.config.text_config.vocab_size, seed=2)
    out, rec = _generate(model, prompt, canvases=2, steps=steps, seed=3)

    # Fact 4: generate commits the argmax of the last step's logits, through the encoder, at the
    # canvas's own positions; the next canvas starts without self-conditioning.
    committed = rec.encoder[1]
    assert torch.equal(committed.ids, rec.decoder[steps - 1].logits.argmax(-1))
    assert torch.equal(out.sequences[0, P : P + C], committed.ids)
    assert committed.positions == rec.decoder[0].positions == list(range(P, P + C))
    assert rec.decoder[steps].sc is None and rec.decoder[steps].n_cached == P + C
    assert rec.decoder[steps].positions == list(range(P + C, P + 2 * C))
    assert all(m == {"full_attention": None, "sliding_attention": None} for m in (r.masks for r in rec.decoder))

    session.reset()
    session.prefill(prompt.numpy())
    for k, step in enumerate(rec.decoder):
        if k == steps:
            session.commit(committed.ids.numpy())
            assert session.n_past == P + C == session.cache.get_seq_length()
        sc = None if step.sc is None else step.sc.numpy()
        _same(session.denoise(step.canvas.numpy(), sc_logits=sc), step.logits)


def test_commit_is_a_causal_encoder_pass(session):
    """Fact 4: commit runs the encoder (not the decoder); prefill(P) + commit(c) == prefill(P + c)."""
    vocab = session.model.config.text_config.vocab_size
    prompt, canvas = _prompt(40, vocab, seed=4).numpy(), _prompt(C, vocab, seed=5).numpy()
    encoder_layers = session.model.model.encoder.language_model.layers
    decoder_layers = session.model.model.decoder.layers
    # The two stacks share weights but not layer_scalar: a mix-up would show in the cache.
    assert not torch.equal(encoder_layers[0].layer_scalar, decoder_layers[0].layer_scalar)

    calls = []
    hooks = [encoder_layers[0].register_forward_hook(lambda *a: calls.append("encoder"))]
    hooks.append(decoder_layers[0].register_forward_hook(lambda *a: calls.append("decoder")))
    try:
        session.reset()
        session.prefill(prompt)
        calls.clear()
        session.commit(canvas)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == ["encoder"]
    committed = [(layer.keys.clone(), layer.values.clone()) for layer in session.cache.layers]
    after_commit = session.denoise(np.arange(200, 200 + C))

    session.reset()
    session.prefill(np.concatenate([prompt, canvas]))
    assert session.n_past == 56
    for (keys, values), layer in zip(committed, session.cache.layers):
        torch.testing.assert_close(keys, layer.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(values, layer.values, rtol=0, atol=1e-5)
    np.testing.assert_allclose(after_commit, session.denoise(np.arange(200, 200 + C)), rtol=0, atol=1e-5)


def test_self_conditioning_input(session):
    """Fact 5: the decoder input is post_norm(embeds + SC-MLP(soft)); soft = 0 and no MLP term without SC."""
    decoder = session.model.model.decoder
    embed = decoder.embed_tokens
    seen = []
    hook = decoder.self_conditioning.register_forward_hook(lambda m, args, out: seen.append((*args, out)))
    canvas = np.arange(100, 100 + C)
    sc = np.random.default_rng(0).normal(0, 3, (C, session.model.config.text_config.vocab_size)).astype(np.float32)
    try:
        session.reset()
        session.prefill(np.arange(20, 60))
        session.denoise(canvas)
        session.denoise(canvas, sc_logits=sc)
    finally:
        hook.remove()
    (embeds, soft0, out0), (_, soft1, _) = seen
    torch.testing.assert_close(embeds[0], embed.weight[torch.as_tensor(canvas)] * embed.embed_scale, rtol=0, atol=0)
    assert not soft0.any()
    torch.testing.assert_close(out0, decoder.self_conditioning.post_norm(embeds), rtol=0, atol=0)
    want = torch.softmax(torch.as_tensor(sc), -1, dtype=torch.float32) @ embed.weight * embed.embed_scale
    torch.testing.assert_close(soft1[0], want, rtol=1e-5, atol=1e-6)


def test_reset_and_n_past(session):
    vocab = session.model.config.text_config.vocab_size
    session.reset()
    assert session.n_past == 0 and session.cache.get_seq_length() == 0
    with pytest.raises(ValueError, match="prefill"):
        session.denoise(np.arange(C))
    with pytest.raises(ValueError):
        session.prefill([])
    session.prefill(_prompt(12, vocab).tolist())
    first = session.denoise(np.arange(C))
    session.prefill([30, 31, 32])  # a prefill extends the cache (a new turn)
    session.commit(np.arange(40, 40 + C))
    assert session.n_past == 12 + 3 + C == session.cache.get_seq_length()
    with pytest.raises(ValueError, match="sc_logits"):
        session.denoise(np.arange(C), sc_logits=np.zeros((C, 3), np.float32))
    session.reset()
    assert session.n_past == 0
    session.prefill(_prompt(12, vocab).tolist())
    np.testing.assert_array_equal(session.denoise(np.arange(C)), first)


def test_float64_oracle(session):
    model = session.model
    s64 = ReferenceSession(model, dtype=torch.float64)
    assert s64.model is not model and s64.model.dtype == torch.float64 and model.dtype == torch.float32
    prompt, canvas = _prompt(40, model.config.text_config.vocab_size).numpy(), np.arange(100, 100 + C)
    session.reset()
    for s in (session, s64):
        s.prefill(prompt)
    got64, got32 = s64.denoise(canvas), session.denoise(canvas)
    assert got64.dtype == np.float32  # the model casts logits to fp32 before the softcap
    np.testing.assert_allclose(got64, got32, rtol=0, atol=1e-4)
    np.testing.assert_allclose(s64.denoise(canvas, got64), session.denoise(canvas, got32), rtol=0, atol=1e-4)


def test_vision_mode_is_causal_for_text(session):
    """Fact 3: for text, "vision" and None give the same (causal) encoder; generate agrees on both."""
    model_none = build_model(TinySpec(use_bidirectional_attention=None))
    none = ReferenceSession(model_none)
    prompt = _prompt(40, model_none.config.text_config.vocab_size, seed=6)
    _, rec = _generate(model_none, prompt, canvases=1, steps=1)
    none.prefill(prompt.numpy())
    session.reset()
    session.prefill(prompt.numpy())
    canvas = rec.decoder[0].canvas.numpy()
    got = none.denoise(canvas)
    _same(got, rec.decoder[0].logits)
    np.testing.assert_allclose(got, session.denoise(canvas), rtol=0, atol=1e-5)


def test_bidirectional_all_crashes_in_transformers():
    """Fact 3: "all" halves the window (16 -> 9, cache keeps 8) but no forward runs in transformers 5.23."""
    model = build_model(TinySpec(use_bidirectional_attention="all"))
    text = model.config.text_config
    assert text.sliding_window == W // 2 + 1 and text.is_causal is False and text.to_dict()["sliding_window"] == W
    with pytest.raises(TypeError, match="is_causal"):
        model.generate(torch.arange(20, 60)[None], max_new_tokens=C, max_denoising_steps=1)
    with pytest.raises(NotImplementedError):
        ReferenceSession(model)
