"""atheris fuzzer for the converter's safetensors reader (pydgemma.quantize.checkpoint): any bytes as
model.safetensors must give a Checkpoint whose tensors read back, or CheckpointError; never another
exception, a hang or unbounded memory.

    python tests/fuzz/fuzz_safetensors.py -max_total_time=60 [corpus dirs...]
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from pydgemma.quantize.checkpoint import Checkpoint, CheckpointError, iter_rows

FOLDER = tempfile.mkdtemp(prefix="dg-fuzz-st-")
PATH = os.path.join(FOLDER, "model.safetensors")


def test_one(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        ckpt = Checkpoint(FOLDER)
    except CheckpointError:
        return
    for entry in ckpt.tensors.values():
        if entry.n_bytes > 64 * 1024 * 1024:
            continue  # valid but large: reading it is not the point here
        for _ in iter_rows(entry, chunk_bytes=1 << 16):
            pass


def main() -> None:
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
