"""Models from the Hugging Face Hub: ``org/repo[:QUANT][@revision]`` wherever a model path is taken.

A reference names a repository, optionally the quantization tag of one of its GGUF files
(case-insensitive: ``Q4_K_M``, ``q8_0``, ``BF16``) and a revision (branch, tag or commit). The file
is downloaded into the standard Hugging Face cache ($HF_HUB_CACHE, $HF_HOME/hub or
~/.cache/huggingface/hub, the layout ``hf`` and transformers use), then opened from there. A split
GGUF (llama.cpp's ``NAME-00001-of-00003.gguf``) is downloaded whole and opened by its first part.

Everything network-facing goes through ``huggingface_hub`` (the endpoint $HF_ENDPOINT, the token
$HF_TOKEN or ``hf auth login``, proxies): the repository listing, each file's metadata, the
request headers and the cache's locks. Only the byte transfer is ours: ``huggingface_hub`` 2.x
throws a partial file away, and a 16 GB model interrupted at 90 % should not start again, so a
download continues from ``blobs/<etag>.incomplete`` (the name ``huggingface_hub`` 1.x resumed
from) with an HTTP range request, and the finished file is checked against its hash.

Offline (``HF_HUB_OFFLINE=1`` or ``offline=True`` / ``--offline``) only the cache is read, and a
missing file is named exactly.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import PydgemmaError

ProgressFn = Callable[[str, int, int], None]  # (phase, bytes done, bytes in all)

DEFAULT_QUANT = "Q4_K_M"  # what llama.cpp's -hf picks when no tag is given
DEFAULT_ENDPOINT = "https://huggingface.co"
_CHUNK = 1 << 20
_RETRIES = 5

_PART_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_QUANT_LABEL = re.compile(
    r"(?:^|[-_.])(?P<tag>(?:UD-)?(?:I?Q\d(?:_[0-9A-Z]+)*|BF16|F16|F32|NVFP4|MXFP4|TQ\d_\d))$", re.IGNORECASE)
_REF = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
    r"(?:@(?P<rev1>[^:@\s]+))?(?::(?P<quant>[\w.-]+))?(?:@(?P<rev2>[^:@\s]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubError(PydgemmaError):
    """A model could not be found on or downloaded from the Hub, or is missing from the cache offline."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "DG_ERR_IO")


@dataclass(frozen=True)
class HubRef:
    repo: str
    quant: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f":{self.quant}" if self.quant else "") + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class GgufEntry:
    """One model in a repository: a GGUF file, or every part of a split one (first part first)."""

    files: tuple[str, ...]
    sizes: tuple[int | None, ...]

    @property
    def name(self) -> str:
        return self.files[0]

    @property
    def size(self) -> int | None:
        return None if any(s is None for s in self.sizes) else sum(s for s in self.sizes if s is not None)

    @property
    def quant(self) -> str | None:
        m = _QUANT_LABEL.search(_stem(self.name))
        return m.group("tag").upper() if m else None

    def describe(self) -> str:
        parts = f", {len(self.files)} parts" if len(self.files) > 1 else ""
        size = f", {_gb(self.size)}" if self.size is not None else ""
        return f"{self.name} ({self.quant or 'unknown type'}{size}{parts})"


def parse_ref(text: str) -> HubRef | None:
    """The hub reference `text` spells, or None when it is not one (a path)."""
    if text.startswith((".", "/", "~")) or text.lower().endswith(".gguf") or "\\" in text:
        return None
    m = _REF.match(text)
    if m is None or ".." in m.group("repo") or "--" in m.group("repo"):
        return None
    if m.group("rev1") and m.group("rev2"):
        raise HubError(f"'{text}' names two revisions")
    return HubRef(m.group("repo"), m.group("quant"), m.group("rev1") or m.group("rev2"))


def is_hub_ref(spec: str | os.PathLike[str]) -> bool:
    """Whether `spec` is taken as a hub reference: it is not an existing path, and it reads as one."""
    text = os.fspath(spec)
    return not os.path.exists(text) and parse_ref(text) is not None


