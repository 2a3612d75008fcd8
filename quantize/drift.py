"""Quantization drift of a diffusion model: how far a quantized GGUF strays from its reference.

Autoregressive tools (llama-perplexity --kl-divergence) compare next-token logits. A diffusion
model degrades per canvas position, per denoising step, in which tokens the entropy-bound sampler
accepts, and in how many steps a canvas converges (its speed). `measure` runs the reference
trajectory (`drift_trace`) and reports, against it:

* teacher forced (the model under test gets the reference's prompt, canvas and self-conditioning
  input at every step): KL(ref || model) of the processed distributions (softmax of logits / t) -
  mean, median, p99 and max, overall, per step index and per canvas position bucket; top-1
  agreement; Jaccard of the entropy-bound accept sets;
* free running (same seed, its own trajectory): final canvas token agreement, steps to converge per
  canvas (mean and distribution) for both, tokens per forward;
* prompt side: next-token KL at temperature 1 after prefixes of the prompt (canvas position 0 of a
  first-step denoise over the encoder's causal cache of the prefix), an AR-style secondary figure;
* task accuracy on the demo model's 4x4 Sudoku puzzles when the demo model is measured.

`check` compares a report with the thresholds of a baseline (`THRESHOLDS`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import drift_metrics as dm
from .convert import ConversionError
from .drift_trace import (SAMPLER_KEYS, LiveReference, RefCache, Recorder, TeacherForcer, Workload, fingerprint,
                          free_run, probe, sampler_for)

REPORT_FORMAT = 1

# Prompts used when neither --prompts nor the demo task gives them.
DEFAULT_PROMPTS = (
    "Write a haiku about rivers.",
    "Explain entropy to a ten-year-old.",
    "List three uses of a paperclip.",
    "What is the capital of France?",
    "Translate 'good morning' into Spanish and German.",
    "Write a Python function that reverses a string.",
    "Summarise the water cycle in two sentences.",
    "Give me a short story opening about a lighthouse.",
)

TASK_SUDOKU = "sudoku4"


class DriftUsageError(ValueError):
    """A bad option or input file (the command exits with status 2)."""


@dataclass(frozen=True)
class Threshold:
    path: tuple[str, ...]  # where the value is in the report
    op: str  # "<=" or ">="
    label: str  # how the summary names the metric
    unit: str = ""  # "%": a fraction shown as a percentage; "pct": already a percentage


# Baseline keys -> the metric each one bounds. The gate fails when any given bound is exceeded.
THRESHOLDS: dict[str, Threshold] = {
    "max_mean_kl": Threshold(("teacher_forced", "kl", "mean"), "<=", "mean KL"),
    "max_median_kl": Threshold(("teacher_forced", "kl", "median"), "<=", "median KL"),
    "max_p99_kl": Threshold(("teacher_forced", "kl", "p99"), "<=", "p99 KL"),
    "max_max_kl": Threshold(("teacher_forced", "kl", "max"), "<=", "max KL"),
    "min_top1": Threshold(("teacher_forced", "top1"), ">=", "top-1 agreement", "%"),
    "min_accept_jaccard": Threshold(("teacher_forced", "accept_jaccard"), ">=", "accept-set Jaccard", "%"),
    "min_token_agreement": Threshold(("free_running", "token_agreement"), ">=", "final canvas token agreement", "%"),
    "max_steps_increase_pct": Threshold(("free_running", "steps_increase_pct"), "<=", "steps per canvas increase",
                                        "pct"),
    "max_prompt_mean_kl": Threshold(("prompt_side", "kl", "mean"), "<=", "prompt-side mean KL"),
    "min_task_accuracy": Threshold(("task", "model_accuracy"), ">=", "task accuracy", "%"),
    "max_task_accuracy_drop": Threshold(("task", "accuracy_drop"), "<=", "task accuracy drop", "%"),
}


def fmt_number(x: float) -> str:
    """4 significant digits; scientific notation below 1e-3."""
    return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"


def fmt_value(x: float, unit: str = "") -> str:
    """A metric as the summaries show it: fractions ("%") as percentages with 2 decimals."""
    if unit == "%":
        return f"{100 * x:.2f} %"
    if unit == "pct":
        return f"{x:+.1f} %"
    return fmt_number(x)


# ------------------------------------------------------------------------------------------------
# The workload


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """One prompt per line; blank lines are skipped and ``\\n`` in a line is a newline."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DriftUsageError(f"cannot read the prompts file '{path}': {exc}") from exc
    prompts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise DriftUsageError(f"the prompts file '{path}' has no prompt")
    return prompts


