#include "context.h"

#include "error.h"
#include "graph.h"
#include "gguf_model.h"
#include "imatrix.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <thread>

namespace dg {

namespace {

size_t graph_size_for(const dg_hparams & hp) { return std::max<size_t>(4096, static_cast<size_t>(hp.n_layer) * 160 + 256); }

void set_threads(ggml_backend_t backend, int32_t n_threads) {
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    ggml_backend_reg_t reg = dev != nullptr ? ggml_backend_dev_backend_reg(dev) : nullptr;
    if (reg == nullptr) {
        return;
    }
    auto fn = reinterpret_cast<ggml_backend_set_n_threads_t>(ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads"));
    if (fn != nullptr) {
        fn(backend, n_threads);
    }
}

// A ggml context over caller-owned memory for one graph's tensor and node metadata.
ggml_context * graph_context(std::vector<uint8_t> & mem) {
    ggml_init_params p{};
    p.mem_size   = mem.size();
    p.mem_buffer = mem.data();
    p.no_alloc   = true;
    ggml_context * ctx = ggml_init(p);
    if (ctx == nullptr) {
        fail(DG_ERR_OUT_OF_MEMORY, "cannot create a graph context");
    }
    return ctx;
}

struct GraphScope {
    ggml_context * ctx;
    explicit GraphScope(std::vector<uint8_t> & mem) : ctx(graph_context(mem)) {}
    ~GraphScope() { ggml_free(ctx); }
};

struct MemoryPlan {
    uint64_t weights = 0;    // copied to the device (0 when the device reads the mapping)
    uint64_t kv = 0;
    uint64_t compute = 0;    // the largest pass's activations (an estimate)
    uint64_t self_cond = 0;  // the transposed embedding
    uint64_t logits = 0;     // one canvas of logits on the host (generation)
    uint64_t total() const { return weights + kv + compute + self_cond + logits; }
};

MemoryPlan plan_memory(const GgufModel & model, uint32_t n_ctx, uint32_t n_batch, uint32_t sc_top_k) {
    const dg_hparams & hp = model.hparams();
    MemoryPlan m;
    uint32_t max_hd = 0;
    for (const LayerLayout & l : model.layers()) {
        m.kv += 2ull * 4 * l.head_dim * l.n_head_kv * n_ctx;
        max_hd = std::max(max_hd, l.head_dim);
    }
    ggml_backend_dev_props props{};
    ggml_backend_dev_get_props(model.device(), &props);
    if (!props.caps.buffer_from_host_ptr) {
        for (const TensorRecord & t : model.tensors()) {
            m.weights += t.n_bytes;
        }
    }
    const uint64_t C     = hp.canvas_length;
    const uint64_t wide  = std::max<uint64_t>({hp.n_ff, 2ull * hp.n_ff_exp * hp.n_expert_used, uint64_t(hp.n_head) * max_hd});
    auto pass = [&](uint64_t n, bool decode) {
        const uint64_t scores = uint64_t(hp.n_head) * n * (n_ctx + (decode ? n : 0));  // attention weights
        const uint64_t acts   = n * (8ull * hp.n_embd + 4 * wide);
        const uint64_t vocab  = decode ? n * 4ull * hp.n_vocab : 0;                      // logits, softcap, SC probs
        return 4 * (scores + acts + vocab);
    };
    m.compute = std::max(pass(C, true), pass(std::min<uint64_t>(n_batch, n_ctx), false));
    if (hp.has_self_conditioning && sc_top_k == 0) {
        m.self_cond = uint64_t(hp.n_vocab) * hp.n_embd * (model.weight("token_embd.weight")->type == GGML_TYPE_F32 ? 4 : 2);
    }
    m.logits = 4 * C * hp.n_vocab;
    return m;
}

std::string gib(uint64_t bytes) { return format("%.1f GiB", static_cast<double>(bytes) / (1ull << 30)); }

}  // namespace

Context::Context(const GgufModel & model, const dg_context_params & params) : model_(model) {
    const dg_hparams & hp = model.hparams();
    if (params.n_ctx == 0) {
        fail(DG_ERR_INVALID_ARG, "n_ctx must be at least 1");
    }
    if (params.n_ctx > hp.n_ctx_train) {
        fail(DG_ERR_INVALID_ARG, format("n_ctx = %u exceeds the model's context length (%u)", params.n_ctx, hp.n_ctx_train));
    }
    n_batch_   = params.n_batch > 0 ? params.n_batch : 512;
    n_threads_ = params.n_threads > 0 ? params.n_threads : model.n_threads();
    sc_top_k_  = params.sc_top_k;

    // Refuse up front, with the numbers, rather than failing in the middle of a generation.
    const MemoryPlan need = plan_memory(model, params.n_ctx, n_batch_, sc_top_k_);
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(model.device(), &free, &total);
    if (free > 0 && need.total() > free) {
        fail(DG_ERR_OUT_OF_MEMORY,
             format("n_ctx = %u needs %s on %s (weights %s, KV cache %s, compute ~%s, self-conditioning %s, logits %s), "
                    "%s free: use a smaller n_ctx",
                    params.n_ctx, gib(need.total()).c_str(), model.device_name().c_str(), gib(need.weights).c_str(),
                    gib(need.kv).c_str(), gib(need.compute).c_str(), gib(need.self_cond).c_str(), gib(need.logits).c_str(),
                    gib(free).c_str()));
    }

    model.bind_weights();
    try {
        init_backends(model, params);
    } catch (...) {
        release();  // a constructor that throws runs no destructor
        throw;
    }
}

void Context::init_backends(const GgufModel & model, const dg_context_params & params) {
    const dg_hparams & hp = model.hparams();
    backend_ = ggml_backend_dev_init(model.device(), nullptr);
    if (backend_ == nullptr) {
        fail(DG_ERR_BACKEND, format("cannot start the %s backend", model.device_name().c_str()));
    }
    std::vector<ggml_backend_t> backends{backend_};
    if (ggml_backend_dev_type(model.device()) == GGML_BACKEND_DEVICE_TYPE_CPU) {
        backend_cpu_ = backend_;
    } else {
        backend_cpu_ = ggml_backend_dev_init(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU), nullptr);
        if (backend_cpu_ == nullptr) {
            fail(DG_ERR_BACKEND, "cannot start the CPU backend");
        }
        backends.push_back(backend_cpu_);
    }
    for (ggml_backend_t b : backends) {
        set_threads(b, n_threads_);
    }

