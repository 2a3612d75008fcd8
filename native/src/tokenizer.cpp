// The gemma4 tokenizer (see tokenizer.h), written to give the same ids as Hugging Face's
// GemmaTokenizer (the `tokenizers` BPE model with byte_fallback and fuse_unk, normalizer
// Replace(" " -> "▁"), added tokens split out first) on the same vocabulary:
//
// * Special tokens (CONTROL and USER_DEFINED, HF's added tokens) are found with a byte trie,
//   leftmost-longest, on the raw text; each match emits its id. With parse_special false none are
//   matched.
// * Each stretch of text between them is one BPE "word" (HF's Split(" ") pre-tokenizer runs after
//   the normalizer has replaced every space, so it never splits): every UTF-8 character (' ' read
//   as "▁") becomes its token, or, when the vocabulary has no such piece, its bytes as <0xXX>
//   tokens (an unknown token when a byte token is missing; consecutive unknowns fuse into one).
//   Bytes that are not valid UTF-8 are characters of their own. Then adjacent symbols merge by
//   merge rank (ties: leftmost) over a priority queue and a linked list of symbols, exactly as
//   tokenizers' Word::merge_all does: merges are keyed by the pair of token ids and produce the id
//   of the concatenation.
// * Decoding concatenates pieces with "▁" read as ' '; <0xXX> tokens are raw bytes (so byte
//   tokens that do not form valid UTF-8 come back as those bytes; HF prints U+FFFD per byte).
//   CONTROL (and UNKNOWN) tokens render only with render_special; UNUSED tokens never render.
//   Without token types, <0xXX> pieces are bytes and every other token is normal text.
#include "tokenizer.h"

#include "gguf_values.h"

#include "error.h"
#include "gguf_model.h"

#include "gguf.h"

#include <algorithm>
#include <cstring>
#include <queue>
#include <string_view>
#include <unordered_map>
#include <utility>

namespace dg {

namespace {

// llama.cpp's token types (tokenizer.ggml.token_type).
enum TokenType : uint8_t {
    kUndefined   = 0,
    kNormal      = 1,
    kUnknown     = 2,
    kControl     = 3,
    kUserDefined = 4,
    kUnused      = 5,
    kByte        = 6,
};

const char kSpacePiece[] = "\xE2\x96\x81";  // U+2581, what a space becomes

// An optional token id key: -1 when absent; throws when it is not an integer inside the vocabulary.
int32_t optional_token_id(const gguf_context * g, const char * name, size_t n_vocab) {
    const int64_t key = gguf_find_key(g, name);
    if (key < 0) {
        return -1;
    }
    if (!is_integer(gguf_get_kv_type(g, key))) {
        fail(DG_ERR_FORMAT, format("%s has type %s (expected an unsigned integer)", name,
                                   gguf_type_name(gguf_get_kv_type(g, key))));
    }
    const int64_t v = integer_at(g, key, 0);
    if (v < 0 || static_cast<uint64_t>(v) >= n_vocab) {
        fail(DG_ERR_FORMAT, format("%s = %lld is outside the vocabulary (%zu tokens)", name, static_cast<long long>(v),
                                   n_vocab));
    }
    return static_cast<int32_t>(v);
}

// Length of the UTF-8 character at s[0..n), n >= 1: 1..4, or 0 when s[0] does not start a valid
// (shortest-form, non-surrogate, <= U+10FFFF) sequence.
size_t utf8_char_len(const unsigned char * s, size_t n) {
    const unsigned char c = s[0];
    if (c < 0x80) {
        return 1;
    }
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        return 0;
    }
    if (n < len || s[1] < lo || s[1] > hi) {
        return 0;
    }
    for (size_t k = 2; k < len; ++k) {
        if ((s[k] & 0xC0) != 0x80) {
            return 0;
        }
    }
    return len;
}

// The byte a "<0xXX>" piece stands for (either hex case, as HF's ByteFallback decoder reads it),
// or -1.
int byte_of_piece(const std::string & piece) {
    if (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>') {
        return -1;
    }
    auto hex = [](char ch) -> int {
        if (ch >= '0' && ch <= '9') return ch - '0';
        if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
        if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
        return -1;
    };
    const int h = hex(piece[3]), l = hex(piece[4]);
    return h < 0 || l < 0 ? -1 : h * 16 + l;
}

uint64_t pair_key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

}  // namespace

