// The importance-matrix collector, fed by ggml_backend_sched's eval callback. For a weight W used
// as ggml_mul_mat(W, x), every row of x adds x[j]^2 to in_sum2[j] and one to the count; for the
// experts, ggml_mul_mat_id(W, x, ids), each (token, slot) pair adds to the routed expert's sums
// only. This follows llama.cpp's tools/imatrix, so the sums are interchangeable with its files.
#include "imatrix.h"

#include "error.h"
#include "gguf_model.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <cstring>
#include <exception>

namespace dg {

bool ImatrixCollector::callback(ggml_tensor * t, bool ask, void * user_data) {
    return static_cast<ImatrixCollector *>(user_data)->observe(t, ask);
}

// The model weight behind a product's src0: the weight itself, or the scheduler's copy of it on
// another backend ("CUDA0#blk.0.attn_q.weight#0").
bool ImatrixCollector::weight_name(const ggml_tensor * src0, std::string & out) const {
    if (src0 == nullptr) {
        return false;
    }
    const char * name = src0->name;
    const char * p    = std::strchr(name, '#');
    if (p != nullptr) {
        const char * q = std::strchr(p + 1, '#');
        out.assign(p + 1, q != nullptr ? static_cast<size_t>(q - (p + 1)) : std::strlen(p + 1));
    } else {
        out.assign(name);
    }
    return !out.empty() && model_.weight(out) != nullptr;
}

bool ImatrixCollector::observe(ggml_tensor * t, bool ask) {
    if (!error_.empty()) {
        return false;
    }
    if (t->op != GGML_OP_MUL_MAT && t->op != GGML_OP_MUL_MAT_ID) {
        return ask ? false : true;
    }
    std::string name;
    if (!weight_name(t->src[0], name) || t->src[1] == nullptr || t->src[1]->type != GGML_TYPE_F32) {
        return ask ? false : true;
    }
    if (ask) {
        return true;
    }
    try {
        collect(t);
        return true;
    } catch (const std::exception & e) {
        error_ = std::string("imatrix: ") + e.what();
    } catch (...) {
        error_ = "imatrix: unknown error";
    }
    return false;
}

ImatrixEntry & ImatrixCollector::get(const std::string & name, uint32_t n_mat, int64_t ne0) {
    auto it = entries_.find(name);
    if (it == entries_.end()) {
        ImatrixEntry e;
        e.name  = name;
        e.n_mat = n_mat;
        e.ne0   = ne0;
        e.in_sum2.assign(static_cast<size_t>(n_mat) * static_cast<size_t>(ne0), 0.0);
        e.counts.assign(n_mat, 0);
        it = entries_.emplace(name, std::move(e)).first;
        order_.push_back(&it->second);
    } else if (it->second.n_mat != n_mat || it->second.ne0 != ne0) {
        fail(DG_ERR_INTERNAL, format("'%s' is used with %u x %lld and %u x %lld inputs", name.c_str(), it->second.n_mat,
                                    static_cast<long long>(it->second.ne0), n_mat, static_cast<long long>(ne0)));
    }
    return it->second;
}

namespace {

// The tensor's bytes (its whole span, views included) in host memory.
const uint8_t * host_data(const ggml_tensor * t, std::vector<uint8_t> & buf) {
    if (t->buffer != nullptr && ggml_backend_buffer_is_host(t->buffer)) {
        return static_cast<const uint8_t *>(t->data);
    }
    buf.resize(ggml_nbytes(t));
    ggml_backend_tensor_get(t, buf.data(), 0, buf.size());
    return buf.data();
}

}  // namespace

void ImatrixCollector::collect(ggml_tensor * t) {
    std::string name;
    weight_name(t->src[0], name);
    const ggml_tensor * src0 = t->src[0];
    const ggml_tensor * src1 = t->src[1];
    if (src1->nb[0] != sizeof(float)) {
        fail(DG_ERR_INTERNAL, format("'%s': the input rows are not contiguous", name.c_str()));
    }
    const uint8_t * x   = host_data(src1, src1_buf_);
    const int64_t   ne0 = src1->ne[0];

    if (t->op == GGML_OP_MUL_MAT_ID) {
        // src1 [ne0, n_used or 1, n_tokens], ids [n_used, n_tokens] (I32, possibly a view)
        const ggml_tensor * ids = t->src[2];
        const int64_t       n_expert = src0->ne[2];
        if (ids == nullptr || ids->type != GGML_TYPE_I32 || ids->ne[1] != src1->ne[2] || src1->ne[3] != 1) {
            fail(DG_ERR_INTERNAL, format("'%s': unexpected expert routing shapes", name.c_str()));
        }
        const uint8_t * id = host_data(ids, ids_buf_);
        ImatrixEntry &  e  = get(name, static_cast<uint32_t>(n_expert), ne0);
        for (int64_t tok = 0; tok < ids->ne[1]; ++tok) {
            for (int64_t slot = 0; slot < ids->ne[0]; ++slot) {
                const int32_t ex = *reinterpret_cast<const int32_t *>(id + tok * ids->nb[1] + slot * ids->nb[0]);
                if (ex < 0 || ex >= n_expert) {
                    fail(DG_ERR_INTERNAL, format("'%s': expert id %d out of range", name.c_str(), ex));
                }
                const float * row = reinterpret_cast<const float *>(x + (slot % src1->ne[1]) * src1->nb[1] + tok * src1->nb[2]);
                double *      sum = e.in_sum2.data() + static_cast<size_t>(ex) * static_cast<size_t>(ne0);
                for (int64_t j = 0; j < ne0; ++j) {
                    sum[j] += static_cast<double>(row[j]) * static_cast<double>(row[j]);
                }
                e.counts[static_cast<size_t>(ex)] += 1;
            }
        }
        return;
    }
    // a dense product: every row of src1 (over dims 1..3) is one input vector
    if (src0->ne[2] != 1 || src0->ne[3] != 1) {
        fail(DG_ERR_INTERNAL, format("'%s': batched products of a weight are not supported", name.c_str()));
    }
    ImatrixEntry & e = get(name, 1, ne0);
    for (int64_t i3 = 0; i3 < src1->ne[3]; ++i3) {
        for (int64_t i2 = 0; i2 < src1->ne[2]; ++i2) {
            for (int64_t i1 = 0; i1 < src1->ne[1]; ++i1) {
                const float * row = reinterpret_cast<const float *>(x + i1 * src1->nb[1] + i2 * src1->nb[2] + i3 * src1->nb[3]);
                for (int64_t j = 0; j < ne0; ++j) {
                    e.in_sum2[static_cast<size_t>(j)] += static_cast<double>(row[j]) * static_cast<double>(row[j]);
                }
            }
        }
    }
    e.counts[0] += ggml_nrows(src1);
}

void ImatrixCollector::clear() {
    entries_.clear();
    order_.clear();
    error_.clear();
}

}  // namespace dg
