#include "cpu_sampler.h"

#include "sampler.h"

#include "ggml.h"

namespace dg {

namespace {

void rows_op(ggml_tensor * dst, int ith, int nth, void * /*userdata*/) {
    const ggml_tensor * processed = dst->src[0];
    const ggml_tensor * uniforms  = dst->src[1];
    const int64_t       n_vocab   = processed->ne[0];
    const int64_t       n         = processed->ne[1];
    const auto *        u         = static_cast<const float *>(uniforms->data);
    for (int64_t i = ith; i < n; i += nth) {
        const auto * row = reinterpret_cast<const float *>(static_cast<const char *>(processed->data) + i * processed->nb[1]);
        const RowStats r   = reduce_row(row, static_cast<uint32_t>(n_vocab), u[i]);
        auto *         out = reinterpret_cast<float *>(static_cast<char *>(dst->data) + i * dst->nb[1]);
        out[0] = static_cast<float>(r.argmax);
        out[1] = static_cast<float>(r.draw);
        out[2] = r.entropy;
    }
}

}  // namespace

ggml_tensor * cpu_sampler_rows(ggml_context * ctx, ggml_tensor * processed, ggml_tensor * uniforms) {
    ggml_tensor * args[2] = {processed, uniforms};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, 3, processed->ne[1], 1, 1, args, 2, rows_op, GGML_N_TASKS_MAX, nullptr);
}

}  // namespace dg
