#include "context.h"

#include "error.h"
#include "graph.h"
#include "gguf_model.h"
#include "imatrix.h"
#include "memory_plan.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
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
    const uint32_t allowed = params.cpu_kernels == DG_CPU_KERNELS_DEFAULT ? cpu_kernels_from_environment() : params.cpu_kernels;
    if ((allowed & ~static_cast<uint32_t>(DG_CPU_KERNELS_ALL)) != 0) {
        fail(DG_ERR_INVALID_ARG, format("cpu_kernels = 0x%x has bits that name no kernel (all kernels: 0x%x)", allowed,
                                        static_cast<unsigned>(DG_CPU_KERNELS_ALL)));
    }
    policy_       = KernelPolicy::decide(model.device(), allowed);
    kernel_names_ = policy_.names();
    if (hp.n_vocab > (1u << 24)) {
        fail(DG_ERR_UNSUPPORTED, format("a vocabulary of %u tokens is more than the step loop's float ids hold (2^24)", hp.n_vocab));
    }

    kv_type_ = kv_ggml_type(params.kv_type);
    if (params.flash_attn > DG_FLASH_ATTN_OFF) {
        fail(DG_ERR_INVALID_ARG, format("flash_attn = %u is not auto (0), on (1) or off (2)", params.flash_attn));
    }
    if (kv_type_ == GGML_TYPE_Q8_0 && params.flash_attn == DG_FLASH_ATTN_OFF) {
        fail(DG_ERR_INVALID_ARG, "a Q8_0 KV cache needs flash attention (flash_attn auto or on)");
    }
    flash_attn_mode_ = params.flash_attn;
    sc_table_type_   = model.self_cond_table_type(params.sc_table);
    // Refuse up front, with the numbers, rather than failing in the middle of a generation.
    const dg_memory_plan need = plan_context_memory(model, params);
    if (!need.fits) {
        fail(DG_ERR_OUT_OF_MEMORY, format("n_ctx = %u does not fit on %s: %s", params.n_ctx, model.device_name().c_str(),
                                          describe_plan(need, ggml_backend_dev_type(model.device()) == GGML_BACKEND_DEVICE_TYPE_CPU).c_str()));
    }

    model.bind_weights();
    try {
        init_backends(model, params);
        check_backend_support();
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

    cache_n_ctx_ = params.n_ctx;
    flash_attn_  = decide_flash_attn();
    cache_.init(model, kv_layout(model, params.n_ctx, n_batch_, std::max<uint32_t>(hp.canvas_length, 1), kv_type_, !flash_attn_),
                ggml_backend_get_default_buffer_type(backend_));

    const size_t graph_size = graph_size_for(hp);
    graph_mem_.resize(ggml_tensor_overhead() * graph_size + ggml_graph_overhead_custom(graph_size, false));
    scratch_mem_.resize(ggml_tensor_overhead() * 64 + ggml_graph_overhead_custom(64, false));
    sched_ = ggml_backend_sched_new(backends.data(), nullptr, static_cast<int>(backends.size()), graph_size, false, true);
    if (sched_ == nullptr) {
        fail(DG_ERR_BACKEND, "cannot create the ggml scheduler");
    }
    if (backend_ != backend_cpu_) {
        keep_device_buffers_ = true;
        reserve_device_buffers();
    }
}

