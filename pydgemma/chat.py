"""Chat: the GGUF's own chat template rendered with Jinja2 (Hugging Face semantics), thinking
mode, and multi-turn sessions that reuse the prompt KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Sequence

from .errors import PydgemmaError

if TYPE_CHECKING:
    from .generate import Generation
    from .model import Model

CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"


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
        raise PydgemmaError(f"the model's chat template does not parse: {exc}", "DG_ERR_FORMAT") from exc


def render(template: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
           enable_thinking: bool = False, special: dict[str, str] | None = None, tools: list | None = None) -> str:
    """Renders `messages` as transformers' apply_chat_template does (same variables; `tools` are
    OpenAI function tools, see pydgemma.tools.normalize_messages)."""
    from jinja2 import TemplateError

    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking, tools=tools, **(special or {}))
    except TemplateError as exc:
        raise PydgemmaError(f"the chat template failed: {exc}", "DG_ERR_FORMAT") from exc


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
        from .generate import generate_in_context

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
