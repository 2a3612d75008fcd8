// The gemma4 tokenizer of a GGUF file (spec section 1d): byte-level-fallback BPE over
// tokenizer.ggml.tokens and tokenizer.ggml.merges, as Hugging Face's GemmaTokenizer runs it:
// special (CONTROL / USER_DEFINED) tokens are matched whole first, spaces become U+2581, merges
// apply by rank, symbols without a token become <0xXX> byte tokens; no prefix space is added.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace dg {

class GgufModel;

class Tokenizer {
public:
    // Reads the vocabulary from the model's metadata. A malformed vocabulary (merges, token types,
    // special token ids) does not throw here: encode() and decode() throw its dg::Error, while
    // eog_ids() stays usable (it needs only the token pieces, which the loader has checked).
    explicit Tokenizer(const GgufModel & model);
    ~Tokenizer();
    Tokenizer(const Tokenizer &) = delete;
    Tokenizer & operator=(const Tokenizer &) = delete;

    // `add_bos` prepends tokenizer.ggml.bos_token_id (nothing when the model has none); with
    // `parse_special` false, special-token text is tokenized as ordinary text.
    std::vector<int32_t> encode(const std::string & text, bool add_bos, bool parse_special) const;
    // The UTF-8 text of `ids`; CONTROL tokens render as nothing unless `render_special`.
    // Throws dg::Error (DG_ERR_INVALID_ARG) for an id outside the vocabulary.
    std::string decode(const int32_t * ids, size_t n, bool render_special) const;
    // The end-of-generation tokens: tokenizer.ggml.eos_token_id (when it is an integer inside the
    // vocabulary), then the tokens spelled <eos>, <turn|> and <|tool_response> (gemma4's end of
    // text, end of turn and the turn a tool call waits on), each id once.
    const std::vector<int32_t> & eog_ids() const;

private:
    struct Impl;
    Impl * impl_;
};

}  // namespace dg
