"""`pydgemma serve` against real clients: the official `openai` package and raw HTTP, on a server
started on a free loopback port with the demo model (and a tiny converted checkpoint whose chat
template declares tools). Answers are checked against Model.generate with the same seed."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

import pydgemma
from pydgemma.models.demo import sudoku
from pydgemma.run_cli import demo_model_path
from server_process import ServerProcess

DEMO = demo_model_path()


@pytest.fixture(scope="module")
def demo_server():
    server = ServerProcess("--max-queue", "8")
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(demo_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def demo_model() -> pydgemma.Model:
    return pydgemma.Model(DEMO)


def direct(model: pydgemma.Model, messages, seed: int, max_tokens: int = 48) -> str:
    """The reply Model.generate gives for the same request (the server's max_tokens in whole canvases)."""
    C = model.hparams["canvas_length"]
    gen = model.generate(messages, seed=seed, max_new_tokens=-(-max_tokens // C) * C)
    return model.detokenize(gen.tokens[:max_tokens])


def puzzle_messages(i: int) -> tuple[str, list[dict]]:
    puzzle, _ = sudoku.test_puzzles(50)[i]
    return puzzle, [{"role": "user", "content": sudoku.prompt_text(puzzle)}]


def test_health_and_models(demo_server: ServerProcess, client: openai.OpenAI) -> None:
    health = demo_server.health()
    assert health["status"] == "ok" and health["model"] == DEMO.name and health["n_ctx"] == 512
    models = client.models.list()
    assert [m.id for m in models.data] == [DEMO.name] and models.data[0].object == "model"


def test_chat_answers_as_generate_does(client: openai.OpenAI, demo_model: pydgemma.Model) -> None:
    puzzle, messages = puzzle_messages(0)
    r = client.chat.completions.create(model=DEMO.name, messages=messages, seed=7, max_tokens=48)
    text = r.choices[0].message.content
    assert text == direct(demo_model, messages, 7)
    assert sudoku.check_answer(puzzle, text), text
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    ids = demo_model.chat_prompt_ids(messages)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(demo_model.tokenize(text, add_special=False))


def test_stream_equals_non_stream(client: openai.OpenAI) -> None:
    _, messages = puzzle_messages(1)
    whole = client.chat.completions.create(model=DEMO.name, messages=messages, seed=3, max_tokens=48)
    stream = client.chat.completions.create(model=DEMO.name, messages=messages, seed=3, max_tokens=48, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_per_step_drafts(demo_server: ServerProcess, demo_model: pydgemma.Model) -> None:
    _, messages = puzzle_messages(2)
    C = demo_model.hparams["canvas_length"]
    steps = []
    demo_model.generate(messages, seed=5, max_new_tokens=2 * C, on_step=lambda e: steps.append((e.canvas, e.step)))
    body = {"messages": messages, "seed": 5, "max_tokens": 2 * C, "stream": True, "stream_drafts": True}
    drafts, content = [], ""
    with httpx.stream("POST", demo_server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        if "draft" in chunk:
            assert chunk["choices"][0]["delta"] == {}
            drafts.append(chunk["draft"])
        content += chunk["choices"][0]["delta"].get("content") or ""
    # one draft per denoising step, as the native loop ran them (the reply may end in the first canvas)
    assert [(d["canvas"], d["step"]) for d in drafts] == steps[: len(drafts)] and drafts
    for d in drafts:
        assert len(d["pieces"]) == C and len(d["accepted"]) == C and d["mean_entropy"] >= 0
        assert d["text"] == "".join(d["pieces"])  # the demo's tokens are whole characters
    # the reply is the decided canvases (each canvas's last draft), up to the end of the turn
    decided = "".join(d["text"] for i, d in enumerate(drafts) if i + 1 == len(drafts) or drafts[i + 1]["canvas"] != d["canvas"])
    assert content and decided.startswith(content)


def test_completions_endpoint(client: openai.OpenAI, demo_model: pydgemma.Model) -> None:
    prompt = sudoku.prompt_text(sudoku.test_puzzles(50)[3][0])
    r = client.completions.create(model=DEMO.name, prompt=prompt, seed=2, max_tokens=24)
    C = demo_model.hparams["canvas_length"]
    ctx = demo_model.context(n_ctx=128)
    from pydgemma.generate import generate_ids

    gen = generate_ids(ctx, demo_model.tokenize(prompt), max_new_tokens=C, sampler={"seed": 2})
    assert r.object == "text_completion" and r.choices[0].text == demo_model.detokenize(gen.tokens[:24])
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=DEMO.name, prompt=prompt, seed=2,
                                                                            max_tokens=24, stream=True))
    assert streamed == r.choices[0].text


def test_multi_turn_reuses_the_prompt_cache(client: openai.OpenAI, demo_model: pydgemma.Model) -> None:
    _, messages = puzzle_messages(4)
    first = client.chat.completions.create(model=DEMO.name, messages=messages, seed=1, max_tokens=24)
    follow = messages + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": sudoku.prompt_text(sudoku.test_puzzles(50)[5][0])}]
    second = client.chat.completions.create(model=DEMO.name, messages=follow, seed=1, max_tokens=24)
    # the second prompt shares the first up to the generation prompt (the template writes the
    # answered turn without the empty thought channel a generation prompt opens with)
    a, b = demo_model.chat_prompt_ids(messages), demo_model.chat_prompt_ids(follow)
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared > len(a) // 2 and second.usage.prompt_tokens_details.cached_tokens == shared


def test_four_concurrent_clients(client: openai.OpenAI, demo_model: pydgemma.Model) -> None:
    jobs = [puzzle_messages(10 + i)[1] for i in range(4)]

    def ask(i: int) -> str:
        r = client.chat.completions.create(model=DEMO.name, messages=jobs[i], seed=20 + i, max_tokens=48)
        return r.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert answers == [direct(demo_model, jobs[i], 20 + i) for i in range(4)]


def test_errors(demo_server: ServerProcess, client: openai.OpenAI) -> None:
    url = demo_server.url + "/v1/chat/completions"

    def post(content: bytes | dict, **kw) -> httpx.Response:
        if isinstance(content, dict):
            return httpx.post(url, json=content, timeout=60, **kw)
        return httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=60, **kw)

    def error(r: httpx.Response, status: int) -> dict:
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert set(e) == {"message", "type", "code"} and e["message"]
        return e

    error(post(b"{not json"), 400)
    error(post(b"[1, 2]"), 400)
    assert "max_tokens" in error(post({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}), 400)["message"]
    assert "n = 1" in error(post({"messages": [{"role": "user", "content": "x"}], "n": 2}), 400)["message"]
    assert "role" in error(post({"messages": [{"content": "x"}]}), 400)["message"]
    error(post({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}), 400)
    error(post({"messages": [{"role": "user", "content": "x"}], "temperature": 5}), 400)
    long = " ".join(["1"] * 600)
    msg = error(post({"messages": [{"role": "user", "content": long}]}), 400)["message"]
    assert "n_ctx is 512" in msg and "tokens" in msg
    error(httpx.get(demo_server.url + "/v1/nothing-here", timeout=10), 404)
    error(httpx.get(url, timeout=10), 405)
    error(post(b'{"messages": "' + b"x" * (5 << 20) + b'"}'), 413)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=DEMO.name, messages=[], max_tokens=4)
    # unknown fields are ignored
    ok = post({"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "seed": 1, "frobnicate": True})
    assert ok.status_code == 200
    assert demo_server.proc.poll() is None  # still serving


@pytest.mark.slow
def test_api_key_and_a_full_queue() -> None:
    server = ServerProcess("--max-queue", "1", "--api-key", "s3cret")
    try:
        url = server.url + "/v1/chat/completions"
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        r = httpx.get(server.url + "/v1/models", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert [m.id for m in good.models.list().data] == [DEMO.name]
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # no key needed

        # eight at once: one runs, one waits, the others are turned away at once with Retry-After
        body = {"messages": puzzle_messages(7)[1], "max_tokens": 48, "seed": 1}
        headers = {"Authorization": "Bearer s3cret"}
        start = threading.Barrier(8)

        def send(_: int) -> httpx.Response:
            with httpx.Client(timeout=300) as http:
                http.get(server.url + "/health")  # connected before the barrier
                start.wait()
                return http.post(url, json=body, headers=headers)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(send, range(8)))
        codes = sorted(r.status_code for r in results)
        assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
        answers = {r.json()["choices"][0]["message"]["content"] for r in results if r.status_code == 200}
        assert len(answers) == 1  # the same seed, the same answer, queued or not
        for r in results:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) > 0 and r.json()["error"]["code"] == "queue_full"
    finally:
        server.close()


def test_serve_refuses_a_missing_model(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pydgemma", "serve", "-m", str(tmp_path / "none.gguf")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: no such model file: {tmp_path / 'none.gguf'}"]


@pytest.fixture(scope="module")
def tiny_server(converted: dict[str, Path]):
    server = ServerProcess("-m", str(converted["f32"]), "--n-ctx", "1024")
    yield server
    server.close()


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city."}},
                   "required": ["city"]}}}]


