// Typed reads of gguf metadata that never trip ggml's type assertions: check the type first.
#pragma once

#include "gguf.h"

#include <cstddef>
#include <cstdint>

namespace dg {

bool is_integer(enum gguf_type t);
bool is_float(enum gguf_type t);

// Element i of an integer array, or the integer scalar (i = 0), as int64; -1 for a value that does
// not fit or a key that is not an integer.
int64_t integer_at(const gguf_context * g, int64_t key, size_t i);
// Element i of a float array, or the float scalar (i = 0).
double float_at(const gguf_context * g, int64_t key, size_t i);

}  // namespace dg
