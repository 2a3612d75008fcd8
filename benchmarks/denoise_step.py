"""Wall time of one denoise step (a 256-token canvas over a prompt) for pydgemma and transformers,
measured in the same run on the same random checkpoint, reported as ratios.

    python benchmarks/denoise_step.py --size tiny
    python benchmarks/denoise_step.py --size 100m --types f32 q8_0 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {
    # the test model: 6 layers, hidden 64, 4 experts, vocab 512
    "tiny": dict(),
    # ~100 M parameters: hidden 512, 12 layers (full at 5 and 11), 16 experts top-4, vocab 32000
    "100m": dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                 global_head_dim=128, num_global_key_value_heads=2, intermediate_size=1024, moe_intermediate_size=256,
                 num_experts=16, top_k_experts=4, vocab_size=32000, sliding_window=128, canvas_length=256),
}


def timed(fn, repeat: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"])
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens before the canvas")
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    import pydgemma
    from pydgemma.models.reference import ReferenceSession
    from pydgemma.models.tiny_checkpoint import TinySpec, build_tiny_checkpoint
    from pydgemma.quantize import convert

    work = Path(tempfile.mkdtemp(prefix="dg-bench-"))
    spec = TinySpec(**SIZES[args.size])
    ckpt = build_tiny_checkpoint(work / "hf", spec)
    vocab = spec.vocab_size or 512
    rng = np.random.default_rng(0)
    prompt = rng.integers(20, vocab, args.prompt)
    canvas = rng.integers(20, vocab, args.canvas)
    n_params = sum(p.numel() for n, p in ReferenceSession(ckpt).model.named_parameters() if "vision" not in n)

    results: dict[str, dict] = {}
    torch.set_num_threads(args.threads or torch.get_num_threads())
    ref = ReferenceSession(ckpt)
    ref.prefill(prompt)
    hf_times = timed(lambda: ref.denoise(canvas), args.repeat)
    results["transformers_f32"] = {"median_ms": 1e3 * statistics.median(hf_times)}
    for t in args.types:
        path = convert(ckpt, work / f"m-{t}.gguf", out_type=t).path
        ctx = pydgemma.Model(path, n_threads=args.threads).context(n_ctx=args.prompt + args.canvas)
        ctx.prefill(prompt)
        times = timed(lambda: ctx.denoise(canvas), args.repeat)
        results[f"pydgemma_{t}"] = {"median_ms": 1e3 * statistics.median(times), "file_mb": path.stat().st_size / 2**20}
    base = results["transformers_f32"]["median_ms"]
    print(f"{args.size}: {n_params / 1e6:.1f} M text parameters, prompt {args.prompt}, canvas {args.canvas}, "
          f"threads {args.threads or torch.get_num_threads()}")
    for name, r in results.items():
        r["speedup_vs_transformers_f32"] = base / r["median_ms"]
        print(f"  {name:18s} {r['median_ms']:9.2f} ms/step   x{r['speedup_vs_transformers_f32']:.2f} vs transformers f32")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "params": n_params, "results": results}, indent=2))


if __name__ == "__main__":
    main()
