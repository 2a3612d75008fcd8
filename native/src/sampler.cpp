#include "sampler.h"

#include "error.h"
#include "gguf_model.h"
#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <thread>
#include <vector>

namespace dg {

namespace {

// Counter-based random numbers: the same (seed, canvas, step, position) always gives the same
// value, whatever the thread that computes it.
uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

struct Rng {
    uint64_t state;
    explicit Rng(uint64_t s) : state(mix(s)) {}
    uint64_t next() { return state = mix(state); }
    // uniform in (0, 1)
    double uniform() { return (static_cast<double>(next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }
    uint32_t below(uint32_t n) { return static_cast<uint32_t>((next() >> 32) * n >> 32); }
};

uint64_t stream_id(uint64_t seed, uint64_t canvas, uint64_t step, uint64_t pos, uint64_t purpose) {
    return mix(mix(mix(mix(seed) ^ canvas) ^ step) ^ (pos * 4 + purpose));
}

float meta_float(const GgufModel & m, const char * key, float fallback) {
    const MetaRecord * r = m.find_meta(key);
    return r != nullptr ? std::strtof(r->value.c_str(), nullptr) : fallback;
}

uint32_t meta_uint(const GgufModel & m, const char * key, uint32_t fallback) {
    const MetaRecord * r = m.find_meta(key);
    return r != nullptr ? static_cast<uint32_t>(std::strtoul(r->value.c_str(), nullptr, 10)) : fallback;
}

}  // namespace

dg_sampler_params sampler_params_from(const GgufModel * model) {
    dg_sampler_params p{};
    p.max_steps            = 48;
    p.t_min                = 0.4f;
    p.t_max                = 0.8f;
    p.entropy_bound        = 0.1f;
    p.stability_threshold  = 1;
    p.confidence_threshold = 0.005f;
    p.seed                 = 0;
    p.n_threads            = 0;
    if (model != nullptr) {  // the converter writes generation_config.json's values as diffusion.eb_*
        p.max_steps            = meta_uint(*model, "diffusion.eb_max_steps", p.max_steps);
        p.t_min                = meta_float(*model, "diffusion.eb_t_min", p.t_min);
        p.t_max                = meta_float(*model, "diffusion.eb_t_max", p.t_max);
        p.entropy_bound        = meta_float(*model, "diffusion.eb_entropy_bound", p.entropy_bound);
        p.stability_threshold  = meta_uint(*model, "diffusion.eb_stability_threshold", p.stability_threshold);
        p.confidence_threshold = meta_float(*model, "diffusion.eb_confidence_threshold", p.confidence_threshold);
        p.n_threads            = model->n_threads();
    }
    return p;
}

Sampler::Sampler(const dg_sampler_params & params, uint32_t canvas_len, uint32_t n_vocab)
    : p_(params), canvas_len_(canvas_len), n_vocab_(n_vocab) {
    if (canvas_len == 0 || n_vocab == 0) {
        fail(DG_ERR_INVALID_ARG, "sampler: canvas length and vocabulary size must be positive");
    }
    if (p_.max_steps == 0) {
        fail(DG_ERR_INVALID_ARG, "sampler: max_steps must be at least 1");
    }
    if (!(p_.t_min > 0.0f) || !(p_.t_max >= p_.t_min)) {
        fail(DG_ERR_INVALID_ARG, format("sampler: need 0 < t_min <= t_max, got t_min %g, t_max %g", p_.t_min, p_.t_max));
    }
    if (p_.stability_threshold > 1024) {
        fail(DG_ERR_INVALID_ARG, "sampler: stability_threshold is too large");
    }
    if (p_.n_threads <= 0) {
        p_.n_threads = static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
    }
}

void Sampler::init_canvas(int32_t * canvas) {
    ++canvas_no_;
    step_ = 0;
    history_.assign(p_.stability_threshold, std::vector<int32_t>(canvas_len_, -1));
    for (uint32_t i = 0; i < canvas_len_; ++i) {
        Rng rng(stream_id(p_.seed, canvas_no_, 0xffffffffull, i, 3));
        canvas[i] = static_cast<int32_t>(rng.below(n_vocab_));
    }
}

float Sampler::temperature() const {
    const uint32_t remaining = p_.max_steps > step_ ? p_.max_steps - step_ : 1;  // HF's cur_step: S, S-1, ..., 1
    return p_.t_min + (p_.t_max - p_.t_min) * (static_cast<float>(remaining) / static_cast<float>(p_.max_steps));
}

RowStats reduce_row(const float * x, uint32_t n_vocab, float u) {
    // pass 1: the max m, its first id, and the count k of ids at it (-inf ids: probability 0)
    float    m      = -INFINITY;
    uint32_t k      = 0;
    int32_t  argmax = 0;
    for (uint32_t i = 0; i < n_vocab; ++i) {
        const float xi = x[i];
        if (xi > m) {
            m      = xi;
            k      = 1;
            argmax = static_cast<int32_t>(i);
        } else if (xi == m) {
            ++k;
        }
    }
    RowStats out;
    out.argmax = argmax;
    out.draw   = argmax;
    out.entropy = 0.0f;
    if (!(m > -INFINITY)) {
        return out;  // every id masked out
    }
    // pass 2: e_i = exp(x_i - m) in float (kept for pass 3), summed in double: r over the ids below
    // the max, v = sum e_i (x_i - m); s = k + r. The entropy is log s - v / s, with
    // log s = log k + log1p(r / k), exact however sharp the row is. A float exp is within an ulp
    // (6e-8 relative) and several times cheaper than a double one.
    thread_local std::vector<float> e;
    e.resize(n_vocab);
    double r = 0.0, v = 0.0;
    for (uint32_t i = 0; i < n_vocab; ++i) {
        const float d  = x[i] - m;  // exact where it matters: Sterbenz for x near m
        const float ei = std::exp(d);
        e[i] = ei > 0.0f ? ei : 0.0f;  // NaN ids too: never drawn
        if (ei > 0.0f && d < 0.0f) {
            r += ei;
            v += static_cast<double>(ei) * d;
        }
    }
    const double s = k + r;
    out.entropy = static_cast<float>(std::log(static_cast<double>(k)) + std::log1p(r / k) - v / s);
    // pass 3: the first id whose cumulative weight reaches u * s (never a zero-probability id)
    const double target = static_cast<double>(u) * s;
    double       cum    = 0.0;
    for (uint32_t i = 0; i < n_vocab; ++i) {
        cum += e[i];
        if (cum >= target && e[i] > 0.0f) {
            out.draw = static_cast<int32_t>(i);
            break;
        }
    }
    return out;
}

void Sampler::uniforms(float * out) const {
    const float below_one = std::nextafter(1.0f, 0.0f);
    for (uint32_t i = 0; i < canvas_len_; ++i) {
        const float u = static_cast<float>(Rng(stream_id(p_.seed, canvas_no_, step_, i, 1)).uniform());
        out[i] = std::min(std::max(u, std::numeric_limits<float>::min()), below_one);
    }
}

dg_step_result Sampler::step(float * logits, int32_t * canvas, int32_t * argmax_out, int32_t * draws_out,
                             uint8_t * accepted_out, float * entropy_out) {
    const float t = temperature();
    std::vector<float> u(canvas_len_);
    uniforms(u.data());
    std::vector<RowStats> rows(canvas_len_);
    const uint32_t n_threads = std::min<uint32_t>(static_cast<uint32_t>(p_.n_threads),
                                                  std::max<uint32_t>(1, canvas_len_ * n_vocab_ / (1u << 16)));
    auto work = [&](unsigned first) {
        for (uint32_t i = first; i < canvas_len_; i += n_threads) {
            float * row = logits + static_cast<size_t>(i) * n_vocab_;
            for (uint32_t j = 0; j < n_vocab_; ++j) {
                row[j] = row[j] / t;  // a division, as transformers' processor does (bit-equal processed logits)
            }
            rows[i] = reduce_row(row, n_vocab_, u[i]);
        }
    };
    run_workers(n_threads, work);
    return decide(rows.data(), canvas, argmax_out, draws_out, accepted_out, entropy_out);
}

dg_step_result Sampler::decide(const RowStats * rows, int32_t * canvas, int32_t * argmax_out, int32_t * draws_out,
                               uint8_t * accepted_out, float * entropy_out) {
    const float t = temperature();
    // Entropy-bound acceptance: positions by ascending entropy; the k-th is accepted while the
    // entropies before it sum to at most the bound (transformers: cumsum - entropy <= bound, f32).
    std::vector<uint32_t> order(canvas_len_);
    std::iota(order.begin(), order.end(), 0u);
    std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return rows[a].entropy < rows[b].entropy; });
    std::vector<uint8_t> accepted(canvas_len_, 0);
    float cumulative = 0.0f;
    dg_step_result res{};
    for (uint32_t k = 0; k < canvas_len_; ++k) {
        const RowStats & r = rows[order[k]];
        cumulative += r.entropy;
        if (cumulative - r.entropy <= p_.entropy_bound) {
            accepted[order[k]] = 1;
            ++res.n_accepted;
        }
    }

