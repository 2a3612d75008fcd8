"""pydgemma-quantize drift: the metric functions on hand-computed cases, the reference loop against
dg_generate, teacher forcing (identical files drift by exactly 0), the reference cache, the gate
(a damaged quant fails the committed CI baseline, naming the metric), and the command's errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pydgemma
from pydgemma.generate import generate_ids
from pydgemma.quantize import drift_metrics as dm
from pydgemma.quantize.drift import (THRESHOLDS, DriftUsageError, check, free_running_summary, load_baseline,
                                     measure, teacher_forced_summary)
from pydgemma.quantize.drift_trace import ForcedStep, Workload, probe_lengths, run_canvases, sampler_for
from pydgemma.quantize.quantize import quantize

ROOT = Path(__file__).resolve().parent.parent
DEMO_Q8 = ROOT / "models" / "demo" / "sudoku4-q8_0.gguf"
DEMO_F32 = ROOT / ".ci" / "drift" / "sudoku4-f32.gguf"
BASELINE = ROOT / ".ci" / "drift_baseline.json"
LN2 = math.log(2.0)


def drift_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pydgemma.quantize", "drift", *args], capture_output=True, text=True,
                          timeout=300)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------------------------------------
# The metrics, by hand


def test_kl_of_a_hand_computed_case() -> None:
    p = np.log([[0.5, 0.25, 0.25]])
    q = np.log([[0.25, 0.5, 0.25]])
    # KL = 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) + 0.25 ln 1 = 0.25 ln 2; logits shift-invariant
    assert dm.kl_rows(p, q)[0] == pytest.approx(0.25 * LN2, rel=1e-12)
    assert dm.kl_rows(p + 7.0, q - 3.0)[0] == pytest.approx(0.25 * LN2, rel=1e-12)
    assert dm.kl_rows(q, p)[0] == pytest.approx(0.25 * LN2, rel=1e-12)  # symmetric here by construction
    # uniform vs (0.5, 0.25, 0.25): ln(1/3) - (ln 0.5 + 2 ln 0.25) / 3
    expected = math.log(1 / 3) - (math.log(0.5) + 2 * math.log(0.25)) / 3
    assert dm.kl_rows(np.full((1, 3), 2.0), p)[0] == pytest.approx(expected, rel=1e-12)
    # a token the reference never picks adds nothing; one the model never picks makes KL infinite
    with np.errstate(divide="ignore"):
        no_third, only_two = np.log([[0.5, 0.5, 0.0]]), np.log([[0.25, 0.25, 0.5]])
    assert dm.kl_rows(no_third, only_two)[0] == pytest.approx(LN2, rel=1e-12)
    assert dm.kl_rows(only_two, no_third)[0] == math.inf
    x = np.random.default_rng(0).normal(size=(40, 300)).astype(np.float32)  # several chunks of rows
    assert np.array_equal(dm.kl_rows(x, x), np.zeros(40))


def test_summary_percentiles_agreement_and_jaccard_by_hand() -> None:
    s = dm.summary([4.0, 1.0, 3.0, 2.0])
    assert s == {"mean": 2.5, "median": 2.5, "p99": pytest.approx(3.97), "max": 4.0, "n": 4}
    assert dm.summary([]) == {"mean": 0.0, "median": 0.0, "p99": 0.0, "max": 0.0, "n": 0}
    assert dm.agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    a = np.array([1, 1, 1, 0, 0], bool)
    b = np.array([0, 1, 1, 1, 0], bool)
    assert dm.jaccard(a, b) == 0.5  # {0,1,2} vs {1,2,3}: 2 shared of 4
    assert dm.jaccard(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert dm.position_buckets(24, 8) == [(i, i + 3) for i in range(0, 24, 3)]
    assert dm.position_buckets(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert dm.position_buckets(3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert dm.pct_change(2.0, 2.5) == 25.0 and dm.pct_change(0.0, 0.0) == 0.0


def test_teacher_forced_summary_by_hand() -> None:
    k = 0.25 * LN2
    forced = [  # canvas of 4 positions; two canvases, the second one takes a second step
        ForcedStep(0, 0, np.array([0.0, k, 0.0, 0.0]), np.array([1, 0, 1, 1], bool), 0.5, False),
        ForcedStep(0, 0, np.array([0.0, 0.0, 0.0, 3 * k]), np.array([1, 1, 1, 1], bool), 1.0, True),
        ForcedStep(0, 1, np.array([k, 0.0, 0.0, 0.0]), np.array([1, 1, 1, 1], bool), 1.0, True),
    ]
    s = teacher_forced_summary(forced, 4, 2)
    assert s["steps"] == 3
    assert s["kl"]["mean"] == pytest.approx(5 * k / 12) and s["kl"]["max"] == pytest.approx(3 * k)
    assert s["kl"]["median"] == 0.0 and s["kl"]["n"] == 12
    assert s["top1"] == pytest.approx(11 / 12)
    assert s["accept_jaccard"] == pytest.approx(2.5 / 3) and s["accept_sets_equal"] == pytest.approx(2 / 3)
    step0, step1 = s["per_step"]
    assert (step0["canvases"], step1["canvases"]) == (2, 1)
    assert step0["kl"]["mean"] == pytest.approx(4 * k / 8) and step0["top1"] == pytest.approx(7 / 8)
    assert step0["accept_jaccard"] == 0.75 and step1["kl"]["max"] == pytest.approx(k)
    first, second = s["per_position_bucket"]
    assert first["positions"] == [0, 1] and second["positions"] == [2, 3]
    assert first["kl"]["mean"] == pytest.approx(2 * k / 6) and first["top1"] == pytest.approx(5 / 6)
    assert second["kl"]["mean"] == pytest.approx(3 * k / 6) and second["top1"] == 1.0
    assert s["per_position_mean_kl"] == pytest.approx([k / 3, k / 3, 0.0, k])


def test_free_running_summary_by_hand() -> None:
    eos = 9
    ref = [[(np.array([1, 2, eos, 0]), 2)], [(np.array([1, 2, 3, 4]), 2), (np.array([5, eos, 0, 0]), 4)]]
    mod = [[(np.array([1, 2, eos, 7]), 3)], [(np.array([1, 0, 3, 4]), 2), (np.array([5, 6, eos, 0]), 5)]]
    s = free_running_summary(ref, mod, [eos])
    assert s["canvases"] == 3
    assert s["token_agreement"] == pytest.approx((0.75 + 0.75 + 0.5) / 3)
    assert s["canvases_identical"] == 0.0
    assert s["steps"]["reference"] == {"mean": pytest.approx(8 / 3), "median": 2.0, "max": 4,
                                       "histogram": {"2": 2, "4": 1}}
    assert s["steps"]["model"]["histogram"] == {"2": 1, "3": 1, "5": 1}
    assert s["steps_increase_pct"] == pytest.approx(100 * (10 / 3 - 8 / 3) / (8 / 3))
    # tokens before the first end token, over the forwards spent until it: (2 + 4 + 1) / (2 + 2 + 4)
    assert s["tokens_per_forward"]["reference"] == pytest.approx(7 / 8)
    assert s["tokens_per_forward"]["model"] == pytest.approx((2 + 4 + 2) / (3 + 2 + 5))


def test_checks_and_the_baseline_file(tmp_path: Path) -> None:
    report = {"teacher_forced": {"kl": {"mean": 0.02, "p99": 0.1}, "top1": 0.97}, "task": None}
    checks = check(report, {"max_mean_kl": 0.01, "min_top1": 0.95})
    assert [(c.name, c.ok) for c in checks] == [("max_mean_kl", False), ("min_top1", True)]
    assert checks[0].describe() == "max_mean_kl: mean KL 0.02 > 0.01"
    assert checks[1].describe() == "min_top1: top-1 agreement 97.00 % >= 95.00 %"
    with pytest.raises(DriftUsageError, match="min_task_accuracy, which needs the demo task"):
        check(report, {"min_task_accuracy": 0.9})
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"note": "why", "max_mean_kl": 0.01}))
    assert load_baseline(flat) == {"max_mean_kl": 0.01}
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({"models": {"Q8_0": {"min_top1": 0.9}, "NVFP4": {"min_top1": 0.8}}}))
    assert load_baseline(keyed, "NVFP4") == {"min_top1": 0.8}
    with pytest.raises(DriftUsageError, match="pick one with --baseline-key"):
        load_baseline(keyed)
    with pytest.raises(DriftUsageError, match="has no 'Q4_K_M'"):
        load_baseline(keyed, "Q4_K_M")
    flat.write_text(json.dumps({"max_mean_kl": 0.01, "max_meen_kl": 1}))
    with pytest.raises(DriftUsageError, match="unknown threshold 'max_meen_kl'"):
        load_baseline(flat)
    flat.write_text(json.dumps({"min_top1": "high"}))
    with pytest.raises(DriftUsageError, match="must be a number"):
        load_baseline(flat)


def test_probe_lengths() -> None:
    assert probe_lengths(40, 4) == [10, 20, 30, 40]
    assert probe_lengths(3, 8) == [1, 2, 3]
    assert probe_lengths(10, 0) == []


# ------------------------------------------------------------------------------------------------
# The trajectories on real models


@pytest.fixture(scope="module")
def demo() -> pydgemma.Model:
    with pydgemma.Model(DEMO_Q8) as m:
        yield m


def test_the_reference_loop_is_dg_generate(demo: pydgemma.Model, converted: dict[str, Path]) -> None:
    """run_canvases (the recorded reference trajectory) equals the native generation loop, on the
    demo model and, with two canvases and a commit between them, on the tiny converted model."""
    for path, n_canvases in ((DEMO_Q8, 1), (converted["f32"], 2)):
        with pydgemma.Model(path) as m:
            prompt = m.chat_prompt_ids([{"role": "user", "content": "Solve: 1.3./.4.2/2.4./.1.4"}])
            C = m.hparams["canvas_length"]
            wl = Workload([prompt], [5], n_canvases, {"max_steps": 8}, 0)
            gen = generate_ids(m.context(n_ctx=len(prompt) + n_canvases * C), prompt, max_new_tokens=n_canvases * C,
                               sampler={"seed": 5, "max_steps": 8}, eos_ids=[])
            ctx = m.context(n_ctx=len(prompt) + n_canvases * C)
            steps = list(run_canvases(ctx, sampler_for(m, wl, 5), prompt, n_canvases))
            finals = [s for s in steps if s.stop]
            assert np.concatenate([s.argmax for s in finals]).tolist() == gen.tokens
            assert [s.step + 1 for s in finals] == gen.steps
            assert len(steps) == gen.n_forwards


@pytest.mark.slow
def test_identical_files_drift_by_exactly_zero(converted: dict[str, Path]) -> None:
    """The same file as reference and model: KL exactly 0 everywhere, every agreement 100 %.
    Two canvases per prompt, so teacher forcing also goes through a commit."""
    path = converted["f32"]
    r = measure(path, ref_path=path, canvases=6, canvases_per_prompt=2, max_steps=6, probe_positions=3)
    tf, fr, ps = r["teacher_forced"], r["free_running"], r["prompt_side"]
    assert r["task"] is None and r["settings"]["prompts"] == 3
    assert tf["steps"] >= 6
    assert tf["kl"] == {"mean": 0.0, "median": 0.0, "p99": 0.0, "max": 0.0, "n": tf["steps"] * 16}
    assert tf["top1"] == tf["accept_jaccard"] == tf["accept_sets_equal"] == 1.0
    assert all(s["kl"]["max"] == 0.0 and s["top1"] == 1.0 for s in tf["per_step"])
    assert all(b["kl"]["max"] == 0.0 for b in tf["per_position_bucket"])
    assert fr["token_agreement"] == fr["canvases_identical"] == 1.0 and fr["steps_increase_pct"] == 0.0
    assert fr["steps"]["reference"] == fr["steps"]["model"]
    assert fr["tokens_per_forward"]["reference"] == fr["tokens_per_forward"]["model"] > 0
    assert ps["kl"]["max"] == 0.0 and ps["top1"] == 1.0 and ps["positions"] == 9


def test_a_quantized_tiny_model_drifts(converted: dict[str, Path]) -> None:
    r = measure(converted["q8_0"], ref_path=converted["f32"], canvases=4, max_steps=4, probe_positions=2)
    tf = r["teacher_forced"]
    assert 0 < tf["kl"]["median"] <= tf["kl"]["p99"] <= tf["kl"]["max"]
    assert tf["kl"]["mean"] < 0.05 and tf["top1"] > 0.5
    assert r["model"]["weight_types"]["q8_0"] > 0 and r["reference"]["weight_types"] == {"f32": r["reference"][
        "weight_types"]["f32"]}
    assert r["prompt_side"]["kl"]["mean"] > 0


def test_demo_task_and_the_reference_cache(tmp_path: Path) -> None:
    """The demo model gets the Sudoku task; a saved reference replays to the same report without
    the reference model, and a cache made with other settings is refused."""
    cache = tmp_path / "ref.npz"
    live = measure(DEMO_Q8, ref_path=DEMO_Q8, canvases=6, save_ref=cache)
    assert live["task"] == {"name": "sudoku4", "puzzles": 6, "reference_accuracy": live["task"]["reference_accuracy"],
                            "model_accuracy": live["task"]["reference_accuracy"], "accuracy_drop": 0.0}
    assert live["task"]["reference_accuracy"] >= 5 / 6  # the demo solves its held-out puzzles
    assert live["settings"]["sampler"]["max_steps"] == 16 and live["teacher_forced"]["kl"]["max"] == 0.0
    replay = measure(DEMO_Q8, ref_cache=cache)
    assert replay["reference"]["from"] == "cache" and live["reference"]["from"] == "model"
    for key in ("settings", "teacher_forced", "free_running", "prompt_side", "task"):
        assert replay[key] == live[key], key
    with pytest.raises(DriftUsageError, match="made with --seed 0, not 3"):
        measure(DEMO_Q8, ref_cache=cache, seed=3)
    with pytest.raises(DriftUsageError, match="made with --canvases 6, not 8"):
        measure(DEMO_Q8, ref_cache=cache, canvases=8)
    assert measure(DEMO_Q8, ref_cache=cache, seed=0, canvases=6)["task"] == live["task"]


# ------------------------------------------------------------------------------------------------
# The gate, on the CI's own model and baseline


def damage(src: Path, dst: Path, tensor: str) -> Path:
    """A copy of a Q8_0 file with one tensor's int8 values perturbed (its block scales kept)."""
    with pydgemma.Model(src) as m:
        info = m.tensors[tensor]
    assert info.type == "q8_0"
    data = bytearray(src.read_bytes())
    blocks = np.frombuffer(bytes(data[info.offset:info.offset + info.n_bytes]), np.uint8).reshape(-1, 34).copy()
    q = blocks[:, 2:].view(np.int8).astype(np.int16)
    noise = np.random.default_rng(0).integers(-40, 41, size=q.shape)
    blocks[:, 2:] = np.clip(q + noise, -127, 127).astype(np.int8).view(np.uint8)
    data[info.offset:info.offset + info.n_bytes] = blocks.tobytes()
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="module")
def ci_q8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not DEMO_F32.exists():
        pytest.skip(f"{DEMO_F32} is missing (not in an sdist)")
    out = tmp_path_factory.mktemp("drift") / "sudoku4-q8_0.gguf"
    return quantize(DEMO_F32, out, mix="Q8_0").path


