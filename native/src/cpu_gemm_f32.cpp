// Float32 batched matmul on x86 CPUs with AVX-512, as a ggml custom op.
//
// Without llamafile's tiles, ggml multiplies F32 matrices one dot product at a time; attention's
// scores (K^T Q) and values (V^T P) then took ~18 % of a denoise step. Here each output block is a
// 4 x 6 register tile of 16-wide FMAs over the shared dimension.
#include "cpu_gemm_f32.h"

#include "ggml.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DG_GEMM_X86 1
#include <immintrin.h>
#endif
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 intrinsics fill "don't care" lanes with _mm512_undefined_*(), which its own
// -Wuninitialized then reports inside the headers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace dg {

namespace {

#if defined(DG_GEMM_X86)

#define DG_GEMM_TARGET __attribute__((target("avx512f,fma")))

// out[c][row0 + r] = dot(a[r], b[c]) over K (the last K % 16 values through a masked load).
template <int R, int C>
DG_GEMM_TARGET void tile(const float * const * a, const float * const * b, int64_t K, float * const * out, int64_t row0) {
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r) {
        for (int c = 0; c < C; ++c) {
            acc[r][c] = _mm512_setzero_ps();
        }
    }
    const int64_t whole = K - K % 16;
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 m = k < whole ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1u);
        __m512 av[R];
        for (int r = 0; r < R; ++r) {
            av[r] = _mm512_maskz_loadu_ps(m, a[r] + k);
        }
        for (int c = 0; c < C; ++c) {
            const __m512 bv = _mm512_maskz_loadu_ps(m, b[c] + k);
            for (int r = 0; r < R; ++r) {
                acc[r][c] = _mm512_fmadd_ps(av[r], bv, acc[r][c]);
            }
        }
    }
    for (int r = 0; r < R; ++r) {
        for (int c = 0; c < C; ++c) {
            out[c][row0 + r] = _mm512_reduce_add_ps(acc[r][c]);
        }
    }
}

template <int R>
DG_GEMM_TARGET void row_tile(const float * const * a, const float * const * b, int64_t n_cols, int64_t K,
                             float * const * out, int64_t row0) {
    int64_t c = 0;
    for (; c + 6 <= n_cols; c += 6) {
        tile<R, 6>(a, b + c, K, out + c, row0);
    }
    switch (n_cols - c) {
        case 5: tile<R, 5>(a, b + c, K, out + c, row0); break;
        case 4: tile<R, 4>(a, b + c, K, out + c, row0); break;
        case 3: tile<R, 3>(a, b + c, K, out + c, row0); break;
        case 2: tile<R, 2>(a, b + c, K, out + c, row0); break;
        case 1: tile<R, 1>(a, b + c, K, out + c, row0); break;
        default: break;
    }
}

DG_GEMM_TARGET void gemm(ggml_tensor * dst, int ith, int nth, void * /*userdata*/) {
    const ggml_tensor * a = dst->src[0];  // [K, M, Ba]
    const ggml_tensor * b = dst->src[1];  // [K, N, Bb]
    const int64_t K = a->ne[0], M = a->ne[1], N = b->ne[1], Bb = b->ne[2];
    const int64_t ratio = Bb / a->ne[2];
    constexpr int64_t kRows  = 16;
    const int64_t     blocks = (M + kRows - 1) / kRows;
    thread_local std::vector<const float *> bcols;
    thread_local std::vector<float *>       ocols;
    int64_t prepared = -1;
    for (int64_t unit = ith; unit < Bb * blocks; unit += nth) {
        const int64_t batch = unit / blocks, rb = unit % blocks;
        if (batch != prepared) {
            bcols.resize(static_cast<size_t>(N));
            ocols.resize(static_cast<size_t>(N));
            for (int64_t t = 0; t < N; ++t) {
                bcols[static_cast<size_t>(t)] = reinterpret_cast<const float *>(
                    static_cast<const char *>(b->data) + t * b->nb[1] + batch * b->nb[2]);
                ocols[static_cast<size_t>(t)] = reinterpret_cast<float *>(
                    static_cast<char *>(dst->data) + t * dst->nb[1] + batch * dst->nb[2]);
            }
            prepared = batch;
        }
        const char *  abase   = static_cast<const char *>(a->data) + (batch / ratio) * a->nb[2];
        const int64_t row_end = std::min(M, (rb + 1) * kRows);
        int64_t       row     = rb * kRows;
        const float * arows[4];
        for (; row + 4 <= row_end; row += 4) {
            for (int i = 0; i < 4; ++i) {
                arows[i] = reinterpret_cast<const float *>(abase + (row + i) * a->nb[1]);
            }
            row_tile<4>(arows, bcols.data(), N, K, ocols.data(), row);
        }
        for (; row < row_end; ++row) {
            arows[0] = reinterpret_cast<const float *>(abase + row * a->nb[1]);
            row_tile<1>(arows, bcols.data(), N, K, ocols.data(), row);
        }
    }
}

bool cpu_has_avx512() {
    static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    return has;
}

#else

void gemm(ggml_tensor *, int, int, void *) {}

bool cpu_has_avx512() { return false; }

#endif

}  // namespace

bool cpu_matmul_f32_applies(const ggml_tensor * a, const ggml_tensor * b) {
    return a->type == GGML_TYPE_F32 && b->type == GGML_TYPE_F32 && ggml_is_contiguous(a) && ggml_is_contiguous(b) &&
           a->ne[3] == 1 && b->ne[3] == 1 && a->ne[0] == b->ne[0] && b->ne[2] % a->ne[2] == 0 && cpu_has_avx512();
}

ggml_tensor * cpu_matmul_f32(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b) {
    ggml_tensor * args[2] = {a, b};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, a->ne[1], b->ne[1], b->ne[2], 1, args, 2, gemm, GGML_N_TASKS_MAX, nullptr);
}

}  // namespace dg