// Off the CPU, every buffer the step loop uses is allocated here, at its largest, before any graph
// runs, and none is freed while the context lives. Left to itself the scheduler frees a compute
// buffer and allocates a larger one whenever a larger graph comes (prefill -> canvas, a canvas ->
// a self-conditioned canvas, a longer prefix), and the step state would be reallocated per canvas
// length. That is legal ggml, but ggml-vulkan 0.15.3 records in its reused descriptor sets only
// the bindings a pipeline uses, so the other bindings keep buffers of earlier dispatches; Mesa
// 22.3's lavapipe (Debian 12) takes a reference on every binding of a bound set, i.e. on freed
// memory, and corrupts the heap (glibc: "corrupted double-linked list" in dg_generate). Sizing
// once for the largest graph of each kind avoids the frees on every driver.
void Context::reserve_device_buffers() {
    const dg_hparams & hp     = model_.hparams();
    const uint32_t     n_ctx  = cache_.n_ctx();
    const uint32_t     canvas = std::min(std::max<uint32_t>(hp.canvas_length, 1), n_ctx);
    if (hp.has_self_conditioning) {
        if (sc_top_k_ == 0) {
            ensure_transposed_embedding();  // a leaf of the self-conditioned graphs
        }
        ensure_sc_state(canvas);
    }
    auto reserve = [&](ggml_cgraph * gf) {
        if (!ggml_backend_sched_reserve(sched_, gf)) {
            fail(DG_ERR_OUT_OF_MEMORY, format("cannot allocate the compute buffers on %s", model_.device_name().c_str()));
        }
    };
    std::vector<ForwardShape> shapes;
    ForwardShape encode;  // a full batch at the end of the context
    encode.pass       = Pass::ENCODE;
    encode.n_tokens   = std::min(n_batch_, n_ctx);
    encode.n_kv_full  = kv_view_full(cache_.layout(), n_ctx);
    encode.flash_attn = flash_attn_;
    shapes.push_back(encode);
    ForwardShape decode;  // a canvas at the end of the context: denoise, then the step graphs
    decode.pass       = Pass::DECODE;
    decode.n_tokens   = canvas;
    decode.n_kv_full  = kv_view_full(cache_.layout(), n_ctx);
    decode.flash_attn = flash_attn_;
    decode.sc_top_k   = sc_top_k_;
    shapes.push_back(decode);
    decode.sample = true;
    shapes.push_back(decode);
    if (hp.has_self_conditioning) {
        decode.self_cond = SelfCond::DEVICE;
        shapes.push_back(decode);
        decode.sample    = false;
        decode.self_cond = SelfCond::HOST;
        shapes.push_back(decode);
    }
    for (const ForwardShape & shape : shapes) {
        GraphScope    scope(graph_mem_);
        ggml_cgraph * gf = ggml_new_graph_custom(scope.ctx, graph_size_for(hp), false);
        build_forward(scope.ctx, gf, model_, cache_, shape, policy_, embd_t_, sc_state_.get());
        reserve(gf);
    }
    GraphScope    scope(scratch_mem_);
    ForwardTensors io;
    ggml_tensor * logits = nullptr;
    reserve(build_reduce_graph(scope.ctx, canvas, &logits, io));
}

Context::~Context() { release(); }

void Context::release() {
    drop_graph();
    if (sched_ != nullptr) {
        ggml_backend_sched_free(sched_);
        sched_ = nullptr;
    }
    embd_t_ = nullptr;
    sc_state_.reset();
    sc_state_valid_ = false;
    for (ggml_backend_buffer_t b : retired_buffers_) {
        ggml_backend_buffer_free(b);
    }
    retired_buffers_.clear();
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
    const KvLayout & kv = cache_.layout();
    if (kv.ring && n > kv.slots_swa - kv.keep_swa && std::strcmp(what, "prefill") != 0) {  // prefill goes in batches
        fail(DG_ERR_INVALID_ARG, format("%s: %u tokens in one pass are more than the sliding layers' cache holds beside their "
                                        "window (%u: the larger of n_batch and the canvas length)", what, n,
                                        kv.slots_swa - kv.keep_swa));
    }
}

void Context::truncate(uint32_t n_past) {
    if (n_past > n_past_) {
        fail(DG_ERR_INVALID_ARG, format("truncate: %u is more than the %u cached tokens", n_past, n_past_));
    }
    // The entries past it are overwritten by the next prefill. A sliding layer's ring may no longer
    // hold the window of n_past (later passes reused those slots): then fewer tokens are kept.
    n_past_         = cache_.usable_prefix(n_past);
    sc_state_valid_ = false;
}

