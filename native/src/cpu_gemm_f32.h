// Float32 batched matmul on AVX-512 CPUs (a ggml custom op), for attention's two products.
#pragma once

struct ggml_context;
struct ggml_tensor;

namespace dg {

// Whether cpu_matmul_f32 can take a (F32 [K, M, B]) times b (F32 [K, N, B * r]), both contiguous.
bool cpu_matmul_f32_applies(const ggml_tensor * a, const ggml_tensor * b);

// ggml_mul_mat(a, b): [M, N, B * r] F32; b's batch i uses a's batch i / r (grouped-query attention).
ggml_tensor * cpu_matmul_f32(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b);

}  // namespace dg