def test_the_ci_reference_is_the_demo_models_f32(ci_q8: Path) -> None:
    """Quantizing .ci/drift/sudoku4-f32.gguf to Q8_0 gives the shipped demo model byte for byte."""
    assert ci_q8.read_bytes() == DEMO_Q8.read_bytes()


@pytest.mark.slow
def test_a_damaged_quant_fails_the_ci_gate(ci_q8: Path, tmp_path: Path) -> None:
    """The CI's Q8_0 passes its bounds; with one tensor's values perturbed it fails them, by name."""
    broken = damage(ci_q8, tmp_path / "broken.gguf", "blk.0.attn_q.weight")
    gate = ["--canvases", "64", "--baseline", str(BASELINE), "--baseline-key", "Q8_0"]  # as .ci/drift_gate.sh
    ref = tmp_path / "ref.npz"
    good = drift_cli("--ref", str(DEMO_F32), "--save-ref", str(ref), "-m", str(ci_q8), "-o", str(tmp_path / "good.json"),
                     *gate)
    assert good.returncode == 0, good.stdout + good.stderr
    assert json.loads((tmp_path / "good.json").read_text())["gate"]["passed"] is True
    bad = drift_cli("--ref-cache", str(ref), "-m", str(broken), "-o", str(tmp_path / "bad.json"), "--markdown",
                    str(tmp_path / "bad.md"), *gate)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    message = one_line_error(bad)
    assert message.startswith("error: drift gate FAILED: max_mean_kl: mean KL "), message
    report = json.loads((tmp_path / "bad.json").read_text())
    failed = {c["name"] for c in report["gate"]["checks"] if not c["ok"]}
    assert "max_mean_kl" in failed and all(name in message for name in failed)
    assert "**drift gate FAILED: max_mean_kl" in (tmp_path / "bad.md").read_text()
    assert "FAIL" in bad.stdout


