"""`pydgemma bench` reports consistent figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_json(converted: dict[str, Path]) -> None:
    r = subprocess.run([sys.executable, "-m", "pydgemma", "bench", "-m", str(converted["f32"]), "--json", "--steps", "4",
                        "--fixed-steps", "--canvases", "2", "--repeat", "2", "--prompt-tokens", "20"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    gen = data["generation"]
    assert gen["steps_per_canvas"] == [4, 4] and gen["fixed_steps"]
    assert gen["generated_tokens"] == 2 * 16
    assert gen["tokens_per_forward"] == 32 / 8
    step = data["denoise_step"]
    assert step["forward"]["median_ms"] > 0 and step["sampler"]["median_ms"] > 0
    assert abs(sum(step["share"].values()) - 1.0) < 1e-9
    assert data["prefill_tok_per_s"] > 0 and data["peak_rss_bytes"] > 10 * 2**20
    assert data["sc_top_k"] == 0
    # the device step: its parts, and the bytes per step (16 positions: canvas, positions and
    # uniforms in, plus the temperature and the KV cache's slots and masks; argmax, draw and entropy out)
    dev = data["step"]
    assert dev["graph_with_self_conditioning"]["median_ms"] > 0 and dev["total"]["median_ms"] > 0
    assert abs(sum(dev["share"].values()) - 1.0) < 1e-9
    import pydgemma
    from step_bytes import step_bytes_to_device

    per_step = step_bytes_to_device(pydgemma.Model(converted["f32"]), data["context"], n_past=20)
    assert dev["bytes_to_device"] == per_step and dev["bytes_from_device"] == 12 * 16
    assert gen["bytes_to_device_per_step"] == per_step and gen["bytes_from_device_per_step"] == 12 * 16
    assert set(gen["timings"]) == {"total", "prefill", "steps", "sampler", "callback", "python"}
    # the CPU backend reports how ggml was built (what decides whether its tiled matmuls are there)
    import ggml

    assert ("AVX2" in data["ggml_features"]) == bool(ggml.ggml_cpu_has_avx2())
    assert ("LLAMAFILE" in data["ggml_features"]) == bool(ggml.ggml_cpu_has_llamafile())
    assert data["model"]["n_layer"] == 6 and data["prompt_tokens"] == 20


def test_bench_table(converted: dict[str, Path]) -> None:
    r = subprocess.run([sys.executable, "-m", "pydgemma", "bench", "-m", str(converted["f32"]), "--steps", "2",
                        "--repeat", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for label in ("prefill", "denoise step: forward", "self-conditioning", "sampler", "tokens per forward", "peak RSS",
                  "ggml features", "device step", "bytes per step", "python"):
        assert label in r.stdout
    import ggml

    assert ("-DGGML_LLAMAFILE=ON" in r.stderr) == (not ggml.ggml_cpu_has_llamafile())
