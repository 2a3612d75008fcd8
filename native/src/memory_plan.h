// What a context takes on its device, computed before anything is allocated: the same layouts the
// context allocates (kv_layout, the self-conditioning table, the step state) and an estimate of the
// compute buffers from the largest graphs' live tensors.
#pragma once

#include "dgemma.h"

#include <cstdint>
#include <cstring>
#include <string>

struct ggml_backend_device;

namespace dg {

class GgufModel;

// The ggml_type of a dg_kv_type; an invalid-argument error for any other value.
int kv_ggml_type(uint32_t kv_type);

// Whether DG_FLASH_ATTN_AUTO may pick flash attention on `device`: not on Vulkan, where ggml-vulkan
// 0.15.3's flash attention crashed Mesa's lavapipe in the canvas graph (in the driver's worker
// thread, the prefill graph running fine; the matmul path runs there). "on" still selects it.
bool flash_attn_auto_allowed(ggml_backend_device * device);

// `params` as dg_context_new resolves them (n_ctx filled in).
dg_memory_plan plan_context_memory(const GgufModel & model, const dg_context_params & params);
// What the device must hold: the CPU the mapped weights too (resident, to run at speed).
uint64_t needed_on_device(const dg_memory_plan & plan, bool cpu);
// "1.20 GiB needed (weights 0.50 GiB copied + 0.10 GiB mapped, KV cache ..., ...), 0.90 GiB free: <advice>"
std::string describe_plan(const dg_memory_plan & plan, bool cpu);

}  // namespace dg