void Context::reset() {
    n_past_         = 0;
    sc_state_valid_ = false;
    cache_.forget();
}

void Context::prefill(const int32_t * tokens, uint32_t n) {
    check_tokens(tokens, n, "prefill");
    sc_state_valid_ = false;  // a new prefix: the next canvas starts without self-conditioning
    for (uint32_t done = 0; done < n;) {
        ForwardShape shape;
        shape.pass     = Pass::ENCODE;
        shape.n_tokens = std::min(n_batch_, n - done);
        prepare(shape, tokens + done);
        compute();
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
    shape.self_cond = sc_logits != nullptr ? SelfCond::HOST : SelfCond::NONE;
    shape.sc_top_k  = sc_top_k_;
    const ForwardTensors & io = prepare(shape, canvas);
    if (io.sc_logits != nullptr) {
        set_input(io.sc_logits, sc_logits, sizeof(float) * static_cast<size_t>(model_.hparams().n_vocab) * n, false);
    }
    compute();
    ggml_backend_tensor_get(io.logits, out, 0, sizeof(float) * static_cast<size_t>(model_.hparams().n_vocab) * n);
}

void Context::step(const int32_t * canvas, uint32_t n, float temperature, const float * uniforms, bool self_cond,
                   RowStats * rows) {
    const auto started = std::chrono::steady_clock::now();
    check_tokens(canvas, n, "step");
    check_step_inputs(n, temperature, uniforms, rows);
    const dg_hparams & hp = model_.hparams();
    if (self_cond) {
        if (!hp.has_self_conditioning) {
            fail(DG_ERR_UNSUPPORTED, "step: this model has no self-conditioning tensors");
        }
        if (!sc_state_valid_ || sc_state_.get()->ne[1] != n) {
            fail(DG_ERR_INVALID_ARG, "step: self_cond needs a previous step on this canvas (same length, no prefill, "
                                     "commit or reset since)");
        }
        if (sc_top_k_ == 0) {
            ensure_transposed_embedding();
        }
    }
    if (hp.has_self_conditioning) {
        ensure_sc_state(n);
    }
    ForwardShape shape;
    shape.pass      = Pass::DECODE;
    shape.n_tokens  = n;
    shape.self_cond = self_cond ? SelfCond::DEVICE : SelfCond::NONE;
    shape.sc_top_k  = sc_top_k_;
    shape.sample    = true;
    const ForwardTensors & io = prepare(shape, canvas);
    set_input(io.temperature, &temperature, sizeof(float), true);
    set_input(io.uniforms, uniforms, sizeof(float) * n, true);
    sc_state_valid_ = false;  // until this compute has written it
    compute();
    sc_state_valid_ = hp.has_self_conditioning;

    read_rows(io, n, rows);
    ++stats_.steps;
    stats_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
}

void Context::check_step_inputs(uint32_t n, float temperature, const float * uniforms, const RowStats * rows) const {
    if (uniforms == nullptr || rows == nullptr) {
        fail(DG_ERR_INVALID_ARG, "step: NULL uniforms or output");
    }
    if (!(temperature > 0.0f) || !std::isfinite(temperature)) {
        fail(DG_ERR_INVALID_ARG, format("step: temperature must be positive and finite, got %g", temperature));
    }
    for (uint32_t i = 0; i < n; ++i) {
        if (!(uniforms[i] > 0.0f && uniforms[i] < 1.0f)) {
            fail(DG_ERR_INVALID_ARG, format("step: uniform %g at index %u is not in (0, 1)", uniforms[i], i));
        }
    }
}

void Context::read_rows(const ForwardTensors & io, uint32_t n, RowStats * rows) {
    const int32_t n_vocab = static_cast<int32_t>(model_.hparams().n_vocab);
    if (io.rows != nullptr) {
        std::vector<float> packed(3 * static_cast<size_t>(n));
        ggml_backend_tensor_get(io.rows, packed.data(), 0, sizeof(float) * packed.size());
        for (uint32_t i = 0; i < n; ++i) {
            rows[i].argmax  = static_cast<int32_t>(packed[3 * i]);
            rows[i].draw    = static_cast<int32_t>(packed[3 * i + 1]);
            rows[i].entropy = packed[3 * i + 2];
        }
        stats_.bytes_from_device += sizeof(float) * packed.size();
        return;
    }
    std::vector<int32_t> argmax(n);
    std::vector<float>   draws(n), entropy(n);
    ggml_backend_tensor_get(io.argmax, argmax.data(), 0, sizeof(int32_t) * n);
    ggml_backend_tensor_get(io.draws, draws.data(), 0, sizeof(float) * n);
    ggml_backend_tensor_get(io.entropy, entropy.data(), 0, sizeof(float) * n);
    for (uint32_t i = 0; i < n; ++i) {
        rows[i].argmax  = argmax[i];
        rows[i].draw    = std::min(static_cast<int32_t>(draws[i]), n_vocab - 1);  // a count of ids below the draw
        rows[i].entropy = entropy[i];
    }
    stats_.bytes_from_device += (sizeof(int32_t) + 2 * sizeof(float)) * n;
}

void Context::reduce_logits(const float * logits, uint32_t n, float temperature, const float * uniforms, RowStats * rows) {
    if (logits == nullptr || n == 0) {
        fail(DG_ERR_INVALID_ARG, "reduce_logits: no logits given");
    }
    check_step_inputs(n, temperature, uniforms, rows);
    const dg_hparams & hp = model_.hparams();
    drop_graph();  // the scheduler's buffers go to this graph
    GraphScope     scope(scratch_mem_);
    ForwardTensors io;
    ggml_tensor *  in = nullptr;
    ggml_cgraph *  gf = build_reduce_graph(scope.ctx, n, &in, io);
    ggml_backend_sched_reset(sched_);
    if (!ggml_backend_sched_alloc_graph(sched_, gf)) {
        fail(DG_ERR_OUT_OF_MEMORY, "cannot allocate the compute buffers");
    }
    ggml_backend_tensor_set(in, logits, 0, sizeof(float) * static_cast<size_t>(hp.n_vocab) * n);
    ggml_backend_tensor_set(io.temperature, &temperature, 0, sizeof(float));
    ggml_backend_tensor_set(io.uniforms, uniforms, 0, sizeof(float) * n);
    if (ggml_backend_sched_graph_compute(sched_, gf) != GGML_STATUS_SUCCESS) {
        fail(DG_ERR_BACKEND, "the backend failed to compute the sampler's reductions");
    }
    const StepStats keep = stats_;  // not a step: its traffic is not the step loop's
    read_rows(io, n, rows);
    stats_ = keep;
}

ggml_cgraph * Context::build_reduce_graph(ggml_context * ctx, uint32_t n, ggml_tensor ** logits, ForwardTensors & io) const {
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, 64, false);
    *logits          = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, model_.hparams().n_vocab, n);
    ggml_set_input(*logits);
    build_sampler(ctx, gf, model_.hparams(), policy_, *logits, nullptr, io);
    return gf;
}

