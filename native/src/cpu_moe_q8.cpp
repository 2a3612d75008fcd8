// Q8_0 matmuls (dense, and routed experts) on x86 CPUs with AVX-512 VNNI, as ggml custom ops.
//
// Without llamafile's tiles ggml takes one (row, token) dot product at a time (and mul_mat_id always
// does): a denoise step spent ~30 % of its time in mul_mat_id alone. Here the tokens routed to each expert are gathered and multiplied in 4 x 4
// register tiles: per 32-value block, one VPDPBUSD per (row, token) pair, with the 8-bit
// activations offset to unsigned (x + 128) and the offset's contribution (128 * sum w, per lane)
// taken off the accumulator up front, so every integer dot product is exact. The float math per
// block is ggml's: d_w * d_x * dot, summed in float.
//
//   xq  = activations quantized to Q8_0 blocks (nearest-even rounding, d = max|x| / 127, as ggml)
//   out = [n_rows, n_used, n_tokens]: out[:, j, t] = W[ids[j, t]] @ x[:, j or 0, t]
#include "cpu_moe_q8.h"

#include "cpu_features.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>


namespace dg {

namespace {

constexpr int kBlock = 32;

struct BlockQ8 {  // ggml's block_q8_0
    uint16_t d;   // fp16 scale
    int8_t   qs[kBlock];
};
static_assert(sizeof(BlockQ8) == 34, "block_q8_0 is 34 bytes");

// ---- activations -> Q8_0 --------------------------------------------------------------------

// One row of activations as Q8_0 blocks, scalar (d = max|x| / 127, q = nearest-even(x * 127 / max|x|)).
void quantize_row_scalar(const float * src, BlockQ8 * out, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; ++b) {
        const float * v    = src + b * kBlock;
        float         amax = 0.0f;
        for (int i = 0; i < kBlock; ++i) {
            const float a = std::fabs(v[i]);
            amax = a > amax ? a : amax;
        }
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        out[b].d       = ggml_fp32_to_fp16(amax / 127.0f);
        for (int i = 0; i < kBlock; ++i) {
            out[b].qs[i] = static_cast<int8_t>(std::nearbyint(v[i] * id));
        }
    }
}

#if defined(DG_X86_SIMD)
// The same with AVX-512: the same products and nearest-even rounding, so the same bytes.
__attribute__((target("avx512f"))) void quantize_row_avx512(const float * src, BlockQ8 * out, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; ++b) {
        const __m512 v0   = _mm512_loadu_ps(src + b * kBlock);
        const __m512 v1   = _mm512_loadu_ps(src + b * kBlock + 16);
        const float  amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float  id   = amax != 0.0f ? 127.0f / amax : 0.0f;
        out[b].d          = ggml_fp32_to_fp16(amax / 127.0f);
        const __m512 s    = _mm512_set1_ps(id);
        _mm_storeu_si128(reinterpret_cast<__m128i *>(out[b].qs), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, s))));
        _mm_storeu_si128(reinterpret_cast<__m128i *>(out[b].qs + 16),
                         _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, s))));
    }
}
#endif

void quantize_rows(ggml_tensor * dst, int ith, int nth, void * /*userdata*/) {
    const ggml_tensor * x     = dst->src[0];
    const int64_t       K     = x->ne[0];
    const int64_t       rows  = ggml_nrows(x);
    const int64_t       r0    = rows * ith / nth;
    const int64_t       r1    = rows * (ith + 1) / nth;
    [[maybe_unused]] const bool avx512 = cpu_has_avx512();
    for (int64_t r = r0; r < r1; ++r) {
        const float * src = reinterpret_cast<const float *>(static_cast<const char *>(x->data) + r * x->nb[1]);
        auto *        out = reinterpret_cast<BlockQ8 *>(static_cast<char *>(dst->data) + r * dst->nb[1]);
#if defined(DG_X86_SIMD)
        if (avx512) {
            quantize_row_avx512(src, out, K / kBlock);
            continue;
        }
#endif
        quantize_row_scalar(src, out, K / kBlock);
    }
}

// ---- the expert products --------------------------------------------------------------------

#if defined(DG_X86_SIMD)

#define DG_VNNI_TARGET __attribute__((target("avx512f,avx512vl,avx512bw,avx512vnni,f16c,fma")))

DG_VNNI_TARGET inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s        = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s        = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

