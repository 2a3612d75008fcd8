#include "gguf_model.h"

#include "devices.h"
#include "error.h"
#include "gguf_schema.h"
#include "gguf_values.h"
#include "parallel.h"
#include "tokenizer.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "gguf.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

#include <sys/stat.h>

namespace dg {

namespace {

// ---------------------------------------------------------------------------------------------
// ggml reports gguf parse errors through its log callback. While a thread parses, its error lines
// are collected so the caller gets ggml's precise reason instead of a generic failure.

thread_local std::vector<std::string> * t_log_lines = nullptr;
ggml_log_callback                       g_prev_log_cb = nullptr;
void *                                  g_prev_log_ud = nullptr;
std::once_flag                          g_log_once;

void log_callback(enum ggml_log_level level, const char * text, void * /*user_data*/) {
    if (t_log_lines != nullptr) {
        if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) {
            t_log_lines->emplace_back(text ? text : "");
        }
        return;
    }
    // ggml's chatter (debug and info, e.g. one line per repacked weight) is not the user's business;
    // warnings and errors still reach the previous logger, continuation lines with their message.
    static thread_local bool t_passing = false;
    if (level != GGML_LOG_LEVEL_CONT) {
        t_passing = level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR || std::getenv("DGEMMA_GGML_DEBUG") != nullptr;
    }
    if (t_passing && g_prev_log_cb != nullptr) {
        g_prev_log_cb(level, text, g_prev_log_ud);
    }
}

class LogCapture {
public:
    LogCapture() {
        std::call_once(g_log_once, [] {
            ggml_log_get(&g_prev_log_cb, &g_prev_log_ud);
            ggml_log_set(log_callback, nullptr);
        });
        t_log_lines = &lines_;
    }
    ~LogCapture() { t_log_lines = nullptr; }