    double entropy_sum = 0.0;
    bool   stable      = true;
    for (const auto & past : history_) {
        for (uint32_t i = 0; i < canvas_len_ && stable; ++i) {
            stable = past[i] == rows[i].argmax;
        }
    }
    for (uint32_t i = 0; i < canvas_len_; ++i) {
        entropy_sum += rows[i].entropy;
        if (accepted[i]) {
            canvas[i] = rows[i].draw;
        } else {
            Rng rng(stream_id(p_.seed, canvas_no_, step_, i, 2));
            canvas[i] = static_cast<int32_t>(rng.below(n_vocab_));
        }
        if (argmax_out != nullptr) argmax_out[i] = rows[i].argmax;
        if (draws_out != nullptr) draws_out[i] = rows[i].draw;
        if (accepted_out != nullptr) accepted_out[i] = accepted[i];
        if (entropy_out != nullptr) entropy_out[i] = rows[i].entropy;
    }
    if (!history_.empty()) {
        std::rotate(history_.begin(), history_.begin() + 1, history_.end());
        for (uint32_t i = 0; i < canvas_len_; ++i) {
            history_.back()[i] = rows[i].argmax;
        }
    }
    res.step         = step_;
    res.temperature  = t;
    res.mean_entropy = static_cast<float>(entropy_sum / canvas_len_);
    res.converged    = stable && res.mean_entropy < p_.confidence_threshold;
    ++step_;
    res.stop = res.converged || step_ >= p_.max_steps;
    return res;
}

}  // namespace dg
