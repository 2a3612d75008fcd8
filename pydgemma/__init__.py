"""pydgemma: run DiffusionGemma GGUF models from Python, the command line or a C ABI.

    >>> import pydgemma
    >>> model = pydgemma.Model("diffusiongemma-26B-A4B-Q4_K_M.gguf")
    >>> model.hparams["n_layer"], model.device
"""

from __future__ import annotations

from ._version import __version__
from .context import CPU_KERNELS, Context, StepRows
from .devices import Device, devices
from .errors import ModelError, NativeLibraryError, PydgemmaError
from .model import HParams, LayerInfo, Model, TensorInfo


def native_version() -> str:
    """Version of the loaded native core (libdgemma)."""
    from ._native import native

    nat = native()
    return nat.string(nat.lib.dg_version())


def ggml_version() -> str:
    """Version of the ggml the native core runs on."""
    from ._native import native

    nat = native()
    return nat.string(nat.lib.dg_ggml_version())


__all__ = [
    "CPU_KERNELS",
    "Context",
    "Device",
    "HParams",
    "LayerInfo",
    "Model",
    "ModelError",
    "NativeLibraryError",
    "PydgemmaError",
    "StepRows",
    "TensorInfo",
    "__version__",
    "devices",
    "ggml_version",
    "native_version",
]
