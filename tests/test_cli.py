"""The `pydgemma` command: output for good files, one line and exit 1 for bad ones."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pydgemma", *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"error: {message}\n"


def test_console_script_version() -> None:
    exe = shutil.which("pydgemma")
    assert exe, "the pydgemma console script is not on PATH"
    result = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert re.fullmatch(r"pydgemma \S+ \(native core \S+, ggml 0\.15\.3\)\n", result.stdout), result.stdout


def test_help_teaches() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert "info" in result.stdout and "--version" in result.stdout
    result = run("info", "--help")
    assert result.returncode == 0
    assert "--model" in result.stdout and "--json" in result.stdout


def test_info_tables(tiny_model_path: Path) -> None:
    result = run("info", "-m", str(tiny_model_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "architecture diffusion-gemma, 144 tensors" in out
    assert "5 sliding-window, 1 full (full: 5)" in out
    assert re.search(r"│ f16\s+│\s+57 │", out) and re.search(r"│ f32\s+│\s+87 │", out)
    assert "CPU" in out


def test_info_json(tiny_model_path: Path) -> None:
    result = run("info", "-m", str(tiny_model_path), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["architecture"] == "diffusion-gemma"
    assert data["tensor_count"] == 144
    assert data["hparams"]["n_layer"] == 6 and data["hparams"]["canvas_length"] == 16
    assert data["tensor_types"]["f16"]["count"] == 57
    assert data["file_size"] == tiny_model_path.stat().st_size
    assert [l["sliding"] for l in data["layers"]] == [True] * 5 + [False]
    assert data["diffusion"]["diffusion.eb_max_steps"] == "48"
    assert any(d["type"] == "cpu" for d in data["devices"])


def test_info_on_a_text_file() -> None:
    assert_one_line_error(run("info", "-m", "/etc/hostname"),
                          "not a GGUF file: '/etc/hostname' does not start with the GGUF magic")


def test_info_on_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.gguf"
    assert_one_line_error(run("info", "-m", str(path)), f"cannot open '{path}': No such file or directory")


def test_info_on_directory(tmp_path: Path) -> None:
    assert_one_line_error(run("info", "-m", str(tmp_path)), f"cannot open '{tmp_path}': is a directory, expected a .gguf file")


def test_info_on_truncated_file(tmp_path: Path, tiny_model_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_model_path.read_bytes()[:-5000])
    result = run("info", "-m", str(path))
    assert result.returncode == 1 and result.stderr.startswith("error: file truncated: tensor data ends at byte ")
    assert result.stderr.count("\n") == 1


def test_info_unknown_device(tiny_model_path: Path) -> None:
    result = run("info", "-m", str(tiny_model_path), "--device", "gpu9")
    assert result.returncode == 1
    assert result.stderr.startswith("error: unknown device 'gpu9' (available: auto, CPU")


@pytest.mark.parametrize(("args", "option"), [(("info",), "'--model'"), (("info", "-m"), "'-m'")])
def test_usage_errors_exit_2(args: tuple[str, ...], option: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    # the error line names the option (the usage line always holds "-m": "python -m pydgemma")
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error:") and option in error, result.stderr
