// The hyper-parameters of a DiffusionGemma GGUF and its per-layer attention layout, read from the
// metadata after validate_keys() has checked every key's type, and checked against each other.
#include "gguf_model.h"

#include "error.h"
#include "gguf_schema.h"
#include "gguf_values.h"

#include "gguf.h"

#include <cmath>
#include <cstdint>
#include <string>

namespace dg {

void GgufModel::read_hparams() {
    const gguf_context * g = gguf_;

    // Integer hyper-parameters must be positive and fit in 32 bits.
    auto u32 = [g](const char * key, bool allow_zero = false) -> uint32_t {
        const int64_t id = gguf_find_key(g, key);
        const int64_t v  = integer_at(g, id, 0);
        if (v < (allow_zero ? 0 : 1) || v > static_cast<int64_t>(UINT32_MAX)) {
            fail(DG_ERR_FORMAT, format("key '%s' has invalid value %lld", key, static_cast<long long>(v)));
        }
        return static_cast<uint32_t>(v);
    };
    auto f32 = [g](const char * key) -> float {
        const double v = float_at(g, gguf_find_key(g, key), 0);
        if (!std::isfinite(v)) {
            fail(DG_ERR_FORMAT, format("key '%s' is not a finite number", key));
        }
        return static_cast<float>(v);
    };
    auto has = [g](const char * key) { return gguf_find_key(g, key) >= 0; };

    dg_hparams & hp = hparams_;
    hp.n_ctx_train   = u32("diffusion-gemma.context_length");
    hp.n_embd        = u32("diffusion-gemma.embedding_length");
    hp.n_layer       = u32("diffusion-gemma.block_count");
    hp.n_head        = u32("diffusion-gemma.attention.head_count");
    hp.n_ff          = u32("diffusion-gemma.feed_forward_length");
    hp.n_ff_exp      = u32("diffusion-gemma.expert_feed_forward_length");
    hp.n_expert      = u32("diffusion-gemma.expert_count");
    hp.n_expert_used = u32("diffusion-gemma.expert_used_count");
    hp.head_dim      = u32("diffusion-gemma.attention.key_length");
    hp.head_dim_swa  = u32("diffusion-gemma.attention.key_length_swa");
    hp.sliding_window = u32("diffusion-gemma.attention.sliding_window");
    hp.canvas_length = u32("diffusion.canvas_length");
    hp.n_rot_swa     = u32("diffusion-gemma.rope.dimension_count_swa");
    hp.n_rot         = has("diffusion-gemma.rope.dimension_count") ? u32("diffusion-gemma.rope.dimension_count")
                                                                   : hp.head_dim;
    hp.rope_freq_base     = f32("diffusion-gemma.rope.freq_base");
    hp.rope_freq_base_swa = has("diffusion-gemma.rope.freq_base_swa") ? f32("diffusion-gemma.rope.freq_base_swa")
                                                                      : 10000.0f;
    hp.rms_norm_eps        = f32("diffusion-gemma.attention.layer_norm_rms_epsilon");
    hp.final_logit_softcap = f32("diffusion-gemma.final_logit_softcapping");

    if (hp.n_layer > 4096) {
        fail(DG_ERR_FORMAT, format("key 'diffusion-gemma.block_count' has implausible value %u", hp.n_layer));
    }
    if (hp.n_expert_used > hp.n_expert) {
        fail(DG_ERR_FORMAT, format("expert_used_count (%u) exceeds expert_count (%u)", hp.n_expert_used, hp.n_expert));
    }
    if (u32("diffusion-gemma.attention.value_length") != hp.head_dim) {
        fail(DG_ERR_FORMAT, "attention.value_length must equal attention.key_length");
    }
    if (u32("diffusion-gemma.attention.value_length_swa") != hp.head_dim_swa) {
        fail(DG_ERR_FORMAT, "attention.value_length_swa must equal attention.key_length_swa");
    }
    if (hp.n_rot % 2 != 0 || hp.n_rot > hp.head_dim) {
        fail(DG_ERR_FORMAT, format("rope.dimension_count (%u) must be even and at most key_length (%u)", hp.n_rot, hp.head_dim));
    }
    if (hp.n_rot_swa % 2 != 0 || hp.n_rot_swa > hp.head_dim_swa) {
        fail(DG_ERR_FORMAT, format("rope.dimension_count_swa (%u) must be even and at most key_length_swa (%u)",
                                   hp.n_rot_swa, hp.head_dim_swa));
    }
    if (!(hp.rms_norm_eps > 0.0f)) {
        fail(DG_ERR_FORMAT, "attention.layer_norm_rms_epsilon must be positive");
    }
    if (hp.final_logit_softcap < 0.0f) {
        fail(DG_ERR_FORMAT, "final_logit_softcapping must not be negative");
    }

    // Per-layer layout: sliding pattern and KV head counts.
    const int64_t pattern_id = gguf_find_key(g, "diffusion-gemma.attention.sliding_window_pattern");
    const size_t  pattern_n  = gguf_get_arr_n(g, pattern_id);
    if (pattern_n != hp.n_layer) {
        fail(DG_ERR_FORMAT, format("attention.sliding_window_pattern has %zu entries, expected block_count = %u",
                                   pattern_n, hp.n_layer));
    }
    const int8_t * pattern = static_cast<const int8_t *>(gguf_get_arr_data(g, pattern_id));
    const int64_t  kv_id   = gguf_find_key(g, "diffusion-gemma.attention.head_count_kv");
    const bool     kv_arr  = gguf_get_kv_type(g, kv_id) == GGUF_TYPE_ARRAY;
    if (kv_arr && gguf_get_arr_n(g, kv_id) != hp.n_layer) {
        fail(DG_ERR_FORMAT, format("attention.head_count_kv has %zu entries, expected block_count = %u",
                                   gguf_get_arr_n(g, kv_id), hp.n_layer));
    }
    layers_.resize(hp.n_layer);
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        LayerLayout & layer = layers_[il];
        layer.is_sliding = pattern[il] != 0;
        layer.head_dim   = layer.is_sliding ? hp.head_dim_swa : hp.head_dim;
        const int64_t n_kv = integer_at(g, kv_id, kv_arr ? il : 0);
        if (n_kv < 1 || n_kv > hp.n_head || hp.n_head % n_kv != 0) {
            fail(DG_ERR_FORMAT, format("layer %u: head_count_kv = %lld must divide head_count = %u", il,
                                       static_cast<long long>(n_kv), hp.n_head));
        }
        layer.n_head_kv = static_cast<uint32_t>(n_kv);
    }

