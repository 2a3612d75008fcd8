"""The numbers of the drift report, as plain numpy functions (no model, no I/O).

Conventions, used everywhere in the report:

* KL(ref || model) of two rows of logits is computed on their softmax distributions in float64:
  ``sum_v p_v (log p_v - log q_v)``, with log-softmax taken after subtracting the row maximum. It is
  clamped at 0 (rounding can give -1e-17 for equal distributions; identical rows give exactly 0).
* Percentiles are numpy's default (linear interpolation between order statistics), so the median of
  ``[1, 2, 3, 4]`` is 2.5 and its p99 is ``3 + 0.97 * 1 = 3.97``.
* Jaccard of two accept sets is ``|A & B| / |A | B|``, and 1 when both are empty.
* Position buckets split the canvas into ``n`` contiguous ranges whose sizes differ by at most one
  (the first ones are the larger), e.g. 24 positions in 8 buckets: 0-2, 3-5, ..., 21-23.
"""

from __future__ import annotations

import numpy as np

# Rows per chunk in kl_rows: a 262144-token vocabulary in float64 is 2 MiB per row.
_CHUNK_ROWS = 16


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 of [..., vocab] logits."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_rows(ref_logits: np.ndarray, model_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(model)) of each row of two [rows, vocab] arrays: float64 [rows]."""
    ref = np.asarray(ref_logits).reshape(-1, np.shape(ref_logits)[-1])
    mod = np.asarray(model_logits).reshape(-1, np.shape(model_logits)[-1])
    if ref.shape != mod.shape:
        raise ValueError(f"logits shapes differ: {ref.shape} and {mod.shape}")
    out = np.empty(ref.shape[0], dtype=np.float64)
    for start in range(0, ref.shape[0], _CHUNK_ROWS):
        lp = log_softmax(ref[start:start + _CHUNK_ROWS])
        lq = log_softmax(mod[start:start + _CHUNK_ROWS])
        p = np.exp(lp)
        with np.errstate(invalid="ignore"):  # p == 0 where lq == -inf: 0 * inf, a zero term
            terms = np.where(p > 0, p * (lp - lq), 0.0)
        out[start:start + _CHUNK_ROWS] = terms.sum(axis=-1)
    return np.maximum(out, 0.0)


def summary(values: np.ndarray) -> dict[str, float]:
    """mean, median, p99 and max of a set of values (all 0 for an empty set), and its size n."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0, "max": 0.0, "n": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "p99": float(np.percentile(v, 99)),
            "max": float(v.max()), "n": int(v.size)}


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """The fraction of positions where two equal-shaped arrays hold the same value (1 when empty)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    return float((a == b).mean()) if a.size else 1.0


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A & B| / |A | B| of two boolean membership masks; 1 when both sets are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union


def position_buckets(canvas_len: int, n_buckets: int) -> list[tuple[int, int]]:
    """``n_buckets`` contiguous [start, end) ranges covering 0..canvas_len-1 (at most canvas_len)."""
    n = max(1, min(int(n_buckets), int(canvas_len)))
    base, extra = divmod(int(canvas_len), n)
    out, start = [], 0
    for i in range(n):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def pct_change(before: float, after: float) -> float:
    """100 * (after - before) / before; 0 when both are 0."""
    if before == 0:
        return 0.0 if after == 0 else float("inf")
    return 100.0 * (after - before) / before
