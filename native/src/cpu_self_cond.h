// Self-conditioning's probabilities x transposed-embedding product on AVX-512 CPUs (a ggml custom op).
#pragma once

struct ggml_context;
struct ggml_tensor;

namespace dg {

// Whether cpu_self_cond_mix can take embd_t (F16 or Q8_0 [n_vocab, n_embd]) and probs (F32 [n_vocab, n]) here.
bool cpu_self_cond_mix_applies(const ggml_tensor * embd_t, const ggml_tensor * probs);

// ggml_mul_mat(embd_t, probs) with the probabilities kept in F32: [n_embd, n] F32.
ggml_tensor * cpu_self_cond_mix(ggml_context * ctx, ggml_tensor * embd_t, ggml_tensor * probs);

}  // namespace dg
