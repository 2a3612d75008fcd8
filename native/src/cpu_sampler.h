// The step's sampler reductions on the CPU backend as one ggml custom op: reduce_row (sampler.h) on
// each row, threads over rows, the same double-precision arithmetic as the host sampler.
#pragma once

struct ggml_context;
struct ggml_tensor;

namespace dg {

// `processed` F32 [n_vocab, n] (contiguous), `uniforms` F32 [n]: F32 [3, n] of (argmax, draw,
// entropy) per position, the ids stored as exact float values (n_vocab < 2^24).
ggml_tensor * cpu_sampler_rows(ggml_context * ctx, ggml_tensor * processed, ggml_tensor * uniforms);

}  // namespace dg
