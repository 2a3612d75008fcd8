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
