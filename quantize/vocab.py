"""The tokenizer of a checkpoint (tokenizer.json + tokenizer_config.json) as GGUF metadata, the way
llama.cpp's Gemma-4 converter writes it (spec section 1d): raw pieces, merges, token types, special
ids (always including a mask id), and the chat template."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import gguf

from .checkpoint import Checkpoint, CheckpointError

TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_BYTE = 1, 5, 3, 4, 6

# Tokens that must render in detokenized text, so they are USER_DEFINED even when special.
FORCED_USER_DEFINED = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                       "<tool_response|>", '<|"|>')

# tokenizer_config attribute -> GGUF key (llama.cpp's spelling, "seperator" included)
SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
    "sep_token": "tokenizer.ggml.seperator_token_id",
    "cls_token": "tokenizer.ggml.cls_token_id",
    "mask_token": "tokenizer.ggml.mask_token_id",
}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # tokenizer_config attribute -> id
    add_bos: bool = True
    add_eos: bool | None = None
    chat_template: str | None = None

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gemma4")
        w.add_token_list(self.tokens)
        w.add_token_scores([-1000.0] * len(self.tokens))
        w.add_token_types(self.token_types)
        w.add_token_merges(self.merges)
        for attr, key in SPECIAL_TOKENS.items():
            if attr in self.special_ids:
                w.add_uint32(key, self.special_ids[attr])
        w.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            w.add_add_eos_token(self.add_eos)
        w.add_add_space_prefix(False)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def _content(token: Any) -> str | None:
    if isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return token["content"]
    return None


def read_vocab(ckpt: Checkpoint, n_vocab: int) -> Vocab:
    """Reads the tokenizer; `n_vocab` is the embedding row count (the vocabulary is padded to it)."""
    tok = ckpt.json("tokenizer.json")
    cfg = ckpt.json("tokenizer_config.json", required=False) or {}
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError("tokenizer.json: expected a BPE model with a vocab (Gemma-4 tokenizer)")

    pieces: dict[int, str] = {int(i): p for p, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in tok.get("added_tokens", []) if "id" in t and "content" in t}
    for i, t in added.items():
        pieces[i] = t["content"]
    size = max(pieces) + 1 if pieces else 0
    if size > n_vocab:
        raise CheckpointError(f"the tokenizer has {size} tokens but the embedding matrix only {n_vocab} rows")
    holes = [i for i in range(size) if i not in pieces]
    if holes:
        raise CheckpointError(f"tokenizer.json has no token with id {holes[0]}")
    by_text = {p: i for i, p in pieces.items()}

    special_ids: dict[str, int] = {}
    for attr in SPECIAL_TOKENS:
        text = _content(cfg.get(attr))
        if text is not None and text in by_text:
            special_ids[attr] = by_text[text]
    config = ckpt.json("config.json")
    text_cfg = config.get("text_config") or {}
    for attr in SPECIAL_TOKENS:  # config.json ids only where tokenizer_config named nothing
        for source in (config, text_cfg):
            value = source.get(attr + "_id")
            if attr not in special_ids and isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size:
                special_ids[attr] = value
    if "mask_token" not in special_ids and "<mask>" in by_text:
        special_ids["mask_token"] = by_text["<mask>"]
    if "mask_token" not in special_ids:
        raise CheckpointError("the tokenizer has no mask token ('<mask>'); DiffusionGemma runtimes need its id")

    named = set(special_ids.values())
    for key in ("additional_special_tokens", "extra_special_tokens"):
        for t in cfg.get(key) or []:
            text = _content(t)
            if text in by_text:
                named.add(by_text[text])

    tokens, types = [], []
    for i in range(n_vocab):
        if i >= size:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
            continue
        piece = pieces[i]
        tokens.append(piece)
        if piece in FORCED_USER_DEFINED:
            types.append(TOKEN_USER_DEFINED)
        elif _BYTE_TOKEN.fullmatch(piece):
            types.append(TOKEN_BYTE)
        elif i in named or (i in added and added[i].get("special")):
            types.append(TOKEN_CONTROL)
        elif i in added:
            types.append(TOKEN_USER_DEFINED)
        else:
            types.append(TOKEN_NORMAL)

    merges = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            merges.append(m)
        elif isinstance(m, (list, tuple)) and len(m) == 2:
            merges.append(" ".join(p.replace(" ", "\u0120") for p in m))
        else:
            raise CheckpointError(f"tokenizer.json: malformed merge {m!r}")
    if not merges:
        raise CheckpointError("tokenizer.json has no merges")

    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        chosen = next((t for t in template if t.get("name") == "default"), template[0] if template else None)
        template = chosen.get("template") if chosen else None
    if not template:
        template = ckpt.text("chat_template.jinja")

    return Vocab(
        tokens=tokens,
        token_types=types,
        merges=merges,
        special_ids=special_ids,
        add_bos=bool(cfg.get("add_bos_token", True)),
        add_eos=cfg.get("add_eos_token") if isinstance(cfg.get("add_eos_token"), bool) else None,
        chat_template=template,
    )
