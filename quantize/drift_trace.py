"""Trajectories for the drift report: the reference run, teacher forcing, free runs and the prompt probe.

The reference trajectory is the generation loop of ``dg_generate`` written with the Python API
(prefill the prompt; per canvas: denoise, sampler step, the processed logits fed back as the next
step's self-conditioning input; commit the argmax canvas before the next canvas); the tests check
that this loop equals ``dg_generate``. Every reference step is a `RefStep`, which a consumer sees
while the reference context is paused mid-canvas, so the reference and the model under test run in
lockstep and only one step of logits is held at a time.

Teacher forcing (`TeacherForcer`) feeds the model under test exactly the reference's inputs: the
same prompt, the reference's canvas at every step, the reference's processed logits as the
self-conditioning input, and the reference's final canvas as the commit between canvases. Its own
sampler (same settings and seed) only turns its logits into processed logits, argmax and accept
set at the same temperature; it never steers the trajectory.

`RefCache` stores a reference run (``--save-ref``) in an ``.npz`` and replays it (``--ref-cache``):
the same `RefStep`s without loading or running the reference model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from . import drift_metrics as dm

CACHE_FORMAT = 1
SAMPLER_KEYS = ("max_steps", "t_min", "t_max", "entropy_bound", "stability_threshold", "confidence_threshold")


@dataclass
class RefStep:
    """One denoising step of the reference trajectory."""

    canvas: int  # canvas index within the prompt
    step: int  # 0-based step on this canvas
    canvas_in: np.ndarray  # int32 [C]: the canvas this step denoised
    sc: np.ndarray | None  # float32 [C, V]: the self-conditioning input (previous step's processed logits)
    logits: np.ndarray  # float32 [C, V]: this step's processed logits (softcapped logits / temperature)
    temperature: float
    argmax: np.ndarray  # int32 [C]
    accepted: np.ndarray  # bool [C]
    stop: bool  # the canvas's last step: argmax is its answer


@dataclass
class ForcedStep:
    """The model under test on one reference step, compared with the reference."""

    canvas: int
    step: int
    kl: np.ndarray  # float64 [C]: KL(ref || model) per position
    top1: np.ndarray  # bool [C]: same argmax
    jaccard: float  # accept sets
    accept_equal: bool


@dataclass
class CanvasRun:
    """One canvas of a free run: its answer and the steps it took."""

    final: np.ndarray  # int32 [C]
    steps: int


@dataclass
class Workload:
    """What a drift run generates: prompt token ids, the seed of each, canvases per prompt, sampler."""

    prompts: list[list[int]]
    seeds: list[int]
    canvases_per_prompt: int
    sampler: dict  # SAMPLER_KEYS
    probe_positions: int  # prompt prefixes probed per prompt (0: none)
    labels: list[str] = field(default_factory=list)  # the prompt texts (for the task check and the report)

    def n_ctx(self, canvas_len: int) -> int:
        return max(len(p) for p in self.prompts) + self.canvases_per_prompt * canvas_len


def sampler_for(model, workload: Workload, seed: int):
    from pydgemma.sampler import Sampler

    return Sampler(model, seed=seed, **workload.sampler)


def run_canvases(ctx, sampler, prompt_ids: Sequence[int], n_canvases: int) -> Iterator[RefStep]:
    """The generation loop on `ctx` (reset first), one `RefStep` per denoising step."""
    ctx.reset()
    ctx.prefill(prompt_ids)
    for c in range(n_canvases):
        canvas = sampler.new_canvas()
        sc = None
        while True:
            canvas_in = canvas.copy()
            logits = ctx.denoise(canvas, sc)
            info = sampler.step(logits, canvas)  # logits -> processed logits, canvas -> next canvas
            yield RefStep(c, info.step, canvas_in, sc, logits, info.temperature, info.argmax, info.accepted, info.stop)
            sc = logits
            if info.stop:
                break
        if c + 1 < n_canvases:
            ctx.commit(info.argmax)


def free_run(ctx, sampler, prompt_ids: Sequence[int], n_canvases: int) -> list[CanvasRun]:
    """A plain generation as users run it (the device step loop of ``dg_generate``, with the sampler's
    settings): each canvas's answer and step count."""
    from pydgemma.generate import generate_ids

    ctx.reset()
    settings = {k: sampler.params[k] for k in ("max_steps", "t_min", "t_max", "entropy_bound", "stability_threshold",
                                                 "confidence_threshold", "seed")}
    C = sampler.canvas_len
    gen = generate_ids(ctx, prompt_ids, max_new_tokens=n_canvases * C, sampler=settings, eos_ids=[])
    tokens = np.asarray(gen.tokens, np.int32)
    return [CanvasRun(tokens[i * C:(i + 1) * C], steps) for i, steps in enumerate(gen.steps)]


