"""Gemma 4 tool calling: the text of calls and results, and the OpenAI message shapes the chat
template reads. Pure Python (no server imports).

The format is the one Google's Gemma 4 chat template writes (its `format_argument` macro)::

    call       <|tool_call>call:NAME{key:VALUE,...}<tool_call|>   (the model writes these, back to back;
                                                                  then <|tool_response>, an end-of-generation token)
    result     <|tool_response>response:NAME{key:VALUE,...}<tool_response|>   (a mapping result)
               <|tool_response>response:NAME{value:VALUE}<tool_response|>     (any other result, e.g. a string)
    declared   <|tool>declaration:NAME{description:<|"|>...<|"|>,parameters:{...}}<tool|>  (system turn)

    VALUE      <|"|>text<|"|>    a string: everything up to the next <|"|>, literally (there are no escapes)
               42  -1.5  1e-05   a number, spelled as Python/Jinja print it
               true  false       booleans
               None              null (Jinja prints None so; `null` is read too)
               {key:VALUE,...}   an object: bare keys, sorted case-insensitively (Jinja's dictsort)
               [VALUE,...]       an array

Reading is strict apart from whitespace between items: a call that does not parse completely
(unterminated, a bare word, a JSON "quoted" string, no <tool_call|>) stays in the content as plain
text. Quoted strings are not a fallback because neither the template nor vLLM's gemma4 parser
treats `"` as a delimiter, and a bare word usually means the <|"|> tokens were lost in
detokenization (a CONTROL token dropped without render_special), which should show, not be
guessed at. Keys may also be written <|"|>key<|"|> (the template's escaped-key form)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .chat_format import CALL_CLOSE, CALL_OPEN, RESPONSE_CLOSE, RESPONSE_OPEN, STRING_DELIM  # noqa: F401

__all__ = ["ToolCall", "format_value", "normalize_messages", "parse_tool_calls", "render_tool_call",
           "render_tool_response"]

MAX_DEPTH = 64  # nested objects/arrays; deeper is malformed (and never a recursion error)

_NAME = re.compile(r"[^\s{}\[\]<>,:\"]+")
_KEY = re.compile(r"[^:{}\[\],<\"]+")
_SCALAR = re.compile(r"[^\s,{}\[\]<]+")
_INT = re.compile(r"-?\d+")
_FLOAT = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_LITERALS = {"true": True, "false": False, "null": None, "None": None}
_SPACE = " \t\r\n"


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        """The arguments as OpenAI's `function.arguments` string."""
        return json.dumps(self.arguments, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------
# Writing


def _dictsort(mapping: Mapping) -> list[tuple[Any, Any]]:
    """Jinja's `dictsort` (by key, case-insensitive, stable)."""
    return sorted(mapping.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])


def format_value(value: Any) -> str:
    """`value` in the Gemma 4 syntax, byte for byte as the template's `format_argument` writes it
    (bare keys). To be read back, a string must not contain <|"|>, nor a key any of `: , { } [ ] < "`."""
    if isinstance(value, str):
        return STRING_DELIM + value + STRING_DELIM
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in _dictsort(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)  # numbers; None prints as "None", as Jinja prints it


def render_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """`<|tool_call>call:NAME{...}<tool_call|>`: an earlier call of the model, as the template writes it."""
    return f"{CALL_OPEN}call:{name}{format_value(arguments)}{CALL_CLOSE}"


def render_tool_response(name: str, content: Any) -> str:
    """The text of a tool result, as the template writes a `role: "tool"` message: a mapping as
    `response:NAME{k:v,...}`, anything else (a string included, JSON or not) as
    `response:NAME{value:...}`. Strings are not parsed as JSON, like the template (re-rendering
    JSON would reorder and reformat what the tool returned: llama.cpp PR #21522)."""
    body = format_value(content) if isinstance(content, Mapping) else "{value:" + format_value(content) + "}"
    return f"{RESPONSE_OPEN}response:{name}{body}{RESPONSE_CLOSE}"


# ------------------------------------------------------------------------------------------------
# Reading


class _Malformed(Exception):
    pass


