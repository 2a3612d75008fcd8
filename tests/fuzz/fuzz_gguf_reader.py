"""atheris fuzzer for the quantizer's GGUF input path (gguf-py's reader + pydgemma.quantize): any
bytes as the input .gguf must plan and read, or raise ConversionError; never another exception.

    python tests/fuzz/fuzz_gguf_reader.py -max_total_time=60 WORK_DIR SEED_DIRS...
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from pydgemma.quantize.convert import ConversionError
    from pydgemma.quantize.quantize import _plan_from_gguf

PATH = os.path.join(tempfile.mkdtemp(prefix="dg-fuzz-gguf-"), "in.gguf")


def test_one(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        _, plan = _plan_from_gguf(PATH)
        for t in plan:
            if t.n_bytes <= 1 << 20:
                for _ in t.rows(1 << 16):
                    pass
    except ConversionError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
