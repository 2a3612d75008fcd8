"""Generated tokens -> what an OpenAI client sees: `reasoning_content`, `content` and `tool_calls`,
as deltas while canvases are decided, and the finish reason. Pure Python over a Model's tokenizer.

The text is rebuilt from token ids with the structural tokens (channel, tool-call and string
delimiters) written out whatever their type in the GGUF, and every other control token dropped:
published files type <|"|> differently (user-defined in ours and llama.cpp's converter, control in
at least one BF16 export, which plain detokenization drops).

    <|channel>thought\\n ... <channel|>   -> reasoning (never content); an unclosed channel is all reasoning
    <|tool_call>call:NAME{...}<tool_call|> -> tool_calls (held back while open; a call that does not parse
                                            is returned as text)
    a stop string                          -> the text ends before it (finish_reason "stop")

A delta never ends inside something that could still become a marker or a stop string, nor inside
a UTF-8 character: that tail waits for the next canvas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from ..chat_format import CHANNEL_CLOSE, CHANNEL_OPEN
from ..tools import CALL_CLOSE, CALL_OPEN, STRING_DELIM, ToolCall, parse_tool_calls

if TYPE_CHECKING:
    from ..model import Model

STRUCTURAL = (CHANNEL_OPEN, CHANNEL_CLOSE, CALL_OPEN, CALL_CLOSE, STRING_DELIM)
THOUGHT = "thought"


class TokenText:
    """Text of token ids: runs of ordinary tokens through the tokenizer (control tokens dropped, byte
    fallback joined), structural tokens spelled out."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.structural: dict[int, str] = {}
        self._pieces: dict[int, str] = {}
        for marker in STRUCTURAL:
            ids = model.tokenize(marker, add_special=False, parse_special=True)
            if len(ids) == 1:
                self.structural[ids[0]] = marker

    def piece(self, token_id: int) -> str:
        """The text of one token (cached: drafts ask for every position at every step)."""
        t = int(token_id)
        text = self._pieces.get(t)
        if text is None:
            text = self._pieces[t] = self([t])
        return text

    def __call__(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        run: list[int] = []
        for t in ids:
            marker = self.structural.get(int(t))
            if marker is None:
                run.append(int(t))
                continue
            if run:
                out.append(self.model.detokenize(run))
                run = []
            out.append(marker)
        if run:
            out.append(self.model.detokenize(run))
        return "".join(out)


def _held_tail(text: str, needles: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `needles`."""
    best = 0
    for needle in needles:
        for k in range(min(len(needle) - 1, len(text)), best, -1):
            if text.endswith(needle[:k]):
                best = k
                break
    return best


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


@dataclass
class Finished:
    reasoning: str
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"  # stop, length, tool_calls
    completion_tokens: int = 0


class Assembler:
    """Feed it the tokens of each decided canvas (`feed`), then `finish`. `prefix` is generated text
    the prompt already holds (a forced tool call's opening). `parse_tools`: False returns calls as text."""

    def __init__(self, text_of: TokenText, *, eog_ids: Sequence[int], stop: Sequence[str] = (), max_tokens: int,
                 parse_tools: bool = True, prefix: str = "") -> None:
        self.text_of = text_of
        self.eog = set(int(i) for i in eog_ids)
        self.stop = [s for s in stop if s]
        self.max_tokens = max_tokens
        self.parse_tools = parse_tools
        self.prefix = prefix
        self.tokens: list[int] = []
        self.ended = False          # an end-of-generation token, a stop string or max_tokens
        self.hit_stop = False
        self._raw = prefix          # the text so far (prefix included)
        self._reasoning_sent = 0    # characters of reasoning / content already given out
        self._content_sent = 0

    # -- feeding ---------------------------------------------------------------------------------
    def feed(self, canvas_ids: Sequence[int]) -> Delta:
        """Takes a decided canvas; returns what can be shown now. Sets `ended` when the reply is over."""
        if self.ended:
            return Delta()
        for t in canvas_ids:
            if int(t) in self.eog or len(self.tokens) >= self.max_tokens:
                self.ended = True
                break
            self.tokens.append(int(t))
        self._raw = self.prefix + self.text_of(self.tokens)
        if self.stop:
            cut = min((i for i in (self._raw.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self._raw = self._raw[:cut]
                self.ended = self.hit_stop = True
        return self._delta(final=self.ended)

    def _split(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, content) of `text`, content ending where a tool call or a held tail begins."""
        reasoning_parts: list[str] = []
        content_parts: list[str] = []
        rest = text
        while rest:
            i = rest.find(CHANNEL_OPEN)
            if i < 0:
                content_parts.append(rest)
                break
            content_parts.append(rest[:i])
            body, closed, rest = rest[i + len(CHANNEL_OPEN):].partition(CHANNEL_CLOSE)
            if not closed and not final:
                # the channel's name may still be arriving; hold a tail that could become <channel|>
                body = body[: len(body) - _held_tail(body, [CHANNEL_CLOSE])]
            if body.startswith(THOUGHT):
                body = body[len(THOUGHT):].lstrip("\n")
            elif THOUGHT.startswith(body) and not final:
                body = ""
            reasoning_parts.append(body)
            if not closed:
                rest = ""
        content = "".join(content_parts)
        if not final:
            hold = [CHANNEL_OPEN] + self.stop + ([CALL_OPEN] if self.parse_tools else [])
            if self.parse_tools and CALL_OPEN in content:
                content = content[: content.index(CALL_OPEN)]  # a call (or text after one) waits for the end
            content = content[: len(content) - _held_tail(content, hold)]
            while content.endswith("\ufffd"):
                content = content[:-1]
        return "".join(reasoning_parts), content

    def _delta(self, final: bool) -> Delta:
        reasoning, content = self._split(self._raw, final)
        if final and self.parse_tools:
            content = parse_tool_calls(content)[0]
        d = Delta(reasoning[self._reasoning_sent:], content[self._content_sent:])
        # a later, longer view of the text always extends what was given out
        self._reasoning_sent = max(self._reasoning_sent, len(reasoning))
        self._content_sent = max(self._content_sent, len(content))
        return d

    # -- the end ---------------------------------------------------------------------------------
    def finish(self, *, cancelled: bool = False) -> tuple[Delta, Finished]:
        """The last delta and the whole reply."""
        self.ended = True
        last = self._delta(final=True)
        reasoning, content = self._split(self._raw, final=True)
        calls: list[ToolCall] = []
        if self.parse_tools:
            content, calls = parse_tool_calls(content)
        content = content.strip() if calls else content
        if calls:
            reason = "tool_calls"
        elif self.hit_stop or (len(self.tokens) < self.max_tokens and not cancelled):
            reason = "stop"
        else:
            reason = "length"
        return last, Finished(reasoning.strip(), content, calls, reason, len(self.tokens))