struct Tokenizer::Impl {
    struct Merge {
        int32_t rank;
        int32_t result;
    };
    // A node of the special-token trie: edges sorted by byte.
    struct TrieNode {
        std::vector<std::pair<unsigned char, int32_t>> edges;
        int32_t token = -1;
    };
    // A BPE symbol in the linked list of one word.
    struct Symbol {
        int32_t id;
        int32_t prev;
        int32_t next;
        bool    alive;
    };
    // A candidate merge of symbols[pos] and its right neighbour.
    struct Candidate {
        int32_t rank;
        int32_t pos;
        int32_t result;
        // std::priority_queue pops the largest: "larger" = lower rank, then smaller position.
        bool operator<(const Candidate & o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };

    std::vector<std::string>                      pieces;
    std::vector<uint8_t>                          types;
    std::vector<int16_t>                          byte_value;    // per token: the byte of a <0xXX> piece, or -1
    std::unordered_map<std::string_view, int32_t> piece_ids;     // lowest id of each piece (views of `pieces`)
    std::unordered_map<uint64_t, Merge>           merges;        // (left id, right id) -> rank, result id
    int32_t                                       byte_ids[256] = {};  // id of <0xXX> per byte, or -1
    std::vector<TrieNode>                         trie;          // special tokens; trie[0] is the root
    int32_t                                       bos_id = -1;
    int32_t                                       unk_id = -1;
    std::vector<int32_t>                          eog_ids;
    // Why the vocabulary cannot be used (DG_OK: it can); encode and decode report it.
    dg_status                                     load_status = DG_OK;
    std::string                                   load_error;

    void check_loaded() const {
        if (load_status != DG_OK) {
            fail(load_status, load_error);
        }
    }