    cache_.init(model, params.n_ctx, ggml_backend_get_default_buffer_type(backend_));

    const size_t graph_size = graph_size_for(hp);
    graph_mem_.resize(ggml_tensor_overhead() * graph_size + ggml_graph_overhead_custom(graph_size, false));
    scratch_mem_.resize(ggml_tensor_overhead() * 64 + ggml_graph_overhead_custom(64, false));
    sched_ = ggml_backend_sched_new(backends.data(), nullptr, static_cast<int>(backends.size()), graph_size, false, true);
    if (sched_ == nullptr) {
        fail(DG_ERR_BACKEND, "cannot create the ggml scheduler");
    }
}

Context::~Context() { release(); }

void Context::release() {
    drop_graph();
    if (sched_ != nullptr) {
        ggml_backend_sched_free(sched_);
        sched_ = nullptr;
    }
    if (embd_t_buffer_ != nullptr) {
        ggml_backend_buffer_free(embd_t_buffer_);
        embd_t_buffer_ = nullptr;
    }
    if (embd_t_ctx_ != nullptr) {
        ggml_free(embd_t_ctx_);
        embd_t_ctx_ = nullptr;
        embd_t_     = nullptr;
    }
    if (backend_cpu_ != nullptr && backend_cpu_ != backend_) {
        ggml_backend_free(backend_cpu_);
    }
    backend_cpu_ = nullptr;
    if (backend_ != nullptr) {
        ggml_backend_free(backend_);
        backend_ = nullptr;
    }
}

void Context::check_tokens(const int32_t * tokens, uint32_t n, const char * what) const {
    if (n == 0 || tokens == nullptr) {
        fail(DG_ERR_INVALID_ARG, format("%s: no tokens given", what));
    }
    const uint32_t n_vocab = model_.hparams().n_vocab;
    for (uint32_t i = 0; i < n; ++i) {
        if (tokens[i] < 0 || static_cast<uint32_t>(tokens[i]) >= n_vocab) {
            fail(DG_ERR_INVALID_ARG, format("%s: token %d at index %u is out of range (vocabulary of %u)", what, tokens[i], i, n_vocab));
        }
    }
    if (static_cast<uint64_t>(n_past_) + n > cache_.n_ctx()) {
        fail(DG_ERR_INVALID_ARG, format("%s: %u tokens do not fit: %u of n_ctx = %u are used", what, n, n_past_, cache_.n_ctx()));
    }
}

void Context::truncate(uint32_t n_past) {
    if (n_past > n_past_) {
        fail(DG_ERR_INVALID_ARG, format("truncate: %u is more than the %u cached tokens", n_past, n_past_));
    }
    n_past_ = n_past;  // the entries past it are overwritten by the next prefill
}

void Context::prefill(const int32_t * tokens, uint32_t n) {
    check_tokens(tokens, n, "prefill");
    for (uint32_t done = 0; done < n;) {
        ForwardShape shape;
        shape.pass     = Pass::ENCODE;
        shape.n_tokens = std::min(n_batch_, n - done);
        shape.n_past   = n_past_;
        run(shape, tokens + done, nullptr, nullptr);
        n_past_ += shape.n_tokens;
        done += shape.n_tokens;
    }
}

void Context::denoise(const int32_t * canvas, uint32_t n, const float * sc_logits, float * out) {
    check_tokens(canvas, n, "denoise");
    if (out == nullptr) {
        fail(DG_ERR_INVALID_ARG, "denoise: no output buffer");
    }
    if (sc_logits != nullptr) {
        if (!model_.hparams().has_self_conditioning) {
            fail(DG_ERR_UNSUPPORTED, "denoise: this model has no self-conditioning tensors");
        }
        if (sc_top_k_ == 0) {
            ensure_transposed_embedding();
        }
    }
    ForwardShape shape;
    shape.pass      = Pass::DECODE;
    shape.n_tokens  = n;
    shape.n_past    = n_past_;
    shape.self_cond = sc_logits != nullptr;
    shape.sc_top_k  = sc_top_k_;
    run(shape, canvas, sc_logits, out);
}

void Context::drop_graph() {
    if (graph_ctx_ != nullptr) {
        ggml_free(graph_ctx_);
    }
    delete graph_io_;
    graph_ctx_ = nullptr;
    graph_     = nullptr;
    graph_io_  = nullptr;
    graph_key_ = 0;
}

void Context::run(const ForwardShape & requested, const int32_t * tokens, const float * sc_logits, float * out) {
    const dg_hparams & hp = model_.hparams();
    ForwardShape       shape = requested;
    // Denoising steps of one canvas share a shape: the graph and its allocation are built once and
    // reused; only the inputs change.
    shape.ggml_matmuls_only = collecting_imatrix_;
    const uint64_t key = (static_cast<uint64_t>(shape.pass == Pass::DECODE) << 63) |
                         (static_cast<uint64_t>(shape.self_cond) << 62) |
                         (static_cast<uint64_t>(shape.ggml_matmuls_only) << 61) | (static_cast<uint64_t>(shape.n_tokens) << 31) |
                         shape.n_past;
    if (key != graph_key_) {
        drop_graph();
        graph_ctx_ = graph_context(graph_mem_);
        graph_    = ggml_new_graph_custom(graph_ctx_, graph_size_for(hp), false);
        graph_io_ = new ForwardTensors(build_forward(graph_ctx_, graph_, model_, cache_, shape, embd_t_));
        ggml_backend_sched_reset(sched_);
        if (!ggml_backend_sched_alloc_graph(sched_, graph_)) {
            drop_graph();
            fail(DG_ERR_OUT_OF_MEMORY, "cannot allocate the compute buffers");
        }
        graph_key_ = key;
    }
    const ForwardTensors & io = *graph_io_;
    ggml_cgraph *          gf = graph_;

    // Inputs the graph does not read (a mask no layer uses) get no buffer and are skipped.
    auto set_input = [](ggml_tensor * t, const void * data, size_t size) {
        if (t != nullptr && t->buffer != nullptr) {
            ggml_backend_tensor_set(t, data, 0, size);
        }
    };
    const uint32_t n = shape.n_tokens;
    set_input(io.tokens, tokens, sizeof(int32_t) * n);
    std::vector<int32_t> pos(n);
    for (uint32_t i = 0; i < n; ++i) {
        pos[i] = static_cast<int32_t>(shape.n_past + i);
    }
    set_input(io.positions, pos.data(), sizeof(int32_t) * n);

    if (shape.pass == Pass::ENCODE) {
        // causal over [0, n_past + n); sliding layers also within the window: q - k < sliding_window
        const float ninf = -std::numeric_limits<float>::infinity();
        const uint32_t n_full = shape.n_past + n;
        const uint32_t start  = io.kv_start_swa;
        const uint32_t n_swa  = n_full - start;
        std::vector<float> mask_full(static_cast<size_t>(n_full) * n, ninf);
        std::vector<float> mask_swa(static_cast<size_t>(n_swa) * n, ninf);
        for (uint32_t i = 0; i < n; ++i) {
            const uint32_t qpos = shape.n_past + i;
            for (uint32_t kpos = 0; kpos <= qpos; ++kpos) {
                mask_full[static_cast<size_t>(i) * n_full + kpos] = 0.0f;
                if (kpos >= start && qpos - kpos < hp.sliding_window) {
                    mask_swa[static_cast<size_t>(i) * n_swa + (kpos - start)] = 0.0f;
                }
            }
        }
        set_input(io.mask_full, mask_full.data(), sizeof(float) * mask_full.size());
        set_input(io.mask_swa, mask_swa.data(), sizeof(float) * mask_swa.size());
    }
    if (io.sc_logits != nullptr) {
        set_input(io.sc_logits, sc_logits, sizeof(float) * static_cast<size_t>(hp.n_vocab) * n);
    }

    if (ggml_backend_sched_graph_compute(sched_, gf) != GGML_STATUS_SUCCESS) {
        drop_graph();
        fail(DG_ERR_BACKEND, "the backend failed to compute the graph");
    }
    if (imatrix_ != nullptr && !imatrix_->error().empty()) {  // the callback stopped the compute
        const std::string msg = imatrix_->error();
        imatrix_->clear_error();
        fail(DG_ERR_BACKEND, msg);
    }
    if (out != nullptr && io.logits != nullptr) {
        ggml_backend_tensor_get(io.logits, out, 0, sizeof(float) * static_cast<size_t>(hp.n_vocab) * n);
    }
}

void Context::imatrix_start() {
    if (imatrix_ == nullptr) {
        imatrix_ = std::make_unique<ImatrixCollector>(model_);
    }
    // With a callback the scheduler computes node by node, reading back each selected product.
    ggml_backend_sched_set_eval_callback(sched_, &ImatrixCollector::callback, imatrix_.get());
    collecting_imatrix_ = true;
}

void Context::imatrix_stop() {
    ggml_backend_sched_set_eval_callback(sched_, nullptr, nullptr);
    collecting_imatrix_ = false;
}

void Context::imatrix_clear() {
    if (imatrix_ != nullptr) {
        imatrix_->clear();
    }
}

void Context::ensure_transposed_embedding() {
    if (embd_t_ != nullptr) {
        return;
    }
    const dg_hparams & hp    = model_.hparams();
    ggml_tensor *      embd  = model_.weight("token_embd.weight");
    const ggml_type    type  = embd->type == GGML_TYPE_F32 ? GGML_TYPE_F32 : GGML_TYPE_F16;

    ggml_init_params p{};
    p.mem_size = ggml_tensor_overhead();
    p.no_alloc = true;
    embd_t_ctx_ = ggml_init(p);
    embd_t_     = ggml_new_tensor_2d(embd_t_ctx_, type, hp.n_vocab, hp.n_embd);
    ggml_set_name(embd_t_, "token_embd_t");
    embd_t_buffer_ = ggml_backend_alloc_ctx_tensors_from_buft(embd_t_ctx_, ggml_backend_get_default_buffer_type(backend_));
    if (embd_t_buffer_ == nullptr) {
        ggml_free(embd_t_ctx_);
        embd_t_ctx_ = nullptr;
        embd_t_     = nullptr;
        fail(DG_ERR_OUT_OF_MEMORY, "cannot allocate the transposed embedding for self-conditioning");
    }

    drop_graph();  // the scheduler is about to be reset for other graphs
    // Dequantize and transpose in slices of rows, so the scratch memory stays small.
    const uint32_t slice = 16384;
    std::vector<int32_t> ids;
    for (uint32_t v0 = 0; v0 < hp.n_vocab; v0 += slice) {
        const uint32_t m = std::min(slice, hp.n_vocab - v0);
        GraphScope scope(scratch_mem_);
        ggml_cgraph * gf = ggml_new_graph_custom(scope.ctx, 64, false);
        ggml_tensor * rows = ggml_new_tensor_1d(scope.ctx, GGML_TYPE_I32, m);
        ggml_set_input(rows);
        ggml_tensor * src = ggml_transpose(scope.ctx, ggml_get_rows(scope.ctx, embd, rows));  // [m, n_embd]
        ggml_tensor * dst = ggml_view_2d(scope.ctx, embd_t_, m, hp.n_embd, embd_t_->nb[1], embd_t_->nb[0] * v0);
        ggml_build_forward_expand(gf, ggml_cpy(scope.ctx, src, dst));
        ggml_backend_sched_reset(sched_);
        if (!ggml_backend_sched_alloc_graph(sched_, gf)) {
            fail(DG_ERR_OUT_OF_MEMORY, "cannot allocate the compute buffers");
        }
        ids.resize(m);
        for (uint32_t i = 0; i < m; ++i) {
            ids[i] = static_cast<int32_t>(v0 + i);
        }
        ggml_backend_tensor_set(rows, ids.data(), 0, sizeof(int32_t) * m);
        if (ggml_backend_sched_graph_compute(sched_, gf) != GGML_STATUS_SUCCESS) {
            fail(DG_ERR_BACKEND, "the backend failed to transpose the embedding");
        }
    }
}

}  // namespace dg
