// Per-user state over a shared model: KV cache, backends, scheduler, the kernel policy, the
// self-conditioning state of the step loop, and scratch buffers.
#pragma once

#include "dgemma.h"
#include "graph.h"
#include "kernel_policy.h"
#include "kv_cache.h"
#include "sampler.h"

#include <cstdint>
#include <memory>
#include <string>
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

// One tensor in its own buffer on a backend (state that outlives graphs).
class DeviceTensor {
public:
    DeviceTensor() = default;
    ~DeviceTensor() { reset(); }
    DeviceTensor(const DeviceTensor &) = delete;
    DeviceTensor & operator=(const DeviceTensor &) = delete;

    // Allocates [ne0, ne1] of `type` in the default buffer of `backend`; fails with `what` in the message.
    void alloc(ggml_backend * backend, int type, int64_t ne0, int64_t ne1, const char * name, const char * what);
    // Frees the buffer, or with `keep` hands it there (to be freed later by whoever holds `keep`).
    void reset(std::vector<ggml_backend_buffer *> * keep = nullptr);
    // The whole tensor, or its first columns after use_columns().
    ggml_tensor * get() const { return view_ != nullptr ? view_ : tensor_; }
    int64_t       capacity() const;  // columns allocated (ne1)
    // Makes get() a view of the first n <= capacity() columns; the buffer is not touched.
    void use_columns(int64_t n);

private:
    void drop_view();

    ggml_context *        ctx_ = nullptr;
    ggml_backend_buffer * buffer_ = nullptr;
    ggml_tensor *         tensor_ = nullptr;
    ggml_context *        view_ctx_ = nullptr;
    ggml_tensor *         view_ = nullptr;
};

// What the step loop moved and spent (dg_step_stats).
struct StepStats {
    uint64_t steps = 0;
    uint64_t bytes_to_device = 0;
    uint64_t bytes_from_device = 0;
    double   seconds = 0.0;
};

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
    // One denoising step on the device: the decoder pass, logits / t, the sampler's reductions
    // (one row of `rows` per position, with `uniforms` [n] for the draws). The processed logits stay
    // on the device; `self_cond` makes the pass read the previous step's (same n, no prefill,
    // commit or reset in between).
    void step(const int32_t * canvas, uint32_t n, float temperature, const float * uniforms, bool self_cond, RowStats * rows);
    // The sampler's half of step() over caller-given raw logits [n, n_vocab], on the device (to
    // check a backend's reductions against the host sampler). The cache and the step state are unchanged.
    void reduce_logits(const float * logits, uint32_t n, float temperature, const float * uniforms, RowStats * rows);
    // Appends a finished canvas to the cache through the encoder (same as prefill).
    void commit(const int32_t * canvas, uint32_t n) { prefill(canvas, n); }
    void reset();
    void truncate(uint32_t n_past);

    uint32_t          n_past() const { return n_past_; }
    const GgufModel & model() const { return model_; }
    uint32_t n_ctx() const { return cache_.n_ctx(); }
    const KvCache & cache() const { return cache_; }
    bool     flash_attn() const { return flash_attn_; }
    dg_context_info info() const;
    int32_t  n_threads() const { return n_threads_; }
    const KernelPolicy & kernels() const { return policy_; }
    const std::string &  kernel_names() const { return kernel_names_; }
    const StepStats &    step_stats() const { return stats_; }
    void                 reset_step_stats() { stats_ = StepStats{}; }

    // Importance-matrix collection over every later prefill/denoise/commit (see imatrix.h).
    // start() keeps what was collected before; clear() drops it.
    void                     imatrix_start();
    void                     imatrix_stop();
    void                     imatrix_clear();
    const ImatrixCollector * imatrix() const { return imatrix_.get(); }

private:
    void check_tokens(const int32_t * tokens, uint32_t n, const char * what) const;
    // Builds (or reuses) and allocates the graph of `shape`, sets its token, position and mask inputs.
    const ForwardTensors & prepare(const ForwardShape & shape, const int32_t * tokens);
    void compute();
    void check_step_inputs(uint32_t n, float temperature, const float * uniforms, const RowStats * rows) const;
    void read_rows(const ForwardTensors & io, uint32_t n, RowStats * rows);
    void set_input(ggml_tensor * t, const void * data, size_t size, bool count);
    void set_kv_inputs(const ForwardShape & shape, const ForwardTensors & io, bool count);
    bool decide_flash_attn() const;
    void ensure_transposed_embedding();
    void reserve_device_buffers();
    ggml_cgraph * build_reduce_graph(ggml_context * ctx, uint32_t n, ggml_tensor ** logits, ForwardTensors & io) const;
    void ensure_sc_state(uint32_t n);
    void check_backend_support() const;
    void drop_graph();
    void init_backends(const GgufModel & model, const dg_context_params & params);
    void release();

    const GgufModel &           model_;
    KernelPolicy                policy_;
    std::string                 kernel_names_;
    ggml_backend *              backend_ = nullptr;      // the model's device
    ggml_backend *              backend_cpu_ = nullptr;  // fallback for ops the device lacks
    ggml_backend_sched *        sched_ = nullptr;
    KvCache                     cache_;
    uint32_t                    n_batch_ = 512;
    uint32_t                    sc_top_k_ = 0;  // 0: exact self-conditioning
    int                         kv_type_ = 1;   // ggml_type of the KV cache (GGML_TYPE_F16)
    uint32_t                    flash_attn_mode_ = DG_FLASH_ATTN_AUTO;
    bool                        flash_attn_ = false;  // what the graphs use
    uint32_t                    cache_n_ctx_ = 0;
    bool                        collecting_imatrix_ = false;  // graphs then use ggml's matmul ops only
    int32_t                     n_threads_ = 1;
    uint32_t                    n_past_ = 0;
    std::vector<uint8_t>        graph_mem_;        // metadata of the graph being run (and reused)
    ggml_context *              graph_ctx_ = nullptr;
    ggml_cgraph *               graph_ = nullptr;
    ForwardTensors              graph_io_;
    ForwardShape                graph_shape_;
    bool                        have_graph_ = false;  // graph_ is built and allocated for graph_shape_
    std::vector<uint8_t>        scratch_mem_;      // metadata of one-off graphs
    ggml_tensor *               embd_t_ = nullptr;  // the model's self-conditioning table, once needed
    int                         sc_table_type_ = 0;  // its ggml_type
    // The step loop's self-conditioning state, F32 [n_vocab, n]: a step reads the previous step's
    // processed logits from it and writes its own (see build_forward).
    DeviceTensor                sc_state_;
    bool                        sc_state_valid_ = false;
    // Off the CPU no device buffer is freed while the context lives (see reserve_device_buffers):
    // buffers that state outgrew wait here until release().
    bool                        keep_device_buffers_ = false;
    std::vector<ggml_backend_buffer *> retired_buffers_;
    StepStats                   stats_;
    uint64_t                    graphs_built_ = 0;
    std::unique_ptr<ImatrixCollector> imatrix_;          // null until imatrix_start()
};

}  // namespace dg
