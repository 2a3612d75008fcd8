"""The shipped demo model (models/demo/sudoku4-q8_0.gguf) still solves held-out 4x4 Sudoku puzzles.

The puzzles, prompt format and answer check come from ``pydgemma.models.demo.train`` (which does
not import torch at import time). The threshold is the accuracy the training recipe measured
with our runtime on the same puzzles and seeds (``models/demo/metrics.json``) minus a margin for
numerical differences between machines (thread counts, SIMD paths).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import pydgemma
from pydgemma.models.demo import train as demo

DEMO_DIR = Path(__file__).resolve().parent.parent / "models" / "demo"
GGUF = DEMO_DIR / "sudoku4-q8_0.gguf"
N_PUZZLES = 20
MARGIN = 0.10


@pytest.fixture(scope="module")
def model():
    if not GGUF.exists():
        pytest.skip(f"{GGUF} is missing")
    with pydgemma.Model(GGUF) as m:
        yield m


@pytest.fixture(scope="module")
def measured() -> dict:
    return json.loads((DEMO_DIR / "metrics.json").read_text(encoding="utf-8"))


def test_helpers_do_not_import_torch() -> None:
    # A fresh interpreter: importing the recipe must not pull in torch or transformers.
    import subprocess

    code = "import sys, pydgemma.models.demo.train; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_puzzle_helpers() -> None:
    assert len(demo.all_grids()) == 288
    puzzles = demo.test_puzzles(N_PUZZLES)
    assert puzzles == demo.test_puzzles(N_PUZZLES)  # seeded
    for puzzle, solution in puzzles:
        assert demo.solutions([0 if c == demo.BLANK else int(c) for c in puzzle.replace(demo.SEP, "")]) == [
            tuple(int(c) for c in solution.replace(demo.SEP, ""))
        ]
        assert demo.check_answer(puzzle, solution)
        assert demo.check_answer(puzzle, f" {solution}\n")
    puzzle, solution = puzzles[0]
    assert not demo.check_answer(puzzle, solution[:-1])
    assert not demo.check_answer(puzzle, "1234/1234/1234/1234")
    other = next(g for g in demo.all_grids() if demo.format_grid(g) != solution)
    assert not demo.check_answer(puzzle, demo.format_grid(other))  # valid grid, breaks a clue


def test_hparams(model) -> None:
    hp = model.hparams
    assert hp["canvas_length"] == demo.CANVAS_LENGTH
    assert hp["n_expert"] == 4 and hp["n_expert_used"] == 2
    assert hp["has_self_conditioning"] is True
    sliding = [layer.is_sliding for layer in model.layers]
    assert len(sliding) == hp["n_layer"] == 4
    assert any(sliding) and not sliding[-1]  # both layer types, the last one full attention
    assert model.file_size <= 5 * 1024 * 1024
    assert {t.type for name, t in model.tensors.items() if name.endswith("attn_q.weight")} == {"q8_0"}


def test_solves_held_out_puzzles(model, measured) -> None:
    results = []
    for i, (puzzle, _solution) in enumerate(demo.test_puzzles(N_PUZZLES)):
        gen = model.generate(demo.prompt_text(puzzle), max_new_tokens=demo.CANVAS_LENGTH, seed=i)
        results.append(demo.check_answer(puzzle, gen.text))
    accuracy = sum(results) / len(results)
    recorded = measured["eval_q8_0"]["solved"][:N_PUZZLES]
    expected = recorded.count("1") / N_PUZZLES
    assert accuracy >= expected - MARGIN, (accuracy, expected)
    assert accuracy >= 0.9  # the bar; chance (random digits) is about 0
