"""`pydgemma bench`: where the time of a generation goes, measured on this machine."""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import numpy as np


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median_ms": 1e3 * statistics.median(ordered), "p90_ms": 1e3 * p90}


def run_bench(model, *, prompt_tokens: int = 64, canvases: int = 1, steps: int | None = None, fixed_steps: bool = False,
              repeat: int = 5, seed: int = 0, prompt: np.ndarray | None = None, canvas: np.ndarray | None = None, sc_top_k: int = 0) -> dict[str, Any]:
    """Prefill speed; one denoise step split into forward, self-conditioning and sampler; and a
    whole generation (steps per canvas, tokens/s, tokens per forward). Random prompt and canvas
    tokens unless given (side-by-side benchmarks pass the ones they feed transformers)."""
    from .generate import generate_ids
    from .sampler import Sampler, default_params

    hp = model.hparams
    C, V = hp["canvas_length"], hp["n_vocab"]
    rng = np.random.default_rng(seed)
    prompt = (rng.integers(0, V, prompt_tokens) if prompt is None else np.asarray(prompt)).astype(np.int32)
    prompt_tokens = len(prompt)
    ctx = model.context(n_ctx=min(hp["n_ctx_train"], prompt_tokens + (canvases + 1) * C), sc_top_k=sc_top_k)

    prefill = []
    for _ in range(max(1, repeat // 2)):
        ctx.reset()
        t = time.perf_counter()
        ctx.prefill(prompt)
        prefill.append(time.perf_counter() - t)

    canvas = (rng.integers(0, V, C) if canvas is None else np.asarray(canvas)).astype(np.int32)
    device_step = _device_step(model, ctx, canvas, repeat, seed)
    logits = ctx.denoise(canvas)  # warm-up, and the self-conditioning input below
    plain, with_sc, sampling = [], [], []
    sampler = Sampler(model, seed=seed)
    for _ in range(repeat):
        t = time.perf_counter()
        ctx.denoise(canvas)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = ctx.denoise(canvas, logits)
        with_sc.append(time.perf_counter() - t)
        t = time.perf_counter()
        sampler.new_canvas()
        sampler.step(out, canvas.copy())
        sampling.append(time.perf_counter() - t)

    settings: dict[str, Any] = {"seed": seed, "max_steps": steps}
    if fixed_steps:
        settings["confidence_threshold"] = -1.0  # never confident: every canvas runs all its steps
    ctx.reset()
    t = time.perf_counter()
    gen = generate_ids(ctx, prompt, max_new_tokens=canvases * C, sampler=settings, eos_ids=[])
    total = time.perf_counter() - t

    forward = statistics.median(plain)
    sc_cost = max(0.0, statistics.median(with_sc) - forward)
    sample_cost = statistics.median(sampling)
    step = forward + sc_cost + sample_cost
    # the device step's parts: its graph without self-conditioning is the forward pass plus the
    # sampler's reductions (the forward here is dg_denoise's, which also copies the logits out)
    # The sampler's reductions on the device, measured alone over uploaded logits (an upper bound:
    # the upload is included), rather than as a difference of two noisy medians.
    reductions = []
    u = np.full(len(canvas), 0.5, dtype=np.float32)
    for _ in range(repeat):
        t = time.perf_counter()
        ctx.reduce_logits(logits, sampler.temperature, u)
        reductions.append(time.perf_counter() - t)
    d_first = statistics.median(device_step["first"])
    d_reduce = statistics.median(reductions)
    d_parts = {  # clamped at 0 and normalised: each median carries its own noise
        "forward": max(0.0, d_first - d_reduce),
        "self_conditioning": max(0.0, statistics.median(device_step["with_self_conditioning"]) - d_first),
        "sampler": d_reduce + statistics.median(device_step["decide"]),
        "python": statistics.median(device_step["python"]),
    }
    d_sum = sum(d_parts.values()) or 1.0
    return {
        "model": {"n_layer": hp["n_layer"], "n_embd": hp["n_embd"], "n_vocab": V, "canvas_length": C,
                  "n_expert": hp["n_expert"], "file_size": model.file_size, "device": model.device,
                  "n_threads": model.n_threads},
        "prompt_tokens": prompt_tokens,
        "sc_top_k": sc_top_k,
        "context": ctx.info,
        "prefill_tok_per_s": prompt_tokens / statistics.median(prefill),
        "denoise_step": {
            "forward": _ms(plain),
            "forward_with_self_conditioning": _ms(with_sc),
            "sampler": _ms(sampling),
            "share": {"forward": forward / step, "self_conditioning": sc_cost / step, "sampler": sample_cost / step},
        },
        "step": {
            "graph_first": _ms(device_step["first"]),
            "graph_with_self_conditioning": _ms(device_step["with_self_conditioning"]),
            "sampler_reductions": _ms(reductions),
            "sampler_decide": _ms(device_step["decide"]),
            "python": _ms(device_step["python"]),
            "total": _ms(device_step["total"]),
            "share": {k: v / d_sum for k, v in d_parts.items()},
            "bytes_to_device": device_step["bytes_to_device"],
            "bytes_from_device": device_step["bytes_from_device"],
        },
        "generation": {
            "canvases": len(gen.steps),
            "steps_per_canvas": gen.steps,
            "max_steps": steps or default_params(model)["max_steps"],
            "fixed_steps": fixed_steps,
            "generated_tokens": len(gen.tokens),
            "seconds": total,
            "generated_tok_per_s": len(gen.tokens) / total if total else 0.0,
            "tokens_per_forward": gen.tokens_per_forward,
            "timings": gen.timings,
            "bytes_to_device_per_step": gen.transfer["to_device"] / max(1, gen.n_forwards),
            "bytes_from_device_per_step": gen.transfer["from_device"] / max(1, gen.n_forwards),
        },
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "ggml_features": list(device_features(model.device)),
    }


def _device_step(model, ctx, canvas: np.ndarray, repeat: int, seed: int) -> dict[str, Any]:
    """The generation loop's step as Python runs it: Context.step on the device (first without,
    then with self-conditioning), Sampler.decide on the host; native time from the context's stats."""
    from .sampler import Sampler

    sampler = Sampler(model, seed=seed)
    out: dict[str, Any] = {"first": [], "with_self_conditioning": [], "decide": [], "python": [], "total": []}
    ctx.step(canvas, sampler.temperature, sampler.uniforms())  # warm-up: graphs built and allocated
    ctx.step(canvas, sampler.temperature, sampler.uniforms(), self_cond=True)
    before = ctx.step_stats
    n_steps = 0
    for _ in range(repeat):
        work = sampler.new_canvas()
        for self_cond in (False, True):
            native_before = ctx.step_stats["seconds"]
            t = time.perf_counter()
            rows = ctx.step(work, sampler.temperature, sampler.uniforms(), self_cond=self_cond)
            t_step = time.perf_counter()
            sampler.decide(rows, work)
            t_end = time.perf_counter()
            native = ctx.step_stats["seconds"] - native_before
            out["first" if not self_cond else "with_self_conditioning"].append(native)
            if self_cond:
                out["decide"].append(t_end - t_step)
                out["python"].append(max(0.0, (t_step - t) - native))
                out["total"].append(t_end - t)
            n_steps += 1
    after = ctx.step_stats
    out["bytes_to_device"] = (after["bytes_to_device"] - before["bytes_to_device"]) / n_steps
    out["bytes_from_device"] = (after["bytes_from_device"] - before["bytes_from_device"]) / n_steps
    return out


def device_features(name: str) -> tuple[str, ...]:
    """The build features ggml reports for the device `name` (e.g. AVX2, LLAMAFILE, REPACK)."""
    from .devices import devices

    return next((d.features for d in devices() if d.name == name), ())


# ggml-python builds ggml without llamafile's tiled matmuls unless asked; with them F16 steps run ~1.6x
# faster and K-quant/Q8_0 steps ~1.05-1.2x (README, "Performance").
SLOW_CPU_HINT = ("ggml was built without LLAMAFILE: its F16/F32 matmuls run up to 1.6x slower. Rebuild it with\n"
                 "  CMAKE_ARGS=\"-DGGML_LLAMAFILE=ON\" pip install --force-reinstall --no-deps --no-cache-dir ggml-python==0.0.45")


def slow_cpu_build(model) -> bool:
    """True when the model runs on a CPU whose ggml lacks llamafile's matmuls."""
    features = device_features(model.device)
    return model.device.upper().startswith("CPU") and bool(features) and "LLAMAFILE" not in features