    // First error line without ggml's "function_name: " prefix and trailing newline.
    std::string first_line() const {
        for (const std::string & raw : lines_) {
            std::string line = raw;
            while (!line.empty() && (line.back() == '\n' || line.back() == ' ')) {
                line.pop_back();
            }
            const size_t colon = line.find(": ");
            if (colon != std::string::npos && line.find(' ') > colon) {
                line = line.substr(colon + 2);
            }
            if (!line.empty()) {
                return line;
            }
        }
        return "";
    }

private:
    std::vector<std::string> lines_;
};

// ---------------------------------------------------------------------------------------------
// Typed access to gguf metadata that never trips ggml's type assertions.

std::string type_label(const gguf_context * g, int64_t id) {
    const enum gguf_type t = gguf_get_kv_type(g, id);
    if (t == GGUF_TYPE_ARRAY) {
        return format("array of %s", gguf_type_name(gguf_get_arr_type(g, id)));
    }
    return gguf_type_name(t);
}

bool has_type(const gguf_context * g, int64_t id, schema::KeyType want) {
    const enum gguf_type t = gguf_get_kv_type(g, id);
    const bool arr = t == GGUF_TYPE_ARRAY;
    const enum gguf_type at = arr ? gguf_get_arr_type(g, id) : GGUF_TYPE_COUNT;
    switch (want) {
        case schema::KeyType::UINT:          return is_integer(t);
        case schema::KeyType::FLOAT:         return is_float(t);
        case schema::KeyType::BOOL:          return t == GGUF_TYPE_BOOL;
        case schema::KeyType::STRING:        return t == GGUF_TYPE_STRING;
        case schema::KeyType::UINT_OR_ARRAY: return is_integer(t) || (arr && is_integer(at));
        case schema::KeyType::BOOL_ARRAY:    return arr && at == GGUF_TYPE_BOOL;
        case schema::KeyType::STRING_ARRAY:  return arr && at == GGUF_TYPE_STRING;
        case schema::KeyType::INT_ARRAY:     return arr && is_integer(at);
        case schema::KeyType::FLOAT_ARRAY:   return arr && is_float(at);
    }
    return false;
}

const char * expected_label(schema::KeyType want) {
    switch (want) {
        case schema::KeyType::UINT:          return "an unsigned integer";
        case schema::KeyType::FLOAT:         return "a float";
        case schema::KeyType::BOOL:          return "a bool";
        case schema::KeyType::STRING:        return "a string";
        case schema::KeyType::UINT_OR_ARRAY: return "an integer or an array of integers";
        case schema::KeyType::BOOL_ARRAY:    return "an array of bool";
        case schema::KeyType::STRING_ARRAY:  return "an array of strings";
        case schema::KeyType::INT_ARRAY:     return "an array of integers";
        case schema::KeyType::FLOAT_ARRAY:   return "an array of floats";
    }
    return "?";
}

std::string render_scalar(const gguf_context * g, int64_t id, enum gguf_type t, size_t i, bool quote) {
    if (is_integer(t)) {
        if (t == GGUF_TYPE_UINT64) {
            const bool arr = gguf_get_kv_type(g, id) == GGUF_TYPE_ARRAY;
            const void * p = arr ? gguf_get_arr_data(g, id) : gguf_get_val_data(g, id);
            return format("%llu", static_cast<unsigned long long>(static_cast<const uint64_t *>(p)[i]));
        }
        return format("%lld", static_cast<long long>(integer_at(g, id, i)));
    }
    if (is_float(t)) {
        return format("%.9g", float_at(g, id, i));
    }
    if (t == GGUF_TYPE_BOOL) {
        const bool arr = gguf_get_kv_type(g, id) == GGUF_TYPE_ARRAY;
        const void * p = arr ? gguf_get_arr_data(g, id) : gguf_get_val_data(g, id);
        return static_cast<const int8_t *>(p)[i] ? "true" : "false";
    }
    if (t == GGUF_TYPE_STRING) {
        const bool arr = gguf_get_kv_type(g, id) == GGUF_TYPE_ARRAY;
        std::string s = arr ? gguf_get_arr_str(g, id, i) : gguf_get_val_str(g, id);
        return quote ? "'" + s + "'" : s;
    }
    return "?";
}

std::string render_value(const gguf_context * g, int64_t id) {
    constexpr size_t kMaxItems = 8;
    const enum gguf_type t = gguf_get_kv_type(g, id);
    if (t != GGUF_TYPE_ARRAY) {
        return render_scalar(g, id, t, 0, false);
    }
    const enum gguf_type at = gguf_get_arr_type(g, id);
    const size_t n = gguf_get_arr_n(g, id);
    if (at == GGUF_TYPE_ARRAY) {
        return format("[...] (%zu nested arrays)", n);
    }
    std::string out = "[";
    for (size_t i = 0; i < n && i < kMaxItems; ++i) {
        out += (i ? ", " : "") + render_scalar(g, id, at, i, true);
    }
    out += n > kMaxItems ? ", ...]" : "]";
    out += format(" (%zu items)", n);
    return out;
}

std::string shape_string(const int64_t * ne, int n) {
    std::string out = "[";
    for (int i = 0; i < n; ++i) {
        out += format(i ? ", %lld" : "%lld", static_cast<long long>(ne[i]));
    }
    return out + "]";
}

bool is_float_type(int32_t type) {
    return type == GGML_TYPE_F32 || type == GGML_TYPE_F16 || type == GGML_TYPE_BF16;
}

// ggml's gguf reader asserts (aborts the process) on an empty key and when 'general.alignment' is
// not a scalar u32. Walk the metadata ourselves first, bounds-checked, and refuse such a file with a
// message. Anything else malformed is left for ggml's reader to report.
std::string prescan_metadata(const uint8_t * data, uint64_t size) {
    uint64_t pos = 0;
    auto take = [&](uint64_t n) -> const uint8_t * {
        if (n > size - pos) {
            return nullptr;
        }
        const uint8_t * p = data + pos;
        pos += n;
        return p;
    };
    auto read_u32 = [&](uint32_t & v) { const uint8_t * p = take(4); if (p) std::memcpy(&v, p, 4); return p != nullptr; };
    auto read_u64 = [&](uint64_t & v) { const uint8_t * p = take(8); if (p) std::memcpy(&v, p, 8); return p != nullptr; };
    auto scalar_size = [](uint32_t type) -> uint64_t {
        switch (type) {
            case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: return 1;
            case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: return 2;
            case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: return 4;
            case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: case GGUF_TYPE_FLOAT64: return 8;
            default: return 0;
        }
    };
    auto skip_string = [&]() { uint64_t n = 0; return read_u64(n) && take(n) != nullptr; };

    uint32_t magic = 0, version = 0;
    uint64_t n_tensors = 0, n_kv = 0;
    if (!read_u32(magic) || !read_u32(version) || (version != 2 && version != 3) || !read_u64(n_tensors) ||
        !read_u64(n_kv)) {
        return "";
    }
    for (uint64_t i = 0; i < n_kv; ++i) {
        uint64_t key_len = 0;
        if (!read_u64(key_len)) {
            return "";
        }
        const uint8_t * key = take(key_len);
        uint32_t type = 0;
        if (key == nullptr || !read_u32(type)) {
            return "";
        }
        if (key_len == 0) {
            return format("metadata entry %llu has an empty key", static_cast<unsigned long long>(i));
        }
        const bool is_alignment = key_len == 17 && std::memcmp(key, "general.alignment", 17) == 0;
        if (is_alignment && type != GGUF_TYPE_UINT32) {
            return format("key 'general.alignment' has type %s, expected u32",
                          type < GGUF_TYPE_COUNT ? gguf_type_name(static_cast<gguf_type>(type)) : "invalid");
        }
        if (type == GGUF_TYPE_STRING) {
            if (!skip_string()) return "";
        } else if (type == GGUF_TYPE_ARRAY) {
            uint32_t elem = 0;
            uint64_t n = 0;
            if (!read_u32(elem) || !read_u64(n)) return "";
            if (elem == GGUF_TYPE_STRING) {
                for (uint64_t j = 0; j < n; ++j) {
                    if (!skip_string()) return "";
                }
            } else {
                const uint64_t es = scalar_size(elem);
                if (es == 0 || n > (size - pos) / es || take(n * es) == nullptr) return "";
            }
        } else {
            const uint64_t es = scalar_size(type);
            if (es == 0 || take(es) == nullptr) return "";
        }
    }
    // Tensor infos: ggml divides by the dimensions while checking them, so a zero would crash it.
    for (uint64_t i = 0; i < n_tensors; ++i) {
        uint64_t name_len = 0;
        uint32_t n_dims = 0;
        if (!read_u64(name_len)) return "";
        const uint8_t * name = take(name_len);
        if (name == nullptr || !read_u32(n_dims) || n_dims > 4) return "";
        for (uint32_t d = 0; d < n_dims; ++d) {
            uint64_t ne = 0;
            if (!read_u64(ne)) return "";
            if (ne == 0) {
                const std::string tensor(reinterpret_cast<const char *>(name), static_cast<size_t>(std::min<uint64_t>(name_len, 64)));
                return format("tensor '%s' has a zero-sized dimension", tensor.c_str());
            }
        }
        uint32_t type = 0;
        uint64_t offset = 0;
        if (!read_u32(type) || !read_u64(offset)) return "";
    }
    return "";
}

}  // namespace