void Context::drop_graph() {
    if (graph_ctx_ != nullptr) {
        ggml_free(graph_ctx_);
    }
    graph_ctx_  = nullptr;
    graph_      = nullptr;
    graph_io_   = ForwardTensors{};
    have_graph_ = false;
}

// Inputs the graph does not read (a mask no layer uses) get no buffer and are skipped.
void Context::set_input(ggml_tensor * t, const void * data, size_t size, bool count) {
    if (t != nullptr && t->buffer != nullptr) {
        ggml_backend_tensor_set(t, data, 0, size);
        if (count) {
            stats_.bytes_to_device += size;
        }
    }
}

const ForwardTensors & Context::prepare(const ForwardShape & requested, const int32_t * tokens) {
    const dg_hparams & hp = model_.hparams();
    ForwardShape       shape = requested;
    // Denoising steps of one canvas share a shape, and so do canvases and prompt batches whose
    // padded prefix agrees: the graph and its allocation are built once and reused; only the
    // inputs change.
    shape.ggml_matmuls_only = collecting_imatrix_;
    shape.flash_attn        = flash_attn_;
    shape.n_kv_full         = kv_view_full(cache_.layout(), n_past_ + shape.n_tokens);
    if (!have_graph_ || shape != graph_shape_) {
        drop_graph();
        graph_ctx_ = graph_context(graph_mem_);
        graph_     = ggml_new_graph_custom(graph_ctx_, graph_size_for(hp), false);
        graph_io_  = build_forward(graph_ctx_, graph_, model_, cache_, shape, policy_, embd_t_, sc_state_.get());
        ggml_backend_sched_reset(sched_);
        if (!ggml_backend_sched_alloc_graph(sched_, graph_)) {
            drop_graph();
            fail(DG_ERR_OUT_OF_MEMORY, "cannot allocate the compute buffers");
        }
        graph_shape_ = shape;
        have_graph_  = true;
        ++graphs_built_;
    }
    const ForwardTensors & io = graph_io_;
    const bool             count = shape.sample;  // the step loop's traffic is what bench reports
    const uint32_t         n = shape.n_tokens;
    set_input(io.tokens, tokens, sizeof(int32_t) * n, count);
    std::vector<int32_t> pos(n);
    for (uint32_t i = 0; i < n; ++i) {
        pos[i] = static_cast<int32_t>(n_past_ + i);
    }
    set_input(io.positions, pos.data(), sizeof(int32_t) * n, count);
    set_kv_inputs(shape, io, count);
    return io;
}