    void load(const gguf_context * g);
    void add_special(int32_t id);
    // Length of the longest special token starting at text[pos], and its id (0 when none).
    size_t match_special(const std::string & text, size_t pos, int32_t * id) const;
    void encode_word(const char * text, size_t n, std::vector<int32_t> & out) const;
};

void Tokenizer::Impl::load(const gguf_context * g) {
    // Tokens (the loader has checked: a non-empty array of strings).
    const int64_t tokens_key = gguf_find_key(g, "tokenizer.ggml.tokens");
    if (tokens_key < 0 || gguf_get_kv_type(g, tokens_key) != GGUF_TYPE_ARRAY ||
        gguf_get_arr_type(g, tokens_key) != GGUF_TYPE_STRING) {
        fail(DG_ERR_FORMAT, "tokenizer.ggml.tokens is missing or not an array of strings");
    }
    const size_t n_vocab = gguf_get_arr_n(g, tokens_key);
    if (n_vocab == 0 || n_vocab > static_cast<size_t>(INT32_MAX)) {
        fail(DG_ERR_FORMAT, format("tokenizer.ggml.tokens has %zu entries", n_vocab));
    }
    pieces.resize(n_vocab);
    piece_ids.reserve(n_vocab);
    for (size_t i = 0; i < n_vocab; ++i) {
        const char * s = gguf_get_arr_str(g, tokens_key, i);
        pieces[i] = s != nullptr ? s : "";
        piece_ids.emplace(pieces[i], static_cast<int32_t>(i));  // keeps the first (lowest) id
    }

    // Token types: optional; when absent, <0xXX> pieces are bytes and the rest normal.
    types.assign(n_vocab, kNormal);
    byte_value.assign(n_vocab, -1);
    const int64_t types_key = gguf_find_key(g, "tokenizer.ggml.token_type");
    if (types_key >= 0) {
        if (gguf_get_kv_type(g, types_key) != GGUF_TYPE_ARRAY || !is_integer(gguf_get_arr_type(g, types_key))) {
            fail(DG_ERR_FORMAT, "tokenizer.ggml.token_type is not an array of integers");
        }
        if (gguf_get_arr_n(g, types_key) != n_vocab) {
            fail(DG_ERR_FORMAT, format("tokenizer.ggml.token_type has %zu entries but the vocabulary has %zu tokens",
                                       gguf_get_arr_n(g, types_key), n_vocab));
        }
        for (size_t i = 0; i < n_vocab; ++i) {
            const int64_t t = integer_at(g, types_key, i);
            types[i] = static_cast<uint8_t>(t >= kUndefined && t <= kByte ? t : int64_t{kNormal});
        }
    }
    for (size_t i = 0; i < n_vocab; ++i) {
        const int b = byte_of_piece(pieces[i]);
        byte_value[i] = static_cast<int16_t>(b);
        if (types_key < 0 && b >= 0) {
            types[i] = kByte;
        }
    }
    // Byte fallback looks the pieces up by text, as HF does ("<0x%02X>", uppercase hex).
    for (int b = 0; b < 256; ++b) {
        const std::string name = format("<0x%02X>", b);
        const auto it = piece_ids.find(name);
        byte_ids[b] = it != piece_ids.end() ? it->second : -1;
    }

    // Merges "left right" in rank order. Like HF, a pair listed twice takes its last rank; merges
    // whose parts or result are not tokens (HF refuses to load those) are skipped.
    const int64_t merges_key = gguf_find_key(g, "tokenizer.ggml.merges");
    if (merges_key >= 0) {
        if (gguf_get_kv_type(g, merges_key) != GGUF_TYPE_ARRAY || gguf_get_arr_type(g, merges_key) != GGUF_TYPE_STRING) {
            fail(DG_ERR_FORMAT, "tokenizer.ggml.merges is not an array of strings");
        }
        const size_t n_merges = gguf_get_arr_n(g, merges_key);
        if (n_merges > static_cast<size_t>(INT32_MAX)) {
            fail(DG_ERR_FORMAT, format("tokenizer.ggml.merges has %zu entries", n_merges));
        }
        merges.reserve(n_merges);
        std::string joined;
        for (size_t r = 0; r < n_merges; ++r) {
            const char * s = gguf_get_arr_str(g, merges_key, r);
            const size_t len = s != nullptr ? std::strlen(s) : 0;
            const char * sep = len > 1 ? static_cast<const char *>(std::memchr(s + 1, ' ', len - 1)) : nullptr;
            if (sep == nullptr) {
                fail(DG_ERR_FORMAT, format("tokenizer.ggml.merges[%zu] is not two pieces separated by a space", r));
            }
            const std::string_view left(s, static_cast<size_t>(sep - s));
            const std::string_view right(sep + 1, static_cast<size_t>(s + len - (sep + 1)));
            joined.assign(left.data(), left.size());
            joined.append(right.data(), right.size());
            const auto l = piece_ids.find(left);
            const auto rt = piece_ids.find(right);
            const auto res = piece_ids.find(joined);
            if (l == piece_ids.end() || rt == piece_ids.end() || res == piece_ids.end()) {
                continue;
            }
            merges[pair_key(l->second, rt->second)] = Merge{static_cast<int32_t>(r), res->second};
        }
    }

    // Special tokens: HF's added tokens, i.e. CONTROL and USER_DEFINED (and UNKNOWN, which
    // llama.cpp's converters give <unk>; ours writes it as CONTROL).
    trie.assign(1, TrieNode{});
    for (size_t i = 0; i < n_vocab; ++i) {
        const uint8_t t = types[i];
        if ((t == kControl || t == kUserDefined || t == kUnknown) && !pieces[i].empty()) {
            add_special(static_cast<int32_t>(i));
        }
    }

    bos_id = optional_token_id(g, "tokenizer.ggml.bos_token_id", n_vocab);
    unk_id = optional_token_id(g, "tokenizer.ggml.unknown_token_id", n_vocab);
    if (unk_id < 0) {
        const auto it = piece_ids.find("<unk>");
        unk_id = it != piece_ids.end() ? it->second : -1;
    }
}

void Tokenizer::Impl::add_special(int32_t id) {
    const std::string & piece = pieces[static_cast<size_t>(id)];
    int32_t node = 0;
    for (const char ch : piece) {
        const auto c = static_cast<unsigned char>(ch);
        auto & edges = trie[static_cast<size_t>(node)].edges;
        auto it = std::lower_bound(edges.begin(), edges.end(), c,
                                   [](const std::pair<unsigned char, int32_t> & e, unsigned char v) { return e.first < v; });
        if (it != edges.end() && it->first == c) {
            node = it->second;
            continue;
        }
        const auto child = static_cast<int32_t>(trie.size());
        edges.insert(it, {c, child});  // `edges` is not used after trie grows
        trie.emplace_back();
        node = child;
    }
    TrieNode & end = trie[static_cast<size_t>(node)];
    if (end.token < 0) {  // a piece listed twice keeps its first id
        end.token = id;
    }
}

size_t Tokenizer::Impl::match_special(const std::string & text, size_t pos, int32_t * id) const {
    size_t best = 0;
    int32_t node = 0;
    for (size_t k = pos; k < text.size(); ++k) {
        const auto c = static_cast<unsigned char>(text[k]);
        const auto & edges = trie[static_cast<size_t>(node)].edges;
        const auto it = std::lower_bound(edges.begin(), edges.end(), c,
                                         [](const std::pair<unsigned char, int32_t> & e, unsigned char v) { return e.first < v; });
        if (it == edges.end() || it->first != c) {
            break;
        }
        node = it->second;
        const int32_t tok = trie[static_cast<size_t>(node)].token;
        if (tok >= 0) {
            best = k + 1 - pos;
            *id = tok;
        }
    }
    return best;
}

void Tokenizer::Impl::encode_word(const char * text, size_t n, std::vector<int32_t> & out) const {
    const auto * s = reinterpret_cast<const unsigned char *>(text);
    std::vector<Symbol> symbols;
    symbols.reserve(n);
    auto push = [&symbols](int32_t id) {
        const auto i = static_cast<int32_t>(symbols.size());
        symbols.push_back(Symbol{id, i - 1, i + 1, true});
    };

    // Initial symbols: one per character, or its byte tokens, or an unknown token (fused).
    std::string_view ch;
    bool last_unk = false;
    for (size_t pos = 0; pos < n;) {
        size_t len = utf8_char_len(s + pos, n - pos);
        if (len == 0) {
            len = 1;  // an invalid byte is a character of its own
        }
        ch = s[pos] == ' ' ? std::string_view(kSpacePiece) : std::string_view(text + pos, len);
        pos += len;
        const auto it = piece_ids.find(ch);
        if (it != piece_ids.end()) {
            push(it->second);
            last_unk = false;
            continue;
        }
        bool all_bytes = true;
        for (const char b : ch) {
            all_bytes = all_bytes && byte_ids[static_cast<unsigned char>(b)] >= 0;
        }
        if (all_bytes) {
            for (const char b : ch) {
                push(byte_ids[static_cast<unsigned char>(b)]);
            }
            last_unk = false;
        } else if (unk_id >= 0 && !last_unk) {
            push(unk_id);
            last_unk = true;
        }
        // (no unknown token: the character is dropped, as HF does without an unk_token)
    }
    if (symbols.empty()) {
        return;
    }
    symbols.back().next = -1;

    // Merge by rank, leftmost first; stale candidates are skipped when popped.
    std::vector<Candidate> storage;
    storage.reserve(symbols.size());
    std::priority_queue<Candidate> queue(std::less<Candidate>(), std::move(storage));
    auto consider = [&](int32_t left) {
        const Symbol & a = symbols[static_cast<size_t>(left)];
        if (a.next < 0) {
            return;
        }
        const auto it = merges.find(pair_key(a.id, symbols[static_cast<size_t>(a.next)].id));
        if (it != merges.end()) {
            queue.push(Candidate{it->second.rank, left, it->second.result});
        }
    };
    for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) {
        consider(i);
    }
    while (!queue.empty()) {
        const Candidate top = queue.top();
        queue.pop();
        Symbol & a = symbols[static_cast<size_t>(top.pos)];
        if (!a.alive || a.next < 0) {
            continue;
        }
        Symbol & b = symbols[static_cast<size_t>(a.next)];
        const auto it = merges.find(pair_key(a.id, b.id));
        if (it == merges.end() || it->second.result != top.result) {
            continue;  // the pair changed since this candidate was queued
        }
        a.id = top.result;
        b.alive = false;
        a.next = b.next;
        if (a.next >= 0) {
            symbols[static_cast<size_t>(a.next)].prev = top.pos;
        }
        if (a.prev >= 0) {
            consider(a.prev);
        }
        consider(top.pos);
    }

