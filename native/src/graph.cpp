#include "graph.h"

#include "cpu_activations.h"
#include "cpu_moe_q8.h"
#include "cpu_sampler.h"
#include "cpu_self_cond.h"
#include "gguf_model.h"
#include "kernel_policy.h"
#include "kv_cache.h"
#include "weights.h"

#include "ggml.h"

#include <cmath>
#include <limits>

namespace dg {

namespace {

struct Builder {
    ggml_context *       ctx;
    const dg_hparams &   hp;
    const KernelPolicy & k;
    bool                 own_matmuls;  // k.q8_0_matmul, unless this graph must keep ggml's products

    // weight [K, M] times activations [K, N]
    ggml_tensor * matmul(ggml_tensor * w, ggml_tensor * x) const {
        return own_matmuls && cpu_matmul_q8_0_applies(w, x) ? cpu_matmul_q8_0(ctx, w, x) : ggml_mul_mat(ctx, w, x);
    }
    ggml_tensor * experts_matmul(ggml_tensor * w, ggml_tensor * x, ggml_tensor * ids) const {
        return own_matmuls && cpu_moe_q8_0_applies(w) ? cpu_moe_q8_0(ctx, w, x, ids) : ggml_mul_mat_id(ctx, w, x, ids);
    }

    // RMS_w(x) = x * (mean(x^2) + eps)^-1/2 * w (no +1 offset: Gemma 4 multiplies by w directly).
    ggml_tensor * rms(ggml_tensor * x, ggml_tensor * weight = nullptr) const {
        ggml_tensor * y = ggml_rms_norm(ctx, x, hp.rms_norm_eps);
        return weight != nullptr ? ggml_mul(ctx, y, weight) : y;
    }

    // tanh-approximated GELU in float32 (ggml's own GELU goes through an f16 table): composed from
    // exact f32 ops, or our vectorised kernel.
    ggml_tensor * gelu(ggml_tensor * x) const {
        if (k.activations) {
            return cpu_gelu_tanh(ctx, x);
        }
        const float c = 0.7978845608028654f;  // sqrt(2/pi)
        ggml_tensor * x3    = ggml_mul(ctx, ggml_sqr(ctx, x), x);
        ggml_tensor * inner = ggml_add(ctx, x, ggml_scale(ctx, x3, 0.044715f));
        ggml_tensor * t     = ggml_tanh(ctx, ggml_scale(ctx, inner, c));
        return ggml_mul(ctx, x, ggml_scale_bias(ctx, t, 0.5f, 0.5f));
    }

    ggml_tensor * softcap(ggml_tensor * x, float cap) const {
        if (k.activations) {
            return cpu_softcap(ctx, x, cap);
        }
        return ggml_scale(ctx, ggml_tanh(ctx, ggml_scale(ctx, x, 1.0f / cap)), cap);
    }

    ggml_tensor * gated_mlp(ggml_tensor * x, ggml_tensor * gate, ggml_tensor * up, ggml_tensor * down) const {
        ggml_tensor * g = gelu(matmul(gate, x));
        return matmul(down, ggml_mul(ctx, g, matmul(up, x)));
    }

