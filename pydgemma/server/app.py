"""The OpenAI-compatible HTTP API over one model (FastAPI): /health, /v1/models,
/v1/chat/completions, /v1/completions, and the page at /.

Errors are OpenAI's shape, {"error": {"message", "type", "code"}}, with 400 (bad JSON, a bad field,
a prompt longer than the context), 401 (API key), 404, 405, 413 (body too large) and 503 (queue
full, with Retry-After; or still loading). Nothing a client sends stops the server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PydgemmaError
from ..generate import StepEvent
from ..tools import CALL_OPEN, normalize_messages
from .engine import Busy, Engine, Job, random_seed
from .stream import Assembler, Delta, Finished, TokenText

PAGE = Path(__file__).parent / "static" / "index.html"
_IDS = itertools.count()
_ID_PREFIX = secrets.token_hex(6)


def new_id(kind: str) -> str:
    """A unique id (uuid4 costs a getrandom call per id; this costs a counter step)."""
    return f"{kind}-{_ID_PREFIX}{next(_IDS):012x}"


@dataclass
class ServerConfig:
    model_path: str
    n_ctx: int | None = None
    device: str = "auto"
    threads: int | None = None
    think: bool = False
    max_queue: int = 16
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    sc_top_k: int = 0
    kv_type: str = "f16"
    default_max_tokens: int = 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def error_response(status: int, message: str, type_: str, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status_code=status, headers=headers)


# -- request fields -------------------------------------------------------------------------------

def _field(body: dict, name: str, types: tuple, default: Any = None, *, check=None, what: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types:
        raise ApiError(400, f"'{name}' must be {what or ' or '.join(t.__name__ for t in types)}", code="invalid_type")
    if not isinstance(value, types):
        raise ApiError(400, f"'{name}' must be {what or ' or '.join(t.__name__ for t in types)}, not {type(value).__name__}",
                       code="invalid_type")
    if check is not None and not check(value):
        raise ApiError(400, f"'{name}' = {value!r} is out of range ({what})", code="invalid_value")
    return value


@dataclass
class Options:
    max_tokens: int | None
    seed: int
    temperature: float | None
    stop: list[str]
    stream: bool
    include_usage: bool
    drafts: bool
    steps: int | None
    entropy_bound: float | None


def parse_options(body: dict) -> Options:
    n = _field(body, "n", (int,), 1)
    if n != 1:
        raise ApiError(400, f"'n' = {n}: this server returns one choice per request (n = 1)", code="invalid_value")
    max_tokens = _field(body, "max_completion_tokens", (int,), None, check=lambda v: v >= 1, what="at least 1")
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", (int,), None, check=lambda v: v >= 1, what="at least 1")
    stop = body.get("stop")
    if stop is None:
        stop_list: list[str] = []
    elif isinstance(stop, str):
        stop_list = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stop_list = list(stop)
    else:
        raise ApiError(400, "'stop' must be a string or a list of at most 16 strings", code="invalid_type")
    stream_options = _field(body, "stream_options", (dict,), {})
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be a boolean", code="invalid_type")
    seed = _field(body, "seed", (int,), None)
    return Options(
        max_tokens=max_tokens,
        seed=random_seed() if seed is None else seed & 0x7FFFFFFF,
        temperature=_field(body, "temperature", (int, float), None, check=lambda v: 0 <= v <= 2, what="0 to 2"),
        stop=stop_list,
        stream=_field(body, "stream", (bool,), False),
        include_usage=include_usage,
        drafts=_field(body, "stream_drafts", (bool,), False),
        steps=_field(body, "steps", (int,), None, check=lambda v: 1 <= v <= 1000, what="1 to 1000"),
        entropy_bound=_field(body, "entropy_bound", (int, float), None, check=lambda v: v > 0, what="positive"),
    )


def sampler_settings(defaults: dict, opts: Options) -> dict:
    """The entropy-bound sampler's settings for a request. `temperature` T scales the model's
    temperature schedule (t_max and t_min both times T; T = 1 keeps the model's; T = 0 is read as
    0.01, next to argmax decoding, since the sampler needs a positive temperature)."""
    out: dict[str, Any] = {"seed": opts.seed}
    if opts.temperature is not None:
        scale = max(float(opts.temperature), 0.01)
        out["t_max"] = defaults["t_max"] * scale
        out["t_min"] = defaults["t_min"] * scale
    if opts.steps is not None:
        out["max_steps"] = opts.steps
    if opts.entropy_bound is not None:
        out["entropy_bound"] = float(opts.entropy_bound)
    return out


# -- the app --------------------------------------------------------------------------------------

class State:
    """What the app holds: the model and its engine, once loaded."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.model = None
        self.engine: Engine | None = None
        self.text_of: TokenText | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.name = Path(config.model_path).name
        self.on_loaded = None  # called on the loading thread with the error message, or None

    def load(self) -> None:
        from ..model import Model

        try:
            model = Model(self.config.model_path, device=self.config.device, n_threads=self.config.threads)
            hp = model.hparams
            n_ctx = self.config.n_ctx or min(4096, hp["n_ctx_train"])
            self.engine = Engine(model, n_ctx=n_ctx, max_queue=self.config.max_queue, sc_top_k=self.config.sc_top_k,
                                 kv_type=self.config.kv_type)
            self.text_of = TokenText(model)
            self.model = model
        except Exception as exc:  # noqa: BLE001 - whatever it is, /health says it and serve() stops with it
            self.load_error = str(exc) if isinstance(exc, PydgemmaError) else f"{type(exc).__name__}: {exc}"
        if self.on_loaded is not None:
            self.on_loaded(self.load_error)

    @property
    def model_id(self) -> str:
        return self.name

    def defaults(self) -> dict:
        from ..sampler import default_params

        return default_params(self.model)