    for (int32_t i = 0; i >= 0; i = symbols[static_cast<size_t>(i)].next) {
        out.push_back(symbols[static_cast<size_t>(i)].id);
    }
}

namespace {

// tokenizer.ggml.eos_token_id and gemma4's end-of-generation pieces, each id once (see eog_ids()).
std::vector<int32_t> find_eog_ids(const gguf_context * g) {
    std::vector<int32_t> ids;
    const int64_t tokens_key = gguf_find_key(g, "tokenizer.ggml.tokens");
    if (tokens_key < 0 || gguf_get_kv_type(g, tokens_key) != GGUF_TYPE_ARRAY ||
        gguf_get_arr_type(g, tokens_key) != GGUF_TYPE_STRING) {
        return ids;
    }
    const size_t  n_vocab = gguf_get_arr_n(g, tokens_key);
    const int64_t eos_key = gguf_find_key(g, "tokenizer.ggml.eos_token_id");
    if (eos_key >= 0 && is_integer(gguf_get_kv_type(g, eos_key))) {
        const int64_t eos = integer_at(g, eos_key, 0);
        if (eos >= 0 && static_cast<uint64_t>(eos) < n_vocab) {
            ids.push_back(static_cast<int32_t>(eos));
        }
    }
    for (size_t i = 0; i < n_vocab && i <= static_cast<size_t>(INT32_MAX); ++i) {
        const char * piece = gguf_get_arr_str(g, tokens_key, i);
        if (piece == nullptr) {
            continue;
        }
        if (std::strcmp(piece, "<eos>") == 0 || std::strcmp(piece, "<turn|>") == 0 ||
            std::strcmp(piece, "<|tool_response>") == 0) {
            if (std::find(ids.begin(), ids.end(), static_cast<int32_t>(i)) == ids.end()) {
                ids.push_back(static_cast<int32_t>(i));
            }
        }
    }
    return ids;
}

}  // namespace