    // sum_v softmax(sc)_v E[v] for each row of sc [n_vocab, n]: [n_embd, n].
    ggml_tensor * self_cond_mix(ggml_tensor * sc, ggml_tensor * token_embd, ggml_tensor * embd_t, uint32_t top_k) const {
        const int64_t n = sc->ne[1];
        if (top_k == 0) {
            ggml_tensor * probs = ggml_soft_max(ctx, sc);
            return k.self_cond_mix && cpu_self_cond_mix_applies(embd_t, probs) ? cpu_self_cond_mix(ctx, embd_t, probs)
                                                                               : ggml_mul_mat(ctx, embd_t, probs);
        }
        // Approximate: the k largest logits per row, softmax over those only, and the matching
        // embedding rows mixed with a batched [k] x [n_embd, k] product.
        const int64_t kk   = top_k;
        ggml_tensor * idx  = ggml_cont(ctx, ggml_top_k(ctx, sc, static_cast<int>(kk)));                     // I32 [k, n]
        ggml_tensor * top  = ggml_get_rows(ctx, ggml_reshape_3d(ctx, sc, 1, hp.n_vocab, n), idx);           // [1, k, n]
        ggml_tensor * p    = ggml_soft_max(ctx, ggml_reshape_2d(ctx, top, kk, n));                          // [k, n]
        ggml_tensor * rows = ggml_get_rows(ctx, token_embd, ggml_reshape_1d(ctx, idx, kk * n));             // [n_embd, k n]
        ggml_tensor * e_t  = ggml_cont(ctx, ggml_permute(ctx, ggml_reshape_3d(ctx, rows, hp.n_embd, kk, n), 1, 0, 2, 3));
        return ggml_reshape_2d(ctx, ggml_mul_mat(ctx, e_t, ggml_reshape_3d(ctx, p, kk, 1, n)), hp.n_embd, n);
    }

    // The sampler's reductions over processed logits [n_vocab, n] in stock ops (spec section 4):
    //   argmax; d = x - max; e = exp(d); k = #maxima; r = sum over d < 0 of e; v = sum e d;
    //   entropy = log(k + r) - v / (k + r), with log(k + r) = log k + log1p(r / k), so that sharp
    //   rows (r << 1) keep their relative precision in float32;
    //   draw = #{i : cumsum(e)_i < u * sum(e)}: the first id whose cumulative weight reaches u.
    void sampler_rows(ggml_tensor * x, ggml_tensor * uniforms, ForwardTensors & io) const {
        const int64_t n_vocab = x->ne[0];
        const int64_t n       = x->ne[1];
        if (k.sampler) {
            io.rows = cpu_sampler_rows(ctx, x, uniforms);
            return;
        }
        ggml_tensor * am   = ggml_argmax(ctx, x);                                                            // I32 [n]
        ggml_tensor * mx   = ggml_get_rows(ctx, ggml_reshape_3d(ctx, x, 1, n_vocab, n), ggml_reshape_2d(ctx, am, 1, n));
        ggml_tensor * d    = ggml_sub(ctx, x, ggml_reshape_2d(ctx, mx, 1, n));                                // [V, n] <= 0
        ggml_tensor * e    = ggml_exp(ctx, d);
        ggml_tensor * v    = ggml_sum_rows(ctx, ggml_mul(ctx, e, d));                                         // [1, n]
        // Values within tau = |mx|·2^-20 (+ FLT_MIN) of the maximum count as maxima. On the CPU the
        // maximum's own d is exactly 0; on ggml-vulkan (lavapipe) it was seen 1 ulp off in the full
        // step graph (not over uploaded logits), which with "d < 0" left no maximum (k = 0, NaN).
        // Counting an element within tau as weight 1 moves the sums below tau.
        ggml_tensor * tau  = ggml_scale_bias(ctx, ggml_abs(ctx, ggml_reshape_2d(ctx, mx, 1, n)), 1.0f / 1048576.0f,
                                             std::numeric_limits<float>::min());
        ggml_tensor * tail = ggml_step(ctx, ggml_sub(ctx, ggml_neg(ctx, d), tau));                          // 1 where d < -tau
        ggml_tensor * r    = ggml_sum_rows(ctx, ggml_mul(ctx, e, tail));
        ggml_tensor * kmax = ggml_scale_bias(ctx, ggml_sum_rows(ctx, tail), -1.0f, static_cast<float>(n_vocab));
        // log1p(q) = q * log(1 + q) / ((1 + q) - 1), and q where 1 + q rounds to 1 (z = 1 there)
        ggml_tensor * q    = ggml_div(ctx, r, kmax);
        ggml_tensor * q1   = ggml_scale_bias(ctx, q, 1.0f, 1.0f);
        ggml_tensor * den  = ggml_scale_bias(ctx, q1, 1.0f, -1.0f);
        ggml_tensor * z    = ggml_scale_bias(ctx, ggml_step(ctx, den), -1.0f, 1.0f);
        ggml_tensor * l1p  = ggml_mul(ctx, q, ggml_div(ctx, ggml_add(ctx, ggml_log(ctx, q1), z), ggml_add(ctx, den, z)));
        ggml_tensor * s    = ggml_add(ctx, kmax, r);
        io.entropy = ggml_sub(ctx, ggml_add(ctx, ggml_log(ctx, kmax), l1p), ggml_div(ctx, v, s));
        ggml_tensor * cs   = ggml_cumsum(ctx, e);
        ggml_tensor * tot  = ggml_cont(ctx, ggml_view_2d(ctx, cs, 1, n, cs->nb[1], static_cast<size_t>(n_vocab - 1) * cs->nb[0]));
        ggml_tensor * thr  = ggml_mul(ctx, tot, ggml_reshape_2d(ctx, uniforms, 1, n));
        io.draws  = ggml_sum_rows(ctx, ggml_step(ctx, ggml_neg(ctx, ggml_sub(ctx, cs, thr))));             // #(cs < thr)
        io.argmax = am;
    }
};

}  // namespace

void build_sampler(ggml_context * ctx, ggml_cgraph * gf, const dg_hparams & hp, const KernelPolicy & policy,
                   ggml_tensor * logits, ggml_tensor * sc_state, ForwardTensors & io) {
    // 4: processed logits (a division, as transformers' processor does), kept on the device as the
    // next step's self-conditioning input, and the per-position reductions over them.
    const Builder b{ctx, hp, policy, false};
    io.temperature = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 1);
    ggml_set_input(io.temperature);
    io.uniforms = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, logits->ne[1]);
    ggml_set_input(io.uniforms);
    ggml_tensor * processed = ggml_div(ctx, logits, io.temperature);
    if (sc_state != nullptr) {
        // a branch of its own, as the KV cache writes are: the reductions read `processed` itself
        ggml_build_forward_expand(gf, ggml_cpy(ctx, processed, sc_state));
    }
    b.sampler_rows(processed, io.uniforms, io);
    for (ggml_tensor * t : {io.rows, io.argmax, io.draws, io.entropy}) {
        if (t != nullptr) {
            ggml_set_output(t);
            ggml_build_forward_expand(gf, t);
        }
    }
}

