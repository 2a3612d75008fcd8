"""The 26B shape on this machine: load, plan, and run contexts of growing length, each in its own process.

    python -m pydgemma.models.synthetic --preset diffusiongemma-26B-A4B -t Q4_K_M -o dg26b-q4km.gguf
    python benchmarks/scale.py dg26b-q4km.gguf                       # n_ctx 4096, 32768, 131072
    python benchmarks/scale.py dg26b-q4km.gguf --n-ctx 4096 --kv-type q8_0 --json out.json

For each n_ctx a child process loads the model (mmap), asks for the memory plan, creates the
context (which refuses when the plan does not fit), prefills --prefill tokens, and runs one
denoising step without and two with self-conditioning (the first builds the model's table). It reports the load time, the plan against
what the process holds (anonymous and file-backed resident memory, and the context's own buffers),
prefill tokens/s and the step times. The weights are random (the synthetic writer's): the figures
are the real shape's cost, not its output.

--long-prompt N (mid-size model instead): prefills an N-token prompt in batches and reports the
resident memory after each eighth, to show that compute memory does not grow with the prompt
beyond the KV cache."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
t0 = time.perf_counter()
import pydgemma
path, n_ctx, n_prefill, kv_type, threads, repack, long_prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6] == "1", int(sys.argv[7])

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out

model = pydgemma.Model(path, device="cpu", n_threads=threads or None, repack=repack)
t_load = time.perf_counter() - t0
plan = model.plan_memory(n_ctx, kv_type=kv_type)
out = {"n_ctx": n_ctx, "kv_type": kv_type, "load_s": t_load, "plan": plan, "after_load": status()}
t = time.perf_counter()
ctx = model.context(n_ctx=n_ctx, kv_type=kv_type)
out["context_s"] = time.perf_counter() - t
rng = np.random.default_rng(0)
V, C = model.hparams["n_vocab"], model.hparams["canvas_length"]
if long_prompt:
    marks = []
    done, step = 0, long_prompt // 8
    t = time.perf_counter()
    while done < long_prompt:
        ctx.prefill(rng.integers(0, V, min(step, long_prompt - done)))
        done = ctx.n_past
        marks.append({"tokens": done, **status(), "compute_bytes": ctx.info["compute_bytes"]})
    out["prefill_tok_per_s"] = long_prompt / (time.perf_counter() - t)
    out["long_prompt"] = marks
else:
    t = time.perf_counter()
    ctx.prefill(rng.integers(0, V, n_prefill))
    out["prefill_tok_per_s"] = n_prefill / (time.perf_counter() - t)
    canvas = rng.integers(0, V, C)
    u = rng.uniform(0.01, 0.99, C).astype(np.float32)
    t = time.perf_counter()
    ctx.step(canvas, 0.8, u, self_cond=False)
    out["step_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ctx.step(canvas, 0.8, u, self_cond=True)  # the first builds the model's self-conditioning table
    out["first_step_sc_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ctx.step(canvas, 0.8, u, self_cond=True)
    out["step_sc_s"] = time.perf_counter() - t
out["info"] = ctx.info
out["table_bytes"] = plan["self_cond_table"]
out["end"] = status()
print(json.dumps(out))
"""


def gib(n: float) -> str:
    return f"{n / 2**30:6.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="A .gguf file (e.g. the synthetic 26B).")
    ap.add_argument("--n-ctx", default="4096,32768,131072", help="Comma-separated context sizes.")
    ap.add_argument("--prefill", type=int, default=512, help="Prompt tokens prefilled in each context.")
    ap.add_argument("--kv-type", default="f16", choices=("f16", "f32", "q8_0"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-repack", action="store_true", help="Run the weights from the mapping (no repacked copy).")
    ap.add_argument("--long-prompt", type=int, default=0, help="Prefill a prompt this long instead (see above).")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not args.model.is_file():
        sys.exit(f"no such model file: {args.model}")
    results = []
    for n_ctx in [int(x) for x in args.n_ctx.split(",")]:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", CHILD, str(args.model), str(n_ctx), str(args.prefill), args.kv_type,
                            str(args.threads), "0" if args.no_repack else "1", str(args.long_prompt)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            print(f"n_ctx {n_ctx}: failed: {last}", flush=True)
            results.append({"n_ctx": n_ctx, "error": last})
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["wall_s"] = time.perf_counter() - t
        results.append(res)
        p, end, info = res["plan"], res["end"], res["info"]
        held = end["RssAnon"] + end["RssFile"]
        buffers = info["kv_bytes"] + info["compute_bytes"] + info["self_cond_bytes"] + res["table_bytes"]
        planned = p["kv"] + p["compute"] + p["self_cond_state"] + p["self_cond_table"]
        print(f"n_ctx {n_ctx} ({res['kv_type']} KV, {'flash' if info['flash_attn'] else 'matmul'} attention): "
              f"load {res['load_s']:.1f} s, context {res['context_s']:.1f} s", flush=True)
        print(f"  plan (GiB): weights {gib(p['weights_copied'])} copied + {gib(p['weights_mapped'])} mapped, "
              f"KV {gib(p['kv'])}, SC table {gib(p['self_cond_table'])}, SC state {gib(p['self_cond_state'])}, "
              f"compute {gib(p['compute'])}; total {gib(p['total'])}")
        print(f"  measured (GiB): resident {gib(held)} (anonymous {gib(end['RssAnon'])}, file {gib(end['RssFile'])}), "
              f"peak {gib(end['VmHWM'])}; context buffers {gib(buffers)} vs planned {gib(planned)} "
              f"({buffers / planned:.2f}x); KV {gib(info['kv_bytes'])}, compute {gib(info['compute_bytes'])}")
        if "long_prompt" in res:
            for m in res["long_prompt"]:
                print(f"    after {m['tokens']:>7} tokens: anonymous {gib(m['RssAnon'])} GiB, compute {gib(m['compute_bytes'])} GiB")
            print(f"  prefill {res['prefill_tok_per_s']:.1f} tok/s")
        else:
            print(f"  prefill {res['prefill_tok_per_s']:.1f} tok/s; one step {res['step_s']:.2f} s, "
                  f"with self-conditioning {res['step_sc_s']:.2f} s (the first, which builds the table, "
                  f"{res['first_step_sc_s']:.2f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
