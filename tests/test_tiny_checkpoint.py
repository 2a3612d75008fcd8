"""The tiny random DiffusionGemma checkpoint builder (pydgemma.models.tiny_checkpoint).

These tests hold the builder to what other tests rely on: deterministic files, a checkpoint that
transformers reloads with identical logits, no tensor left at its default init, a working offline
tokenizer with the Gemma 4 special tokens and chat template, and well-conditioned numerics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from safetensors import safe_open  # noqa: E402
from transformers import AutoTokenizer, DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion  # noqa: E402
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (  # noqa: E402
    DiffusionGemmaGenerationConfig,
)

from pydgemma.models.tiny_checkpoint import (  # noqa: E402
    SPECIAL_TOKENS,
    TinySpec,
    build_config,
    build_model,
    build_tiny_checkpoint,
    canvas_logits,
    precision_gap,
    sample_inputs,
)

SPEC = TinySpec()
N_LAYERS = SPEC.num_hidden_layers


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny checkpoint (fp32), built once per session."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_hf") / "ckpt")


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_hf_dir: Path):
    return DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_hf_dir).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_hf_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_hf_dir, local_files_only=True)


def _tensors(path: Path) -> dict[str, "torch.Tensor"]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# --- files ------------------------------------------------------------------------------------


def test_files_written(tiny_hf_dir: Path) -> None:
    names = {p.name for p in tiny_hf_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= names


def test_deterministic(tiny_hf_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_checkpoint(tmp_path / "again")
    for name in sorted(p.name for p in tiny_hf_dir.iterdir()):
        assert (again / name).read_bytes() == (tiny_hf_dir / name).read_bytes(), name


def test_seed_changes_weights(tiny_hf_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_checkpoint(tmp_path / "seed1", TinySpec(seed=1))
    a, b = _tensors(tiny_hf_dir), _tensors(other)
    assert a.keys() == b.keys()
    assert all(not torch.equal(a[k], b[k]) for k in a)


def test_bf16_variant(tmp_path: Path, tiny_hf_dir: Path) -> None:
    d = build_tiny_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16)
    tensors = _tensors(d)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    ref = _tensors(tiny_hf_dir)
    assert all(torch.equal(tensors[k], ref[k].to(torch.bfloat16)) for k in ref)
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    m = DiffusionGemmaForBlockDiffusion.from_pretrained(d)
    assert m.dtype == torch.bfloat16


# --- config -------------------------------------------------------------------------------------


def test_config(tiny_hf_dir: Path, tiny_tokenizer) -> None:
    raw = json.loads((tiny_hf_dir / "config.json").read_text())
    turn_end = tiny_tokenizer.convert_tokens_to_ids("<turn|>")
    assert raw["architectures"] == ["DiffusionGemmaForBlockDiffusion"]
    assert raw["text_config"]["eos_token_id"] == [1, turn_end]
    assert raw["eos_token_id"] == [1, turn_end]
    assert raw["text_config"]["global_head_dim"] == SPEC.global_head_dim
    assert raw["text_config"]["num_global_key_value_heads"] == SPEC.num_global_key_value_heads
    assert raw["vision_config"]["hidden_size"] == SPEC.vision_hidden_size  # not the 768 default
    assert raw["image_token_id"] == tiny_tokenizer.convert_tokens_to_ids("<|image|>")

    cfg = DiffusionGemmaConfig.from_pretrained(tiny_hf_dir)
    tc = cfg.text_config
    assert tc.vocab_size == len(tiny_tokenizer) == 512
    assert list(tc.layer_types) == ["sliding_attention"] * 5 + ["full_attention"]
    assert tc.per_layer_config[5].head_dim == SPEC.global_head_dim
    assert tc.per_layer_config[5].num_key_value_heads == SPEC.num_global_key_value_heads
    assert tc.per_layer_config[0].head_dim == SPEC.head_dim
    assert tc.per_layer_config[0].num_key_value_heads == SPEC.num_key_value_heads
    assert cfg.canvas_length == SPEC.canvas_length


@pytest.mark.parametrize("style", ["hub", "transformers"])
def test_config_styles_reload_the_same(style: str, tmp_path: Path) -> None:
    from pydgemma.models.tiny_checkpoint import _restyle_config_json

    d = tmp_path / style
    d.mkdir()
    build_config(SPEC).save_pretrained(d)
    _restyle_config_json(d / "config.json", TinySpec(config_style=style))
    text = json.loads((d / "config.json").read_text())["text_config"]
    assert ("per_layer_config" in text) == (style == "transformers")
    assert ("global_head_dim" in text) == (style == "hub")
    tc = DiffusionGemmaConfig.from_pretrained(d).text_config
    for i in range(N_LAYERS):
        full = i == N_LAYERS - 1
        assert tc.per_layer_config[i].head_dim == (SPEC.global_head_dim if full else SPEC.head_dim)
        assert tc.per_layer_config[i].num_key_value_heads == (
            SPEC.num_global_key_value_heads if full else SPEC.num_key_value_heads
        )


def test_twelve_layers_config() -> None:
    cfg = build_config(TinySpec(num_hidden_layers=12))
    assert list(cfg.text_config.layer_types) == (["sliding_attention"] * 5 + ["full_attention"]) * 2


def test_generation_config(tiny_hf_dir: Path) -> None:
    g = DiffusionGemmaGenerationConfig.from_pretrained(tiny_hf_dir)
    assert g.max_denoising_steps == 48
    assert (g.t_min, g.t_max) == (0.4, 0.8)
    assert g.sampler_config.entropy_bound == 0.1
    assert g.stability_threshold == 1
    assert g.confidence_threshold == 0.005
    assert g.eos_token_id == [1, 6] and g.bos_token_id == 2 and g.pad_token_id == 0


# --- weights ------------------------------------------------------------------------------------


def test_saved_tensor_names(tiny_hf_dir: Path) -> None:
    names = set(_tensors(tiny_hf_dir))
    assert "lm_head.weight" not in names  # tied to model.decoder.embed_tokens.weight
    assert "model.decoder.embed_tokens.weight" in names
    # The encoder's text weights are tied to the decoder's; only its layer_scalar buffers are saved.
    enc_text = {n for n in names if n.startswith("model.encoder.language_model.")}
    assert enc_text == {f"model.encoder.language_model.layers.{i}.layer_scalar" for i in range(N_LAYERS)}
    assert {f"model.decoder.layers.{i}.layer_scalar" for i in range(N_LAYERS)} <= names
    assert "model.decoder.layers.5.self_attn.v_proj.weight" not in names  # full layer: K = V
    assert "model.decoder.layers.0.self_attn.v_proj.weight" in names
    assert any(n.startswith("model.decoder.self_conditioning.") for n in names)
    assert any(n.startswith("model.encoder.vision_tower.") for n in names)


def test_no_tensor_left_at_default_init(tiny_hf_dir: Path, tiny_hf_model) -> None:
    for name, t in _tensors(tiny_hf_dir).items():
        t = t.float()
        assert not torch.all(t == 1.0), name
        assert not torch.all(t == 0.0), name
        assert t.numel() == 1 or t.std() > 0, name
    # In memory too (this covers the tied encoder/LM-head views of the saved tensors).
    for name, p in tiny_hf_model.named_parameters(remove_duplicate=False):
        assert p.numel() == 1 or p.std() > 0, name
        assert not torch.all(p == 1.0), name
    norms = {n: p for n, p in tiny_hf_model.named_parameters() if n.endswith("norm.weight")}
    assert len(norms) > 10
    for name, p in norms.items():
        assert not torch.allclose(p, torch.ones_like(p), atol=0.05), name


def test_encoder_and_decoder_layer_scalars_differ(tiny_hf_dir: Path) -> None:
    t = _tensors(tiny_hf_dir)
    for i in range(N_LAYERS):
        enc = t[f"model.encoder.language_model.layers.{i}.layer_scalar"]
        dec = t[f"model.decoder.layers.{i}.layer_scalar"]
        assert enc.shape == dec.shape == (1,)
        assert not torch.equal(enc, dec)
        assert enc.item() != 1.0 and dec.item() != 1.0


def test_router_scales_randomised(tiny_hf_dir: Path) -> None:
    t = _tensors(tiny_hf_dir)
    for i in range(N_LAYERS):
        for leaf in ("router.scale", "router.per_expert_scale"):
            v = t[f"model.decoder.layers.{i}.{leaf}"]
            assert v.std() > 0 and not torch.allclose(v, torch.ones_like(v))


# --- numerics -----------------------------------------------------------------------------------


def test_reload_gives_identical_logits(tiny_hf_model) -> None:
    fresh = build_model(SPEC)
    prompt, canvas = sample_inputs(512, canvas_length=SPEC.canvas_length)
    a1 = canvas_logits(fresh, prompt, canvas)
    b1 = canvas_logits(tiny_hf_model, prompt, canvas)
    assert torch.equal(a1, b1)
    # A self-conditioned step uses the decoder's self_conditioning weights.
    a2 = canvas_logits(fresh, prompt, canvas, a1)
    b2 = canvas_logits(tiny_hf_model, prompt, canvas, b1)
    assert torch.equal(a2, b2)
    assert (a2 - a1).abs().max() > 0.1
    assert a1.shape == (2, SPEC.canvas_length, 512)
    assert a1.std() > 1.0  # logits are spread, not near-uniform


@pytest.mark.slow
def test_fp32_and_fp64_logits_agree(tiny_hf_model) -> None:
    assert precision_gap(tiny_hf_model) <= 1e-4


def test_generate_smoke(tiny_hf_model, tiny_tokenizer) -> None:
    ids = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    torch.manual_seed(0)
    out = tiny_hf_model.generate(input_ids=ids, max_new_tokens=2 * SPEC.canvas_length, max_denoising_steps=4)
    seq = out.sequences
    assert seq.shape[0] == 1 and ids.shape[1] < seq.shape[1] <= ids.shape[1] + 2 * SPEC.canvas_length
    assert torch.equal(seq[:, : ids.shape[1]], ids)


# --- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_special_ids(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    assert type(tok).__name__ == "GemmaTokenizer"
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == ("<pad>", "<eos>", "<bos>", "<unk>")
    assert tok.mask_token == "<mask>" and tok.mask_token_id == 4
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(4, 4 + len(SPECIAL_TOKENS)))
    assert tok.convert_tokens_to_ids("<|turn>") == 5 and tok.convert_tokens_to_ids("<turn|>") == 6
    assert tok.convert_tokens_to_ids("<0x00>") == 4 + len(SPECIAL_TOKENS)
    # Special tokens are single tokens in text and are dropped by skip_special_tokens.
    enc = tok.encode("<|turn>user\nhi<turn|>\n<|channel>thought\n<channel|>", add_special_tokens=False)
    assert enc[0] == 5 and 6 in enc and 8 in enc and 9 in enc
    assert tok.decode(enc, skip_special_tokens=True) == "user\nhi\nthought\n"
    assert tok.encode("hi")[0] == tok.bos_token_id


@pytest.mark.parametrize(
    "text",
    [
        "hello   world",
        "  leading and trailing spaces  ",
        "line one\nline two\n\n\nafter three newlines\n",
        "\t\tdef f(x):\n\t\t\treturn x  # comment",
        "x    =    1          # aligned",
        "日本語のテキストです。你好，世界！한국어",
        "Emoji: 😀 🚀 ❤️ 👍",
        "Привет, мир! ∑ ∫ 🦀 \x00\x01\x7f",  # not in the training text: byte fallback
        "a\r\nb\u00a0c\u200bd",
        "Numbers 1234567890 and 3.14159",
        '<|turn>model\n<|channel>thought\n<channel|>{"a": <|"|>x<|"|>}<turn|>',
    ],
)
def test_round_trip(tiny_tokenizer, text: str) -> None:
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.unk_token_id not in ids


def test_byte_fallback_used(tiny_tokenizer) -> None:
    toks = tiny_tokenizer.convert_ids_to_tokens(tiny_tokenizer.encode("Ж🦀", add_special_tokens=False))
    assert toks == ["<0xD0>", "<0x96>", "<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]


MESSAGES = [
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "<|channel>thought\nThe user greets me.<channel|>Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
]


def test_chat_template_thinking_off(tiny_tokenizer) -> None:
    text = tiny_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<bos><|turn>user\nHi there!<turn|>\n"
        "<|turn>model\nHello! How can I help?<turn|>\n"
        "<|turn>user\nTell me a joke.<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>"
    )


def test_chat_template_thinking_on(tiny_tokenizer) -> None:
    text = tiny_tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert text == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n"
        "<|turn>user\nHi there!<turn|>\n"
        "<|turn>model\nHello! How can I help?<turn|>\n"
        "<|turn>user\nTell me a joke.<turn|>\n"
        "<|turn>model\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *MESSAGES[:1]]
    text = tiny_tokenizer.apply_chat_template(
        with_system, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert text == "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHi there!<turn|>\n<|turn>model\n"


def test_chat_template_tokens(tiny_tokenizer) -> None:
    ids = tiny_tokenizer.apply_chat_template(MESSAGES[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[:2] == [2, 5]  # <bos> <|turn>
    assert ids.count(2) == 1  # the template writes <bos>; no second one is added
    tail = tiny_tokenizer.encode("<|turn>model\n<|channel>thought\n<channel|>", add_special_tokens=False)
    assert ids[-len(tail) :] == tail
