"""The generation loop's step, side by side across pydgemma installs (e.g. before and after a change),
each engine in its own process on the same GGUF, prompt and canvas.

    python benchmarks/step_loop.py --engine before=/tmp/venv-before/bin/python --engine after=python
    python benchmarks/step_loop.py --engine cpu=python --engine vulkan=python:Vulkan0 --size tiny --type f32

An engine is NAME=PYTHON[:DEVICE]. Per engine: the median of --repeat steps with self-conditioning as
the generation loop runs them (an install with ``Context.step``: the device step and the host's
decisions; an older one: ``denoise`` with the previous step's processed logits uploaded, then the host
sampler over the logits read back), the bytes that cross per step, and a generation of --canvases
canvases of exactly --steps steps. Ratios are against the first engine. The model is built once and
cached as benchmarks/side_by_side.py does (``--work``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from side_by_side import prepare  # noqa: E402

CHILD = r"""
import json, statistics, sys, time
import numpy as np
import pydgemma
from pydgemma.generate import generate_ids
from pydgemma.sampler import Sampler

path, device, repeat, steps, canvases, n_prompt, threads, n_ctx = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
model = pydgemma.Model(path, device=device, n_threads=threads or None)
hp = model.hparams
V, C = hp["n_vocab"], hp["canvas_length"]
rng = np.random.default_rng(0)
prompt = rng.integers(0, V, n_prompt).astype(np.int32)
canvas = rng.integers(0, V, C).astype(np.int32)
ctx = model.context(n_ctx=max(n_ctx, n_prompt + (canvases + 1) * C))
ctx.prefill(prompt)
sampler = Sampler(model, seed=0, max_steps=10_000)
device_step = hasattr(ctx, "step")
times = []
work = canvas.copy()
if device_step:
    ctx.step(work, sampler.temperature, sampler.uniforms())
    sampler.decide(ctx.step(work, sampler.temperature, sampler.uniforms(), self_cond=True), work)
    before = ctx.step_stats
    for _ in range(repeat):
        t = time.perf_counter()
        rows = ctx.step(work, sampler.temperature, sampler.uniforms(), self_cond=True)
        sampler.decide(rows, work)
        times.append(time.perf_counter() - t)
    after = ctx.step_stats
    moved = {"to_device": (after["bytes_to_device"] - before["bytes_to_device"]) / repeat,
             "from_device": (after["bytes_from_device"] - before["bytes_from_device"]) / repeat}
else:
    sc = ctx.denoise(work)
    sampler.step(sc, work)
    for _ in range(repeat):
        t = time.perf_counter()
        logits = ctx.denoise(work, sc)
        sampler.step(logits, work)
        sc = logits
        times.append(time.perf_counter() - t)
    moved = {"to_device": 4.0 * V * C + 8 * C, "from_device": 4.0 * V * C}  # logits back, processed logits in
ctx.reset()
t = time.perf_counter()
gen = generate_ids(ctx, prompt, max_new_tokens=canvases * C, sampler={"seed": 0, "max_steps": steps,
                   "confidence_threshold": -1.0}, eos_ids=[])
total = time.perf_counter() - t
def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
out = {"device_step": device_step, "device": model.device, "step_ms": 1e3 * statistics.median(times),
       "bytes": moved, "end_to_end_s": total, "steps": gen.steps, "peak_rss": peak_rss(),
       "kv_bytes": ctx.info["kv_bytes"] if hasattr(ctx, "info") else None}
if device_step:
    from pydgemma.bench import run_bench
    out["bench_step"] = run_bench(model, prompt=prompt, canvas=canvas, repeat=max(3, repeat // 2), canvases=1, steps=2,
                                  fixed_steps=True)["step"]
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", action="append", required=True, help="NAME=PYTHON[:DEVICE] (repeatable)")
    ap.add_argument("--size", choices=("tiny", "mid"), default="mid")
    ap.add_argument("--type", default="q8_0", help="GGUF type (f32, f16, q8_0, q4_k_m, ...)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--canvases", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--n-ctx", type=int, default=0, help="Context size (default: the prompt and the canvases).")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    engines = []
    for spec in args.engine:
        name, _, rest = spec.partition("=")
        python, _, device = rest.partition(":")
        exe = shutil.which(python)
        if not name or exe is None:
            sys.exit(f"--engine {spec}: expected NAME=PYTHON[:DEVICE] with a Python on PATH or a path to one")
        engines.append((name, str(Path(exe).absolute()), device))
    work = args.work or Path.home() / ".cache" / "pydgemma" / "bench" / args.size
    work.mkdir(parents=True, exist_ok=True)
    _, files = prepare(args.size, work, [args.type])
    results = {}
    for name, python, device in engines:
        r = subprocess.run([python, "-c", CHILD, str(files[args.type]), device or "cpu", str(args.repeat), str(args.steps),
                            str(args.canvases), str(args.prompt_tokens), str(args.threads), str(args.n_ctx)],
                           capture_output=True, text=True, cwd="/")
        if r.returncode != 0:
            sys.exit(f"engine {name} failed:\n{r.stderr}")
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
    base = next(iter(results.values()))
    print(f"{args.size} model, {args.type}, prompt {args.prompt_tokens}, {args.steps} steps x {args.canvases} canvas(es)")
    print(f"{'engine':<12} {'device':<9} {'step+SC ms':>11} {'x':>6} {'bytes in/out per step':>26} {'e2e s':>8} {'x':>6} "
          f"{'peak RSS':>9} {'KV':>9}  shares")
    for name, r in results.items():
        shares = ""
        if "bench_step" in r:
            shares = ", ".join(f"{k} {v:.0%}" for k, v in r["bench_step"]["share"].items())
        moved = f"{r['bytes']['to_device']:.0f} / {r['bytes']['from_device']:.0f}"
        kv = f"{r['kv_bytes'] / 2**20:.0f} MiB" if r.get("kv_bytes") is not None else "-"
        print(f"{name:<12} {r['device']:<9} {r['step_ms']:>11.1f} {base['step_ms'] / r['step_ms']:>6.2f} {moved:>26} "
              f"{r['end_to_end_s']:>8.2f} {base['end_to_end_s'] / r['end_to_end_s']:>6.2f} "
              f"{r['peak_rss'] / 2**20:>5.0f} MiB {kv:>9}  {shares}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