ForwardTensors build_forward(ggml_context * ctx, ggml_cgraph * gf, const GgufModel & model, const KvCache & cache,
                             const ForwardShape & shape, const KernelPolicy & policy, ggml_tensor * embd_t,
                             ggml_tensor * sc_state) {
    const dg_hparams &   hp = model.hparams();
    const ModelWeights & W  = model.weights();
    const KvLayout &     kv = cache.layout();
    Builder              b{ctx, hp, policy, policy.q8_0_matmul && !shape.ggml_matmuls_only};
    ForwardTensors       io;
    const bool           encode = shape.pass == Pass::ENCODE;
    const int64_t        n      = shape.n_tokens;
    const int64_t        n_kv[2] = {shape.n_kv_full, kv.slots_swa};  // [0] full layers, [1] sliding layers

    io.tokens = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    ggml_set_input(io.tokens);
    io.positions = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    ggml_set_input(io.positions);
    ggml_tensor * masks[2] = {};
    for (int g = 0; g < 2; ++g) {
        io.slots[g] = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
        ggml_set_input(io.slots[g]);
        if (kv.v_transposed) {
            int64_t row = 0;
            for (const LayerLayout & L : model.layers()) {
                if (L.is_sliding == (g == 1)) {
                    row = static_cast<int64_t>(L.head_dim) * L.n_head_kv;
                }
            }
            io.v_slots[g] = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, row * n);
            ggml_set_input(io.v_slots[g]);
        }
        if (encode) {
            io.mask[g] = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_kv[g], n);
            ggml_set_input(io.mask[g]);
            masks[g] = io.mask[g];
        } else {
            // every canvas query reads the same slots: one row in, repeated on the device
            io.kv_row[g] = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_kv[g]);
            ggml_set_input(io.kv_row[g]);
            ggml_tensor * shape2d = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_kv[g], n);
            masks[g] = ggml_cast(ctx, ggml_repeat(ctx, ggml_reshape_2d(ctx, io.kv_row[g], n_kv[g], 1), shape2d), GGML_TYPE_F16);
        }
    }

    // 3.1 input embedding: E[t] * sqrt(n_embd); canvas rows go through self-conditioning and a
    // scale-free RMS norm (with no self-conditioning signal its MLP contributes exactly zero).
    ggml_tensor * x = ggml_scale(ctx, ggml_get_rows(ctx, W.token_embd, io.tokens), std::sqrt(static_cast<float>(hp.n_embd)));
    if (!encode) {
        ggml_tensor * sc_in = nullptr;
        if (shape.self_cond == SelfCond::HOST) {
            io.sc_logits = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, hp.n_vocab, n);
            ggml_set_input(io.sc_logits);
            sc_in = io.sc_logits;
        } else if (shape.self_cond == SelfCond::DEVICE) {
            sc_in = sc_state;
        }
        if (sc_in != nullptr) {
            ggml_tensor * mixed = b.self_cond_mix(sc_in, W.token_embd, embd_t, shape.sc_top_k);
            ggml_tensor * soft  = ggml_scale(ctx, mixed, std::sqrt(static_cast<float>(hp.n_embd)));
            x = ggml_add(ctx, x, b.gated_mlp(b.rms(soft, W.sc_norm), W.sc_gate, W.sc_up, W.sc_down));
        }
        x = b.rms(x);
    }

    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const LayerLayout &  L   = model.layers()[il];
        const LayerWeights & w   = W.layers[il];
        const int64_t        hd  = L.head_dim;
        const int64_t        nkv = L.n_head_kv;
        ggml_tensor *        h   = x;

        // 3.2 attention
        ggml_tensor * a     = b.rms(h, w.attn_norm);
        ggml_tensor * q     = ggml_reshape_3d(ctx, b.matmul(w.wq, a), hd, hp.n_head, n);
        ggml_tensor * k_raw = ggml_reshape_3d(ctx, b.matmul(w.wk, a), hd, nkv, n);
        ggml_tensor * v     = w.wv != nullptr ? ggml_reshape_3d(ctx, b.matmul(w.wv, a), hd, nkv, n)
                                              : k_raw;  // full layers: V is the raw K projection
        q = b.rms(q, w.q_norm);
        ggml_tensor * k = b.rms(k_raw, w.k_norm);
        v = b.rms(v);
        if (L.is_sliding) {
            q = ggml_rope_ext(ctx, q, io.positions, nullptr, static_cast<int>(hp.n_rot_swa), GGML_ROPE_TYPE_NEOX,
                              static_cast<int>(hp.n_ctx_train), hp.rope_freq_base_swa, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f);
            k = ggml_rope_ext(ctx, k, io.positions, nullptr, static_cast<int>(hp.n_rot_swa), GGML_ROPE_TYPE_NEOX,
                              static_cast<int>(hp.n_ctx_train), hp.rope_freq_base_swa, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f);
        } else {
            // proportional RoPE: rope_freqs divides the frequency of unrotated pairs by 1e30
            q = ggml_rope_ext(ctx, q, io.positions, W.rope_freqs, static_cast<int>(hp.n_rot), GGML_ROPE_TYPE_NEOX,
                              static_cast<int>(hp.n_ctx_train), hp.rope_freq_base, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f);
            k = ggml_rope_ext(ctx, k, io.positions, W.rope_freqs, static_cast<int>(hp.n_rot), GGML_ROPE_TYPE_NEOX,
                              static_cast<int>(hp.n_ctx_train), hp.rope_freq_base, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f);
        }

        // Keys and values: this pass's go into the slots of its positions; the pass then reads one
        // view of the slots (the prefix and itself), masked by the positions they hold.
        const int      g     = L.is_sliding ? 1 : 0;
        const int64_t  T     = n_kv[g];
        const int64_t  row   = hd * nkv;
        ggml_tensor *  ck    = cache.k(il);
        ggml_tensor *  cv    = cache.v(il);
        ggml_tensor *  k_set = ggml_set_rows(ctx, ck, ggml_reshape_2d(ctx, k, row, n), io.slots[g]);
        ggml_tensor *  v_set = kv.v_transposed
                                   ? ggml_set_rows(ctx, ggml_reshape_2d(ctx, cv, 1, ggml_nelements(cv)),
                                                   ggml_reshape_2d(ctx, v, 1, row * n), io.v_slots[g])
                                   : ggml_set_rows(ctx, cv, ggml_reshape_2d(ctx, v, row, n), io.slots[g]);
        if (encode && il + 1 == hp.n_layer) {
            ggml_build_forward_expand(gf, k_set);  // the encoder's last layer only has to fill the cache
            ggml_build_forward_expand(gf, v_set);
            break;
        }
        const size_t   es_k  = ggml_row_size(ck->type, hd);  // one head's bytes in a slot
        ggml_tensor *  keys  = ggml_view_3d(ctx, k_set, hd, T, nkv, ck->nb[1], es_k, 0);  // [hd, T, nkv]
        ggml_tensor *  att;
        if (shape.flash_attn) {
            ggml_tensor * vals = ggml_view_3d(ctx, v_set, hd, T, nkv, cv->nb[1], ggml_row_size(cv->type, hd), 0);
            ggml_tensor * fa   = ggml_flash_attn_ext(ctx, ggml_permute(ctx, q, 0, 2, 1, 3), keys, vals, masks[g], 1.0f, 0.0f, 0.0f);
            ggml_flash_attn_ext_set_prec(fa, GGML_PREC_F32);
            att = ggml_reshape_2d(ctx, fa, hd * hp.n_head, n);  // [hd, n_head, n] -> rows of n_head * hd
        } else {
            // A contiguous q lets ggml's tiled matmul (llamafile) take the scores; it is the pass's own.
            ggml_tensor * kq = ggml_mul_mat(ctx, keys, ggml_cont(ctx, ggml_permute(ctx, q, 0, 2, 1, 3)));  // [T, n, n_head]
            kq = ggml_soft_max_ext(ctx, kq, masks[g], 1.0f, 0.0f);  // scale 1.0: no 1/sqrt(d)
            const size_t  es_v = ggml_element_size(cv);
            const int64_t S    = cv->ne[0];  // slots: V^T is [slots, hd * nkv]
            ggml_tensor * v_t  = ggml_view_3d(ctx, v_set, T, hd, nkv, S * es_v, S * es_v * hd, 0);  // [T, hd, nkv]
            att = ggml_mul_mat(ctx, v_t, kq);                                                      // [hd, n, n_head]
            att = ggml_cont_2d(ctx, ggml_permute(ctx, att, 0, 2, 1, 3), hd * hp.n_head, n);
        }
        ggml_tensor * r = ggml_add(ctx, h, b.rms(b.matmul(w.wo, att), w.post_attention_norm));

        // 3.2.5 dense MLP
        ggml_tensor * m = b.rms(b.gated_mlp(b.rms(r, w.ffn_norm), w.ffn_gate, w.ffn_up, w.ffn_down), w.post_ffw_norm_1);

        // 3.2.6 router on the un-normed residual
        ggml_tensor * ri = ggml_scale(ctx, ggml_mul(ctx, ggml_rms_norm(ctx, r, hp.rms_norm_eps), w.gate_inp_scale),
                                      1.0f / std::sqrt(static_cast<float>(hp.n_embd)));
        ggml_tensor * probs   = ggml_soft_max(ctx, ggml_mul_mat(ctx, w.gate_inp, ri));                    // [n_expert, n]
        ggml_tensor * experts = ggml_top_k(ctx, probs, static_cast<int>(hp.n_expert_used));              // [k, n]
        ggml_tensor * weights = ggml_get_rows(ctx, ggml_reshape_3d(ctx, probs, 1, hp.n_expert, n), experts);  // [1, k, n]
        weights = ggml_reshape_2d(ctx, weights, hp.n_expert_used, n);
        weights = ggml_div(ctx, weights, ggml_sum_rows(ctx, weights));
        ggml_tensor * per_expert = ggml_get_rows(ctx, ggml_reshape_2d(ctx, w.down_exps_scale, 1, hp.n_expert),
                                                 ggml_reshape_1d(ctx, experts, hp.n_expert_used * n));
        weights = ggml_mul(ctx, weights, ggml_reshape_2d(ctx, per_expert, hp.n_expert_used, n));

        // 3.2.7 experts
        ggml_tensor * x2 = ggml_reshape_3d(ctx, b.rms(r, w.pre_ffw_norm_2), hp.n_embd, 1, n);
        ggml_tensor * gate;
        ggml_tensor * up;
        if (w.gate_up_exps != nullptr) {
            ggml_tensor * gu = b.experts_matmul(w.gate_up_exps, x2, experts);  // [2 * n_ff_exp, k, n]
            gate = ggml_cont(ctx, ggml_view_3d(ctx, gu, hp.n_ff_exp, hp.n_expert_used, n, gu->nb[1], gu->nb[2], 0));
            up   = ggml_cont(ctx, ggml_view_3d(ctx, gu, hp.n_ff_exp, hp.n_expert_used, n, gu->nb[1], gu->nb[2],
                                              gu->nb[0] * hp.n_ff_exp));
        } else {
            gate = b.experts_matmul(w.gate_exps, x2, experts);
            up   = b.experts_matmul(w.up_exps, x2, experts);
        }
        ggml_tensor * act  = ggml_mul(ctx, b.gelu(gate), up);
        ggml_tensor * down = b.experts_matmul(w.down_exps, act, experts);  // [n_embd, k, n]
        down = ggml_mul(ctx, down, ggml_reshape_3d(ctx, weights, 1, hp.n_expert_used, n));
        ggml_tensor * y = ggml_view_2d(ctx, down, hp.n_embd, n, down->nb[2], 0);
        for (uint32_t j = 1; j < hp.n_expert_used; ++j) {
            y = ggml_add(ctx, y, ggml_view_2d(ctx, down, hp.n_embd, n, down->nb[2], down->nb[1] * j));
        }
        ggml_tensor * moe = b.rms(y, w.post_ffw_norm_2);

        // 3.2.8-9 combine, residual, layer scalar on the whole stream
        ggml_tensor * out = ggml_add(ctx, r, b.rms(ggml_add(ctx, m, moe), w.post_ffw_norm));
        x = ggml_mul(ctx, out, encode ? w.enc_output_scale : w.dec_output_scale);
    }

    if (encode) {
        return io;
    }
    // 3.3 output: final norm, tied (or separate) head, softcap
    ggml_tensor * logits = b.matmul(W.head(), b.rms(x, W.output_norm));
    if (hp.final_logit_softcap > 0.0f) {
        logits = b.softcap(logits, hp.final_logit_softcap);
    }
    io.logits = logits;
    if (!shape.sample) {
        ggml_set_output(logits);
        ggml_build_forward_expand(gf, logits);
        return io;
    }
    build_sampler(ctx, gf, hp, policy, logits, sc_state, io);
    return io;
}

}  // namespace dg
