// The model's weights resolved once at load into typed structs (spec section 2), so the graph
// builder reads them as fields instead of looking names up on every build.
#pragma once

#include <cstdint>
#include <vector>

struct ggml_tensor;

namespace dg {

class GgufModel;

struct LayerWeights {
    ggml_tensor * attn_norm = nullptr;
    ggml_tensor * wq = nullptr;
    ggml_tensor * wk = nullptr;
    ggml_tensor * wv = nullptr;  // null on full layers: V is the raw K projection
    ggml_tensor * q_norm = nullptr;
    ggml_tensor * k_norm = nullptr;
    ggml_tensor * wo = nullptr;
    ggml_tensor * post_attention_norm = nullptr;
    // dense MLP
    ggml_tensor * ffn_norm = nullptr;
    ggml_tensor * ffn_gate = nullptr;
    ggml_tensor * ffn_up = nullptr;
    ggml_tensor * ffn_down = nullptr;
    ggml_tensor * post_ffw_norm_1 = nullptr;
    // router and experts
    ggml_tensor * gate_inp = nullptr;
    ggml_tensor * gate_inp_scale = nullptr;
    ggml_tensor * down_exps_scale = nullptr;
    ggml_tensor * pre_ffw_norm_2 = nullptr;
    ggml_tensor * gate_up_exps = nullptr;  // fused [2 n_ff_exp] layout, or null with the split pair below
    ggml_tensor * gate_exps = nullptr;
    ggml_tensor * up_exps = nullptr;
    ggml_tensor * down_exps = nullptr;
    ggml_tensor * post_ffw_norm_2 = nullptr;
    ggml_tensor * post_ffw_norm = nullptr;
    ggml_tensor * enc_output_scale = nullptr;  // prompt rows
    ggml_tensor * dec_output_scale = nullptr;  // canvas rows
};

struct ModelWeights {
    ggml_tensor * token_embd = nullptr;
    ggml_tensor * output = nullptr;  // null: tied to token_embd
    ggml_tensor * output_norm = nullptr;
    ggml_tensor * rope_freqs = nullptr;
    // self-conditioning (all null when the model has none)
    ggml_tensor * sc_norm = nullptr;
    ggml_tensor * sc_gate = nullptr;
    ggml_tensor * sc_up = nullptr;
    ggml_tensor * sc_down = nullptr;
    std::vector<LayerWeights> layers;

    // The output head: output.weight, or the tied embedding.
    ggml_tensor * head() const { return output != nullptr ? output : token_embd; }
};

// Resolves every weight of a validated model; a missing required tensor is a format error.
ModelWeights resolve_weights(const GgufModel & model);

}  // namespace dg
