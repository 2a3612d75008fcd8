"""Conversion under a memory limit tighter than the checkpoint, and interrupted conversions."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

WIDE = 112_000  # intermediate_size of the wide checkpoint: ~600 MB of float32 weights
LIMIT = 384 * 1024 * 1024  # RLIMIT_DATA for the converting process


def write_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], object]]) -> None:
    """Streams a float32 safetensors file; each value is an array, or a seed for random rows made
    chunk by chunk (so this test process never holds a whole wide tensor either)."""
    header, offset = {}, 0
    for name, (shape, _) in tensors.items():
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, (shape, value) in tensors.items():
            if isinstance(value, np.ndarray):
                f.write(value.astype("<f4").tobytes())
                continue
            rng = np.random.default_rng(value)
            rows, cols = int(np.prod(shape[:-1])), shape[-1]
            for start in range(0, rows, 8192):
                k = min(8192, rows - start)
                f.write((rng.standard_normal((k, cols)) * 0.05).astype("<f4").tobytes())


@pytest.fixture(scope="module")
def wide_checkpoint(hf_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hf_tiny with intermediate_size widened to WIDE: ~600 MB, its largest tensor ~29 MB."""
    dst = tmp_path_factory.mktemp("wide") / "ck"
    shutil.copytree(hf_tiny, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = WIDE
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    small = load_file(hf_tiny / "model.safetensors")
    hidden = small["model.decoder.norm.weight"].shape[0]
    tensors: dict[str, tuple[tuple[int, ...], object]] = {}
    for i, (name, value) in enumerate(small.items()):
        if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight", "self_conditioning.gate_proj.weight",
                          "self_conditioning.up_proj.weight")):
            tensors[name] = ((WIDE, hidden), i)
        elif name.endswith(("mlp.down_proj.weight", "self_conditioning.down_proj.weight")):
            tensors[name] = ((hidden, WIDE), i)
        else:
            tensors[name] = (value.shape, value)
    write_safetensors(dst / "model.safetensors", tensors)
    return dst


def limited(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs a Python script with RLIMIT_DATA = LIMIT (heap and anonymous mappings)."""

    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (LIMIT, LIMIT))

    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, preexec_fn=set_limit,
                          timeout=300)


@pytest.mark.slow
def test_conversion_fits_in_less_memory_than_the_checkpoint(wide_checkpoint: Path, tmp_path: Path) -> None:
    ckpt_bytes = (wide_checkpoint / "model.safetensors").stat().st_size
    assert ckpt_bytes > LIMIT + 128 * 1024 * 1024
    # The limit is real: holding the checkpoint's weights in memory fails under it.
    control = limited(f"import numpy as np; np.ones({ckpt_bytes // 4}, dtype=np.float32)")
    assert control.returncode != 0 and "MemoryError" in control.stderr

    out = tmp_path / "wide-f16.gguf"
    run = limited(
        "import sys\n"
        "from pydgemma.quantize import convert\n"
        "convert(sys.argv[1], sys.argv[2], out_type='f16')\n"
        # VmHWM: this process image's peak RSS (ru_maxrss would include the forking test process)
        "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')))\n",
        str(wide_checkpoint), str(out),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    peak_rss = int(run.stdout.strip().splitlines()[-1])
    largest = WIDE * 64 * 4
    assert peak_rss < 2 * largest + 2**30  # the bound
    assert peak_rss < ckpt_bytes / 2  # and well below the checkpoint itself

    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    with safe_open(wide_checkpoint / "model.safetensors", "np") as f:
        for gguf_name, hf in (("blk.3.ffn_up.weight", "model.decoder.layers.3.mlp.up_proj.weight"),
                              ("self_cond_down.weight", "model.decoder.self_conditioning.down_proj.weight")):
            expected = f.get_tensor(hf)
            got = np.asarray(tensors[gguf_name].data).reshape(expected.shape)
            np.testing.assert_array_equal(got, expected.astype(np.float16))


def start_cli(src: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pydgemma.quantize", "convert", str(src), "-o", str(out),
                             "--type", "f32", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_temp(folder: Path, proc: subprocess.Popen[str]) -> Path:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        temps = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
        if temps and temps[0].stat().st_size > 1 << 20:
            return temps[0]
        assert proc.poll() is None, "conversion ended before it could be interrupted"
        time.sleep(0.005)
    raise AssertionError("no temporary output appeared")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_conversion_leaves_nothing(wide_checkpoint: Path, tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "o.gguf"
    proc = start_cli(wide_checkpoint, out)
    wait_for_temp(tmp_path, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err == "interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_interrupted_conversion_keeps_the_previous_file(wide_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    out.write_bytes(b"the previous model")
    proc = start_cli(wide_checkpoint, out, "--force")
    wait_for_temp(tmp_path, proc)
    os.kill(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert out.read_bytes() == b"the previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["o.gguf"]


def _complete_model(path: Path) -> bool:
    import pydgemma

    try:
        pydgemma.Model(path).close()
    except pydgemma.PydgemmaError:
        return False
    return True


@pytest.mark.slow  # SIGINT and SIGTERM above are the fast lane's interrupted conversions
@pytest.mark.parametrize("delay", [0.05, 0.3, 0.8, 1.5])
def test_sigkill_leaves_the_previous_file_and_the_next_run_cleans_up(wide_checkpoint: Path, tmp_path: Path,
                                                                     delay: float) -> None:
    """SIGKILL gives no chance to clean up: the target must still be absent or the previous complete
    file, and the next run removes the dead writer's temporary file."""
    out = tmp_path / "o.gguf"
    out.write_bytes(b"the previous model")
    proc = start_cli(wide_checkpoint, out, "--force")
    time.sleep(delay)
    proc.kill()
    proc.communicate(timeout=60)
    # the previous file, or (killed between the atomic rename and the exit) the whole new one
    assert out.read_bytes() == b"the previous model" or proc.returncode == 0 or _complete_model(out)
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    done = subprocess.run([sys.executable, "-m", "pydgemma.quantize", "convert", str(wide_checkpoint), "-o", str(out),
                           "--type", "bf16", "--force", "-q"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["o.gguf"], leftovers
    assert out.read_bytes()[:4] == b"GGUF"
