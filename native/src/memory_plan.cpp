#include "memory_plan.h"

#include "error.h"
#include "gguf_model.h"
#include "kernel_policy.h"
#include "kv_cache.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>

namespace dg {

namespace {

std::string gib(uint64_t bytes) { return format("%.2f GiB", static_cast<double>(bytes) / (1ull << 30)); }

}  // namespace

int kv_ggml_type(uint32_t kv_type) {
    switch (kv_type) {
        case DG_KV_F32: return GGML_TYPE_F32;
        case DG_KV_Q8_0: return GGML_TYPE_Q8_0;
        case DG_KV_F16: return GGML_TYPE_F16;
        default: fail(DG_ERR_INVALID_ARG, format("kv_type = %u is not a KV cache type (F16 = 0, F32 = 1, Q8_0 = 2)", kv_type));
    }
}


bool flash_attn_auto_allowed(ggml_backend_device * device) {
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(device);
    return reg == nullptr || std::strcmp(ggml_backend_reg_name(reg), "Vulkan") != 0;
}

uint64_t needed_on_device(const dg_memory_plan & m, bool cpu) { return cpu ? m.total : m.total - m.weights_mapped; }

dg_memory_plan plan_context_memory(const GgufModel & model, const dg_context_params & params) {
    const dg_hparams & hp = model.hparams();
    dg_memory_plan     m{};
    const uint32_t     n_ctx   = params.n_ctx;
    if (n_ctx == 0 || n_ctx > hp.n_ctx_train) {
        fail(DG_ERR_INVALID_ARG, format("n_ctx = %u exceeds the model's context length (%u)", n_ctx, hp.n_ctx_train));
    }
    const uint32_t     n_batch = params.n_batch > 0 ? params.n_batch : 512;
    const uint32_t     C       = std::max<uint32_t>(hp.canvas_length, 1);
    const int          kv_type = kv_ggml_type(params.kv_type);
    const bool         cpu     = ggml_backend_dev_type(model.device()) == GGML_BACKEND_DEVICE_TYPE_CPU;
    m.n_ctx      = n_ctx;
    m.flash_attn = params.flash_attn == DG_FLASH_ATTN_ON || kv_type == GGML_TYPE_Q8_0 ||
                   (params.flash_attn == DG_FLASH_ATTN_AUTO && flash_attn_auto_allowed(model.device()));  // (see Context)

    // weights: read in place from the mapping where the device can, else copied (CPU: repacked)
    uint64_t file_bytes = 0;
    for (const TensorRecord & t : model.tensors()) {
        file_bytes += t.n_bytes;
    }
    ggml_backend_dev_props props{};
    ggml_backend_dev_get_props(model.device(), &props);
    if (cpu) {
        m.weights_copied = model.plan_repack();
        m.weights_mapped = file_bytes > m.weights_copied ? file_bytes - m.weights_copied : 0;
    } else if (props.caps.buffer_from_host_ptr) {
        m.weights_mapped = file_bytes;
    } else {
        m.weights_copied = file_bytes;
    }

    const KvLayout kv = kv_layout(model, n_ctx, n_batch, C, kv_type, !m.flash_attn);
    m.kv = kv.bytes;
    const int table_type = model.self_cond_table_type(params.sc_table);
    if (hp.has_self_conditioning) {
        if (params.sc_top_k == 0 && model.self_cond_tables_built_bytes() == 0) {
            m.self_cond_table = model.self_cond_table_bytes(table_type);
        }
        m.self_cond_state = 4ull * C * hp.n_vocab;  // the processed logits of the last step
    }

    // compute: the tensors alive at the widest point of the largest graphs, in bytes
    uint32_t max_hd = 0;
    for (const LayerLayout & l : model.layers()) {
        max_hd = std::max(max_hd, l.head_dim);
    }
    const uint64_t wide = std::max<uint64_t>({hp.n_ff, 2ull * hp.n_ff_exp * hp.n_expert_used, uint64_t(hp.n_head) * max_hd});
    const uint64_t T    = kv.slots_full;  // the full layers' view at the end of the context
    auto attention = [&](uint64_t n, bool decode) -> uint64_t {
        const uint64_t masks = (T + kv.slots_swa) * n * (decode ? 2 + 4 : 2);  // F16 masks (decode: repeated from F32)
        return m.flash_attn ? masks : masks + 2 * 4 * T * n * hp.n_head;  // scores and their softmax
    };
    auto acts = [&](uint64_t n) -> uint64_t { return 4 * n * (8ull * hp.n_embd + 4 * wide); };
    // The graphs' phases do not overlap in time: a pass's attention and MLP activations, then (a
    // canvas) the vocabulary-sized tensors at its end: logits, softcapped, processed (+ the stock
    // sampler's temporaries); self-conditioning's softmax of the previous logits at its start.
    const uint64_t encode  = attention(std::min(n_batch, n_ctx), false) + acts(std::min(n_batch, n_ctx));
    // the CPU's sampler kernel (and softcap) keep fewer vocabulary-sized temporaries than stock ops
    const uint32_t allowed = params.cpu_kernels == DG_CPU_KERNELS_DEFAULT ? cpu_kernels_from_environment() : params.cpu_kernels;
    const KernelPolicy policy = KernelPolicy::decide(model.device(), allowed);
    const bool     kernels = policy.sampler;
    const uint64_t vocab   = 4ull * C * hp.n_vocab;          // one [n_vocab, canvas] F32 tensor
    uint64_t       decode  = std::max(attention(C, true) + acts(C), vocab * (kernels ? 4 : 6));
    uint64_t       work    = 0;  // the CPU backend's work buffer (outside the scheduler's)
    if (hp.has_self_conditioning && params.sc_top_k == 0) {
        decode = std::max(decode, vocab + acts(C));
        if (cpu && table_type != GGML_TYPE_F32 && !policy.self_cond_mix) {  // ggml's product: the probabilities in the table's dot type
            work = ggml_row_size(table_type == GGML_TYPE_Q8_0 ? GGML_TYPE_Q8_0 : GGML_TYPE_F16, hp.n_vocab) * C;
        }
    }
    m.compute = std::max(encode, decode) + work;

    m.total = m.weights_copied + m.weights_mapped + m.kv + m.self_cond_table + m.self_cond_state + m.compute;
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(model.device(), &free, &total);
    m.device_free  = free;
    m.device_total = total;
    // Off the CPU the mapped weights live in host memory; on it they must be resident to run at speed.
    m.fits = free == 0 || needed_on_device(m, cpu) <= free;
    return m;
}

std::string describe_plan(const dg_memory_plan & p, bool cpu) {
    const uint64_t weights = cpu ? p.weights_copied + p.weights_mapped : p.weights_copied;
    const char *   advice  = weights >= p.device_free ? "the weights alone do not fit: use a smaller quantization or another device"
                                                      : "use a smaller n_ctx, kv_type q8_0, or another device";
    return format("%s needed (weights %s copied + %s mapped, KV cache %s, self-conditioning table %s, step state %s, "
                  "compute ~%s), %s free: %s",
                  gib(needed_on_device(p, cpu)).c_str(), gib(p.weights_copied).c_str(), gib(p.weights_mapped).c_str(),
                  gib(p.kv).c_str(), gib(p.self_cond_table).c_str(), gib(p.self_cond_state).c_str(), gib(p.compute).c_str(),
                  gib(p.device_free).c_str(), advice);
}

}  // namespace dg
