"""Text generation: prompt -> canvases denoised by the entropy-bound sampler (native loop)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ._native import native
from .chat_format import split_thinking
from .sampler import default_params

if TYPE_CHECKING:
    from .context import Context
    from .model import Model


@dataclass
class StepEvent:
    """What `on_step` receives after every denoising step. Return False from the callback to stop."""

    canvas: int
    step: int
    temperature: float
    mean_entropy: float
    n_accepted: int
    converged: bool
    stop: bool  # the last step of this canvas
    argmax: np.ndarray  # int32 [canvas]: the draft answer
    canvas_ids: np.ndarray  # int32 [canvas]: the next (partly re-noised) canvas
    accepted: np.ndarray  # bool [canvas]


@dataclass
class Generation:
    tokens: list[int]
    text: str = ""  # the answer (thoughts split off)
    thinking: str = ""
    raw_text: str = ""  # everything generated, thoughts included
    steps: list[int] = field(default_factory=list)  # denoising steps per canvas
    n_forwards: int = 0
    hit_eos: bool = False
    cancelled: bool = False
    # seconds: total, prefill (prompt and commits), steps (device graphs), sampler (host decisions),
    # callback (on_step), python (the rest: the binding and its conversions)
    timings: dict[str, float] = field(default_factory=dict)
    transfer: dict[str, int] = field(default_factory=dict)  # bytes the denoising steps moved: to_device, from_device
    committed: list[int] = field(default_factory=list)  # tokens the generation left in the cache

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / self.n_forwards if self.n_forwards else 0.0


def generate_ids(
    ctx: Context,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 256,
    sampler: dict | None = None,
    eos_ids: Sequence[int] | None = None,
    on_step: Callable[[StepEvent], bool | None] | None = None,
) -> Generation:
    """Runs the native generation loop on a context. `sampler` overrides the model's defaults
    (max_steps, t_min, t_max, entropy_bound, stability_threshold, confidence_threshold, seed)."""
    nat = native()
    ffi, lib = nat.ffi, nat.lib
    model: Model = ctx.model
    params = default_params(model)
    params.update({k: v for k, v in (sampler or {}).items() if v is not None})
    unknown = set(params) - set(default_params(None))
    if unknown:
        raise TypeError(f"unknown sampler setting(s): {', '.join(sorted(unknown))}")
    c_sampler = ffi.new("dg_sampler_params *", params)
    gp = ffi.new("dg_generate_params *", lib.dg_generate_default_params(model._handle))
    gp.max_new_tokens = max_new_tokens
    eos_buf = None
    if eos_ids is not None:
        eos_buf = ffi.new("int32_t[]", [int(i) for i in eos_ids])
        gp.eos_ids = eos_buf
        gp.n_eos = len(eos_ids)
    errors: list[BaseException] = []
    callback = None
    if on_step is not None:

        def trampoline(ev, _user):
            try:
                n = ev.canvas_len
                event = StepEvent(
                    ev.canvas, ev.step, ev.temperature, ev.mean_entropy, ev.n_accepted, bool(ev.converged), bool(ev.stop),
                    np.frombuffer(ffi.buffer(ev.argmax, 4 * n), np.int32).copy(),
                    np.frombuffer(ffi.buffer(ev.canvas_ids, 4 * n), np.int32).copy(),
                    np.frombuffer(ffi.buffer(ev.accepted, n), np.uint8).astype(bool),
                )
                return on_step(event) is not False
            except BaseException as exc:  # re-raised after the native loop returns
                errors.append(exc)
                return False

        def on_error(exc_type, exc_value, tb):  # raised where the try above could not catch it (Ctrl-C)
            errors.append(exc_value)
            return False

        callback = ffi.callback("bool(const dg_step_event *, void *)", trampoline, onerror=on_error)
        gp.on_step = callback
    ids = np.ascontiguousarray(np.asarray(prompt_ids, dtype=np.int32))
    canvas_len = model.hparams["canvas_length"]
    tokens = ffi.new("int32_t[]", max(1, max_new_tokens))
    steps = ffi.new("uint32_t[]", max(1, -(-max_new_tokens // canvas_len)))
    result = ffi.new("dg_generate_result *")
    n_past_before = ctx.n_past
    started = time.perf_counter()
    status = lib.dg_generate(ctx._handle, c_sampler, ffi.from_buffer("int32_t[]", ids), ids.size, gp, tokens, steps, result)
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    nat.check(status)
    gen = Generation(
        tokens=list(tokens[0 : result.n_tokens]),
        steps=list(steps[0 : result.n_canvases]),
        n_forwards=int(result.n_forwards),
        hit_eos=bool(result.hit_eos),
        cancelled=bool(result.cancelled),
        timings={"total": elapsed, "prefill": result.t_prefill, "steps": result.t_steps, "sampler": result.t_sampler,
                 "callback": result.t_callback,
                 "python": max(0.0, elapsed - result.t_prefill - result.t_steps - result.t_sampler - result.t_callback)},
        transfer={"to_device": int(result.bytes_to_device), "from_device": int(result.bytes_from_device)},
    )
    # what the cache now holds after the prompt: the committed canvases
    gen.committed = []
    n_committed = ctx.n_past - n_past_before - ids.size
    if n_committed > 0:
        gen.committed = gen.tokens[:n_committed]
    return gen


def generate_in_context(model: Model, ctx: Context, prompt_ids: Sequence[int], *, max_new_tokens: int = 256,
                        max_steps: int | None = None, t_min: float | None = None, t_max: float | None = None,
                        entropy_bound: float | None = None, seed: int | None = None,
                        on_step: Callable[[StepEvent], bool | None] | None = None,
                        on_canvas: Callable[[int, str], None] | None = None) -> Generation:
    """Generates after `prompt_ids` in `ctx` and decodes the text. `on_canvas(index, new_text)` gets
    the text of each finished canvas as it is decided (never a split UTF-8 character)."""

    streamed: list[int] = []
    shown = [0]
    eog = set(model.eog_ids)
    ended = [False]

    def step_hook(event: StepEvent) -> bool | None:
        keep_going = on_step(event) if on_step is not None else None
        if on_canvas is not None and event.stop and not ended[0]:
            for t in event.argmax[: max_new_tokens - len(streamed)]:
                if int(t) in eog:
                    ended[0] = True
                    break
                streamed.append(int(t))
            text = model.detokenize(streamed)
            while text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next canvas
                text = text[:-1]
            if len(text) > shown[0]:
                on_canvas(event.canvas, text[shown[0]:])
                shown[0] = len(text)
        return keep_going

    hook = step_hook if (on_step is not None or on_canvas is not None) else None
    sampler = {"max_steps": max_steps, "t_min": t_min, "t_max": t_max, "entropy_bound": entropy_bound,
               "seed": seed}
    gen = generate_ids(ctx, prompt_ids, max_new_tokens=max_new_tokens, sampler=sampler, on_step=hook)
    gen.raw_text = model.detokenize(gen.tokens)
    if on_canvas is not None and len(gen.raw_text) > shown[0]:  # flush what was held back at the end
        on_canvas(len(gen.steps) - 1, gen.raw_text[shown[0]:])
    gen.thinking, gen.text = split_thinking(gen.raw_text)
    return gen
