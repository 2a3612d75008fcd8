// GgufModel's lifetime and lookups. The loading is spread by concern: gguf_reader.cpp (mapping,
// parsing, validation against the schema tables), hparams.cpp (hyper-parameters and layer
// layouts), weight_placement.cpp (the weights on the device, the self-conditioning tables).
#include "gguf_model.h"

#include "devices.h"
#include "tokenizer.h"

#include "ggml-backend.h"
#include "ggml.h"
#include "gguf.h"

#include <mutex>

namespace dg {

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
    model->validate_keys();
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

const TensorRecord * GgufModel::find_tensor(const std::string & name) const {
    const auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const MetaRecord * GgufModel::find_meta(const std::string & key) const {
    const auto it = meta_index_.find(key);
    return it == meta_index_.end() ? nullptr : &meta_[it->second];
}

}  // namespace dg