// Where the pass writes its K/V, and which slots each query reads: causal (and within the window
// on sliding layers) for the encoder; for a canvas, the prefix (its last sliding_window - 1
// positions on sliding layers) and the whole canvas.
void Context::set_kv_inputs(const ForwardShape & shape, const ForwardTensors & io, bool count) {
    const KvLayout & kv = cache_.layout();
    const uint32_t   n  = shape.n_tokens;
    const uint32_t   n_kv[2] = {shape.n_kv_full, kv.slots_swa};
    cache_.record(n_past_, n);
    std::vector<int32_t> slots(n);
    std::vector<int32_t> v_slots;
    for (int g = 0; g < 2; ++g) {
        for (uint32_t i = 0; i < n; ++i) {
            slots[i] = static_cast<int32_t>(cache_.slot(g == 1, n_past_ + i));
        }
        set_input(io.slots[g], slots.data(), sizeof(int32_t) * n, count);
        if (io.v_slots[g] != nullptr && io.v_slots[g]->buffer != nullptr) {
            // transposed V: value f of token i goes to f * slots + slot(i)
            const int64_t row = ggml_nelements(io.v_slots[g]) / n;
            const int64_t S   = g == 1 ? kv.slots_swa : kv.slots_full;
            v_slots.resize(static_cast<size_t>(row) * n);
            for (uint32_t i = 0; i < n; ++i) {
                for (int64_t f = 0; f < row; ++f) {
                    v_slots[static_cast<size_t>(i) * row + f] = static_cast<int32_t>(f * S + slots[i]);
                }
            }
            set_input(io.v_slots[g], v_slots.data(), sizeof(int32_t) * v_slots.size(), count);
        }
    }
    // the position slot s of group g holds (-1: none)
    auto held = [&](int g, uint32_t s) -> int64_t { return g == 0 ? static_cast<int64_t>(s) : cache_.held_swa(s); };
    if (shape.pass == Pass::ENCODE) {
        const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f);
        const ggml_fp16_t ninf = ggml_fp32_to_fp16(-std::numeric_limits<float>::infinity());
        for (int g = 0; g < 2; ++g) {
            if (io.mask[g] == nullptr || io.mask[g]->buffer == nullptr) {
                continue;
            }
            std::vector<ggml_fp16_t> mask(static_cast<size_t>(n_kv[g]) * n, ninf);
            for (uint32_t i = 0; i < n; ++i) {
                const int64_t q   = static_cast<int64_t>(n_past_) + i;
                ggml_fp16_t * out = mask.data() + static_cast<size_t>(i) * n_kv[g];
                for (uint32_t s = 0; s < n_kv[g]; ++s) {
                    const int64_t p = held(g, s);
                    if (p >= 0 && p <= q && (g == 0 || q - p <= kv.keep_swa)) {
                        out[s] = zero;
                    }
                }
            }
            set_input(io.mask[g], mask.data(), sizeof(ggml_fp16_t) * mask.size(), false);
        }
        return;
    }
    const float   ninf  = -std::numeric_limits<float>::infinity();
    const int64_t start = n_past_, end = static_cast<int64_t>(n_past_) + n;
    for (int g = 0; g < 2; ++g) {
        std::vector<float> row(n_kv[g], ninf);
        for (uint32_t s = 0; s < n_kv[g]; ++s) {
            const int64_t p = held(g, s);
            const bool prefix = p >= 0 && p < start && (g == 0 || p + kv.keep_swa >= start);
            if (prefix || (p >= start && p < end)) {
                row[s] = 0.0f;
            }
        }
        set_input(io.kv_row[g], row.data(), sizeof(float) * row.size(), count);
    }
}

