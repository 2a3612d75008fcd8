"""Shared fixtures: diffusion-gemma GGUF files written with the `gguf` package (see tiny_gguf.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

import tiny_gguf


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid tiny diffusion-gemma GGUF (6 layers: 5 sliding + 1 full, 4 experts), built once."""
    return tiny_gguf.write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture
def make_gguf(tmp_path: Path) -> Callable[..., Path]:
    """Writes a variant of the tiny model: make_gguf(drop_keys=(...), reshape={...}, ...)."""
    counter = iter(range(1_000_000))

    def make(**kwargs: Any) -> Path:
        return tiny_gguf.write_gguf(tmp_path / f"variant{next(counter)}.gguf", **kwargs)

    return make


# ------------------------------------------------------------------------------------------------
# Hugging Face checkpoints built with transformers (the reference implementation) and our
# conversions of them. Built once per test session.


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DiffusionGemma checkpoint (fp32 safetensors, tokenizer, generation config)."""
    from pydgemma.models.tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="session")
def hf_tiny_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from pydgemma.models.tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-bf16", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory, hf_tiny: Path) -> dict[str, Path]:
    """hf_tiny converted to every output type: {"f32": path, "f16": ..., "bf16": ..., "q8_0": ...}."""
    from pydgemma.quantize import convert

    out = tmp_path_factory.mktemp("converted")
    return {t: convert(hf_tiny, out / f"tiny-{t}.gguf", out_type=t).path for t in ("f32", "f16", "bf16", "q8_0")}


@pytest.fixture(scope="session")
def converted_odd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A second tiny checkpoint with an odd padded vocabulary (523) and a 24-token canvas, converted
    to F32 and Q8_0 (the shapes that once broke the Vulkan backend)."""
    from pydgemma.models.tiny_checkpoint import TinySpec, build_tiny_checkpoint
    from pydgemma.quantize import convert

    out = tmp_path_factory.mktemp("converted-odd")
    ckpt = build_tiny_checkpoint(out / "hf", TinySpec(vocab_size=523, canvas_length=24, seed=2))
    return {t: convert(ckpt, out / f"odd-{t}.gguf", out_type=t).path for t in ("f32", "q8_0")}


# ------------------------------------------------------------------------------------------------
# The backend under test. PYDGEMMA_TEST_DEVICE names a ggml device (e.g. Vulkan0, in CI's Vulkan
# lane); unset, the CPU's stock-op path (no custom kernels) is tested against its custom-op path.


def device_under_test() -> str:
    import os

    return os.environ.get("PYDGEMMA_TEST_DEVICE", "CPU")