def is_demo_model(model) -> bool:
    """Whether `model` is the bundled demo model or a sibling of it (same shape, tokenizer and template)."""
    from pydgemma import Model
    from pydgemma.errors import PydgemmaError
    from pydgemma.models.demo import sudoku
    from pydgemma.run_cli import demo_model_path

    try:
        demo = Model(demo_model_path(), n_threads=1)
    except PydgemmaError:
        return False
    with demo:
        if dict(demo.hparams) != dict(model.hparams) or demo.chat_template != model.chat_template:
            return False
        message = [{"role": "user", "content": sudoku.prompt_text(sudoku.test_puzzles(1)[0][0])}]
        return demo.chat_prompt_ids(message) == model.chat_prompt_ids(message)


def prompt_ids(model, text: str) -> list[int]:
    """The tokens `Model.generate` feeds for a one-turn prompt: the chat template when there is one."""
    if model.chat_template is not None:
        return list(model.chat_prompt_ids([{"role": "user", "content": text}]))
    return list(model.tokenize(text))


def build_workload(model, *, prompts: Sequence[str] | None, task: str, canvases: int, canvases_per_prompt: int,
                   seed: int, max_steps: int | None, probe_positions: int) -> tuple[Workload, str | None]:
    """The prompts (token ids), seeds and sampler settings of a run, and its task (or None).

    Prompt i (i = 0 .. canvases / canvases_per_prompt - 1) is prompts[i % len(prompts)] with seed
    seed + i; task "auto" is the demo's Sudoku when no prompts are given and the model is the demo's."""
    from pydgemma.models.demo import sudoku
    from pydgemma.sampler import default_params

    if canvases < 1:
        raise DriftUsageError(f"--canvases must be at least 1, got {canvases}")
    if canvases_per_prompt < 1 or canvases % canvases_per_prompt:
        raise DriftUsageError(f"--canvases ({canvases}) must be a multiple of --canvases-per-prompt "
                              f"({canvases_per_prompt})")
    if max_steps is not None and max_steps < 1:
        raise DriftUsageError(f"--steps must be at least 1, got {max_steps}")
    if probe_positions < 0:
        raise DriftUsageError(f"--prompt-positions must be 0 or more, got {probe_positions}")
    if task not in ("auto", TASK_SUDOKU, "none"):
        raise DriftUsageError(f"--task must be auto, {TASK_SUDOKU} or none, not '{task}'")
    if task == TASK_SUDOKU and prompts is not None:
        raise DriftUsageError(f"--task {TASK_SUDOKU} brings its own prompts; leave out --prompts")
    if task == "auto":
        task = TASK_SUDOKU if prompts is None and is_demo_model(model) else "none"
    n_prompts = canvases // canvases_per_prompt
    if task == TASK_SUDOKU:
        texts = [p for p, _ in sudoku.test_puzzles(min(n_prompts, sudoku.N_TEST))]
        labels = [texts[i % len(texts)] for i in range(n_prompts)]  # the puzzles themselves
        texts = [sudoku.prompt_text(p) for p in labels]
    else:
        texts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
        labels = texts = [texts[i % len(texts)] for i in range(n_prompts)]
    sampler = {k: v for k, v in default_params(model).items() if k in SAMPLER_KEYS}
    if max_steps is not None:
        sampler["max_steps"] = int(max_steps)
    ids = [prompt_ids(model, t) for t in texts]
    wl = Workload(ids, [seed + i for i in range(n_prompts)], canvases_per_prompt, sampler, probe_positions, labels)
    return wl, (task if task != "none" else None)


# ------------------------------------------------------------------------------------------------
# Running


