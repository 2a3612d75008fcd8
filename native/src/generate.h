// Block-diffusion generation: prompt prefill, then canvases denoised by the entropy-bound sampler
// and committed one after another, as transformers' generate runs them (spec section 4). Each step
// runs on the model's device (Context::step); the host sees O(canvas) values per step.
#pragma once

#include "dgemma.h"

#include <cstdint>
#include <vector>

namespace dg {

class Context;

struct GenerateResult {
    std::vector<int32_t>  tokens;          // generated tokens, up to (not including) the first EOS
    std::vector<uint32_t> steps;           // denoising steps per canvas
    uint32_t              n_forwards = 0;
    bool                  hit_eos = false;
    bool                  cancelled = false;
    double                t_prefill = 0.0;   // seconds
    double                t_steps = 0.0;
    double                t_sampler = 0.0;
    double                t_callback = 0.0;
    uint64_t              bytes_to_device = 0;
    uint64_t              bytes_from_device = 0;
};

GenerateResult generate(Context & ctx, const dg_sampler_params & sampler, const int32_t * prompt, uint32_t n_prompt,
                        const dg_generate_params & params);

}  // namespace dg