def test_the_ci_baseline_is_well_formed() -> None:
    data = json.loads(BASELINE.read_text())
    assert set(data["models"]) == {"Q8_0", "Q4_K_M", "NVFP4"}
    for key in data["models"]:
        thresholds = load_baseline(BASELINE, key)
        assert {"max_mean_kl", "min_top1", "min_accept_jaccard", "max_steps_increase_pct"} <= set(thresholds)
        assert set(thresholds) <= set(THRESHOLDS)


# ------------------------------------------------------------------------------------------------
# The command


def test_cli_report_and_summaries(tmp_path: Path) -> None:
    """The same file, run as the reference runs (F32 KV entries, F32 self-conditioning table): no drift."""
    r = drift_cli("--ref", str(DEMO_Q8), "-m", str(DEMO_Q8), "-o", str(tmp_path / "r.json"), "--canvases", "4",
                  "--markdown", str(tmp_path / "r.md"), "--kv-type", "f32", "--sc-table", "f32")
    assert r.returncode == 0, r.stderr
    assert "top-1 agreement" in r.stdout and "no baseline: nothing checked" in r.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["canvases"] == 4 and "gate" not in report
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("### Quantization drift: sudoku4-q8_0.gguf vs sudoku4-q8_0.gguf: 4 canvases")
    assert "| top-1 agreement | 100.00 % |" in md and "| 0-2 | 0 | 0 | 0 | 100.00 % |" in md


