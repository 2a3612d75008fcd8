// libFuzzer target: any byte string handed to dg_model_load must give DG_OK or an error status with
// a message, never a crash, an out-of-bounds access (AddressSanitizer), undefined behaviour
// (UBSan) or an abort. Built by native/fuzz/CMakeLists.txt; run by .ci/fuzz.sh.
#include "dgemma.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <sys/mman.h>
#include <unistd.h>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    static int fd = -1;
    static std::string path;
    if (fd < 0) {
        fd = memfd_create("dg-fuzz", 0);
        if (fd < 0) {
            std::abort();
        }
        path = "/proc/self/fd/" + std::to_string(fd);
    }
    if (ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != static_cast<ssize_t>(size)) {
        return 0;
    }
    dg_model_params params = dg_model_default_params();
    params.device          = "cpu";
    params.n_threads       = 1;
    dg_model * model       = nullptr;
    const dg_status status = dg_model_load(path.c_str(), &params, &model);
    if (status == DG_OK) {
        // a file that loads must also be fully describable
        dg_hparams hp;
        dg_model_hparams(model, &hp);
        for (size_t i = 0; i < dg_model_n_tensors(model); ++i) {
            dg_tensor_info info;
            dg_model_tensor(model, i, &info);
        }
        for (size_t i = 0; i < dg_model_n_meta(model); ++i) {
            (void) std::strlen(dg_model_meta_value(model, i));
        }
        dg_model_free(model);
    } else if (dg_last_error()[0] == '\0') {
        std::abort();  // every failure must say why
    }
    return 0;
}