@pytest.mark.slow
def test_tools_are_declared_by_the_template_and_results_fed_back(tiny_server: ServerProcess,
                                                                 converted: dict[str, Path]) -> None:
    from pydgemma.tools import CALL_OPEN, normalize_messages

    model = pydgemma.Model(converted["f32"])
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for choice, prefix in (("auto", ""), ("required", CALL_OPEN + "call:"),
                           ({"type": "function", "function": {"name": "get_weather"}}, CALL_OPEN + "call:get_weather{")):
        r = client.chat.completions.create(model="x", messages=messages, tools=WEATHER, tool_choice=choice, seed=1,
                                           max_tokens=16)
        expected = model.chat_prompt_ids(messages, tools=WEATHER, generation_prefix=prefix)
        assert r.usage.prompt_tokens == len(expected)
        # a random model's call rarely parses: it comes back as text, never as an error
        m = r.choices[0].message
        assert (m.tool_calls is not None) == (r.choices[0].finish_reason == "tool_calls")
        if prefix and not m.tool_calls:
            assert m.content.startswith(prefix)
    plain = client.chat.completions.create(model="x", messages=messages, tools=WEATHER, tool_choice="none", max_tokens=4)
    assert plain.usage.prompt_tokens == len(model.chat_prompt_ids(messages)) < len(model.chat_prompt_ids(messages, tools=WEATHER))

    # an answered call, in OpenAI's shapes, through the template
    history = messages + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temp_c": 18, "sky": "clear"})}]
    r = client.chat.completions.create(model="x", messages=history, tools=WEATHER, seed=1, max_tokens=4)
    rendered, tools = normalize_messages(history, WEATHER)
    ids = model.chat_prompt_ids(rendered, tools=tools)
    assert r.usage.prompt_tokens == len(ids)
    text = model.detokenize(ids, render_special=True)
    assert "<|tool_response>response:get_weather{" in text and "<|tool_call>call:get_weather{city:" in text


