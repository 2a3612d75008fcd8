#include "weights.h"

#include "error.h"
#include "gguf_model.h"

#include <string>

namespace dg {

namespace {

struct Resolver {
    const GgufModel & model;
    std::string       prefix;

    ggml_tensor * optional(const char * name) const { return model.weight(prefix + name); }
    ggml_tensor * required(const char * name) const {
        ggml_tensor * t = optional(name);
        if (t == nullptr) {
            fail(DG_ERR_FORMAT, format("missing tensor '%s%s'", prefix.c_str(), name));
        }
        return t;
    }
};

}  // namespace

ModelWeights resolve_weights(const GgufModel & model) {
    const dg_hparams & hp = model.hparams();
    ModelWeights       w;
    const Resolver     g{model, ""};
    w.token_embd  = g.required("token_embd.weight");
    w.output      = g.optional("output.weight");
    w.output_norm = g.required("output_norm.weight");
    w.rope_freqs  = g.required("rope_freqs.weight");
    if (hp.has_self_conditioning) {
        w.sc_norm = g.optional("self_cond_pre_norm.weight");  // both names occur in published files
        if (w.sc_norm == nullptr) {
            w.sc_norm = g.required("self_cond_norm.weight");
        }
        w.sc_gate = g.required("self_cond_gate.weight");
        w.sc_up   = g.required("self_cond_up.weight");
        w.sc_down = g.required("self_cond_down.weight");
    }
    w.layers.resize(hp.n_layer);
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const Resolver r{model, format("blk.%u.", il)};
        LayerWeights & L     = w.layers[il];
        L.attn_norm           = r.required("attn_norm.weight");
        L.wq                  = r.required("attn_q.weight");
        L.wk                  = r.required("attn_k.weight");
        L.wv                  = model.layers()[il].has_v_proj ? r.required("attn_v.weight") : nullptr;
        L.q_norm              = r.required("attn_q_norm.weight");
        L.k_norm              = r.required("attn_k_norm.weight");
        L.wo                  = r.required("attn_output.weight");
        L.post_attention_norm = r.required("post_attention_norm.weight");
        L.ffn_norm            = r.required("ffn_norm.weight");
        L.ffn_gate            = r.required("ffn_gate.weight");
        L.ffn_up              = r.required("ffn_up.weight");
        L.ffn_down            = r.required("ffn_down.weight");
        L.post_ffw_norm_1     = r.required("post_ffw_norm_1.weight");
        L.gate_inp            = r.required("ffn_gate_inp.weight");
        L.gate_inp_scale      = r.required("ffn_gate_inp.scale");
        L.down_exps_scale     = r.required("ffn_down_exps.scale");
        L.pre_ffw_norm_2      = r.required("pre_ffw_norm_2.weight");
        L.gate_up_exps        = r.optional("ffn_gate_up_exps.weight");
        if (L.gate_up_exps == nullptr) {
            L.gate_exps = r.required("ffn_gate_exps.weight");
            L.up_exps   = r.required("ffn_up_exps.weight");
        }
        L.down_exps        = r.required("ffn_down_exps.weight");
        L.post_ffw_norm_2  = r.required("post_ffw_norm_2.weight");
        L.post_ffw_norm    = r.required("post_ffw_norm.weight");
        L.enc_output_scale = r.required("enc_layer_output_scale.weight");
        L.dec_output_scale = r.required("layer_output_scale.weight");
    }
    return w;
}

}  // namespace dg
