"""Chat: multi-turn sessions that reuse the prompt KV cache, over the chat format of
pydgemma.chat_format (the GGUF's own template, thinking mode)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from .chat_format import CHANNEL_CLOSE, CHANNEL_OPEN, ChatTemplateError, split_thinking  # noqa: F401
from .chat_format import render as _render
from .errors import PydgemmaError
from .generate import Generation, generate_in_context

if TYPE_CHECKING:
    from .model import Model


def render(template: str, messages: Sequence[dict[str, Any]], **options: Any) -> str:
    """pydgemma.chat_format.render, failing as a PydgemmaError (DG_ERR_FORMAT)."""
    try:
        return _render(template, messages, **options)
    except ChatTemplateError as exc:
        raise PydgemmaError(str(exc), "DG_ERR_FORMAT") from exc


@dataclass
class Turn:
    role: str
    content: str


class ChatSession:
    """A conversation with one model. Each `send` renders the whole history with the chat template,
    keeps the cached prefix it shares with the previous turn, and prefills only the new tokens.
    Thoughts are never fed back (the template strips them from model turns)."""

    def __init__(self, model: Model, *, system: str | None = None, think: bool = False, n_ctx: int | None = None,
                 sc_top_k: int = 0, kv_type: str = "f16", **generate_options: Any) -> None:
        self.model = model
        self.think = think
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.ctx = model.context(n_ctx=n_ctx, sc_top_k=sc_top_k, kv_type=kv_type)
        self._cached: list[int] = []  # the tokens whose K/V the context holds
        self.options = generate_options

    def send(self, text: str, **options: Any) -> Generation:
        self.messages.append({"role": "user", "content": text})
        prompt = self.model.chat_prompt_ids(self.messages, think=self.think)
        shared = 0
        for a, b in zip(self._cached, prompt):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(prompt) - 1)  # always prefill at least one token
        self.ctx.truncate(min(shared, self.ctx.n_past))
        shared = self.ctx.n_past
        gen = generate_in_context(self.model, self.ctx, prompt[shared:], **{**self.options, **options})
        gen.timings["reused_prefix_tokens"] = float(shared)
        self._cached = prompt + gen.committed
        self.messages.append({"role": "assistant", "content": gen.raw_text})
        return gen

    @property
    def history(self) -> list[Turn]:
        return [Turn(m["role"], m["content"]) for m in self.messages]
