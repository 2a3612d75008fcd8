"""pydgemma against transformers 5.23 on one random DiffusionGemma checkpoint, in one run: the
same prompt, the same canvas, the same number of denoising steps. Prints a table of ratios
(transformers float32 = 1.00) and writes JSON.

    python benchmarks/side_by_side.py                       # the ~0.35 B "mid" model (about 3 min)
    python benchmarks/side_by_side.py --size tiny --types f32 q8_0 --json out.json

Per engine it measures
  * prefill: tokens/s over a --prompt-token prompt, from an empty cache;
  * one denoise step of a 256-token canvas: the forward alone, and with self-conditioning
    (pydgemma also splits off its sampler);
  * end to end: prefill, then --canvases canvases of exactly --steps steps each (no adaptive
    stop, no EOS), sampler and commits included: transformers' own ``generate`` against
    pydgemma's native loop.
and a roofline line: this machine's measured float32 matmul GFLOP/s (torch) and memory bandwidth
(numpy copy) against the step's FLOPs and weight bytes.

The checkpoint, its GGUF files and nothing else are cached in --work (default
~/.cache/pydgemma/bench/<size>); delete it to rebuild.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# Presets of pydgemma.models.registry: "tiny", the test model (6 layers, hidden 64, 4 experts, vocab
# 512, canvas 16); "mid", ~0.35 B parameters (~85 M active per token: hidden 768, 12 layers with full
# attention at 5 and 11, 24 experts top-4, vocab 32768, canvas 256).
SIZES = ("tiny", "mid")
QUANT_TYPES = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K", "nvfp4": "NVFP4"}


def median_s(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prepare(size: str, work: Path, types: list[str]) -> tuple[Path, dict[str, Path]]:
    """The checkpoint and one GGUF per type, built once and reused."""
    from pydgemma.models import registry
    from pydgemma.models.tiny_checkpoint import build_tiny_checkpoint
    from pydgemma.quantize import convert
    from pydgemma.quantize.quantize import quantize

    ckpt = work / "hf"
    if not (ckpt / "config.json").is_file():
        print(f"building the {size} checkpoint in {ckpt} ...", flush=True)
        build_tiny_checkpoint(ckpt, registry.get(size).tiny_spec())
    files = {}
    for t in types:
        path = work / f"model-{t}.gguf"
        if not path.is_file():
            print(f"making {path.name} ...", flush=True)
            if t in QUANT_TYPES:
                f32 = work / "model-f32.gguf"
                if not f32.is_file():
                    convert(ckpt, f32, out_type="f32")
                quantize(f32, path, mix=QUANT_TYPES[t])
            else:
                convert(ckpt, path, out_type=t)
        files[t] = path
    return ckpt, files


def bench_transformers(ckpt: Path, dtype_name: str, prompt: np.ndarray, canvas: np.ndarray, *, canvases: int,
                       steps: int, repeat: int) -> dict:
    import torch

    from pydgemma.models.reference import ReferenceSession

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    ref = ReferenceSession(str(ckpt), dtype=dtype)

    def prefill() -> None:
        ref.reset()
        ref.prefill(prompt)

    prefill_s = median_s(prefill, max(1, repeat // 2))
    prefill()
    logits = ref.denoise(canvas)
    forward_s = median_s(lambda: ref.denoise(canvas), repeat)
    with_sc_s = median_s(lambda: ref.denoise(canvas, sc_logits=logits), repeat)

    model = ref.model
    C = model.config.text_config.canvas_length if hasattr(model.config.text_config, "canvas_length") else len(canvas)
    ids = torch.as_tensor(prompt.astype(np.int64))[None]
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=canvases * C, max_denoising_steps=steps, eos_token_id=None,
                       stability_threshold=None)
    total = time.perf_counter() - t
    return {"prefill_tok_per_s": len(prompt) / prefill_s, "forward_ms": 1e3 * forward_s,
            "with_sc_ms": 1e3 * with_sc_s, "end_to_end_s": total, "generated_tok_per_s": canvases * C / total}


def bench_pydgemma(path: Path, prompt: np.ndarray, canvas: np.ndarray, *, canvases: int, steps: int, repeat: int,
                   threads: int | None) -> dict:
    import pydgemma
    from pydgemma.bench import run_bench

    r = run_bench(pydgemma.Model(path, n_threads=threads), prompt=prompt, canvas=canvas, canvases=canvases,
                  steps=steps, fixed_steps=True, repeat=repeat)
    d, g = r["denoise_step"], r["generation"]
    return {"prefill_tok_per_s": r["prefill_tok_per_s"], "forward_ms": d["forward"]["median_ms"],
            "with_sc_ms": d["forward_with_self_conditioning"]["median_ms"], "sampler_ms": d["sampler"]["median_ms"],
            "share": d["share"], "end_to_end_s": g["seconds"], "generated_tok_per_s": g["generated_tok_per_s"],
            "file_mib": path.stat().st_size / 2**20}


def machine_roofline(threads: int) -> dict:
    """Measured float32 matmul throughput (torch, 2048^3) and copy bandwidth (numpy, 256 MiB)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm_s = median_s(lambda: a @ b, 5)
    src = np.ones(64 * 2**20, dtype=np.float32)
    dst = np.empty_like(src)
    copy_s = median_s(lambda: np.copyto(dst, src), 5)
    return {"f32_matmul_gflops": 2 * 2048**3 / mm_s / 1e9, "copy_gb_per_s": 2 * src.nbytes / copy_s / 1e9}


