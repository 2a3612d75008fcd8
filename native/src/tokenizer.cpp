// Placeholder: the gemma4 BPE is being written (see tokenizer.h for the contract).
#include "tokenizer.h"

#include "error.h"

namespace dg {

struct Tokenizer::Impl {};

Tokenizer::Tokenizer(const GgufModel &) : impl_(new Impl()) {}

Tokenizer::~Tokenizer() { delete impl_; }

std::vector<int32_t> Tokenizer::encode(const std::string &, bool, bool) const {
    fail(DG_ERR_UNSUPPORTED, "the tokenizer is not implemented yet");
}

std::string Tokenizer::decode(const int32_t *, size_t, bool) const {
    fail(DG_ERR_UNSUPPORTED, "the tokenizer is not implemented yet");
}

}  // namespace dg
