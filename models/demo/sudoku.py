"""The demo's task, 4x4 Sudoku, in pure Python: puzzles, the prompt and answer formats, the exact
check. The runtime (``pydgemma run``/``demo``, the server's tests, the drift tool) imports this
module; the training recipe (``train.py``) builds on it."""

from __future__ import annotations

import itertools
import random

__all__ = [
    "BLANK",
    "CANVAS_LENGTH",
    "N_TEST",
    "SEP",
    "all_grids",
    "answer_text",
    "check_answer",
    "format_grid",
    "is_valid_grid",
    "make_puzzle",
    "parse_answer",
    "prompt_text",
    "solutions",
    "test_puzzles",
]

BLANK = "."
SEP = "/"
PROMPT_PREFIX = "Solve: "
CANVAS_LENGTH = 24  # 19 answer tokens + <turn|> = 20, rounded up
MIN_BLANKS, MAX_BLANKS = 4, 10
N_TEST = 200
TEST_SEED = 1234


# ---------------------------------------------------------------------------------------------
# Puzzles (pure Python)
# ---------------------------------------------------------------------------------------------

_BOXES = [[(r, c) for r in range(br, br + 2) for c in range(bc, bc + 2)] for br in (0, 2) for bc in (0, 2)]


def is_valid_grid(cells) -> bool:
    """True if ``cells`` (16 ints, row-major) is a solved 4x4 Sudoku."""
    if len(cells) != 16 or any(v not in (1, 2, 3, 4) for v in cells):
        return False
    full = {1, 2, 3, 4}
    for i in range(4):
        if set(cells[4 * i:4 * i + 4]) != full or set(cells[i::4]) != full:
            return False
    return all({cells[4 * r + c] for r, c in box} == full for box in _BOXES)


_GRIDS: list[tuple[int, ...]] | None = None


def all_grids() -> list[tuple[int, ...]]:
    """All 288 solved 4x4 Sudoku grids (16-tuples, row-major), in a fixed order."""
    global _GRIDS
    if _GRIDS is None:
        perms = list(itertools.permutations((1, 2, 3, 4)))
        _GRIDS = [g for rows in itertools.product(perms, repeat=4) for g in [sum(rows, ())] if is_valid_grid(g)]
        assert len(_GRIDS) == 288
    return _GRIDS


_GRID_ARRAY = None


def solutions(puzzle_cells) -> list[tuple[int, ...]]:
    """The grids consistent with ``puzzle_cells`` (16 ints, 0 = blank)."""
    global _GRID_ARRAY
    import numpy as np

    if _GRID_ARRAY is None:
        _GRID_ARRAY = np.array(all_grids(), dtype=np.int8)
    p = np.asarray(puzzle_cells, dtype=np.int8)
    ok = ((p == 0) | (_GRID_ARRAY == p)).all(axis=1)
    return [all_grids()[i] for i in np.flatnonzero(ok)]


def format_grid(cells) -> str:
    """16 ints (0 = blank) -> ``"1.3./.4.1/..../2..3"``."""
    chars = [BLANK if v == 0 else str(v) for v in cells]
    return SEP.join("".join(chars[4 * r:4 * r + 4]) for r in range(4))


def make_puzzle(rng: random.Random, min_blanks: int = MIN_BLANKS, max_blanks: int = MAX_BLANKS):
    """A random puzzle with a unique solution: (puzzle string, solution string)."""
    grids = all_grids()
    while True:
        grid = grids[rng.randrange(len(grids))]
        blanks = set(rng.sample(range(16), rng.randint(min_blanks, max_blanks)))
        cells = [0 if i in blanks else v for i, v in enumerate(grid)]
        if len(solutions(cells)) == 1:
            return format_grid(cells), format_grid(grid)


def test_puzzles(n: int = N_TEST, seed: int = TEST_SEED) -> list[tuple[str, str]]:
    """The fixed held-out puzzles (distinct; the first ``n`` of one seeded sequence)."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(out) < n:
        p, s = make_puzzle(rng)
        if p not in seen:
            seen.add(p)
            out.append((p, s))
    return out


def prompt_text(puzzle: str) -> str:
    """The user message for ``puzzle``."""
    return PROMPT_PREFIX + puzzle


def answer_text(solution: str) -> str:
    return solution


def parse_answer(text: str):
    """The 16 digits of an answer ``"1234/3412/2143/4321"`` (whitespace ignored), or None."""
    rows = "".join(text.split()).split(SEP)
    if len(rows) != 4 or any(len(r) != 4 or any(ch not in "1234" for ch in r) for r in rows):
        return None
    return [int(ch) for r in rows for ch in r]


def check_answer(puzzle: str, text: str) -> bool:
    """Exact solve: a valid grid that keeps every clue of ``puzzle``."""
    cells = parse_answer(text)
    if cells is None or not is_valid_grid(cells):
        return False
    clues = [ch for ch in puzzle if ch != SEP]
    return all(c == BLANK or int(c) == v for c, v in zip(clues, cells))
