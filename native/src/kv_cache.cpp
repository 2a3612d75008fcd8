#include "kv_cache.h"

#include "error.h"
#include "gguf_model.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

namespace dg {

KvCache::~KvCache() {
    if (buffer_ != nullptr) {
        ggml_backend_buffer_free(buffer_);
    }
    if (ctx_ != nullptr) {
        ggml_free(ctx_);
    }
}

void KvCache::init(const GgufModel & model, uint32_t n_ctx, ggml_backend_buffer_type * buft) {
    const auto & layers = model.layers();
    ggml_init_params params{};
    params.mem_size   = ggml_tensor_overhead() * 2 * layers.size();
    params.no_alloc   = true;
    ctx_ = ggml_init(params);
    if (ctx_ == nullptr) {
        fail(DG_ERR_OUT_OF_MEMORY, "cannot create the KV cache context");
    }
    for (size_t il = 0; il < layers.size(); ++il) {
        const LayerLayout & l = layers[il];
        ggml_tensor * k = ggml_new_tensor_3d(ctx_, GGML_TYPE_F32, l.head_dim, l.n_head_kv, n_ctx);
        ggml_tensor * v = ggml_new_tensor_3d(ctx_, GGML_TYPE_F32, l.head_dim, l.n_head_kv, n_ctx);
        ggml_format_name(k, "cache_k_l%zu", il);
        ggml_format_name(v, "cache_v_l%zu", il);
        k_.push_back(k);
        v_.push_back(v);
    }
    buffer_ = ggml_backend_alloc_ctx_tensors_from_buft(ctx_, buft);
    if (buffer_ == nullptr) {
        fail(DG_ERR_OUT_OF_MEMORY, format("cannot allocate the KV cache (%u tokens)", n_ctx));
    }
    ggml_backend_buffer_clear(buffer_, 0);
    n_ctx_ = n_ctx;
}

uint64_t KvCache::n_bytes() const { return buffer_ != nullptr ? ggml_backend_buffer_get_size(buffer_) : 0; }

}  // namespace dg