    // Tokenizer.
    const int64_t tok_model_id = gguf_find_key(g, "tokenizer.ggml.model");
    const std::string tok_model = gguf_get_val_str(g, tok_model_id);
    if (tok_model != schema::kTokenizerModel) {
        fail(DG_ERR_FORMAT, format("unsupported tokenizer.ggml.model '%s' (expected '%s')", tok_model.c_str(),
                                   schema::kTokenizerModel));
    }
    const size_t n_vocab = gguf_get_arr_n(g, gguf_find_key(g, "tokenizer.ggml.tokens"));
    if (n_vocab == 0 || n_vocab > UINT32_MAX) {
        fail(DG_ERR_FORMAT, format("tokenizer.ggml.tokens has %zu entries", n_vocab));
    }
    hp.n_vocab = static_cast<uint32_t>(n_vocab);
    for (const char * key : {"tokenizer.ggml.scores", "tokenizer.ggml.token_type"}) {
        const int64_t id = gguf_find_key(g, key);
        if (id >= 0 && gguf_get_arr_n(g, id) != n_vocab) {
            fail(DG_ERR_FORMAT, format("%s has %zu entries but the vocabulary has %zu tokens", key,
                                       gguf_get_arr_n(g, id), n_vocab));
        }
    }
}

}  // namespace dg
