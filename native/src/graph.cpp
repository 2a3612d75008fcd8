#include "graph.h"

#include "cpu_activations.h"
#include "cpu_moe_q8.h"
#include "cpu_self_cond.h"
#include "error.h"
#include "gguf_model.h"
#include "kv_cache.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <cmath>
#include <cstdlib>
#include <string>

namespace dg {

namespace {

struct Builder {
    ggml_context *     ctx;
    const GgufModel &  model;
    const dg_hparams & hp;
    bool               cpu;       // the graph runs on the CPU backend: use our vectorised activations
    bool               own_mm;    // our CPU matmul kernels may replace ggml_mul_mat / ggml_mul_mat_id

    // weight [K, M] times activations [K, N]
    ggml_tensor * matmul(ggml_tensor * w, ggml_tensor * x) const {
        return own_mm && cpu_matmul_q8_0_applies(w, x) ? cpu_matmul_q8_0(ctx, w, x) : ggml_mul_mat(ctx, w, x);
    }
    ggml_tensor * experts_matmul(ggml_tensor * w, ggml_tensor * x, ggml_tensor * ids) const {
        return own_mm && cpu_moe_q8_0_applies(w) ? cpu_moe_q8_0(ctx, w, x, ids) : ggml_mul_mat_id(ctx, w, x, ids);
    }

    ggml_tensor * w(const std::string & name) const {
        ggml_tensor * t = model.weight(name);
        if (t == nullptr) {
            fail(DG_ERR_FORMAT, format("missing tensor '%s'", name.c_str()));
        }
        return t;
    }
    ggml_tensor * w_or_null(const std::string & name) const { return model.weight(name); }

    // RMS_w(x) = x * (mean(x^2) + eps)^-1/2 * w (no +1 offset: Gemma 4 multiplies by w directly).
    ggml_tensor * rms(ggml_tensor * x, ggml_tensor * weight = nullptr) const {
        ggml_tensor * y = ggml_rms_norm(ctx, x, hp.rms_norm_eps);
        return weight != nullptr ? ggml_mul(ctx, y, weight) : y;
    }

    // tanh-approximated GELU in float32 (ggml's own GELU goes through an f16 table): our vectorised
    // kernel on the CPU, elsewhere composed from exact f32 ops.
    ggml_tensor * gelu(ggml_tensor * x) const {
        if (cpu) {
            return cpu_gelu_tanh(ctx, x);
        }
        const float k = 0.7978845608028654f;  // sqrt(2/pi)
        ggml_tensor * x3    = ggml_mul(ctx, ggml_sqr(ctx, x), x);
        ggml_tensor * inner = ggml_add(ctx, x, ggml_scale(ctx, x3, 0.044715f));
        ggml_tensor * t     = ggml_tanh(ctx, ggml_scale(ctx, inner, k));
        return ggml_mul(ctx, x, ggml_scale_bias(ctx, t, 0.5f, 0.5f));
    }

