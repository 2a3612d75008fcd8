"""Gemma 4 tool calling (pydgemma.tools): reading calls from generated text (nested values, special
characters, several calls, malformed calls left as text), writing calls and results as the chat
template does, OpenAI message normalisation and its errors, the tiny checkpoint's template with
tools (against transformers' apply_chat_template), and the round trip through token ids with the
string delimiter <|"|> typed USER_DEFINED or CONTROL."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

import pydgemma
import tiny_gguf
from pydgemma.chat import render
from pydgemma.models.tiny_checkpoint import CHAT_TEMPLATE
from pydgemma.tools import ToolCall, format_value, normalize_messages, parse_tool_calls, render_tool_call, render_tool_response

Q = '<|"|>'
BOS = {"bos_token": "<bos>"}


def call(name: str, body: str) -> str:
    return f"<|tool_call>call:{name}{body}<tool_call|>"


# ------------------------------------------------------------------------------------------------
# Reading calls


def test_one_call() -> None:
    content, calls = parse_tool_calls(call("get_weather", f"{{city:{Q}Paris{Q},days:3}}"))
    assert content == ""
    assert calls == [ToolCall("get_weather", {"city": "Paris", "days": 3})]
    assert calls[0].arguments_json == '{"city": "Paris", "days": 3}'
    assert ToolCall("f", {"a": "é"}).arguments_json == '{"a": "é"}'  # not \u00e9


def test_values() -> None:
    body = (f"{{s:{Q}x{Q},i:42,neg:-7,f:3.25,nf:-0.5,e:1e-05,E:-2.5E+3,big:12345678901234567890,t:true,"
            f"fa:false,n:null,N:None,o:{{a:{{b:[1,{Q}two{Q},{{c:false}}]}}}},a:[],oo:{{}},aa:[[[]]]}}")
    _, [c] = parse_tool_calls(call("f", body))
    assert c.arguments == {"s": "x", "i": 42, "neg": -7, "f": 3.25, "nf": -0.5, "e": 1e-05, "E": -2500.0,
                           "big": 12345678901234567890, "t": True, "fa": False, "n": None, "N": None,
                           "o": {"a": {"b": [1, "two", {"c": False}]}}, "a": [], "oo": {}, "aa": [[[]]]}
    assert [type(c.arguments[k]) for k in ("i", "f", "e", "t", "big")] == [int, float, float, bool, int]
    assert json.loads(c.arguments_json) == c.arguments


@pytest.mark.parametrize("text", [
    "a{b}c", "x, y: z", 'say "hi" and \'bye\'', "line\nbreak\r\n\ttab", "back\\slash \\n \\\" \\u0041",
    "}]<tool_call|><|tool_call>call:g{}", "<|turn>user\n", "<", "|>", "", "   ", "日本語 😀 café", "{a:1}",
])
def test_strings_are_literal(text: str) -> None:
    _, [c] = parse_tool_calls(call("f", f"{{k:{Q}{text}{Q},l:[{Q}{text}{Q}]}}"))
    assert c.arguments == {"k": text, "l": [text]}
    assert json.loads(c.arguments_json)["k"] == text


def test_whitespace_and_quoted_keys() -> None:
    body = f"{{ \n a : 1 ,\n\t{Q}b c{Q} : [ 1 , {Q}x{Q} ] , d:{{ e : true }} \n}}"
    _, calls = parse_tool_calls(f"<|tool_call> call: f_1.v-2 {body} <tool_call|>")
    assert calls == [ToolCall("f_1.v-2", {"a": 1, "b c": [1, "x"], "d": {"e": True}})]


def test_several_calls_and_content() -> None:
    text = ("Let me check.\n" + call("a", "{}") + call("b", f"{{x:{Q}1{Q}}}") + " and " + call("a", "{n:2}")
            + "\ndone")
    content, calls = parse_tool_calls(text)
    assert content == "Let me check.\n and \ndone"
    assert calls == [ToolCall("a", {}), ToolCall("b", {"x": "1"}), ToolCall("a", {"n": 2})]
    assert parse_tool_calls("no calls here") == ("no calls here", [])
    assert parse_tool_calls("") == ("", [])


GOOD = call("get_weather", f"{{city:{Q}Paris{Q},o:{{l:[1,2.5,true,None]}}}}")


@pytest.mark.parametrize("text", [
    "<|tool_call>",
    "<|tool_call>call:f",
    "<|tool_call>call:f{a:1}",  # no <tool_call|>
    f"<|tool_call>call:f{{a:{Q}open}}<tool_call|>",  # unterminated string
    "<|tool_call>f{a:1}<tool_call|>",  # no call:
    "<|tool_call>call:{a:1}<tool_call|>",  # no name
    "<|tool_call>call:f<tool_call|>",  # no arguments
    "<|tool_call>call:f(a=1)<tool_call|>",
    "<|tool_call>call:f{a:Paris}<tool_call|>",  # a bare word (a lost <|\"|>)
    '<|tool_call>call:f{a:"Paris"}<tool_call|>',  # JSON quotes are not a delimiter
    '<|tool_call>call:f{"a":1}<tool_call|>',
    '<|tool_call>call:f{a"b:1}<tool_call|>',
    "<|tool_call>call:f{a:1,}<tool_call|>",
    "<|tool_call>call:f{,a:1}<tool_call|>",
    "<|tool_call>call:f{a 1}<tool_call|>",
    "<|tool_call>call:f{a:}<tool_call|>",
    "<|tool_call>call:f{:1}<tool_call|>",
    "<|tool_call>call:f{a:1 b:2}<tool_call|>",
    "<|tool_call>call:f{a:[1,2}<tool_call|>",
    "<|tool_call>call:f{a:{b:1}<tool_call|>",
    "<|tool_call>call:f{a:1}}<tool_call|>",
    "<|tool_call>call:f{a:1} x <tool_call|>",
    "<|tool_call>call:f{a:1.}<tool_call|>",
    "<|tool_call>call:f{a:0x1F}<tool_call|>",
    "<|tool_call>call:f{a:inf}<tool_call|>",
    "<|tool_call>call:f{a:True}<tool_call|>",
    "<|tool_call>call:f{a:1}<tool_call|",
    "<|tool_call>call:f{a:" + "[" * 10_000 + "]" * 10_000 + "}<tool_call|>",  # too deep: text, not RecursionError
    "<|tool_call>call:f{a:" + "{b:" * 5_000 + "1" + "}" * 5_001 + "<tool_call|>",
])
def test_malformed_calls_stay_text(text: str) -> None:
    assert parse_tool_calls(text) == (text, [])
    # ... also before a good call, which is still read
    content, calls = parse_tool_calls("x" + text + GOOD + "y")
    assert content == "x" + text + "y" and [c.name for c in calls] == ["get_weather"]


def test_every_prefix_of_a_call() -> None:
    for n in range(len(GOOD)):
        assert parse_tool_calls(GOOD[:n]) == (GOOD[:n], [])
    assert parse_tool_calls(GOOD)[1] == [ToolCall("get_weather", {"city": "Paris", "o": {"l": [1, 2.5, True, None]}})]


def test_nesting_limit() -> None:
    ok = call("f", "{a:" + "[" * 60 + "]" * 60 + "}")
    assert len(parse_tool_calls(ok)[1]) == 1
    too_deep = call("f", "{a:" + "[" * 70 + "]" * 70 + "}")
    assert parse_tool_calls(too_deep) == (too_deep, [])


def test_random_text_never_raises() -> None:
    rng = random.Random(3)
    pieces = ["<|tool_call>", "<tool_call|>", "call:", "f", "{", "}", "[", "]", ":", ",", Q, "a", "1", "-", ".",
              "e", "true", "None", " ", "\n", "x y", "<|tool_response>", '"', "\\", GOOD, GOOD[:-3], GOOD[5:]]
    n_calls = 0
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        if rng.random() < 0.5:  # a good call with one piece inserted somewhere
            at = rng.randint(0, len(GOOD))
            text = GOOD[:at] + rng.choice(pieces) + GOOD[at:]
        content, calls = parse_tool_calls(text)
        n_calls += len(calls)
        assert len(content) <= len(text)
        if not calls:
            assert content == text
        for c in calls:
            assert json.loads(c.arguments_json) == c.arguments
    assert n_calls > 0


# ------------------------------------------------------------------------------------------------
# Writing calls and results


def test_render_tool_call_format() -> None:
    args = {"unit": "c", "City": "Paris", "n": 3, "ok": True, "x": None, "f": 1.5, "e": 1e-05, "l": [1, "a", []],
            "o": {"b": 1, "A": {"z": False}}}
    assert render_tool_call("get_weather", args) == (
        "<|tool_call>call:get_weather{City:<|\"|>Paris<|\"|>,e:1e-05,f:1.5,l:[1,<|\"|>a<|\"|>,[]],n:3,"
        "o:{A:{z:false},b:1},ok:true,unit:<|\"|>c<|\"|>,x:None}<tool_call|>")
    assert render_tool_call("f", {}) == "<|tool_call>call:f{}<tool_call|>"
    assert format_value(("a", 2)) == f"[{Q}a{Q},2]"


def test_render_tool_response_format() -> None:
    assert render_tool_response("get_weather", {"temp": 20, "sky": "clear"}) == (
        "<|tool_response>response:get_weather{sky:<|\"|>clear<|\"|>,temp:20}<tool_response|>")
    # a string (JSON or not) is the template's {value:...}, verbatim
    assert render_tool_response("f", '{"temp": 20}') == '<|tool_response>response:f{value:<|"|>{"temp": 20}<|"|>}<tool_response|>'
    assert render_tool_response("f", "sunny") == '<|tool_response>response:f{value:<|"|>sunny<|"|>}<tool_response|>'
    assert render_tool_response("f", [1, 2]) == "<|tool_response>response:f{value:[1,2]}<tool_response|>"
    assert render_tool_response("f", 7) == "<|tool_response>response:f{value:7}<tool_response|>"


KEY_CHARS = "abcXYZ_-.019é日 "
STR_CHARS = 'ab Z09{}[]:,"\'\\\n\t<>|/é日😀' + "\x00"


def random_key(rng: random.Random) -> str:
    return (rng.choice("abcXYZ_é") + "".join(rng.choice(KEY_CHARS) for _ in range(rng.randint(0, 6)))).strip()


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.choice(["str", "int", "float", "bool", "none"] + (["dict", "list"] * 2 if depth < 4 else []))
    if kind == "str":
        s = "".join(rng.choice(STR_CHARS) for _ in range(rng.randint(0, 8)))
        while Q in s:  # the one thing a string cannot hold
            s = s.replace(Q, "")
        return s
    if kind == "int":
        return rng.choice([0, -1, rng.randint(-10**6, 10**6), rng.randint(0, 10**30)])
    if kind == "float":
        return rng.choice([0.5, -0.0, 1e-05, 1e16, -2.5e-300, rng.uniform(-1e6, 1e6), rng.random()])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return random_dict(rng, depth + 1)


def random_dict(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    return {random_key(rng): random_value(rng, depth) for _ in range(rng.randint(0, 4))}


def test_round_trip() -> None:  # no hypothesis in the venv: a seeded generator
    rng = random.Random(2026)
    for _ in range(2000):
        args = random_dict(rng)
        calls = [(f"tool_{rng.randint(0, 9)}", args), ("other", random_dict(rng))]
        text = "".join(render_tool_call(n, a) for n, a in calls)
        assert parse_tool_calls(text) == ("", [ToolCall(n, a) for n, a in calls]), text
        assert parse_tool_calls("Sure. " + text) == ("Sure. ", [ToolCall(n, a) for n, a in calls])


def test_writer_matches_the_template() -> None:
    # The tiny checkpoint's template writes calls and results byte for byte as render_tool_call and
    # render_tool_response do (dictsort order, None, float spelling included).
    rng = random.Random(11)
    for _ in range(300):
        args, result = random_dict(rng), random_value(rng)
        if isinstance(result, list):  # a list is content parts to the template
            result = {"items": result}
        messages = [{"role": "user", "content": "go"},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": args}}]},
                    {"role": "tool", "tool_call_id": "c1", "name": "f", "content": result}]
        text = render(CHAT_TEMPLATE, messages, special=BOS)
        assert text == ("<bos><|turn>user\ngo<turn|>\n<|turn>model\n" + render_tool_call("f", args)
                        + render_tool_response("f", result)), (args, result)


# ------------------------------------------------------------------------------------------------
# OpenAI messages


def test_normalize_messages() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": "Weather?", "name": "ann"},
        {"role": "assistant", "content": None, "reasoning_content": "need a tool", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "now", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "12:00"},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": '{"temp": 20}'}]},
        {"role": "tool", "name": "now", "content": {"t": 1}},
        {"role": "assistant", "content": "20 degrees at noon."},
    ]
    out, out_tools = normalize_messages(messages, tools)
    assert out == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "reasoning_content": "need a tool", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "c2", "type": "function", "function": {"name": "now", "arguments": {}}}]},
        {"role": "tool", "name": "now", "content": "12:00", "tool_call_id": "c2"},
        {"role": "tool", "name": "get_weather", "content": '{"temp": 20}', "tool_call_id": "c1"},
        {"role": "tool", "name": "now", "content": {"t": 1}},
        {"role": "assistant", "content": "20 degrees at noon."},
    ]
    assert out_tools == tools and out_tools is not tools
    assert normalize_messages([], None) == ([], None)
    assert normalize_messages([{"role": "user", "content": "x"}], []) == ([{"role": "user", "content": "x"}], None)
    # dict arguments are kept; the input is not modified
    m = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": [1]}}}]}]
    assert normalize_messages(m)[0][0]["tool_calls"] == [{"type": "function", "function": {"name": "f", "arguments": {"a": [1]}}}]
    assert "content" not in m[0]


ASSISTANT_CALL = {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}]}


@pytest.mark.parametrize("messages, tools, error", [
    ("hello", None, r"^messages must be a list of message objects$"),
    ([["user", "x"]], None, r"^messages\[0\] must be an object, not list$"),
    ([{"content": "x"}], None, r"^messages\[0\] has no role$"),
    ([{"role": "robot", "content": "x"}], None, r"^messages\[0\]: unknown role 'robot' \(expected one of system, developer, user, assistant, tool\)$"),
    ([{"role": "user"}], None, r"^messages\[0\] \(user\) has no content$"),
    ([{"role": "user", "content": 5}], None, r"^messages\[0\]\.content must be a string or a list of text parts, not int$"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], None,
     r"^messages\[0\]\.content\[0\]: unsupported content part 'image_url' \(only text parts\)$"),
    ([{"role": "user", "content": ["x"]}], None, r"^messages\[0\]\.content\[0\]: unsupported content part 'str'"),
    ([{"role": "tool", "content": "x", "tool_call_id": "c1"}], None,
     r"^messages\[0\]: a tool message must follow an assistant message with tool_calls$"),
    ([ASSISTANT_CALL, {"role": "user", "content": "x"}, {"role": "tool", "content": "r", "tool_call_id": "c1"}], None,
     r"^messages\[2\]: a tool message must follow"),
    ([ASSISTANT_CALL, {"role": "tool", "content": "r", "tool_call_id": "zz"}], None,
     r"^messages\[1\]: tool_call_id 'zz' answers no call of the assistant message before it$"),
    ([ASSISTANT_CALL, {"role": "tool", "content": "r", "tool_call_id": 3}], None, r"^messages\[1\]\.tool_call_id must be a string$"),
    ([ASSISTANT_CALL, {"role": "tool", "content": 1.5, "tool_call_id": "c1"}], None, r"^messages\[1\]\.content must be"),
    ([{"role": "assistant", "tool_calls": {"function": {}}}], None, r"^messages\[0\]\.tool_calls must be a list$"),
    ([{"role": "assistant", "tool_calls": [{"type": "code"}]}], None, r"^messages\[0\]\.tool_calls\[0\] must be a function call object$"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], None,
     r"^messages\[0\]\.tool_calls\[0\]\.function must be an object with a name$"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{city: Paris"}}]}], None,
     r"^messages\[0\]\.tool_calls\[0\]\.function\.arguments is not valid JSON: "),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], None,
     r"^messages\[0\]\.tool_calls\[0\]\.function\.arguments must be a JSON object$"),
    ([], "tool", r"^tools must be a list of function tools$"),
    ([], [{"type": "retrieval"}], r"^tools\[0\] must be a function tool"),
    ([], [{"type": "function"}], r"^tools\[0\]\.function must be an object with a name$"),
    ([], [{"type": "function", "function": {"name": "f", "parameters": "x"}}], r"^tools\[0\]\.function\.parameters must be a JSON schema object$"),
])
def test_normalize_errors(messages, tools, error: str) -> None:
    with pytest.raises(ValueError, match=error) as info:
        normalize_messages(messages, tools)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------
# The tiny checkpoint's template with tools

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "array", "items": {"type": "integer"}},
            "where": {"type": "object", "nullable": True, "properties": {"lat": {"type": "number"}}, "required": ["lat"]}}}}},
    {"type": "function", "function": {"name": "now", "description": "The time", "parameters": {"type": "object", "properties": {}}}},
]
DECLARATIONS = (
    "<|tool>declaration:get_weather{description:<|\"|>Current weather for a city<|\"|>,parameters:{properties:{"
    "city:{description:<|\"|>City name<|\"|>,type:<|\"|>STRING<|\"|>},"
    "days:{items:{type:<|\"|>INTEGER<|\"|>},type:<|\"|>ARRAY<|\"|>},"
    "unit:{enum:[<|\"|>celsius<|\"|>,<|\"|>fahrenheit<|\"|>],type:<|\"|>STRING<|\"|>},"
    "where:{nullable:true,properties:{lat:{type:<|\"|>NUMBER<|\"|>}},required:[<|\"|>lat<|\"|>],type:<|\"|>OBJECT<|\"|>}},"
    "required:[<|\"|>city<|\"|>],type:<|\"|>OBJECT<|\"|>}}<tool|>"
    "<|tool>declaration:now{description:<|\"|>The time<|\"|>,parameters:{type:<|\"|>OBJECT<|\"|>}}<tool|>"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": [1, 2]}'}},
        {"id": "c2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 20}'},
    {"role": "tool", "tool_call_id": "c2", "content": "12:00"},
    {"role": "assistant", "content": "20 °C at noon."},
    {"role": "user", "content": "Thanks!"},
]


def test_template_with_tools() -> None:
    messages, tools = normalize_messages(CONVERSATION, TOOLS)
    calls = ("<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,days:[1,2]}<tool_call|><|tool_call>call:now{}<tool_call|>"
             "<|tool_response>response:get_weather{value:<|\"|>{\"temp\": 20}<|\"|>}<tool_response|>"
             "<|tool_response>response:now{value:<|\"|>12:00<|\"|>}<tool_response|>")
    system = "<bos><|turn>system\nBe brief." + DECLARATIONS + "<turn|>\n<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
    assert render(CHAT_TEMPLATE, messages, tools=tools, special=BOS) == (
        system + calls + "20 °C at noon.<turn|>\n<|turn>user\nThanks!<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    # after the results the model turn is left open: no generation prompt
    assert render(CHAT_TEMPLATE, messages[:5], tools=tools, special=BOS) == system + calls
    # calls without results end with the model's stop token <|tool_response>
    assert render(CHAT_TEMPLATE, messages[:3], tools=tools, special=BOS) == system + calls.split("<|tool_response>")[0] + "<|tool_response>"
    # tools alone open a system turn; thinking puts <|think|> first
    assert render(CHAT_TEMPLATE, messages[1:2], tools=tools[1:], enable_thinking=True, special=BOS) == (
        "<bos><|turn>system\n<|think|>\n" + DECLARATIONS.split("<tool|>")[1] + "<tool|><turn|>\n"
        "<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n")
    # no tools (None or []) renders as before
    plain = [{"role": "user", "content": "Hi"}]
    assert render(CHAT_TEMPLATE, plain, tools=[], special=BOS) == render(CHAT_TEMPLATE, plain, special=BOS) == (
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")


def test_template_reasoning_between_calls() -> None:
    messages, _ = normalize_messages([
        {"role": "user", "content": "Old question"},
        {"role": "assistant", "content": None, "reasoning_content": "old thought",
         "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "r"},
        {"role": "assistant", "content": "done"},
        {"role": "user", "content": "New question"},
        {"role": "assistant", "content": None, "reasoning_content": "new thought",
         "tool_calls": [{"id": "b", "function": {"name": "f", "arguments": "{}"}}]},
    ])
    text = render(CHAT_TEMPLATE, messages, special=BOS)
    assert "old thought" not in text  # only thoughts after the last user turn are fed back
    assert text.endswith("<|turn>model\n<|channel>thought\nnew thought\n<channel|><|tool_call>call:f{}<tool_call|><|tool_response>")


def test_template_matches_transformers() -> None:
    pytest.importorskip("transformers")
    from pydgemma.models.tiny_checkpoint import build_tokenizer

    tok = build_tokenizer()
    messages, tools = normalize_messages(CONVERSATION, TOOLS)
    cases = [(messages, tools), (messages[:5], tools), (messages[:3], tools), (messages[1:2], tools),
             (messages, None), (messages[1:], tools[1:])]
    for msgs, tls in cases:
        for think in (False, True):
            for gen in (False, True):
                expected = tok.apply_chat_template(msgs, tools=tls, tokenize=False, add_generation_prompt=gen,
                                                   enable_thinking=think)
                ours = render(CHAT_TEMPLATE, msgs, tools=tls, add_generation_prompt=gen, enable_thinking=think, special=BOS)
                assert ours == expected


# ------------------------------------------------------------------------------------------------
# Through token ids

TOOL_TOKENS = ["<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", Q]
USER_DEFINED, CONTROL = 4, 3


def tool_gguf(make_gguf, quote_type: int):
    """A tiny GGUF whose vocabulary has the tool tokens (all USER_DEFINED, as our converter types them,
    but <|"|> typed `quote_type`) and "▁" (a space); everything else is byte tokens."""
    base = tiny_gguf.vocab(tiny_gguf.tiny(n_vocab=263))  # 7 specials, 256 byte tokens
    tokens = base + TOOL_TOKENS + ["\u2581"]
    types = [CONTROL] * 7 + [6] * 256 + [USER_DEFINED] * 4 + [quote_type, 1]
    return make_gguf(cfg=tiny_gguf.tiny(n_vocab=len(tokens)),
                     set_keys={"tokenizer.ggml.tokens": ("array", tokens), "tokenizer.ggml.token_type": ("array", types)})


ARGS = {"city": "San Francisco, CA", "note": 'a "quoted" {brace}: 1\n日本', "days": [1, 2], "opts": {"metric": True, "x": None}}
TEXT = "I'll check. " + render_tool_call("get_weather", ARGS) + render_tool_call("now", {})


def test_token_round_trip_user_defined(make_gguf) -> None:
    with pydgemma.Model(tool_gguf(make_gguf, USER_DEFINED)) as model:
        ids = model.tokenize(TEXT, add_special=False, parse_special=True)
        assert ids.count(263 + 4) == 4 and ids.count(263) == 2  # <|"|> and <|tool_call> are single tokens
        for render_special in (True, False):  # USER_DEFINED tokens render either way
            text = model.detokenize(ids, render_special=render_special)
            assert text == TEXT
            assert parse_tool_calls(text) == ("I'll check. ", [ToolCall("get_weather", ARGS), ToolCall("now", {})])


def test_token_round_trip_control_quote(make_gguf) -> None:
    # A GGUF may type <|"|> CONTROL: plain detokenization drops it and the call no longer parses
    # (it stays text, no exception); detokenizing with render_special=True, as the server must, works.
    with pydgemma.Model(tool_gguf(make_gguf, CONTROL)) as model:
        ids = model.tokenize(TEXT, add_special=False, parse_special=True)
        assert ids.count(263 + 4) == 4
        plain = model.detokenize(ids)
        assert Q not in plain and "<|tool_call>" in plain and "city:San Francisco, CA," in plain
        content, calls = parse_tool_calls(plain)
        assert content == plain.replace("<|tool_call>call:now{}<tool_call|>", "") and calls == [ToolCall("now", {})]
        shown = model.detokenize(ids, render_special=True)
        assert shown == TEXT
        assert parse_tool_calls(shown) == ("I'll check. ", [ToolCall("get_weather", ARGS), ToolCall("now", {})])
