"""Tiny random DiffusionGemma checkpoints in Hugging Face ``save_pretrained`` form, for tests.

``build_tiny_checkpoint(out_dir, TinySpec())`` writes, in well under five seconds on a CPU:

* ``model.safetensors`` and ``config.json`` of a ``DiffusionGemmaForBlockDiffusion`` whose every
  saved tensor is random and away from its default init (no all-ones norm, router scale or
  ``layer_scalar``; the encoder's ``layer_scalar`` buffers differ from the decoder's);
* ``generation_config.json`` with the diffusion sampler settings that ``generate`` reads;
* a tiny Gemma-style tokenizer (SentencePiece BPE trained offline on the text below, converted to
  a ``GemmaTokenizer``: ``tokenizer.json``, ``tokenizer_config.json``) and a Gemma-4-style chat
  template (``chat_template.jinja``).

The init is chosen to be well conditioned: fp32 and fp64 logits of the same checkpoint agree to
about 1e-5 (see ``precision_gap``), so tests can compare another runtime's logits with the
reference at tight tolerances. The same spec gives byte-identical files.

Layout facts a converter needs (transformers 5.23): the encoder and the decoder share every text
weight (the decoder copy is the one saved, as ``model.decoder.*``); only the per-layer
``layer_scalar`` buffers exist twice (``model.encoder.language_model.layers.N.layer_scalar`` and
``model.decoder.layers.N.layer_scalar``). ``lm_head.weight`` is tied to
``model.decoder.embed_tokens.weight`` and not saved. Full-attention layers have no ``v_proj``
(values are the keys). ``final_logit_softcapping`` (30.0) is a class constant, not in config.json.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TinySpec",
    "build_config",
    "build_model",
    "build_tiny_checkpoint",
    "build_tokenizer",
    "canvas_logits",
    "precision_gap",
    "sample_inputs",
]

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

# Ids 0-3 are <pad>, <eos>, <bos>, <unk>; these follow as SentencePiece user-defined symbols, so
# they get ids 4, 5, ... in this order: <mask>=4, <|turn>=5, <turn|>=6, <|think|>=7, ...
SPECIAL_TOKENS: tuple[str, ...] = (
    "<mask>",
    "<|turn>",
    "<turn|>",
    "<|think|>",
    "<|channel>",
    "<channel|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
    "<|tool>",
    "<tool|>",
    "<|image>",  # begin of image (boi_token_id)
    "<image|>",  # end of image (eoi_token_id)
    "<|image|>",  # image soft-token placeholder (image_token_id)
)

TURN_END = "<turn|>"

# A few KB of varied text: English prose, code with indentation and whitespace runs, JSON,
# numbers (digits are split), chat markup words, CJK, Korean, emoji. Characters that do not occur
# here (Cyrillic, most symbols) are encoded with byte fallback.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran away.
A diffusion language model writes a whole block of text at once: it starts from noise and
refines every position of the canvas over a few denoising steps, then appends the block.
The encoder reads the prompt once and fills the key-value cache; the decoder reads the cache
and the canvas, attends in both directions, and predicts a token for every position.
She sells sea shells by the sea shore. Peter Piper picked a peck of pickled peppers.
How much wood would a woodchuck chuck if a woodchuck could chuck wood?
In the beginning the model knows nothing, and at the end it knows a little more.

user
Write a short poem about the sea.
model
The sea is wide, the sea is deep,
it sings the sailors off to sleep.
thought
The user wants a poem. I should keep it short and simple.
system
You are a helpful assistant. Answer briefly and accurately.

def add(a, b):
    \"\"\"Return the sum of a and b.\"\"\"
    return a + b


class Counter:
    def __init__(self, start=0):
        self.value = start

    def step(self, n=1):
        self.value += n
        return self.value


for i in range(10):
    if i % 2 == 0:
        print(i, "is even")
    else:
        print(i, "is odd")

int main(void) {
\tint total = 0;
\tfor (int k = 0; k < 100; k++) {
\t\ttotal += k * k;
\t}
\treturn total == 328350 ? 0 : 1;
}

{"name": "tiny", "layers": 6, "experts": [0, 1, 2, 3], "ok": true, "ratio": 0.25}
SELECT id, name FROM users WHERE age >= 18 ORDER BY name;
x    =    1          # aligned with spaces
y  = 22
zz = 333
    four spaces, then        eight, then                sixteen.
trailing spaces   
\t\ttwo tabs\tand a tab
line one
line two

line four after an empty line



three empty lines above.
Numbers: 0 1 2 3 4 5 6 7 8 9, 42, 3.14159, 2026-01-01, 1,000,000 and 7e-5.
Prices went from $12.50 to $13.75 (+10%) on 12/03; the ratio is 1:2.

日本語のテキストです。今日は良い天気ですね。東京は日本の首都です。
こんにちは、世界！ありがとうございます。
中文文本：你好，世界！我们正在测试一个很小的分词器。今天天气很好。
北京是中国的首都。学习语言模型很有意思。
한국어 문장도 조금 넣습니다. 안녕하세요, 세계!
Emoji: 😀 😂 🚀 ❤️ 👍 🎉 ✨ 🌍 — smiles and rockets 🚀🚀 and hearts ❤️❤️.
Mixed: café, naïve, résumé, Zürich, São Paulo, fiancée.
"""