// ---------------------------------------------------------------------------------------------

GgufModel::Part::~Part() {
    if (weights_buffer != nullptr) {
        ggml_backend_buffer_free(weights_buffer);
    }
    if (meta_ctx != nullptr) {
        ggml_free(meta_ctx);
    }
    if (gguf != nullptr) {
        gguf_free(gguf);
    }
}

GgufModel::~GgufModel() {
    for (auto & [type, t] : tables_) {
        ggml_backend_buffer_free(t.buffer);
        ggml_free(t.ctx);
    }
    if (repack_buffer_ != nullptr) {
        ggml_backend_buffer_free(repack_buffer_);
    }
}

std::unique_ptr<GgufModel> GgufModel::load(const std::string & path, const dg_model_params & params) {
    std::unique_ptr<GgufModel> model(new GgufModel());
    model->open_parts(path, params.use_mmap);
    model->read_hparams();
    model->validate_tensors();
    model->weights_ = resolve_weights(*model);

    ggml_backend_dev_t dev = resolve_device(params.device != nullptr ? params.device : "auto");
    model->device_      = dev;
    model->device_name_ = ggml_backend_dev_name(dev);
    int32_t n_threads = params.n_threads;
    if (n_threads <= 0) {
        n_threads = default_thread_count();
    }
    model->n_threads_ = n_threads;
    model->repack_    = params.repack;
    return model;
}

const Tokenizer & GgufModel::tokenizer() const {
    std::call_once(tokenizer_once_, [this] { tokenizer_ = std::make_unique<Tokenizer>(*this); });
    return *tokenizer_;
}

ggml_tensor * GgufModel::weight(const std::string & name) const {
    const auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : tensor_meta_[it->second];
}

uint64_t GgufModel::file_size() const {
    uint64_t total = 0;
    for (const auto & part : parts_) {
        total += part->file.size();
    }
    return total;
}

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

