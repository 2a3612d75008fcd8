// The entropy-bound ("EB") sampler of DiffusionGemma (spec section 4), as transformers'
// EntropyBoundSampler, LinearTemperatureScheduleLogitsProcessor and
// StableAndConfidentStoppingCriteria run it.
//
// A step has two halves. The per-position reductions over the vocabulary (entropy, argmax and a
// categorical draw from softmax(logits / t)) run where the logits are: in the step graph on the
// model's device (graph.cpp), or on the host over logits given to step(). The decisions (sort the
// entropies, accept the lowest while their sum stays within the bound, re-noise the rest, the stop
// rule) are O(canvas) and run on the host in decide(). Both halves draw their random numbers from
// counter-based streams of (seed, canvas, step, position): one uniform per position for the
// categorical draw (inverse CDF), so a device and the host draw the same token from the same
// distribution.
#pragma once

#include "dgemma.h"

#include <cstdint>
#include <vector>

namespace dg {

class GgufModel;

dg_sampler_params sampler_params_from(const GgufModel * model);

// What the reductions give for one position.
struct RowStats {
    float   entropy = 0.0f;  // of softmax(processed), nats
    int32_t argmax = 0;      // the first maximum
    int32_t draw = 0;        // the categorical sample: the first id whose cumulative probability reaches u
};

// The reductions over one row of processed logits (already divided by the temperature), in double
// precision: entropy = log s - (sum e_i d_i) / s with d_i = x_i - max, e_i = exp(d_i), s = sum e_i;
// the draw by inverse CDF with `u` in (0, 1). Tokens at -inf have probability 0.
RowStats reduce_row(const float * processed, uint32_t n_vocab, float u);

class Sampler {
public:
    Sampler(const dg_sampler_params & params, uint32_t canvas_len, uint32_t n_vocab);

    // A fresh canvas of uniform random ids; restarts the step count and the stability history.
    void init_canvas(int32_t * canvas);
    // Temperature of the next step: t_min + (t_max - t_min) * remaining / max_steps.
    float temperature() const;
    // The categorical draw's uniform for each position of the next step, in (0, 1).
    void uniforms(float * out) const;
    // The host half of a step from its reductions: `canvas` becomes the next canvas (accepted
    // draws, the rest re-noised); advances the step. Optional outputs may be null.
    dg_step_result decide(const RowStats * rows, int32_t * canvas, int32_t * argmax_out, int32_t * draws_out,
                          uint8_t * accepted_out, float * entropy_out);
    // A whole step on the host: `logits` (raw, [canvas][vocab]) become the processed logits (divided
    // by the temperature: the self-conditioning input of the next denoise), then reduce_row on each
    // row with uniforms(), then decide().
    dg_step_result step(float * logits, int32_t * canvas, int32_t * argmax_out, int32_t * draws_out,
                        uint8_t * accepted_out, float * entropy_out);

    uint32_t canvas_len() const { return canvas_len_; }
    uint32_t n_vocab() const { return n_vocab_; }

private:
    dg_sampler_params             p_;
    uint32_t                      canvas_len_;
    uint32_t                      n_vocab_;
    uint32_t                      step_ = 0;     // steps done on this canvas
    uint64_t                      canvas_no_ = 0;
    std::vector<std::vector<int32_t>> history_;  // last stability_threshold argmax canvases
};

}  // namespace dg
