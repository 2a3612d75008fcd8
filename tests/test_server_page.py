"""The page at / (pydgemma/server/static/index.html) in headless Chromium, against `pydgemma serve`
with the demo model: it loads offline, streams a Sudoku answer equal to the non-streamed API's,
draws the 24-token canvas with accepted cells, keeps the conversation, and shows server errors.

Chromium is Debian's (apt-get install -y chromium), driven by Playwright's Python package with
`executable_path`, so nothing downloads a browser."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import urllib.request
from pathlib import Path

import pytest

import pydgemma
from pydgemma.models.demo import sudoku
from pydgemma.run_cli import demo_model_path
from server_process import ServerProcess

PAGE = Path(pydgemma.__file__).parent / "server" / "static" / "index.html"
DEMO = demo_model_path()
SEED = 7
IDS = ("prompt", "send", "messages", "canvas", "canvas-caption", "thinking", "api-key", "seed")
INSTALL = ("the page test needs Debian's Chromium and Playwright's Python package (no browser download): "
           "apt-get install -y chromium && pip install 'playwright==1.65.2'")


def chromium_path() -> str:
    path = os.environ.get("PYDGEMMA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(f"no chromium on PATH; {INSTALL}", pytrace=False)
    return path


@pytest.fixture(scope="module")
def server():
    server = ServerProcess()
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"the playwright package is missing; {INSTALL}", pytrace=False)
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=executable, headless=True)
        except Exception as exc:  # noqa: BLE001 - the driver's own message says why
            pytest.fail(f"cannot start {executable} with Playwright: {exc}\n{INSTALL}", pytrace=False)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the server's /, recording console errors and every URL it requested."""
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    pg.problems = []
    pg.requests = []
    pg.on("console", lambda m: m.type == "error" and pg.problems.append(f"console: {m.text}"))
    pg.on("pageerror", lambda e: pg.problems.append(f"page error: {e}"))
    pg.on("request", lambda r: pg.requests.append(r.url))
    pg.goto(server.url + "/")
    yield pg
    context.close()


def api_reply(server: ServerProcess, messages: list[dict], seed: int) -> str:
    body = json.dumps({"messages": messages, "seed": seed}).encode()
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def demo_model():
    with pydgemma.Model(DEMO) as model:
        yield model


def solved_puzzle(model: pydgemma.Model, seed: int) -> tuple[str, str]:
    """The first held-out puzzle Model.generate solves with `seed` (the demo solves most), and its answer."""
    for puzzle, _ in sudoku.test_puzzles(20):
        text = model.generate(sudoku.prompt_text(puzzle), seed=seed).text
        if sudoku.check_answer(puzzle, text):
            return puzzle, text
    pytest.fail(f"the demo model solved none of 20 puzzles with seed {seed}")


def send(page, text: str) -> None:
    """Types `text`, clicks Send and waits until the reply is over (the page sets "busy", then "idle")."""
    page.evaluate("document.body.dataset.state = 'sent'")
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_selector("body[data-state=idle]", state="attached")


def test_page_is_one_offline_file() -> None:
    html = PAGE.read_text(encoding="utf-8")
    urls = re.findall(r"(?i)https?://[^\s\"'<>)]+", html)
    assert all(re.match(r"(?i)https?://(127\.0\.0\.1|localhost)[:/]", u) for u in urls), urls
    assert not re.search(r"(?i)<(script|link|img|iframe)\b[^>]*\b(src|href)=[\"'](?!data:)", html), \
        "the page must be self-contained"
    assert not re.search(r"(?i)@import|url\(", html), "the page must load no style sheets, fonts or images"
    for name in IDS:
        assert f'id="{name}"' in html, name


@pytest.mark.slow
def test_page_solves_a_sudoku_and_draws_the_canvas(page, server: ServerProcess, demo_model: pydgemma.Model,
                                                   tmp_path: Path) -> None:
    from PIL import Image

    assert page.title() == "pydgemma"
    for name in IDS:
        assert page.locator(f"#{name}").count() == 1, name
    assert page.evaluate("document.body.dataset.state") == "idle"

    puzzle, expected = solved_puzzle(demo_model, SEED)
    prompt = sudoku.prompt_text(puzzle)
    page.fill("#seed", str(SEED))
    send(page, prompt)

    answer = page.locator("#messages .msg.assistant .content").last.inner_text()
    assert sudoku.check_answer(puzzle, answer), (puzzle, answer)
    messages = [{"role": "user", "content": prompt}]
    assert answer == api_reply(server, messages, SEED) == expected
    assert page.locator("#messages .msg.error").count() == 0

    assert page.locator("#canvas .cell").count() == demo_model.hparams["canvas_length"] == 24
    assert page.locator("#canvas .cell.accepted").count() >= 1
    caption = page.inner_text("#canvas-caption")
    assert re.fullmatch(r"canvas 0 · step \d+ · mean entropy [0-9.e+-]+", caption), caption
    pieces = page.locator("#canvas .cell").all_inner_texts()
    assert "".join(pieces).replace("·", "").startswith(answer), (pieces, answer)

    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    region = Image.open(io.BytesIO(page.locator("#canvas").screenshot())).convert("RGB")
    assert any(lo < hi for lo, hi in region.getextrema()), "the canvas region is one colour"

    # A second turn sends the whole conversation, the first answer as an assistant turn.
    sent = []
    page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and sent.append(json.loads(r.post_data)))
    send(page, prompt)
    assert sent and sent[0]["messages"] == messages + [{"role": "assistant", "content": answer},
                                                       {"role": "user", "content": prompt}]
    assert sent[0]["seed"] == SEED and sent[0]["stream"] and sent[0]["stream_drafts"]
    assert sent[0]["chat_template_kwargs"] == {"enable_thinking": False}
    assert page.locator("#messages .msg.assistant").count() == 2

    assert page.problems == []
    assert all(url.startswith(server.url + "/") for url in page.requests), page.requests


def test_page_sends_the_api_key_and_shows_errors(page, server: ServerProcess) -> None:
    sent = []

    def reject(route):
        sent.append(route.request.headers.get("authorization"))
        route.fulfill(status=401, content_type="application/json",
                      body=json.dumps({"error": {"message": "the API key is wrong", "type": "authentication_error",
                                                 "code": "invalid_api_key"}}))

    page.route("**/v1/chat/completions", reject)
    page.check("#thinking")
    page.fill("#api-key", "secret-key")
    send(page, "hi")
    assert sent == ["Bearer secret-key"]
    assert "the API key is wrong" in page.inner_text("#messages .msg.error")
    assert page.locator("#messages .msg.assistant").count() == 0
    assert page.evaluate("localStorage.getItem('pydgemma.apiKey')") == "secret-key"

    # The failed turn is not part of the conversation: the next request holds only the new message.
    bodies = []
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: (bodies.append(json.loads(route.request.post_data)),
                                                        route.fulfill(status=400, content_type="application/json",
                                                                      body='{"error": {"message": "bad", "type": "x", "code": null}}')))
    send(page, "again")
    assert bodies[0]["messages"] == [{"role": "user", "content": "again"}]
    assert bodies[0]["chat_template_kwargs"] == {"enable_thinking": True}
    # A mocked 401/400 is logged by Chromium as a failed resource; nothing else may be.
    assert [p for p in page.problems if "status of 40" not in p] == []
