"""Models from the Hugging Face Hub, against a loopback hub (tests/hub_server.py) that answers the
endpoints huggingface_hub calls: tag matching, download into the standard cache and cache hits,
offline mode, resumed downloads (within a run and across runs), tokens, revisions, split models,
the CLI (pull, list, run, info) and converting a checkpoint by its repo id."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

import pydgemma
from pydgemma import hub
from pydgemma.hub import GgufEntry, HubError, HubRef, choose, gguf_entries, parse_ref

from hub_server import LoopbackHub
from test_convert_errors import same_model

REPO = "pydgemma-test/tiny-diffusiongemma-GGUF"


# --- references and tags (no server) --------------------------------------------------------------

def test_parse_ref() -> None:
    assert parse_ref("unsloth/diffusiongemma-26B-A4B-it-GGUF:Q4_K_M") == HubRef(
        "unsloth/diffusiongemma-26B-A4B-it-GGUF", "Q4_K_M", None)
    assert parse_ref("org/repo") == HubRef("org/repo")
    assert parse_ref("org/repo:q8_0@dev") == HubRef("org/repo", "q8_0", "dev")
    assert parse_ref("org/repo@0123abc:BF16") == HubRef("org/repo", "BF16", "0123abc")
    for path in ("model.gguf", "models/model.gguf", "./org/repo", "/abs/org", "~/x/y", "one", "a/b/c", "a--b/c"):
        assert parse_ref(path) is None, path
    with pytest.raises(HubError, match="names two revisions"):
        parse_ref("org/repo@a:Q8_0@b")


def entries(*names: str) -> list[GgufEntry]:
    return gguf_entries([(n, 1000) for n in names])


def test_tag_matching() -> None:
    es = entries("m-Q4_K_M.gguf", "m-UD-Q4_K_M.gguf", "m-Q4_K_S.gguf", "m-Q8_0.gguf", "mmproj-F16.gguf",
                 "BF16/m-BF16-00001-of-00002.gguf", "BF16/m-BF16-00002-of-00002.gguf", "imatrix.gguf", "README.md")
    assert [e.name for e in es] == ["BF16/m-BF16-00001-of-00002.gguf", "m-Q4_K_M.gguf", "m-Q4_K_S.gguf",
                                    "m-Q8_0.gguf", "m-UD-Q4_K_M.gguf"]  # projector, imatrix, README left out
    assert choose(es, "q8_0", REPO).name == "m-Q8_0.gguf"  # case-insensitive
    assert choose(es, "Q4_K_M", REPO).name == "m-Q4_K_M.gguf"  # the exact type beats UD-Q4_K_M
    assert choose(es, "ud-q4_k_m", REPO).name == "m-UD-Q4_K_M.gguf"
    split = choose(es, "BF16", REPO)
    assert split.files == ("BF16/m-BF16-00001-of-00002.gguf", "BF16/m-BF16-00002-of-00002.gguf")
    assert split.size == 2000 and split.quant == "BF16"
    assert choose(es, None, REPO).name == "m-Q4_K_M.gguf"  # no tag: Q4_K_M, as llama.cpp's -hf
    assert choose(entries("only-Q8_0.gguf"), None, REPO).name == "only-Q8_0.gguf"
    with pytest.raises(HubError) as e:
        choose(es, "Q4_K", REPO)  # a whole word: Q4_K is neither Q4_K_M nor Q4_K_S
    assert str(e.value) == (f"no GGUF file of {REPO} matches 'Q4_K'. It has: BF16/m-BF16-00001-of-00002.gguf "
                            "(BF16, 2000 bytes, 2 parts); m-Q4_K_M.gguf (Q4_K_M, 1000 bytes); m-Q4_K_S.gguf (Q4_K_S, "
                            "1000 bytes); m-Q8_0.gguf (Q8_0, 1000 bytes); m-UD-Q4_K_M.gguf (UD-Q4_K_M, 1000 bytes)")
    with pytest.raises(HubError) as e:
        choose(entries("a/m-Q4_K_M.gguf", "b/m-Q4_K_M.gguf", "m-Q8_0.gguf"), "q4_k_m", REPO)
    assert str(e.value) == (f"'q4_k_m' matches several GGUF files of {REPO}: a/m-Q4_K_M.gguf (Q4_K_M, 1000 bytes); "
                            "b/m-Q4_K_M.gguf (Q4_K_M, 1000 bytes); give a longer tag")
    with pytest.raises(HubError, match=r"has several GGUF models; name one with :TAG"):
        choose(entries("m-Q8_0.gguf", "m-F16.gguf"), None, REPO)


# --- the loopback hub -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loopback():
    with LoopbackHub() as h:
        yield h


@pytest.fixture
def env(loopback: LoopbackHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh cache, the loopback endpoint, online; the same as a subprocess environment."""
    cache = tmp_path / "hf-cache"
    values = {"HF_ENDPOINT": loopback.url, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HOME"):
        monkeypatch.delenv(k, raising=False)
    loopback.state.requests.clear()
    return {**os.environ, **values}


@pytest.fixture(scope="module")
def published(loopback: LoopbackHub, converted: dict[str, Path]) -> dict[str, bytes]:
    """The tiny model published as a GGUF repo: F32 and Q8_0 files, a projector and a README."""
    files = {"tiny-diffusiongemma-F32.gguf": converted["f32"].read_bytes(),
             "tiny-diffusiongemma-Q8_0.gguf": converted["q8_0"].read_bytes(),
             "mmproj-tiny-F16.gguf": b"not a text model", "README.md": b"# tiny\n"}
    loopback.add_repo(REPO, files, branches={"dev": {"tiny-diffusiongemma-Q8_0.gguf": converted["f16"].read_bytes()}})
    return files


def logits(model: pydgemma.Model) -> np.ndarray:
    ctx = model.context(n_ctx=256, kv_type="f32")
    rng = np.random.default_rng(0)
    ctx.prefill(rng.integers(0, model.hparams["n_vocab"], 20))
    return ctx.denoise(rng.integers(0, model.hparams["n_vocab"], model.hparams["canvas_length"]))


def cdn_gets(loopback: LoopbackHub) -> list:
    return [r for r in loopback.state.requests if r.method == "GET" and r.path.startswith("/cdn/")]


def test_download_then_cache_hit(env, loopback: LoopbackHub, published, converted) -> None:
    with pydgemma.Model(f"{REPO}:q8_0") as m:
        path = Path(m.path)
        assert np.array_equal(logits(m), logits(pydgemma.Model(converted["q8_0"])))
    # the standard cache layout: snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/main
    storage = Path(env["HF_HUB_CACHE"]) / ("models--" + REPO.replace("/", "--"))
    commit = (storage / "refs" / "main").read_text()
    assert path == storage / "snapshots" / commit / "tiny-diffusiongemma-Q8_0.gguf"
    assert path.is_symlink() and Path(os.path.realpath(path)).parent == storage / "blobs"
    assert Path(os.path.realpath(path)).name == hashlib.sha256(published["tiny-diffusiongemma-Q8_0.gguf"]).hexdigest()
    assert len(cdn_gets(loopback)) == 1
    # huggingface_hub itself finds the file there
    import huggingface_hub

    assert huggingface_hub.hf_hub_download(REPO, "tiny-diffusiongemma-Q8_0.gguf", cache_dir=env["HF_HUB_CACHE"],
                                           local_files_only=True) == str(path)
    loopback.state.requests.clear()
    assert hub.resolve_model(f"{REPO}:Q8_0") == str(path)
    assert cdn_gets(loopback) == [] and not any(r.method == "HEAD" for r in loopback.state.requests)


def test_offline(env, loopback: LoopbackHub, published, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(HubError) as e:
        hub.resolve_model(f"{REPO}:Q8_0", offline=True)
    assert str(e.value) == (f"offline: {REPO} is not in the Hugging Face cache ({env['HF_HUB_CACHE']}); "
                            f"download it first with 'pydgemma pull {REPO}:Q8_0' while online")
    path = hub.resolve_model(f"{REPO}:Q8_0")
    loopback.state.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve_model(f"{REPO}:Q8_0") == path
    assert pydgemma.Model(f"{REPO}:Q8_0").path == path
    with pytest.raises(HubError) as e:
        hub.resolve_model(f"{REPO}:F32")
    assert str(e.value) == (f"offline: no GGUF file of the cached {REPO} matches 'F32'. "
                            "It has: tiny-diffusiongemma-Q8_0.gguf (Q8_0, 0.5 MB)")
    with pytest.raises(HubError, match=r"^offline: revision 'dev' of .* is not in the cache"):
        hub.resolve_model(f"{REPO}:Q8_0@dev")
    assert loopback.state.requests == []  # offline never asks


def test_unreachable_endpoint_falls_back_to_the_cache(env, published, monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    path = hub.resolve_model(f"{REPO}:Q8_0")
    from hub_server import free_port_url  # nothing listens there

    monkeypatch.setenv("HF_ENDPOINT", free_port_url())
    assert hub.resolve_model(f"{REPO}:Q8_0") == path
    assert "using the cached" in capfd.readouterr().err
    with pytest.raises(HubError, match=r"^cannot reach .*, and .*:F32 is not in the cache"):
        hub.resolve_model(f"{REPO}:F32")


def test_errors(env, published) -> None:
    with pytest.raises(HubError, match=rf"^pydgemma-test/nothing not found on {env['HF_ENDPOINT']} \(if it is private"):
        hub.resolve_model("pydgemma-test/nothing:Q8_0")
    with pytest.raises(HubError, match=rf"^{REPO}@nope: no such revision$"):
        hub.resolve_model(f"{REPO}:Q8_0@nope")
    with pytest.raises(HubError, match=r"several GGUF models; name one with :TAG"):
        hub.resolve_model(REPO)  # F32 and Q8_0, no Q4_K_M


def test_revision(env, published, converted) -> None:
    path = hub.resolve_model(f"{REPO}:Q8_0@dev")
    assert Path(path).read_bytes() == converted["f16"].read_bytes()
    storage = Path(env["HF_HUB_CACHE"]) / ("models--" + REPO.replace("/", "--"))
    assert (storage / "refs" / "dev").read_text() in path


def test_token_for_a_private_repo(env, loopback: LoopbackHub, converted, monkeypatch: pytest.MonkeyPatch) -> None:
    loopback.add_repo("pydgemma-test/private-GGUF", {"p-Q8_0.gguf": converted["q8_0"].read_bytes()},
                      private_token="hf_secret")
    with pytest.raises(HubError, match="not found on .*set HF_TOKEN"):
        hub.resolve_model("pydgemma-test/private-GGUF")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert Path(hub.resolve_model("pydgemma-test/private-GGUF")).read_bytes() == converted["q8_0"].read_bytes()
    assert any(r.authorization == "Bearer hf_secret" for r in loopback.state.requests)


def test_interrupted_download_resumes_in_the_same_run(env, loopback: LoopbackHub, published) -> None:
    data = published["tiny-diffusiongemma-F32.gguf"]
    sha = hashlib.sha256(data).hexdigest()
    loopback.state.drop_after[sha] = len(data) // 3
    path = hub.resolve_model(f"{REPO}:F32")
    assert Path(path).read_bytes() == data
    gets = cdn_gets(loopback)
    assert len(gets) == 2 and gets[0].range is None
    start = int(gets[1].range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= len(data) // 3


def test_expired_cdn_link_is_asked_for_again(env, loopback: LoopbackHub, published) -> None:
    data = published["tiny-diffusiongemma-F32.gguf"]
    sha = hashlib.sha256(data).hexdigest()
    loopback.state.refuse_next[sha] = 403
    assert Path(hub.resolve_model(f"{REPO}:F32")).read_bytes() == data
    assert len(cdn_gets(loopback)) == 2
    resolves = [r for r in loopback.state.requests if r.method == "HEAD" and "/resolve/" in r.path]
    assert len(resolves) == 2  # the metadata, then a fresh link for the retry


@pytest.mark.slow
def test_interrupted_download_resumes_across_runs(env, loopback: LoopbackHub, tmp_path: Path) -> None:
    """`pydgemma pull` killed mid-download; the next one continues from the partial file."""
    data = np.random.default_rng(7).bytes(3 << 20)
    loopback.add_repo("pydgemma-test/big-GGUF", {"big-Q8_0.gguf": data})
    sha = hashlib.sha256(data).hexdigest()
    partial = Path(env["HF_HUB_CACHE"]) / "models--pydgemma-test--big-GGUF" / "blobs" / f"{sha}.incomplete"
    loopback.state.rate = 1 << 20  # 1 MiB/s: three seconds in all
    cmd = [sys.executable, "-m", "pydgemma", "pull", "pydgemma-test/big-GGUF:Q8_0", "-q"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size >= 1 << 20):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode() if proc.poll() else "slow"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and err.decode().strip() == "interrupted"
    finally:
        proc.kill()
        loopback.state.rate = None
    kept = partial.stat().st_size
    assert (1 << 20) <= kept < len(data)
    loopback.state.requests.clear()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).read_bytes() == data and not partial.exists()
    assert [r.range for r in cdn_gets(loopback)] == [f"bytes={kept}-"]


def test_corrupt_partial_file_is_caught_by_the_hash(env, loopback: LoopbackHub) -> None:
    data = np.random.default_rng(8).bytes(1 << 20)
    loopback.add_repo("pydgemma-test/corrupt-GGUF", {"c-Q8_0.gguf": data})
    sha = hashlib.sha256(data).hexdigest()
    blobs = Path(env["HF_HUB_CACHE"]) / "models--pydgemma-test--corrupt-GGUF" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{sha}.incomplete").write_bytes(b"\0" * 1000)  # not the file's first bytes
    with pytest.raises(HubError, match=r"does not match its hash .* the partial file was removed"):
        hub.resolve_model("pydgemma-test/corrupt-GGUF")
    assert Path(hub.resolve_model("pydgemma-test/corrupt-GGUF")).read_bytes() == data


# --- split models -------------------------------------------------------------------------------

SPLIT_REPO = "pydgemma-test/tiny-split-GGUF"


@pytest.fixture(scope="module")
def published_split(loopback: LoopbackHub, hf_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The tiny model's Q8_0 split in parts under a Q8_0/ folder, as large published models are."""
    from pydgemma.quantize import convert

    parts = convert(hf_tiny, tmp_path_factory.mktemp("split") / "tiny-Q8_0.gguf", out_type="q8_0",
                    split_max_size=100_000).parts
    assert len(parts) >= 3
    loopback.add_repo(SPLIT_REPO, {f"Q8_0/{p.name}": p for p in parts} | {"README.md": b"split"})
    return parts


def test_split_model_from_the_hub(env, loopback: LoopbackHub, published_split, converted) -> None:
    with pydgemma.Model(f"{SPLIT_REPO}:q8_0") as m:
        assert Path(m.path).name == published_split[0].name and Path(m.path).parent.name == "Q8_0"
        assert np.array_equal(logits(m), logits(pydgemma.Model(converted["q8_0"])))  # bit-identical
    assert len(cdn_gets(loopback)) == len(published_split)  # every part, once
    # offline, every part must be there: the missing one is named
    snapshot = Path(m.path).parent
    (snapshot / published_split[1].name).unlink()
    with pytest.raises(HubError) as e:
        hub.resolve_model(f"{SPLIT_REPO}:Q8_0", offline=True)
    assert str(e.value) == (f"offline: {SPLIT_REPO}'s Q8_0/{published_split[0].name} is split into "
                            f"{len(published_split)} parts and the cache lacks Q8_0/{published_split[1].name}; "
                            f"run 'pydgemma pull {SPLIT_REPO}:Q8_0' while online")
    loopback.state.requests.clear()
    assert hub.resolve_model(f"{SPLIT_REPO}:Q8_0") == m.path  # online: its blob is still there, relinked
    assert cdn_gets(loopback) == [] and (snapshot / published_split[1].name).exists()
    blob = Path(os.path.realpath(snapshot / published_split[2].name))
    (snapshot / published_split[2].name).unlink()
    blob.unlink()
    assert hub.resolve_model(f"{SPLIT_REPO}:Q8_0") == m.path  # only the missing part is downloaded
    assert [r.path for r in cdn_gets(loopback)] == [f"/cdn/{blob.name}"]
    listed = {r.file: r for r in hub.cached_models()}
    assert listed[f"Q8_0/{published_split[0].name}"].parts == len(published_split)
    assert listed[f"Q8_0/{published_split[0].name}"].size == sum(p.stat().st_size for p in published_split)
    info = cli({**env, "COLUMNS": "200"}, "info", "-m", f"{SPLIT_REPO}:Q8_0", "--offline")
    assert info.returncode == 0, info.stderr
    assert f"in {len(published_split)} parts (gguf-split)" in info.stdout


# --- the command line -------------------------------------------------------------------------------

def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pydgemma", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_cli_pull_list_run_info(env, published, converted) -> None:
    out = cli(env, "pull", f"{REPO}:Q8_0", "-q")
    assert out.returncode == 0, out.stderr
    path = out.stdout.strip()
    assert Path(path).read_bytes() == published["tiny-diffusiongemma-Q8_0.gguf"]

    listed = cli(env, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["repo"], r["file"], r["type"], r["size"], r["complete"], r["revisions"]) for r in rows] == [
        (REPO, "tiny-diffusiongemma-Q8_0.gguf", "Q8_0", len(published["tiny-diffusiongemma-Q8_0.gguf"]), True, ["main"])]
    table = cli({**env, "COLUMNS": "200"}, "list").stdout.splitlines()
    assert table[0].rstrip() == f"DiffusionGemma models in {env['HF_HUB_CACHE']}"
    assert table[4].split() == ["│", f"{REPO}:Q8_0", "│", "Q8_0", "│", "453.69", "KiB", "│",
                                "tiny-diffusiongemma-Q8_0.gguf", "│", "main", "│"]

    offline = {**env, "HF_HUB_OFFLINE": "1"}
    run = cli(offline, "run", "-m", f"{REPO}:Q8_0", "-p", "hello", "--seed", "1", "--json", "-n", "8")
    local = cli(offline, "run", "-m", str(converted["q8_0"]), "-p", "hello", "--seed", "1", "--json", "-n", "8")
    assert run.returncode == 0 and local.returncode == 0, run.stderr + local.stderr
    assert json.loads(run.stdout)["tokens"] == json.loads(local.stdout)["tokens"]

    info = cli(env, "info", "-m", f"{REPO}:F32", "--offline", "--json")
    assert info.returncode == 1 and info.stdout == ""
    assert info.stderr == (f"error: offline: no GGUF file of the cached {REPO} matches 'F32'. It has: "
                           "tiny-diffusiongemma-Q8_0.gguf (Q8_0, 0.5 MB)\n")
    info = cli(env, "info", "-m", f"{REPO}:F32", "--json")  # online: downloads it
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["path"].endswith("tiny-diffusiongemma-F32.gguf")

    bad = cli(env, "pull", "not-a-repo")
    assert bad.returncode == 1 and bad.stderr == "error: 'not-a-repo' is not a Hub reference (org/repo[:QUANT][@revision])\n"
    missing = cli(env, "run", "-m", "pydgemma-test/absent:Q8_0", "-p", "hi")
    assert missing.returncode == 1 and missing.stderr.startswith("error: pydgemma-test/absent not found on ")
    assert "Traceback" not in missing.stderr


def test_list_without_models(env) -> None:
    out = cli(env, "list")
    assert out.returncode == 0 and "no DiffusionGemma models in the Hugging Face cache" in out.stdout
    assert json.loads(cli(env, "list", "--json").stdout) == []


# --- a checkpoint by its repo id ------------------------------------------------------------------

def test_convert_a_checkpoint_from_the_hub(env, loopback: LoopbackHub, hf_tiny: Path, converted, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from pydgemma.quantize import convert
    from pydgemma.quantize.convert import ConversionError

    files = {p.name: p.read_bytes() for p in hf_tiny.iterdir() if p.is_file()}
    loopback.add_repo("pydgemma-test/tiny-diffusiongemma", {**files, "extra/unused.bin": b"x" * 100})
    out = convert("pydgemma-test/tiny-diffusiongemma", tmp_path / "o.gguf", out_type="f32").path
    assert same_model(out, converted["f32"])
    assert gguf.GGUFReader(out).fields["general.name"].contents() == "tiny-diffusiongemma"  # the repo's name
    snapshot = Path(hub.fetch_checkpoint(HubRef("pydgemma-test/tiny-diffusiongemma"), offline=True))
    # only what the converter reads (not the builder's tiny_spec.json, nor extra/)
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(set(files) - {"tiny_spec.json"})
    assert "tiny_spec.json" in files
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = convert("pydgemma-test/tiny-diffusiongemma", tmp_path / "p.gguf", out_type="f32").path
    assert again.read_bytes() == out.read_bytes()
    with pytest.raises(ConversionError, match=r"^offline: pydgemma-test/other is not in the Hugging Face cache"):
        convert("pydgemma-test/other", tmp_path / "q.gguf")


@pytest.mark.slow
def test_quantize_and_drift_take_hub_references(env, published, converted, tmp_path: Path) -> None:
    from pydgemma.quantize.quantize import quantize

    from_hub = quantize(f"{REPO}:F32", tmp_path / "hub-q8.gguf", mix="Q8_0").path
    local = quantize(converted["f32"], tmp_path / "local-q8.gguf", mix="Q8_0").path
    assert from_hub.read_bytes() == local.read_bytes()
    r = subprocess.run([sys.executable, "-m", "pydgemma.quantize", "drift", "--ref", f"{REPO}:F32", "-m", f"{REPO}:Q8_0",
                        "-o", str(tmp_path / "d.json"), "--canvases", "2", "-q"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["model"]["path"].endswith("tiny-diffusiongemma-Q8_0.gguf")
    bad = subprocess.run([sys.executable, "-m", "pydgemma.quantize", "drift", "--ref", f"{REPO}:F32", "-m",
                          f"{REPO}:Q2_K", "-o", str(tmp_path / "e.json"), "-q"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith(f"error: no GGUF file of {REPO} matches 'Q2_K'")
