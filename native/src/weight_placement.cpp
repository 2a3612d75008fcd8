// Weight placement: every weight put on the model's device once (zero-copy views of the mapping
// where the device can use host memory, uploads otherwise, ggml's CPU repack for the quantized
// matmul weights it has tiled kernels for), the mapped pages released once a copy is what runs;
// and self-conditioning's transposed-embedding tables, built from the mapping.
#include "gguf_model.h"

#include "error.h"
#include "parallel.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "gguf.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <vector>

namespace dg {

namespace {

// The CPU device's "extra" buffer type that re-lays out weights for ggml's tiled kernels, if any.
ggml_backend_buffer_type_t cpu_repack_buffer_type(ggml_backend_dev_t dev) {
    if (ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) {
        return nullptr;
    }
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    auto get_extra = reinterpret_cast<ggml_backend_dev_get_extra_bufts_t>(
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts"));
    if (get_extra == nullptr) {
        return nullptr;
    }
    for (ggml_backend_buffer_type_t * b = get_extra(dev); b != nullptr && *b != nullptr; ++b) {
        if (std::strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) {
            return *b;
        }
    }
    return nullptr;
}

// Whether ggml's CPU backend runs `w` (a matmul weight) from `buft`: asked with the op the graph
// builds (mul_mat for 2-D weights, mul_mat_id for stacked experts), as the weight's only use.
bool runs_from(ggml_backend_dev_t dev, ggml_backend_buffer_t probe, ggml_tensor * w) {
    const int n_dims = ggml_n_dims(w);
    if (n_dims != 2 && n_dims != 3) {
        return false;
    }
    ggml_init_params ip{};
    ip.mem_size   = 8 * ggml_tensor_overhead();
    ip.no_alloc   = true;
    ggml_context * ctx = ggml_init(ip);
    if (ctx == nullptr) {
        return false;
    }
    ggml_tensor * op = nullptr;
    if (n_dims == 2) {
        op = ggml_mul_mat(ctx, w, ggml_new_tensor_2d(ctx, GGML_TYPE_F32, w->ne[0], 8));
    } else {
        ggml_tensor * x   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, w->ne[0], 2, 8);
        ggml_tensor * ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 2, 8);
        op = ggml_mul_mat_id(ctx, w, x, ids);
    }
    ggml_backend_buffer_t saved = w->buffer;
    w->buffer = probe;
    const bool ok = ggml_backend_dev_supports_op(dev, op);
    w->buffer = saved;
    ggml_free(ctx);
    return ok;
}

}  // namespace

// Names of the weights only ever used as the first operand of a matmul: the layers' projections
// and experts (and an untied output head). token_embd is also read by get_rows, so it stays put.
static bool matmul_only_weight(const std::string & name) {
    const bool layer_matrix = name.rfind("blk.", 0) == 0 && name.size() > 7 &&
                              name.compare(name.size() - 7, 7, ".weight") == 0;
    return layer_matrix || name == "output.weight";
}

size_t GgufModel::plan_repack(std::vector<const TensorRecord *> * repacked) const {
    ggml_backend_buffer_type_t buft = repack_ ? cpu_repack_buffer_type(device_) : nullptr;
    if (buft == nullptr) {
        return 0;
    }
    ggml_backend_buffer_t probe = ggml_backend_buft_alloc_buffer(buft, 0);
    size_t total = 0;
    for (size_t i = 0; i < tensors_.size(); ++i) {
        const TensorRecord & t = tensors_[i];
        ggml_tensor * w = tensor_meta_[i];
        if (probe != nullptr && ggml_is_quantized(w->type) && matmul_only_weight(t.name) && runs_from(device_, probe, w)) {
            if (repacked != nullptr) {
                repacked->push_back(&t);
            }
            total += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, w), ggml_backend_buft_get_alignment(buft));
        }
    }
    if (probe != nullptr) {
        ggml_backend_buffer_free(probe);
    }
    return total;
}

