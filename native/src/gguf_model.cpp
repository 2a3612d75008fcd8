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
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

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

GgufModel::~GgufModel() {
    for (auto & [type, t] : tables_) {
        ggml_backend_buffer_free(t.buffer);
        ggml_free(t.ctx);
    }
    if (repack_buffer_ != nullptr) {
        ggml_backend_buffer_free(repack_buffer_);
    }
    if (weights_buffer_ != nullptr) {
        ggml_backend_buffer_free(weights_buffer_);
    }
    if (meta_ctx_ != nullptr) {
        ggml_free(meta_ctx_);
    }
    if (gguf_ != nullptr) {
        gguf_free(gguf_);
    }
}

std::unique_ptr<GgufModel> GgufModel::load(const std::string & path, const dg_model_params & params) {
    std::unique_ptr<GgufModel> model(new GgufModel());
    model->file_.open(path, params.use_mmap);
    model->parse(path);
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
    return find_tensor(name) != nullptr ? ggml_get_tensor(meta_ctx_, name.c_str()) : nullptr;
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
    for (const TensorRecord & t : tensors_) {
        ggml_tensor * w = ggml_get_tensor(meta_ctx_, t.name.c_str());
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
                        ggml_tensor * w = ggml_get_tensor(meta_ctx_, t->name.c_str());
                        if (ggml_tallocr_alloc(&alloc, w) != GGML_STATUS_SUCCESS) {
                            fail(DG_ERR_BACKEND, format("cannot place tensor '%s' in %s", t->name.c_str(), ggml_backend_buft_name(buft)));
                        }
                        ggml_backend_tensor_set(w, t->data, 0, t->n_bytes);  // re-lays out the blocks
                        file_.release(t->data, t->n_bytes);  // the copy is what runs: the mapped pages can go
                    }
                    ggml_backend_buffer_set_usage(repack_buffer_, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
                }
            }
        }
        auto is_repacked = [this](const TensorRecord & t) {
            return repack_buffer_ != nullptr && ggml_get_tensor(meta_ctx_, t.name.c_str())->buffer == repack_buffer_;
        };
        const uint64_t data_offset = gguf_get_data_offset(gguf_);
        const uint64_t data_size   = file_.size() - data_offset;
        uint64_t       max_tensor  = 0;
        for (const TensorRecord & t : tensors_) {
            max_tensor = std::max(max_tensor, t.n_bytes);
        }
        ggml_backend_dev_props props{};
        ggml_backend_dev_get_props(device_, &props);
        uint8_t * base = const_cast<uint8_t *>(file_.data()) + data_offset;  // ggml never writes weights
        if (props.caps.buffer_from_host_ptr) {
            weights_buffer_ = ggml_backend_dev_buffer_from_host_ptr(device_, base, data_size, max_tensor);
        }
        if (weights_buffer_ != nullptr) {
            for (const TensorRecord & t : tensors_) {
                if (is_repacked(t)) {
                    continue;
                }
                ggml_tensor * w = ggml_get_tensor(meta_ctx_, t.name.c_str());
                if (ggml_backend_tensor_alloc(weights_buffer_, w, base + (t.file_offset - data_offset)) != GGML_STATUS_SUCCESS) {
                    fail(DG_ERR_BACKEND, format("cannot place tensor '%s' on %s", t.name.c_str(), device_name_.c_str()));
                }
            }
        } else {
            weights_buffer_ = ggml_backend_alloc_ctx_tensors_from_buft(meta_ctx_, ggml_backend_dev_buffer_type(device_));
            if (weights_buffer_ == nullptr) {
                fail(DG_ERR_OUT_OF_MEMORY, format("cannot allocate %.2f GiB for the weights on %s",
                                                  static_cast<double>(data_size) / (1ull << 30), device_name_.c_str()));
            }
            for (const TensorRecord & t : tensors_) {
                if (!is_repacked(t)) {
                    ggml_backend_tensor_set(ggml_get_tensor(meta_ctx_, t.name.c_str()), t.data, 0, t.n_bytes);
                    file_.release(t.data, t.n_bytes);  // uploaded: the host's mapped pages can go
                }
            }
        }
        ggml_backend_buffer_set_usage(weights_buffer_, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
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

void GgufModel::parse(const std::string & path) {
    static const char kMagic[4] = {'G', 'G', 'U', 'F'};
    if (file_.size() < sizeof(kMagic) || std::memcmp(file_.data(), kMagic, sizeof(kMagic)) != 0) {
        fail(DG_ERR_FORMAT, format("not a GGUF file: '%s' does not start with the GGUF magic", path.c_str()));
    }

    const std::string header_problem = prescan_metadata(file_.data(), file_.size());
    if (!header_problem.empty()) {
        fail(DG_ERR_FORMAT, format("invalid GGUF file '%s': %s", path.c_str(), header_problem.c_str()));
    }
    {
        LogCapture capture;
        gguf_init_params gp{};
        gp.no_alloc = true;
        gp.ctx      = &meta_ctx_;
        gguf_ = gguf_init_from_buffer(file_.data(), static_cast<size_t>(file_.size()), gp);
        if (gguf_ == nullptr) {
            std::string why = capture.first_line();
            if (why.empty()) {
                why = "unreadable header";
            }
            fail(DG_ERR_FORMAT, format("invalid GGUF file '%s': %s", path.c_str(), why.c_str()));
        }
    }

    const int64_t n_kv = gguf_get_n_kv(gguf_);
    meta_.reserve(static_cast<size_t>(n_kv));
    for (int64_t id = 0; id < n_kv; ++id) {
        meta_index_[gguf_get_key(gguf_, id)] = meta_.size();
        meta_.push_back({gguf_get_key(gguf_, id), render_value(gguf_, id)});
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

    // Tensor records, and the truncation check: the data of every tensor must lie inside the file.
    const uint64_t data_offset = gguf_get_data_offset(gguf_);
    const int64_t  n_tensors   = gguf_get_n_tensors(gguf_);
    tensors_.reserve(static_cast<size_t>(n_tensors));
    uint64_t data_end = data_offset;
    for (int64_t i = 0; i < n_tensors; ++i) {
        const char *         name = gguf_get_tensor_name(gguf_, i);
        const ggml_tensor *  t    = ggml_get_tensor(meta_ctx_, name);
        if (t == nullptr) {
            fail(DG_ERR_FORMAT, format("invalid GGUF file '%s': tensor '%s' has no shape", path.c_str(), name));
        }
        TensorRecord rec;
        rec.name        = name;
        rec.type        = static_cast<int32_t>(gguf_get_tensor_type(gguf_, i));
        rec.n_dims      = ggml_n_dims(t);
        for (int d = 0; d < 4; ++d) {
            rec.ne[d] = t->ne[d];
        }
        rec.n_bytes     = ggml_nbytes(t);
        rec.file_offset = data_offset + gguf_get_tensor_offset(gguf_, i);
        data_end        = std::max<uint64_t>(data_end, rec.file_offset + rec.n_bytes);
        tensor_index_[rec.name] = tensors_.size();
        tensors_.push_back(std::move(rec));
    }
    if (data_end > file_.size()) {
        fail(DG_ERR_FORMAT, format("file truncated: tensor data ends at byte %llu but file has %llu",
                                   static_cast<unsigned long long>(data_end),
                                   static_cast<unsigned long long>(file_.size())));
    }
    for (TensorRecord & rec : tensors_) {
        rec.data = file_.data() + rec.file_offset;
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
    if (weights_buffer_ != nullptr && !ggml_backend_buffer_is_host(weights_buffer_)) {
        file_.release(rec->data, rec->n_bytes);  // the device has its own copy of the embedding
    }
    tables_.emplace_back(type, table);
    return table.tensor;
}

}  // namespace dg
