// Vectorised float32 activations for the CPU backend (ggml custom ops; CPU graphs only).
#pragma once

struct ggml_context;
struct ggml_tensor;

namespace dg {

// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise, F32 out.
ggml_tensor * cpu_gelu_tanh(ggml_context * ctx, ggml_tensor * x);

// cap * tanh(x / cap), elementwise, F32 out.
ggml_tensor * cpu_softcap(ggml_context * ctx, ggml_tensor * x, float cap);

}  // namespace dg