def model_info(model, path: str | os.PathLike[str]) -> dict:
    """Path, fingerprint and weight types (tensors of 2+ dimensions: count per type) of a model."""
    types: dict[str, int] = {}
    for t in model.tensors.values():
        if len(t.shape) > 1:
            types[t.type] = types.get(t.type, 0) + 1
    return {"path": os.fspath(path), **fingerprint(path), "weight_types": dict(sorted(types.items()))}


ProgressFn = Callable[[int, int], None]


def measure(model_path: str | os.PathLike[str], *, ref_path: str | os.PathLike[str] | None = None,
            ref_cache: str | os.PathLike[str] | None = None, save_ref: str | os.PathLike[str] | None = None,
            prompts: Sequence[str] | None = None, task: str = "auto", canvases: int | None = None,
            canvases_per_prompt: int | None = None, seed: int | None = None, max_steps: int | None = None,
            probe_positions: int | None = None, position_buckets: int = 8, device: str = "auto",
            n_threads: int | None = None, progress: ProgressFn | None = None, sc_top_k: int = 0, kv_type: str = "f32",
            sc_table: str = "f32") -> dict:
    """Measures `model_path` against a reference model (`ref_path`) or a stored reference run
    (`ref_cache`), returning the report (a JSON-ready dict). `save_ref` stores the reference run.
    Options left at None take their defaults (32 canvases, 1 per prompt, seed 0, the model's
    steps, 4 probed prompt prefixes) or, with `ref_cache`, the stored run's values. `sc_top_k` > 0 runs
    the measured model with approximate top-k self-conditioning; `kv_type` and `sc_table` are the measured
    model's KV cache and self-conditioning table. The reference always runs F32 entries and an F32
    table (exact); so does the measured model by default, so that the drift is the quantization's alone."""
    from pydgemma import Model
    from pydgemma.hub import resolve_model

    if (ref_path is None) == (ref_cache is None):
        raise DriftUsageError("give the reference as --ref REF.gguf or --ref-cache REF.npz (one of them)")
    if save_ref is not None and ref_cache is not None:
        raise DriftUsageError("--save-ref stores a new reference run; it cannot be used with --ref-cache")
    if position_buckets < 1:
        raise DriftUsageError(f"--position-buckets must be at least 1, got {position_buckets}")
    model_path = resolve_model(model_path)  # org/repo:QUANT: the cached file
    ref_path = resolve_model(ref_path) if ref_path is not None else None
    with Model(model_path, device=device, n_threads=n_threads) as model:
        if ref_cache is not None:
            cache = _load_cache(ref_cache, model, prompts=prompts, task=task, canvases=canvases,
                                canvases_per_prompt=canvases_per_prompt, seed=seed, max_steps=max_steps,
                                probe_positions=probe_positions)
            workload = cache.workload()
            task_name = cache.meta["task"]
            return _compare(model, model_path, cache, cache.meta["ref"], workload, task_name, position_buckets,
                            progress, reference_from="cache", sc_top_k=sc_top_k, kv_type=kv_type,
                            sc_table=sc_table)
        with Model(ref_path, device=device, n_threads=n_threads) as ref:
            for key in ("n_vocab", "canvas_length"):
                if ref.hparams[key] != model.hparams[key]:
                    raise DriftUsageError(f"the models differ in {key}: {ref.hparams[key]} (reference) and "
                                          f"{model.hparams[key]}; they are not the same model")
            workload, task_name = build_workload(
                ref, prompts=prompts, task=task, canvases=_default(canvases, 32),
                canvases_per_prompt=_default(canvases_per_prompt, 1), seed=_default(seed, 0), max_steps=max_steps,
                probe_positions=_default(probe_positions, 4))
            ref_info = model_info(ref, ref_path)
            source = LiveReference(ref, workload)
            recorder = Recorder(source) if save_ref is not None else None
            report = _compare(model, model_path, recorder or source, ref_info, workload, task_name, position_buckets,
                              progress, reference_from="model", sc_top_k=sc_top_k, kv_type=kv_type,
                              sc_table=sc_table)
            if recorder is not None:
                try:
                    RefCache.save(save_ref, recorder, workload, ref_info, task_name)
                except OSError as exc:
                    raise ConversionError(f"cannot write the reference cache '{save_ref}': {exc}") from exc
                report["reference_saved_to"] = os.fspath(save_ref)
            return report


