"""ggml's quantizers through the native core: the public entry point the conversion tools
(pydgemma.quantize) use, so they never reach into the binding."""

from __future__ import annotations

import numpy as np

from ._native import native
from .errors import PydgemmaError


def row_size(ggml_type: int, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` values in `ggml_type`; 0 when that type cannot hold such a row."""
    return int(native().lib.dg_type_row_size(int(ggml_type), int(n_per_row)))


def quantize_rows(ggml_type: int, rows: np.ndarray, out: np.ndarray, *, importance: np.ndarray | None = None,
                  n_threads: int = 1) -> int:
    """Quantizes float32 `rows` [n, n_per_row] (C-contiguous) into `out` (uint8, n * row_size bytes)
    with ggml_quantize_chunk, `importance` [n_per_row] weighting every row; gives the bytes written.
    Raises PydgemmaError with the core's message (e.g. a type that needs an importance matrix)."""
    nat = native()
    n_rows, n_per_row = rows.shape
    written = nat.ffi.new("size_t *")
    im = nat.ffi.NULL if importance is None else nat.ffi.from_buffer("float[]", importance)
    nat.check(nat.lib.dg_quantize(int(ggml_type), nat.ffi.from_buffer("float[]", rows), nat.ffi.from_buffer(out),
                                  n_rows, n_per_row, im, int(n_threads), written), PydgemmaError)
    return int(written[0])