    ggml_tensor * gated_mlp(ggml_tensor * x, ggml_tensor * gate, ggml_tensor * up, ggml_tensor * down) const {
        ggml_tensor * g = gelu(matmul(gate, x));
        return matmul(down, ggml_mul(ctx, g, matmul(up, x)));
    }
};

}  // namespace

uint32_t swa_kv_start(uint32_t n_past, uint32_t sliding_window) {
    const uint32_t keep = sliding_window > 0 ? sliding_window - 1 : 0;
    return n_past > keep ? n_past - keep : 0;
}

ForwardTensors build_forward(ggml_context * ctx, ggml_cgraph * gf, const GgufModel & model, const KvCache & cache,
                             const ForwardShape & shape, ggml_tensor * embd_t) {
    const dg_hparams & hp = model.hparams();
    const bool         cpu = ggml_backend_dev_type(model.device()) == GGML_BACKEND_DEVICE_TYPE_CPU;
    // DGEMMA_NO_CPU_KERNELS=1 keeps ggml's own matmuls everywhere (for comparisons and bisecting).
    const bool         own_mm = cpu && !shape.ggml_matmuls_only && std::getenv("DGEMMA_NO_CPU_KERNELS") == nullptr;
    Builder            b{ctx, model, hp, cpu, own_mm};
    ForwardTensors     io;
    const bool         encode = shape.pass == Pass::ENCODE;
    const int64_t      n      = shape.n_tokens;
    const uint32_t     n_past = shape.n_past;
    io.kv_start_swa           = swa_kv_start(n_past, hp.sliding_window);

    io.tokens = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    ggml_set_input(io.tokens);
    io.positions = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    ggml_set_input(io.positions);
    if (encode) {
        io.mask_full = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_past + n, n);
        io.mask_swa  = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_past - io.kv_start_swa + n, n);
        ggml_set_input(io.mask_full);
        ggml_set_input(io.mask_swa);
    }

    // 3.1 input embedding: E[t] * sqrt(n_embd); canvas rows go through self-conditioning and a
    // scale-free RMS norm (with no self-conditioning signal its MLP contributes exactly zero).
    ggml_tensor * token_embd = b.w("token_embd.weight");
    ggml_tensor * x = ggml_scale(ctx, ggml_get_rows(ctx, token_embd, io.tokens), std::sqrt(static_cast<float>(hp.n_embd)));
    if (!encode) {
        if (shape.self_cond) {
            io.sc_logits = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, hp.n_vocab, n);
            ggml_set_input(io.sc_logits);
            ggml_tensor * mixed = nullptr;  // sum_v softmax(sc)_v E[v], [n_embd, n]
            if (shape.sc_top_k == 0) {
                ggml_tensor * probs = ggml_soft_max(ctx, io.sc_logits);
                mixed = b.own_mm && cpu_self_cond_mix_applies(embd_t, probs) ? cpu_self_cond_mix(ctx, embd_t, probs)
                                                                              : ggml_mul_mat(ctx, embd_t, probs);
            } else {
                // Approximate: the k largest logits per row, softmax over those only, and the
                // matching embedding rows mixed with a batched [k] x [n_embd, k] product.
                const int64_t k    = shape.sc_top_k;
                ggml_tensor * idx  = ggml_cont(ctx, ggml_top_k(ctx, io.sc_logits, static_cast<int>(k)));   // I32 [k, n]
                ggml_tensor * top  = ggml_get_rows(ctx, ggml_reshape_3d(ctx, io.sc_logits, 1, hp.n_vocab, n), idx);  // [1, k, n]
                ggml_tensor * p    = ggml_soft_max(ctx, ggml_reshape_2d(ctx, top, k, n));                 // [k, n]
                ggml_tensor * rows = ggml_get_rows(ctx, token_embd, ggml_reshape_1d(ctx, idx, k * n));    // [n_embd, k n]
                ggml_tensor * e_t  = ggml_cont(ctx, ggml_permute(ctx, ggml_reshape_3d(ctx, rows, hp.n_embd, k, n), 1, 0, 2, 3));
                mixed = ggml_reshape_2d(ctx, ggml_mul_mat(ctx, e_t, ggml_reshape_3d(ctx, p, k, 1, n)), hp.n_embd, n);
            }
            ggml_tensor * soft  = ggml_scale(ctx, mixed, std::sqrt(static_cast<float>(hp.n_embd)));
            ggml_tensor * norm  = b.w_or_null("self_cond_pre_norm.weight");
            if (norm == nullptr) {
                norm = b.w("self_cond_norm.weight");
            }
            ggml_tensor * sc = b.gated_mlp(b.rms(soft, norm), b.w("self_cond_gate.weight"), b.w("self_cond_up.weight"),
                                           b.w("self_cond_down.weight"));
            x = ggml_add(ctx, x, sc);
        }
        x = b.rms(x);
    }

    ggml_tensor * rope_freqs = b.w("rope_freqs.weight");
    const float   kq_scale   = 1.0f;

    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const LayerLayout & L   = model.layers()[il];
        const std::string   p   = format("blk.%u.", il);
        const int64_t       hd  = L.head_dim;
        const int64_t       nkv = L.n_head_kv;
        ggml_tensor *       h   = x;

        // 3.2 attention
        ggml_tensor * a     = b.rms(h, b.w(p + "attn_norm.weight"));
        ggml_tensor * q     = ggml_reshape_3d(ctx, b.matmul(b.w(p + "attn_q.weight"), a), hd, hp.n_head, n);
        ggml_tensor * k_raw = ggml_reshape_3d(ctx, b.matmul(b.w(p + "attn_k.weight"), a), hd, nkv, n);
        ggml_tensor * v = L.has_v_proj ? ggml_reshape_3d(ctx, b.matmul(b.w(p + "attn_v.weight"), a), hd, nkv, n)
                                       : k_raw;  // full layers: V is the raw K projection
        q = b.rms(q, b.w(p + "attn_q_norm.weight"));
        ggml_tensor * k = b.rms(k_raw, b.w(p + "attn_k_norm.weight"));
        v = b.rms(v);
        if (L.is_sliding) {
            q = ggml_rope_ext(ctx, q, io.positions, nullptr, static_cast<int>(hp.n_rot_swa), GGML_ROPE_TYPE_NEOX,
                              static_cast<int>(hp.n_ctx_train), hp.rope_freq_base_swa, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f);
            k = ggml_rope_ext(ctx, k, io.positions, nullptr, static_cast<int>(hp.n_rot_swa), GGML_ROPE_TYPE_NEOX,
                              static_cast<int>(hp.n_ctx_train), hp.rope_freq_base_swa, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f);
        } else {
            // proportional RoPE: rope_freqs divides the frequency of unrotated pairs by 1e30
            q = ggml_rope_ext(ctx, q, io.positions, rope_freqs, static_cast<int>(hp.n_rot), GGML_ROPE_TYPE_NEOX,
                              static_cast<int>(hp.n_ctx_train), hp.rope_freq_base, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f);
            k = ggml_rope_ext(ctx, k, io.positions, rope_freqs, static_cast<int>(hp.n_rot), GGML_ROPE_TYPE_NEOX,
                              static_cast<int>(hp.n_ctx_train), hp.rope_freq_base, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f);
        }

        // Keys and values: [cached prefix (the window for sliding layers) | this pass]
        ggml_tensor *  ck    = cache.k(il);
        ggml_tensor *  cv    = cache.v(il);
        const uint32_t start = L.is_sliding ? io.kv_start_swa : 0;
        ggml_tensor *  k_all = k;
        ggml_tensor *  v_all = v;
        if (n_past > start) {
            ggml_tensor * k_old = ggml_view_3d(ctx, ck, hd, nkv, n_past - start, ck->nb[1], ck->nb[2], ck->nb[2] * start);
            ggml_tensor * v_old = ggml_view_3d(ctx, cv, hd, nkv, n_past - start, cv->nb[1], cv->nb[2], cv->nb[2] * start);
            k_all = ggml_concat(ctx, k_old, k, 2);
            v_all = ggml_concat(ctx, v_old, v, 2);
        }
        if (encode) {
            ggml_build_forward_expand(gf, ggml_cpy(ctx, k, ggml_view_3d(ctx, ck, hd, nkv, n, ck->nb[1], ck->nb[2], ck->nb[2] * n_past)));
            ggml_build_forward_expand(gf, ggml_cpy(ctx, v, ggml_view_3d(ctx, cv, hd, nkv, n, cv->nb[1], cv->nb[2], cv->nb[2] * n_past)));
            if (il + 1 == hp.n_layer) {
                break;  // the encoder's last layer only has to fill the cache
            }
        }
        // Contiguous operands let ggml's tiled matmul (llamafile) take the scores; the copies are small.
        ggml_tensor * kq = ggml_mul_mat(ctx, ggml_cont(ctx, ggml_permute(ctx, k_all, 0, 2, 1, 3)),
                                        ggml_cont(ctx, ggml_permute(ctx, q, 0, 2, 1, 3)));
        ggml_tensor * mask = encode ? (L.is_sliding ? io.mask_swa : io.mask_full) : nullptr;
        kq = ggml_soft_max_ext(ctx, kq, mask, kq_scale, 0.0f);
        ggml_tensor * v_t = ggml_cont(ctx, ggml_permute(ctx, v_all, 1, 2, 0, 3));  // [T, hd, nkv]
        ggml_tensor * att = ggml_mul_mat(ctx, v_t, kq);                            // [hd, n, n_head]
        att = ggml_cont_2d(ctx, ggml_permute(ctx, att, 0, 2, 1, 3), hd * hp.n_head, n);
        ggml_tensor * o = b.matmul(b.w(p + "attn_output.weight"), att);
        ggml_tensor * r = ggml_add(ctx, h, b.rms(o, b.w(p + "post_attention_norm.weight")));

        // 3.2.5 dense MLP
        ggml_tensor * m = b.gated_mlp(b.rms(r, b.w(p + "ffn_norm.weight")), b.w(p + "ffn_gate.weight"),
                                      b.w(p + "ffn_up.weight"), b.w(p + "ffn_down.weight"));
        m = b.rms(m, b.w(p + "post_ffw_norm_1.weight"));

        // 3.2.6 router on the un-normed residual
        ggml_tensor * ri = ggml_scale(ctx, ggml_mul(ctx, ggml_rms_norm(ctx, r, hp.rms_norm_eps), b.w(p + "ffn_gate_inp.scale")),
                                      1.0f / std::sqrt(static_cast<float>(hp.n_embd)));
        ggml_tensor * probs   = ggml_soft_max(ctx, ggml_mul_mat(ctx, b.w(p + "ffn_gate_inp.weight"), ri));  // [n_expert, n]
        ggml_tensor * experts = ggml_top_k(ctx, probs, static_cast<int>(hp.n_expert_used));                // [k, n]
        ggml_tensor * weights = ggml_get_rows(ctx, ggml_reshape_3d(ctx, probs, 1, hp.n_expert, n), experts);  // [1, k, n]
        weights = ggml_reshape_2d(ctx, weights, hp.n_expert_used, n);
        weights = ggml_div(ctx, weights, ggml_sum_rows(ctx, weights));
        ggml_tensor * per_expert = ggml_get_rows(ctx, ggml_reshape_2d(ctx, b.w(p + "ffn_down_exps.scale"), 1, hp.n_expert),
                                                 ggml_reshape_1d(ctx, experts, hp.n_expert_used * n));
        weights = ggml_mul(ctx, weights, ggml_reshape_2d(ctx, per_expert, hp.n_expert_used, n));

        // 3.2.7 experts
        ggml_tensor * x2 = ggml_reshape_3d(ctx, b.rms(r, b.w(p + "pre_ffw_norm_2.weight")), hp.n_embd, 1, n);
        ggml_tensor * gate;
        ggml_tensor * up;
        if (ggml_tensor * gate_up = b.w_or_null(p + "ffn_gate_up_exps.weight")) {
            ggml_tensor * gu = b.experts_matmul(gate_up, x2, experts);  // [2 * n_ff_exp, k, n]
            gate = ggml_cont(ctx, ggml_view_3d(ctx, gu, hp.n_ff_exp, hp.n_expert_used, n, gu->nb[1], gu->nb[2], 0));
            up   = ggml_cont(ctx, ggml_view_3d(ctx, gu, hp.n_ff_exp, hp.n_expert_used, n, gu->nb[1], gu->nb[2],
                                              gu->nb[0] * hp.n_ff_exp));
        } else {
            gate = b.experts_matmul(b.w(p + "ffn_gate_exps.weight"), x2, experts);
            up   = b.experts_matmul(b.w(p + "ffn_up_exps.weight"), x2, experts);
        }
        ggml_tensor * act  = ggml_mul(ctx, b.gelu(gate), up);
        ggml_tensor * down = b.experts_matmul(b.w(p + "ffn_down_exps.weight"), act, experts);  // [n_embd, k, n]
        down = ggml_mul(ctx, down, ggml_reshape_3d(ctx, weights, 1, hp.n_expert_used, n));
        ggml_tensor * y = ggml_view_2d(ctx, down, hp.n_embd, n, down->nb[2], 0);
        for (uint32_t j = 1; j < hp.n_expert_used; ++j) {
            y = ggml_add(ctx, y, ggml_view_2d(ctx, down, hp.n_embd, n, down->nb[2], down->nb[1] * j));
        }
        ggml_tensor * moe = b.rms(y, b.w(p + "post_ffw_norm_2.weight"));

        // 3.2.8-9 combine, residual, layer scalar on the whole stream
        ggml_tensor * out = ggml_add(ctx, r, b.rms(ggml_add(ctx, m, moe), b.w(p + "post_ffw_norm.weight")));
        x = ggml_mul(ctx, out, b.w(p + (encode ? "enc_layer_output_scale.weight" : "layer_output_scale.weight")));
    }

    if (!encode) {
        // 3.3 output: final norm, tied (or separate) head, softcap
        ggml_tensor * head = b.w_or_null("output.weight");
        ggml_tensor * logits = b.matmul(head != nullptr ? head : token_embd, b.rms(x, b.w("output_norm.weight")));
        if (hp.final_logit_softcap > 0.0f && b.cpu) {
            logits = cpu_softcap(ctx, logits, hp.final_logit_softcap);
        } else if (hp.final_logit_softcap > 0.0f) {
            logits = ggml_scale(ctx, ggml_tanh(ctx, ggml_scale(ctx, logits, 1.0f / hp.final_logit_softcap)), hp.final_logit_softcap);
        }
        ggml_set_output(logits);
        io.logits = logits;
        ggml_build_forward_expand(gf, logits);
    }
    return io;
}

}  // namespace dg