void Context::compute() {
    if (ggml_backend_sched_graph_compute(sched_, graph_) != GGML_STATUS_SUCCESS) {
        drop_graph();
        fail(DG_ERR_BACKEND, "the backend failed to compute the graph");
    }
    if (imatrix_ != nullptr && !imatrix_->error().empty()) {  // the callback stopped the compute
        const std::string msg = imatrix_->error();
        imatrix_->clear_error();
        fail(DG_ERR_BACKEND, msg);
    }
}

// The step graphs run on the model's device alone: every op of a canvas step (with self-conditioning
// and the sampler) and of an encoder pass must be one the device supports, else the scheduler would
// move vocabulary-sized tensors across the bus. Refuse up front, naming the op.
void Context::check_backend_support() const {
    if (ggml_backend_dev_type(model_.device()) == GGML_BACKEND_DEVICE_TYPE_CPU) {
        return;
    }
    const dg_hparams & hp = model_.hparams();
    std::vector<uint8_t> mem(ggml_tensor_overhead() * (graph_size_for(hp) + 8) + ggml_graph_overhead_custom(graph_size_for(hp), false));
    GraphScope           scope(mem);
    ggml_tensor *        embd_t = ggml_new_tensor_2d(scope.ctx, static_cast<ggml_type>(sc_table_type_), hp.n_vocab, hp.n_embd);
    ggml_tensor *        state  = ggml_new_tensor_2d(scope.ctx, GGML_TYPE_F32, hp.n_vocab, hp.canvas_length);
    ForwardShape decode;
    decode.pass       = Pass::DECODE;
    decode.n_tokens   = hp.canvas_length;
    decode.n_kv_full  = kv_view_full(cache_.layout(), hp.canvas_length + 1);
    decode.flash_attn = flash_attn_;
    decode.self_cond  = hp.has_self_conditioning ? SelfCond::DEVICE : SelfCond::NONE;
    decode.sc_top_k   = sc_top_k_;
    decode.sample     = true;
    ForwardShape encode;
    encode.pass       = Pass::ENCODE;
    encode.n_tokens   = std::min<uint32_t>(2, cache_.n_ctx());
    encode.n_kv_full  = kv_view_full(cache_.layout(), 3);
    encode.flash_attn = flash_attn_;
    for (const ForwardShape & shape : {decode, encode}) {
        ggml_cgraph * gf = ggml_new_graph_custom(scope.ctx, graph_size_for(hp), false);
        build_forward(scope.ctx, gf, model_, cache_, shape, policy_, embd_t, hp.has_self_conditioning ? state : nullptr);
        for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
            ggml_tensor * node = ggml_graph_node(gf, i);
            switch (node->op) {
                case GGML_OP_NONE: case GGML_OP_VIEW: case GGML_OP_RESHAPE: case GGML_OP_PERMUTE: case GGML_OP_TRANSPOSE:
                    continue;
                default:
                    break;
            }
            if (!ggml_backend_supports_op(backend_, node)) {
                fail(DG_ERR_UNSUPPORTED,
                     format("the %s backend cannot run %s (%s, %s [%lld, %lld, %lld]), which the %s needs", model_.device_name().c_str(),
                            ggml_op_desc(node), node->src[0] != nullptr ? ggml_type_name(node->src[0]->type) : "-",
                            ggml_type_name(node->type), static_cast<long long>(node->ne[0]), static_cast<long long>(node->ne[1]),
                            static_cast<long long>(node->ne[2]), shape.pass == Pass::DECODE ? "denoising step" : "encoder"));
            }
        }
    }
}

