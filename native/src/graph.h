// The DiffusionGemma forward pass as one ggml graph (spec section 3).
#pragma once

#include <cstdint>

struct ggml_context;
struct ggml_cgraph;
struct ggml_tensor;

namespace dg {

class GgufModel;
class KvCache;

enum class Pass {
    ENCODE,  // prompt or committed canvas: causal, encoder layer scalars, K/V appended to the cache
    DECODE,  // canvas: bidirectional over [cached prefix | canvas], decoder scalars, logits out
};

struct ForwardShape {
    Pass     pass = Pass::ENCODE;
    uint32_t n_tokens = 0;   // new tokens in this pass
    uint32_t n_past = 0;     // tokens already in the cache
    bool     self_cond = false;
    uint32_t sc_top_k = 0;   // self-conditioning over each row's top k tokens only (0 = exact)
    bool     ggml_matmuls_only = false;  // no custom matmul ops (the imatrix collector watches ggml's)
};

// Inputs the caller fills after allocation, and the output.
struct ForwardTensors {
    ggml_tensor * tokens = nullptr;     // I32 [n_tokens]
    ggml_tensor * positions = nullptr;  // I32 [n_tokens]
    ggml_tensor * mask_full = nullptr;  // F32 [n_kv_full, n_tokens] (ENCODE only)
    ggml_tensor * mask_swa = nullptr;   // F32 [n_kv_swa, n_tokens]  (ENCODE only)
    ggml_tensor * sc_logits = nullptr;  // F32 [n_vocab, n_tokens]   (DECODE with self-conditioning)
    ggml_tensor * logits = nullptr;     // F32 [n_vocab, n_tokens]   (DECODE)
    uint32_t      kv_start_swa = 0;     // first cached position sliding layers read
};

// Builds the pass into `gf`. `embd_t` is the transposed embedding [n_vocab, n_embd] used by
// self-conditioning (may be null when shape.self_cond is false).
ForwardTensors build_forward(ggml_context * ctx, ggml_cgraph * gf, const GgufModel & model, const KvCache & cache,
                             const ForwardShape & shape, ggml_tensor * embd_t);

// First cached position a sliding layer reads for queries starting at `n_past`: the last
// sliding_window - 1 tokens of the prefix, as the reference's sliding-window cache keeps them.
uint32_t swa_kv_start(uint32_t n_past, uint32_t sliding_window);

}  // namespace dg
