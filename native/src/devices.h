// Devices come from ggml's backend registry, so any backend ggml was built with (CPU, CUDA,
// Vulkan, Metal, ...) shows up here without code changes.
#pragma once

#include "dgemma.h"

#include <cstdint>
#include <string>

struct ggml_backend_device;

namespace dg {

size_t device_count();
dg_device_info device_info(size_t index);

// Resolves a user's device string: "auto" (first GPU, else CPU), "cpu", or a device name
// (case-insensitive). Throws dg::Error listing the available devices when nothing matches.
ggml_backend_device * resolve_device(const std::string & request);

// Physical cores this process may run on (hyper-threads share a core's units, so more threads
// than cores rarely helps ggml); falls back to the logical count where the topology is unknown.
int32_t default_thread_count();

}  // namespace dg
