"""A Hugging Face Hub on 127.0.0.1 for tests: the endpoints huggingface_hub (and pydgemma.hub) call,
answering as the Hub does, over files the tests put in it. Point clients at it with HF_ENDPOINT.

- GET /api/models/ORG/NAME[/revision/REV]: the repository's commit and its files with sizes, blob
  ids and, for LFS files, their sha256 ("siblings", as with ?blobs=true).
- HEAD/GET /ORG/NAME/resolve/REV/PATH: a small file directly (ETag = its git blob sha1); an LFS file
  (.gguf, .safetensors) as a 302 to /cdn/SHA256 with X-Linked-Etag and X-Linked-Size, as the Hub
  redirects to its CDN. X-Repo-Commit on both.
- GET /cdn/SHA256: the bytes, with Range requests (206 / Content-Range).
- Errors as the Hub gives them: 401 + X-Error-Code RepoNotFound for a missing (or private without
  the token) repository, 404 RevisionNotFound / EntryNotFound.
Knobs: `private` repos need "Authorization: Bearer TOKEN"; `drop_after[sha256] = n` cuts the next
download of that blob after n bytes (the connection closes mid-body); `refuse_next[sha256] = status`
answers its next download with that status (403: an expired CDN link); `rate` bytes/s slows every
download (to interrupt one from outside); `requests` records what was asked.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".gguf", ".safetensors")


@dataclass
class Repo:
    files: dict[str, bytes]
    revisions: dict[str, str]  # branch -> commit
    private_token: str | None = None


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> bytes
    drop_after: dict[str, int] = field(default_factory=dict)
    refuse_next: dict[str, int] = field(default_factory=dict)  # sha256 -> the status the next download gets
    rate: float | None = None  # bytes per second of each download
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def free_port_url() -> str:
    """The URL of a loopback port nothing listens on (an unreachable hub)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class LoopbackHub:
    """The server; `add_repo` puts files in it. Use as a context manager."""

    def __init__(self) -> None:
        self.state = HubState()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LoopbackHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo: str, files: dict[str, bytes | Path], *, branches: dict[str, dict[str, bytes | Path]] | None = None,
                 private_token: str | None = None) -> str:
        """Adds `repo` with `files` on main (and other `branches`); gives main's commit."""
        revisions: dict[str, str] = {}
        all_files: dict[str, bytes] = {}
        for branch, content in {"main": files, **(branches or {})}.items():
            data = {name: (v.read_bytes() if isinstance(v, Path) else v) for name, v in content.items()}
            commit = hashlib.sha1(repr(sorted((k, git_blob_sha1(v)) for k, v in data.items())).encode()
                                  + branch.encode()).hexdigest()
            revisions[branch] = commit
            for name, blob in data.items():
                all_files[f"{commit}/{name}"] = blob
                if name.endswith(LFS_SUFFIXES):
                    self.state.blobs[hashlib.sha256(blob).hexdigest()] = blob
        self.state.repos[repo] = Repo(all_files, revisions, private_token)
        return revisions["main"]

    def sha256(self, data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def downloads(self, sha: str) -> list[Request]:
        return [r for r in self.state.requests if r.method == "GET" and r.path == f"/cdn/{sha}"]


def _handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        # -- helpers --
        def _send(self, status: int, headers: dict[str, str], payload: bytes = b"", body: bool = True) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body and payload:
                self.wfile.write(payload)

        def _error(self, status: int, code: str, message: str, body: bool) -> None:
            payload = json.dumps({"error": message}).encode()
            self._send(status, {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"},
                       payload, body)

        def _repo(self, name: str, body: bool) -> Repo | None:
            repo = state.repos.get(name)
            auth = self.headers.get("Authorization")
            if repo is None or (repo.private_token and auth != f"Bearer {repo.private_token}"):
                self._error(401, "RepoNotFound", "Repository not found", body)
                return None
            return repo

        def _commit(self, repo: Repo, rev: str, body: bool) -> str | None:
            if rev in repo.revisions:
                return repo.revisions[rev]
            if rev in repo.revisions.values():
                return rev
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", body)
            return None

        def _serve(self, body: bool) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            with state.lock:
                state.requests.append(Request(self.command, path, self.headers.get("Range"),
                                              self.headers.get("Authorization")))
            parts = path.strip("/").split("/")
            if parts == ["api", "agent-harnesses"]:  # huggingface_hub's telemetry registry: none here
                return self._send(200, {"Content-Type": "application/json"},
                                  b'{"standardEnvVars": [], "harnesses": {}}', body)
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                return self._api(parts[2:], body)
            if parts[0] == "cdn" and len(parts) == 2:
                return self._blob(parts[1], body)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
            self._error(404, "EntryNotFound", "not found", body)

        def _api(self, parts: list[str], body: bool) -> None:
            repo_name = "/".join(parts[:2])
            repo = self._repo(repo_name, body)
            if repo is None:
                return
            rev = "main"
            if len(parts) >= 4 and parts[2] == "revision":
                rev = "/".join(parts[3:])
            commit = self._commit(repo, rev, body)
            if commit is None:
                return
            siblings = []
            for key, data in sorted(repo.files.items()):
                c, _, name = key.partition("/")
                if c != commit:
                    continue
                entry = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                siblings.append(entry)
            payload = json.dumps({"id": repo_name, "modelId": repo_name, "sha": commit, "private": bool(repo.private_token),
                                  "siblings": siblings, "tags": ["gguf"]}).encode()
            self._send(200, {"Content-Type": "application/json"}, payload, body)

        def _resolve(self, repo_name: str, rev: str, name: str, body: bool) -> None:
            repo = self._repo(repo_name, body)
            if repo is None:
                return
            commit = self._commit(repo, rev, body)
            if commit is None:
                return
            data = repo.files.get(f"{commit}/{name}")
            if data is None:
                self._error(404, "EntryNotFound", f"{name} does not exist", body)
                return
            headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
            if name.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(data).hexdigest()
                host = self.headers.get("Host")
                headers.update({"Location": f"http://{host}/cdn/{sha}", "X-Linked-Etag": f'"{sha}"',
                                "X-Linked-Size": str(len(data)), "ETag": f'"{git_blob_sha1(data)}"'})
                self._send(302, headers, b"", body)
                return
            headers["ETag"] = f'"{git_blob_sha1(data)}"'
            self._send_bytes(data, headers, body, key=None)

        def _blob(self, sha: str, body: bool) -> None:
            data = state.blobs.get(sha)
            if data is None:
                self._error(404, "EntryNotFound", "no such blob", body)
                return
            with state.lock:
                refused = state.refuse_next.pop(sha, None) if body else None
            if refused is not None:  # e.g. 403: the CDN's signed link has expired
                self._send(refused, {"Content-Type": "text/plain"}, b"Request has expired", body)
                return
            self._send_bytes(data, {"ETag": f'"{sha}"', "Accept-Ranges": "bytes"}, body, key=sha)

        def _send_bytes(self, data: bytes, headers: dict[str, str], body: bool, key: str | None) -> None:
            start, status = 0, 200
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                first, _, last = rng[6:].partition("-")
                start = int(first)
                end = int(last) + 1 if last else len(data)
                if start >= len(data):
                    self._send(416, {"Content-Range": f"bytes */{len(data)}"}, b"", body)
                    return
                data_out = data[start:end]
                headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
                status = 206
            else:
                data_out = data
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data_out)))
            self.end_headers()
            if not body:
                return
            with state.lock:
                cut = state.drop_after.pop(key, None) if key else None
            if cut is not None:
                self.wfile.write(data_out[:max(0, cut - start)])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            step = 1 << 16
            for i in range(0, len(data_out), step):
                self.wfile.write(data_out[i:i + step])
                if state.rate:
                    self.wfile.flush()
                    time.sleep(step / state.rate)

    return Handler
