// A DiffusionGemma GGUF file: mapped, parsed with ggml's gguf reader, validated against the
// schema tables (gguf_schema.h), with the hyper-parameters it implies. A model split with
// llama.cpp's gguf-split (PREFIX-00001-of-0000N.gguf, ...) is loaded from its first part: every
// part is mapped and parsed, its tensors joined, its metadata taken from the first.
//
// One class, defined by concern: gguf_reader.cpp (mapping, the hostile-header prescan, parsing,
// metadata rendering, validation of keys and tensors), hparams.cpp (hyper-parameters and layer
// layouts), weight_placement.cpp (bind_weights, the CPU repack, the self-conditioning tables),
// gguf_model.cpp (load, lifetime, lookups). Tokenizer facts, the end-of-generation tokens
// among them, belong to the Tokenizer (tokenizer()).
#pragma once

#include "dgemma.h"
#include "mapped_file.h"
#include "weights.h"

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

struct gguf_context;
struct ggml_context;
struct ggml_tensor;
struct ggml_backend_device;
struct ggml_backend_buffer;

namespace dg {

class Tokenizer;

struct LayerLayout {
    bool     is_sliding = false;
    uint32_t n_head_kv  = 0;
    uint32_t head_dim   = 0;
    bool     has_v_proj = false;
};

struct TensorRecord {
    std::string     name;
    int32_t         type = 0;  // ggml_type
    int32_t         n_dims = 0;
    int64_t         ne[4] = {1, 1, 1, 1};
    uint64_t        n_bytes = 0;
    uint64_t        file_offset = 0;  // in the file of its part
    const uint8_t * data = nullptr;  // inside the mapping
    uint32_t        part = 0;        // which file of a split model holds it (0: the first or only)
};

struct MetaRecord {
    std::string key;
    std::string value;  // rendered as text
};

class GgufModel {
public:
    static std::unique_ptr<GgufModel> load(const std::string & path, const dg_model_params & params);
    ~GgufModel();

    GgufModel(const GgufModel &) = delete;
    GgufModel & operator=(const GgufModel &) = delete;

    const dg_hparams &               hparams() const { return hparams_; }
    const std::vector<LayerLayout> & layers() const { return layers_; }
    const std::vector<TensorRecord> & tensors() const { return tensors_; }
    const std::vector<MetaRecord> &  meta() const { return meta_; }
    const TensorRecord *             find_tensor(const std::string & name) const;
    const MetaRecord *               find_meta(const std::string & key) const;
    const std::string &              device_name() const { return device_name_; }
    ggml_backend_device *            device() const { return device_; }

    // The raw gguf metadata (for the tokenizer, which reads its arrays directly).
    const gguf_context *             gguf() const { return gguf_; }
    // The model's tokenizer, built on first use (it never throws for a malformed vocabulary: its
    // encode/decode report that). Thread-safe.
    const Tokenizer &                tokenizer() const;

    // The weight tensor `name` (shape and type from the file), or nullptr. Its data is usable by
    // ggml only after bind_weights().
    ggml_tensor *                    weight(const std::string & name) const;
    // Every weight, resolved at load (the graph builder reads these; see weights.h).
    const ModelWeights &             weights() const { return weights_; }
    // Places the weights on the model's device, once: zero-copy views of the mapping on the CPU
    // (or any device that can use host memory), an upload otherwise. Thread-safe.
    void                             bind_weights() const;
    // CPU: the bytes of the weights bind_weights() copies into ggml's repack buffer (and which).
    size_t                           plan_repack(std::vector<const TensorRecord *> * repacked = nullptr) const;
    int32_t                          n_threads() const { return n_threads_; }
    // Self-conditioning's table: the embedding transposed, [n_vocab, n_embd] of `type` (F32, F16 or
    // Q8_0) on the model's device, built on first use from the mapping and shared by every context.
    // Thread-safe.
    ggml_tensor *                    self_cond_table(int type) const;
    // The table's type for a dg_sc_table choice, and the bytes it takes.
    int                              self_cond_table_type(uint32_t choice) const;
    uint64_t                         self_cond_table_bytes(int type) const;
    uint64_t                         self_cond_tables_built_bytes() const;  // what the built tables take
    uint64_t                         file_size() const;  // of all the parts
    // The model's files: one, or the parts of a split model in order (split.count > 1).
    size_t                           n_parts() const { return parts_.size(); }
    const std::string &              part_path(size_t i) const { return parts_[i]->path; }

private:
    GgufModel() = default;

    // One mapped, parsed file: the whole model or one part of a split model.
    struct Part {
        std::string                   path;
        MappedFile                    file;
        gguf_context *                gguf = nullptr;
        ggml_context *                meta_ctx = nullptr;  // the shapes of its tensors (no data)
        mutable ggml_backend_buffer * weights_buffer = nullptr;  // its tensors on the device
        Part() = default;
        Part(const Part &) = delete;
        Part & operator=(const Part &) = delete;
        ~Part();
    };

    // The loading steps, in order (load()).
    void open_parts(const std::string & path, bool use_mmap);      // gguf_reader.cpp
    void parse_part(Part & part, size_t index, size_t n_parts);    // gguf_reader.cpp
    void validate_keys() const;                                    // gguf_reader.cpp
    void read_hparams();                                           // hparams.cpp
    void validate_tensors();                                       // gguf_reader.cpp

    std::vector<std::unique_ptr<Part>>        parts_;
    gguf_context *                            gguf_ = nullptr;  // the first part's metadata
    dg_hparams                                hparams_{};
    std::vector<LayerLayout>                  layers_;
    std::vector<TensorRecord>                 tensors_;
    std::vector<ggml_tensor *>                tensor_meta_;  // tensors_[i]'s shape, in its part's meta_ctx
    std::unordered_map<std::string, size_t>   tensor_index_;
    std::vector<MetaRecord>                   meta_;
    std::unordered_map<std::string, size_t>   meta_index_;
    ModelWeights                              weights_;
    std::string                               device_name_;
    ggml_backend_device *                     device_ = nullptr;
    mutable std::once_flag                    bind_once_;
    mutable std::once_flag                    tokenizer_once_;
    mutable std::unique_ptr<Tokenizer>        tokenizer_;
    int32_t                                   n_threads_ = 1;
    bool                                      repack_    = true;
    mutable ggml_backend_buffer *             repack_buffer_ = nullptr;
    struct Table {
        ggml_context *        ctx = nullptr;
        ggml_backend_buffer * buffer = nullptr;
        ggml_tensor *         tensor = nullptr;
    };
    mutable std::mutex                        tables_mutex_;
    mutable std::vector<std::pair<int, Table>> tables_;
};

}  // namespace dg
