// Q8_0 matmuls on x86 CPUs with AVX-512 VNNI (ggml custom ops): dense and routed experts.
#pragma once

struct ggml_context;
struct ggml_tensor;

namespace dg {

// Whether cpu_moe_q8_0 can take these expert weights here: Q8_0 [K, M, E], and a CPU with
// AVX-512 VNNI.
bool cpu_moe_q8_0_applies(const ggml_tensor * w);

// Whether cpu_matmul_q8_0 can take w (Q8_0 [K, M]) times x (F32 [K, N]) here.
bool cpu_matmul_q8_0_applies(const ggml_tensor * w, const ggml_tensor * x);

// ggml_mul_mat(w, x) for such operands: [M, N] F32.
ggml_tensor * cpu_matmul_q8_0(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x);

// ggml_mul_mat_id(w, x, ids) for such weights: [M, n_used, n_tokens] F32.
ggml_tensor * cpu_moe_q8_0(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x, ggml_tensor * ids);

}  // namespace dg