def create_app(config: ServerConfig, *, load_in_background: bool = True,
               load_after: threading.Event | None = None) -> FastAPI:
    """The app. The model loads on a thread when the app starts (/health says 503 until then), after
    `load_after` is set when one is given (an embedder that wants to serve before loading)."""
    state = State(config)

    def load() -> None:
        if load_after is not None:
            load_after.wait()
        state.load()

    loader = threading.Thread(target=load, name="pydgemma-load", daemon=True)
    app = FastAPI(title="pydgemma", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pydgemma = state

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        loader.start()
        if not load_in_background:
            await asyncio.get_running_loop().run_in_executor(None, loader.join)
        yield
        if state.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, state.engine.close)

    app.router.lifespan_context = lifespan

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found_error", 405: "invalid_request_error"}
        return error_response(exc.status_code, str(exc.detail), kinds.get(exc.status_code, "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    def authorize(request: Request) -> None:
        """Every /v1 route calls this first (a route-level check: an HTTP middleware costs ~0.3 ms a request)."""
        if config.api_key:
            header = request.headers.get("authorization", "")
            if not secrets.compare_digest(header.encode(), f"Bearer {config.api_key}".encode()):
                why = "no API key given (Authorization: Bearer ...)" if not header else "the API key is wrong"
                raise ApiError(401, why, "authentication_error", "invalid_api_key")

    def ready() -> tuple[Engine, Any]:
        if state.load_error:
            raise ApiError(503, f"the model failed to load: {state.load_error}", "server_error", "model_load_failed")
        if state.engine is None:
            raise ApiError(503, "the model is loading", "server_error", "loading", {"Retry-After": "2"})
        return state.engine, state.model

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise ApiError(413, f"the request body ({declared} bytes) is over the limit of {config.max_body_bytes} bytes",
                           code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise ApiError(413, f"the request body is over the limit of {config.max_body_bytes} bytes",
                               code="body_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        return body

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.load_error:
            return JSONResponse({"status": "error", "message": state.load_error}, status_code=503)
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        engine = state.engine
        return JSONResponse({"status": "ok", "model": state.model_id, "n_ctx": engine.n_ctx,
                             "canvas_length": state.model.hparams["canvas_length"], "waiting": engine.waiting,
                             "generations": dict(engine.counts)})

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "pydgemma"}]})

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8") if PAGE.exists() else "<p>pydgemma</p>")

    async def begin(request: Request) -> tuple[dict, Engine, Any, Options]:
        """What every completion route does first: the key, the body, the model, the common fields."""
        authorize(request)
        body = await read_json(request)
        engine, model = ready()
        return body, engine, model, parse_options(body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body, engine, model, opts = await begin(request)
        try:
            messages, tools = normalize_messages(body.get("messages"), body.get("tools"))
        except ValueError as exc:
            raise ApiError(400, str(exc), code="invalid_messages") from None
        if not messages:
            raise ApiError(400, "'messages' must not be empty", code="invalid_messages")
        tool_choice = body.get("tool_choice", "auto")
        prefix = ""
        if tools is None or tool_choice == "none":  # no tools: a call the model writes is text
            tools_for_template, parse_tools = None, False
        elif tool_choice == "auto":
            tools_for_template, parse_tools = tools, True
        elif tool_choice == "required":
            tools_for_template, parse_tools, prefix = tools, True, CALL_OPEN + "call:"
        elif isinstance(tool_choice, dict) and isinstance((tool_choice.get("function") or {}).get("name"), str):
            name = tool_choice["function"]["name"]
            if name not in [t["function"]["name"] for t in tools]:
                raise ApiError(400, f"tool_choice names {name!r}, which is not in 'tools'", code="invalid_value")
            tools_for_template, parse_tools, prefix = tools, True, f"{CALL_OPEN}call:{name}{{"
        else:
            raise ApiError(400, "'tool_choice' must be 'auto', 'none', 'required' or {type: 'function', function: {name}}",
                           code="invalid_value")
        kwargs = _field(body, "chat_template_kwargs", (dict,), {})
        think = kwargs.get("enable_thinking", config.think)
        if not isinstance(think, bool):
            raise ApiError(400, "'chat_template_kwargs.enable_thinking' must be a boolean", code="invalid_type")
        try:
            prompt = model.chat_prompt_ids(messages, think=think, tools=tools_for_template, generation_prefix=prefix)
        except PydgemmaError as exc:
            raise ApiError(400, str(exc), code="template_error") from None
        return await complete(request, engine, model, prompt, opts, kind="chat", parse_tools=parse_tools, prefix=prefix)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body, engine, model, opts = await begin(request)
        prompt_text = body.get("prompt")
        if isinstance(prompt_text, list) and len(prompt_text) == 1 and isinstance(prompt_text[0], str):
            prompt_text = prompt_text[0]
        if not isinstance(prompt_text, str) or not prompt_text:
            raise ApiError(400, "'prompt' must be a non-empty string", code="invalid_type")
        prompt = model.tokenize(prompt_text)
        return await complete(request, engine, model, prompt, opts, kind="text", parse_tools=False, prefix="")

    async def complete(request: Request, engine: Engine, model, prompt: list[int], opts: Options, *, kind: str,
                       parse_tools: bool, prefix: str) -> Response:
        hp = model.hparams
        C = hp["canvas_length"]
        room = (engine.n_ctx - len(prompt)) // C * C
        if room < 1:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens; with a canvas of {C} tokens it needs a context of "
                                f"at least {len(prompt) + C}, and this server's n_ctx is {engine.n_ctx}",
                           code="context_length_exceeded")
        max_tokens = min(opts.max_tokens or config.default_max_tokens, room)
        assembler = Assembler(state.text_of, eog_ids=model.eog_ids, stop=opts.stop, max_tokens=max_tokens,
                              parse_tools=parse_tools, prefix=prefix)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_step(event: StepEvent) -> bool:
            # the worker thread: decide the canvas's text here, hand the pieces to the loop
            out: dict[str, Any] = {}
            if opts.drafts:
                out["draft"] = {"canvas": event.canvas, "step": event.step, "text": state.text_of(event.argmax),
                                "pieces": [state.text_of.piece(t) for t in event.argmax],
                                "accepted": [bool(a) for a in event.accepted], "mean_entropy": float(event.mean_entropy)}
            if event.stop:
                out["delta"] = assembler.feed(event.argmax)
            if out:
                loop.call_soon_threadsafe(events.put_nowait, out)
            return not assembler.ended

        job = Job(prompt=prompt, max_new_tokens=-(-max_tokens // C) * C,
                  sampler=sampler_settings(state.defaults(), opts), eos_ids=model.eog_ids, on_step=on_step)
        try:
            done = engine.submit(job)
        except Busy:
            raise ApiError(503, f"the server is busy: {engine.max_queue} requests are waiting", "server_error",
                           "queue_full", {"Retry-After": "5"}) from None
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        created = int(time.time())

        def usage(fin: Finished) -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": fin.completion_tokens,
                    "total_tokens": len(prompt) + fin.completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": job.reused_tokens}}

        async def finished() -> tuple[Delta, Finished]:
            gen = await done
            return assembler.finish(cancelled=gen is None or gen.cancelled and not assembler.ended)

        if not opts.stream:
            waiter = asyncio.ensure_future(asyncio.shield(done))
            while not waiter.done():
                await asyncio.wait([waiter], timeout=0.25)
                if not waiter.done() and await request.is_disconnected():
                    job.cancelled.set()
            try:
                _, fin = await finished()
            except PydgemmaError as exc:
                raise ApiError(500, str(exc), "server_error") from None
            return JSONResponse(response_body(kind, rid, created, state.model_id, fin, usage(fin)))

        async def sse() -> AsyncIterator[str]:
            # one write per wake-up: the events that are there, joined
            head = _sse(chunk(kind, rid, created, state.model_id, {"role": "assistant", "content": ""} if kind == "chat" else None))
            try:
                while True:
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait([getter, done], return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        break
                    parts = [head, from_event(getter.result())]
                    head = ""
                    while not events.empty():
                        parts.append(from_event(events.get_nowait()))
                    yield "".join(parts)
                parts = [head]
                while not events.empty():
                    parts.append(from_event(events.get_nowait()))
                try:
                    last, fin = await finished()
                except PydgemmaError as exc:
                    parts.append(_sse({"error": {"message": str(exc), "type": "server_error", "code": None}}))
                    yield "".join(parts) + "data: [DONE]\n\n"
                    return
                if last:
                    parts.append(_sse(chunk(kind, rid, created, state.model_id, delta_dict(kind, last))))
                if fin.tool_calls:
                    calls = [{"index": i, "id": new_id("call"), "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments_json}} for i, c in enumerate(fin.tool_calls)]
                    parts.append(_sse(chunk(kind, rid, created, state.model_id, {"tool_calls": calls})))
                parts.append(_sse(chunk(kind, rid, created, state.model_id, {} if kind == "chat" else None, fin.finish_reason)))
                if opts.include_usage:
                    parts.append(_sse({"id": rid, "object": _object(kind, True), "created": created, "model": state.model_id,
                                       "choices": [], "usage": usage(fin)}))
                yield "".join(parts) + "data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # a client that left stops the generation at the next step

        def from_event(ev: dict) -> str:
            parts = []
            if "draft" in ev:
                c = chunk(kind, rid, created, state.model_id, {} if kind == "chat" else None)
                c["draft"] = ev["draft"]
                parts.append(_sse(c))
            d = ev.get("delta")
            if d:
                parts.append(_sse(chunk(kind, rid, created, state.model_id, delta_dict(kind, d))))
            return "".join(parts)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# -- response shapes ------------------------------------------------------------------------------

def _object(kind: str, stream: bool) -> str:
    if kind == "chat":
        return "chat.completion.chunk" if stream else "chat.completion"
    return "text_completion"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def delta_dict(kind: str, d: Delta) -> dict | str:
    if kind != "chat":
        return d.content
    out: dict[str, Any] = {}
    if d.reasoning:
        out["reasoning_content"] = d.reasoning
        out["reasoning"] = d.reasoning
    if d.content:
        out["content"] = d.content
    return out


def chunk(kind: str, rid: str, created: int, model: str, delta: Any, finish_reason: str | None = None) -> dict:
    if kind == "chat":
        choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": _object(kind, True), "created": created, "model": model, "choices": [choice]}


def response_body(kind: str, rid: str, created: int, model: str, fin: Finished, usage: dict) -> dict:
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": fin.content if (fin.content or not fin.tool_calls) else None}
        if fin.reasoning:
            message["reasoning_content"] = fin.reasoning
            message["reasoning"] = fin.reasoning
        if fin.tool_calls:
            message["tool_calls"] = [{"id": new_id("call"), "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments_json}} for c in fin.tool_calls]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": fin.finish_reason}
    else:
        choice = {"index": 0, "text": fin.content, "logprobs": None, "finish_reason": fin.finish_reason}
    return {"id": rid, "object": _object(kind, False), "created": created, "model": model, "choices": [choice],
            "usage": usage}