dg_context_info Context::info() const {
    dg_context_info out{};
    const KvLayout & kv = cache_.layout();
    out.kv_type         = kv.type == GGML_TYPE_F32 ? DG_KV_F32 : kv.type == GGML_TYPE_Q8_0 ? DG_KV_Q8_0 : DG_KV_F16;
    out.flash_attn      = flash_attn_;
    out.kv_slots_full   = kv.slots_full;
    out.kv_slots_swa    = kv.slots_swa;
    out.kv_bytes        = cache_.n_bytes();
    for (ggml_backend_t b : {backend_, backend_cpu_}) {
        if (b != nullptr && (b == backend_ || backend_cpu_ != backend_)) {
            out.compute_bytes += ggml_backend_sched_get_buffer_size(sched_, b);
        }
    }
    for (const DeviceTensor * t : {&sc_state_}) {
        if (t->get() != nullptr) {
            out.self_cond_bytes += ggml_row_size(t->get()->type, t->get()->ne[0]) * static_cast<uint64_t>(t->capacity());
        }
    }
    out.graphs_built = graphs_built_;
    out.sc_table_bytes = model_.self_cond_tables_built_bytes();
    return out;
}

// AUTO: flash attention wherever the device runs it for every layer's geometry (the CPU always
// does), except on Vulkan (flash_attn_auto_allowed), and wherever the cache is Q8_0 (which the
// matmul path cannot read transposed).
bool Context::decide_flash_attn() const {
    if (flash_attn_mode_ == DG_FLASH_ATTN_ON || kv_type_ == GGML_TYPE_Q8_0) {
        return true;
    }
    if (flash_attn_mode_ == DG_FLASH_ATTN_OFF || !flash_attn_auto_allowed(model_.device())) {
        return false;
    }
    if (ggml_backend_dev_type(model_.device()) == GGML_BACKEND_DEVICE_TYPE_CPU) {
        return true;
    }
    const dg_hparams & hp = model_.hparams();
    std::vector<uint8_t> mem(ggml_tensor_overhead() * 8 * model_.layers().size() + 1024);
    GraphScope scope(mem);
    const int64_t n = std::max<uint32_t>(hp.canvas_length, 1), T = kv_slot_pad;
    for (const LayerLayout & L : model_.layers()) {
        ggml_tensor * q  = ggml_new_tensor_3d(scope.ctx, GGML_TYPE_F32, L.head_dim, n, hp.n_head);
        ggml_tensor * k  = ggml_new_tensor_3d(scope.ctx, static_cast<ggml_type>(kv_type_), L.head_dim, T, L.n_head_kv);
        ggml_tensor * v  = ggml_new_tensor_3d(scope.ctx, static_cast<ggml_type>(kv_type_), L.head_dim, T, L.n_head_kv);
        ggml_tensor * m  = ggml_new_tensor_2d(scope.ctx, GGML_TYPE_F16, T, n);
        ggml_tensor * fa = ggml_flash_attn_ext(scope.ctx, q, k, v, m, 1.0f, 0.0f, 0.0f);
        ggml_flash_attn_ext_set_prec(fa, GGML_PREC_F32);
        if (!ggml_backend_supports_op(backend_, fa)) {
            return false;
        }
    }
    return true;
}