void GgufModel::bind_weights() const {
    std::call_once(bind_once_, [this] {
        auto meta_of = [this](const TensorRecord & t) { return tensor_meta_[static_cast<size_t>(&t - tensors_.data())]; };
        // Quantized matmul weights ggml has tiled CPU kernels for go to the repack buffer (copied
        // and re-laid out once); everything else stays a zero-copy view of the mapping.
        std::vector<const TensorRecord *> repacked;
        if (repack_) {
            if (ggml_backend_buffer_type_t buft = cpu_repack_buffer_type(device_)) {
                const size_t total = plan_repack(&repacked);
                if (!repacked.empty()) {
                    repack_buffer_ = ggml_backend_buft_alloc_buffer(buft, total);
                    if (repack_buffer_ == nullptr) {
                        repacked.clear();  // no room for copies: run from the mapping instead
                    }
                }
                if (repack_buffer_ != nullptr) {
                    ggml_tallocr alloc = ggml_tallocr_new(repack_buffer_);
                    for (const TensorRecord * t : repacked) {
                        ggml_tensor * w = meta_of(*t);
                        if (ggml_tallocr_alloc(&alloc, w) != GGML_STATUS_SUCCESS) {
                            fail(DG_ERR_BACKEND, format("cannot place tensor '%s' in %s", t->name.c_str(), ggml_backend_buft_name(buft)));
                        }
                        ggml_backend_tensor_set(w, t->data, 0, t->n_bytes);  // re-lays out the blocks
                        parts_[t->part]->file.release(t->data, t->n_bytes);  // the copy is what runs: the mapped pages can go
                    }
                    ggml_backend_buffer_set_usage(repack_buffer_, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
                }
            }
        }
        auto is_repacked = [&](const TensorRecord & t) {
            return repack_buffer_ != nullptr && meta_of(t)->buffer == repack_buffer_;
        };
        ggml_backend_dev_props props{};
        ggml_backend_dev_get_props(device_, &props);
        // Each file of the model is its own buffer: a view of its mapped data section, or an upload.
        for (uint32_t ip = 0; ip < parts_.size(); ++ip) {
            const Part & part = *parts_[ip];
            uint64_t max_tensor = 0;
            bool     any        = false;
            for (const TensorRecord & t : tensors_) {
                if (t.part == ip && !is_repacked(t)) {
                    max_tensor = std::max(max_tensor, t.n_bytes);
                    any        = true;
                }
            }
            if (!any) {
                continue;  // e.g. a split's metadata-only first part, or every weight repacked
            }
            const uint64_t data_offset = gguf_get_data_offset(part.gguf);
            const uint64_t data_size   = part.file.size() - data_offset;  // parse_part checked the data lies inside
            uint8_t * base = const_cast<uint8_t *>(part.file.data()) + data_offset;  // ggml never writes weights
            // A view needs the data section as aligned as the device's own buffers: a file written
            // with a smaller general.alignment is uploaded (copied) instead.
            const size_t align = ggml_backend_buft_get_alignment(ggml_backend_dev_buffer_type(device_));
            const bool aligned = reinterpret_cast<uintptr_t>(base) % align == 0 && gguf_get_alignment(part.gguf) % align == 0;
            if (props.caps.buffer_from_host_ptr && aligned) {
                part.weights_buffer = ggml_backend_dev_buffer_from_host_ptr(device_, base, data_size, max_tensor);
            }
            if (part.weights_buffer != nullptr) {
                for (const TensorRecord & t : tensors_) {
                    if (t.part != ip || is_repacked(t)) {
                        continue;
                    }
                    if (ggml_backend_tensor_alloc(part.weights_buffer, meta_of(t), base + (t.file_offset - data_offset)) != GGML_STATUS_SUCCESS) {
                        fail(DG_ERR_BACKEND, format("cannot place tensor '%s' on %s", t.name.c_str(), device_name_.c_str()));
                    }
                }
            } else {
                part.weights_buffer = ggml_backend_alloc_ctx_tensors_from_buft(part.meta_ctx, ggml_backend_dev_buffer_type(device_));
                if (part.weights_buffer == nullptr) {
                    fail(DG_ERR_OUT_OF_MEMORY, format("cannot allocate %.2f GiB for the weights on %s",
                                                      static_cast<double>(data_size) / (1ull << 30), device_name_.c_str()));
                }
                for (const TensorRecord & t : tensors_) {
                    if (t.part == ip && !is_repacked(t)) {
                        ggml_backend_tensor_set(meta_of(t), t.data, 0, t.n_bytes);
                        part.file.release(t.data, t.n_bytes);  // uploaded: the host's mapped pages can go
                    }
                }
            }
            ggml_backend_buffer_set_usage(part.weights_buffer, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        }
    });
}

int GgufModel::self_cond_table_type(uint32_t choice) const {
    switch (choice) {
        case DG_SC_TABLE_F32: return GGML_TYPE_F32;
        case DG_SC_TABLE_F16: return GGML_TYPE_F16;
        case DG_SC_TABLE_Q8_0:
            if (hparams_.n_vocab % ggml_blck_size(GGML_TYPE_Q8_0) != 0) {
                fail(DG_ERR_UNSUPPORTED, format("a Q8_0 self-conditioning table needs a vocabulary of a multiple of 32 tokens "
                                                "(this one has %u)", hparams_.n_vocab));
            }
            return GGML_TYPE_Q8_0;
        case DG_SC_TABLE_AUTO:
            if (weights_.token_embd->type == GGML_TYPE_F32) {
                return GGML_TYPE_F32;
            }
            return hparams_.n_vocab % ggml_blck_size(GGML_TYPE_Q8_0) == 0 ? GGML_TYPE_Q8_0 : GGML_TYPE_F16;
        default:
            fail(DG_ERR_INVALID_ARG, format("sc_table = %u is not auto (0), f32 (1), f16 (2) or q8_0 (3)", choice));
    }
}

uint64_t GgufModel::self_cond_table_bytes(int type) const {
    return ggml_row_size(static_cast<ggml_type>(type), hparams_.n_vocab) * static_cast<uint64_t>(hparams_.n_embd);
}

uint64_t GgufModel::self_cond_tables_built_bytes() const {
    std::lock_guard<std::mutex> lock(tables_mutex_);
    uint64_t total = 0;
    for (const auto & [type, t] : tables_) {
        total += ggml_backend_buffer_get_size(t.buffer);
    }
    return total;
}

// Slices of the vocabulary are dequantized from the mapping, transposed and converted on the host,
// a slice per worker; the table is written straight into a host buffer, or staged and uploaded.
ggml_tensor * GgufModel::self_cond_table(int type) const {
    std::lock_guard<std::mutex> lock(tables_mutex_);
    for (const auto & [t, table] : tables_) {
        if (t == type) {
            return table.tensor;
        }
    }
    const dg_hparams &   hp  = hparams_;
    const TensorRecord * rec = find_tensor("token_embd.weight");
    const ggml_tensor *  embd = weights_.token_embd;
    const auto *         traits = ggml_get_type_traits(embd->type);
    if (rec == nullptr || rec->data == nullptr || (embd->type != GGML_TYPE_F32 && traits->to_float == nullptr)) {
        fail(DG_ERR_UNSUPPORTED, format("cannot dequantize token_embd.weight (%s) on the host", ggml_type_name(embd->type)));
    }
    const auto out_type = static_cast<ggml_type>(type);
    Table      table;
    ggml_init_params p{};
    p.mem_size = ggml_tensor_overhead();
    p.no_alloc = true;
    table.ctx    = ggml_init(p);
    table.tensor = ggml_new_tensor_2d(table.ctx, out_type, hp.n_vocab, hp.n_embd);
    ggml_set_name(table.tensor, "token_embd_t");
    table.buffer = ggml_backend_alloc_ctx_tensors_from_buft(table.ctx, ggml_backend_dev_buffer_type(device_));
    if (table.buffer == nullptr) {
        ggml_free(table.ctx);
        fail(DG_ERR_OUT_OF_MEMORY, format("cannot allocate the self-conditioning table (%.2f GiB)",
                                          static_cast<double>(self_cond_table_bytes(type)) / (1ull << 30)));
    }
    const bool      host = ggml_backend_buffer_is_host(table.buffer);
    const size_t    row_out = ggml_row_size(out_type, hp.n_vocab);
    std::vector<uint8_t> staging(host ? 0 : row_out * hp.n_embd);
    uint8_t *       dst = host ? static_cast<uint8_t *>(table.tensor->data) : staging.data();
    const size_t    row_in = ggml_row_size(embd->type, hp.n_embd);
    const uint32_t  slice = 4096;  // vocabulary rows per task (a multiple of every block size)
    const uint32_t  n_slices = (hp.n_vocab + slice - 1) / slice;
    const unsigned  n_workers = std::max(1u, std::min<unsigned>(static_cast<unsigned>(n_threads_), n_slices));
    std::atomic<uint32_t> next{0};
    run_workers(n_workers, [&](unsigned) {
        std::vector<float> rows(static_cast<size_t>(slice) * hp.n_embd), run(slice);
        for (uint32_t s; (s = next.fetch_add(1)) < n_slices;) {
            const uint32_t v0 = s * slice, m = std::min(slice, hp.n_vocab - v0);
            for (uint32_t i = 0; i < m; ++i) {
                const uint8_t * src = rec->data + static_cast<size_t>(v0 + i) * row_in;
                if (embd->type == GGML_TYPE_F32) {
                    std::memcpy(rows.data() + static_cast<size_t>(i) * hp.n_embd, src, sizeof(float) * hp.n_embd);
                } else {
                    traits->to_float(src, rows.data() + static_cast<size_t>(i) * hp.n_embd, hp.n_embd);
                }
            }
            for (uint32_t e = 0; e < hp.n_embd; ++e) {
                for (uint32_t i = 0; i < m; ++i) {
                    run[i] = rows[static_cast<size_t>(i) * hp.n_embd + e];
                }
                uint8_t * out = dst + row_out * e + ggml_row_size(out_type, v0);
                ggml_quantize_chunk(out_type, run.data(), out, 0, 1, m, nullptr);
            }
        }
    });
    if (!host) {
        ggml_backend_tensor_set(table.tensor, staging.data(), 0, staging.size());
    }
    const Part & embd_part = *parts_[rec->part];
    if (embd_part.weights_buffer != nullptr && !ggml_backend_buffer_is_host(embd_part.weights_buffer)) {
        embd_part.file.release(rec->data, rec->n_bytes);  // the device has its own copy of the embedding
    }
    tables_.emplace_back(type, table);
    return table.tensor;
}

}  // namespace dg
