// Self-conditioning's probabilities x embedding product on x86 CPUs with AVX-512, as a ggml custom op.
//
// mixed[:, t] = sum_v E_t[v, :] p[v, t] over the whole vocabulary (E_t: the transposed embedding,
// F16 or Q8_0 [n_vocab, n_embd]; p: F32 [n_vocab, n_tokens]). ggml's path rounds p to the table's
// dot type (F16, or Q8_0: 8 bits per value) and takes one dot product at a time; here p stays F32
// (closer to the reference), the table's values are widened to F32 as they are loaded, and the
// product runs in 4 x 6 register tiles of 16-wide FMAs, with the vocabulary cut into chunks that
// stay in L2.
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

// 16 table values of one row from index k (a multiple of 16), widened to F32.
struct F16Row {
    static constexpr int64_t block = 16;
    DG_SC_TARGET static __m512 load(const uint8_t * row, int64_t k) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(row + 2 * k)));
    }
    DG_SC_TARGET static float at(const uint8_t * row, int64_t k) { return _cvtsh_ss(reinterpret_cast<const uint16_t *>(row)[k]); }
};

// Q8_0: blocks of 32 values, an F16 scale d then 32 int8 (34 bytes); value = d * q.
struct Q8Row {
    static constexpr int64_t block = 32;
    DG_SC_TARGET static __m512 load(const uint8_t * row, int64_t k) {
        const uint8_t * b = row + (k / 32) * 34;
        const float     d = _cvtsh_ss(*reinterpret_cast<const uint16_t *>(b));
        const __m128i   q = _mm_loadu_si128(reinterpret_cast<const __m128i *>(b + 2 + k % 32));
        return _mm512_mul_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)));
    }
    static float at(const uint8_t *, int64_t) { return 0.0f; }  // never: Q8_0 tables cover whole blocks
};

// acc[r][c] += sum over [k0, k1) of e[r][k] * p[c][k], for R rows and C columns; k1 - k0 % 16 == 0.
template <class Row, int R, int C>
DG_SC_TARGET void tile(const uint8_t * const * e, const float * const * p, int64_t k0, int64_t k1, float * const * out,
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
            ev[r] = Row::load(e[r], k);
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

template <class Row, int R>
DG_SC_TARGET void row_tile(const uint8_t * const * e, const float * const * p, int64_t n_cols, int64_t k0, int64_t k1,
                           float * const * out, int64_t row0) {
    int64_t c = 0;
    for (; c + 6 <= n_cols; c += 6) {
        tile<Row, R, 6>(e, p + c, k0, k1, out + c, row0);
    }
    switch (n_cols - c) {
        case 5: tile<Row, R, 5>(e, p + c, k0, k1, out + c, row0); break;
        case 4: tile<Row, R, 4>(e, p + c, k0, k1, out + c, row0); break;
        case 3: tile<Row, R, 3>(e, p + c, k0, k1, out + c, row0); break;
        case 2: tile<Row, R, 2>(e, p + c, k0, k1, out + c, row0); break;
        case 1: tile<Row, R, 1>(e, p + c, k0, k1, out + c, row0); break;
        default: break;
    }
}

template <class Row>
DG_SC_TARGET void mix(ggml_tensor * dst, int ith, int nth, void * /*userdata*/) {
    const ggml_tensor * et = dst->src[0];  // F16 or Q8_0 [V, d]
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
    const int64_t  whole = V - V % Row::block;
    const uint8_t * erows[4];
    for (int64_t k0 = 0; k0 < whole; k0 += chunk) {
        const int64_t k1  = std::min(whole, k0 + chunk);
        int64_t       row = r0;
        for (; row + 4 <= r1; row += 4) {
            for (int i = 0; i < 4; ++i) {
                erows[i] = static_cast<const uint8_t *>(et->data) + (row + i) * et->nb[1];
            }
            row_tile<Row, 4>(erows, pcols.data(), N, k0, k1, ocols.data(), row);
        }
        for (; row < r1; ++row) {
            erows[0] = static_cast<const uint8_t *>(et->data) + row * et->nb[1];
            row_tile<Row, 1>(erows, pcols.data(), N, k0, k1, ocols.data(), row);
        }
    }
    for (int64_t k = whole; k < V; ++k) {  // F16: the vocabulary's last V % 16 entries
        for (int64_t row = r0; row < r1; ++row) {
            const float e = Row::at(static_cast<const uint8_t *>(et->data) + row * et->nb[1], k);
            for (int64_t t = 0; t < N; ++t) {
                ocols[static_cast<size_t>(t)][row] += e * pcols[static_cast<size_t>(t)][k];
            }
        }
    }
}

#else

struct F16Row {};
struct Q8Row {};
template <class Row>
void mix(ggml_tensor *, int, int, void *) {}

#endif

}  // namespace

bool cpu_self_cond_mix_applies(const ggml_tensor * embd_t, const ggml_tensor * probs) {
    const bool q8 = embd_t->type == GGML_TYPE_Q8_0 && embd_t->ne[0] % 32 == 0;
    return (embd_t->type == GGML_TYPE_F16 || q8) && probs->type == GGML_TYPE_F32 && ggml_n_dims(probs) <= 2 &&
           ggml_is_contiguous(embd_t) && cpu_has_avx512();
}

ggml_tensor * cpu_self_cond_mix(ggml_context * ctx, ggml_tensor * embd_t, ggml_tensor * probs) {
    if (!ggml_is_contiguous(probs)) {
        probs = ggml_cont(ctx, probs);
    }
    ggml_tensor * args[2] = {embd_t, probs};
    ggml_custom_op_t op = embd_t->type == GGML_TYPE_Q8_0 ? mix<Q8Row> : mix<F16Row>;
    return ggml_custom_4d(ctx, GGML_TYPE_F32, embd_t->ne[1], probs->ne[1], 1, 1, args, 2, op, GGML_N_TASKS_MAX, nullptr);
}

}  // namespace dg