def probe_lengths(n_prompt: int, n_positions: int) -> list[int]:
    """Prefix lengths probed in a prompt of n_prompt tokens: up to n_positions, evenly spaced, ending at
    the whole prompt."""
    k = min(int(n_positions), n_prompt)
    if k <= 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(n_prompt / k, n_prompt, k)})


def probe(ctx, prompt_ids: Sequence[int], lengths: Sequence[int], canvas: np.ndarray) -> np.ndarray:
    """Prompt-side next-token logits: for each prefix length L, the logits of canvas position 0 when
    `canvas` is denoised (first step, no self-conditioning) after the first L prompt tokens, which
    the encoder has cached causally. float32 [len(lengths), V]."""
    ids = list(prompt_ids)
    ctx.reset()
    rows, done = [], 0
    for n in lengths:
        ctx.prefill(ids[done:n])
        done = n
        rows.append(ctx.denoise(canvas)[0])
    return np.stack(rows) if rows else np.zeros((0, ctx.n_vocab), np.float32)


class TeacherForcer:
    """Runs the model under test on the reference's inputs, step by step."""

    def __init__(self, model, ctx, workload: Workload) -> None:
        self.model, self.ctx, self.workload = model, ctx, workload
        self.sampler = None
        self.n_canvases = workload.canvases_per_prompt

    def start_prompt(self, index: int) -> None:
        self.ctx.reset()
        self.ctx.prefill(self.workload.prompts[index])
        self.sampler = sampler_for(self.model, self.workload, self.workload.seeds[index])

    def step(self, ref: RefStep) -> ForcedStep:
        if ref.step == 0:
            self.sampler.new_canvas()  # keeps the sampler's canvas counter in step with the reference's
        logits = self.ctx.denoise(ref.canvas_in, ref.sc)
        info = self.sampler.step(logits, ref.canvas_in.copy())
        if info.step != ref.step or info.temperature != ref.temperature:
            raise RuntimeError(f"teacher forcing lost step: step {info.step} at t={info.temperature}, "
                               f"reference step {ref.step} at t={ref.temperature}")
        forced = ForcedStep(ref.canvas, ref.step, dm.kl_rows(ref.logits, logits), ref.argmax == info.argmax,
                            dm.jaccard(ref.accepted, info.accepted), bool(np.array_equal(ref.accepted, info.accepted)))
        if ref.stop and ref.canvas + 1 < self.n_canvases:
            self.ctx.commit(ref.argmax)  # the reference's answer joins the prefix, as in the reference run
        return forced


# ------------------------------------------------------------------------------------------------
# Reference sources: live (runs the reference model) or cached (replays an .npz).


@dataclass
class RefPrompt:
    index: int
    steps: Iterator[RefStep]  # consume fully before calling probe_logits
    probe_logits: Callable[[], np.ndarray]  # float32 [K, V]: raw logits (temperature 1)
    probe_lengths: list[int]


class LiveReference:
    """The reference model run on the workload, prompt by prompt."""

    def __init__(self, model, workload: Workload) -> None:
        self.model, self.workload = model, workload
        # the reference: F32 KV entries and an F32 self-conditioning table (exact)
        self.ctx = model.context(n_ctx=workload.n_ctx(model.hparams["canvas_length"]), kv_type="f32", sc_table="f32")
        # the probe's canvas: uniform random ids from the sampler, as a first denoising step sees
        self.probe_canvas = None
        if workload.probe_positions:
            self.probe_canvas = sampler_for(model, workload, workload.seeds[0]).new_canvas()

    def prompts(self) -> Iterator[RefPrompt]:
        wl = self.workload
        for j, ids in enumerate(wl.prompts):
            lengths = probe_lengths(len(ids), wl.probe_positions)
            steps = run_canvases(self.ctx, sampler_for(self.model, wl, wl.seeds[j]), ids, wl.canvases_per_prompt)
            yield RefPrompt(j, steps, lambda ids=ids, lengths=lengths: probe(self.ctx, ids, lengths, self.probe_canvas),
                            lengths)


class Recorder:
    """Passes a reference source through while keeping everything `RefCache` needs."""

    def __init__(self, source) -> None:
        self.source = source
        self.steps: list[RefStep] = []
        self.step_prompt: list[int] = []
        self.probes: list[np.ndarray] = []

    @property
    def probe_canvas(self):
        return self.source.probe_canvas

    def prompts(self) -> Iterator[RefPrompt]:
        for p in self.source.prompts():
            def steps(p=p):
                for s in p.steps:
                    self.steps.append(s)
                    self.step_prompt.append(p.index)
                    yield s

            def probe_logits(p=p):
                rows = p.probe_logits()
                self.probes.append(rows)
                return rows

            yield RefPrompt(p.index, steps(), probe_logits, p.probe_lengths)


