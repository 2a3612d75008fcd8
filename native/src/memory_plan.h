// What a context takes on its device, computed before anything is allocated: the same layouts the
// context allocates (kv_layout, the self-conditioning table, the step state) and an estimate of the
// compute buffers from the largest graphs' live tensors.
#pragma once

#include "dgemma.h"

#include <cstdint>
#include <string>

namespace dg {

class GgufModel;

// `params` as dg_context_new resolves them (n_ctx filled in).
dg_memory_plan plan_context_memory(const GgufModel & model, const dg_context_params & params);
// What the device must hold: the CPU the mapped weights too (resident, to run at speed).
uint64_t needed_on_device(const dg_memory_plan & plan, bool cpu);
// "1.20 GiB needed (weights 0.50 GiB copied + 0.10 GiB mapped, KV cache ..., ...), 0.90 GiB free: <advice>"
std::string describe_plan(const dg_memory_plan & plan, bool cpu);

}  // namespace dg
