"""`pydgemma serve` under load, and its overhead over calling Model.generate directly.

    python benchmarks/serve_bench.py                          # the demo model, 4 clients, 20 s
    python benchmarks/serve_bench.py -m model.gguf --clients 8 --seconds 60 --max-tokens 256

Two parts, each engine in its own process:
1. overhead: the same --requests prompts and seeds, one at a time, through Model.generate in a
   child process and through the server (whole replies, as Model.generate returns them; a client in
   this process), taken in turn (direct, served, direct, ...) so that a machine that speeds up or slows down affects both alike; the
   ratio of the total times is the server's overhead (HTTP, JSON, SSE, the queue, the assembly).
2. load: --clients concurrent streaming clients for --seconds; requests/s, p50/p95 latency to the
   first content and to the end, generated tokens/s.

The prompts are the demo's Sudoku puzzles (any model takes them: they are short text)."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import httpx

DIRECT = r"""
import json, sys, time
import pydgemma
path, max_tokens = sys.argv[1], int(sys.argv[2])
model = pydgemma.Model(path)
C = model.hparams["canvas_length"]
print("ready", flush=True)
for line in sys.stdin:  # one request a line; one answer a line
    r = json.loads(line)
    t = time.perf_counter()
    gen = model.generate(r["messages"], seed=r["seed"], max_new_tokens=-(-max_tokens // C) * C)
    print(json.dumps({"time": time.perf_counter() - t, "tokens": len(gen.tokens)}), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, port: int, extra: list[str]) -> subprocess.Popen:
    args = [sys.executable, "-m", "pydgemma", "serve", "--port", str(port), *extra]
    if model:
        args += ["-m", model]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited: {proc.stderr.read().decode(errors='replace')}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if json.load(r)["status"] == "ok":
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not become ready in 300 s")


def stream_once(client: httpx.Client, url: str, body: dict) -> dict:
    """One streamed request: seconds to the first content, to the end, and the tokens generated."""
    t0 = time.perf_counter()
    first = None
    usage = None
    with client.stream("POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        if r.status_code != 200:
            return {"status": r.status_code}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
    end = time.perf_counter() - t0
    return {"status": 200, "first": first if first is not None else end, "end": end,
            "tokens": usage["completion_tokens"] if usage else 0}


def plain_once(conn: http.client.HTTPConnection, path: str, body: dict) -> dict:
    """One non-streamed request (what Model.generate returns: the whole reply at once), on a kept-alive
    connection through the standard library's client: what is timed is the server, not a client library
    (httpx alone adds ~1 ms a request on a 2-core machine, more than the server's own overhead)."""
    data = json.dumps(body).encode()
    t0 = time.perf_counter()
    conn.request("POST", path, data, {"Content-Type": "application/json"})
    r = conn.getresponse()
    reply = r.read()
    end = time.perf_counter() - t0
    return {"status": r.status, "end": end,
            "tokens": json.loads(reply)["usage"]["completion_tokens"] if r.status == 200 else 0}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="A .gguf file (default: the demo model).")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--requests", type=int, default=100, help="Requests in the overhead comparison.")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from pydgemma.models.demo import sudoku
    from pydgemma.run_cli import demo_model_path

    model = args.model or str(demo_model_path())
    puzzles = [p for p, _ in sudoku.test_puzzles(50)]
    requests = [{"messages": [{"role": "user", "content": sudoku.prompt_text(puzzles[i % len(puzzles)])}], "seed": i}
                for i in range(args.requests)]

    # 1. overhead: Model.generate in its own process and the server, the same requests in turn
    child = subprocess.Popen([sys.executable, "-c", DIRECT, model, str(args.max_tokens)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONSAFEPATH": "1"})
    if child.stdout.readline().strip() != "ready":
        sys.exit("the direct engine did not start")

    def generate_directly(req: dict) -> dict:
        child.stdin.write(json.dumps(req) + "\n")
        child.stdin.flush()
        return json.loads(child.stdout.readline())

    port = free_port()
    server = start_server(args.model, port, ["--max-queue", str(max(16, 2 * args.clients))])
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        direct, served = [], []
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        generate_directly(requests[0])  # warm-ups
        plain_once(conn, "/v1/chat/completions", {**requests[0], "max_tokens": args.max_tokens})
        for req in requests:
            direct.append(generate_directly(req))
            served.append(plain_once(conn, "/v1/chat/completions", {**req, "max_tokens": args.max_tokens}))
        conn.close()
        child.stdin.close()
        child.wait(timeout=60)
        if any(s["status"] != 200 for s in served):
            sys.exit(f"the server refused requests: {[s['status'] for s in served]}")
        t_direct, t_served = sum(d["time"] for d in direct), sum(s["end"] for s in served)
        # the median of the pairs' ratios: a pair that a busy machine slowed moves it little
        paired = pct([s["end"] / d["time"] for d, s in zip(direct, served)], 0.5)

        # 2. load: concurrent clients for a bounded time
        done: list[dict] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds

        def client(k: int) -> None:
            i = k
            with httpx.Client(timeout=600) as hx:
                while time.monotonic() < stop_at:
                    req = requests[i % len(requests)]
                    res = stream_once(hx, url, {**req, "seed": 1000 + i, "max_tokens": args.max_tokens})
                    with lock:
                        done.append(res)
                    i += args.clients

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)

    ok = [d for d in done if d["status"] == 200]
    out = {
        "model": Path(model).name,
        "overhead": {"requests": len(requests), "direct_s": t_direct, "server_s": t_served,
                     "ratio": t_served / t_direct, "paired_median_ratio": paired, "direct_tokens": sum(d["tokens"] for d in direct),
                     "server_tokens": sum(s["tokens"] for s in served)},
        "load": {"clients": args.clients, "seconds": wall, "requests": len(done), "ok": len(ok),
                 "requests_per_s": len(ok) / wall,
                 "first_content_p50_s": pct([d["first"] for d in ok], 0.5),
                 "first_content_p95_s": pct([d["first"] for d in ok], 0.95),
                 "end_p50_s": pct([d["end"] for d in ok], 0.5), "end_p95_s": pct([d["end"] for d in ok], 0.95),
                 "tokens_per_s": sum(d["tokens"] for d in ok) / wall},
    }
    o, lo = out["overhead"], out["load"]
    print(f"{out['model']}: {o['requests']} requests one at a time")
    print(f"  Model.generate  {o['direct_s']:.3f} s   server  {o['server_s']:.3f} s: ratio {o['ratio']:.3f} "
          f"(overhead {100 * (o['ratio'] - 1):+.1f} %); median of the pairs' ratios {o['paired_median_ratio']:.3f}")
    print(f"{lo['clients']} concurrent clients for {lo['seconds']:.1f} s: {lo['ok']} requests "
          f"({lo['requests'] - lo['ok']} refused), {lo['requests_per_s']:.2f} req/s, {lo['tokens_per_s']:.1f} tok/s")
    print(f"  first content p50 {lo['first_content_p50_s'] * 1e3:.0f} ms, p95 {lo['first_content_p95_s'] * 1e3:.0f} ms; "
          f"completion p50 {lo['end_p50_s'] * 1e3:.0f} ms, p95 {lo['end_p95_s'] * 1e3:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