@pytest.mark.slow
def test_earlier_thoughts_are_not_in_the_prompt(tiny_server: ServerProcess, converted: dict[str, Path]) -> None:
    model = pydgemma.Model(converted["f32"])
    ask = [{"role": "user", "content": "hi"}]
    with_thought = ask + [{"role": "assistant", "content": "<|channel>thought\nThe user greets me.<channel|>Hello!"},
                          {"role": "user", "content": "and?"}]
    without = ask + [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "and?"}]
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for think in (False, True):
        r = client.chat.completions.create(model="x", messages=with_thought, max_tokens=4, seed=2,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": think}})
        assert r.usage.prompt_tokens == len(model.chat_prompt_ids(without, think=think))
        assert "greets" not in model.detokenize(model.chat_prompt_ids(with_thought, think=think))
        content = r.choices[0].message.content or ""
        assert "<|channel>" not in content and "<channel|>" not in content


def test_503_while_loading_then_the_load_error(tmp_path: Path) -> None:
    """/health and the API say 503 while the model loads, then give the load error."""
    import uvicorn

    from pydgemma.server.app import ServerConfig, create_app
    from server_process import free_port

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    port = free_port()
    go = threading.Event()
    app = create_app(ServerConfig(model_path=str(bad)), load_after=go)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.get(base + "/health", timeout=10)
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "loading"
        go.set()
        while httpx.get(base + "/health", timeout=10).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.get(base + "/health", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "error" and "GGUF" in r.json()["message"]
        r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_serve_stops_when_the_model_does_not_load(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    r = subprocess.run([sys.executable, "-m", "pydgemma", "serve", "-m", str(bad), "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith(f"error: cannot serve {bad}: ") and "Traceback" not in r.stderr


def test_disconnect_cancels_the_generation(tiny_server: ServerProcess) -> None:
    """The tiny random model is never confident, so a canvas runs all its `steps`: 1000 here, far
    longer than the client stays."""
    before = tiny_server.health()["generations"]
    body = {"messages": [{"role": "user", "content": "hi"}], "seed": 9, "max_tokens": 16, "steps": 1000,
            "stream": True, "stream_drafts": True}
    seen = 0
    with httpx.stream("POST", tiny_server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"draft"' in line:
                seen = json.loads(line[6:])["draft"]["step"] + 1
                break  # leave after the first denoising step
    deadline = time.monotonic() + 30
    while tiny_server.health()["generations"]["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, tiny_server.health()
        time.sleep(0.05)
    after = tiny_server.health()["generations"]
    assert seen >= 1 and after["completed"] == before["completed"] and after["failed"] == before["failed"]