@pytest.mark.slow
def test_runtime_memory_choices_are_measured(tmp_path: Path) -> None:
    """The same file with the runtime's memory choices (F16 or Q8_0 KV entries, the default Q8_0
    table) against the exact reference: small but measurable drift, Q8_0 entries more than F16."""
    kl = {}
    for kv in ("f16", "q8_0"):
        r = drift_cli("--ref", str(DEMO_Q8), "-m", str(DEMO_Q8), "-o", str(tmp_path / f"{kv}.json"), "--canvases", "4",
                      "--kv-type", kv, "--sc-table", "auto", "-q")
        assert r.returncode == 0, r.stderr
        report = json.loads((tmp_path / f"{kv}.json").read_text())
        assert report["settings"]["kv_type"] == kv and report["settings"]["sc_table"] == "auto"
        tf = report["teacher_forced"]
        kl[kv] = tf["kl"]["mean"]
        assert 0 < kl[kv] < 1e-2 and tf["top1"] >= 0.97
    assert kl["q8_0"] > kl["f16"]


@pytest.mark.slow
def test_cli_plot(tmp_path: Path) -> None:  # matplotlib comes with the test extra
    r = drift_cli("--ref", str(DEMO_Q8), "-m", str(DEMO_Q8), "-o", str(tmp_path / "r.json"), "--canvases", "2",
                  "--plot", str(tmp_path / "kl.png"), "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and r.stdout == ""


def test_plot_without_matplotlib_names_the_extra(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['matplotlib'] = None; sys.argv = ['pydgemma-quantize'] + sys.argv[1:]; "
            "from pydgemma.quantize.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", code, "drift", "--ref", str(DEMO_Q8), "-m", str(DEMO_Q8), "-o",
                        str(tmp_path / "r.json"), "--plot", str(tmp_path / "kl.png")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "--plot needs matplotlib: pip install 'pydgemma[plot]'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("args, message", [
    ((), "give the reference as --ref REF.gguf or --ref-cache REF.npz"),
    (("--ref", "DEMO", "--canvases", "0"), "--canvases must be at least 1"),
    (("--ref", "DEMO", "--canvases", "3", "--canvases-per-prompt", "2"), "must be a multiple of --canvases-per-prompt"),
    (("--ref", "DEMO", "--task", "chess"), "--task must be auto, sudoku4 or none"),
    (("--ref", "DEMO", "--position-buckets", "0"), "--position-buckets must be at least 1"),
    (("--ref", "DEMO", "--out", "/nonexistent/dir/r.json"), "--out: the folder of '/nonexistent/dir/r.json' does not exist"),
    (("--ref", "DEMO", "--baseline-key", "Q8_0"), "--baseline-key needs --baseline"),
    (("--ref", "nowhere.gguf"), "--ref: no such file 'nowhere.gguf'"),
    (("--ref-cache", "DEMO"), "is not a drift reference cache"),
    (("--ref", "DEMO", "--ref-cache", "DEMO"), "(one of them)"),
])
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    args = tuple(str(DEMO_Q8) if a == "DEMO" else a for a in args)
    r = drift_cli("-m", str(DEMO_Q8), "-o", str(tmp_path / "r.json"), *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    assert not (tmp_path / "r.json").exists()


def test_a_bad_model_file_is_a_one_line_failure(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    r = drift_cli("--ref", str(DEMO_Q8), "-m", str(bad), "-o", str(tmp_path / "r.json"))
    assert r.returncode == 1
    assert one_line_error(r).startswith("error: not a GGUF file") and len(r.stderr.strip().splitlines()) == 1


def test_help_teaches() -> None:
    r = drift_cli("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "teacher-forced" in text and "pydgemma-quantize drift --ref dg-f32.gguf -m dg-Q4_K_M.gguf -o drift.json" in text
