#include "generate.h"

#include "context.h"
#include "error.h"
#include "gguf_model.h"
#include "sampler.h"

#include <algorithm>
#include <chrono>

namespace dg {

namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

}  // namespace

GenerateResult generate(Context & ctx, const dg_sampler_params & sampler_params, const int32_t * prompt, uint32_t n_prompt,
                        const dg_generate_params & params) {
    const dg_hparams & hp = ctx.model().hparams();
    const uint32_t     C  = hp.canvas_length;
    const uint32_t     V  = hp.n_vocab;
    if (params.max_new_tokens == 0) {
        fail(DG_ERR_INVALID_ARG, "generate: max_new_tokens must be at least 1");
    }
    const uint32_t n_canvases = (params.max_new_tokens + C - 1) / C;
    const uint64_t needed     = static_cast<uint64_t>(ctx.n_past()) + n_prompt + static_cast<uint64_t>(n_canvases) * C;
    if (needed > ctx.n_ctx()) {
        fail(DG_ERR_INVALID_ARG, format("generate: %u cached + %u prompt tokens + %u canvas%s of %u do not fit in n_ctx = %u",
                                        ctx.n_past(), n_prompt, n_canvases, n_canvases == 1 ? "" : "es", C, ctx.n_ctx()));
    }
    if (n_prompt == 0 && ctx.n_past() == 0) {
        fail(DG_ERR_INVALID_ARG, "generate: empty prompt");
    }
    GenerateResult out;
    Sampler        sampler(sampler_params, C, V);
    if (n_prompt > 0) {
        const auto t0 = Clock::now();
        ctx.prefill(prompt, n_prompt);
        out.t_prefill += since(t0);
    }

    std::vector<RowStats> rows(C);
    std::vector<float>    uniforms(C);
    std::vector<int32_t>  canvas(C), argmax(C);
    std::vector<uint8_t>  accepted(C);
    const StepStats       before = ctx.step_stats();
    auto finish = [&] {
        out.t_steps           = ctx.step_stats().seconds - before.seconds;
        out.bytes_to_device   = ctx.step_stats().bytes_to_device - before.bytes_to_device;
        out.bytes_from_device = ctx.step_stats().bytes_from_device - before.bytes_from_device;
        return out;
    };
    auto is_eos = [&](int32_t id) { return std::find(params.eos_ids, params.eos_ids + params.n_eos, id) != params.eos_ids + params.n_eos; };

    for (uint32_t c = 0; c < n_canvases; ++c) {
        sampler.init_canvas(canvas.data());
        bool have_sc = false;
        for (;;) {
            // the processed logits of the previous step (on the device) are this step's
            // self-conditioning input
            sampler.uniforms(uniforms.data());
            ctx.step(canvas.data(), C, sampler.temperature(), uniforms.data(), have_sc && hp.has_self_conditioning, rows.data());
            ++out.n_forwards;
            const auto           t0  = Clock::now();
            const dg_step_result res = sampler.decide(rows.data(), canvas.data(), argmax.data(), nullptr, accepted.data(), nullptr);
            out.t_sampler += since(t0);
            have_sc = true;
            if (params.on_step != nullptr) {
                dg_step_event ev{};
                ev.canvas       = c;
                ev.step         = res.step;
                ev.temperature  = res.temperature;
                ev.mean_entropy = res.mean_entropy;
                ev.n_accepted   = res.n_accepted;
                ev.converged    = res.converged;
                ev.stop         = res.stop;
                ev.canvas_len   = C;
                ev.argmax       = argmax.data();
                ev.canvas_ids   = canvas.data();
                ev.accepted     = accepted.data();
                const auto t1   = Clock::now();
                const bool keep = params.on_step(&ev, params.user_data);
                out.t_callback += since(t1);
                if (!keep) {
                    out.steps.push_back(res.step + 1);
                    out.cancelled = true;
                    return finish();
                }
            }
            if (res.stop) {
                out.steps.push_back(res.step + 1);
                break;
            }
        }
        // the canvas's answer is its last argmax; the first end-of-generation token ends the text
        const uint32_t room = params.max_new_tokens - static_cast<uint32_t>(out.tokens.size());
        for (uint32_t i = 0; i < C && i < room; ++i) {
            if (is_eos(argmax[i])) {
                out.hit_eos = true;
                return finish();
            }
            out.tokens.push_back(argmax[i]);
        }
        if (c + 1 < n_canvases) {
            const auto t0 = Clock::now();
            ctx.commit(argmax.data(), C);  // the argmax canvas joins the prefix, as transformers does
            out.t_prefill += since(t0);
        }
    }
    return finish();
}

}  // namespace dg
