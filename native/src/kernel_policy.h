// Which of our CPU custom ops a context's graphs use in place of stock ggml ops. Decided once, when
// the context is created, from the device, the CPU's features and the caller's mask
// (dg_context_params.cpu_kernels); the graph builder only reads it. Off the CPU every field is
// false: the graph is stock ggml ops only, as every backend runs them.
#pragma once

#include <cstdint>
#include <string>

struct ggml_backend_device;

namespace dg {

struct KernelPolicy {
    bool q8_0_matmul   = false;  // Q8_0 dense and routed-expert products (x86 AVX-512 VNNI)
    bool self_cond_mix = false;  // self-conditioning's probabilities x F16/Q8_0 table (x86 AVX-512)
    bool activations   = false;  // vectorised GELU and logit softcap (any CPU)
    bool sampler       = false;  // the step's sampler reductions in one pass per row (any CPU)

    // `allowed` is a mask of DG_CPU_KERNEL_* bits.
    static KernelPolicy decide(ggml_backend_device * device, uint32_t allowed);

    // The kernels in use, space-separated, in DG_CPU_KERNEL_* order ("" for none).
    std::string names() const;
};

// The DG_CPU_KERNEL_* bits that DGEMMA_NO_CPU_KERNELS leaves on: unset, "" or "0": all; "1" or
// "all": none; else a comma-separated list of kernel names to switch off. An unknown name is an
// invalid-argument error naming it.
uint32_t cpu_kernels_from_environment();

}  // namespace dg
