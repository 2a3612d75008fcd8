"""A DiffusionGemma GGUF model: opened, memory-mapped and validated by the native core."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from ._native import native
from .chat import ChatSession, render
from .context import Context, plan_memory
from .errors import ModelError
from .generate import generate_in_context
from .hub import resolve_model

# dg_hparams fields, in the order of the C struct.
HPARAM_FIELDS = (
    "n_vocab",
    "n_ctx_train",
    "n_embd",
    "n_layer",
    "n_head",
    "n_ff",
    "n_ff_exp",
    "n_expert",
    "n_expert_used",
    "head_dim",
    "head_dim_swa",
    "n_rot",
    "n_rot_swa",
    "sliding_window",
    "canvas_length",
    "rope_freq_base",
    "rope_freq_base_swa",
    "rms_norm_eps",
    "final_logit_softcap",
    "has_self_conditioning",
    "has_output_weight",
)


class HParams(Mapping[str, Any]):
    """Read-only hyper-parameters; both ``hp["n_embd"]`` and ``hp.n_embd`` work."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = dict(values)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"HParams({self._values!r})"


@dataclass(frozen=True)
class LayerInfo:
    index: int
    is_sliding: bool
    n_head_kv: int
    head_dim: int
    has_v_proj: bool


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # ggml type name, e.g. "q4_K"
    type_id: int  # ggml_type value
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row length
    n_bytes: int
    offset: int  # absolute byte offset of the data in the file

    def to_dict(self) -> dict:
        return asdict(self)


