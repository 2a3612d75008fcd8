// Importance-matrix collector: per-input-channel sums of squared activations entering every weight
// matrix of the model, accumulated from the scheduler's eval callback while a context computes.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

struct ggml_tensor;

namespace dg {

class GgufModel;

struct ImatrixEntry {
    std::string          name;     // the weight, e.g. "blk.0.attn_q.weight"
    uint32_t             n_mat = 1;  // 1, or n_expert for the expert tensors (ggml_mul_mat_id)
    int64_t              ne0 = 0;    // input channels (the weight's row length)
    std::vector<double>  in_sum2;    // [n_mat][ne0]
    std::vector<int64_t> counts;     // [n_mat] rows (for experts: (token, slot) pairs routed to it)
};

class ImatrixCollector {
public:
    explicit ImatrixCollector(const GgufModel & model) : model_(model) {}

    // The ggml_backend_sched_eval_callback: selects (ask) and then reads (!ask) matrix products
    // whose src0 is a model weight. Never throws; a failure is kept in error() and stops compute.
    bool observe(ggml_tensor * t, bool ask);
    static bool callback(ggml_tensor * t, bool ask, void * user_data);

    void                                clear();
    size_t                              size() const { return order_.size(); }
    const ImatrixEntry &                entry(size_t i) const { return *order_[i]; }
    const std::string &                 error() const { return error_; }
    void                                clear_error() { error_.clear(); }

private:
    bool                weight_name(const ggml_tensor * src0, std::string & out) const;
    ImatrixEntry &      get(const std::string & name, uint32_t n_mat, int64_t ne0);
    void                collect(ggml_tensor * t);

    const GgufModel &                   model_;
    std::map<std::string, ImatrixEntry> entries_;
    std::vector<ImatrixEntry *>         order_;   // first-seen order (graph order)
    std::vector<uint8_t>                src1_buf_;
    std::vector<uint8_t>                ids_buf_;
    std::string                         error_;
};

}  // namespace dg