const TensorRecord * GgufModel::find_tensor(const std::string & name) const {
    const auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const MetaRecord * GgufModel::find_meta(const std::string & key) const {
    const auto it = meta_index_.find(key);
    return it == meta_index_.end() ? nullptr : &meta_[it->second];
}

namespace {

// llama.cpp's gguf-split keys: every part has all three (its 0-based index, the number of parts,
// the tensors of all the parts together).
constexpr const char * kSplitNo      = "split.no";
constexpr const char * kSplitCount   = "split.count";
constexpr const char * kSplitTensors = "split.tensors.count";

struct SplitKeys {
    bool     present   = false;
    uint32_t no        = 0;
    uint32_t count     = 0;
    int64_t  n_tensors = 0;
};

// The split.* keys of a file, type-checked; `where` names the file in messages.
SplitKeys read_split_keys(const gguf_context * g, const std::string & where) {
    const char *    names[3] = {kSplitNo, kSplitCount, kSplitTensors};
    const gguf_type types[3] = {GGUF_TYPE_UINT16, GGUF_TYPE_UINT16, GGUF_TYPE_INT32};
    int64_t         ids[3];
    int             n_found = 0;
    for (int k = 0; k < 3; ++k) {
        ids[k] = gguf_find_key(g, names[k]);
        if (ids[k] < 0) {
            continue;
        }
        ++n_found;
        if (gguf_get_kv_type(g, ids[k]) != types[k]) {
            fail(DG_ERR_FORMAT, format("%s: key '%s' has type %s, expected %s", where.c_str(), names[k],
                                       type_label(g, ids[k]).c_str(), gguf_type_name(types[k])));
        }
    }
    SplitKeys out;
    if (n_found == 0) {
        return out;
    }
    for (int k = 0; k < 3; ++k) {
        if (ids[k] < 0) {
            fail(DG_ERR_FORMAT, format("%s: has split.* keys but no '%s'", where.c_str(), names[k]));
        }
    }
    out.present   = true;
    out.no        = gguf_get_val_u16(g, ids[0]);
    out.count     = gguf_get_val_u16(g, ids[1]);
    out.n_tensors = gguf_get_val_i32(g, ids[2]);
    if (out.count == 0) {
        fail(DG_ERR_FORMAT, format("%s: split.count is 0", where.c_str()));
    }
    if (out.no >= out.count) {
        fail(DG_ERR_FORMAT, format("%s: split.no is %u but split.count is %u (split.no counts from 0)", where.c_str(),
                                   out.no, out.count));
    }
    if (out.n_tensors < 0) {
        fail(DG_ERR_FORMAT, format("%s: split.tensors.count is %lld", where.c_str(), static_cast<long long>(out.n_tensors)));
    }
    return out;
}

// "PREFIX-00002-of-00003.gguf" -> PREFIX, 2, 3 (gguf-split's "%s-%05d-of-%05d.gguf").
bool parse_split_name(const std::string & path, std::string * prefix, uint32_t * no, uint32_t * count) {
    static const char kTail[] = "-NNNNN-of-NNNNN.gguf";
    const size_t n = sizeof(kTail) - 1;
    if (path.size() < n) {
        return false;
    }
    const char * tail = path.c_str() + path.size() - n;
    uint32_t     a = 0, b = 0;
    for (size_t i = 0; i < n; ++i) {
        const char c = tail[i];
        if (kTail[i] == 'N') {
            if (c < '0' || c > '9') {
                return false;
            }
            uint32_t & v = i < 6 ? a : b;
            v = v * 10 + static_cast<uint32_t>(c - '0');
        } else if (c != kTail[i]) {
            return false;
        }
    }
    *prefix = path.substr(0, path.size() - n);
    *no     = a;
    *count  = b;
    return true;
}

std::string split_name(const std::string & prefix, uint32_t no, uint32_t count) {
    return format("%s-%05u-of-%05u.gguf", prefix.c_str(), no, count);
}

}  // namespace

void GgufModel::parse_part(Part & part, size_t index, size_t n_parts) {
    const std::string where = n_parts > 1 ? format(" (part %zu of %zu)", index + 1, n_parts) : std::string();
    static const char kMagic[4] = {'G', 'G', 'U', 'F'};
    const MappedFile & file = part.file;
    if (file.size() < sizeof(kMagic) || std::memcmp(file.data(), kMagic, sizeof(kMagic)) != 0) {
        fail(DG_ERR_FORMAT, format("not a GGUF file: '%s'%s does not start with the GGUF magic", part.path.c_str(), where.c_str()));
    }

    const std::string header_problem = prescan_metadata(file.data(), file.size());
    if (!header_problem.empty()) {
        fail(DG_ERR_FORMAT, format("invalid GGUF file '%s'%s: %s", part.path.c_str(), where.c_str(), header_problem.c_str()));
    }
    LogCapture capture;
    gguf_init_params gp{};
    gp.no_alloc = true;
    gp.ctx      = &part.meta_ctx;
    part.gguf = gguf_init_from_buffer(file.data(), static_cast<size_t>(file.size()), gp);
    if (part.gguf == nullptr) {
        std::string why = capture.first_line();
        if (why.empty()) {
            why = "unreadable header";
        }
        fail(DG_ERR_FORMAT, format("invalid GGUF file '%s'%s: %s", part.path.c_str(), where.c_str(), why.c_str()));
    }
}

void GgufModel::open_parts(const std::string & path, bool use_mmap) {
    parts_.push_back(std::make_unique<Part>());
    Part & first = *parts_[0];
    first.path = path;
    first.file.open(path, use_mmap);
    parse_part(first, 0, 1);
    gguf_ = first.gguf;

    const int64_t n_kv = gguf_get_n_kv(gguf_);
    meta_.reserve(static_cast<size_t>(n_kv));
    for (int64_t id = 0; id < n_kv; ++id) {
        meta_index_[gguf_get_key(gguf_, id)] = meta_.size();
        meta_.push_back({gguf_get_key(gguf_, id), render_value(gguf_, id)});
    }

    // A split model: the path must be its first part, named as gguf-split names the parts.
    const SplitKeys split = read_split_keys(gguf_, format("'%s'", path.c_str()));
    std::string     prefix;
    uint32_t        name_no = 0, name_count = 0;
    const bool      named = parse_split_name(path, &prefix, &name_no, &name_count);
    if (split.present) {
        if (split.no != 0) {
            const std::string first_name = named ? format("'%s'", split_name(prefix, 1, split.count).c_str())
                                                 : std::string("the file with split.no 0");
            fail(DG_ERR_FORMAT, format("'%s' is part %u of a model split into %u parts: load the model from its first part, %s",
                                       path.c_str(), split.no + 1, split.count, first_name.c_str()));
        }
        if (named && (name_no != 1 || name_count != split.count)) {
            fail(DG_ERR_FORMAT, format("'%s' is part 1 of %u (split.no 0, split.count %u) but its name says part %u of %u",
                                       path.c_str(), split.count, split.count, name_no, name_count));
        }
        if (!named && split.count > 1) {
            fail(DG_ERR_FORMAT, format("'%s' is the first part of a model split into %u parts, but its name does not end in "
                                       "'-00001-of-%05u.gguf', so the other parts cannot be found (keep the names "
                                       "llama.cpp's gguf-split gives the parts)", path.c_str(), split.count, split.count));
        }
    }

    const int64_t arch_id = gguf_find_key(gguf_, "general.architecture");
    if (arch_id < 0) {
        fail(DG_ERR_FORMAT, "missing required key 'general.architecture'");
    }
    if (gguf_get_kv_type(gguf_, arch_id) != GGUF_TYPE_STRING) {
        fail(DG_ERR_FORMAT, format("key 'general.architecture' has type %s, expected a string",
                                   type_label(gguf_, arch_id).c_str()));
    }
    const std::string arch = gguf_get_val_str(gguf_, arch_id);
    if (arch != schema::kArchitecture) {
        fail(DG_ERR_FORMAT, format("unsupported architecture '%s': this runtime runs '%s' GGUF files",
                                   arch.c_str(), schema::kArchitecture));
    }

    const size_t n_parts = split.present ? split.count : 1;
    for (uint32_t ip = 1; ip < n_parts; ++ip) {
        parts_.push_back(std::make_unique<Part>());
        Part & part = *parts_.back();
        part.path = split_name(prefix, ip + 1, static_cast<uint32_t>(n_parts));
        struct stat st {};
        if (::stat(part.path.c_str(), &st) != 0 && errno == ENOENT) {
            fail(DG_ERR_IO, format("model split into %zu parts: part %u '%s' not found", n_parts, ip + 1, part.path.c_str()));
        }
        part.file.open(part.path, use_mmap);
        parse_part(part, ip, n_parts);
        const std::string where = format("part %u '%s'", ip + 1, part.path.c_str());
        const SplitKeys   keys  = read_split_keys(part.gguf, where);
        if (!keys.present) {
            fail(DG_ERR_FORMAT, format("%s has no split.* keys: it is not a part of the split model '%s'", where.c_str(),
                                       path.c_str()));
        }
        if (keys.count != split.count) {
            fail(DG_ERR_FORMAT, format("%s: split.count is %u but the first part's is %u", where.c_str(), keys.count,
                                       split.count));
        }
        if (keys.no != ip) {
            fail(DG_ERR_FORMAT, format("%s: split.no is %u, expected %u (it is the file of part %u)", where.c_str(), keys.no,
                                       ip, keys.no + 1));
        }
        if (keys.n_tensors != split.n_tensors) {
            fail(DG_ERR_FORMAT, format("%s: split.tensors.count is %lld but the first part's is %lld", where.c_str(),
                                       static_cast<long long>(keys.n_tensors), static_cast<long long>(split.n_tensors)));
        }
    }

    // Tensor records, and the truncation check: the data of every tensor must lie inside its file.
    for (uint32_t ip = 0; ip < parts_.size(); ++ip) {
        const Part &   part        = *parts_[ip];
        const uint64_t data_offset = gguf_get_data_offset(part.gguf);
        const int64_t  n_tensors   = gguf_get_n_tensors(part.gguf);
        const std::string where    = n_parts > 1 ? format("part %u '%s'", ip + 1, part.path.c_str()) : std::string();
        uint64_t       data_end    = data_offset;
        for (int64_t i = 0; i < n_tensors; ++i) {
            const char *  name = gguf_get_tensor_name(part.gguf, i);
            ggml_tensor * t    = ggml_get_tensor(part.meta_ctx, name);
            if (t == nullptr) {
                fail(DG_ERR_FORMAT, format("invalid GGUF file '%s': tensor '%s' has no shape", part.path.c_str(), name));
            }
            TensorRecord rec;
            rec.name        = name;
            rec.type        = static_cast<int32_t>(gguf_get_tensor_type(part.gguf, i));
            rec.n_dims      = ggml_n_dims(t);
            for (int d = 0; d < 4; ++d) {
                rec.ne[d] = t->ne[d];
            }
            rec.n_bytes     = ggml_nbytes(t);
            rec.file_offset = data_offset + gguf_get_tensor_offset(part.gguf, i);
            rec.part        = ip;
            data_end        = std::max<uint64_t>(data_end, rec.file_offset + rec.n_bytes);
            const auto [it, inserted] = tensor_index_.emplace(rec.name, tensors_.size());
            if (!inserted) {  // ggml's reader refuses a name twice in one file; across parts it is ours to catch
                const TensorRecord & other = tensors_[it->second];
                fail(DG_ERR_FORMAT, format("tensor '%s' is in part %u '%s' and again in part %u '%s'", name, other.part + 1,
                                           parts_[other.part]->path.c_str(), ip + 1, part.path.c_str()));
            }
            tensors_.push_back(std::move(rec));
            tensor_meta_.push_back(t);
        }
        if ((n_tensors > 0 || n_parts == 1) && data_end > part.file.size()) {  // a split's part may hold no tensors
            fail(DG_ERR_FORMAT, format("file truncated: %s%stensor data ends at byte %llu but file has %llu", where.c_str(),
                                       where.empty() ? "" : ": ", static_cast<unsigned long long>(data_end),
                                       static_cast<unsigned long long>(part.file.size())));
        }
    }
    if (split.present && static_cast<int64_t>(tensors_.size()) != split.n_tensors) {
        fail(DG_ERR_FORMAT, format("split.tensors.count is %lld but the %zu parts of '%s' hold %zu tensors",
                                   static_cast<long long>(split.n_tensors), n_parts, path.c_str(), tensors_.size()));
    }
    for (TensorRecord & rec : tensors_) {
        rec.data = parts_[rec.part]->file.data() + rec.file_offset;
    }
}

void GgufModel::read_hparams() {
    const gguf_context * g = gguf_;

    for (size_t k = 0; k < schema::kNumRequiredKeys; ++k) {
        const schema::KeySpec & spec = schema::kRequiredKeys[k];
        const int64_t id = gguf_find_key(g, spec.name);
        if (id < 0) {
            fail(DG_ERR_FORMAT, format("missing required key '%s'", spec.name));
        }
        if (!has_type(g, id, spec.type)) {
            fail(DG_ERR_FORMAT, format("key '%s' has type %s, expected %s", spec.name,
                                       type_label(g, id).c_str(), expected_label(spec.type)));
        }
    }
    for (size_t k = 0; k < schema::kNumOptionalKeys; ++k) {
        const schema::KeySpec & spec = schema::kOptionalKeys[k];
        const int64_t id = gguf_find_key(g, spec.name);
        if (id >= 0 && !has_type(g, id, spec.type)) {
            fail(DG_ERR_FORMAT, format("key '%s' has type %s, expected %s", spec.name,
                                       type_label(g, id).c_str(), expected_label(spec.type)));
        }
    }

    // Integer hyper-parameters must be positive and fit in 32 bits.
    auto u32 = [g](const char * key, bool allow_zero = false) -> uint32_t {
        const int64_t id = gguf_find_key(g, key);
        const int64_t v  = integer_at(g, id, 0);
        if (v < (allow_zero ? 0 : 1) || v > static_cast<int64_t>(UINT32_MAX)) {
            fail(DG_ERR_FORMAT, format("key '%s' has invalid value %lld", key, static_cast<long long>(v)));
        }
        return static_cast<uint32_t>(v);
    };
    auto f32 = [g](const char * key) -> float {
        const double v = float_at(g, gguf_find_key(g, key), 0);
        if (!std::isfinite(v)) {
            fail(DG_ERR_FORMAT, format("key '%s' is not a finite number", key));
        }
        return static_cast<float>(v);
    };
    auto has = [g](const char * key) { return gguf_find_key(g, key) >= 0; };

    dg_hparams & hp = hparams_;
    hp.n_ctx_train   = u32("diffusion-gemma.context_length");
    hp.n_embd        = u32("diffusion-gemma.embedding_length");
    hp.n_layer       = u32("diffusion-gemma.block_count");
    hp.n_head        = u32("diffusion-gemma.attention.head_count");
    hp.n_ff          = u32("diffusion-gemma.feed_forward_length");
    hp.n_ff_exp      = u32("diffusion-gemma.expert_feed_forward_length");
    hp.n_expert      = u32("diffusion-gemma.expert_count");
    hp.n_expert_used = u32("diffusion-gemma.expert_used_count");
    hp.head_dim      = u32("diffusion-gemma.attention.key_length");
    hp.head_dim_swa  = u32("diffusion-gemma.attention.key_length_swa");
    hp.sliding_window = u32("diffusion-gemma.attention.sliding_window");
    hp.canvas_length = u32("diffusion.canvas_length");
    hp.n_rot_swa     = u32("diffusion-gemma.rope.dimension_count_swa");
    hp.n_rot         = has("diffusion-gemma.rope.dimension_count") ? u32("diffusion-gemma.rope.dimension_count")
                                                                   : hp.head_dim;
    hp.rope_freq_base     = f32("diffusion-gemma.rope.freq_base");
    hp.rope_freq_base_swa = has("diffusion-gemma.rope.freq_base_swa") ? f32("diffusion-gemma.rope.freq_base_swa")
                                                                      : 10000.0f;
    hp.rms_norm_eps        = f32("diffusion-gemma.attention.layer_norm_rms_epsilon");
    hp.final_logit_softcap = f32("diffusion-gemma.final_logit_softcapping");

    if (hp.n_layer > 4096) {
        fail(DG_ERR_FORMAT, format("key 'diffusion-gemma.block_count' has implausible value %u", hp.n_layer));
    }
    if (hp.n_expert_used > hp.n_expert) {
        fail(DG_ERR_FORMAT, format("expert_used_count (%u) exceeds expert_count (%u)", hp.n_expert_used, hp.n_expert));
    }
    if (u32("diffusion-gemma.attention.value_length") != hp.head_dim) {
        fail(DG_ERR_FORMAT, "attention.value_length must equal attention.key_length");
    }
    if (u32("diffusion-gemma.attention.value_length_swa") != hp.head_dim_swa) {
        fail(DG_ERR_FORMAT, "attention.value_length_swa must equal attention.key_length_swa");
    }
    if (hp.n_rot % 2 != 0 || hp.n_rot > hp.head_dim) {
        fail(DG_ERR_FORMAT, format("rope.dimension_count (%u) must be even and at most key_length (%u)", hp.n_rot, hp.head_dim));
    }
    if (hp.n_rot_swa % 2 != 0 || hp.n_rot_swa > hp.head_dim_swa) {
        fail(DG_ERR_FORMAT, format("rope.dimension_count_swa (%u) must be even and at most key_length_swa (%u)",
                                   hp.n_rot_swa, hp.head_dim_swa));
    }
    if (!(hp.rms_norm_eps > 0.0f)) {
        fail(DG_ERR_FORMAT, "attention.layer_norm_rms_epsilon must be positive");
    }
    if (hp.final_logit_softcap < 0.0f) {
        fail(DG_ERR_FORMAT, "final_logit_softcapping must not be negative");
    }

    // Per-layer layout: sliding pattern and KV head counts.
    const int64_t pattern_id = gguf_find_key(g, "diffusion-gemma.attention.sliding_window_pattern");
    const size_t  pattern_n  = gguf_get_arr_n(g, pattern_id);
    if (pattern_n != hp.n_layer) {
        fail(DG_ERR_FORMAT, format("attention.sliding_window_pattern has %zu entries, expected block_count = %u",
                                   pattern_n, hp.n_layer));
    }
    const int8_t * pattern = static_cast<const int8_t *>(gguf_get_arr_data(g, pattern_id));
    const int64_t  kv_id   = gguf_find_key(g, "diffusion-gemma.attention.head_count_kv");
    const bool     kv_arr  = gguf_get_kv_type(g, kv_id) == GGUF_TYPE_ARRAY;
    if (kv_arr && gguf_get_arr_n(g, kv_id) != hp.n_layer) {
        fail(DG_ERR_FORMAT, format("attention.head_count_kv has %zu entries, expected block_count = %u",
                                   gguf_get_arr_n(g, kv_id), hp.n_layer));
    }
    layers_.resize(hp.n_layer);
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        LayerLayout & layer = layers_[il];
        layer.is_sliding = pattern[il] != 0;
        layer.head_dim   = layer.is_sliding ? hp.head_dim_swa : hp.head_dim;
        const int64_t n_kv = integer_at(g, kv_id, kv_arr ? il : 0);
        if (n_kv < 1 || n_kv > hp.n_head || hp.n_head % n_kv != 0) {
            fail(DG_ERR_FORMAT, format("layer %u: head_count_kv = %lld must divide head_count = %u", il,
                                       static_cast<long long>(n_kv), hp.n_head));
        }
        layer.n_head_kv = static_cast<uint32_t>(n_kv);
    }

    // Tokenizer.
    const int64_t tok_model_id = gguf_find_key(g, "tokenizer.ggml.model");
    const std::string tok_model = gguf_get_val_str(g, tok_model_id);
    if (tok_model != schema::kTokenizerModel) {
        fail(DG_ERR_FORMAT, format("unsupported tokenizer.ggml.model '%s' (expected '%s')", tok_model.c_str(),
                                   schema::kTokenizerModel));
    }
    const size_t n_vocab = gguf_get_arr_n(g, gguf_find_key(g, "tokenizer.ggml.tokens"));
    if (n_vocab == 0 || n_vocab > UINT32_MAX) {
        fail(DG_ERR_FORMAT, format("tokenizer.ggml.tokens has %zu entries", n_vocab));
    }
    hp.n_vocab = static_cast<uint32_t>(n_vocab);
    {
        const int64_t tokens_id = gguf_find_key(g, "tokenizer.ggml.tokens");
        const int64_t eos_id    = gguf_find_key(g, "tokenizer.ggml.eos_token_id");
        if (eos_id >= 0 && has_type(g, eos_id, schema::KeyType::UINT) && integer_at(g, eos_id, 0) < static_cast<int64_t>(n_vocab)) {
            eog_ids_.push_back(static_cast<int32_t>(integer_at(g, eos_id, 0)));
        }
        for (size_t i = 0; i < n_vocab; ++i) {
            const char * piece = gguf_get_arr_str(g, tokens_id, i);
            if (std::strcmp(piece, "<eos>") == 0 || std::strcmp(piece, "<turn|>") == 0 || std::strcmp(piece, "<|tool_response>") == 0) {
                if (std::find(eog_ids_.begin(), eog_ids_.end(), static_cast<int32_t>(i)) == eog_ids_.end()) {
                    eog_ids_.push_back(static_cast<int32_t>(i));
                }
            }
        }
    }
    for (const char * key : {"tokenizer.ggml.scores", "tokenizer.ggml.token_type"}) {
        const int64_t id = gguf_find_key(g, key);
        if (id >= 0 && gguf_get_arr_n(g, id) != n_vocab) {
            fail(DG_ERR_FORMAT, format("%s has %zu entries but the vocabulary has %zu tokens", key,
                                       gguf_get_arr_n(g, id), n_vocab));
        }
    }
}

