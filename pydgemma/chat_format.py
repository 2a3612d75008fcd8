"""The chat format, in one place: the GGUF's own chat template rendered with Jinja2 (Hugging Face
semantics), the thinking channel split from a reply, and the markers of thoughts and tool calls.
No pydgemma imports: the runtime, the tool-call parser and the server build on this module."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any, Sequence

CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"  # thoughts: <|channel>thought\n...<channel|>
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"  # the body is parsed by pydgemma.tools
RESPONSE_OPEN, RESPONSE_CLOSE = "<|tool_response>", "<tool_response|>"
STRING_DELIM = '<|"|>'  # around string values inside tool calls


class ChatTemplateError(ValueError):
    """The chat template does not parse, or failed while rendering (the message says which)."""


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template does not parse: {exc}") from exc


def render(template: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
           enable_thinking: bool = False, special: dict[str, str] | None = None, tools: list | None = None) -> str:
    """Renders `messages` as transformers' apply_chat_template does (same variables; `tools` are
    OpenAI function tools, see pydgemma.tools.normalize_messages)."""
    from jinja2 import TemplateError

    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking, tools=tools, **(special or {}))
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template failed: {exc}") from exc


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, content) of a reply written as '<|channel>thought\\n...<channel|>answer'."""
    if CHANNEL_OPEN not in text:
        return "", text
    before, _, rest = text.partition(CHANNEL_OPEN)
    thought, closed, after = rest.partition(CHANNEL_CLOSE)
    if thought.startswith("thought"):
        thought = thought[len("thought"):]
    if not closed:  # the model never closed its thoughts
        return thought.strip(), before.strip()
    return thought.strip(), (before + after).strip()
