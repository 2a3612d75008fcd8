// Weight quantization through ggml's own quantizers (ggml_quantize_chunk), split across threads
// by rows. The converter streams tensors through it chunk by chunk.
#include "quantize.h"

#include "error.h"
#include "parallel.h"

#include "ggml.h"

#include <algorithm>
#include <vector>

namespace dg {

size_t quantize_rows(int32_t type, const float * src, void * dst, int64_t n_rows, int64_t n_per_row, const float * imatrix,
                     int32_t n_threads) {
    if (type < 0 || type >= GGML_TYPE_COUNT || ggml_blck_size(static_cast<ggml_type>(type)) == 0) {
        fail(DG_ERR_INVALID_ARG, format("quantize: unknown ggml type %d", type));
    }
    const ggml_type t = static_cast<ggml_type>(type);
    if (n_rows < 0 || n_per_row <= 0 || n_per_row % ggml_blck_size(t) != 0) {
        fail(DG_ERR_INVALID_ARG, format("quantize: %s needs rows that are a multiple of %lld values, got %lld", ggml_type_name(t),
                                        static_cast<long long>(ggml_blck_size(t)), static_cast<long long>(n_per_row)));
    }
    if (ggml_quantize_requires_imatrix(t) && imatrix == nullptr) {
        fail(DG_ERR_INVALID_ARG, format("quantize: %s needs an importance matrix", ggml_type_name(t)));
    }
    ggml_quantize_init(t);  // lookup tables of the i-quants; must happen before the threads start
    const size_t  row_size = ggml_row_size(t, n_per_row);
    const int64_t threads  = std::max<int64_t>(1, std::min<int64_t>(n_threads > 0 ? n_threads : 1, n_rows / 4 + 1));
    std::vector<size_t> written(static_cast<size_t>(threads), 0);
    auto work = [&](unsigned worker) {
        const int64_t w     = worker;
        const int64_t first = n_rows * w / threads;
        const int64_t last  = n_rows * (w + 1) / threads;
        if (last > first) {
            // `start` is an element offset into src; ggml writes row start / n_per_row of dst
            written[static_cast<size_t>(w)] = ggml_quantize_chunk(t, src, dst, first * n_per_row, last - first, n_per_row, imatrix);
        }
    };
    run_workers(static_cast<unsigned>(threads), work);
    size_t total = 0;
    for (size_t n : written) {
        total += n;
    }
    if (total != row_size * static_cast<size_t>(n_rows)) {
        fail(DG_ERR_INTERNAL, "quantize: ggml wrote an unexpected number of bytes");
    }
    return total;
}

size_t type_row_size(int32_t type, int64_t n_per_row) {
    if (type < 0 || type >= GGML_TYPE_COUNT || ggml_blck_size(static_cast<ggml_type>(type)) == 0 || n_per_row <= 0 ||
        n_per_row % ggml_blck_size(static_cast<ggml_type>(type)) != 0) {
        return 0;
    }
    return ggml_row_size(static_cast<ggml_type>(type), n_per_row);
}

}  // namespace dg