void GgufModel::validate_tensors() {
    const dg_hparams & hp = hparams_;

    auto resolve = [&hp](schema::Dim d, const LayerLayout * layer) -> int64_t {
        using schema::Dim;
        switch (d) {
            case Dim::NONE:       return 1;
            case Dim::ONE:        return 1;
            case Dim::EMBD:       return hp.n_embd;
            case Dim::VOCAB:      return hp.n_vocab;
            case Dim::FF:         return hp.n_ff;
            case Dim::FF_EXP:     return hp.n_ff_exp;
            case Dim::FF_EXP_X2:  return 2 * static_cast<int64_t>(hp.n_ff_exp);
            case Dim::EXPERT:     return hp.n_expert;
            case Dim::HEAD_DIM:   return layer->head_dim;
            case Dim::Q_WIDTH:    return static_cast<int64_t>(hp.n_head) * layer->head_dim;
            case Dim::KV_WIDTH:   return static_cast<int64_t>(layer->n_head_kv) * layer->head_dim;
            case Dim::ROPE_PAIRS: return hp.n_rot / 2;
        }
        return 0;
    };

    // Checks shape and type of a present tensor; returns false when it is absent.
    auto check = [&](const std::string & name, const schema::TensorSpec & spec, const LayerLayout * layer) -> bool {
        const TensorRecord * t = find_tensor(name);
        if (t == nullptr) {
            return false;
        }
        int64_t want[4] = {1, 1, 1, 1};
        int     n_want  = 0;
        for (int d = 0; d < 3; ++d) {
            if (spec.dims[d] != schema::Dim::NONE) {
                want[d] = resolve(spec.dims[d], layer);
                n_want  = d + 1;
            }
        }
        if (!std::equal(want, want + 4, t->ne)) {
            fail(DG_ERR_FORMAT, format("tensor '%s' has shape %s, expected %s", name.c_str(),
                                       shape_string(t->ne, std::max(t->n_dims, 1)).c_str(),
                                       shape_string(want, n_want).c_str()));
        }
        if (spec.kind == schema::Kind::VECTOR && !is_float_type(t->type)) {
            fail(DG_ERR_UNSUPPORTED, format("unsupported tensor type: '%s' is %s; norms, scales and rope "
                                            "frequencies must be f32, f16 or bf16",
                                            name.c_str(), ggml_type_name(static_cast<ggml_type>(t->type))));
        }
        return true;
    };
    auto missing = [](const std::string & name) { fail(DG_ERR_FORMAT, format("missing tensor '%s'", name.c_str())); };

    // Global tensors.
    int         self_cond_matrices = 0;
    bool        self_cond_norm     = false;
    std::string first_missing_self_cond;
    for (size_t k = 0; k < schema::kNumGlobalTensors; ++k) {
        const schema::TensorSpec & spec = schema::kGlobalTensors[k];
        const bool present = check(spec.name, spec, nullptr);
        switch (spec.need) {
            case schema::Need::REQUIRED:
                if (!present) missing(spec.name);
                break;
            case schema::Need::SELF_COND:
                self_cond_matrices += present ? 1 : 0;
                if (!present && first_missing_self_cond.empty()) first_missing_self_cond = spec.name;
                break;
            case schema::Need::SELF_COND_NORM:
                self_cond_norm = self_cond_norm || present;
                break;
            default:
                break;
        }
    }
    hparams_.has_output_weight = find_tensor("output.weight") != nullptr;
    if (self_cond_matrices > 0 || self_cond_norm) {
        if (!self_cond_norm) {
            fail(DG_ERR_FORMAT, "incomplete self-conditioning tensors: missing tensor 'self_cond_pre_norm.weight' "
                                "(or 'self_cond_norm.weight')");
        }
        if (!first_missing_self_cond.empty()) {
            fail(DG_ERR_FORMAT, format("incomplete self-conditioning tensors: missing tensor '%s'",
                                       first_missing_self_cond.c_str()));
        }
        hparams_.has_self_conditioning = true;
    }

    // Per-layer tensors.
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        LayerLayout & layer  = layers_[il];
        const std::string prefix = format("blk.%u.", il);
        bool fused = false;
        int  split = 0;
        for (size_t k = 0; k < schema::kNumLayerTensors; ++k) {
            const schema::TensorSpec & spec = schema::kLayerTensors[k];
            const std::string name = prefix + spec.name;
            const bool present = check(name, spec, &layer);
            switch (spec.need) {
                case schema::Need::REQUIRED:
                    if (!present) missing(name);
                    break;
                case schema::Need::EXPERTS_FUSED:
                    fused = present;
                    break;
                case schema::Need::EXPERTS_SPLIT:
                    split += present ? 1 : 0;
                    break;
                default:
                    break;
            }
        }
        layer.has_v_proj = find_tensor(prefix + "attn_v.weight") != nullptr;
        if (!fused && split != 2) {
            fail(DG_ERR_FORMAT, format("missing tensor '%sffn_gate_up_exps.weight' (or both '%sffn_gate_exps.weight' "
                                       "and '%sffn_up_exps.weight')", prefix.c_str(), prefix.c_str(), prefix.c_str()));
        }
    }
}

}  // namespace dg

namespace dg {

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
