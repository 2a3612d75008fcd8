"""The native gemma4 tokenizer against Hugging Face's GemmaTokenizer (the oracle) on the same
vocabulary: the tiny checkpoint's SentencePiece-trained tokenizer (converted to GGUF by our
converter) and a second, merge-rich BPE trained here with `tokenizers` (written to a GGUF directly),
on a few hundred deterministic strings; parse_special off; decoding; errors and invalid UTF-8."""

from __future__ import annotations

import json
import random
from pathlib import Path

import gguf
import pytest

import pydgemma
import tiny_gguf
from pydgemma._native import native

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 3, 4, 5, 6

# ------------------------------------------------------------------------------------------------
# Test strings

WORDS = ["the", "cat", "and", "dog", "hello", "world", "Hello", "World", "tokenizer", "Diffusion", "Gemma",
         "model", "token", "tokens", "ing", "is", "a", "I", "x", "café", "naïve", "Zürich", "don't", "it's",
         "return", "def", "print", "self", "None", "True", "assert", "http", "www", "example", "com"]
PUNCT = list(".,;:!?'\"()[]{}<>-_/\\@#$%^&*+=~`|") + ["...", "--", "->", "=>", "!=", "<=", "::", "//", "/*", "*/"]
CODE = ["def f(x):\n    return x + 1\n", "\tif (a) {\n\t\tb();\n\t}\n", "for i in range(10):\n        pass",
        "    ", "        ", "{\"key\": [1, 2, 3], \"ok\": true}", "x = {'a': 1}  # comment\n", "#include <stdio.h>\n",
        "SELECT * FROM t WHERE id = 42;", "<div class=\"a\">text</div>", "a_b-c.d/e\\f"]
SPACES = [" ", "  ", "   ", "    ", "         ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", " \n ",
          "\u00a0", "\u3000", "\u2009", "\v", "\f"]
DIGITS = ["0", "7", "42", "2024", "3.14159", "1,000,000", "-12", "0x1F", "1e-9", "٣", "１２３"]
EMOJI = ["😀", "😂", "🚀", "❤️", "👍", "👍🏽", "👋🏿", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🧑🏽‍💻", "🇫🇷", "✨", "🌍", "🎉"]
SCRIPTS = ["北京是中国的首都", "学习语言模型", "日本語のテキスト", "안녕하세요", "세계", "한국어 문장", "مرحبا بالعالم",
           "שלום", "Привет, мир", "Ёжик", "Γειά σου", "नमस्ते", "สวัสดี", "ქართული", "Ἀθῆναι"]
COMBINING = ["e\u0301", "a\u0308\u0304", "Z\u0324\u0354\u0367\u0311", "n\u0303o", "\u0915\u094d\u0937", "각", "ᄀ\u1161\u11a8"]
RARE = ["\x00", "\x01", "\x7f", "\u200b", "\u200d", "\ufeff", "\ufffd", "\U0010ffff", "\U0001d518\U0001d52b",
        "\u2581", "\u2581\u2581x", "<0x41>", "\ue000", "\u0600", "ǅ", "ﬁ", "\u2028"]

_RICH_TEXT = ["the cat and the dog", "hello world", "Hello, World!", "def f(x):\n    return x + 1",
              "    indented code\n\tand tabs", "北京是中国的首都。", "안녕하세요, 세계!", "Привет, мир",
              "tokenizers tokenize tokens", "1234567890", "😀 😂 🚀 ❤️ 👍", "café naïve résumé"]


def special_strings(specials: list[str]) -> list[str]:
    """Special tokens, near-misses and overlaps."""
    out = list(specials)
    out += ["<|tur", "<turn", "<|turn|>", "<<bos>>", "<bos><bos>", "<bos ", "< bos>", "<BOS>", "<mask", "mask>",
            "<|image|>", "<|image>", "<|image|", "<|image|>>", "<turn|><|turn>", "<|channel>thought\n<channel|>",
            "<|\"|>", "<|\"|", "<", ">", "|", "<|", "|>"]
    return out


def make_strings(specials: list[str], n: int = 320, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    groups = [WORDS, PUNCT, CODE, SPACES, DIGITS, EMOJI, SCRIPTS, COMBINING, RARE, special_strings(specials)]
    weights = [6, 2, 1, 3, 1, 1, 2, 1, 1, 2]
    fixed = ["", " ", "  ", "\n", "a", " a", "a ", "  hello  ", " hello world ", "hello world", "\t\n \r\n",
             "<bos>", "<bos>hi", " <bos> ", "<eos>", "<pad><unk><mask>", "<|turn>user\nHi<turn|>\n<|turn>model\n",
             "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", " " * 40, "\n" * 9, "ab" * 30, "the the the the the",
             "x" + " " * 17 + "y", "北京" * 9, "😀" * 7] + _RICH_TEXT
    out = list(fixed)
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 8)):
            group = rng.choices(groups, weights)[0]
            parts.append(rng.choice(group))
            if rng.random() < 0.5:
                parts.append(" ")
        s = "".join(parts)
        if rng.random() < 0.15:
            s = " " + s
        if rng.random() < 0.15:
            s = s + " "
        out.append(s)
    return out


