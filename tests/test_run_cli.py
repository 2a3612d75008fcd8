"""`pydgemma run`: one-shot, JSON, the live canvas view and the interactive chat, driven through a
pseudo-terminal (pexpect) as a person would use them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from pydgemma.chat import split_thinking


@pytest.fixture(scope="module")
def gguf(converted: dict[str, Path]) -> str:
    return str(converted["f32"])


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pydgemma", "run", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_json_is_deterministic_for_a_seed(gguf: str) -> None:
    a, b = run("-m", gguf, "-p", "hi", "--seed", "3", "--json"), run("-m", gguf, "-p", "hi", "--seed", "3", "--json")
    assert a.returncode == 0, a.stderr
    da, db = json.loads(a.stdout), json.loads(b.stdout)
    da.pop("seconds"), db.pop("seconds")
    assert da == db
    assert set(da) == {"text", "thinking", "tokens", "steps", "n_forwards", "tokens_per_forward", "hit_eos"}
    assert 0 < len(da["tokens"]) <= 256 and da["n_forwards"] == sum(da["steps"])
    other = json.loads(run("-m", gguf, "-p", "hi", "--seed", "4", "--json").stdout)
    assert other["tokens"] != da["tokens"]


def test_plain_run_streams_the_answer(gguf: str) -> None:
    r = run("-m", gguf, "-p", "hello", "--seed", "1", "--max-tokens", "20", "--steps", "4")
    assert r.returncode == 0, r.stderr
    data = json.loads(run("-m", gguf, "-p", "hello", "--seed", "1", "--max-tokens", "20", "--steps", "4", "--json").stdout)
    # the stream is the raw text (thoughts included) and a newline; --json splits off the thoughts
    assert r.stdout.endswith("\n") and split_thinking(r.stdout[:-1]) == (data["thinking"], data["text"])


def test_errors_are_one_line(gguf: str, tmp_path: Path) -> None:
    r = run("-m", "/etc/hostname", "-p", "hi")
    assert r.returncode == 1 and r.stderr.startswith("error: not a GGUF file") and r.stderr.count("\n") == 1
    r = run("-m", gguf)
    assert r.returncode == 2 and "give a prompt with -p" in r.stderr
    r = run("-m", gguf, "-p", "word " * 5000)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert re.fullmatch(r"error: generate: 0 cached \+ \d+ prompt tokens \+ 1 canvas of 16 do not fit in n_ctx = \d+\n",
                        r.stderr), r.stderr
    r = run("-m", gguf, "-p", "hi", "--device", "tpu")
    assert r.returncode == 1 and r.stderr.startswith("error: unknown device 'tpu'")


def spawn(*args: str) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "pydgemma", "run", *args], encoding="utf-8", timeout=120,
                          dimensions=(40, 120))
    return child


@pytest.mark.slow
def test_visual_view_shows_the_denoising(gguf: str) -> None:
    child = spawn("-m", gguf, "-p", "hi", "--visual", "--seed", "2", "--max-tokens", "32", "--steps", "6")
    child.expect(r"canvas 1  step 1  T 0\.80")
    child.expect(r"canvas 2  step \d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_interactive_chat(gguf: str) -> None:
    child = spawn("-m", gguf, "-i", "--seed", "1", "--max-tokens", "16", "--steps", "4")
    child.expect("pydgemma chat")
    child.expect("> ")
    child.sendline("hello")
    child.expect("> ")  # an answer, then the next prompt
    child.sendline("and another turn")
    child.expect("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(gguf: str) -> None:
    child = spawn("-m", gguf, "-i", "--seed", "1", "--max-tokens", "256", "--steps", "48", "--visual")
    child.expect("> ")
    child.sendline("tell me a long story")
    child.expect(r"canvas 1  step \d")
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect("> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
