"""A generation context over a model: the KV cache of the prefix and the three forward operations
of DiffusionGemma (prefill the prompt, denoise a canvas, commit a finished canvas)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from ._native import native
from .errors import PydgemmaError

if TYPE_CHECKING:
    from .model import Model


# Our CPU kernels by name, in DG_CPU_KERNEL_* order (dgemma.h): each replaces stock ggml ops on the CPU.
CPU_KERNELS = ("q8_0_matmul", "self_cond_mix", "activations", "sampler")
# KV cache entry types, in dg_kv_type order (dgemma.h); the first is the default.
KV_TYPES = ("f16", "f32", "q8_0")
FLASH_ATTN = ("auto", "on", "off")


SC_TABLES = ("auto", "f32", "f16", "q8_0")


def _fill_memory_params(params, kv_type: str, flash_attn: str, sc_table: str) -> None:
    params.kv_type = _choice(kv_type, KV_TYPES, "kv_type")
    params.flash_attn = _choice(flash_attn, FLASH_ATTN, "flash_attn")
    params.sc_table = _choice(sc_table, SC_TABLES, "sc_table")


def plan_memory(model: Model, *, n_ctx: int | None = None, n_batch: int = 512, sc_top_k: int = 0, kv_type: str = "f16",
                flash_attn: str = "auto", sc_table: str = "auto", cpu_kernels: str | Iterable[str] | None = None) -> dict:
    """What a context with these settings would take on the model's device (dg_plan_memory), in bytes."""
    nat = native()
    ffi, lib = nat.ffi, nat.lib
    params = ffi.new("dg_context_params *", lib.dg_context_default_params())
    params.n_ctx = n_ctx or 0
    params.n_batch = n_batch
    params.sc_top_k = sc_top_k
    params.cpu_kernels = _kernel_mask(cpu_kernels)
    _fill_memory_params(params, kv_type, flash_attn, sc_table)
    out = ffi.new("dg_memory_plan *")
    Context._check(lib.dg_plan_memory(model._handle, params, out))
    keys = ("weights_copied", "weights_mapped", "kv", "self_cond_table", "self_cond_state", "compute", "total",
            "device_free", "device_total", "n_ctx")
    plan = {k: int(getattr(out, k)) for k in keys}
    plan.update(fits=bool(out.fits), flash_attn=bool(out.flash_attn), kv_type=KV_TYPES[params.kv_type],
                device=model.device)
    return plan


def _choice(value: str, names: tuple[str, ...], what: str) -> int:
    key = str(value).lower()
    if key not in names:
        raise PydgemmaError(f"{what} must be one of {', '.join(names)}, got {value!r}", "DG_ERR_INVALID_ARG")
    return names.index(key)


def _kernel_mask(cpu_kernels: str | Iterable[str] | None) -> int:
    lib = native().lib
    if cpu_kernels is None:
        return int(lib.DG_CPU_KERNELS_DEFAULT)
    if isinstance(cpu_kernels, str):
        if cpu_kernels in ("all", "none"):
            return int(lib.DG_CPU_KERNELS_ALL) if cpu_kernels == "all" else 0
        cpu_kernels = [cpu_kernels]
    mask = 0
    for name in cpu_kernels:
        if name not in CPU_KERNELS:
            raise PydgemmaError(f"unknown CPU kernel '{name}' (known: {', '.join(CPU_KERNELS)})", "DG_ERR_INVALID_ARG")
        mask |= 1 << CPU_KERNELS.index(name)
    return mask


@dataclass
class StepRows:
    """What one device step gives per position: the sampler's reductions over softmax(logits / t)."""

    argmax: np.ndarray  # int32 [canvas]
    draws: np.ndarray  # int32 [canvas]
    entropy: np.ndarray  # float32 [canvas]


def _ids(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64).reshape(-1))
    if arr.size and (arr.min() < -(2**31) or arr.max() >= 2**31):
        raise PydgemmaError("token ids must fit in 32 bits", "DG_ERR_INVALID_ARG")
    return arr.astype(np.int32)


