"""The server's reply assembly from token ids (pydgemma.server.stream): thinking never in content,
tool calls parsed from ids whatever the GGUF's type for <|"|>, stop strings, deltas that never end
inside a marker, and the same result however the tokens are split into canvases."""

from __future__ import annotations

from pathlib import Path

import pytest

import pydgemma
from pydgemma.server.stream import Assembler, TokenText
from pydgemma.tools import render_tool_call
from test_tools import ARGS, CONTROL, Q, TEXT, USER_DEFINED, tool_gguf


@pytest.fixture(scope="module")
def model(converted: dict[str, Path]) -> pydgemma.Model:
    return pydgemma.Model(converted["f32"])


def run(model: pydgemma.Model, text: str, canvas: int, **kw):
    """Feeds the ids of `text` in canvases of `canvas` tokens; returns (deltas, finished)."""
    ids = model.tokenize(text, add_special=False, parse_special=True)
    asm = Assembler(TokenText(model), eog_ids=model.eog_ids, max_tokens=kw.pop("max_tokens", 10_000), **kw)
    deltas = []
    for i in range(0, len(ids), canvas):
        deltas.append(asm.feed(ids[i:i + canvas]))
        if asm.ended:
            break
    last, fin = asm.finish()
    deltas.append(last)
    return deltas, fin


@pytest.mark.parametrize("canvas", [1, 2, 3, 5, 16, 1000])
def test_thinking_is_never_content(model: pydgemma.Model, canvas: int) -> None:
    text = "<|channel>thought\nThe user wants a poem.<channel|>The sea is wide."
    deltas, fin = run(model, text, canvas)
    assert fin.reasoning == "The user wants a poem." and fin.content == "The sea is wide."
    assert "".join(d.reasoning for d in deltas) == "The user wants a poem."
    assert "".join(d.content for d in deltas) == "The sea is wide."
    for d in deltas:
        assert "<|channel>" not in d.content and "<channel|>" not in d.content and "thought" not in d.content


def test_unclosed_thinking_is_all_reasoning(model: pydgemma.Model) -> None:
    _, fin = run(model, "<|channel>thought\nstill thinking", 4)
    assert fin.reasoning == "still thinking" and fin.content == ""


@pytest.mark.parametrize("canvas", [1, 4, 1000])
def test_tool_calls_from_ids(model: pydgemma.Model, canvas: int) -> None:
    args = {"city": "Paris, {France}: \"x\"", "days": 3, "units": {"temp": "C", "wind": [1, 2.5, True, None]}}
    text = "Let me look.\n" + render_tool_call("get_weather", args) + render_tool_call("get_time", {"tz": "CET"})
    deltas, fin = run(model, text, canvas)
    assert [(c.name, c.arguments) for c in fin.tool_calls] == [("get_weather", args), ("get_time", {"tz": "CET"})]
    assert fin.finish_reason == "tool_calls" and fin.content == "Let me look."
    streamed = "".join(d.content for d in deltas)
    assert "<|tool_call>" not in streamed and streamed.strip() == "Let me look."


def test_a_malformed_call_is_text(model: pydgemma.Model) -> None:
    text = "<|tool_call>call:broken{city:<|\"|>Paris}<tool_call|> after"
    deltas, fin = run(model, text, 3)
    assert fin.tool_calls == [] and fin.finish_reason == "stop"
    assert fin.content == text and "".join(d.content for d in deltas) == text


@pytest.mark.parametrize("quote_type", [USER_DEFINED, CONTROL])
def test_tool_calls_parse_whatever_the_string_delimiters_type(make_gguf, quote_type: int) -> None:
    """<|"|> typed USER_DEFINED (ours, llama.cpp's converter) or CONTROL (one published BF16 export):
    with CONTROL, plain detokenization drops it; the assembler still writes it out."""
    with pydgemma.Model(tool_gguf(make_gguf, quote_type)) as m:
        ids = m.tokenize(TEXT, add_special=False, parse_special=True)
        assert (Q in m.detokenize(ids)) == (quote_type == USER_DEFINED)
        _, fin = run(m, TEXT, 3)
        assert [(c.name, c.arguments) for c in fin.tool_calls] == [("get_weather", ARGS), ("now", {})]
        assert fin.content == "I'll check." and fin.finish_reason == "tool_calls"


def test_stop_strings_and_held_tails(model: pydgemma.Model) -> None:
    deltas, fin = run(model, "The quick brown fox jumps over the lazy dog", 1, stop=["fox j"])
    assert fin.content == "The quick brown " and fin.finish_reason == "stop"
    assert "".join(d.content for d in deltas) == "The quick brown "
    assert all("fox" not in d.content for d in deltas)


def test_length_and_eog(model: pydgemma.Model) -> None:
    _, fin = run(model, "The quick brown fox jumps over the lazy dog", 2, max_tokens=3)
    assert fin.finish_reason == "length" and fin.completion_tokens == 3
    _, fin = run(model, "The quick<turn|> brown fox", 2)
    assert fin.finish_reason == "stop" and fin.content == "The quick"
