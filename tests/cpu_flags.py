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


AVX512 = ("avx512f", "fma")
AVX512_VNNI = (*AVX512, "avx512vl", "avx512bw", "avx512_vnni")


def has_avx512() -> bool:
    """AVX-512F with FMA: the self-conditioning kernel."""
    return set(AVX512) <= flags()


def has_avx512_vnni() -> bool:
    """AVX-512 F, VL, BW and VNNI: the Q8_0 kernels."""
    return set(AVX512_VNNI) <= flags()


def lacking(needed: tuple[str, ...], kernel: str) -> str:
    """A skip reason: the flags a kernel needs, and those this CPU lacks (where the kernel cannot run,
    the stock ggml op runs in its place, and comparing the two would compare ggml with itself)."""
    missing = [f for f in needed if f not in flags()]
    where = "this CPU lacks " + ", ".join(missing) if flags() else "/proc/cpuinfo lists no x86 flags here"
    return f"the {kernel} kernel needs {', '.join(needed)}; {where} (ggml's stock op runs in its place)"


def has_avx2() -> bool:
    return {"avx2", "fma", "f16c"} <= flags()
