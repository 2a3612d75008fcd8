"""Known DiffusionGemma shapes, by name: the real checkpoint's hyper-parameters and the small ones the
tests and benchmarks build.

    from pydgemma.models import registry
    registry.names()                                  # ['diffusiongemma-26B-A4B', 'mid', 'tiny']
    p = registry.get("diffusiongemma-26B-A4B")
    p.arch()                                          # quantize.hf_config.ArchParams, as from config.json
    p.replace(num_hidden_layers=6, vocab_size=4096)   # a scaled-down variant (for tests)

Fields use Hugging Face config.json names (spec section 0; TinySpec uses the same), so one preset is
at once a config.json (``config()``), the ``ArchParams`` the converter writes from (``arch()``, through
``hf_config.arch_from_config``: the one place that reads configs) and a ``TinySpec`` (``tiny_spec()``)
for building a random Hugging Face checkpoint of that shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pydgemma.quantize.hf_config import ArchParams, arch_from_config

from .tiny_checkpoint import GENERATION_DEFAULTS, TinySpec

__all__ = ["Preset", "get", "names", "PRESETS"]


@dataclass(frozen=True)
class Preset:
    """One checkpoint's shape. ``layer_types=None`` means 5 sliding then 1 full, repeated."""

    name: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # sliding layers
    num_global_key_value_heads: int  # full layers (no v_proj there: V is the raw K projection)
    head_dim: int  # sliding layers
    global_head_dim: int  # full layers
    intermediate_size: int  # the dense MLP and self-conditioning's
    moe_intermediate_size: int  # per expert
    num_experts: int
    top_k_experts: int
    sliding_window: int
    max_position_embeddings: int
    canvas_length: int
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float = 30.0
    rope_theta: float = 1_000_000.0  # full layers ("proportional" RoPE)
    partial_rotary_factor: float = 0.25  # full layers
    rope_theta_sliding: float = 10_000.0  # sliding layers ("default" RoPE)
    layer_types: tuple[str, ...] | None = None
    description: str = ""

    def resolved_layer_types(self) -> tuple[str, ...]:
        if self.layer_types is not None:
            return tuple(self.layer_types)
        return tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                     for i in range(self.num_hidden_layers))

    def config(self) -> dict[str, Any]:
        """This shape as a DiffusionGemma config.json (hub style: global_* keys, no per_layer_config)."""
        text = {
            "model_type": "diffusion_gemma_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "layer_types": list(self.resolved_layer_types()),
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "num_global_key_value_heads": self.num_global_key_value_heads,
            "head_dim": self.head_dim,
            "global_head_dim": self.global_head_dim,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_experts": self.num_experts,
            "top_k_experts": self.top_k_experts,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "final_logit_softcapping": self.final_logit_softcapping,
            "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": {
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": self.partial_rotary_factor,
                                   "rope_theta": self.rope_theta},
                "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_theta_sliding},
            },
        }
        return {"model_type": "diffusion_gemma", "_name_or_path": self.name, "canvas_length": self.canvas_length,
                "text_config": text}

    def generation_config(self) -> dict[str, Any]:
        """The sampler settings, as generation_config.json (the spec's fallbacks: 48 steps, t 0.4-0.8, ...)."""
        d = GENERATION_DEFAULTS
        return {"max_denoising_steps": d["max_denoising_steps"], "t_min": d["t_min"], "t_max": d["t_max"],
                "sampler_config": {"entropy_bound": d["entropy_bound"]},
                "stability_threshold": d["stability_threshold"], "confidence_threshold": d["confidence_threshold"]}

    def arch(self) -> ArchParams:
        """The converter's view of this shape (what it would read from the checkpoint's config)."""
        return arch_from_config(self.config(), self.generation_config())

    def tiny_spec(self, **changes: Any) -> TinySpec:
        """A TinySpec of this shape, to build a random Hugging Face checkpoint with tiny_checkpoint."""
        fields = {f.name for f in dataclasses.fields(TinySpec)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in fields}
        return TinySpec(**{**values, **changes})

    def replace(self, **changes: Any) -> Preset:
        """A variant with some fields changed (named '<name>+changed' unless `name` is given)."""
        if "name" not in changes:
            changes["name"] = self.name + "+" + ",".join(f"{k}={v}" for k, v in sorted(changes.items()))
        return dataclasses.replace(self, **changes)


def _from_tiny_spec(name: str, spec: TinySpec, description: str) -> Preset:
    """A preset with the dimensions of `spec` (the tiny checkpoints' facts live in TinySpec)."""
    fields = {f.name for f in dataclasses.fields(Preset)} - {"name", "description", "vocab_size", "layer_types"}
    values = {k: v for k, v in dataclasses.asdict(spec).items() if k in fields}
    vocab = spec.vocab_size if spec.vocab_size is not None else spec.tokenizer_vocab_size
    return Preset(name=name, vocab_size=vocab, layer_types=spec.layer_types, description=description, **values)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    # Spec section 0 (values marked there as from public config.json copies included).
    Preset(
        name="diffusiongemma-26B-A4B",
        vocab_size=262_144,
        hidden_size=2816,
        num_hidden_layers=30,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_global_key_value_heads=2,
        head_dim=256,
        global_head_dim=512,
        intermediate_size=2112,
        moe_intermediate_size=704,
        num_experts=128,
        top_k_experts=8,
        sliding_window=1024,
        max_position_embeddings=262_144,
        canvas_length=256,
        rms_norm_eps=1e-6,
        final_logit_softcapping=30.0,
        rope_theta=1_000_000.0,
        partial_rotary_factor=0.25,
        rope_theta_sliding=10_000.0,
        description="Google's DiffusionGemma 26B-A4B: 30 layers (full at 5, 11, 17, 23, 29), 128 experts top-8",
    ),
    _from_tiny_spec("tiny", TinySpec(), "the test model: 6 layers, hidden 64, 4 experts top-2, vocab 512, canvas 16"),
    _from_tiny_spec(
        "mid",
        TinySpec(hidden_size=768, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4, head_dim=96,
                 global_head_dim=192, num_global_key_value_heads=2, intermediate_size=1536, moe_intermediate_size=384,
                 num_experts=24, top_k_experts=4, vocab_size=32768, sliding_window=128, canvas_length=256),
        "~0.35 B parameters (~85 M active per token): hidden 768, 12 layers, 24 experts top-4, vocab 32768, canvas 256",
    ),
)}


def names() -> list[str]:
    return sorted(PRESETS)


def get(name: str) -> Preset:
    """The preset called `name`; KeyError (its message lists the known names) otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset '{name}' (known: {', '.join(names())})") from None
