"""Quantization throughput (MB/s of float32 source weights) of the native core (ggml's quantizers,
multi-threaded) for each type, against gguf-py's pure-numpy quantizers in the same run where
gguf-py has one, plus each type's relative RMS error on Gaussian weights.

    python benchmarks/quantize_bench.py [--rows 4096] [--cols 2816] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gguf
import numpy as np

TYPES = ["F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q5_0", "NVFP4"]


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=2816, help="row length (2816 = DiffusionGemma's hidden size)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from pydgemma.quantize.quantize import native_encoder

    encode = native_encoder(args.threads)
    x = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    mb = x.nbytes / 2**20
    results = {}
    print(f"{args.rows} x {args.cols} float32 ({mb:.0f} MB), threads {args.threads or 'all'}")
    print(f"{'type':6} {'native MB/s':>12} {'numpy MB/s':>11} {'ratio':>7} {'rel. RMS error':>15}")
    for name in TYPES:
        q = gguf.GGMLQuantizationType[name]
        if args.cols % gguf.GGML_QUANT_SIZES[q][0]:
            continue
        native_s = best_of(lambda: encode(x, q), args.repeat)
        blob = np.frombuffer(encode(x, q), dtype=np.uint8).reshape(args.rows, -1)
        back = gguf.quants.dequantize(blob, q).reshape(x.shape)
        err = float(np.sqrt(np.mean((back - x) ** 2) / np.mean(x**2)))
        numpy_s = None
        try:
            numpy_s = best_of(lambda: gguf.quants.quantize(x, q), 1)
        except NotImplementedError:
            pass
        row = {"native_mb_s": mb / native_s, "numpy_mb_s": mb / numpy_s if numpy_s else None,
               "speedup": numpy_s / native_s if numpy_s else None, "rel_rms_error": err}
        results[name] = row
        numpy_txt = f"{row['numpy_mb_s']:11.1f}" if numpy_s else f"{'-':>11}"
        ratio_txt = f"{row['speedup']:6.1f}x" if numpy_s else f"{'-':>7}"
        print(f"{name:6} {row['native_mb_s']:12.1f} {numpy_txt} {ratio_txt} {err:15.4%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
