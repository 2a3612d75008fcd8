#include "kernel_policy.h"

#include "cpu_features.h"
#include "dgemma.h"
#include "error.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace dg {

namespace {

struct KernelName {
    uint32_t     bit;
    const char * name;
};

constexpr KernelName kKernels[] = {
    {DG_CPU_KERNEL_Q8_0_MATMUL, "q8_0_matmul"},
    {DG_CPU_KERNEL_SELF_COND_MIX, "self_cond_mix"},
    {DG_CPU_KERNEL_ACTIVATIONS, "activations"},
    {DG_CPU_KERNEL_SAMPLER, "sampler"},
};

}  // namespace

KernelPolicy KernelPolicy::decide(ggml_backend_device * device, uint32_t allowed) {
    KernelPolicy p;
    if (ggml_backend_dev_type(device) != GGML_BACKEND_DEVICE_TYPE_CPU) {
        return p;
    }
    p.q8_0_matmul   = (allowed & DG_CPU_KERNEL_Q8_0_MATMUL) != 0 && cpu_has_avx512_vnni();
    p.self_cond_mix = (allowed & DG_CPU_KERNEL_SELF_COND_MIX) != 0 && cpu_has_avx512();
    p.activations   = (allowed & DG_CPU_KERNEL_ACTIVATIONS) != 0;
    p.sampler       = (allowed & DG_CPU_KERNEL_SAMPLER) != 0;
    return p;
}

std::string KernelPolicy::names() const {
    const bool on[] = {q8_0_matmul, self_cond_mix, activations, sampler};
    std::string out;
    for (size_t i = 0; i < sizeof(on) / sizeof(on[0]); ++i) {
        if (on[i]) {
            out += (out.empty() ? "" : " ") + std::string(kKernels[i].name);
        }
    }
    return out;
}

uint32_t cpu_kernels_from_environment() {
    const char * env = std::getenv("DGEMMA_NO_CPU_KERNELS");
    if (env == nullptr || *env == '\0' || std::strcmp(env, "0") == 0) {
        return DG_CPU_KERNELS_ALL;
    }
    if (std::strcmp(env, "1") == 0 || std::strcmp(env, "all") == 0) {
        return 0;
    }
    uint32_t    mask = DG_CPU_KERNELS_ALL;
    std::string list = env;
    size_t      start = 0;
    while (start <= list.size()) {
        const size_t end  = std::min(list.find(',', start), list.size());
        std::string  name = list.substr(start, end - start);
        bool         known = false;
        for (const KernelName & k : kKernels) {
            if (name == k.name) {
                mask &= ~k.bit;
                known = true;
            }
        }
        if (!known) {
            fail(DG_ERR_INVALID_ARG, format("DGEMMA_NO_CPU_KERNELS: unknown kernel '%s' (known: 1, all, q8_0_matmul, "
                                            "self_cond_mix, activations, sampler)", name.c_str()));
        }
        start = end + 1;
    }
    return mask;
}

}  // namespace dg
