"""The converter refuses bad checkpoints with one clear line, accepts every config form, and never
leaves a half-written output behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from pydgemma.quantize import ConversionError, convert


def variant(src: Path, dst: Path, *, drop: tuple[str, ...] = (), set_tensors: dict[str, np.ndarray] | None = None,
            patch_config: Callable[[dict], None] | None = None) -> Path:
    """A copy of checkpoint `src` with tensors dropped/replaced/added and config.json patched."""
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update(set_tensors or {})
    (dst / "model.safetensors").unlink()
    save_file(tensors, dst / "model.safetensors")
    if patch_config:
        cfg = json.loads((dst / "config.json").read_text())
        patch_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def same_model(a: Path, b: Path) -> bool:
    """Same metadata (but general.name, which follows the folder name) and the same tensor bytes."""
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    fields_a = {k: f.contents() for k, f in ra.fields.items() if k != "general.name"}
    fields_b = {k: f.contents() for k, f in rb.fields.items() if k != "general.name"}
    tensors_a = [(t.name, t.tensor_type, t.data.tobytes()) for t in ra.tensors]
    tensors_b = [(t.name, t.tensor_type, t.data.tobytes()) for t in rb.tensors]
    return fields_a == fields_b and tensors_a == tensors_b


def conversion_error(src: Path, out: Path) -> str:
    with pytest.raises(ConversionError) as info:
        convert(src, out, out_type="f32")
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")], "temporary file left behind"
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_tensor(hf_tiny: Path, tmp_path: Path) -> None:
    src = variant(hf_tiny, tmp_path / "ck", drop=("model.decoder.layers.2.mlp.up_proj.weight",))
    assert conversion_error(src, tmp_path / "o.gguf") == "checkpoint lacks tensor 'model.decoder.layers.2.mlp.up_proj.weight'"


def test_wrong_shape(hf_tiny: Path, tmp_path: Path) -> None:
    bad = np.zeros((96, 63), dtype=np.float32)
    src = variant(hf_tiny, tmp_path / "ck", set_tensors={"model.decoder.layers.1.mlp.gate_proj.weight": bad})
    assert conversion_error(src, tmp_path / "o.gguf") == (
        "tensor 'model.decoder.layers.1.mlp.gate_proj.weight' has shape [96, 63] but config.json implies [96, 64]"
    )


def test_untied_encoder_weights_are_refused(hf_tiny: Path, tmp_path: Path) -> None:
    dec = load_file(hf_tiny / "model.safetensors")["model.decoder.layers.1.mlp.up_proj.weight"]
    src = variant(hf_tiny, tmp_path / "ck",
                  set_tensors={"model.encoder.language_model.layers.1.mlp.up_proj.weight": dec + np.float32(0.25)})
    assert conversion_error(src, tmp_path / "o.gguf") == (
        "encoder weight 'model.encoder.language_model.layers.1.mlp.up_proj.weight' differs from its decoder twin "
        "'model.decoder.layers.1.mlp.up_proj.weight' (max abs difference 0.25); "
        "DiffusionGemma's encoder and decoder must share their backbone weights"
    )


def test_explicitly_tied_encoder_weights_convert_identically(hf_tiny: Path, tmp_path: Path,
                                                             converted: dict[str, Path]) -> None:
    tensors = load_file(hf_tiny / "model.safetensors")
    copies = {k.replace("model.decoder.", "model.encoder.language_model.", 1): v for k, v in tensors.items()
              if k.startswith("model.decoder.layers.") and not k.endswith("layer_scalar")}
    copies["model.encoder.language_model.norm.weight"] = tensors["model.decoder.norm.weight"]
    src = variant(hf_tiny, tmp_path / "ck", set_tensors=copies)
    out = convert(src, tmp_path / "o.gguf", out_type="f32").path
    assert same_model(out, converted["f32"])


def test_lm_head_identical_is_not_duplicated_and_different_is_kept(hf_tiny: Path, tmp_path: Path) -> None:
    embed = load_file(hf_tiny / "model.safetensors")["model.decoder.embed_tokens.weight"]
    same = variant(hf_tiny, tmp_path / "same", set_tensors={"lm_head.weight": embed.copy()})
    names = {t.name for t in gguf.GGUFReader(convert(same, tmp_path / "same.gguf", out_type="f32").path).tensors}
    assert "output.weight" not in names
    other = variant(hf_tiny, tmp_path / "other", set_tensors={"lm_head.weight": embed * np.float32(2)})
    reader = gguf.GGUFReader(convert(other, tmp_path / "other.gguf", out_type="f32").path)
    out = next(t for t in reader.tensors if t.name == "output.weight")
    np.testing.assert_array_equal(np.asarray(out.data).reshape(embed.shape), embed * np.float32(2))


def test_unknown_tensor(hf_tiny: Path, tmp_path: Path) -> None:
    src = variant(hf_tiny, tmp_path / "ck", set_tensors={"model.decoder.layers.0.extra.weight": np.ones(4, np.float32)})
    assert conversion_error(src, tmp_path / "o.gguf") == (
        "unexpected tensor 'model.decoder.layers.0.extra.weight' in the checkpoint (not part of the DiffusionGemma layout)"
    )


def test_config_contradicting_the_tensors(hf_tiny: Path, tmp_path: Path) -> None:
    def wrong_head_dim(cfg: dict) -> None:
        cfg["text_config"]["per_layer_config"]["5"]["head_dim"] = 64
        cfg["text_config"]["global_head_dim"] = 64

    src = variant(hf_tiny, tmp_path / "ck", patch_config=wrong_head_dim)
    assert conversion_error(src, tmp_path / "o.gguf") == (
        "tensor 'model.decoder.layers.5.self_attn.q_proj.weight' has shape [128, 64] but config.json implies [256, 64]"
    )


def test_config_forms_disagreeing(hf_tiny: Path, tmp_path: Path) -> None:
    def two_full_layers(cfg: dict) -> None:
        text = cfg["text_config"]
        text["layer_types"][2] = "full_attention"
        text["per_layer_config"]["2"] = {"head_dim": 48, "num_key_value_heads": 1}

    src = variant(hf_tiny, tmp_path / "ck", patch_config=two_full_layers)
    assert conversion_error(src, tmp_path / "o.gguf") == (
        "config.json text_config: full-attention layers disagree on head_dim [32, 48] or kv heads [1]"
    )


@pytest.mark.parametrize("style", ["transformers", "hub"])
def test_every_config_form_gives_the_same_file(hf_tiny: Path, tmp_path: Path, converted: dict[str, Path],
                                               style: str) -> None:
    def restyle(cfg: dict) -> None:
        text = cfg["text_config"]
        if style == "transformers":  # per_layer_config only, as save_pretrained writes it
            text.pop("global_head_dim", None)
            text.pop("num_global_key_value_heads", None)
            text.pop("final_logit_softcapping", None)  # class default 30.0
        else:  # hub style: explicit global keys only
            text.pop("per_layer_config", None)

    src = variant(hf_tiny, tmp_path / "ck", patch_config=restyle)
    out = convert(src, tmp_path / "o.gguf", out_type="f32").path
    assert same_model(out, converted["f32"])


def test_not_a_diffusion_gemma(hf_tiny: Path, tmp_path: Path) -> None:
    src = variant(hf_tiny, tmp_path / "ck", patch_config=lambda cfg: cfg.update(model_type="llama"))
    assert conversion_error(src, tmp_path / "o.gguf") == (
        "config.json describes a 'llama' model, not DiffusionGemma ('diffusion_gemma')"
    )


def test_missing_files(hf_tiny: Path, tmp_path: Path) -> None:
    assert conversion_error(tmp_path / "nowhere", tmp_path / "o.gguf") == f"checkpoint folder '{tmp_path / 'nowhere'}' does not exist"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert conversion_error(empty, tmp_path / "o.gguf") == f"no .safetensors files in '{empty}'"
    no_cfg = tmp_path / "nocfg"
    shutil.copytree(hf_tiny, no_cfg)
    (no_cfg / "config.json").unlink()
    assert conversion_error(no_cfg, tmp_path / "o.gguf") == f"'{no_cfg}' has no config.json"
    no_tok = tmp_path / "notok"
    shutil.copytree(hf_tiny, no_tok)
    (no_tok / "tokenizer.json").unlink()
    assert conversion_error(no_tok, tmp_path / "o.gguf") == f"'{no_tok}' has no tokenizer.json"


def test_truncated_safetensors(hf_tiny: Path, tmp_path: Path) -> None:
    src = tmp_path / "ck"
    shutil.copytree(hf_tiny, src)
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    message = conversion_error(src, tmp_path / "o.gguf")
    assert message.startswith(f"'{path}' is truncated: tensor '") and message.endswith(f"but the file has {len(data) - 1000}")


def test_repo_id_from_the_local_hub_cache(hf_tiny: Path, tmp_path: Path, converted: dict[str, Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    snapshot = cache / "models--google--diffusiongemma-tiny" / "snapshots" / "0123abcd"
    shutil.copytree(hf_tiny, snapshot)
    (cache / "models--google--diffusiongemma-tiny" / "refs").mkdir()
    (cache / "models--google--diffusiongemma-tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the cache alone (test_hub.py downloads from a loopback hub)
    out = convert("google/diffusiongemma-tiny", tmp_path / "o.gguf", out_type="f32").path
    assert same_model(out, converted["f32"])
    with pytest.raises(ConversionError, match=r"^offline: google/other-model is not in the Hugging Face cache"):
        convert("google/other-model", tmp_path / "p.gguf")


def test_failed_conversion_keeps_the_previous_file(hf_tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous complete file")
    src = variant(hf_tiny, tmp_path / "ck", drop=("model.decoder.norm.weight",))
    with pytest.raises(ConversionError):
        convert(src, out, out_type="f32", overwrite=True)
    assert out.read_bytes() == b"previous complete file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "model.gguf"]


def test_output_mode_follows_the_umask(hf_tiny: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = convert(hf_tiny, tmp_path / "o.gguf", out_type="f32").path
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


FINDINGS = Path(__file__).resolve().parent / "fuzz" / "safetensors_findings"


@pytest.mark.parametrize("finding", sorted(FINDINGS.glob("*.safetensors")), ids=lambda p: p.name)
def test_safetensors_fuzzer_findings_are_refused(finding: Path, tmp_path: Path) -> None:
    from pydgemma.quantize.checkpoint import Checkpoint, CheckpointError

    (tmp_path / "model.safetensors").write_bytes(finding.read_bytes())
    with pytest.raises(CheckpointError, match="malformed entry"):
        Checkpoint(tmp_path)
