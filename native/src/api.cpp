// The C ABI (dgemma.h). The only file that knows about it: every entry point catches C++
// exceptions, records the message for dg_last_error() and returns a status.
#include "dgemma.h"

#include "context.h"
#include "memory_plan.h"
#include "devices.h"
#include "error.h"
#include "generate.h"
#include "gguf_model.h"
#include "imatrix.h"
#include "quantize.h"
#include "sampler.h"
#include "tokenizer.h"

#include "ggml.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <memory>
#include <new>
#include <vector>

#ifndef DGEMMA_VERSION_STRING
#    define DGEMMA_VERSION_STRING "0.0.0"
#endif

struct dg_model {
    std::unique_ptr<dg::GgufModel> impl;
};

struct dg_context {
    std::unique_ptr<dg::Context> impl;
};

struct dg_sampler {
    std::unique_ptr<dg::Sampler> impl;
    uint32_t                     canvas_len;
};

namespace {

template <typename Fn>
dg_status guarded(Fn && fn) {
    try {
        fn();
        return DG_OK;
    } catch (const dg::Error & e) {
        dg::set_last_error(e.status() == DG_ERR_INTERNAL ? std::string("internal error: ") + e.what() : e.what());
        return e.status();
    } catch (const std::bad_alloc &) {
        dg::set_last_error("out of memory");
        return DG_ERR_OUT_OF_MEMORY;
    } catch (const std::exception & e) {  // from the standard library or ggml, never expected
        dg::set_last_error(std::string("internal error: ") + e.what());
        return DG_ERR_INTERNAL;
    } catch (...) {
        dg::set_last_error("internal error: unknown exception");
        return DG_ERR_INTERNAL;
    }
}

dg_status invalid(const char * what) {
    dg::set_last_error(what);
    return DG_ERR_INVALID_ARG;
}

template <typename Fn>
dg_status with_rows(size_t n, int32_t * argmax_out, int32_t * draws_out, float * entropy_out, Fn && fn) {
    return guarded([&] {
        std::vector<dg::RowStats> rows(n);
        fn(rows.data());
        for (size_t i = 0; i < n; ++i) {
            argmax_out[i]  = rows[i].argmax;
            draws_out[i]   = rows[i].draw;
            entropy_out[i] = rows[i].entropy;
        }
    });
}


}  // namespace

