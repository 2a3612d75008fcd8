// Per-user state over a shared model: KV cache, backends, scheduler and scratch buffers.
#pragma once

#include "dgemma.h"
#include "graph.h"
#include "kv_cache.h"

#include <cstdint>
#include <memory>
#include <vector>

struct ggml_backend;
struct ggml_backend_sched;
struct ggml_context;
struct ggml_tensor;
struct ggml_backend_buffer;
struct ggml_cgraph;

namespace dg {

class GgufModel;
class ImatrixCollector;

class Context {
public:
    Context(const GgufModel & model, const dg_context_params & params);
    ~Context();  // out of line: ImatrixCollector is incomplete here
    Context(const Context &) = delete;
    Context & operator=(const Context &) = delete;

    // Causal encoder pass over `n` tokens, appended to the cache (in chunks of n_batch).
    void prefill(const int32_t * tokens, uint32_t n);
    // One decoder pass over a canvas of `n` tokens; `sc_logits` ([n, n_vocab], may be null) is the
    // previous step's processed logits. Writes [n, n_vocab] float32 logits to `out`.
    void denoise(const int32_t * canvas, uint32_t n, const float * sc_logits, float * out);
    // Appends a finished canvas to the cache through the encoder (same as prefill).
    void commit(const int32_t * canvas, uint32_t n) { prefill(canvas, n); }
    void reset() { n_past_ = 0; }
    void truncate(uint32_t n_past);

    uint32_t          n_past() const { return n_past_; }
    const GgufModel & model() const { return model_; }
    uint32_t n_ctx() const { return cache_.n_ctx(); }
    int32_t  n_threads() const { return n_threads_; }

    // Importance-matrix collection over every later prefill/denoise/commit (see imatrix.h).
    // start() keeps what was collected before; clear() drops it.
    void                     imatrix_start();
    void                     imatrix_stop();
    void                     imatrix_clear();
    const ImatrixCollector * imatrix() const { return imatrix_.get(); }

private:
    void check_tokens(const int32_t * tokens, uint32_t n, const char * what) const;
    void run(const ForwardShape & shape, const int32_t * tokens, const float * sc_logits, float * out);
    void ensure_transposed_embedding();
    void drop_graph();
    void init_backends(const GgufModel & model, const dg_context_params & params);
    void release();

    const GgufModel &           model_;
    ggml_backend *              backend_ = nullptr;      // the model's device
    ggml_backend *              backend_cpu_ = nullptr;  // fallback for ops the device lacks
    ggml_backend_sched *        sched_ = nullptr;
    KvCache                     cache_;
    uint32_t                    n_batch_ = 512;
    uint32_t                    sc_top_k_ = 0;  // 0: exact self-conditioning
    bool                        collecting_imatrix_ = false;  // graphs then use ggml's matmul ops only
    int32_t                     n_threads_ = 1;
    uint32_t                    n_past_ = 0;
    std::vector<uint8_t>        graph_mem_;        // metadata of the graph being run (and reused)
    ggml_context *              graph_ctx_ = nullptr;
    ggml_cgraph *               graph_ = nullptr;
    ForwardTensors *            graph_io_ = nullptr;
    uint64_t                    graph_key_ = 0;     // shape of graph_, 0 = none: reused while unchanged
    std::vector<uint8_t>        scratch_mem_;      // metadata of one-off graphs
    ggml_context *              embd_t_ctx_ = nullptr;
    ggml_backend_buffer *       embd_t_buffer_ = nullptr;
    ggml_tensor *               embd_t_ = nullptr;       // [n_vocab, n_embd], for self-conditioning
    std::unique_ptr<ImatrixCollector> imatrix_;          // null until imatrix_start()
};

}  // namespace dg
