"""Hyper-parameters of a Hugging Face DiffusionGemma checkpoint, from config.json (and
generation_config.json), in every form the configs are found in, cross-checked against the tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .checkpoint import Checkpoint, CheckpointError

DEFAULT_GLOBAL_HEAD_DIM = 512  # DiffusionGemmaTextConfig's default for full-attention layers
DEFAULT_SOFTCAP = 30.0  # class attribute, not written by save_pretrained
DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


class ConfigError(CheckpointError):
    """config.json is missing something the model needs, or contradicts the tensors."""


@dataclass
class ArchParams:
    vocab_size: int
    hidden_size: int
    n_layer: int
    n_head: int
    intermediate_size: int
    moe_intermediate_size: int
    n_expert: int
    n_expert_used: int
    head_dim_swa: int
    head_dim_full: int
    n_kv_per_layer: list[int]
    sliding: list[bool]  # per layer: True = sliding-window attention
    sliding_window: int
    context_length: int
    rms_eps: float
    softcap: float
    rope_theta_full: float
    rope_theta_swa: float
    partial_rotary_factor: float
    canvas_length: int
    name: str = ""
    generation: dict[str, Any] = field(default_factory=dict)  # diffusion.* keys and values

    @property
    def rotated_pairs(self) -> int:
        return int(self.head_dim_full * self.partial_rotary_factor / 2)


def _need(cfg: dict, key: str, where: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{where} lacks '{key}'")
    return cfg[key]


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config.json: '{key}' must be a positive integer, got {value!r}")
    return value


def read_arch(ckpt: Checkpoint) -> ArchParams:
    return arch_from_config(ckpt.json("config.json"), ckpt.json("generation_config.json", required=False) or {})


def arch_from_config(root: dict, gen: dict | None = None) -> ArchParams:
    """The hyper-parameters of a config.json (and generation_config.json) given as dicts."""
    model_type = root.get("model_type")
    if model_type not in ("diffusion_gemma", "diffusion_gemma_text", None):
        raise ConfigError(f"config.json describes a '{model_type}' model, not DiffusionGemma ('diffusion_gemma')")
    text = root.get("text_config") or root
    where = "config.json text_config" if "text_config" in root else "config.json"

    def get_int(key: str, default: int | None = None) -> int:
        value = text.get(key, default)
        if value is None:
            raise ConfigError(f"{where} lacks '{key}'")
        return _positive_int(value, key)

    n_layer = get_int("num_hidden_layers")
    layer_types = text.get("layer_types") or [
        "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layer)
    ]
    if len(layer_types) != n_layer:
        raise ConfigError(f"{where}: layer_types has {len(layer_types)} entries but num_hidden_layers is {n_layer}")
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ConfigError(f"{where}: unknown layer type '{unknown[0]}'")
    sliding = [t == "sliding_attention" for t in layer_types]

    n_head = get_int("num_attention_heads")
    head_dim_swa = get_int("head_dim")
    n_kv_swa = get_int("num_key_value_heads")

    # Full-attention layers: per_layer_config (what save_pretrained writes), or the explicit
    # global_* keys (hub configs), or the class defaults.
    per_layer = text.get("per_layer_config") or {}
    full_dims, full_kv = set(), set()
    for il, is_sliding in enumerate(sliding):
        if is_sliding:
            continue
        override = per_layer.get(str(il), per_layer.get(il, {})) or {}
        full_dims.add(override.get("head_dim", text.get("global_head_dim", DEFAULT_GLOBAL_HEAD_DIM)))
        full_kv.add(override.get("num_key_value_heads", text.get("num_global_key_value_heads", n_kv_swa)))
    if len(full_dims) > 1 or len(full_kv) > 1:
        raise ConfigError(f"{where}: full-attention layers disagree on head_dim {sorted(full_dims)} or kv heads {sorted(full_kv)}")
    head_dim_full = _positive_int(next(iter(full_dims), text.get("global_head_dim", DEFAULT_GLOBAL_HEAD_DIM)), "global_head_dim")
    n_kv_full = _positive_int(next(iter(full_kv), n_kv_swa), "num_global_key_value_heads")

    rope = text.get("rope_parameters") or DEFAULT_ROPE
    rope_full = rope.get("full_attention", DEFAULT_ROPE["full_attention"])
    rope_swa = rope.get("sliding_attention", DEFAULT_ROPE["sliding_attention"])

    softcap = text.get("final_logit_softcapping", DEFAULT_SOFTCAP)
    if softcap is None:
        softcap = 0.0

    gen = gen or {}
    generation: dict[str, Any] = {}
    sampler = gen.get("sampler_config") or {}
    for gguf_key, value, kind in (
        ("diffusion.eb_max_steps", gen.get("max_denoising_steps"), int),
        ("diffusion.eb_t_min", gen.get("t_min"), float),
        ("diffusion.eb_t_max", gen.get("t_max"), float),
        ("diffusion.eb_entropy_bound", sampler.get("entropy_bound") if isinstance(sampler, dict) else None, float),
        ("diffusion.eb_stability_threshold", gen.get("stability_threshold"), int),
        ("diffusion.eb_confidence_threshold", gen.get("confidence_threshold"), float),
    ):
        if value is not None:
            generation[gguf_key] = kind(value)

    return ArchParams(
        vocab_size=get_int("vocab_size"),
        hidden_size=get_int("hidden_size"),
        n_layer=n_layer,
        n_head=n_head,
        intermediate_size=get_int("intermediate_size"),
        moe_intermediate_size=get_int("moe_intermediate_size"),
        n_expert=get_int("num_experts"),
        n_expert_used=get_int("top_k_experts"),
        head_dim_swa=head_dim_swa,
        head_dim_full=head_dim_full,
        n_kv_per_layer=[n_kv_swa if s else n_kv_full for s in sliding],
        sliding=sliding,
        sliding_window=get_int("sliding_window"),
        context_length=get_int("max_position_embeddings"),
        rms_eps=float(text.get("rms_norm_eps", 1e-6)),
        softcap=float(softcap),
        rope_theta_full=float(rope_full.get("rope_theta", 1_000_000.0)),
        rope_theta_swa=float(rope_swa.get("rope_theta", 10_000.0)),
        partial_rotary_factor=float(rope_full.get("partial_rotary_factor", 1.0)),
        canvas_length=_positive_int(root.get("canvas_length", 256), "canvas_length"),
        name=str(root.get("_name_or_path") or ""),
        generation=generation,
    )