def step_cost(hp: dict, n_prefix: int, files: dict[str, Path]) -> dict:
    """FLOPs of one denoise step with self-conditioning (matmuls only) and the weight bytes it reads."""
    C, d, V = hp["canvas_length"], hp["n_embd"], hp["n_vocab"]
    macs = 0
    for layer in hp["layers"]:
        hd, nkv = layer["head_dim"], layer["n_head_kv"]
        q, kv = hp["n_head"] * hd, nkv * hd
        macs += d * (q + kv * (2 if layer["has_v_proj"] else 1)) + q * d          # projections
        macs += 2 * hp["n_head"] * hd * (n_prefix + C)                               # scores and values
        macs += 3 * d * hp["n_ff"] + hp["n_expert_used"] * 3 * d * hp["n_ff_exp"] + d * hp["n_expert"]
    macs += d * V                          # output head
    macs += V * d + 3 * d * hp["n_ff"]     # self-conditioning: probabilities x embedding, then its MLP
    return {"gflop": 2 * macs * C / 1e9, "weight_bytes": {t: p.stat().st_size for t, p in files.items()}}


def run_engine(args: argparse.Namespace) -> None:
    """One engine's figures as one JSON line on stdout (the child side of main)."""
    import torch

    torch.set_num_threads(args.threads)
    work = args.work
    files = {t: work / f"model-{t}.gguf" for t in args.types}
    import pydgemma

    hp = pydgemma.Model(next(iter(files.values()))).hparams
    V, C = hp["n_vocab"], hp["canvas_length"]
    rng = np.random.default_rng(0)
    prompt = rng.integers(20, V, args.prompt_tokens)
    canvas = rng.integers(20, V, C)
    kind, name = args.engine.split()
    if kind == "transformers":
        r = bench_transformers(work / "hf", name, prompt, canvas, canvases=args.canvases, steps=args.steps,
                               repeat=args.repeat)
    else:
        r = bench_pydgemma(files[name], prompt, canvas, canvases=args.canvases, steps=args.steps, repeat=args.repeat,
                           threads=args.threads)
    print(json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="mid")
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_k_m"],
                    help="GGUF types to run: f32 f16 bf16 q8_0 q4_k_m q5_k_m q6_k nvfp4")
    ap.add_argument("--transformers", nargs="*", default=["f32", "bf16"], choices=["f32", "bf16"],
                    help="transformers dtypes to run (f32 is the baseline of the ratios)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--canvases", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per canvas, for every engine")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both engines (default: physical cores)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # internal: measure one engine in this process
    args = ap.parse_args()
    if args.engine:
        return run_engine(args)

    import torch

    import pydgemma

    work = args.work or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pydgemma" / "bench" / args.size
    work.mkdir(parents=True, exist_ok=True)
    ckpt, files = prepare(args.size, work, list(dict.fromkeys(args.types)))

    probe = pydgemma.Model(next(iter(files.values())), n_threads=args.threads)
    threads = probe.n_threads  # the core's default: one per physical core
    torch.set_num_threads(threads)
    hp = dict(probe.hparams)
    hp["layers"] = [dataclasses.asdict(layer) for layer in probe.layers]
    V, C = hp["n_vocab"], hp["canvas_length"]

    # Each engine runs in its own process: torch's and ggml's OpenMP threads keep spinning for a while
    # after their work, and would slow down whichever engine runs next in a shared process.
    results: dict[str, dict] = {}
    engines = [f"transformers {dt}" for dt in args.transformers] + [f"pydgemma {t}" for t in files]
    for engine in engines:
        print(f"{engine} ...", flush=True)
        cmd = [sys.executable, __file__, "--engine", engine, "--size", args.size, "--work", str(work), "--types",
               *files, "--prompt-tokens", str(args.prompt_tokens), "--canvases", str(args.canvases), "--steps",
               str(args.steps), "--repeat", str(args.repeat), "--threads", str(threads)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        results[engine] = json.loads(done.stdout.strip().splitlines()[-1])

    roof = machine_roofline(threads)
    cost = step_cost(hp, args.prompt_tokens, files)
    base = results.get("transformers f32")
    print(f"\n{args.size}: vocab {V}, {hp['n_layer']} layers, hidden {hp['n_embd']}, {hp['n_expert']} experts "
          f"top-{hp['n_expert_used']}; prompt {args.prompt_tokens}, canvas {C}, {args.canvases} canvas(es) x "
          f"{args.steps} steps; {threads} threads")
    head = f"{'engine':20s} {'step ms':>9s} {'+SC ms':>9s} {'prefill tok/s':>14s} {'e2e s':>8s} {'gen tok/s':>10s}"
    if base:
        head += f" {'step x':>7s} {'+SC x':>7s} {'prefill x':>9s} {'e2e x':>7s}"
    print(head)
    for name, r in results.items():
        line = (f"{name:20s} {r['forward_ms']:9.1f} {r['with_sc_ms']:9.1f} {r['prefill_tok_per_s']:14.1f} "
                f"{r['end_to_end_s']:8.2f} {r['generated_tok_per_s']:10.1f}")
        if base:
            r["speedup_vs_transformers_f32"] = {
                "step": base["forward_ms"] / r["forward_ms"], "step_with_sc": base["with_sc_ms"] / r["with_sc_ms"],
                "prefill": r["prefill_tok_per_s"] / base["prefill_tok_per_s"],
                "end_to_end": base["end_to_end_s"] / r["end_to_end_s"]}
            s = r["speedup_vs_transformers_f32"]
            line += f" {s['step']:7.2f} {s['step_with_sc']:7.2f} {s['prefill']:9.2f} {s['end_to_end']:7.2f}"
        print(line)
    for name, r in results.items():
        if "share" in r:
            sh = r["share"]
            print(f"  {name}: forward {sh['forward']:.0%}, self-conditioning {sh['self_conditioning']:.0%}, "
                  f"sampler {sh['sampler']:.0%} of a step ({r['sampler_ms']:.1f} ms sampler)")
    print(f"roofline: this machine does {roof['f32_matmul_gflops']:.0f} GFLOP/s float32 matmul (torch) and copies "
          f"{roof['copy_gb_per_s']:.1f} GB/s; a step with self-conditioning is {cost['gflop']:.1f} GFLOP -> "
          f"{1e3 * cost['gflop'] / roof['f32_matmul_gflops']:.0f} ms at that float32 rate")
    for name, r in results.items():
        t = name.split()[-1]
        if name.startswith("pydgemma") and t in cost["weight_bytes"]:
            r["achieved_gflops"] = cost["gflop"] / (r["with_sc_ms"] / 1e3)
            r["weight_read_ms_at_copy_bandwidth"] = 1e3 * cost["weight_bytes"][t] / (roof["copy_gb_per_s"] * 1e9)
            print(f"  {name}: {r['achieved_gflops']:.0f} GFLOP/s achieved; reading its {r['file_mib']:.0f} MiB of "
                  f"weights takes {r['weight_read_ms_at_copy_bandwidth']:.0f} ms at copy bandwidth")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "threads": threads, "prompt_tokens": args.prompt_tokens,
                                         "canvases": args.canvases, "steps": args.steps, "roofline": roof,
                                         "step_cost": cost, "results": results}, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