// The state holds at least n columns; get() is their first n. Only a longer canvas than any
// before reallocates (off the CPU the old buffers are kept until release()).
void Context::ensure_sc_state(uint32_t n) {
    if (sc_state_.get() != nullptr && sc_state_.get()->ne[1] == n) {
        return;
    }
    drop_graph();  // graphs refer to the old tensors
    sc_state_valid_ = false;
    if (sc_state_.capacity() < n) {
        std::vector<ggml_backend_buffer *> * keep = keep_device_buffers_ ? &retired_buffers_ : nullptr;
        sc_state_.reset(keep);
        const char * what = "the self-conditioning state of the step loop";
        sc_state_.alloc(backend_, GGML_TYPE_F32, model_.hparams().n_vocab, n, "sc_state", what);
    }
    sc_state_.use_columns(n);
}

void DeviceTensor::alloc(ggml_backend * backend, int type, int64_t ne0, int64_t ne1, const char * name, const char * what) {
    reset();
    ggml_init_params p{};
    p.mem_size = ggml_tensor_overhead();
    p.no_alloc = true;
    ctx_       = ggml_init(p);
    tensor_    = ggml_new_tensor_2d(ctx_, static_cast<ggml_type>(type), ne0, ne1);
    ggml_set_name(tensor_, name);
    buffer_ = ggml_backend_alloc_ctx_tensors_from_buft(ctx_, ggml_backend_get_default_buffer_type(backend));
    if (buffer_ == nullptr) {
        reset();
        fail(DG_ERR_OUT_OF_MEMORY, format("cannot allocate %s (%s)", what, gib(ggml_row_size(static_cast<ggml_type>(type), ne0) * ne1).c_str()));
    }
}

void DeviceTensor::reset(std::vector<ggml_backend_buffer *> * keep) {
    drop_view();
    if (buffer_ != nullptr) {
        if (keep != nullptr) {
            keep->push_back(buffer_);
        } else {
            ggml_backend_buffer_free(buffer_);
        }
    }
    if (ctx_ != nullptr) {
        ggml_free(ctx_);
    }
    ctx_    = nullptr;
    buffer_ = nullptr;
    tensor_ = nullptr;
}

int64_t DeviceTensor::capacity() const { return tensor_ != nullptr ? tensor_->ne[1] : 0; }

void DeviceTensor::drop_view() {
    if (view_ctx_ != nullptr) {
        ggml_free(view_ctx_);
    }
    view_ctx_ = nullptr;
    view_     = nullptr;
}

void DeviceTensor::use_columns(int64_t n) {
    drop_view();
    if (tensor_ == nullptr || n < 1 || n > tensor_->ne[1]) {
        fail(DG_ERR_INTERNAL, format("use_columns: %lld columns of a tensor with %lld", static_cast<long long>(n),
                                     static_cast<long long>(capacity())));
    }
    if (n == tensor_->ne[1]) {
        return;
    }
    ggml_init_params p{};
    p.mem_size = ggml_tensor_overhead();
    p.no_alloc = true;
    view_ctx_  = ggml_init(p);
    view_      = ggml_view_2d(view_ctx_, tensor_, tensor_->ne[0], n, tensor_->nb[1], 0);
    ggml_set_name(view_, ggml_get_name(tensor_));
    if (ggml_backend_view_init(view_) != GGML_STATUS_SUCCESS) {
        drop_view();
        fail(DG_ERR_BACKEND, "cannot make a view of a device tensor");
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

// The model's table (built by the first context that needs it, then shared).
void Context::ensure_transposed_embedding() {
    if (embd_t_ == nullptr) {
        embd_t_ = model_.self_cond_table(sc_table_type_);
    }
}

}  // namespace dg