class _Reader:
    def __init__(self, text: str, pos: int) -> None:
        self.text, self.pos = text, pos

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _SPACE:
            self.pos += 1

    def peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def expect(self, s: str) -> None:
        if not self.peek(s):
            raise _Malformed
        self.pos += len(s)

    def match(self, pattern: re.Pattern) -> str:
        m = pattern.match(self.text, self.pos)
        if not m:
            raise _Malformed
        self.pos = m.end()
        return m.group()

    def string(self) -> str:
        self.expect(STRING_DELIM)
        end = self.text.find(STRING_DELIM, self.pos)
        if end < 0:
            raise _Malformed
        s, self.pos = self.text[self.pos:end], end + len(STRING_DELIM)
        return s

    def key(self) -> str:
        key = self.string() if self.peek(STRING_DELIM) else self.match(_KEY).strip()
        if not key:
            raise _Malformed
        return key

    def items(self, close: str, depth: int, item) -> None:
        """`item()` for each comma-separated item up to `close`."""
        if depth > MAX_DEPTH:
            raise _Malformed
        self.skip_space()
        if self.peek(close):
            self.pos += 1
            return
        while True:
            item()
            self.skip_space()
            if self.peek(close):
                self.pos += 1
                return
            self.expect(",")
            self.skip_space()

    def object(self, depth: int = 0) -> dict[str, Any]:
        self.expect("{")
        out: dict[str, Any] = {}

        def member() -> None:
            key = self.key()
            self.skip_space()
            self.expect(":")
            self.skip_space()
            out[key] = self.value(depth)

        self.items("}", depth + 1, member)
        return out

    def array(self, depth: int) -> list[Any]:
        self.expect("[")
        out: list[Any] = []
        self.items("]", depth + 1, lambda: out.append(self.value(depth)))
        return out

    def value(self, depth: int) -> Any:
        if self.peek(STRING_DELIM):
            return self.string()
        if self.peek("{"):
            return self.object(depth + 1)
        if self.peek("["):
            return self.array(depth + 1)
        word = self.match(_SCALAR)
        if word in _LITERALS:
            return _LITERALS[word]
        if _INT.fullmatch(word):
            return int(word)
        if _FLOAT.fullmatch(word):
            return float(word)
        raise _Malformed

    def call(self) -> ToolCall:
        """`call:NAME{...}<tool_call|>`, read after a <|tool_call>."""
        self.skip_space()
        self.expect("call:")
        self.skip_space()
        name = self.match(_NAME)
        self.skip_space()
        arguments = self.object()
        self.skip_space()
        self.expect(CALL_CLOSE)
        return ToolCall(name, arguments)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of generated text detokenized with its special tokens rendered. The
    content is the text outside well-formed calls, unchanged (malformed calls included, as
    text); never raises on any input."""
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while (start := text.find(CALL_OPEN, pos)) >= 0:
        reader = _Reader(text, start + len(CALL_OPEN))
        try:
            call = reader.call()
        except _Malformed:  # plain text: look for the next <|tool_call> after this one
            content.append(text[pos:start + len(CALL_OPEN)])
            pos = start + len(CALL_OPEN)
            continue
        content.append(text[pos:start])
        calls.append(call)
        pos = reader.pos
    content.append(text[pos:])
    return "".join(content), calls


# ------------------------------------------------------------------------------------------------
# OpenAI messages -> what the chat template reads

_ROLES = ("system", "developer", "user", "assistant", "tool")


def _text(content: Any, where: str) -> str:
    """A string, or OpenAI content parts [{type: "text", text}], joined as the template joins them."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(f"{where}.content[{j}]: unsupported content part {kind!r} (only text parts)")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"{where}.content must be a string or a list of text parts, not {type(content).__name__}")


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping) or call.get("type", "function") != "function":
        raise ValueError(f"{where} must be a function call object")
    fn = call.get("function")
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where}.function must be an object with a name")
    arguments = fn.get("arguments")
    if arguments is None or arguments == "":
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}.function.arguments is not valid JSON: {exc}") from None
    if not isinstance(arguments, Mapping):
        raise ValueError(f"{where}.function.arguments must be a JSON object")
    out: dict[str, Any] = {"id": call["id"]} if isinstance(call.get("id"), str) else {}
    out.update(type="function", function={"name": fn["name"], "arguments": dict(arguments)})
    return out


def _tool_result(message: Mapping, calls: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """A role "tool" message answering one of `calls`, with the name of the call it answers."""
    call_id, name, content = message.get("tool_call_id"), message.get("name"), message.get("content")
    if call_id is not None and not isinstance(call_id, str):
        raise ValueError(f"{where}.tool_call_id must be a string")
    if name is None:
        name = next((c["function"]["name"] for c in calls if call_id is not None and c.get("id") == call_id), None)
        if name is None:
            raise ValueError(f"{where}: tool_call_id {call_id!r} answers no call of the assistant message before it")
    elif not isinstance(name, str):
        raise ValueError(f"{where}.name must be a string")
    body = content if isinstance(content, Mapping) else "" if content is None else _text(content, where)
    out: dict[str, Any] = {"role": "tool", "name": name, "content": body}
    if call_id is not None:
        out["tool_call_id"] = call_id
    return out


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ValueError("tools must be a list of function tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}] must be a function tool ({{type: 'function', function: {{...}}}})")
        fn = tool.get("function")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}].function must be an object with a name")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], Mapping):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append({"type": "function", "function": dict(fn)})
    return out


def normalize_messages(messages: Any, tools: Any = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) in the shape Gemma 4's chat template reads, from OpenAI's chat format.

    Google's current template reads OpenAI's shapes itself (assistant `tool_calls`; `role: "tool"`
    results, found by scanning forward from the assistant message that made the calls), so they
    stay messages; this function only makes them uniform: content parts become one string,
    `tool_calls[].function.arguments` (a JSON string from OpenAI clients) becomes a dict (the
    template writes a string argument verbatim inside braces), a tool result gets the `name` of
    the call its `tool_call_id` answers, and unknown keys are dropped. A tool result's content
    stays a string (or a dict, if given one). Raises ValueError with a one-line message when a
    message is malformed, including a tool result that follows no assistant tool calls (the
    template would silently drop it)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ValueError("messages must be a list of message objects")
    out: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] | None = None  # the tool calls that tool results may answer now
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where} must be an object, not {type(message).__name__}")
        role = message.get("role")
        if role is None:
            raise ValueError(f"{where} has no role")
        if role not in _ROLES:
            raise ValueError(f"{where}: unknown role {role!r} (expected one of {', '.join(_ROLES)})")
        content = message.get("content")
        if role == "tool":
            if calls is None:
                raise ValueError(f"{where}: a tool message must follow an assistant message with tool_calls")
            out.append(_tool_result(message, calls, where))
            continue
        calls = None
        msg: dict[str, Any] = {"role": role}
        if role == "assistant":
            msg["content"] = "" if content is None else _text(content, where)
            tool_calls = message.get("tool_calls")
            if tool_calls:
                if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, (str, bytes)):
                    raise ValueError(f"{where}.tool_calls must be a list")
                calls = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(tool_calls)]
                msg["tool_calls"] = calls
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                msg["reasoning_content"] = reasoning
        else:
            if content is None:
                raise ValueError(f"{where} ({role}) has no content")
            msg["content"] = _text(content, where)
        out.append(msg)
    return out, _tools(tools)
