"""`pydgemma run` with no arguments: the bundled demo model solves a 4x4 Sudoku."""

from __future__ import annotations

import json
import subprocess
import sys

import pexpect


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pydgemma", "run", *args], capture_output=True, text=True, timeout=120)


def test_default_run_solves_the_sample_puzzle() -> None:
    r = run("--seed", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["puzzle", "answer"]
    assert len(lines) == 6 and lines[-1].startswith("solved in ")


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
