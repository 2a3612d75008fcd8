// What the CPU we run on can do, and the x86 SIMD set-up shared by our CPU kernel files
// (cpu_moe_q8.cpp, cpu_self_cond.cpp); include it only from those.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DG_X86_SIMD 1
#include <immintrin.h>
#endif
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 intrinsics fill "don't care" lanes with _mm512_undefined_*(), which its own
// -Wuninitialized then reports inside the headers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace dg {

// AVX-512F with FMA (every AVX-512 CPU also has F16C, which clang cannot query by name).
inline bool cpu_has_avx512() {
#if defined(DG_X86_SIMD)
    static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    return has;
#else
    return false;
#endif
}

// The above plus AVX-512 VL, BW and VNNI (VPDPBUSD on 256-bit registers).
inline bool cpu_has_avx512_vnni() {
#if defined(DG_X86_SIMD)
    static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512vl") &&
                            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
    return has;
#else
    return false;
#endif
}

}  // namespace dg