def _default(value: int | None, default: int) -> int:
    return default if value is None else value


def _load_cache(path, model, **given) -> RefCache:
    try:
        cache = RefCache.load(path)
    except ValueError as exc:
        raise DriftUsageError(str(exc)) from exc
    if (cache.n_vocab, cache.canvas_len) != (model.hparams["n_vocab"], model.hparams["canvas_length"]):
        raise DriftUsageError(f"the reference cache is for n_vocab {cache.n_vocab}, canvas {cache.canvas_len}; the model "
                              f"has {model.hparams['n_vocab']}, {model.hparams['canvas_length']}")
    wl = cache.workload()
    stored = {"canvases": len(wl.prompts) * wl.canvases_per_prompt, "canvases_per_prompt": wl.canvases_per_prompt,
              "seed": wl.seeds[0], "max_steps": wl.sampler["max_steps"], "probe_positions": wl.probe_positions,
              "task": cache.meta["task"] or "none"}
    for name, value in given.items():
        if value is None or name == "prompts" or (name == "task" and value == "auto"):
            continue
        if value != stored[name]:
            flag = "--" + name.replace("_", "-").replace("max-steps", "steps")
            raise DriftUsageError(f"the reference cache was made with {flag} {stored[name]}, not {value}; "
                                  f"leave the option out or make a new cache with --save-ref")
    if given["prompts"] is not None:
        wanted = [prompt_ids(model, p) for p in given["prompts"]]
        if [wanted[i % len(wanted)] for i in range(len(wl.prompts))] != wl.prompts:
            raise DriftUsageError("the reference cache was made with other prompts; leave out --prompts or make a new "
                                  "cache with --save-ref")
    return cache


def _compare(model, model_path, source, ref_info: dict, wl: Workload, task: str | None, n_buckets: int,
             progress: ProgressFn | None, *, reference_from: str, sc_top_k: int = 0, kv_type: str = "f32",
             sc_table: str = "f32") -> dict:
    C = model.hparams["canvas_length"]
    ctx = model.context(n_ctx=wl.n_ctx(C), sc_top_k=sc_top_k, kv_type=kv_type, sc_table=sc_table)
    forcer = TeacherForcer(model, ctx, wl)
    probe_canvas = source.probe_canvas
    forced, ref_runs, model_runs, probe_kl, probe_top1 = [], [], [], [], []
    total = len(wl.prompts)
    if progress:
        progress(0, total)
    for p in source.prompts():
        forcer.start_prompt(p.index)
        runs = []
        for step in p.steps:
            forced.append(forcer.step(step))
            if step.stop:
                runs.append((step.argmax, step.step + 1))
        ref_runs.append(runs)
        mine = free_run(ctx, sampler_for(model, wl, wl.seeds[p.index]), wl.prompts[p.index], wl.canvases_per_prompt)
        model_runs.append([(r.final, r.steps) for r in mine])
        if p.probe_lengths:
            ref_rows = p.probe_logits()
            rows = probe(ctx, wl.prompts[p.index], p.probe_lengths, probe_canvas)
            probe_kl.append(dm.kl_rows(ref_rows, rows))
            probe_top1.append(ref_rows.argmax(axis=-1) == rows.argmax(axis=-1))
        if progress:
            progress(p.index + 1, total)

    report = {
        "format": REPORT_FORMAT,
        "reference": {**ref_info, "from": reference_from},
        "model": model_info(model, model_path),
        "settings": {"canvases": total * wl.canvases_per_prompt, "canvases_per_prompt": wl.canvases_per_prompt,
                     "prompts": total, "seed": wl.seeds[0], "sampler": wl.sampler,
                     "prompt_positions": wl.probe_positions, "position_buckets": n_buckets, "task": task,
                     "canvas_length": C, "n_vocab": model.hparams["n_vocab"], "sc_top_k": sc_top_k,
                     "kv_type": kv_type, "sc_table": sc_table},
        "teacher_forced": teacher_forced_summary(forced, C, n_buckets),
        "free_running": free_running_summary(ref_runs, model_runs, model.eog_ids),
        "prompt_side": prompt_side_summary(probe_kl, probe_top1),
        "task": task_summary(task, wl, ref_runs, model_runs, model) if task else None,
    }
    return report


