// Per-layer K and V of every token the encoder has seen (prompt and committed canvases), as ggml
// tensors on the context's device: K after its norm and RoPE, V after its norm, in F32, F16 or Q8_0.
//
// Full-attention layers hold one slot per position. Sliding-window layers hold a ring: the last
// sliding_window - 1 positions a pass can reach, plus room for one pass (a prefill batch or a
// canvas); position p lives in slot p mod ring. A pass writes its own K/V into the slots of its
// positions (a canvas's are scratch, overwritten when the canvas is committed) and attends over one
// view of the slots, masked by the positions they hold. So no pass copies the prefix, and the
// graph does not depend on n_past (the full layers' view is padded; see kv_view_full).
#pragma once

#include <cstdint>
#include <vector>

struct ggml_context;
struct ggml_tensor;
struct ggml_backend_buffer;
struct ggml_backend_buffer_type;

namespace dg {

class GgufModel;

struct KvLayout {
    int      type = 1;             // ggml_type of the entries (GGML_TYPE_F16)
    bool     v_transposed = false;  // V stored [slots, hd * n_head_kv]: the matmul path reads V^T without a copy
    uint32_t n_ctx = 0;            // positions the context holds
    uint32_t slots_full = 0;       // slots of a full layer (n_ctx rounded up to kv_slot_pad)
    uint32_t slots_swa = 0;        // slots of a sliding layer (the ring, or slots_full when that is no larger)
    uint32_t keep_swa = 0;         // prefix positions a sliding layer reaches back: sliding_window - 1
    bool     ring = false;         // slots_swa < slots_full: sliding layers wrap
    uint64_t bytes = 0;            // of all layers' K and V
};

constexpr uint32_t kv_slot_pad = 256;   // slot counts are multiples of this (some backends' flash attention tiles)
constexpr uint32_t kv_view_pad = 1024;  // the full layers' view grows in steps of this many positions

// The layout a context of n_ctx positions, prefill batches of n_batch and canvases of `canvas`
// tokens gets (the planner and KvCache::init agree through this).
KvLayout kv_layout(const GgufModel & model, uint32_t n_ctx, uint32_t n_batch, uint32_t canvas, int type, bool v_transposed);

// The first `n` slots a full layer's view covers for a pass ending at position `end` (exclusive).
uint32_t kv_view_full(const KvLayout & layout, uint32_t end);

class KvCache {
public:
    KvCache() = default;
    ~KvCache();
    KvCache(const KvCache &) = delete;
    KvCache & operator=(const KvCache &) = delete;

    // Allocates every layer's K and V in `buft` and zeroes them.
    void init(const GgufModel & model, const KvLayout & layout, ggml_backend_buffer_type * buft);

    ggml_tensor *    k(uint32_t layer) const { return k_[layer]; }  // [hd * n_head_kv, slots]
    ggml_tensor *    v(uint32_t layer) const { return v_[layer]; }  // the same, or [slots, hd * n_head_kv] transposed
    const KvLayout & layout() const { return layout_; }
    uint32_t         n_ctx() const { return layout_.n_ctx; }
    uint64_t         n_bytes() const;

    // The slot of position `pos` in a sliding (or a full) layer.
    uint32_t slot(bool sliding, uint32_t pos) const { return sliding && layout_.ring ? pos % layout_.slots_swa : pos; }
    // The position a sliding layer's slot holds (-1: none yet).
    int64_t  held_swa(uint32_t slot) const { return layout_.ring ? held_[slot] : static_cast<int64_t>(slot); }
    // A pass writes positions [pos, pos + n).
    void     record(uint32_t pos, uint32_t n);
    // The largest n' <= n_past whose sliding window the ring still holds (n_past when it does).
    uint32_t usable_prefix(uint32_t n_past) const;
    void     forget();  // no slot holds anything

private:
    ggml_context *              ctx_ = nullptr;
    ggml_backend_buffer *       buffer_ = nullptr;
    std::vector<ggml_tensor *>  k_, v_;
    KvLayout                    layout_;
    std::vector<int64_t>        held_;  // ring: the position in each sliding slot
};

}  // namespace dg
