#include "kv_cache.h"

#include "error.h"
#include "gguf_model.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>

namespace dg {

namespace {

uint32_t round_up(uint64_t n, uint32_t to) { return static_cast<uint32_t>((n + to - 1) / to * to); }

}  // namespace

KvLayout kv_layout(const GgufModel & model, uint32_t n_ctx, uint32_t n_batch, uint32_t canvas, int type, bool v_transposed) {
    const dg_hparams & hp = model.hparams();
    KvLayout l;
    l.type         = type;
    l.v_transposed = v_transposed;
    l.n_ctx        = n_ctx;
    l.slots_full   = round_up(n_ctx, kv_slot_pad);
    l.slots_swa    = l.slots_full;
    if (hp.sliding_window > 0) {
        l.keep_swa = hp.sliding_window - 1;
        const uint32_t ring = round_up(static_cast<uint64_t>(l.keep_swa) + std::max(n_batch, canvas), kv_slot_pad);
        if (ring < l.slots_full) {
            l.slots_swa = ring;
            l.ring      = true;
        }
    } else {
        l.keep_swa = n_ctx;  // no window: sliding layers reach the whole prefix
    }
    for (const LayerLayout & layer : model.layers()) {
        const uint64_t slots = layer.is_sliding ? l.slots_swa : l.slots_full;
        l.bytes += 2 * slots * ggml_row_size(static_cast<ggml_type>(type), static_cast<int64_t>(layer.head_dim) * layer.n_head_kv);
    }
    return l;
}

uint32_t kv_view_full(const KvLayout & layout, uint32_t end) {
    return std::min(layout.slots_full, round_up(std::max<uint32_t>(end, 1), kv_view_pad));
}

KvCache::~KvCache() {
    if (buffer_ != nullptr) {
        ggml_backend_buffer_free(buffer_);
    }
    if (ctx_ != nullptr) {
        ggml_free(ctx_);
    }
}

void KvCache::init(const GgufModel & model, const KvLayout & layout, ggml_backend_buffer_type * buft) {
    const auto & layers = model.layers();
    ggml_init_params params{};
    params.mem_size   = ggml_tensor_overhead() * 2 * layers.size();
    params.no_alloc   = true;
    ctx_ = ggml_init(params);
    if (ctx_ == nullptr) {
        fail(DG_ERR_OUT_OF_MEMORY, "cannot create the KV cache context");
    }
    const auto type = static_cast<ggml_type>(layout.type);
    for (size_t il = 0; il < layers.size(); ++il) {
        const LayerLayout & l     = layers[il];
        const int64_t       row   = static_cast<int64_t>(l.head_dim) * l.n_head_kv;
        const int64_t       slots = l.is_sliding ? layout.slots_swa : layout.slots_full;
        if (row % ggml_blck_size(type) != 0) {
            fail(DG_ERR_UNSUPPORTED, format("a %s KV cache needs rows of a multiple of %lld values; layer %zu has %lld",
                                            ggml_type_name(type), static_cast<long long>(ggml_blck_size(type)), il,
                                            static_cast<long long>(row)));
        }
        ggml_tensor * k = ggml_new_tensor_2d(ctx_, type, row, slots);
        ggml_tensor * v = layout.v_transposed ? ggml_new_tensor_2d(ctx_, type, slots, row) : ggml_new_tensor_2d(ctx_, type, row, slots);
        ggml_format_name(k, "cache_k_l%zu", il);
        ggml_format_name(v, "cache_v_l%zu", il);
        k_.push_back(k);
        v_.push_back(v);
    }
    buffer_ = ggml_backend_alloc_ctx_tensors_from_buft(ctx_, buft);
    if (buffer_ == nullptr) {
        fail(DG_ERR_OUT_OF_MEMORY, format("cannot allocate the KV cache (%u tokens, %.2f GiB)", layout.n_ctx,
                                          static_cast<double>(layout.bytes) / (1ull << 30)));
    }
    ggml_backend_buffer_clear(buffer_, 0);  // finite values in slots no position has written yet
    layout_ = layout;
    held_.assign(layout.ring ? layout.slots_swa : 0, -1);
}

uint64_t KvCache::n_bytes() const { return buffer_ != nullptr ? ggml_backend_buffer_get_size(buffer_) : 0; }

void KvCache::record(uint32_t pos, uint32_t n) {
    if (!layout_.ring) {
        return;
    }
    for (uint32_t i = 0; i < n; ++i) {
        held_[(pos + i) % layout_.slots_swa] = static_cast<int64_t>(pos) + i;
    }
}

uint32_t KvCache::usable_prefix(uint32_t n_past) const {
    if (!layout_.ring) {
        return n_past;
    }
    // n' is usable when every position of its window [n' - keep, n') is still in its slot.
    for (uint32_t n = n_past; n > 0; --n) {
        const uint32_t from = n > layout_.keep_swa ? n - layout_.keep_swa : 0;
        bool           held = true;
        for (uint32_t p = n; p-- > from;) {
            if (held_[p % layout_.slots_swa] != static_cast<int64_t>(p)) {
                held = false;
                n    = p + 1;  // no n' in (p, n] is usable: each window contains p
                break;
            }
        }
        if (held) {
            return n;
        }
    }
    return 0;
}

void KvCache::forget() { std::fill(held_.begin(), held_.end(), -1); }

}  // namespace dg
