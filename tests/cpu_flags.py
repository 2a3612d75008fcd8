"""What this x86 CPU can do, as the core decides it (native/src/cpu_features.h): the kernels that
need a feature are tested only where it is present, and skip with a reason elsewhere."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=None)
def flags() -> frozenset[str]:
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return frozenset()
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_avx512() -> bool:
    """AVX-512F with FMA: the self-conditioning kernel."""
    return {"avx512f", "fma"} <= flags()


def has_avx512_vnni() -> bool:
    """AVX-512 F, VL, BW and VNNI: the Q8_0 kernels."""
    return has_avx512() and {"avx512vl", "avx512bw", "avx512_vnni"} <= flags()


def has_avx2() -> bool:
    return {"avx2", "fma", "f16c"} <= flags()