# ------------------------------------------------------------------------------------------------
# Summaries


def teacher_forced_summary(forced: list, canvas_len: int, n_buckets: int) -> dict:
    """KL / top-1 / accept-set figures of the teacher-forced steps (`ForcedStep`s)."""
    kl = np.stack([f.kl for f in forced]) if forced else np.zeros((0, canvas_len))
    top1 = np.stack([f.top1 for f in forced]) if forced else np.zeros((0, canvas_len), bool)
    jac = np.array([f.jaccard for f in forced])
    step_idx = np.array([f.step for f in forced], dtype=np.int64)
    per_step = []
    for s in range(int(step_idx.max()) + 1 if forced else 0):
        rows = step_idx == s
        per_step.append({"step": s, "canvases": int(rows.sum()), "kl": dm.summary(kl[rows]),
                         "top1": float(top1[rows].mean()), "accept_jaccard": float(jac[rows].mean())})
    per_bucket = [{"positions": [a, b - 1], "kl": dm.summary(kl[:, a:b]), "top1": float(top1[:, a:b].mean())}
                  for a, b in dm.position_buckets(canvas_len, n_buckets)] if forced else []
    return {
        "steps": len(forced),
        "kl": dm.summary(kl),
        "top1": float(top1.mean()) if forced else 1.0,
        "accept_jaccard": float(jac.mean()) if forced else 1.0,
        "accept_sets_equal": float(np.mean([f.accept_equal for f in forced])) if forced else 1.0,
        "per_step": per_step,
        "per_position_bucket": per_bucket,
        "per_position_mean_kl": kl.mean(axis=0).tolist() if forced else [],
    }


def _steps_summary(steps: list[int]) -> dict:
    hist: dict[str, int] = {}
    for s in sorted(steps):
        hist[str(s)] = hist.get(str(s), 0) + 1
    return {"mean": float(np.mean(steps)) if steps else 0.0, "median": float(np.median(steps)) if steps else 0.0,
            "max": int(max(steps)) if steps else 0, "histogram": hist}


def _tokens_per_forward(runs: list[list[tuple[np.ndarray, int]]], eog: set[int]) -> float:
    """Tokens up to the first end-of-generation token over the forwards spent until then, per prompt
    summed, as `Generation.tokens_per_forward` counts them."""
    tokens = forwards = 0
    for canvases in runs:
        for final, steps in canvases:
            forwards += steps
            ends = [i for i, t in enumerate(final.tolist()) if t in eog]
            tokens += ends[0] if ends else len(final)
            if ends:
                break
    return tokens / forwards if forwards else 0.0


def free_running_summary(ref_runs: list, model_runs: list, eog_ids: Sequence[int]) -> dict:
    """Final canvases and steps of the two free runs (per prompt: [(final argmax, steps), ...])."""
    ref_final = [f for runs in ref_runs for f, _ in runs]
    mod_final = [f for runs in model_runs for f, _ in runs]
    ref_steps = [s for runs in ref_runs for _, s in runs]
    mod_steps = [s for runs in model_runs for _, s in runs]
    agree = [dm.agreement(a, b) for a, b in zip(ref_final, mod_final)]
    ref_s, mod_s = _steps_summary(ref_steps), _steps_summary(mod_steps)
    eog = set(int(i) for i in eog_ids)
    return {
        "canvases": len(ref_final),
        "token_agreement": float(np.mean(agree)) if agree else 1.0,
        "canvases_identical": float(np.mean([a == 1.0 for a in agree])) if agree else 1.0,
        "steps": {"reference": ref_s, "model": mod_s},
        "steps_increase_pct": dm.pct_change(ref_s["mean"], mod_s["mean"]),
        "tokens_per_forward": {"reference": _tokens_per_forward(ref_runs, eog),
                               "model": _tokens_per_forward(model_runs, eog)},
    }