extern "C" {

int32_t dg_abi_version(void) { return DG_ABI_VERSION; }

const char * dg_last_error(void) { return dg::last_error(); }

const char * dg_status_name(dg_status status) {
    switch (status) {
        case DG_OK:                return "DG_OK";
        case DG_ERR_INVALID_ARG:   return "DG_ERR_INVALID_ARG";
        case DG_ERR_IO:            return "DG_ERR_IO";
        case DG_ERR_FORMAT:        return "DG_ERR_FORMAT";
        case DG_ERR_UNSUPPORTED:   return "DG_ERR_UNSUPPORTED";
        case DG_ERR_OUT_OF_MEMORY: return "DG_ERR_OUT_OF_MEMORY";
        case DG_ERR_BACKEND:       return "DG_ERR_BACKEND";
        case DG_ERR_INTERNAL:      return "DG_ERR_INTERNAL";
    }
    return "DG_ERR_UNKNOWN";
}

const char * dg_version(void) { return DGEMMA_VERSION_STRING; }

const char * dg_ggml_version(void) { return ggml_version(); }

size_t dg_device_count(void) { return dg::device_count(); }

dg_status dg_device_get(size_t index, dg_device_info * out) {
    if (out == nullptr) {
        return invalid("dg_device_get: out is NULL");
    }
    return guarded([&] { *out = dg::device_info(index); });
}

dg_model_params dg_model_default_params(void) {
    dg_model_params p{};
    p.device    = "auto";
    p.n_threads = 0;
    p.use_mmap  = true;
    p.repack    = true;
    return p;
}

dg_status dg_model_load(const char * path, const dg_model_params * params, dg_model ** out_model) {
    if (out_model == nullptr) {
        return invalid("dg_model_load: out_model is NULL");
    }
    *out_model = nullptr;
    if (path == nullptr || path[0] == '\0') {
        return invalid("dg_model_load: empty path");
    }
    const dg_model_params p = params != nullptr ? *params : dg_model_default_params();
    return guarded([&] {
        std::unique_ptr<dg_model> model(new dg_model());
        model->impl = dg::GgufModel::load(path, p);
        *out_model  = model.release();
    });
}

void dg_model_free(dg_model * model) { delete model; }

const char * dg_model_device(const dg_model * model) {
    return model != nullptr ? model->impl->device_name().c_str() : nullptr;
}

int32_t dg_model_n_threads(const dg_model * model) { return model != nullptr ? model->impl->n_threads() : 0; }

dg_status dg_model_hparams(const dg_model * model, dg_hparams * out) {
    if (model == nullptr || out == nullptr) {
        return invalid("dg_model_hparams: NULL argument");
    }
    *out = model->impl->hparams();
    return DG_OK;
}

dg_status dg_model_layer(const dg_model * model, uint32_t layer, dg_layer_info * out) {
    if (model == nullptr || out == nullptr) {
        return invalid("dg_model_layer: NULL argument");
    }
    const auto & layers = model->impl->layers();
    if (layer >= layers.size()) {
        dg::set_last_error(dg::format("layer %u out of range (model has %zu layers)", layer, layers.size()));
        return DG_ERR_INVALID_ARG;
    }
    const dg::LayerLayout & l = layers[layer];
    out->is_sliding = l.is_sliding;
    out->n_head_kv  = l.n_head_kv;
    out->head_dim   = l.head_dim;
    out->has_v_proj = l.has_v_proj;
    return DG_OK;
}

size_t dg_model_n_tensors(const dg_model * model) { return model != nullptr ? model->impl->tensors().size() : 0; }

dg_status dg_model_tensor(const dg_model * model, size_t index, dg_tensor_info * out) {
    if (model == nullptr || out == nullptr) {
        return invalid("dg_model_tensor: NULL argument");
    }
    const auto & tensors = model->impl->tensors();
    if (index >= tensors.size()) {
        dg::set_last_error(dg::format("tensor index %zu out of range (%zu tensors)", index, tensors.size()));
        return DG_ERR_INVALID_ARG;
    }
    const dg::TensorRecord & t = tensors[index];
    out->name        = t.name.c_str();
    out->type        = t.type;
    out->type_name   = ggml_type_name(static_cast<ggml_type>(t.type));
    out->n_dims      = t.n_dims;
    for (int d = 0; d < 4; ++d) {
        out->ne[d] = t.ne[d];
    }
    out->n_bytes     = t.n_bytes;
    out->file_offset = t.file_offset;
    return DG_OK;
}

size_t dg_model_n_meta(const dg_model * model) { return model != nullptr ? model->impl->meta().size() : 0; }

const char * dg_model_meta_key(const dg_model * model, size_t index) {
    if (model == nullptr || index >= model->impl->meta().size()) {
        return nullptr;
    }
    return model->impl->meta()[index].key.c_str();
}

const char * dg_model_meta_value(const dg_model * model, size_t index) {
    if (model == nullptr || index >= model->impl->meta().size()) {
        return nullptr;
    }
    return model->impl->meta()[index].value.c_str();
}

const char * dg_model_meta_get(const dg_model * model, const char * key) {
    if (model == nullptr || key == nullptr) {
        return nullptr;
    }
    const dg::MetaRecord * m = model->impl->find_meta(key);
    return m != nullptr ? m->value.c_str() : nullptr;
}

uint64_t dg_model_file_size(const dg_model * model) { return model != nullptr ? model->impl->file_size() : 0; }

dg_status dg_tokenize(const dg_model * model, const char * text, size_t text_len, bool add_bos, bool parse_special,
                      int32_t * ids_out, size_t max_ids, size_t * n_out) {
    if (model == nullptr || n_out == nullptr || (text == nullptr && text_len > 0) || (ids_out == nullptr && max_ids > 0)) {
        return invalid("dg_tokenize: NULL argument");
    }
    return guarded([&] {
        const std::vector<int32_t> ids =
            model->impl->tokenizer().encode(std::string(text != nullptr ? text : "", text_len), add_bos, parse_special);
        *n_out = ids.size();
        std::copy_n(ids.begin(), std::min(ids.size(), max_ids), ids_out);
    });
}

dg_status dg_detokenize(const dg_model * model, const int32_t * ids, size_t n_ids, bool render_special, char * text_out,
                        size_t max_bytes, size_t * n_out) {
    if (model == nullptr || n_out == nullptr || (ids == nullptr && n_ids > 0) || (text_out == nullptr && max_bytes > 0)) {
        return invalid("dg_detokenize: NULL argument");
    }
    return guarded([&] {
        const std::string text = model->impl->tokenizer().decode(ids, n_ids, render_special);
        *n_out = text.size();
        std::copy_n(text.begin(), std::min(text.size(), max_bytes), text_out);
    });
}

dg_context_params dg_context_default_params(void) {
    dg_context_params p{};
    p.n_ctx     = 0;
    p.n_batch   = 512;
    p.n_threads = 0;
    p.sc_top_k  = 0;
    p.cpu_kernels = DG_CPU_KERNELS_DEFAULT;
    p.kv_type     = DG_KV_F16;
    p.flash_attn  = DG_FLASH_ATTN_AUTO;
    p.sc_table    = DG_SC_TABLE_AUTO;
    return p;
}

dg_status dg_context_new(const dg_model * model, const dg_context_params * params, dg_context ** out_ctx) {
    if (out_ctx == nullptr) {
        return invalid("dg_context_new: out_ctx is NULL");
    }
    *out_ctx = nullptr;
    if (model == nullptr) {
        return invalid("dg_context_new: model is NULL");
    }
    dg_context_params p = params != nullptr ? *params : dg_context_default_params();
    if (p.n_ctx == 0) {
        p.n_ctx = std::min<uint32_t>(4096, model->impl->hparams().n_ctx_train);
    }
    if (p.sc_top_k > model->impl->hparams().n_vocab) {
        return invalid(dg::format("sc_top_k = %u exceeds the vocabulary (%u tokens)", p.sc_top_k,
                                  model->impl->hparams().n_vocab).c_str());
    }
    return guarded([&] {
        std::unique_ptr<dg_context> ctx(new dg_context());
        ctx->impl = std::make_unique<dg::Context>(*model->impl, p);
        *out_ctx  = ctx.release();
    });
}

void dg_context_free(dg_context * ctx) { delete ctx; }

static dg_status check_count(size_t n, const char * what) {
    if (n > UINT32_MAX) {
        dg::set_last_error(dg::format("%s: too many tokens (%zu)", what, n));
        return DG_ERR_INVALID_ARG;
    }
    return DG_OK;
}

dg_status dg_prefill(dg_context * ctx, const int32_t * tokens, size_t n_tokens) {
    if (ctx == nullptr) {
        return invalid("dg_prefill: ctx is NULL");
    }
    if (dg_status st = check_count(n_tokens, "prefill"); st != DG_OK) {
        return st;
    }
    return guarded([&] { ctx->impl->prefill(tokens, static_cast<uint32_t>(n_tokens)); });
}

dg_status dg_denoise(dg_context * ctx, const int32_t * canvas, size_t n_canvas, const float * sc_logits, float * logits_out) {
    if (ctx == nullptr) {
        return invalid("dg_denoise: ctx is NULL");
    }
    if (dg_status st = check_count(n_canvas, "denoise"); st != DG_OK) {
        return st;
    }
    return guarded([&] { ctx->impl->denoise(canvas, static_cast<uint32_t>(n_canvas), sc_logits, logits_out); });
}

dg_status dg_commit(dg_context * ctx, const int32_t * canvas, size_t n_canvas) {
    if (ctx == nullptr) {
        return invalid("dg_commit: ctx is NULL");
    }
    if (dg_status st = check_count(n_canvas, "commit"); st != DG_OK) {
        return st;
    }
    return guarded([&] { ctx->impl->commit(canvas, static_cast<uint32_t>(n_canvas)); });
}

dg_status dg_context_reset(dg_context * ctx) {
    if (ctx == nullptr) {
        return invalid("dg_context_reset: ctx is NULL");
    }
    return guarded([&] { ctx->impl->reset(); });
}

dg_status dg_context_truncate(dg_context * ctx, uint32_t n_past) {
    if (ctx == nullptr) {
        return invalid("dg_context_truncate: ctx is NULL");
    }
    return guarded([&] { ctx->impl->truncate(n_past); });
}

dg_status dg_plan_memory(const dg_model * model, const dg_context_params * params, dg_memory_plan * out) {
    if (model == nullptr || out == nullptr) {
        return invalid("dg_plan_memory: NULL argument");
    }
    dg_context_params p = params != nullptr ? *params : dg_context_default_params();
    if (p.n_ctx == 0) {
        p.n_ctx = std::min<uint32_t>(4096, model->impl->hparams().n_ctx_train);
    }
    return guarded([&] { *out = dg::plan_context_memory(*model->impl, p); });
}

dg_status dg_context_get_info(const dg_context * ctx, dg_context_info * out) {
    if (ctx == nullptr || out == nullptr) {
        return invalid("dg_context_get_info: NULL argument");
    }
    return guarded([&] { *out = ctx->impl->info(); });
}

uint32_t dg_context_n_past(const dg_context * ctx) { return ctx != nullptr ? ctx->impl->n_past() : 0; }

uint32_t dg_context_n_ctx(const dg_context * ctx) { return ctx != nullptr ? ctx->impl->n_ctx() : 0; }

const char * dg_context_kernels(const dg_context * ctx) { return ctx != nullptr ? ctx->impl->kernel_names().c_str() : nullptr; }

dg_status dg_context_step(dg_context * ctx, const int32_t * canvas, size_t n_canvas, float temperature, const float * uniforms,
                          bool self_cond, int32_t * argmax_out, int32_t * draws_out, float * entropy_out) {
    if (ctx == nullptr || canvas == nullptr || uniforms == nullptr || argmax_out == nullptr || draws_out == nullptr ||
        entropy_out == nullptr) {
        return invalid("dg_context_step: NULL argument");
    }
    if (dg_status st = check_count(n_canvas, "step"); st != DG_OK) {
        return st;
    }
    return with_rows(n_canvas, argmax_out, draws_out, entropy_out, [&](dg::RowStats * rows) {
        ctx->impl->step(canvas, static_cast<uint32_t>(n_canvas), temperature, uniforms, self_cond, rows);
    });
}

dg_status dg_context_reduce_logits(dg_context * ctx, const float * logits, size_t n_rows, float temperature,
                                   const float * uniforms, int32_t * argmax_out, int32_t * draws_out, float * entropy_out) {
    if (ctx == nullptr || logits == nullptr || uniforms == nullptr || argmax_out == nullptr || draws_out == nullptr ||
        entropy_out == nullptr) {
        return invalid("dg_context_reduce_logits: NULL argument");
    }
    if (dg_status st = check_count(n_rows, "reduce_logits"); st != DG_OK) {
        return st;
    }
    return with_rows(n_rows, argmax_out, draws_out, entropy_out, [&](dg::RowStats * rows) {
        ctx->impl->reduce_logits(logits, static_cast<uint32_t>(n_rows), temperature, uniforms, rows);
    });
}

dg_status dg_context_step_stats(const dg_context * ctx, dg_step_stats * out) {
    if (ctx == nullptr || out == nullptr) {
        return invalid("dg_context_step_stats: NULL argument");
    }
    const dg::StepStats & s = ctx->impl->step_stats();
    out->n_steps           = s.steps;
    out->bytes_to_device   = s.bytes_to_device;
    out->bytes_from_device = s.bytes_from_device;
    out->seconds           = s.seconds;
    return DG_OK;
}

dg_status dg_context_imatrix_start(dg_context * ctx) {
    if (ctx == nullptr) {
        return invalid("dg_context_imatrix_start: ctx is NULL");
    }
    return guarded([&] { ctx->impl->imatrix_start(); });
}

dg_status dg_context_imatrix_stop(dg_context * ctx) {
    if (ctx == nullptr) {
        return invalid("dg_context_imatrix_stop: ctx is NULL");
    }
    return guarded([&] { ctx->impl->imatrix_stop(); });
}

dg_status dg_context_imatrix_clear(dg_context * ctx) {
    if (ctx == nullptr) {
        return invalid("dg_context_imatrix_clear: ctx is NULL");
    }
    return guarded([&] { ctx->impl->imatrix_clear(); });
}

size_t dg_context_imatrix_n_entries(const dg_context * ctx) {
    return ctx != nullptr && ctx->impl->imatrix() != nullptr ? ctx->impl->imatrix()->size() : 0;
}

dg_status dg_context_imatrix_entry(const dg_context * ctx, size_t index, dg_imatrix_entry * out) {
    if (ctx == nullptr || out == nullptr) {
        return invalid("dg_context_imatrix_entry: NULL argument");
    }
    const dg::ImatrixCollector * im = ctx->impl->imatrix();
    if (im == nullptr || index >= im->size()) {
        dg::set_last_error(dg::format("dg_context_imatrix_entry: index %zu out of range (%zu entries)", index,
                                      im != nullptr ? im->size() : size_t{0}));
        return DG_ERR_INVALID_ARG;
    }
    const dg::ImatrixEntry & e = im->entry(index);
    out->name    = e.name.c_str();
    out->n_mat   = e.n_mat;
    out->ne0     = e.ne0;
    out->in_sum2 = e.in_sum2.data();
    out->counts  = e.counts.data();
    return DG_OK;
}

dg_sampler_params dg_sampler_default_params(const dg_model * model) {
    return dg::sampler_params_from(model != nullptr ? model->impl.get() : nullptr);
}

dg_status dg_sampler_new(const dg_sampler_params * params, uint32_t canvas_len, uint32_t n_vocab, dg_sampler ** out_sampler) {
    if (out_sampler == nullptr) {
        return invalid("dg_sampler_new: out_sampler is NULL");
    }
    *out_sampler = nullptr;
    const dg_sampler_params p = params != nullptr ? *params : dg::sampler_params_from(nullptr);
    return guarded([&] {
        std::unique_ptr<dg_sampler> s(new dg_sampler());
        s->impl       = std::make_unique<dg::Sampler>(p, canvas_len, n_vocab);
        s->canvas_len = canvas_len;
        *out_sampler  = s.release();
    });
}

void dg_sampler_free(dg_sampler * sampler) { delete sampler; }

dg_status dg_sampler_init_canvas(dg_sampler * sampler, int32_t * canvas) {
    if (sampler == nullptr || canvas == nullptr) {
        return invalid("dg_sampler_init_canvas: NULL argument");
    }
    return guarded([&] { sampler->impl->init_canvas(canvas); });
}

float dg_sampler_temperature(const dg_sampler * sampler) { return sampler != nullptr ? sampler->impl->temperature() : 0.0f; }

dg_status dg_sampler_step(dg_sampler * sampler, float * logits, int32_t * canvas, int32_t * argmax_out, int32_t * draws_out,
                          uint8_t * accepted_out, float * entropy_out, dg_step_result * result) {
    if (sampler == nullptr || logits == nullptr || canvas == nullptr || result == nullptr) {
        return invalid("dg_sampler_step: NULL argument");
    }
    return guarded([&] { *result = sampler->impl->step(logits, canvas, argmax_out, draws_out, accepted_out, entropy_out); });
}

dg_status dg_sampler_uniforms(const dg_sampler * sampler, float * uniforms_out) {
    if (sampler == nullptr || uniforms_out == nullptr) {
        return invalid("dg_sampler_uniforms: NULL argument");
    }
    return guarded([&] { sampler->impl->uniforms(uniforms_out); });
}

dg_status dg_sampler_decide(dg_sampler * sampler, const int32_t * argmax, const int32_t * draws, const float * entropy,
                            int32_t * canvas, uint8_t * accepted_out, dg_step_result * result) {
    if (sampler == nullptr || argmax == nullptr || draws == nullptr || entropy == nullptr || canvas == nullptr ||
        result == nullptr) {
        return invalid("dg_sampler_decide: NULL argument");
    }
    return guarded([&] {
        const uint32_t            n = sampler->canvas_len;
        std::vector<dg::RowStats> rows(n);
        for (uint32_t i = 0; i < n; ++i) {
            if (argmax[i] < 0 || draws[i] < 0 || static_cast<uint32_t>(std::max(argmax[i], draws[i])) >= sampler->impl->n_vocab()) {
                dg::fail(DG_ERR_INVALID_ARG, dg::format("dg_sampler_decide: id %d at index %u is out of range (vocabulary of %u)",
                                                        std::min(argmax[i], draws[i]) < 0 ? std::min(argmax[i], draws[i])
                                                                                          : std::max(argmax[i], draws[i]),
                                                        i, sampler->impl->n_vocab()));
            }
            rows[i].argmax  = argmax[i];
            rows[i].draw    = draws[i];
            rows[i].entropy = entropy[i];
        }
        *result = sampler->impl->decide(rows.data(), canvas, nullptr, nullptr, accepted_out, nullptr);
    });
}

dg_generate_params dg_generate_default_params(const dg_model * model) {
    dg_generate_params p{};
    p.max_new_tokens = 256;
    if (model != nullptr) {
        try {
            const std::vector<int32_t> & eog = model->impl->tokenizer().eog_ids();
            p.eos_ids = eog.data();
            p.n_eos   = eog.size();
        } catch (...) {  // out of memory building the tokenizer: no default EOG tokens
            p.eos_ids = nullptr;
            p.n_eos   = 0;
        }
    }
    return p;
}

dg_status dg_generate(dg_context * ctx, const dg_sampler_params * sampler, const int32_t * prompt, size_t n_prompt,
                      const dg_generate_params * params, int32_t * tokens_out, uint32_t * steps_out, dg_generate_result * result) {
    if (ctx == nullptr || sampler == nullptr || params == nullptr || tokens_out == nullptr || result == nullptr ||
        (prompt == nullptr && n_prompt > 0) || (params->eos_ids == nullptr && params->n_eos > 0)) {
        return invalid("dg_generate: NULL argument");
    }
    if (dg_status st = check_count(n_prompt, "generate"); st != DG_OK) {
        return st;
    }
    return guarded([&] {
        const dg::GenerateResult r = dg::generate(*ctx->impl, *sampler, prompt, static_cast<uint32_t>(n_prompt), *params);
        std::copy(r.tokens.begin(), r.tokens.end(), tokens_out);
        if (steps_out != nullptr) {
            std::copy(r.steps.begin(), r.steps.end(), steps_out);
        }
        *result            = dg_generate_result{};
        result->n_tokens   = r.tokens.size();
        result->n_canvases = static_cast<uint32_t>(r.steps.size());
        result->n_forwards = r.n_forwards;
        result->hit_eos    = r.hit_eos;
        result->cancelled  = r.cancelled;
        result->t_prefill  = r.t_prefill;
        result->t_steps    = r.t_steps;
        result->t_sampler  = r.t_sampler;
        result->t_callback = r.t_callback;
        result->bytes_to_device   = r.bytes_to_device;
        result->bytes_from_device = r.bytes_from_device;
    });
}

dg_status dg_quantize(int32_t type, const float * src, void * dst, int64_t n_rows, int64_t n_per_row, const float * imatrix,
                      int32_t n_threads, size_t * n_bytes) {
    if (src == nullptr || dst == nullptr || n_bytes == nullptr) {
        return invalid("dg_quantize: NULL argument");
    }
    return guarded([&] { *n_bytes = dg::quantize_rows(type, src, dst, n_rows, n_per_row, imatrix, n_threads); });
}

size_t dg_type_row_size(int32_t type, int64_t n_per_row) { return dg::type_row_size(type, n_per_row); }

}  // extern "C"
