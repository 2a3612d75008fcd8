// Self-conditioning's probabilities x embedding product on x86 CPUs with AVX-512, as a ggml custom op.
//
// mixed[:, t] = sum_v E_t[v, :] p[v, t] over the whole vocabulary (E_t: the transposed embedding,
// F16 [n_vocab, n_embd]; p: F32 [n_vocab, n_tokens]). ggml's path rounds p to F16 and takes one
// dot product at a time; here p stays F32 (closer to the reference) and the product runs in 4 x 4
// register tiles of 16-wide FMAs, with the vocabulary cut into chunks that stay in L2.
#include "cpu_self_cond.h"

#include "cpu_features.h"

#include "ggml.h"

#include <algorithm>
#include <cstdint>
#include <vector>


namespace dg {

namespace {

#if defined(DG_X86_SIMD)

#define DG_SC_TARGET __attribute__((target("avx512f,f16c,fma")))

// acc[r][c] += sum over [k0, k1) of e[r][k] * p[c][k], for R rows and C columns; k1 - k0 % 16 == 0.
template <int R, int C>
DG_SC_TARGET void tile(const uint16_t * const * e, const float * const * p, int64_t k0, int64_t k1, float * const * out,
                       int64_t row0) {
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r) {
        for (int c = 0; c < C; ++c) {
            acc[r][c] = _mm512_setzero_ps();
        }
    }
    for (int64_t k = k0; k < k1; k += 16) {
        __m512 ev[R];
        for (int r = 0; r < R; ++r) {
            ev[r] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(e[r] + k)));
        }
        for (int c = 0; c < C; ++c) {
            const __m512 pv = _mm512_loadu_ps(p[c] + k);
            for (int r = 0; r < R; ++r) {
                acc[r][c] = _mm512_fmadd_ps(ev[r], pv, acc[r][c]);
            }
        }
    }
    for (int r = 0; r < R; ++r) {
        for (int c = 0; c < C; ++c) {
            out[c][row0 + r] += _mm512_reduce_add_ps(acc[r][c]);
        }
    }
}

template <int R>
DG_SC_TARGET void row_tile(const uint16_t * const * e, const float * const * p, int64_t n_cols, int64_t k0, int64_t k1,
                           float * const * out, int64_t row0) {
    int64_t c = 0;
    for (; c + 6 <= n_cols; c += 6) {
        tile<R, 6>(e, p + c, k0, k1, out + c, row0);
    }
    switch (n_cols - c) {
        case 5: tile<R, 5>(e, p + c, k0, k1, out + c, row0); break;
        case 4: tile<R, 4>(e, p + c, k0, k1, out + c, row0); break;
        case 3: tile<R, 3>(e, p + c, k0, k1, out + c, row0); break;
        case 2: tile<R, 2>(e, p + c, k0, k1, out + c, row0); break;
        case 1: tile<R, 1>(e, p + c, k0, k1, out + c, row0); break;
        default: break;
    }
}

DG_SC_TARGET void mix(ggml_tensor * dst, int ith, int nth, void * /*userdata*/) {
    const ggml_tensor * et = dst->src[0];  // F16 [V, d]
    const ggml_tensor * pr = dst->src[1];  // F32 [V, N]
    const int64_t V = et->ne[0], D = et->ne[1], N = pr->ne[1];
    // This thread's rows: a contiguous share, in multiples of 4.
    const int64_t quads = (D + 3) / 4;
    const int64_t r0 = std::min(D, 4 * (quads * ith / nth)), r1 = std::min(D, 4 * (quads * (ith + 1) / nth));
    if (r0 >= r1) {
        return;
    }
    thread_local std::vector<const float *> pcols;
    thread_local std::vector<float *>       ocols;
    pcols.resize(static_cast<size_t>(N));
    ocols.resize(static_cast<size_t>(N));
    for (int64_t t = 0; t < N; ++t) {
        pcols[static_cast<size_t>(t)] = reinterpret_cast<const float *>(static_cast<const char *>(pr->data) + t * pr->nb[1]);
        ocols[static_cast<size_t>(t)] = reinterpret_cast<float *>(static_cast<char *>(dst->data) + t * dst->nb[1]);
        std::fill(ocols[static_cast<size_t>(t)] + r0, ocols[static_cast<size_t>(t)] + r1, 0.0f);
    }
    const int64_t  chunk = 1024;  // vocabulary entries per pass: the probabilities' chunk stays in L2
    const int64_t  whole = V - V % 16;
    const uint16_t * erows[4];
    for (int64_t k0 = 0; k0 < whole; k0 += chunk) {
        const int64_t k1  = std::min(whole, k0 + chunk);
        int64_t       row = r0;
        for (; row + 4 <= r1; row += 4) {
            for (int i = 0; i < 4; ++i) {
                erows[i] = reinterpret_cast<const uint16_t *>(static_cast<const char *>(et->data) + (row + i) * et->nb[1]);
            }
            row_tile<4>(erows, pcols.data(), N, k0, k1, ocols.data(), row);
        }
        for (; row < r1; ++row) {
            erows[0] = reinterpret_cast<const uint16_t *>(static_cast<const char *>(et->data) + row * et->nb[1]);
            row_tile<1>(erows, pcols.data(), N, k0, k1, ocols.data(), row);
        }
    }
    for (int64_t k = whole; k < V; ++k) {  // the vocabulary's last V % 16 entries
        for (int64_t row = r0; row < r1; ++row) {
            const uint16_t h = reinterpret_cast<const uint16_t *>(static_cast<const char *>(et->data) + row * et->nb[1])[k];
            const float    e = _cvtsh_ss(h);
            for (int64_t t = 0; t < N; ++t) {
                ocols[static_cast<size_t>(t)][row] += e * pcols[static_cast<size_t>(t)][k];
            }
        }
    }
}

#else

void mix(ggml_tensor *, int, int, void *) {}

#endif

}  // namespace

bool cpu_self_cond_mix_applies(const ggml_tensor * embd_t, const ggml_tensor * probs) {
    return embd_t->type == GGML_TYPE_F16 && probs->type == GGML_TYPE_F32 && ggml_n_dims(probs) <= 2 &&
           ggml_is_contiguous(embd_t) && cpu_has_avx512();
}

ggml_tensor * cpu_self_cond_mix(ggml_context * ctx, ggml_tensor * embd_t, ggml_tensor * probs) {
    if (!ggml_is_contiguous(probs)) {
        probs = ggml_cont(ctx, probs);
    }
    ggml_tensor * args[2] = {embd_t, probs};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, embd_t->ne[1], probs->ne[1], 1, 1, args, 2, mix, GGML_N_TASKS_MAX, nullptr);
}

}  // namespace dg