def prompt_side_summary(kl: list[np.ndarray], top1: list[np.ndarray]) -> dict | None:
    if not kl:
        return None
    all_kl = np.concatenate(kl)
    return {"positions": int(all_kl.size), "kl": dm.summary(all_kl), "top1": float(np.concatenate(top1).mean()),
            "method": "canvas position 0 of a first-step denoise after each probed prompt prefix, temperature 1"}


def task_summary(task: str, wl: Workload, ref_runs: list, model_runs: list, model) -> dict:
    """Exact-solve accuracy of both free runs on the demo's Sudoku puzzles."""
    from pydgemma.chat_format import split_thinking
    from pydgemma.models.demo import sudoku

    eog = set(model.eog_ids)

    def solved(puzzle: str, runs) -> bool:
        tokens: list[int] = []
        for final, _ in runs:
            for t in final.tolist():
                if t in eog:
                    break
                tokens.append(t)
            else:
                continue
            break
        return sudoku.check_answer(puzzle, split_thinking(model.detokenize(tokens))[1])

    ref_ok = [solved(p, r) for p, r in zip(wl.labels, ref_runs)]
    mod_ok = [solved(p, r) for p, r in zip(wl.labels, model_runs)]
    ref_acc, mod_acc = float(np.mean(ref_ok)), float(np.mean(mod_ok))
    return {"name": task, "puzzles": len(ref_ok), "reference_accuracy": ref_acc, "model_accuracy": mod_acc,
            "accuracy_drop": ref_acc - mod_acc}


# ------------------------------------------------------------------------------------------------
# The gate


@dataclass
class Check:
    name: str  # the baseline key
    label: str
    value: float
    limit: float
    op: str
    ok: bool

    def describe(self) -> str:
        bad = {"<=": ">", ">=": "<"}[self.op]
        unit = THRESHOLDS[self.name].unit
        return (f"{self.name}: {self.label} {fmt_value(self.value, unit)} {self.op if self.ok else bad} "
                f"{fmt_value(self.limit, unit)}")


def load_baseline(path: str | os.PathLike[str], key: str | None = None) -> dict[str, float]:
    """The thresholds of a baseline file: {"max_mean_kl": ..., ...}, or {"models": {KEY: {...}}} with `key`
    picking one. "note" entries are comments."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DriftUsageError(f"cannot read the baseline '{path}': {exc}") from exc
    if not isinstance(data, dict):
        raise DriftUsageError(f"the baseline '{path}' must be a JSON object")
    if "models" in data:
        models = data["models"]
        if not isinstance(models, dict) or not models:
            raise DriftUsageError(f"'models' in the baseline '{path}' must be an object of threshold sets")
        if key is None:
            raise DriftUsageError(f"the baseline '{path}' has threshold sets {', '.join(models)}; pick one with "
                                  "--baseline-key")
        if key not in models:
            raise DriftUsageError(f"the baseline '{path}' has no '{key}' (it has {', '.join(models)})")
        data = models[key]
    elif key is not None:
        raise DriftUsageError(f"the baseline '{path}' has no 'models' section, so --baseline-key does not apply")
    thresholds = {k: v for k, v in data.items() if k != "note"}
    for k, v in thresholds.items():
        if k not in THRESHOLDS:
            raise DriftUsageError(f"unknown threshold '{k}' in the baseline '{path}' (known: {', '.join(THRESHOLDS)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DriftUsageError(f"threshold '{k}' in the baseline '{path}' must be a number, not {json.dumps(v)}")
    if not thresholds:
        raise DriftUsageError(f"the baseline '{path}' sets no threshold")
    return {k: float(v) for k, v in thresholds.items()}


def check(report: dict, thresholds: dict[str, float]) -> list[Check]:
    """Each threshold against the report's value; a metric the report lacks is a usage error."""
    out = []
    for name, limit in thresholds.items():
        t = THRESHOLDS[name]
        value = report
        for part in t.path:
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            why = {"task": "the demo task (the demo model, no --prompts)",
                   "prompt_side": "--prompt-positions above 0"}.get(t.path[0], "this metric")
            raise DriftUsageError(f"the baseline bounds {name}, which needs {why}")
        value = float(value)
        ok = value <= limit if t.op == "<=" else value >= limit
        out.append(Check(name, t.label, value, limit, t.op, ok))
    return out
