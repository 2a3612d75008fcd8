// Reading a DiffusionGemma GGUF: mapping every part of the model, the hostile-header prescan,
// parsing with ggml's gguf reader (its error lines captured), rendering the metadata as text, and
// validating the keys and tensors against the schema tables (gguf_schema.h). The hyper-parameters
// are read in hparams.cpp, the weights placed in weight_placement.cpp.
#include "gguf_model.h"

#include "error.h"
#include "gguf_schema.h"
#include "gguf_values.h"

#include "ggml.h"
#include "gguf.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>

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

// ggml's gguf reader asserts (aborts the process) on an empty key and when 'general.alignment' (as
// a C string: a key with a NUL inside may read as it) is not a scalar u32. Walk the metadata ourselves first, bounds-checked, and refuse such a file with a
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
        // ggml compares keys as C strings: "general.alignment\0..." would be taken for the real one.
        if (std::memchr(key, 0, static_cast<size_t>(key_len)) != nullptr) {
            return format("metadata entry %llu has a NUL byte in its key", static_cast<unsigned long long>(i));
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

// ---------------------------------------------------------------------------------------------
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

void GgufModel::validate_keys() const {
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
