#include "devices.h"

#include "error.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <utility>

#if defined(__linux__)
#    include <sched.h>
#endif

namespace dg {

namespace {

dg_device_type to_dg_type(enum ggml_backend_dev_type type) {
    switch (type) {
        case GGML_BACKEND_DEVICE_TYPE_GPU:   return DG_DEVICE_GPU;
        case GGML_BACKEND_DEVICE_TYPE_IGPU:  return DG_DEVICE_IGPU;
        case GGML_BACKEND_DEVICE_TYPE_ACCEL: return DG_DEVICE_ACCEL;
        case GGML_BACKEND_DEVICE_TYPE_CPU:
        default:                             return DG_DEVICE_CPU;
    }
}

bool equals_ignore_case(const std::string & a, const std::string & b) {
    if (a.size() != b.size()) {
        return false;
    }
    for (size_t i = 0; i < a.size(); ++i) {
        if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i]))) {
            return false;
        }
    }
    return true;
}

// A ggml built with GGML_BACKEND_DL=ON registers no backend until asked to load them from disk;
// the usual build registers its backends statically, and loading again would duplicate them.
void ensure_backends() {
    static std::once_flag once;
    std::call_once(once, [] {
        if (ggml_backend_reg_count() == 0) {
            ggml_backend_load_all();
        }
    });
}

}  // namespace

size_t device_count() {
    ensure_backends();
    return ggml_backend_dev_count();
}

// "NAME" for each feature ggml reports as "1", "NAME=value" for the others; cached per registry so
// the string outlives the call.
static const char * backend_features(ggml_backend_reg_t reg) {
    static std::mutex                                  mutex;
    static std::map<ggml_backend_reg_t, std::string>   cache;
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(reg);
    if (it == cache.end()) {
        std::string text;
        auto get = reg ? reinterpret_cast<ggml_backend_get_features_t>(ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features"))
                       : nullptr;
        for (ggml_backend_feature * f = get ? get(reg) : nullptr; f != nullptr && f->name != nullptr; ++f) {
            text += text.empty() ? "" : " ";
            text += f->name;
            if (f->value != nullptr && std::string(f->value) != "1") {
                text += std::string("=") + f->value;
            }
        }
        it = cache.emplace(reg, std::move(text)).first;
    }
    return it->second.c_str();
}

dg_device_info device_info(size_t index) {
    ensure_backends();
    if (index >= ggml_backend_dev_count()) {
        fail(DG_ERR_INVALID_ARG, format("device index %zu out of range (%zu devices)", index, ggml_backend_dev_count()));
    }
    ggml_backend_dev_t dev = ggml_backend_dev_get(index);
    dg_device_info info{};
    info.name        = ggml_backend_dev_name(dev);
    info.description = ggml_backend_dev_description(dev);
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    info.backend     = reg ? ggml_backend_reg_name(reg) : "";
    info.type        = to_dg_type(ggml_backend_dev_type(dev));
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(dev, &free, &total);
    info.memory_free  = free;
    info.memory_total = total;
    info.features     = backend_features(reg);
    return info;
}

ggml_backend_device * resolve_device(const std::string & request) {
    ensure_backends();
    const size_t n = ggml_backend_dev_count();
    if (request.empty() || equals_ignore_case(request, "auto")) {
        for (size_t i = 0; i < n; ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU) {
                return dev;
            }
        }
        ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (cpu == nullptr) {
            fail(DG_ERR_BACKEND, "no usable ggml device: the CPU backend is not registered");
        }
        return cpu;
    }
    for (size_t i = 0; i < n; ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        const bool is_cpu = ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU;
        if (equals_ignore_case(request, ggml_backend_dev_name(dev)) || (is_cpu && equals_ignore_case(request, "cpu"))) {
            return dev;
        }
    }
    std::string available;
    for (size_t i = 0; i < n; ++i) {
        available += (i ? ", " : "");
        available += ggml_backend_dev_name(ggml_backend_dev_get(i));
    }
    fail(DG_ERR_INVALID_ARG, format("unknown device '%s' (available: auto, %s)", request.c_str(), available.c_str()));
}

int32_t default_thread_count() {
    const int32_t logical = static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0) {
        return logical;
    }
    std::set<std::pair<int, int>> cores;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
        if (!CPU_ISSET(cpu, &set)) {
            continue;
        }
        const std::string dir = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
        std::ifstream core_file(dir + "core_id");
        std::ifstream package_file(dir + "physical_package_id");
        int core = -1, package = -1;
        if (!(core_file >> core) || !(package_file >> package)) {
            return std::min(logical, static_cast<int32_t>(CPU_COUNT(&set)));
        }
        cores.insert({package, core});
    }
    return cores.empty() ? logical : static_cast<int32_t>(cores.size());
#else
    return logical;
#endif
}

}  // namespace dg
