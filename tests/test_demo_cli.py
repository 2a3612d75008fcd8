"""`pydgemma run` with no arguments: the bundled demo model solves a 4x4 Sudoku."""

from __future__ import annotations

import json
import subprocess
import sys

import pexpect
import pytest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pydgemma", "run", *args], capture_output=True, text=True, timeout=120)


def test_default_run_solves_the_sample_puzzle() -> None:
    r = run("--seed", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["puzzle", "answer"]
    assert len(lines) == 6 and lines[-1].startswith("solved in ")


@pytest.mark.slow
def test_json_is_deterministic_and_solved() -> None:
    a, b = json.loads(run("--json", "--seed", "3").stdout), json.loads(run("--json", "--seed", "3").stdout)
    a.pop("seconds"), b.pop("seconds")
    assert a == b and a["solved"] is True
    assert a["puzzle"].count("/") == 3 and len(a["text"]) == 19


def test_visual_demo() -> None:
    child = pexpect.spawn(sys.executable, ["-m", "pydgemma", "run", "--visual", "--seed", "5"], encoding="utf-8",
                          timeout=120, dimensions=(30, 100))
    child.expect(r"canvas 1  step 1  T 0\.80")
    child.expect(r"solved\S* in")  # "solved" is coloured on a terminal
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_demo_eval_accuracy() -> None:
    r = subprocess.run([sys.executable, "-m", "pydgemma", "demo", "--eval", "40", "--seed", "11"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    accuracy = float(lines[0].split()[1].rstrip("%"))
    assert accuracy >= 90.0, r.stdout
    assert lines[1].startswith("mean steps per canvas: ") and lines[2].startswith("tokens per forward: ")


@pytest.mark.slow
def test_the_recipe_still_trains(tmp_path) -> None:
    """A few optimisation steps of the real recipe on a small batch, then our converter and loader:
    the recipe cannot rot without CI noticing (the full run takes ~13 minutes and is not repeated)."""
    import pydgemma
    from pydgemma.models.demo import train as recipe
    from pydgemma.quantize import convert

    metrics = recipe.train(tmp_path, steps=3, minutes=2, batch_size=4, log_every=1)
    assert metrics["steps_done"] == 3
    assert all(point["loss"] > 0 for point in metrics["loss_curve"])
    gguf = convert(tmp_path / "hf", tmp_path / "m.gguf", out_type="f32").path
    model = pydgemma.Model(gguf)
    assert model.hparams["canvas_length"] == recipe.CANVAS_LENGTH
    assert model.generate(recipe.prompt_text(recipe.test_puzzles(1)[0][0]), max_new_tokens=recipe.CANVAS_LENGTH,
                          seed=0, max_steps=2).steps