@functools.lru_cache(maxsize=8)
def _trained_vocab(vocab_size: int) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Trains the SentencePiece BPE model once per process; returns (vocab items, merges)."""
    import io

    import sentencepiece as spm
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    paragraphs = [p + "\n\n" for p in _CORPUS.split("\n\n")]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(paragraphs * 3),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=list(SPECIAL_TOKENS),
        num_threads=1,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.model")
        with open(path, "wb") as f:
            f.write(model.getvalue())
        vocab, _scores, merges = SentencePieceExtractor(path).extract()
    return tuple(sorted(vocab.items(), key=lambda kv: kv[1])), tuple(tuple(m) for m in merges)


def build_tokenizer(vocab_size: int = 512, *, model_max_length: int | None = None):
    """A fresh tiny ``GemmaTokenizer`` (the trained vocab is cached per process).

    pad/eos/bos/unk = 0/1/2/3, ``<mask>`` = 4, then the rest of ``SPECIAL_TOKENS`` (all added
    tokens marked special), byte fallback ``<0x00>``..``<0xFF>``, then learned pieces. ``encode``
    prepends ``<bos>``; the chat template writes ``<bos>`` itself.
    """
    from transformers import AddedToken, GemmaTokenizer

    vocab_items, merges = _trained_vocab(vocab_size)
    kwargs: dict[str, Any] = {}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    tok = GemmaTokenizer(
        vocab=dict(vocab_items),
        merges=[tuple(m) for m in merges],
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        mask_token="<mask>",
        add_bos_token=True,
        add_eos_token=False,
        additional_special_tokens=[
            AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS if t != "<mask>"
        ],
        **kwargs,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


# A Gemma-4-style chat template (a simplified version of Google's, written for these tests).
# <bos>, then a system turn if thinking is on, tools are given or the first message is
# system/developer ("<|think|>\n" at its very top when thinking is on; then the system text; then
# one "<|tool>declaration:NAME{description:...,parameters:{...}}<tool|>" per tool), then
# "<|turn>{role}\n{content}<turn|>\n" per message (assistant -> model; <|channel>...<channel|>
# spans are stripped from model turns), then the generation prompt "<|turn>model\n", followed by
# an empty thought channel "<|channel>thought\n<channel|>" when thinking is off.
# Tools as in Google's template: an assistant message's tool_calls are written
# "<|tool_call>call:NAME{k:v,...}<tool_call|>" (pydgemma.tools.format_value syntax), then the
# role "tool" messages that follow it, "<|tool_response>response:NAME{...}<tool_response|>", inside
# the same model turn, which stays open (no <turn|>, no generation prompt) when it has no text
# after the results; calls without results end with "<|tool_response>" (the model's stop token).
# Unlike Google's, only a turn left open is continued by the next assistant message.
CHAT_TEMPLATE = """\
{%- macro strip_thinking(text) -%}
    {%- set ns = namespace(result='') -%}
    {%- for part in text.split('<channel|>') -%}
        {%- if '<|channel>' in part -%}
            {%- set ns.result = ns.result + part.split('<|channel>')[0] -%}
        {%- else -%}
            {%- set ns.result = ns.result + part -%}
        {%- endif -%}
    {%- endfor -%}
    {{- ns.result | trim -}}
{%- endmacro -%}
{%- macro render_content(content, role) -%}
    {%- if content is string -%}
        {%- if role == 'model' -%}
            {{- strip_thinking(content) -}}
        {%- else -%}
            {{- content | trim -}}
        {%- endif -%}
    {%- elif content is iterable -%}
        {%- for item in content -%}
            {%- if item['type'] == 'text' -%}
                {%- if role == 'model' -%}
                    {{- strip_thinking(item['text']) -}}
                {%- else -%}
                    {{- item['text'] | trim -}}
                {%- endif -%}
            {%- elif item['type'] == 'image' -%}
                {{- '<|image|>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- macro format_argument(value) -%}
    {%- if value is string -%}
        {{- '<|"|>' + value + '<|"|>' -}}
    {%- elif value is boolean -%}
        {{- 'true' if value else 'false' -}}
    {%- elif value is mapping -%}
        {{- '{' -}}
        {%- for key, item in value | dictsort -%}
            {{- key ~ ':' ~ format_argument(item) ~ (',' if not loop.last else '') -}}
        {%- endfor -%}
        {{- '}' -}}
    {%- elif value is sequence -%}
        {{- '[' -}}
        {%- for item in value -%}
            {{- format_argument(item) ~ (',' if not loop.last else '') -}}
        {%- endfor -%}
        {{- ']' -}}
    {%- else -%}
        {{- value -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro format_properties(properties) -%}
    {{- '{' -}}
    {%- for key, schema in properties | dictsort -%}
        {{- key ~ ':' ~ format_schema(schema) ~ (',' if not loop.last else '') -}}
    {%- endfor -%}
    {{- '}' -}}
{%- endmacro -%}
{%- macro format_schema(schema) -%}
    {%- set type = schema['type'] | default('') | string | upper -%}
    {%- set ns = namespace(sep='') -%}
    {{- '{' -}}
    {%- if schema['description'] -%}
        {{- 'description:' + format_argument(schema['description']) -}}
        {%- set ns.sep = ',' -%}
    {%- endif -%}
    {%- if type == 'STRING' and schema['enum'] -%}
        {{- ns.sep + 'enum:' + format_argument(schema['enum']) -}}
        {%- set ns.sep = ',' -%}
    {%- elif type == 'ARRAY' and schema['items'] is mapping and schema['items'] -%}
        {{- ns.sep + 'items:' + format_schema(schema['items']) -}}
        {%- set ns.sep = ',' -%}
    {%- endif -%}
    {%- if schema['nullable'] -%}
        {{- ns.sep + 'nullable:true' -}}
        {%- set ns.sep = ',' -%}
    {%- endif -%}
    {%- if type == 'OBJECT' and schema['properties'] is mapping -%}
        {{- ns.sep + 'properties:' + format_properties(schema['properties']) -}}
        {%- set ns.sep = ',' -%}
        {%- if schema['required'] -%}
            {{- ',required:' + format_argument(schema['required']) -}}
        {%- endif -%}
    {%- endif -%}
    {{- ns.sep + 'type:' + format_argument(type) + '}' -}}
{%- endmacro -%}
{%- macro format_declaration(function) -%}
    {{- 'declaration:' + function['name'] + '{description:' + format_argument((function['description'] or '') | string) -}}
    {%- set params = function['parameters'] -%}
    {%- if params -%}
        {%- set ns = namespace(sep='') -%}
        {{- ',parameters:{' -}}
        {%- if params['properties'] -%}
            {{- 'properties:' + format_properties(params['properties']) -}}
            {%- set ns.sep = ',' -%}
        {%- endif -%}
        {%- if params['required'] -%}
            {{- ns.sep + 'required:' + format_argument(params['required']) -}}
            {%- set ns.sep = ',' -%}
        {%- endif -%}
        {%- if params['type'] -%}
            {{- ns.sep + 'type:' + format_argument(params['type'] | string | upper) -}}
        {%- endif -%}
        {{- '}' -}}
    {%- endif -%}
    {{- '}' -}}
{%- endmacro -%}
{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- set loop_messages = messages -%}
{{- bos_token -}}
{%- if thinking or tools or (messages and messages[0]['role'] in ['system', 'developer']) -%}
    {{- '<|turn>system\\n' -}}
    {%- if thinking -%}
        {{- '<|think|>\\n' -}}
    {%- endif -%}
    {%- if messages and messages[0]['role'] in ['system', 'developer'] -%}
        {{- render_content(messages[0]['content'], 'system') -}}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}
    {%- for tool in tools or [] -%}
        {{- '<|tool>' + format_declaration(tool['function']) + '<tool|>' -}}
    {%- endfor -%}
    {{- '<turn|>\\n' -}}
{%- endif -%}
{%- set ns = namespace(open=false, last_user=-1) -%}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'user' -%}
        {%- set ns.last_user = loop.index0 -%}
    {%- endif -%}
{%- endfor -%}
{%- for message in loop_messages -%}
    {%- set index = loop.index0 -%}
    {%- if message['role'] != 'tool' -%}
        {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
        {%- if not (role == 'model' and ns.open) -%}
            {{- '<|turn>' + role + '\\n' -}}
        {%- endif -%}
        {%- set ns.open = false -%}
        {%- set calls = namespace(made=false, answered=false) -%}
        {%- if message['tool_calls'] -%}
            {%- set thought = message['reasoning_content'] or message['reasoning'] -%}
            {%- if thought and index > ns.last_user -%}
                {{- '<|channel>thought\\n' + thought + '\\n<channel|>' -}}
            {%- endif -%}
            {%- for call in message['tool_calls'] -%}
                {%- set arguments = call['function']['arguments'] -%}
                {{- '<|tool_call>call:' + call['function']['name'] -}}
                {{- format_argument(arguments) if arguments is mapping else '{' ~ (arguments if arguments is string else '') ~ '}' -}}
                {{- '<tool_call|>' -}}
            {%- endfor -%}
            {%- set calls.made = true -%}
            {%- set scan = namespace(on=true) -%}
            {%- for follow in loop_messages[index + 1:] -%}
                {%- set scan.on = scan.on and follow['role'] == 'tool' -%}
                {%- if scan.on -%}
                    {%- set name = namespace(value=follow['name'] or 'unknown') -%}
                    {%- for call in message['tool_calls'] -%}
                        {%- if call['id'] and call['id'] == follow['tool_call_id'] -%}
                            {%- set name.value = call['function']['name'] -%}
                        {%- endif -%}
                    {%- endfor -%}
                    {%- set body = follow['content'] -%}
                    {%- if body is not string and body is not mapping and body is iterable -%}
                        {%- set text = namespace(value='') -%}
                        {%- for part in body -%}
                            {%- if part['type'] == 'text' -%}
                                {%- set text.value = text.value + part['text'] -%}
                            {%- endif -%}
                        {%- endfor -%}
                        {%- set body = text.value -%}
                    {%- endif -%}
                    {{- '<|tool_response>response:' + name.value -}}
                    {{- format_argument(body) if body is mapping else '{value:' + format_argument(body) + '}' -}}
                    {{- '<tool_response|>' -}}
                    {%- set calls.answered = true -%}
                {%- endif -%}
            {%- endfor -%}
        {%- endif -%}
        {%- set content = render_content(message['content'], role) -%}
        {{- content -}}
        {%- if calls.made and not calls.answered -%}
            {{- '<|tool_response>' -}}
            {%- set ns.open = true -%}
        {%- elif calls.answered and not content -%}
            {%- set ns.open = true -%}
        {%- else -%}
            {{- '<turn|>\\n' -}}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and not ns.open -%}
    {{- '<|turn>model\\n' -}}
    {%- if not thinking -%}
        {{- '<|channel>thought\\n<channel|>' -}}
    {%- endif -%}
{%- endif -%}
"""

# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

GENERATION_DEFAULTS: dict[str, Any] = {
    "max_denoising_steps": 48,
    "t_min": 0.4,
    "t_max": 0.8,
    "entropy_bound": 0.1,  # sampler_config.entropy_bound (EntropyBoundSamplerConfig)
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}


@dataclass(frozen=True)
class TinySpec:
    """Dimensions of a tiny DiffusionGemma. ``layer_types=None`` means 5 sliding : 1 full."""

    vocab_size: int | None = None  # None: the tokenizer's size; larger pads the embedding
    tokenizer_vocab_size: int = 512  # SentencePiece training target
    hidden_size: int = 64
    num_hidden_layers: int = 6
    layer_types: tuple[str, ...] | None = None
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # sliding layers
    head_dim: int = 16  # sliding layers
    global_head_dim: int = 32  # full layers
    num_global_key_value_heads: int = 1  # full layers (K = V there: no v_proj)
    intermediate_size: int = 96
    moe_intermediate_size: int = 32
    num_experts: int = 4
    top_k_experts: int = 2
    sliding_window: int = 16
    canvas_length: int = 16
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # full layers ("proportional" RoPE)
    partial_rotary_factor: float = 0.25  # full layers
    rope_theta_sliding: float = 10_000.0  # sliding layers ("default" RoPE)
    use_bidirectional_attention: str | None = "vision"
    # Tiny gemma4_vision tower (vision_config=None would give the 768-wide default).
    vision_hidden_size: int = 16
    vision_intermediate_size: int = 32
    vision_num_hidden_layers: int = 1
    vision_num_attention_heads: int = 2
    vision_head_dim: int = 8
    vision_patch_size: int = 4
    vision_position_embedding_size: int = 64
    vision_pooling_kernel_size: int = 2
    # config.json's text_config carries the per-layer attention shape as
    #   "transformers": per_layer_config only (what save_pretrained writes),
    #   "hub":          global_head_dim + num_global_key_value_heads only (Gemma 4 hub style),
    #   "both":         both, consistent.
    config_style: str = "both"
    seed: int = 0

    def resolved_layer_types(self) -> tuple[str, ...]:
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError("layer_types must have num_hidden_layers entries")
            return tuple(self.layer_types)
        return tuple(
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(self.num_hidden_layers)
        )


def _token_ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def build_config(spec: TinySpec = TinySpec(), tokenizer=None):
    """The ``DiffusionGemmaConfig`` for ``spec`` (token ids taken from ``tokenizer``)."""
    from transformers import DiffusionGemmaConfig

    if tokenizer is None:
        tokenizer = build_tokenizer(spec.tokenizer_vocab_size)
    n_tok = len(tokenizer)
    vocab_size = n_tok if spec.vocab_size is None else spec.vocab_size
    if vocab_size < n_tok:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({n_tok} tokens)")
    layer_types = list(spec.resolved_layer_types())
    if layer_types[-1] != "full_attention":
        raise ValueError("the last layer must be full_attention (transformers forces it)")
    ids = _token_ids(tokenizer)
    eos = [tokenizer.eos_token_id, ids[TURN_END]]
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        layer_types=layer_types,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        global_head_dim=spec.global_head_dim,
        num_global_key_value_heads=spec.num_global_key_value_heads,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        sliding_window=spec.sliding_window,
        rope_parameters={
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": spec.partial_rotary_factor,
                "rope_theta": spec.rope_theta,
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": spec.rope_theta_sliding},
        },
        num_experts=spec.num_experts,
        top_k_experts=spec.top_k_experts,
        moe_intermediate_size=spec.moe_intermediate_size,
        use_bidirectional_attention=spec.use_bidirectional_attention,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
    )
    vision_config = dict(
        model_type="gemma4_vision",
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_num_hidden_layers,
        num_attention_heads=spec.vision_num_attention_heads,
        num_key_value_heads=spec.vision_num_attention_heads,
        head_dim=spec.vision_head_dim,
        patch_size=spec.vision_patch_size,
        position_embedding_size=spec.vision_position_embedding_size,
        pooling_kernel_size=spec.vision_pooling_kernel_size,
        rms_norm_eps=spec.rms_norm_eps,
    )
    return DiffusionGemmaConfig(
        text_config=text_config,
        vision_config=vision_config,
        canvas_length=spec.canvas_length,
        boi_token_id=ids["<|image>"],
        eoi_token_id=ids["<image|>"],
        image_token_id=ids["<|image|>"],
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
    )


def _draw(name: str, shape, seed: int):
    """Well-conditioned random values for the tensor called ``name``.

    Measured: default-like scales make a tiny model chaotic (q/k norms near 1 with attention
    scaling 1.0 give peaked softmaxes; a weak router gives near-tied expert choices). q/k norm
    weights in U(0.3, 0.6) and a router projection with std 3 make fp32 and fp64 agree.
    """
    import torch

    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))

    def uniform(lo: float, hi: float):
        return torch.empty(shape).uniform_(lo, hi, generator=g)

    def normal(std: float):
        return torch.empty(shape).normal_(0.0, std, generator=g)

    leaf = name.rsplit(".", 2)
    if name.endswith("layer_scalar"):
        # Encoder and decoder scalars come from disjoint ranges, so a mix-up shows.
        return uniform(0.55, 0.95) if ".encoder." in f".{name}" else uniform(1.05, 1.45)
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return uniform(0.3, 0.6)
    if name.endswith("router.proj.weight"):
        return normal(3.0)
    if name.endswith(("router.scale", "router.per_expert_scale")):
        return uniform(0.5, 1.5)
    if name.endswith("embed_tokens.weight"):  # also the (tied) LM head
        return normal(0.4)
    if name.endswith("position_embedding_table"):
        return normal(0.5)
    if len(shape) == 1 and ("norm" in leaf[-2] or "norm" in leaf[-1]):
        return uniform(0.6, 1.4)
    if len(shape) >= 2:  # linear weights and expert stacks: unit-variance outputs
        return normal(float(shape[-1]) ** -0.5)
    return uniform(0.5, 1.5)


def build_model(spec: TinySpec = TinySpec(), tokenizer=None):
    """An fp32 ``DiffusionGemmaForBlockDiffusion`` with the deterministic tiny init (eval mode)."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    config = build_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = DiffusionGemmaForBlockDiffusion(config)
    model.eval()
    persistent = set(model.state_dict().keys())
    with torch.no_grad():
        for name, tensor in model.named_parameters():  # tied parameters are listed once
            tensor.copy_(_draw(name, tuple(tensor.shape), spec.seed))
        for name, tensor in model.named_buffers():
            if name in persistent:  # layer_scalar; rotary tables and embed_scale are derived
                tensor.copy_(_draw(name, tuple(tensor.shape), spec.seed))
    return model


def _generation_config(tokenizer, settings: dict[str, Any] | None = None):
    """The sampler settings `generate` reads (GENERATION_DEFAULTS unless `settings` is given)."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    d = settings if settings is not None else GENERATION_DEFAULTS
    return DiffusionGemmaGenerationConfig(
        max_denoising_steps=d["max_denoising_steps"],
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=d["entropy_bound"]),
        t_min=d["t_min"],
        t_max=d["t_max"],
        stability_threshold=d["stability_threshold"],
        confidence_threshold=d["confidence_threshold"],
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(TURN_END)],
    )


def _restyle_config_json(path: Path, spec: TinySpec) -> None:
    if spec.config_style not in ("transformers", "hub", "both"):
        raise ValueError(f"config_style must be transformers, hub or both, not {spec.config_style!r}")
    if spec.config_style == "transformers":
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    text = data["text_config"]
    text["global_head_dim"] = spec.global_head_dim
    text["num_global_key_value_heads"] = spec.num_global_key_value_heads
    if spec.config_style == "hub":
        text.pop("per_layer_config", None)
    # The same formatting as PreTrainedConfig.to_json_string.
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_checkpoint(out_dir, spec: TinySpec = TinySpec(), *, dtype=None) -> Path:
    """Writes a tiny random checkpoint for ``spec`` into ``out_dir`` and returns its path.

    ``dtype`` (default ``torch.float32``) is the dtype of the saved weights, e.g. ``torch.bfloat16``
    (the values are drawn in fp32 and rounded). The same spec and dtype give byte-identical files.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.tokenizer_vocab_size, model_max_length=spec.max_position_embeddings)
    model = build_model(spec, tokenizer)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    _restyle_config_json(out / "config.json", spec)
    tokenizer.save_pretrained(out)
    (out / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------
# Reference numerics
# ---------------------------------------------------------------------------------------------


def sample_inputs(vocab_size: int, *, prompt_len: int = 40, canvas_length: int = 16, batch: int = 2, seed: int = 0):
    """Deterministic random (prompt_ids, canvas_ids), shapes [batch, prompt_len] / [batch, canvas]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (batch, prompt_len), generator=g)
    canvas = torch.randint(0, vocab_size, (batch, canvas_length), generator=g)
    return prompt, canvas


def canvas_logits(model, prompt_ids, canvas_ids, self_conditioning_logits=None):
    """Decoder logits [batch, canvas, vocab] (fp32) for one denoising step, as ``generate`` runs it.

    The encoder reads ``prompt_ids`` into a fresh cache at positions 0..P-1; the decoder reads
    the cache and the canvas at positions P..P+C-1. Pass the previous step's logits as
    ``self_conditioning_logits`` for a later step (``None`` is the first step).
    """
    import torch

    with torch.no_grad():
        out = model(
            input_ids=prompt_ids,
            decoder_input_ids=canvas_ids,
            self_conditioning_logits=self_conditioning_logits,
        )
    return out.logits


def precision_gap(model, prompt_ids=None, canvas_ids=None) -> float:
    """Max |logits(fp32) - logits(fp64)| over a first and a self-conditioned second step."""
    import torch

    m32 = copy.deepcopy(model).to(torch.float32).eval()
    m64 = copy.deepcopy(model).to(torch.float64).eval()
    for m in (m32, m64):  # grouped_mm (the default experts kernel) has no fp64; same kernels on both
        m.set_experts_implementation("eager")
        m.set_attn_implementation("eager")
    if prompt_ids is None or canvas_ids is None:
        cfg = model.config
        prompt_ids, canvas_ids = sample_inputs(cfg.text_config.vocab_size, canvas_length=cfg.canvas_length)
    worst = 0.0
    sc32 = sc64 = None
    for _step in range(2):
        l32 = canvas_logits(m32, prompt_ids, canvas_ids, sc32)
        l64 = canvas_logits(m64, prompt_ids, canvas_ids, sc64)
        worst = max(worst, (l32.double() - l64.double()).abs().max().item())
        sc32, sc64 = l32, l64.double()
    return worst
