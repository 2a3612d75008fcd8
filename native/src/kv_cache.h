// Per-layer K and V of every token the encoder has seen (prompt and committed canvases), as ggml
// tensors on the context's device. K is stored after its norm and RoPE, V after its norm, in F32.
#pragma once

#include <cstdint>
#include <vector>

struct ggml_context;
struct ggml_tensor;
struct ggml_backend_buffer;
struct ggml_backend_buffer_type;

namespace dg {

class GgufModel;

class KvCache {
public:
    KvCache() = default;
    ~KvCache();
    KvCache(const KvCache &) = delete;
    KvCache & operator=(const KvCache &) = delete;

    // Allocates [head_dim, n_head_kv, n_ctx] F32 tensors for each layer in `buft` and zeroes them.
    void init(const GgufModel & model, uint32_t n_ctx, ggml_backend_buffer_type * buft);

    ggml_tensor * k(uint32_t layer) const { return k_[layer]; }
    ggml_tensor * v(uint32_t layer) const { return v_[layer]; }
    uint32_t      n_ctx() const { return n_ctx_; }
    uint64_t      n_bytes() const;

private:
    ggml_context *              ctx_ = nullptr;
    ggml_backend_buffer *       buffer_ = nullptr;
    std::vector<ggml_tensor *>  k_, v_;
    uint32_t                    n_ctx_ = 0;
};

}  // namespace dg
