// The entropy-bound ("EB") sampler of DiffusionGemma (spec section 4), as transformers'
// EntropyBoundSampler, LinearTemperatureScheduleLogitsProcessor and
// StableAndConfidentStoppingCriteria run it, on the CPU.
#pragma once

#include "dgemma.h"

#include <cstdint>
#include <vector>

namespace dg {

class GgufModel;

dg_sampler_params sampler_params_from(const GgufModel * model);

class Sampler {
public:
    Sampler(const dg_sampler_params & params, uint32_t canvas_len, uint32_t n_vocab);

    // A fresh canvas of uniform random ids; restarts the step count and the stability history.
    void init_canvas(int32_t * canvas);
    // Temperature of the next step: t_min + (t_max - t_min) * remaining / max_steps.
    float temperature() const;
    // One step: `logits` (raw, [canvas][vocab]) become the processed logits (divided by the
    // temperature: the self-conditioning input of the next denoise); `canvas` becomes the next
    // canvas (accepted samples, the rest re-noised). Optional outputs may be null.
    dg_step_result step(float * logits, int32_t * canvas, int32_t * argmax_out, int32_t * draws_out,
                        uint8_t * accepted_out, float * entropy_out);

private:
    struct RowStats {
        float   entropy;
        int32_t argmax;
        int32_t draw;
    };
    RowStats row(float * x, float t, uint64_t stream) const;

    dg_sampler_params             p_;
    uint32_t                      canvas_len_;
    uint32_t                      n_vocab_;
    uint32_t                      step_ = 0;     // steps done on this canvas
    uint64_t                      canvas_no_ = 0;
    std::vector<std::vector<int32_t>> history_;  // last stability_threshold argmax canvases
};

}  // namespace dg