def offline_mode(offline: bool | None = None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at each call (as huggingface_hub's is at import)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def repo_cache(repo: str) -> Path:
    return cache_dir() / ("models--" + repo.replace("/", "--"))


# --- choosing the file --------------------------------------------------------------------------

def gguf_entries(files: Iterable[tuple[str, int | None]]) -> list[GgufEntry]:
    """The models among a repository's files: GGUFs (projectors and importance matrices left out),
    the parts of a split one grouped, in name order."""
    singles: list[GgufEntry] = []
    groups: dict[tuple[str, int], dict[int, tuple[str, int | None]]] = {}
    for name, size in files:
        base = name.rsplit("/", 1)[-1].lower()
        if not base.endswith(".gguf") or "mmproj" in base or "imatrix" in base:
            continue
        m = _PART_NAME.match(name)
        if m:
            groups.setdefault((m.group("prefix"), int(m.group("count"))), {})[int(m.group("no"))] = (name, size)
        else:
            singles.append(GgufEntry((name,), (size,)))
    for (prefix, count), parts in groups.items():
        numbers = sorted(parts)
        if numbers[0] != 1:  # no first part: nothing could open it
            continue
        singles.append(GgufEntry(tuple(parts[n][0] for n in numbers), tuple(parts[n][1] for n in numbers)))
    return sorted(singles, key=lambda e: e.name)


def choose(entries: Sequence[GgufEntry], quant: str | None, where: str) -> GgufEntry:
    """The entry a tag names: its name holds the tag as a whole word (``Q4_K`` is not ``Q4_K_M``);
    an entry whose type is exactly the tag wins over longer matches (``Q4_K_M`` over ``UD-Q4_K_M``).
    Without a tag: the only model, else Q4_K_M."""
    if not entries:
        raise HubError(f"{where} has no GGUF model files")
    if quant is None:
        if len(entries) == 1:
            return entries[0]
        picked = [e for e in entries if e.quant == DEFAULT_QUANT]
        if len(picked) == 1:
            return picked[0]
        raise HubError(f"{where} has several GGUF models; name one with :TAG, e.g. '{where}:{entries[0].quant or 'Q8_0'}'. "
                       f"It has: {_listing(entries)}")
    word = re.compile(rf"(?:^|[-_./]){re.escape(quant)}(?=$|[-./])", re.IGNORECASE)
    matches = [e for e in entries if word.search(_stem(e.name)) or word.search(os.path.dirname(e.name))]
    if len(matches) > 1:
        exact = [e for e in matches if (e.quant or "").lower() == quant.lower()]
        if len(exact) == 1:
            return exact[0]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise HubError(f"no GGUF file of {where} matches '{quant}'. It has: {_listing(entries)}")
    raise HubError(f"'{quant}' matches several GGUF files of {where}: {_listing(matches)}; "
                   f"give a longer tag")


# --- resolving a reference -----------------------------------------------------------------------

def resolve_model(spec: str | os.PathLike[str], *, offline: bool | None = None,
                  progress: ProgressFn | None = None) -> str:
    """The local path of the model `spec` names: a path as it is; a hub reference downloaded into
    the cache (or found there) and the path of its GGUF (the first part of a split one)."""
    text = os.fspath(spec)
    if not is_hub_ref(text):
        return text
    ref = parse_ref(text)
    assert ref is not None
    return str(fetch(ref, offline=offline, progress=progress)[0])


def fetch(ref: HubRef, *, offline: bool | None = None, progress: ProgressFn | None = None) -> list[Path]:
    """Every local file of the model `ref` names (downloaded if needed), first part first."""
    if offline_mode(offline):
        return _cached(ref)
    try:
        commit, files = _remote_listing(ref)
    except _Unreachable as exc:
        try:
            paths = _cached(ref)
        except HubError:
            raise HubError(f"cannot reach {endpoint()} ({exc}), and {ref} is not in the cache ({cache_dir()})") from None
        print(f"warning: cannot reach {endpoint()} ({exc}); using the cached {ref}", file=sys.stderr)
        return paths
    entry = choose(gguf_entries(files), ref.quant, ref.repo)
    with _progress(progress) as report:
        return download_files(ref.repo, commit, entry.files, revision=ref.revision or "main", progress=report)


def _cached(ref: HubRef) -> list[Path]:
    """The model `ref` names from the cache alone."""
    storage = repo_cache(ref.repo)
    if not storage.is_dir():
        raise HubError(f"offline: {ref.repo} is not in the Hugging Face cache ({cache_dir()}); "
                       f"download it first with 'pydgemma pull {ref}' while online")
    commit = _cached_commit(storage, ref.revision or "main")
    if commit is None:
        raise HubError(f"offline: revision '{ref.revision or 'main'}' of {ref.repo} is not in the cache ({storage})")
    snapshot = storage / "snapshots" / commit
    present = [(str(p.relative_to(snapshot)).replace(os.sep, "/"), p.stat().st_size if p.exists() else None)
               for p in sorted(snapshot.rglob("*.gguf"))]
    entries = gguf_entries(present)
    try:
        entry = choose(entries, ref.quant, f"the cached {ref.repo}")
    except HubError as exc:
        raise HubError(f"offline: {exc}") from None
    m = _PART_NAME.match(entry.name)
    if m:
        count = int(m.group("count"))
        want = [f"{m.group('prefix')}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
        missing = [w for w in want if not (snapshot / w).exists()]
        if missing:
            raise HubError(f"offline: {ref.repo}'s {entry.name} is split into {count} parts and the cache lacks "
                           f"{', '.join(missing)}; run 'pydgemma pull {ref}' while online")
        return [snapshot / w for w in want]
    return [snapshot / entry.name]


def _cached_commit(storage: Path, revision: str) -> str | None:
    if _COMMIT.match(revision) and (storage / "snapshots" / revision).is_dir():
        return revision
    ref = storage / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        if (storage / "snapshots" / commit).is_dir():
            return commit
    return None


class _Unreachable(Exception):
    """The endpoint could not be reached at all (the cache may still serve)."""


def _hub():
    try:
        return importlib.import_module("huggingface_hub")
    except ImportError:  # pragma: no cover - a dependency
        raise HubError("models from the Hub need the huggingface_hub package: pip install huggingface_hub") from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a failed connection raises (not an HTTP error status: huggingface_hub's HfHubHTTPError is an OSError)."""
    hub = _hub()
    client = type(hub.get_session())
    http = importlib.import_module(client.__module__.split(".")[0])  # httpx (1.x) or httpx2 (2.x)
    return (http.TransportError, ConnectionError, TimeoutError)


def _http_errors() -> tuple[type[BaseException], ...]:
    return (importlib.import_module("huggingface_hub.errors").HfHubHTTPError,)


def _hub_error(exc: BaseException, what: str) -> HubError:
    """A huggingface_hub failure as one line."""
    errors = importlib.import_module("huggingface_hub.errors")
    name = type(exc).__name__
    if isinstance(exc, getattr(errors, "GatedRepoError", ())):
        return HubError(f"{what} is gated: accept its terms on the Hub, then set HF_TOKEN (or run 'hf auth login')")
    if isinstance(exc, getattr(errors, "RevisionNotFoundError", ())):
        return HubError(f"{what}: no such revision")
    if isinstance(exc, getattr(errors, "RepositoryNotFoundError", ())):
        return HubError(f"{what} not found on {endpoint()} (if it is private or gated, set HF_TOKEN)")
    if isinstance(exc, getattr(errors, "EntryNotFoundError", ())):
        return HubError(f"{what} not found on {endpoint()}")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return HubError(f"{what}: {name}" + (f" (HTTP {status})" if status else "") + f": {str(exc).splitlines()[0] if str(exc) else ''}")


def _remote_listing(ref: HubRef) -> tuple[str, list[tuple[str, int | None]]]:
    """The commit `ref`'s revision is at, and its files with their sizes."""
    hub = _hub()
    api = hub.HfApi(endpoint=endpoint(), library_name="pydgemma")
    try:
        info = api.model_info(ref.repo, revision=ref.revision, files_metadata=True)
    except _http_errors() as exc:
        raise _hub_error(exc, ref.repo + (f"@{ref.revision}" if ref.revision else "")) from None
    except _transport_errors() as exc:
        raise _Unreachable(str(exc) or type(exc).__name__) from None
    except Exception as exc:  # huggingface_hub's HTTP errors
        raise _hub_error(exc, ref.repo + (f"@{ref.revision}" if ref.revision else "")) from None
    if not info.sha:
        raise HubError(f"{endpoint()} did not say which commit {ref.repo} is at")
    return info.sha, [(s.rfilename, s.size) for s in (info.siblings or [])]


# The files of a safetensors checkpoint the converter reads.
CHECKPOINT_FILES = re.compile(r"^(?:[^/]+\.safetensors|model\.safetensors\.index\.json|config\.json|generation_config\.json|"
                              r"tokenizer\.json|tokenizer_config\.json|tokenizer\.model|special_tokens_map\.json|"
                              r"chat_template\.(?:jinja|json)|processor_config\.json|preprocessor_config\.json)$")


def fetch_checkpoint(ref: HubRef, *, offline: bool | None = None, progress: ProgressFn | None = None) -> Path:
    """The snapshot folder of a safetensors checkpoint on the Hub, with the files the converter
    reads downloaded (or found in the cache offline)."""
    if ref.quant:
        raise HubError(f"'{ref}': a checkpoint has no quantization tag; give {ref.repo}")
    storage = repo_cache(ref.repo)

    def cached() -> Path:
        commit = _cached_commit(storage, ref.revision or "main") if storage.is_dir() else None
        if commit is None:
            raise HubError(f"offline: {ref.repo}{'@' + ref.revision if ref.revision else ''} is not in the Hugging Face "
                           f"cache ({cache_dir()}); run the same command while online to download it")
        return storage / "snapshots" / commit

    if offline_mode(offline):
        return cached()
    try:
        commit, files = _remote_listing(ref)
    except _Unreachable as exc:
        snapshot = cached()
        print(f"warning: cannot reach {endpoint()} ({exc}); using the cached {ref.repo}", file=sys.stderr)
        return snapshot
    wanted = [(name, size) for name, size in files if CHECKPOINT_FILES.match(name)]
    if not any(name.endswith(".safetensors") for name, _ in wanted):
        raise HubError(f"{ref.repo} has no safetensors weights at its top level")
    with _progress(progress) as report:
        download_files(ref.repo, commit, [n for n, _ in wanted], revision=ref.revision or "main", progress=report)
    return storage / "snapshots" / commit


# --- downloading into the cache ------------------------------------------------------------------

def download_files(repo: str, commit: str, files: Sequence[str], *, revision: str = "main",
                   progress: ProgressFn | None = None) -> list[Path]:
    """Downloads `files` of `repo` at `commit` into the cache (each resumed where an earlier attempt
    stopped), records `revision` -> `commit`, and gives their paths in the snapshot."""
    storage = repo_cache(repo)
    paths = []
    for i, name in enumerate(files):
        label = name.rsplit("/", 1)[-1] + (f" ({i + 1}/{len(files)})" if len(files) > 1 else "")
        paths.append(_download(repo, commit, name, label, progress))
    if revision != commit:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / revision).write_text(commit)
    return paths


def _download(repo: str, commit: str, name: str, label: str, progress: ProgressFn | None) -> Path:
    storage = repo_cache(repo)
    pointer = storage / "snapshots" / commit / name
    if pointer.exists():
        return pointer
    hub = _hub()
    url = hub.hf_hub_url(repo, name, revision=commit, endpoint=endpoint())
    what = f"{repo}/{name}"
    try:
        meta = hub.get_hf_file_metadata(url, endpoint=endpoint(), library_name="pydgemma")
    except _http_errors() as exc:
        raise _hub_error(exc, what) from None
    except _transport_errors() as exc:
        raise HubError(f"cannot reach {endpoint()} for {what}: {exc}") from None
    except Exception as exc:
        raise _hub_error(exc, what) from None
    if not meta.etag or meta.size is None:
        raise HubError(f"{endpoint()} gave no ETag or size for {what}")
    etag = meta.etag
    blob = storage / "blobs" / etag
    lock = cache_dir() / ".locks" / storage.name / f"{etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    def locate() -> str:  # the CDN's signed URL expires: a retry asks for a fresh one
        try:
            return hub.get_hf_file_metadata(url, endpoint=endpoint(), library_name="pydgemma").location or url
        except Exception:
            return url

    with FileLock(str(lock)):
        if not blob.exists():
            _transfer(meta.location or url, locate, blob, etag, meta.size, what, label, progress)
    _link(blob, pointer)
    return pointer


def _transfer(url: str, locate: Callable[[], str], blob: Path, etag: str, size: int, what: str, label: str,
              progress: ProgressFn | None) -> None:
    """Bytes from `url` into `blob`, through blob.incomplete: continued where it stops (by range
    requests, within this call and across runs; `locate()` gives the URL again for a retry),
    checked against the ETag's hash."""
    hub = _hub()
    partial = blob.with_name(blob.name + ".incomplete")
    digest = _hasher(etag, size)
    have = partial.stat().st_size if partial.exists() else 0
    if have > size:
        partial.unlink()
        have = 0
    if have and digest is not None:
        with open(partial, "rb") as f:  # the hash must cover the bytes of the earlier run too
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                digest.update(chunk)
    utils = importlib.import_module("huggingface_hub.utils")
    headers = utils.build_hf_headers(library_name="pydgemma")
    headers["Accept-Encoding"] = "identity"
    errors = _transport_errors()
    failures = 0
    with open(partial, "ab") as out:
        while have < size:
            request = dict(headers)
            if have:
                request["Range"] = f"bytes={have}-"
            try:
                with hub.get_session().stream("GET", url, headers=request, follow_redirects=True,
                                              timeout=60) as r:
                    if r.status_code == 416 or r.status_code >= 400:
                        r.read()
                        utils.hf_raise_for_status(r)
                    if have and r.status_code != 206:  # the server ignored the range: start over
                        out.seek(0)
                        out.truncate()
                        have = 0
                        digest = _hasher(etag, size)
                    for chunk in r.iter_bytes():
                        out.write(chunk)
                        if digest is not None:
                            digest.update(chunk)
                        have += len(chunk)
                        if progress:
                            progress(label, have, size)
                        failures = 0
            except _http_errors() as exc:  # an expired CDN link (403) or a busy server: ask again, a few times
                status = getattr(getattr(exc, "response", None), "status_code", None)
                failures += 1
                if status not in (403, 408, 429, 500, 502, 503, 504) or failures > _RETRIES:
                    raise _hub_error(exc, what) from None
                time.sleep(min(0.5 * 2 ** (failures - 1), 8.0))
                url = locate()
            except errors as exc:
                out.flush()
                failures += 1
                if failures > _RETRIES:
                    raise HubError(f"download of {what} interrupted at {have} of {size} bytes ({exc}); "
                                   f"run the same command again to continue it") from None
                time.sleep(min(0.5 * 2 ** (failures - 1), 8.0))
                url = locate()
            except HubError:
                raise
            except Exception as exc:
                raise _hub_error(exc, what) from None
            if have > size:
                break
    if have != size:
        partial.unlink(missing_ok=True)
        raise HubError(f"download of {what} gave {have} bytes, expected {size}; the partial file was removed")
    if digest is not None and digest.hexdigest() != etag:
        partial.unlink(missing_ok=True)
        raise HubError(f"download of {what} does not match its hash ({etag}); the partial file was removed, "
                       f"run the same command again")
    os.replace(partial, blob)


def _hasher(etag: str, size: int):
    """What the Hub's ETag is a hash of: sha256 of the bytes (LFS files), or git's blob sha1."""
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        return hashlib.sha256()
    if re.fullmatch(r"[0-9a-f]{40}", etag):
        h = hashlib.sha1()
        h.update(b"blob %d\0" % size)
        return h
    return None


def _link(blob: Path, pointer: Path) -> None:
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(pointer.name + ".pydgemma-link")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), tmp)
    except OSError:  # no symlinks here (e.g. Windows without the privilege): the cache then holds a copy
        import shutil

        shutil.copyfile(blob, tmp)
    os.replace(tmp, pointer)


# --- the cache's models ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CachedModel:
    repo: str
    revisions: tuple[str, ...]  # refs pointing at the commit
    commit: str
    file: str  # first part, relative to the snapshot
    path: Path
    parts: int
    parts_present: int
    size: int  # bytes present
    file_type: str | None  # from general.file_type, else the name's tag

    def to_dict(self) -> dict:
        return {"repo": self.repo, "revisions": list(self.revisions), "commit": self.commit, "file": self.file,
                "path": str(self.path), "parts": self.parts, "complete": self.parts_present == self.parts,
                "size": self.size, "type": self.file_type, "ref": self.ref}

    @property
    def ref(self) -> str:
        tag = (":" + self.file_type) if self.file_type else ""
        return f"{self.repo}{tag}"


def cached_models() -> list[CachedModel]:
    """The DiffusionGemma GGUFs in the cache (read from their headers; other GGUFs are left out)."""
    root = cache_dir()
    out: list[CachedModel] = []
    if not root.is_dir():
        return out
    for storage in sorted(root.glob("models--*--*")):
        repo = storage.name[len("models--"):].replace("--", "/", 1)
        refs: dict[str, list[str]] = {}
        for ref in sorted((storage / "refs").rglob("*")) if (storage / "refs").is_dir() else []:
            if ref.is_file():
                refs.setdefault(ref.read_text().strip(), []).append(str(ref.relative_to(storage / "refs")))
        for snapshot in sorted((storage / "snapshots").glob("*")) if (storage / "snapshots").is_dir() else []:
            files = [(str(p.relative_to(snapshot)).replace(os.sep, "/"), p.stat().st_size if p.exists() else None)
                     for p in sorted(snapshot.rglob("*.gguf"))]
            for entry in gguf_entries(files):
                first = snapshot / entry.name
                header = _read_header(first)
                if header is None or header.get("general.architecture") != "diffusion-gemma":
                    continue
                m = _PART_NAME.match(entry.name)
                parts = int(m.group("count")) if m else 1
                out.append(CachedModel(repo, tuple(refs.get(snapshot.name, [])), snapshot.name, entry.name, first,
                                       parts, len(entry.files), sum(s or 0 for s in entry.sizes),
                                       _file_type_name(header.get("general.file_type")) or entry.quant))
    return out


# llama.cpp's LLAMA_FTYPE values (general.file_type) of the types our files and the published ones use
_FILE_TYPES = {0: "F32", 1: "F16", 7: "Q8_0", 15: "Q4_K_M", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16", 38: "MXFP4", 39: "NVFP4"}


def _file_type_name(value) -> str | None:
    return _FILE_TYPES.get(value) if isinstance(value, int) else None


def _read_header(path: Path, keys: tuple[str, ...] = ("general.architecture", "general.file_type")) -> dict | None:
    """A few scalar keys of a GGUF header (without reading its arrays or tensors), or None if unreadable."""
    scalars = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return None
            version, _n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
            if version < 2 or n_kv > 1 << 20:
                return None
            found: dict = {}

            def string() -> str:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 1 << 20:
                    raise ValueError("string too long")
                return f.read(n).decode("utf-8", "replace")

            def skip(kind: int) -> None:
                if kind in scalars:
                    f.seek(struct.calcsize(scalars[kind]), 1)
                elif kind == 8:
                    string()
                elif kind == 9:
                    sub, n = struct.unpack("<IQ", f.read(12))
                    if sub in scalars:
                        f.seek(struct.calcsize(scalars[sub]) * n, 1)
                    else:
                        for _ in range(n):
                            skip(sub)
                else:
                    raise ValueError(f"value type {kind}")

            for _ in range(n_kv):
                key = string()
                (kind,) = struct.unpack("<I", f.read(4))
                if key in keys and kind in scalars:
                    (found[key],) = struct.unpack(scalars[kind], f.read(struct.calcsize(scalars[kind])))
                elif key in keys and kind == 8:
                    found[key] = string()
                else:
                    skip(kind)
                if len(found) == len(keys):
                    break
            return found
    except (OSError, ValueError, struct.error, UnicodeError):
        return None


# --- helpers --------------------------------------------------------------------------------------

def _stem(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    m = _PART_NAME.match(base)
    if m:
        base = m.group("prefix")
    return base[:-5] if base.lower().endswith(".gguf") else base


def _gb(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def _listing(entries: Sequence[GgufEntry]) -> str:
    return "; ".join(e.describe() for e in entries)


class _progress:
    """The caller's progress function, or a bar on stderr when it is a terminal."""

    def __init__(self, given: ProgressFn | None) -> None:
        self.given = given
        self.cm = None

    def __enter__(self) -> ProgressFn | None:
        if self.given is not None:
            return self.given
        disabled = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        if disabled or not sys.stderr.isatty():
            return None
        from .progress import phase_progress

        self.cm = phase_progress(True)
        return self.cm.__enter__()

    def __exit__(self, *exc) -> None:
        if self.cm is not None:
            self.cm.__exit__(*exc)
