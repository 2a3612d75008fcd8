"""The entropy-bound sampler (spec section 4) over numpy logits: one canvas at a time.

    sampler = Sampler(model, canvas_len=256, seed=1)     # settings from the model's diffusion.eb_* keys
    canvas = sampler.new_canvas()
    while True:
        logits = ctx.denoise(canvas, sc)                 # raw logits [canvas, vocab]
        step = sampler.step(logits, canvas)              # logits -> processed (in place), canvas -> next
        sc = logits
        if step.stop:
            break
    answer = step.argmax

The same loop with the logits kept on the device (what generation runs):

    first = True
    while True:
        t = sampler.temperature
        rows = ctx.step(canvas, t, sampler.uniforms(), self_cond=not first)   # O(canvas) values back
        step = sampler.decide(rows, canvas)
        first = False
        if step.stop:
            break
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._native import native
from .errors import PydgemmaError

_FIELDS = ("max_steps", "t_min", "t_max", "entropy_bound", "stability_threshold", "confidence_threshold", "seed", "n_threads")


@dataclass
class StepInfo:
    step: int
    temperature: float
    mean_entropy: float
    n_accepted: int
    converged: bool
    stop: bool
    argmax: np.ndarray  # int32 [canvas]: the draft answer of this step
    draws: np.ndarray  # int32 [canvas]: the categorical samples
    accepted: np.ndarray  # bool [canvas]
    entropy: np.ndarray  # float32 [canvas]


def default_params(model=None) -> dict:
    """The sampler settings of `model` (its diffusion.eb_* keys), or the built-in defaults."""
    nat = native()
    p = nat.lib.dg_sampler_default_params(model._handle if model is not None else nat.ffi.NULL)
    return {name: getattr(p, name) for name in _FIELDS}


class Sampler:
    def __init__(self, model=None, *, canvas_len: int | None = None, n_vocab: int | None = None, **overrides) -> None:
        nat = native()
        params = default_params(model)
        unknown = set(overrides) - set(_FIELDS)
        if unknown:
            raise TypeError(f"unknown sampler setting(s): {', '.join(sorted(unknown))}")
        params.update({k: v for k, v in overrides.items() if v is not None})
        if model is not None:
            canvas_len = canvas_len or model.hparams["canvas_length"]
            n_vocab = n_vocab or model.hparams["n_vocab"]
        if not canvas_len or not n_vocab:
            raise PydgemmaError("canvas_len and n_vocab are needed without a model", "DG_ERR_INVALID_ARG")
        self.params = params
        self.canvas_len, self.n_vocab = int(canvas_len), int(n_vocab)
        c_params = nat.ffi.new("dg_sampler_params *", params)
        out = nat.ffi.new("dg_sampler **")
        status = nat.lib.dg_sampler_new(c_params, self.canvas_len, self.n_vocab, out)
        nat.check(status)
        self._handle = nat.ffi.gc(out[0], nat.lib.dg_sampler_free)

    def new_canvas(self) -> np.ndarray:
        """A canvas of uniform random ids; the next step is step 0 of a new canvas."""
        nat = native()
        canvas = np.empty(self.canvas_len, dtype=np.int32)
        nat.check(nat.lib.dg_sampler_init_canvas(self._handle, nat.ffi.from_buffer("int32_t[]", canvas)))
        return canvas

    @property
    def temperature(self) -> float:
        return float(native().lib.dg_sampler_temperature(self._handle))

    def uniforms(self) -> np.ndarray:
        """The next step's uniforms in (0, 1), one per position (what :meth:`Context.step` takes)."""
        nat = native()
        out = np.empty(self.canvas_len, np.float32)
        status = nat.lib.dg_sampler_uniforms(self._handle, nat.ffi.from_buffer("float[]", out))
        nat.check(status)
        return out

    def decide(self, rows, canvas: np.ndarray) -> StepInfo:
        """The host half of a step from a device step's reductions (:class:`pydgemma.context.StepRows`):
        acceptance, re-noising of `canvas` (in place), the stop rule."""
        nat = native()
        self._check_canvas(canvas)
        n = self.canvas_len
        argmax = np.ascontiguousarray(rows.argmax, np.int32)
        draws = np.ascontiguousarray(rows.draws, np.int32)
        entropy = np.ascontiguousarray(rows.entropy, np.float32)
        if argmax.shape != (n,) or draws.shape != (n,) or entropy.shape != (n,):
            raise PydgemmaError(f"argmax, draws and entropy must have shape ({n},)", "DG_ERR_INVALID_ARG")
        accepted = np.empty(n, np.uint8)
        res = nat.ffi.new("dg_step_result *")
        fb = nat.ffi.from_buffer
        status = nat.lib.dg_sampler_decide(self._handle, fb("int32_t[]", argmax), fb("int32_t[]", draws), fb("float[]", entropy),
                                           fb("int32_t[]", canvas), fb("uint8_t[]", accepted), res)
        nat.check(status)
        return StepInfo(int(res.step), float(res.temperature), float(res.mean_entropy), int(res.n_accepted),
                        bool(res.converged), bool(res.stop), argmax.copy(), draws.copy(), accepted.astype(bool), entropy.copy())

    def _check_canvas(self, canvas: np.ndarray) -> None:
        if canvas.dtype != np.int32 or not canvas.flags.c_contiguous or canvas.shape != (self.canvas_len,):
            raise PydgemmaError(f"canvas must be C-contiguous int32 [{self.canvas_len}]", "DG_ERR_INVALID_ARG")

    def step(self, logits: np.ndarray, canvas: np.ndarray) -> StepInfo:
        """One step. `logits` (float32, C-contiguous [canvas, vocab]) is turned into the processed
        logits in place; `canvas` (int32 [canvas]) becomes the next canvas in place."""
        nat = native()
        if logits.dtype != np.float32 or not logits.flags.c_contiguous or logits.shape != (self.canvas_len, self.n_vocab):
            raise PydgemmaError(f"logits must be C-contiguous float32 {(self.canvas_len, self.n_vocab)}", "DG_ERR_INVALID_ARG")
        self._check_canvas(canvas)
        argmax = np.empty(self.canvas_len, np.int32)
        draws = np.empty(self.canvas_len, np.int32)
        accepted = np.empty(self.canvas_len, np.uint8)
        entropy = np.empty(self.canvas_len, np.float32)
        res = nat.ffi.new("dg_step_result *")
        fb = nat.ffi.from_buffer
        status = nat.lib.dg_sampler_step(self._handle, fb("float[]", logits), fb("int32_t[]", canvas), fb("int32_t[]", argmax),
                                         fb("int32_t[]", draws), fb("uint8_t[]", accepted), fb("float[]", entropy), res)
        nat.check(status)
        return StepInfo(int(res.step), float(res.temperature), float(res.mean_entropy), int(res.n_accepted),
                        bool(res.converged), bool(res.stop), argmax, draws, accepted.astype(bool), entropy)