class Model:
    """A validated DiffusionGemma GGUF file.

    ``Model(path)`` maps the file and checks every key and tensor the runtime needs; any problem
    raises :class:`ModelError` with the core's one-line message. ``device`` is ``"auto"`` (first
    GPU, else CPU), ``"cpu"``, or a device name from :func:`pydgemma.devices`. ``repack`` (CPU
    only) lets ggml re-lay out the quantized matmul weights it has tiled kernels for (Q4_0, Q4_K,
    IQ4_NL, ... on x86): faster, at the price of copying those weights out of the file mapping.

    ``path`` may also name a model on the Hugging Face Hub, ``"org/repo[:QUANT][@revision]"``
    (e.g. ``"unsloth/diffusiongemma-26B-A4B-it-GGUF:Q4_K_M"``): it is downloaded into the Hugging
    Face cache, or read from there when ``offline`` (default: ``$HF_HUB_OFFLINE``). See
    :mod:`pydgemma.hub`. A split GGUF is opened by its first part.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_threads: int | None = None,
        device: str = "auto",
        use_mmap: bool = True,
        repack: bool = True,
        offline: bool | None = None,
    ) -> None:
        self._handle = None
        self.path = resolve_model(path, offline=offline)
        if n_threads is not None and n_threads < 1:
            raise ModelError(f"n_threads must be at least 1, got {n_threads}", "DG_ERR_INVALID_ARG")
        nat = native()
        ffi, lib = nat.ffi, nat.lib
        params = ffi.new("dg_model_params *", lib.dg_model_default_params())
        device_c = ffi.new("char[]", device.encode("utf-8"))
        params.device = device_c
        params.n_threads = n_threads or 0
        params.use_mmap = use_mmap
        params.repack = repack
        out = ffi.new("dg_model **")
        nat.check(lib.dg_model_load(os.fsencode(self.path), params, out), ModelError)
        self._handle = ffi.gc(out[0], lib.dg_model_free)
        self._load_description()

    def _load_description(self) -> None:
        nat = native()
        ffi, lib, h = nat.ffi, nat.lib, self._handle

        hp = ffi.new("dg_hparams *")
        self._check(lib.dg_model_hparams(h, hp))
        self.hparams = HParams({name: getattr(hp, name) for name in HPARAM_FIELDS})

        layers = []
        info = ffi.new("dg_layer_info *")
        for il in range(self.hparams["n_layer"]):
            self._check(lib.dg_model_layer(h, il, info))
            layers.append(LayerInfo(il, bool(info.is_sliding), int(info.n_head_kv), int(info.head_dim), bool(info.has_v_proj)))
        self.layers: tuple[LayerInfo, ...] = tuple(layers)

        tensors: dict[str, TensorInfo] = {}
        ti = ffi.new("dg_tensor_info *")
        for i in range(lib.dg_model_n_tensors(h)):
            self._check(lib.dg_model_tensor(h, i, ti))
            n_dims = max(int(ti.n_dims), 1)
            name = nat.string(ti.name)
            tensors[name] = TensorInfo(
                name=name,
                type=nat.string(ti.type_name),
                type_id=int(ti.type),
                shape=tuple(int(ti.ne[d]) for d in range(n_dims)),
                n_bytes=int(ti.n_bytes),
                offset=int(ti.file_offset),
            )
        self.tensors: Mapping[str, TensorInfo] = tensors

        self.metadata: Mapping[str, str] = {
            nat.string(lib.dg_model_meta_key(h, i)): nat.string(lib.dg_model_meta_value(h, i))
            for i in range(lib.dg_model_n_meta(h))
        }
        self.device: str = nat.string(lib.dg_model_device(h))
        self.n_threads: int = int(lib.dg_model_n_threads(h))
        self.file_size: int = int(lib.dg_model_file_size(h))

    def _check(self, status: int) -> None:
        native().check(status, ModelError)

    def context(self, n_ctx: int | None = None, *, n_batch: int = 512, n_threads: int | None = None, sc_top_k: int = 0,
                cpu_kernels=None, kv_type: str = "f16", flash_attn: str = "auto", sc_table: str = "auto"):
        """A generation context: a KV cache for ``n_ctx`` tokens (default min(4096, context length)).

        ``sc_top_k`` > 0 switches self-conditioning to an APPROXIMATE mode that mixes only each canvas
        row's k most likely tokens (renormalised) instead of the whole vocabulary: faster and without
        the transposed-embedding copy, but the output changes (README, "Performance", has its drift).

        ``cpu_kernels``: which of our CPU kernels the graphs may use (:data:`pydgemma.CPU_KERNELS`):
        None (default: all, less those ``DGEMMA_NO_CPU_KERNELS`` names), "all", "none", or an
        iterable of names; ``ctx.kernels`` says which are in use.

        ``kv_type``: the KV cache's entries, "f16" (default), "f32" (the transformers-exact one) or
        "q8_0" (about half of F16; needs flash attention). ``flash_attn``: "auto" (flash attention
        wherever the device runs it, the CPU included, but not on Vulkan; else matmuls), "on" or
        "off" (matmuls: V stored transposed; not with a Q8_0 cache). ``sc_table``: the self-conditioning table's type, "auto" (F32 for an
        F32 embedding, else Q8_0), "f32", "f16" or "q8_0"; one table per type is shared by the
        model's contexts. The context is refused up front (with :meth:`plan_memory`'s breakdown)
        when it does not fit on the device."""
        if self._handle is None:
            raise ModelError("the model is closed", "DG_ERR_INVALID_ARG")
        return Context(self, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, sc_top_k=sc_top_k, cpu_kernels=cpu_kernels,
                       kv_type=kv_type, flash_attn=flash_attn, sc_table=sc_table)

    def plan_memory(self, n_ctx: int | None = None, **settings) -> dict:
        """What :meth:`context` with these settings would take on the device, before allocating it:
        bytes of weights (copied / mapped), KV cache, self-conditioning table and state, compute
        (an estimate), total, the device's free and total memory, and whether it fits."""
        if self._handle is None:
            raise ModelError("the model is closed", "DG_ERR_INVALID_ARG")
        return plan_memory(self, n_ctx=n_ctx, **settings)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text` with the model's own tokenizer; `add_special` prepends BOS."""
        nat = native()
        data = text.encode("utf-8")
        n = nat.ffi.new("size_t *")
        capacity = len(data) + 2
        while True:
            buf = nat.ffi.new("int32_t[]", capacity)
            self._check(nat.lib.dg_tokenize(self._handle, data, len(data), add_special, parse_special, buf, capacity, n))
            if n[0] <= capacity:
                return list(buf[0 : n[0]])
            capacity = n[0]

    def detokenize(self, ids, render_special: bool = False) -> str:
        """The text of token `ids`; control tokens are dropped unless `render_special`."""
        nat = native()
        arr = [int(i) for i in ids]
        id_buf = nat.ffi.new("int32_t[]", arr)
        n = nat.ffi.new("size_t *")
        capacity = 16 * len(arr) + 16
        while True:
            buf = nat.ffi.new("char[]", capacity)
            self._check(nat.lib.dg_detokenize(self._handle, id_buf, len(arr), render_special, buf, capacity, n))
            if n[0] <= capacity:
                return nat.ffi.unpack(buf, n[0]).decode("utf-8", errors="replace")
            capacity = n[0]

    @property
    def chat_template(self) -> str | None:

        nat = native()
        value = nat.lib.dg_model_meta_get(self._handle, b"tokenizer.chat_template")
        return nat.string(value) if value != nat.ffi.NULL else None

    @property
    def eog_ids(self) -> list[int]:
        """End-of-generation token ids (<eos>, <turn|>, <|tool_response>, tokenizer.ggml.eos_token_id)."""
        nat = native()
        p = nat.lib.dg_generate_default_params(self._handle)
        return [int(p.eos_ids[i]) for i in range(p.n_eos)]

    def token_text(self, token_id: int) -> str:
        return self.detokenize([token_id], render_special=True)

    def chat_prompt_ids(self, messages, *, think: bool = False, tools=None, generation_prefix: str = "") -> list[int]:
        """Token ids of `messages` rendered with the model's chat template and a generation prompt,
        with exactly one BOS. `tools`: OpenAI function tools, declared by the template;
        `generation_prefix`: text the reply is made to start with (e.g. a forced tool call)."""
        template = self.chat_template
        if template is None:
            raise ModelError("this model has no chat template (tokenizer.chat_template)", "DG_ERR_UNSUPPORTED")
        special = {}
        for name, key in (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id"),
                          ("pad_token", "tokenizer.ggml.padding_token_id")):
            if key in self.metadata:
                special[name] = self.token_text(int(self.metadata[key]))
        text = render(template, messages, add_generation_prompt=True, enable_thinking=think, special=special,
                      tools=tools) + generation_prefix
        bos = special.get("bos_token")
        return self.tokenize(text, add_special=not (bos and text.startswith(bos)))

    def generate(self, prompt_or_messages, *, max_new_tokens: int = 256, think: bool = False, n_ctx: int | None = None,
                 sc_top_k: int = 0, kv_type: str = "f16", **options):
        """Generates a reply. A string is one user turn (rendered with the chat template when the
        model has one); a list is chat messages ({"role", "content"}). Options: max_steps, t_min,
        t_max, entropy_bound, seed, on_step(StepEvent) -> False to stop, on_canvas(index, text).
        ``sc_top_k`` > 0: approximate self-conditioning; ``kv_type``: the KV cache (see :meth:`context`)."""
        if isinstance(prompt_or_messages, str):
            if self.chat_template is not None:
                ids = self.chat_prompt_ids([{"role": "user", "content": prompt_or_messages}], think=think)
            else:
                ids = self.tokenize(prompt_or_messages)
        else:
            ids = self.chat_prompt_ids(list(prompt_or_messages), think=think)
        canvas = self.hparams["canvas_length"]
        needed = len(ids) + -(-max_new_tokens // canvas) * canvas
        ctx = self.context(n_ctx=n_ctx or min(self.hparams["n_ctx_train"], max(needed, 1)), sc_top_k=sc_top_k,
                           kv_type=kv_type)
        return generate_in_context(self, ctx, ids, max_new_tokens=max_new_tokens, **options)

    def chat(self, *, system: str | None = None, think: bool = False, n_ctx: int | None = None, **options):
        """A multi-turn session (see pydgemma.chat.ChatSession)."""
        return ChatSession(self, system=system, think=think, n_ctx=n_ctx, **options)

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

    @property
    def name(self) -> str:
        return self.metadata.get("general.name", os.path.basename(self.path))

    def close(self) -> None:
        """Unmaps the file now instead of at garbage collection. The model is unusable afterwards."""
        if self._handle is not None:
            native().ffi.release(self._handle)
            self._handle = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        hp = getattr(self, "hparams", None)
        size = f"{hp['n_layer']} layers, {hp['n_expert']} experts, vocab {hp['n_vocab']}" if hp else "closed"
        return f"<pydgemma.Model {self.path!r} ({size}) on {getattr(self, 'device', '?')}>"

