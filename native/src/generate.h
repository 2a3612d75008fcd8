// Block-diffusion generation: prompt prefill, then canvases denoised by the entropy-bound sampler
// and committed one after another, as transformers' generate runs them (spec section 4).
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
};

GenerateResult generate(Context & ctx, const dg_sampler_params & sampler, const int32_t * prompt, uint32_t n_prompt,
                        const dg_generate_params & params);

}  // namespace dg
