// Weight quantization with ggml's quantizers, multi-threaded by rows.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dg {

// Quantizes n_rows rows of n_per_row floats into ggml type `type`; `imatrix` ([n_per_row]
// importance weights) may be null. Returns the bytes written. Throws dg::Error on bad input.
size_t quantize_rows(int32_t type, const float * src, void * dst, int64_t n_rows, int64_t n_per_row, const float * imatrix,
                     int32_t n_threads);

// Bytes of one row of n_per_row values in `type`; 0 when the type or the length does not fit.
size_t type_row_size(int32_t type, int64_t n_per_row);

}  // namespace dg