Tokenizer::Tokenizer(const GgufModel & model) : impl_(new Impl()) {
    try {
        impl_->eog_ids = find_eog_ids(model.gguf());
        try {
            impl_->load(model.gguf());
        } catch (const Error & e) {
            impl_->load_status = e.status();
            impl_->load_error  = e.what();
        }
    } catch (...) {
        delete impl_;
        throw;
    }
}

Tokenizer::~Tokenizer() { delete impl_; }

const std::vector<int32_t> & Tokenizer::eog_ids() const { return impl_->eog_ids; }

// `add_bos` does nothing when the model names no BOS token (as HF adds nothing without one).
std::vector<int32_t> Tokenizer::encode(const std::string & text, bool add_bos, bool parse_special) const {
    impl_->check_loaded();
    std::vector<int32_t> out;
    out.reserve(text.size() / 2 + 2);
    if (add_bos && impl_->bos_id >= 0) {
        out.push_back(impl_->bos_id);
    }
    if (!parse_special) {
        impl_->encode_word(text.data(), text.size(), out);
        return out;
    }
    size_t start = 0;  // start of the ordinary text not yet encoded
    for (size_t pos = 0; pos < text.size();) {
        int32_t id = -1;
        const size_t len = impl_->match_special(text, pos, &id);
        if (len == 0) {
            ++pos;
            continue;
        }
        impl_->encode_word(text.data() + start, pos - start, out);
        out.push_back(id);
        pos += len;
        start = pos;
    }
    impl_->encode_word(text.data() + start, text.size() - start, out);
    return out;
}

std::string Tokenizer::decode(const int32_t * ids, size_t n, bool render_special) const {
    impl_->check_loaded();
    const Impl & m = *impl_;
    const size_t n_vocab = m.pieces.size();
    std::string out;
    for (size_t i = 0; i < n; ++i) {
        const int32_t id = ids[i];
        if (id < 0 || static_cast<size_t>(id) >= n_vocab) {
            fail(DG_ERR_INVALID_ARG, format("token id %d is out of range (vocabulary of %zu)", id, n_vocab));
        }
        const auto k = static_cast<size_t>(id);
        const uint8_t type = m.types[k];
        if (type == kUnused || ((type == kControl || type == kUnknown) && !render_special)) {
            continue;
        }
        if (m.byte_value[k] >= 0) {
            out.push_back(static_cast<char>(static_cast<unsigned char>(m.byte_value[k])));
            continue;
        }
        const std::string & piece = m.pieces[k];
        for (size_t p = 0; p < piece.size();) {
            if (piece.compare(p, 3, kSpacePiece) == 0) {
                out.push_back(' ');
                p += 3;
            } else {
                out.push_back(piece[p++]);
            }
        }
    }
    return out;
}

}  // namespace dg