DG_VNNI_TARGET inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// out[r * out_stride_r + c * ...] for R weight rows x C activation columns over nb blocks.
template <int R, int C>
DG_VNNI_TARGET void tile(const BlockQ8 * const * w, const BlockQ8 * const * x, int64_t nb, float * const * out_cols,
                         int64_t row0) {
    __m256        acc[R][C];
    const __m256i zero = _mm256_setzero_si256();
    const __m256i c128 = _mm256_set1_epi8(static_cast<char>(0x80));
    for (int r = 0; r < R; ++r) {
        for (int c = 0; c < C; ++c) {
            acc[r][c] = _mm256_setzero_ps();
        }
    }
    for (int64_t b = 0; b < nb; ++b) {
        __m256i wq[R], neg_offset[R];
        __m256  dw[R];
        for (int r = 0; r < R; ++r) {
            wq[r]         = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(w[r][b].qs));
            neg_offset[r] = _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, c128, wq[r]));  // -128 * sum w, per lane
            dw[r]         = _mm256_set1_ps(half_to_float(w[r][b].d));
        }
        for (int c = 0; c < C; ++c) {
            const __m256i xu = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(x[c][b].qs)), c128);
            const __m256  dx = _mm256_set1_ps(half_to_float(x[c][b].d));
            for (int r = 0; r < R; ++r) {
                const __m256i dot = _mm256_dpbusd_epi32(neg_offset[r], xu, wq[r]);  // exact sum of w * x, per lane
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dw[r], dx), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < R; ++r) {
        for (int c = 0; c < C; ++c) {
            out_cols[c][row0 + r] = hsum(acc[r][c]);
        }
    }
}

template <int R>
DG_VNNI_TARGET void row_tile(const BlockQ8 * const * w, const BlockQ8 * const * x, int64_t n_cols, int64_t nb,
                             float * const * out_cols, int64_t row0) {
    int64_t c = 0;
    for (; c + 4 <= n_cols; c += 4) {
        tile<R, 4>(w, x + c, nb, out_cols + c, row0);
    }
    switch (n_cols - c) {
        case 3: tile<R, 3>(w, x + c, nb, out_cols + c, row0); break;
        case 2: tile<R, 2>(w, x + c, nb, out_cols + c, row0); break;
        case 1: tile<R, 1>(w, x + c, nb, out_cols + c, row0); break;
        default: break;
    }
}

struct Routed {  // the (slot, token) pairs one expert gets
    std::vector<int32_t> slot, token;
};

DG_VNNI_TARGET void experts(ggml_tensor * dst, int ith, int nth, void * /*userdata*/) {
    const ggml_tensor * w   = dst->src[0];  // Q8_0 [K, M, E]
    const ggml_tensor * xq  = dst->src[1];  // Q8_0 [K, nx1, N]
    const ggml_tensor * ids = dst->src[2];  // I32 [k, N]
    const int64_t K = w->ne[0], M = w->ne[1], E = w->ne[2];
    const int64_t n_used = ids->ne[0], N = ids->ne[1], nx1 = xq->ne[1];
    const int64_t nb = K / kBlock;

    thread_local std::vector<Routed> routed;
    routed.resize(static_cast<size_t>(E));
    for (Routed & r : routed) {
        r.slot.clear();
        r.token.clear();
    }
    for (int64_t t = 0; t < N; ++t) {
        const int32_t * row = reinterpret_cast<const int32_t *>(static_cast<const char *>(ids->data) + t * ids->nb[1]);
        for (int64_t j = 0; j < n_used; ++j) {
            const int32_t e = row[j];
            if (e >= 0 && e < E) {
                routed[static_cast<size_t>(e)].slot.push_back(static_cast<int32_t>(j));
                routed[static_cast<size_t>(e)].token.push_back(static_cast<int32_t>(t));
            }
        }
    }

    // Work units: (expert, block of 16 rows), dealt round-robin to the threads.
    constexpr int64_t kRows  = 16;
    const int64_t     blocks = (M + kRows - 1) / kRows;
    thread_local std::vector<const BlockQ8 *> xcols;
    thread_local std::vector<float *>         ocols;
    int64_t unit = 0;
    for (int64_t e = 0; e < E; ++e) {
        const Routed & r = routed[static_cast<size_t>(e)];
        const int64_t  n = static_cast<int64_t>(r.token.size());
        if (n == 0) {
            continue;
        }
        bool columns_ready = false;
        for (int64_t rb = 0; rb < blocks; ++rb, ++unit) {
            if (unit % nth != ith) {
                continue;
            }
            if (!columns_ready) {
                xcols.resize(static_cast<size_t>(n));
                ocols.resize(static_cast<size_t>(n));
                for (int64_t i = 0; i < n; ++i) {
                    const int64_t j = r.slot[static_cast<size_t>(i)], t = r.token[static_cast<size_t>(i)];
                    xcols[static_cast<size_t>(i)] = reinterpret_cast<const BlockQ8 *>(
                        static_cast<const char *>(xq->data) + (j % nx1) * xq->nb[1] + t * xq->nb[2]);
                    ocols[static_cast<size_t>(i)] = reinterpret_cast<float *>(
                        static_cast<char *>(dst->data) + j * dst->nb[1] + t * dst->nb[2]);
                }
                columns_ready = true;
            }
            const int64_t row_end = std::min(M, (rb + 1) * kRows);
            int64_t       row     = rb * kRows;
            const BlockQ8 * wrows[4];
            auto set_rows = [&](int64_t first, int count) {
                for (int i = 0; i < count; ++i) {
                    wrows[i] = reinterpret_cast<const BlockQ8 *>(static_cast<const char *>(w->data) + (first + i) * w->nb[1] +
                                                                 e * w->nb[2]);
                }
            };
            for (; row + 4 <= row_end; row += 4) {
                set_rows(row, 4);
                row_tile<4>(wrows, xcols.data(), n, nb, ocols.data(), row);
            }
            for (; row < row_end; ++row) {
                set_rows(row, 1);
                row_tile<1>(wrows, xcols.data(), n, nb, ocols.data(), row);
            }
        }
    }
}

