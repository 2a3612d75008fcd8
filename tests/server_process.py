"""`pydgemma serve` in a subprocess on a free loopback port, for tests that talk to it over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Starts `python -m pydgemma serve ARGS --port P` and waits until /health says ok."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"pydgemma-serve-{self.port}.log"
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "pydgemma", "serve", *args, "--port", str(self.port)],
                                     stdout=self._log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if json.load(r).get("status") == "ok":
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the server did not become ready in {timeout} s:\n{self.output()}")
            time.sleep(0.2)

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
            return json.load(r)

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