def fingerprint(path: str | os.PathLike[str]) -> dict:
    """Identifies a model file: name, size and the sha256 of its bytes (of its first and last 64 MiB
    when it is larger than 256 MiB)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    part = 64 << 20
    with p.open("rb") as f:
        if size <= 4 * part:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(part))
            f.seek(size - part)
            h.update(f.read(part))
    return {"file": p.name, "size": size, "sha256": h.hexdigest(), "partial_hash": size > 4 * part}


class RefCache:
    """A stored reference run: the workload, every step and the probe logits, in one .npz."""

    def __init__(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        self.meta, self.arrays = meta, arrays

    # -- writing
    @staticmethod
    def save(path: str | os.PathLike[str], recorder: Recorder, workload: Workload, ref_info: dict,
             task: str | None) -> Path:
        steps = recorder.steps
        if not steps:
            raise ValueError("nothing recorded")
        meta = {
            "format": CACHE_FORMAT,
            "ref": ref_info,
            "task": task,
            "workload": {"seeds": workload.seeds, "canvases_per_prompt": workload.canvases_per_prompt,
                         "sampler": workload.sampler, "probe_positions": workload.probe_positions,
                         "labels": workload.labels},
        }
        arrays = {
            "meta": np.array(json.dumps(meta)),
            "prompt_ids": np.concatenate([np.asarray(p, np.int32) for p in workload.prompts]),
            "prompt_len": np.array([len(p) for p in workload.prompts], np.int64),
            "step_prompt": np.array(recorder.step_prompt, np.int32),
            "step_canvas": np.array([s.canvas for s in steps], np.int32),
            "step_index": np.array([s.step for s in steps], np.int32),
            "step_stop": np.array([s.stop for s in steps], bool),
            "temperature": np.array([s.temperature for s in steps], np.float32),
            "canvas_in": np.stack([s.canvas_in for s in steps]),
            "logits": np.stack([s.logits for s in steps]),
            "argmax": np.stack([s.argmax for s in steps]),
            "accepted": np.stack([s.accepted for s in steps]),
        }
        if recorder.probes:
            arrays["probe_logits"] = np.concatenate(recorder.probes)
            arrays["probe_canvas"] = recorder.probe_canvas
        out = Path(path)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return out

    # -- reading
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RefCache:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(str(arrays.pop("meta")))
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"'{path}' is not a drift reference cache ({exc})") from exc
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"'{path}' has cache format {meta.get('format')}, this version reads {CACHE_FORMAT}")
        return cls(meta, arrays)

    def workload(self) -> Workload:
        w = self.meta["workload"]
        ends = np.cumsum(self.arrays["prompt_len"])
        flat = self.arrays["prompt_ids"]
        prompts = [flat[e - n:e].tolist() for e, n in zip(ends, self.arrays["prompt_len"])]
        return Workload(prompts, list(w["seeds"]), int(w["canvases_per_prompt"]), dict(w["sampler"]),
                        int(w["probe_positions"]), list(w.get("labels", [])))

    @property
    def canvas_len(self) -> int:
        return int(self.arrays["canvas_in"].shape[1])

    @property
    def n_vocab(self) -> int:
        return int(self.arrays["logits"].shape[2])

    @property
    def probe_canvas(self):
        return self.arrays.get("probe_canvas")

    def prompts(self) -> Iterator[RefPrompt]:
        a = self.arrays
        wl = self.workload()
        by_prompt = a["step_prompt"]
        probe_rows = a.get("probe_logits")
        probe_at = 0
        for j, ids in enumerate(wl.prompts):
            idx = np.flatnonzero(by_prompt == j)
            lengths = probe_lengths(len(ids), wl.probe_positions)

            def steps(idx=idx):
                prev = None
                for i in idx:
                    s = RefStep(int(a["step_canvas"][i]), int(a["step_index"][i]), a["canvas_in"][i],
                                prev if a["step_index"][i] > 0 else None, a["logits"][i], float(a["temperature"][i]),
                                a["argmax"][i], a["accepted"][i], bool(a["step_stop"][i]))
                    prev = s.logits
                    yield s

            rows = probe_rows[probe_at:probe_at + len(lengths)] if probe_rows is not None else None
            probe_at += len(lengths)
            yield RefPrompt(j, steps(), lambda rows=rows: rows, lengths)