class Context:
    """Created by :meth:`Model.context`. Not thread-safe; use one context per thread."""

    def __init__(self, model: Model, *, n_ctx: int | None = None, n_batch: int = 512, n_threads: int | None = None,
                 sc_top_k: int = 0, cpu_kernels: str | Iterable[str] | None = None, kv_type: str = "f16",
                 flash_attn: str = "auto", sc_table: str = "auto") -> None:
        nat = native()
        ffi, lib = nat.ffi, nat.lib
        self.model = model  # keeps the model alive as long as the context
        params = ffi.new("dg_context_params *", lib.dg_context_default_params())
        params.n_ctx = n_ctx or 0
        params.n_batch = n_batch
        params.n_threads = n_threads or 0
        if sc_top_k < 0:
            raise PydgemmaError(f"sc_top_k must be 0 (exact) or positive, got {sc_top_k}", "DG_ERR_INVALID_ARG")
        params.sc_top_k = sc_top_k
        params.cpu_kernels = _kernel_mask(cpu_kernels)
        _fill_memory_params(params, kv_type, flash_attn, sc_table)
        self.kv_type = KV_TYPES[params.kv_type]
        out = ffi.new("dg_context **")
        self._check(lib.dg_context_new(model._handle, params, out))
        self._handle = ffi.gc(out[0], lib.dg_context_free)
        self.n_vocab: int = model.hparams["n_vocab"]

    @staticmethod
    def _check(status: int) -> None:
        native().check(status)

    def prefill(self, token_ids: Sequence[int] | np.ndarray) -> None:
        """Runs the prompt through the causal encoder and appends its keys/values to the cache."""
        nat = native()
        ids = _ids(token_ids)
        self._check(nat.lib.dg_prefill(self._handle, nat.ffi.from_buffer("int32_t[]", ids), ids.size))

    def denoise(self, canvas_ids: Sequence[int] | np.ndarray, sc_logits: np.ndarray | None = None) -> np.ndarray:
        """One decoder pass of the canvas over the cached prefix: float32 logits [len(canvas), n_vocab].

        ``sc_logits`` is the previous denoising step's processed logits (as transformers passes
        ``self_conditioning_logits``), shape [len(canvas), n_vocab]; None on the first step."""
        nat = native()
        ids = _ids(canvas_ids)
        out = np.empty((ids.size, self.n_vocab), dtype=np.float32)
        sc = nat.ffi.NULL
        if sc_logits is not None:
            sc_arr = np.ascontiguousarray(sc_logits, dtype=np.float32)
            if sc_arr.shape != out.shape:
                raise PydgemmaError(f"sc_logits must have shape {out.shape}, got {sc_arr.shape}", "DG_ERR_INVALID_ARG")
            sc = nat.ffi.from_buffer("float[]", sc_arr)
        self._check(nat.lib.dg_denoise(self._handle, nat.ffi.from_buffer("int32_t[]", ids), ids.size, sc,
                                       nat.ffi.from_buffer("float[]", out)))
        return out

    def step(self, canvas_ids: Sequence[int] | np.ndarray, temperature: float, uniforms: np.ndarray,
             self_cond: bool = False) -> StepRows:
        """One denoising step on the model's device (what generation runs): the decoder pass, the
        processed logits logits / temperature, and per position their entropy, argmax and the
        categorical draw for ``uniforms[i]`` in (0, 1). The processed logits stay on the device;
        ``self_cond=True`` feeds the previous step's back (as ``denoise(canvas, sc_logits)`` does)."""
        nat = native()
        ids = _ids(canvas_ids)
        u = np.ascontiguousarray(uniforms, dtype=np.float32)
        if u.shape != ids.shape:
            raise PydgemmaError(f"uniforms must have shape {ids.shape}, got {u.shape}", "DG_ERR_INVALID_ARG")
        rows = StepRows(np.empty(ids.size, np.int32), np.empty(ids.size, np.int32), np.empty(ids.size, np.float32))
        fb = nat.ffi.from_buffer
        self._check(nat.lib.dg_context_step(self._handle, fb("int32_t[]", ids), ids.size, float(temperature),
                                            fb("float[]", u), bool(self_cond), fb("int32_t[]", rows.argmax),
                                            fb("int32_t[]", rows.draws), fb("float[]", rows.entropy)))
        return rows

    def reduce_logits(self, logits: np.ndarray, temperature: float, uniforms: np.ndarray) -> StepRows:
        """The sampler's half of :meth:`step` over given raw logits [rows, n_vocab], on the model's
        device: argmax, draw and entropy of softmax(logits / temperature) per row."""
        nat = native()
        lg = np.ascontiguousarray(logits, dtype=np.float32)
        if lg.ndim != 2 or lg.shape[1] != self.n_vocab:
            raise PydgemmaError(f"logits must have shape [rows, {self.n_vocab}], got {lg.shape}", "DG_ERR_INVALID_ARG")
        u = np.ascontiguousarray(uniforms, dtype=np.float32)
        if u.shape != (lg.shape[0],):
            raise PydgemmaError(f"uniforms must have shape ({lg.shape[0]},), got {u.shape}", "DG_ERR_INVALID_ARG")
        n = lg.shape[0]
        rows = StepRows(np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.float32))
        fb = nat.ffi.from_buffer
        self._check(nat.lib.dg_context_reduce_logits(self._handle, fb("float[]", lg), n, float(temperature), fb("float[]", u),
                                                     fb("int32_t[]", rows.argmax), fb("int32_t[]", rows.draws),
                                                     fb("float[]", rows.entropy)))
        return rows

    @property
    def kernels(self) -> list[str]:
        """The CPU kernels this context's graphs use ([] off the CPU, or when all are off)."""
        return native().string(native().lib.dg_context_kernels(self._handle)).split()

    @property
    def info(self) -> dict:
        """The KV cache's type, slots and bytes, the attention path, the compute buffers' bytes, the
        self-conditioning state's bytes and the number of graphs built (dg_context_info)."""
        nat = native()
        out = nat.ffi.new("dg_context_info *")
        self._check(nat.lib.dg_context_get_info(self._handle, out))
        return {"kv_type": KV_TYPES[out.kv_type], "flash_attn": bool(out.flash_attn), "kv_slots_full": out.kv_slots_full,
                "kv_slots_swa": out.kv_slots_swa, "kv_bytes": out.kv_bytes, "compute_bytes": out.compute_bytes,
                "self_cond_bytes": out.self_cond_bytes, "sc_table_bytes": out.sc_table_bytes,
                "graphs_built": out.graphs_built}

    @property
    def step_stats(self) -> dict[str, float]:
        """What the device steps have moved and spent: steps, bytes_to_device, bytes_from_device, seconds."""
        nat = native()
        out = nat.ffi.new("dg_step_stats *")
        self._check(nat.lib.dg_context_step_stats(self._handle, out))
        return {"steps": int(out.n_steps), "bytes_to_device": int(out.bytes_to_device),
                "bytes_from_device": int(out.bytes_from_device), "seconds": float(out.seconds)}

    def commit(self, canvas_ids: Sequence[int] | np.ndarray) -> None:
        """Appends a finished canvas to the cache through the encoder, before the next canvas."""
        nat = native()
        ids = _ids(canvas_ids)
        self._check(nat.lib.dg_commit(self._handle, nat.ffi.from_buffer("int32_t[]", ids), ids.size))

    def reset(self) -> None:
        """Empties the cache."""
        self._check(native().lib.dg_context_reset(self._handle))

    def truncate(self, n_past: int) -> None:
        """Keeps only the first `n_past` cached tokens."""
        self._check(native().lib.dg_context_truncate(self._handle, n_past))

    def imatrix_start(self) -> None:
        """Starts (or resumes) collecting the importance matrix over every later pass."""
        self._check(native().lib.dg_context_imatrix_start(self._handle))

    def imatrix_stop(self) -> None:
        self._check(native().lib.dg_context_imatrix_stop(self._handle))

    def imatrix_clear(self) -> None:
        self._check(native().lib.dg_context_imatrix_clear(self._handle))

    def imatrix(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """What was collected: weight name -> (in_sum2 float64 [n_mat, ne0], counts int64 [n_mat]),
        in the order the weights were first used (copies)."""
        nat = native()
        ffi, lib = nat.ffi, nat.lib
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        entry = ffi.new("dg_imatrix_entry *")
        for i in range(int(lib.dg_context_imatrix_n_entries(self._handle))):
            self._check(lib.dg_context_imatrix_entry(self._handle, i, entry))
            n_mat, ne0 = int(entry.n_mat), int(entry.ne0)
            sums = np.frombuffer(ffi.buffer(entry.in_sum2, 8 * n_mat * ne0), np.float64).reshape(n_mat, ne0).copy()
            counts = np.frombuffer(ffi.buffer(entry.counts, 8 * n_mat), np.int64).copy()
            out[nat.string(entry.name)] = (sums, counts)
        return out

    @property
    def n_past(self) -> int:
        """Tokens in the cache (prompt and committed canvases)."""
        return int(native().lib.dg_context_n_past(self._handle))

    @property
    def n_ctx(self) -> int:
        return int(native().lib.dg_context_n_ctx(self._handle))

    def close(self) -> None:
        if getattr(self, "_handle", None) is not None:
            native().ffi.release(self._handle)
            self._handle = None

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
