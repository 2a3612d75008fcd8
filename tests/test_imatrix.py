"""Importance matrices: the native collector against transformers' activations, its counts over
prefill/denoise/generation, llama.cpp's imatrix GGUF layout, and `quantize --imatrix`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import pydgemma
from pydgemma.generate import generate_ids
from pydgemma.quantize import ConversionError, convert
from pydgemma.quantize.imatrix import Imatrix, importance, read_imatrix, write_imatrix
from pydgemma.quantize.quantize import quantize

Q = gguf.GGMLQuantizationType
CALIBRATION = ("The river runs past the old mill and under the stone bridge, where children fish in summer. "
               "In winter the water freezes at the edges and the miller's dog watches the ice. ") * 6


def test_prefill_sums_equal_transformers_activations(hf_tiny: Path, converted: dict[str, Path]) -> None:
    """One prefill: every entry is the sum over the prompt rows of the squared inputs of that Linear."""
    import torch

    from pydgemma.models.reference import ReferenceSession

    model = pydgemma.Model(converted["f32"])
    ids = model.tokenize("The quick brown fox jumps over the lazy dog, again and again.")
    ctx = model.context(n_ctx=128, kv_type="f32")
    ctx.imatrix_start()
    ctx.prefill(ids)
    got = ctx.imatrix()

    ref = ReferenceSession(hf_tiny)
    layers = ref.model.model.encoder.language_model.layers
    sums: dict[str, np.ndarray] = {}
    n_expert = ref.model.config.text_config.num_experts

    def capture(name: str):
        def hook(_module, args):
            x = args[0].detach().to(torch.float64).reshape(-1, args[0].shape[-1]).numpy()
            sums[name] = sums.get(name, 0) + (x**2).sum(axis=0)
        return hook

    def capture_experts(name: str):
        def hook(_module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).detach().to(torch.float64).numpy()
            idx = (args[1] if len(args) > 1 else kwargs["top_k_index"]).numpy()
            acc = np.zeros((n_expert, x.shape[-1]))
            for t, experts in enumerate(idx):
                for e in experts:
                    acc[e] += x[t] ** 2
            sums[name] = acc
        return hook

    handles = [layers[0].self_attn.q_proj.register_forward_pre_hook(capture("blk.0.attn_q.weight")),
               layers[1].self_attn.o_proj.register_forward_pre_hook(capture("blk.1.attn_output.weight")),
               layers[2].mlp.down_proj.register_forward_pre_hook(capture("blk.2.ffn_down.weight")),
               layers[3].experts.register_forward_pre_hook(capture_experts("blk.3.ffn_gate_up_exps.weight"),
                                                           with_kwargs=True)]
    try:
        ref.prefill(ids)
    finally:
        for h in handles:
            h.remove()
    for name, expected in sums.items():
        in_sum2, counts = got[name]
        expected = np.asarray(expected).reshape(in_sum2.shape)
        np.testing.assert_allclose(in_sum2, expected, rtol=2e-4, atol=1e-6 * float(np.abs(expected).max()), err_msg=name)
        if name.endswith("_exps.weight"):
            assert counts.sum() == len(ids) * model.hparams["n_expert_used"]
        else:
            assert counts.tolist() == [len(ids)]
    # the encoder's last layer only fills the cache: its K/V projections run, nothing after them
    last = model.hparams["n_layer"] - 1
    assert f"blk.{last}.attn_k.weight" in got and f"blk.{last}.attn_q.weight" not in got
    assert "token_embd.weight" not in got  # no output head in an encoder pass


@pytest.mark.slow
def test_counts_over_denoising_and_generation(converted: dict[str, Path]) -> None:
    model = pydgemma.Model(converted["f32"])
    hp = model.hparams
    C, k = hp["canvas_length"], hp["n_expert_used"]
    prompt = model.tokenize("Count the rows")
    ctx = model.context(n_ctx=256)
    ctx.prefill(prompt)  # not collected: collection starts below
    ctx.imatrix_start()
    canvas = np.arange(20, 20 + C)
    logits = ctx.denoise(canvas)
    ctx.denoise(canvas, sc_logits=logits)
    ctx.imatrix_stop()
    ctx.denoise(canvas)  # not collected
    im = ctx.imatrix()
    assert im["blk.0.attn_q.weight"][1].tolist() == [2 * C]
    assert im["token_embd.weight"][1].tolist() == [2 * C]  # the tied output head: final-norm rows
    assert im["token_embd.weight"][0].shape == (1, hp["n_embd"])
    assert im["self_cond_gate.weight"][1].tolist() == [C]  # only the step with self-conditioning
    for name, (sums, counts) in im.items():
        if name.endswith("_exps.weight"):
            assert sums.shape == (hp["n_expert"], sums.shape[1]) and counts.sum() == 2 * C * k, name
    ctx.imatrix_clear()
    assert ctx.imatrix() == {}

    # a whole generation: the prompt, every denoising step, the commit between the two canvases
    ctx.reset()
    ctx.imatrix_start()
    gen = generate_ids(ctx, prompt, max_new_tokens=2 * C, sampler={"seed": 3, "max_steps": 5},
                       eos_ids=[hp["n_vocab"] + 1])  # no end-of-generation token: two canvases
    im = ctx.imatrix()
    assert len(gen.steps) == 2 and ctx.n_past == len(prompt) + C
    encoder_rows, decoder_rows = ctx.n_past, C * gen.n_forwards
    assert im["blk.0.attn_q.weight"][1].tolist() == [encoder_rows + decoder_rows]
    assert im["token_embd.weight"][1].tolist() == [decoder_rows]
    assert im["blk.0.ffn_down_exps.weight"][1].sum() == (encoder_rows + decoder_rows) * k


def test_file_layout_and_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    im = Imatrix({"blk.0.attn_q.weight": (rng.random((1, 8)), np.array([5])),
                  "blk.0.ffn_down_exps.weight": (rng.random((4, 6)), np.array([3, 0, 2, 7]))},
                 ["calib.txt"], 2, 32)
    path = write_imatrix(tmp_path / "im.gguf", im)
    r = gguf.GGUFReader(path)
    assert r.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in r.fields
    assert r.fields["imatrix.datasets"].contents() == ["calib.txt"]
    assert r.fields["imatrix.chunk_count"].contents() == 2 and r.fields["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    assert r.fields["imatrix.chunk_size"].contents() == 32 and r.fields["imatrix.chunk_size"].types == [gguf.GGUFValueType.UINT32]
    tensors = {t.name: t for t in r.tensors}
    assert list(tensors) == ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
                             "blk.0.ffn_down_exps.weight.in_sum2", "blk.0.ffn_down_exps.weight.counts"]
    assert all(t.tensor_type == Q.F32 for t in tensors.values())
    assert tensors["blk.0.ffn_down_exps.weight.in_sum2"].shape.tolist() == [6, 4]  # ne: [n_per_row, n_expert]
    assert tensors["blk.0.ffn_down_exps.weight.counts"].shape.tolist() == [1, 4]
    back = read_imatrix(path)
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["calib.txt"], 2, 32)
    for name, (sums, counts) in im.entries.items():
        np.testing.assert_allclose(back.entries[name][0], sums.astype(np.float32))
        assert back.entries[name][1].tolist() == counts.tolist()
    imp = importance(back)["blk.0.ffn_down_exps.weight"]  # llama-quantize: sum / count, 1 without data
    np.testing.assert_allclose(imp[0], im.entries["blk.0.ffn_down_exps.weight"][0][0] / 3, rtol=1e-6)
    assert imp[1].tolist() == [1.0] * 6
    with pytest.raises(ConversionError, match="already exists"):
        write_imatrix(path, im)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An F32 GGUF whose rows are multiples of 256, and an imatrix of it made by the CLI."""
    from pydgemma.models.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    spec = TinySpec(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, head_dim=64, global_head_dim=128)
    root = tmp_path_factory.mktemp("wide256im")
    path = convert(build_tiny_checkpoint(root / "hf", spec), root / "f32.gguf", out_type="f32").path
    calib = root / "calib.txt"
    calib.write_text(CALIBRATION)
    out = root / "imatrix.gguf"
    r = subprocess.run([sys.executable, "-m", "pydgemma.quantize", "imatrix", "-m", str(path), "-f", str(calib), "-o",
                        str(out), "--chunk-size", "24", "--chunks", "2", "--max-new-tokens", "16", "--steps", "6"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "2 chunks of 24 tokens" in r.stdout
    return path, out


def test_cli_file_reads_back(wide) -> None:
    path, im_path = wide
    im = read_imatrix(im_path)
    assert (im.chunk_count, im.chunk_size) == (2, 24) and im.datasets[0].endswith("calib.txt")
    assert "token_embd.weight" not in im.entries  # the head only with --process-output, as llama-imatrix
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert set(im.entries) <= names and "blk.0.ffn_gate_up_exps.weight" in im.entries
    assert "self_cond_gate.weight" in im.entries
    sums, counts = im.entries["blk.0.attn_q.weight"]
    assert counts[0] > 2 * 24 and np.all(sums > 0)


def _weighted_error(q_path: Path, f32_path: Path, imp: dict[str, np.ndarray], qtype: Q) -> float:
    """Sum over `qtype` tensors of sum(importance * err^2) / sum(importance * w^2)."""
    source = {t.name: t for t in gguf.GGUFReader(f32_path).tensors}
    num = den = 0.0
    for t in gguf.GGUFReader(q_path).tensors:
        if t.tensor_type != qtype or t.name not in imp:
            continue
        w = np.asarray(source[t.name].data, dtype=np.float64)
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape).astype(np.float64)
        weights = imp[t.name].reshape(-1, 1, w.shape[-1]) if w.ndim == 3 else imp[t.name].reshape(1, -1)
        num += float((weights * (back - w) ** 2).sum())
        den += float((weights * w**2).sum())
    assert den > 0
    return num / den


@pytest.mark.slow
def test_imatrix_lowers_the_weighted_error(wide, tmp_path: Path) -> None:
    path, im_path = wide
    imp = importance(read_imatrix(im_path))
    plain = quantize(path, tmp_path / "plain.gguf", mix="Q4_K_M").path
    with_im = quantize(path, tmp_path / "im.gguf", mix="Q4_K_M", imatrix=im_path).path
    e_plain = _weighted_error(plain, path, imp, Q.Q4_K)
    e_im = _weighted_error(with_im, path, imp, Q.Q4_K)
    assert e_im < 0.97 * e_plain, (e_im, e_plain)
    meta = pydgemma.Model(with_im).metadata
    assert meta["quantize.imatrix.file"] == str(im_path)
    assert meta["quantize.imatrix.chunks_count"] == "2"
    # the types that ignore an importance matrix give the same bytes with one
    q8 = [t.data.tobytes() for t in gguf.GGUFReader(quantize(path, tmp_path / "a.gguf", mix="Q8_0").path).tensors]
    q8_im = [t.data.tobytes() for t in gguf.GGUFReader(quantize(path, tmp_path / "b.gguf", mix="Q8_0",
                                                                imatrix=im_path).path).tensors]
    assert q8 == q8_im


@pytest.mark.slow
def test_iq_types_need_the_imatrix(wide, tmp_path: Path) -> None:
    path, im_path = wide
    args = [sys.executable, "-m", "pydgemma.quantize", "quantize", str(path), "-t", "Q4_K_M", "-q",
            "--tensor-type", r"blk\.\d+\.ffn_(up|gate)\.weight=IQ2_XS", "--tensor-type", "_exps=IQ4_XS"]
    out = tmp_path / "iq.gguf"
    r = subprocess.run([*args, "-o", str(out), "--imatrix", str(im_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_up.weight"] == Q.IQ2_XS and types["blk.0.ffn_down_exps.weight"] == Q.IQ4_XS
    gen = pydgemma.Model(out).generate("hello", max_new_tokens=16, seed=1, max_steps=4)
    assert len(gen.steps) == 1 and 1 <= gen.steps[0] <= 4 and gen.n_forwards == gen.steps[0]  # one canvas of 16
    assert len(gen.tokens) < 16 if gen.hit_eos else len(gen.tokens) == 16
    bad = subprocess.run([*args, "-o", str(tmp_path / "no.gguf")], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: blk.0.ffn_gate.weight: quantize: iq2_xs needs an importance")
    assert bad.stderr.count("\n") == 1 and not (tmp_path / "no.gguf").exists()


def test_imatrix_refusals(wide, converted: dict[str, Path], tmp_path: Path) -> None:
    path, im_path = wide
    with pytest.raises(ConversionError, match=r"the imatrix entry of '\S+' has 1 x 256 values; the tensor needs 1 x 64"):
        quantize(converted["f32"], tmp_path / "x.gguf", mix="Q4_K_M", imatrix=im_path)
    with pytest.raises(ConversionError, match="is a GGUF of type"):
        quantize(path, tmp_path / "y.gguf", mix="Q4_K_M", imatrix=path)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    r = subprocess.run([sys.executable, "-m", "pydgemma.quantize", "imatrix", "-m", str(path), "-f", str(short), "-o",
                        str(tmp_path / "im.gguf")], capture_output=True, text=True)
    assert r.returncode == 1 and "fewer than one chunk of 512" in r.stderr and r.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]
