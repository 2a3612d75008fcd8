"""The compute devices ggml offers in this process (CPU, and any GPU backend ggml was built with)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ._native import native

_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


@dataclass(frozen=True)
class Device:
    name: str  # e.g. "CPU", "CUDA0": what ``Model(device=...)`` accepts
    description: str
    backend: str
    type: str  # "cpu", "gpu", "igpu" or "accel"
    memory_free: int  # bytes
    memory_total: int  # bytes
    features: tuple[str, ...] = ()  # the backend's build features, e.g. ("AVX2", "LLAMAFILE", "REPACK")

    def to_dict(self) -> dict:
        return asdict(self)


def devices() -> list[Device]:
    """Every device of every registered ggml backend, in ggml's order."""
    nat = native()
    out = []
    for i in range(nat.lib.dg_device_count()):
        info = nat.ffi.new("dg_device_info *")
        nat.check(nat.lib.dg_device_get(i, info))
        out.append(
            Device(
                name=nat.string(info.name),
                description=nat.string(info.description),
                backend=nat.string(info.backend),
                type=_DEVICE_TYPES.get(int(info.type), "cpu"),
                memory_free=int(info.memory_free),
                memory_total=int(info.memory_total),
                features=tuple(nat.string(info.features).split()),
            )
        )
    return out