// A dense product: out[M, N] = W[K, M]^T xq[K, N], in blocks of 16 rows dealt round-robin.
DG_VNNI_TARGET void dense(ggml_tensor * dst, int ith, int nth, void * /*userdata*/) {
    const ggml_tensor * w  = dst->src[0];  // Q8_0 [K, M]
    const ggml_tensor * xq = dst->src[1];  // Q8_0 [K, N]
    const int64_t M = w->ne[1], N = xq->ne[1], nb = w->ne[0] / kBlock;
    thread_local std::vector<const BlockQ8 *> xcols;
    thread_local std::vector<float *>         ocols;
    xcols.resize(static_cast<size_t>(N));
    ocols.resize(static_cast<size_t>(N));
    for (int64_t t = 0; t < N; ++t) {
        xcols[static_cast<size_t>(t)] = reinterpret_cast<const BlockQ8 *>(static_cast<const char *>(xq->data) + t * xq->nb[1]);
        ocols[static_cast<size_t>(t)] = reinterpret_cast<float *>(static_cast<char *>(dst->data) + t * dst->nb[1]);
    }
    constexpr int64_t kRows = 16;
    const BlockQ8 *   wrows[4];
    for (int64_t rb = ith; rb * kRows < M; rb += nth) {
        const int64_t row_end = std::min(M, (rb + 1) * kRows);
        int64_t       row     = rb * kRows;
        for (; row + 4 <= row_end; row += 4) {
            for (int i = 0; i < 4; ++i) {
                wrows[i] = reinterpret_cast<const BlockQ8 *>(static_cast<const char *>(w->data) + (row + i) * w->nb[1]);
            }
            row_tile<4>(wrows, xcols.data(), N, nb, ocols.data(), row);
        }
        for (; row < row_end; ++row) {
            wrows[0] = reinterpret_cast<const BlockQ8 *>(static_cast<const char *>(w->data) + row * w->nb[1]);
            row_tile<1>(wrows, xcols.data(), N, nb, ocols.data(), row);
        }
    }
}

#else

void experts(ggml_tensor *, int, int, void *) {}

void dense(ggml_tensor *, int, int, void *) {}

#endif

}  // namespace

namespace {

ggml_tensor * quantized_activations(ggml_context * ctx, ggml_tensor * x) {
    if (x->type != GGML_TYPE_F32 || !ggml_is_contiguous(x)) {
        x = ggml_cont(ctx, ggml_cast(ctx, x, GGML_TYPE_F32));
    }
    ggml_tensor * args[1] = {x};
    return ggml_custom_4d(ctx, GGML_TYPE_Q8_0, x->ne[0], x->ne[1], x->ne[2], x->ne[3], args, 1, quantize_rows,
                          GGML_N_TASKS_MAX, nullptr);
}

// The weight's bytes are plain Q8_0 blocks in host memory: not re-laid out by a ggml "extra" buffer
// (ggml's CPU repack sets tensor->extra), not on a device.
bool plain_host_blocks(const ggml_tensor * w) {
    return w->extra == nullptr && w->buffer != nullptr && ggml_backend_buffer_is_host(w->buffer);
}

}  // namespace

bool cpu_moe_q8_0_applies(const ggml_tensor * w) {
    return w->type == GGML_TYPE_Q8_0 && ggml_n_dims(w) == 3 && w->ne[0] % kBlock == 0 && plain_host_blocks(w) &&
           cpu_has_avx512_vnni();
}

bool cpu_matmul_q8_0_applies(const ggml_tensor * w, const ggml_tensor * x) {
    return w->type == GGML_TYPE_Q8_0 && ggml_n_dims(w) == 2 && ggml_n_dims(x) <= 2 && w->ne[0] % kBlock == 0 &&
           plain_host_blocks(w) && cpu_has_avx512_vnni();
}

ggml_tensor * cpu_matmul_q8_0(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x) {
    ggml_tensor * xq      = quantized_activations(ctx, x);
    ggml_tensor * args[2] = {w, xq};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[1], x->ne[1], 1, 1, args, 2, dense, GGML_N_TASKS_MAX, nullptr);
}

ggml_tensor * cpu_moe_q8_0(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x, ggml_tensor * ids) {
    ggml_tensor * xq = quantized_activations(ctx, x);
    ggml_tensor * args[3] = {w, xq, ids};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[1], ids->ne[0], ids->ne[1], 1, args, 3, experts, GGML_N_TASKS_MAX,
                          nullptr);
}

}  // namespace dg