# ------------------------------------------------------------------------------------------------
# Tokenizer pairs: (pydgemma.Model, HF tokenizer, token types by id)


def token_types(path: Path) -> list[int]:
    field = gguf.GGUFReader(path).fields["tokenizer.ggml.token_type"]
    return [int(field.parts[i][0]) for i in field.data]


@pytest.fixture(scope="module")
def tiny_pair(hf_tiny: Path, converted: dict[str, Path]):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_tiny)
    with pydgemma.Model(converted["f32"]) as model:
        yield model, hf, token_types(converted["f32"])


def train_rich_tokenizer():
    """A GemmaTokenizer with ~1500 merges that cross spaces (trained without a pre-tokenizer) and an
    alphabet too small for every test character (so byte fallback happens)."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import AddedToken, GemmaTokenizer

    from pydgemma.models.tiny_checkpoint import SPECIAL_TOKENS

    rng = random.Random(7)
    pool = WORDS + PUNCT + CODE + SPACES[:12] + DIGITS + EMOJI[:6] + SCRIPTS[:6] + _RICH_TEXT
    corpus = [" ".join(rng.choice(pool) for _ in range(rng.randint(3, 12))) for _ in range(1500)] + _RICH_TEXT * 20
    t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    t.normalizer = normalizers.Replace(" ", "\u2581")
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=2000, limit_alphabet=160, show_progress=False))
    trained = json.loads(t.to_str())["model"]

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", *SPECIAL_TOKENS]
    vocab = {p: i for i, p in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    assert len(merges) > 1000
    hf = GemmaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                        pad_token="<pad>", mask_token="<mask>", add_bos_token=True, add_eos_token=False,
                        additional_special_tokens=[AddedToken(s, special=True, normalized=False)
                                                   for s in SPECIAL_TOKENS if s != "<mask>"])
    return hf, vocab, merges


@pytest.fixture(scope="module")
def rich_pair(tmp_path_factory: pytest.TempPathFactory):
    from pydgemma.quantize.vocab import FORCED_USER_DEFINED

    hf, vocab, merges = train_rich_tokenizer()
    tokens = [p for p, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(hf.all_special_tokens) | {t.content for t in hf.added_tokens_decoder.values()}
    types = [USER_DEFINED if p in FORCED_USER_DEFINED else CONTROL if p in special
             else BYTE if p.startswith("<0x") and len(p) == 6 else NORMAL for p in tokens]
    path = tiny_gguf.write_gguf(
        tmp_path_factory.mktemp("rich") / "rich.gguf",
        tiny_gguf.tiny(n_vocab=len(tokens)),
        set_keys={"tokenizer.ggml.tokens": ("array", tokens),
                  "tokenizer.ggml.token_type": ("array", types),
                  "tokenizer.ggml.merges": ("array", [f"{a} {b}" for a, b in merges]),
                  "tokenizer.ggml.bos_token_id": ("uint32", vocab["<bos>"]),
                  "tokenizer.ggml.mask_token_id": ("uint32", vocab["<mask>"])},
    )
    with pydgemma.Model(path) as model:
        yield model, hf, types


@pytest.fixture(params=["tiny", "rich"])
def pair(request: pytest.FixtureRequest):
    return request.getfixturevalue(f"{request.param}_pair")


def specials_of(hf) -> list[str]:
    return sorted({t.content for t in hf.added_tokens_decoder.values()})


def first_mismatch(pairs):
    for s, ours, theirs in pairs:
        if ours != theirs:
            return f"{s!r}: ours {ours} != HF {theirs}"
    return None


# ------------------------------------------------------------------------------------------------
# Encoding


def test_encode_matches_hf(pair) -> None:
    model, hf, _ = pair
    strings = make_strings(specials_of(hf))
    assert len(strings) >= 300
    plain = [(s, model.tokenize(s, add_special=False), hf.encode(s, add_special_tokens=False)) for s in strings]
    assert first_mismatch(plain) is None
    with_bos = [(s, model.tokenize(s), hf.encode(s)) for s in strings]
    assert first_mismatch(with_bos) is None
    bos = hf.bos_token_id
    assert all(ours[0] == bos for _, ours, _ in with_bos)
    # The strings do exercise what they should: special ids, byte fallback, multi-piece merges.
    ids = {i for _, ours, _ in plain for i in ours}
    types = pair[2]
    assert {hf.convert_tokens_to_ids(t) for t in ("<|turn>", "<turn|>", "<bos>", "<mask>", "<|channel>")} <= ids
    assert any(types[i] == BYTE for i in ids)
    assert sum(len(ours) for _, ours, _ in plain) < sum(len(s.encode()) for s in strings)


def test_special_token_text_is_matched_whole(tiny_pair) -> None:
    model, hf, _ = tiny_pair
    bos, turn = hf.convert_tokens_to_ids("<bos>"), hf.convert_tokens_to_ids("<|turn>")
    assert model.tokenize("<bos>hi", add_special=True)[:2] == [bos, bos]  # typed <bos> is the BOS id, as in HF
    assert model.tokenize("<|turn>", add_special=False) == [turn]
    # longest match first: <|image|> over <|image>
    assert model.tokenize("<|image|>", add_special=False) == [hf.convert_tokens_to_ids("<|image|>")]


def test_parse_special_false_tokenizes_text(pair) -> None:
    model, hf, types = pair
    strings = make_strings(specials_of(hf), n=120, seed=99)
    special_ids = {i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)}
    for s in strings:
        ours = model.tokenize(s, add_special=False, parse_special=False)
        # split_special_tokens: transformers' own spelling of parse_special=False (the pinned 5.23 has it)
        assert ours == hf.encode(s, add_special_tokens=False, split_special_tokens=True), repr(s)
        if "<" in s:
            assert not (set(ours) & special_ids), repr(s)
    assert model.tokenize("<bos>x", add_special=True, parse_special=False)[0] == hf.bos_token_id
    assert hf.bos_token_id not in model.tokenize("<bos>x", add_special=False, parse_special=False)


# ------------------------------------------------------------------------------------------------
# Decoding


def test_decode_round_trip_and_hf(pair) -> None:
    model, hf, types = pair
    strings = make_strings(specials_of(hf))
    control = {i for i, t in enumerate(types) if t == CONTROL}
    n = 0
    for s in strings:
        ids = model.tokenize(s, add_special=False)
        # "▁" typed in the text decodes as a space, like HF
        assert model.detokenize(ids, render_special=True) == s.replace("\u2581", " "), repr(s)
        assert model.detokenize(ids, render_special=True) == hf.decode(ids, skip_special_tokens=False), repr(s)
        shown = [i for i in ids if i not in control]
        assert model.detokenize(ids) == hf.decode(shown, skip_special_tokens=False), repr(s)
        if not any(types[i] == USER_DEFINED for i in ids):
            assert model.detokenize(ids) == hf.decode(ids, skip_special_tokens=True), repr(s)
        n += 1
    assert n >= 300


def test_decode_special_tokens(tiny_pair) -> None:
    model, hf, types = tiny_pair
    ids = hf.encode("<|turn>user\nHi<turn|>\n<|channel>thought\n<channel|>ok")
    assert model.detokenize(ids, render_special=True) == "<bos><|turn>user\nHi<turn|>\n<|channel>thought\n<channel|>ok"
    # CONTROL tokens vanish; USER_DEFINED ones (the channel markers) still render, unlike HF's skip_special_tokens
    assert model.detokenize(ids) == "user\nHi\n<|channel>thought\n<channel|>ok"
    assert types[hf.convert_tokens_to_ids("<|channel>")] == USER_DEFINED
    assert model.detokenize([]) == ""


def test_decode_random_ids_matches_hf(pair) -> None:
    model, hf, types = pair
    rng = random.Random(5)
    n_hf = len(hf)
    text_ids = [i for i in range(n_hf) if types[i] in (NORMAL, USER_DEFINED, CONTROL)]
    byte_runs = [hf.encode(c, add_special_tokens=False) for c in "é北😀👍🏽\x00"]
    for _ in range(200):
        ids: list[int] = []
        for _ in range(rng.randint(1, 12)):
            ids += rng.choice(byte_runs) if rng.random() < 0.2 else [rng.choice(text_ids)]
        assert model.detokenize(ids, render_special=True) == hf.decode(ids, skip_special_tokens=False), ids


# ------------------------------------------------------------------------------------------------
# Errors and raw bytes


def raw_tokenize(model, data: bytes, add_bos: bool = False, parse_special: bool = True) -> list[int]:
    nat = native()
    n = nat.ffi.new("size_t *")
    buf = nat.ffi.new("int32_t[]", len(data) + 4)
    assert nat.lib.dg_tokenize(model._handle, data, len(data), add_bos, parse_special, buf, len(data) + 4, n) == 0
    return list(buf[0 : n[0]])


def raw_detokenize(model, ids: list[int], render_special: bool = False) -> bytes:
    nat = native()
    n = nat.ffi.new("size_t *")
    out = nat.ffi.new("char[]", 16 * len(ids) + 16)
    assert nat.lib.dg_detokenize(model._handle, nat.ffi.new("int32_t[]", ids), len(ids), render_special, out,
                                 16 * len(ids) + 16, n) == 0
    return nat.ffi.unpack(out, n[0])


def test_out_of_range_id(tiny_pair) -> None:
    model, _, types = tiny_pair
    v = len(types)
    for bad in (v, -1, 2**31 - 1):
        with pytest.raises(pydgemma.ModelError, match=rf"^token id {bad} is out of range \(vocabulary of {v}\)$") as e:
            model.detokenize([5, bad, 6])
        assert e.value.status == "DG_ERR_INVALID_ARG"
    assert model.detokenize([330]) == model.detokenize([330])  # still usable afterwards


@pytest.mark.parametrize("data", [b"\xff\xfe abc", b"abc\xe4\xb8", b"\xc0\x80x", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                                  b"\x80", b"a\xe4b\xb8c", b"<bos\xff>", b"\xf0\x9f\x98"])
def test_invalid_utf8_becomes_byte_tokens(pair, data: bytes) -> None:
    model, hf, _ = pair
    byte_id = {b: hf.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    ids = raw_tokenize(model, data)
    # expected: valid runs tokenized as text, each byte of an invalid sequence a byte token
    expected: list[int] = []
    text = data.decode("utf-8", errors="surrogateescape")
    run = ""
    for ch in text + "\udc00":  # sentinel flushes the last run
        if 0xDC80 <= ord(ch) <= 0xDCFF or ch == "\udc00":
            expected += model.tokenize(run, add_special=False) if run else []
            run = ""
            if ch != "\udc00":
                expected.append(byte_id[ord(ch) - 0xDC00])
        else:
            run += ch
    assert ids == expected
    assert raw_detokenize(model, ids) == data  # byte tokens decode to the raw bytes
    assert raw_tokenize(model, data, add_bos=True) == [hf.bos_token_id, *expected]


def test_arbitrary_bytes_round_trip(pair) -> None:
    # Any byte string (invalid UTF-8, NULs, split special tokens) tokenizes and decodes back exactly.
    model, _, _ = pair
    rng = random.Random(11)
    alphabet = [bytes([b]) for b in range(256)] + [s.encode() for s in ("<bos>", "<|turn>", "<|image|", " ", "\u2581x",
                                                                         "😀", "北", "e\u0301", "the ")]
    for _ in range(300):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        for parse_special in (True, False):
            ids = raw_tokenize(model, data, parse_special=parse_special)
            assert raw_detokenize(model, ids, render_special=True) == data.replace("\u2581".encode(), b" "), data


def test_optional_metadata(make_gguf) -> None:
    # No token_type: <0xXX> pieces are bytes, every other token is ordinary text (no special matching);
    # no bos id: add_special adds nothing.
    path = make_gguf(drop_keys=("tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id"))
    with pydgemma.Model(path) as model:
        ids = model.tokenize("<bos>A", add_special=True)
        byte = {c: 7 + ord(c) for c in "<>A"}  # <0x00> is id 7; the vocabulary stops at <0x58>
        # "bos" has neither pieces nor byte tokens: one fused unknown token (id 3), as HF's fuse_unk
        assert ids == model.tokenize("<bos>A", add_special=False) == [byte["<"], 3, byte[">"], byte["A"]]
        assert model.detokenize(ids) == "<<unk>>A"
        assert model.detokenize([2]) == "<bos>"
    with pydgemma.Model(make_gguf()) as model:  # the same vocabulary typed: <bos> is CONTROL
        assert model.tokenize("<bos>A", add_special=True)[:2] == [2, 2]
        assert model.detokenize([2, 2]) == ""


def test_merge_rank_edge_cases(make_gguf) -> None:
    # A pair listed twice takes its last rank (tokenizers builds its merge map that way); merges
    # whose result is no token are ignored.
    from tokenizers import Tokenizer, models, normalizers

    base = tiny_gguf.vocab(tiny_gguf.tiny(n_vocab=263))  # 7 specials, 256 byte tokens
    tokens = base + ["a", "b", "c", "ab", "bc", "\u2581", "\u2581a"]
    merges = [("b", "c"), ("a", "b"), ("b", "c"), ("\u2581", "a")]
    path = make_gguf(cfg=tiny_gguf.tiny(n_vocab=len(tokens)), set_keys={
        "tokenizer.ggml.tokens": ("array", tokens),
        "tokenizer.ggml.token_type": ("array", [3] * 7 + [6] * 256 + [1] * 7),
        "tokenizer.ggml.merges": ("array", [f"{a} {b}" for a, b in merges] + ["a c"])})
    oracle = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>",
                                  byte_fallback=True, fuse_unk=True))
    oracle.normalizer = normalizers.Replace(" ", "\u2581")
    with pydgemma.Model(path) as model:
        for text in ["abc", "abcbc", "bcab", "a bc", " ab", "acb", "cab c", "ä b"]:
            assert model.tokenize(text, add_special=False) == oracle.encode(text).ids, text
        assert model.tokenize("abc", add_special=False) == [tokens.index("ab"), tokens.index("c")]


def test_malformed_tokenizer_metadata(make_gguf) -> None:
    with pytest.raises(pydgemma.ModelError, match="token_type"):  # the loader refuses a non-integer type array
        pydgemma.Model(make_gguf(set_keys={"tokenizer.ggml.token_type": ("array", [0.5] * 96)}))
    with pydgemma.Model(make_gguf(set_keys={"tokenizer.ggml.bos_token_id": ("uint32", 500)})) as model:
        for _ in range(2):  # the tokenizer is built on first use; the error repeats, nothing aborts
            with pytest.raises(pydgemma.ModelError, match=r"^tokenizer.ggml.bos_token_id = 500 is outside the vocabulary \(96 tokens\)$") as e:
                model.tokenize("x")
            assert e.value.status == "DG_ERR_FORMAT"


def test_end_of_generation_tokens_are_the_tokenizers(make_gguf) -> None:
    """The tokenizer owns the end-of-generation tokens: eos_token_id first, then the tokens spelled
    <eos>, <turn|> and <|tool_response> in vocabulary order, each once; the model's defaults
    (dg_generate_default_params) are those ids."""
    with pydgemma.Model(make_gguf()) as model:  # eos_token_id 1 is <eos>; <turn|> is 6
        assert model.eog_ids == [1, 6]
        assert [model.tokenize(t, add_special=False) for t in ("<eos>", "<turn|>")] == [[1], [6]]
    tokens = tiny_gguf.vocab(tiny_gguf.tiny())
    tokens[-1] = "<|tool_response>"
    with pydgemma.Model(make_gguf(set_keys={"tokenizer.ggml.tokens": ("array", tokens),
                                            "tokenizer.ggml.eos_token_id": ("uint32", 4)})) as model:
        assert model.eog_ids == [4, 1, 6, len(tokens) - 1]
    with pydgemma.Model(make_gguf(drop_keys=("tokenizer.ggml.eos_token_id",))) as model:
        assert model.eog_ids == [1, 6]
    # a vocabulary the tokenizer cannot use still has its end-of-generation tokens; tokenizing fails
    with pydgemma.Model(make_gguf(set_keys={"tokenizer.ggml.bos_token_id": ("uint32", 500)})) as model:
        assert model.eog_ids == [1, 6]
        with pytest.raises(pydgemma.ModelError, match="bos_token_id = 500"):
            model.tokenize("x")
