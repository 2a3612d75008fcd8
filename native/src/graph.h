// The DiffusionGemma forward pass (spec section 3) and the sampler's per-position reductions
// (spec section 4) as one ggml graph. Stock ggml ops throughout, so every backend runs it; where
// the KernelPolicy says so (CPU only), our custom ops replace some of them.
#pragma once

#include "dgemma.h"

#include <cstdint>

struct ggml_context;
struct ggml_cgraph;
struct ggml_tensor;

namespace dg {

class GgufModel;
class KvCache;
struct KernelPolicy;

enum class Pass {
    ENCODE,  // prompt or committed canvas: causal, encoder layer scalars, K/V appended to the cache
    DECODE,  // canvas: bidirectional over [cached prefix | canvas], decoder scalars, logits out
};

enum class SelfCond {
    NONE,    // no self-conditioning input (the first step of a canvas)
    HOST,    // the previous step's processed logits, uploaded by the caller (dg_denoise)
    DEVICE,  // the previous step's processed logits, left on the device by a sampling graph
};

struct ForwardShape {
    Pass     pass = Pass::ENCODE;
    uint32_t n_tokens = 0;   // new tokens in this pass
    uint32_t n_kv_full = 0;  // slots the full layers attend over (kv_view_full: n_past is not in the shape)
    SelfCond self_cond = SelfCond::NONE;
    uint32_t sc_top_k = 0;   // self-conditioning over each row's top k tokens only (0 = exact)
    bool     sample = false;  // DECODE: append the sampler's reductions; the processed logits go to the state
    bool     flash_attn = false;  // ggml_flash_attn_ext (V stored as rows) or matmuls (V stored transposed)
    bool     ggml_matmuls_only = false;  // no custom matmul ops (the imatrix collector watches ggml's)

    bool operator==(const ForwardShape & o) const {
        return pass == o.pass && n_tokens == o.n_tokens && n_kv_full == o.n_kv_full && self_cond == o.self_cond &&
               sc_top_k == o.sc_top_k && sample == o.sample && flash_attn == o.flash_attn &&
               ggml_matmuls_only == o.ggml_matmuls_only;
    }
    bool operator!=(const ForwardShape & o) const { return !(*this == o); }
};

// Inputs the caller fills after allocation, and the outputs. Per layer kind (full, sliding):
// the slots this pass writes, and which slots each query may read.
struct ForwardTensors {
    ggml_tensor * tokens = nullptr;       // I32 [n_tokens]
    ggml_tensor * positions = nullptr;    // I32 [n_tokens]
    ggml_tensor * slots[2] = {};          // I32 [n_tokens]: the slot of each position ([0] full, [1] sliding)
    ggml_tensor * v_slots[2] = {};        // I32 [hd * n_head_kv * n_tokens]: each V value's place (transposed V)
    ggml_tensor * mask[2] = {};           // ENCODE: F16 [n_kv, n_tokens], 0 or -inf (causal, window)
    ggml_tensor * kv_row[2] = {};         // DECODE: F32 [n_kv], 0 or -inf: the same for every canvas query
    ggml_tensor * sc_logits = nullptr;    // F32 [n_vocab, n_tokens]   (SelfCond::HOST)
    ggml_tensor * temperature = nullptr;  // F32 [1]                   (sample)
    ggml_tensor * uniforms = nullptr;     // F32 [n_tokens]            (sample)
    ggml_tensor * logits = nullptr;       // F32 [n_vocab, n_tokens]   (DECODE, read back when not sampling)
    // sample: either `rows` (F32 [3, n]: argmax, draw, entropy) or the three tensors below
    ggml_tensor * rows = nullptr;
    ggml_tensor * argmax = nullptr;       // I32 [n]
    ggml_tensor * draws = nullptr;        // F32 [1, n] (exact integer values)
    ggml_tensor * entropy = nullptr;      // F32 [1, n]
};

// Builds the pass into `gf`. `embd_t` is the transposed embedding [n_vocab, n_embd] for exact
// self-conditioning (null otherwise). `sc_state` is an F32 [n_vocab, n_tokens] device tensor that
// carries the processed logits between steps (null when the model has no self-conditioning): read
// with SelfCond::DEVICE, overwritten when sampling. One tensor does: the write depends on the
// logits, which depend on everything the read feeds, so every backend orders them.
ForwardTensors build_forward(ggml_context * ctx, ggml_cgraph * gf, const GgufModel & model, const KvCache & cache,
                             const ForwardShape & shape, const KernelPolicy & policy, ggml_tensor * embd_t,
                             ggml_tensor * sc_state);

// The sampler's half of a step over raw logits [n_vocab, n] (spec section 4): processed = logits /
// io.temperature (written to `sc_state` when given), then the per-position reductions into io's
// sample outputs, with io.uniforms for the draws. build_forward calls it when shape.sample.
void build_sampler(ggml_context * ctx, ggml_cgraph * gf, const dg_hparams & hp, const KernelPolicy & policy,
                   ggml_tensor * logits, ggml_tensor * sc_state, ForwardTensors & io);


}  // namespace dg
