"""The memory planner: its parts are what a context allocates (KV cache and self-conditioning
exactly, the total within 10 % of everything the context and its model hold after generating), a
context that does not fit is refused up front with the breakdown, and `pydgemma info` prints it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pydgemma
from pydgemma.generate import generate_ids
from pydgemma.quantize import convert


@pytest.fixture(scope="module")
def mid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Q8_0 model with a 32768-token vocabulary and 256-token canvases (where the vocabulary-sized
    tensors weigh what they do at scale), 2 MiB of weights."""
    from pydgemma.models.tiny_checkpoint import TinySpec, build_tiny_checkpoint
    from pydgemma.quantize.quantize import quantize

    root = tmp_path_factory.mktemp("plan")
    spec = TinySpec(vocab_size=32768, hidden_size=64, canvas_length=256, sliding_window=64, seed=2)
    ckpt = build_tiny_checkpoint(root / "hf", spec)
    f32 = convert(ckpt, root / "f32.gguf", out_type="f32").path
    return quantize(f32, root / "q8_0.gguf", mix="Q8_0").path


@pytest.fixture(scope="module")
def huge_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small weights, a 1M-token context and wide KV heads: 32 KiB of F16 KV cache per token."""
    from pydgemma.models.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    root = tmp_path_factory.mktemp("huge")
    spec = TinySpec(num_attention_heads=16, head_dim=256, global_head_dim=512, num_key_value_heads=8, num_global_key_value_heads=16,
                    max_position_embeddings=1 << 20, seed=4)
    return convert(build_tiny_checkpoint(root / "hf", spec), root / "f32.gguf", out_type="f32").path


@pytest.mark.parametrize("kv_type", ["f16", pytest.param("f32", marks=pytest.mark.slow),
                                     pytest.param("q8_0", marks=pytest.mark.slow)])
def test_plan_parts_are_what_the_context_allocates(mid: Path, kv_type: str) -> None:
    model = pydgemma.Model(mid)
    plan = model.plan_memory(3000, kv_type=kv_type)
    ctx = model.context(n_ctx=3000, kv_type=kv_type)
    info = ctx.info
    assert plan["n_ctx"] == 3000 and plan["kv_type"] == kv_type and plan["flash_attn"] == info["flash_attn"]
    assert plan["kv"] == info["kv_bytes"]
    C, V = model.hparams["canvas_length"], model.hparams["n_vocab"]
    gen = generate_ids(ctx, list(range(1, 40)), max_new_tokens=2 * C, sampler={"seed": 1, "max_steps": 3}, eos_ids=[])
    assert len(gen.tokens) == 2 * C and len(gen.steps) == 2 and all(1 <= s <= 3 for s in gen.steps)
    info = ctx.info
    assert plan["self_cond_state"] == info["self_cond_bytes"] == 4 * C * V
    assert plan["self_cond_table"] == info["sc_table_bytes"] == V * model.hparams["n_embd"] * 34 // 32  # Q8_0
    # a second context shares the model's table: nothing to plan for it
    assert model.plan_memory(3000, kv_type=kv_type)["self_cond_table"] == 0
    held = (plan["weights_copied"] + plan["weights_mapped"] + info["kv_bytes"] + info["sc_table_bytes"] +
            info["self_cond_bytes"] + info["compute_bytes"])
    assert abs(plan["total"] - held) <= 0.1 * held, (plan, info)
    assert plan["fits"]


def test_refused_up_front_with_the_breakdown(huge_context: Path) -> None:
    model = pydgemma.Model(huge_context)
    plan = model.plan_memory(1 << 20)
    # 5 sliding layers hold a ring of 768 slots, the full layer every position: K and V, F16
    assert plan["kv"] == 2 * 2 * (5 * 768 * 8 * 256 + (1 << 20) * 16 * 512)
    assert not plan["fits"] and plan["total"] > plan["device_free"] > 0
    with pytest.raises(pydgemma.PydgemmaError) as info:
        model.context(n_ctx=1 << 20)
    msg = str(info.value)
    assert msg.startswith("n_ctx = 1048576 does not fit on CPU: ") and f"KV cache {plan['kv'] / 2**30:.2f} GiB" in msg
    assert "use a smaller n_ctx" in msg and "\n" not in msg
    # a context that fits is not refused
    assert model.context(n_ctx=4096).n_ctx == 4096


def test_info_prints_the_plan(huge_context: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pydgemma", "info", "-m", str(huge_context), "--n-ctx", "1048576", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)["memory_plan"]
    assert plan["n_ctx"] == 1 << 20 and not plan["fits"]
    r = subprocess.run([sys.executable, "-m", "pydgemma", "info", "-m", str(huge_context), "--n-ctx", "65536", "--kv-type",
                        "q8_0"], capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin"})
    assert r.returncode == 0, r.stderr
    assert "memory of a context of 65536 tokens on CPU (KV q8_0, flash attention)" in r.stdout
    assert "KV cache" in r.stdout and "fits" in r.stdout and "does not fit" not in r.stdout
    r = subprocess.run([sys.executable, "-m", "pydgemma", "run", "-m", str(huge_context), "-p", "hi", "-n", "1048000"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "does not fit on CPU" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_values(mid: Path) -> None:
    model = pydgemma.Model(mid)
    with pytest.raises(pydgemma.PydgemmaError, match="sc_table must be one of auto, f32, f16, q8_0"):
        model.plan_memory(64, sc_table="bf16")
    with pytest.raises(pydgemma.PydgemmaError, match="exceeds the model's context length"):
        model.plan_memory(10**7)
    assert np.isfinite(model.plan_memory(64)["total"])
