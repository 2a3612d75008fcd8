#include "gguf_schema.h"

namespace dg::schema {

#define ARCH_KEY(suffix) "diffusion-gemma." suffix

const KeySpec kRequiredKeys[] = {
    {ARCH_KEY("context_length"),                     KeyType::UINT},
    {ARCH_KEY("embedding_length"),                   KeyType::UINT},
    {ARCH_KEY("block_count"),                        KeyType::UINT},
    {ARCH_KEY("feed_forward_length"),                KeyType::UINT},
    {ARCH_KEY("expert_feed_forward_length"),         KeyType::UINT},
    {ARCH_KEY("expert_count"),                       KeyType::UINT},
    {ARCH_KEY("expert_used_count"),                  KeyType::UINT},
    {ARCH_KEY("attention.head_count"),               KeyType::UINT},
    {ARCH_KEY("attention.head_count_kv"),            KeyType::UINT_OR_ARRAY},
    {ARCH_KEY("attention.key_length"),               KeyType::UINT},
    {ARCH_KEY("attention.value_length"),             KeyType::UINT},
    {ARCH_KEY("attention.key_length_swa"),           KeyType::UINT},
    {ARCH_KEY("attention.value_length_swa"),         KeyType::UINT},
    {ARCH_KEY("attention.layer_norm_rms_epsilon"),   KeyType::FLOAT},
    {ARCH_KEY("attention.sliding_window"),           KeyType::UINT},
    {ARCH_KEY("attention.sliding_window_pattern"),   KeyType::BOOL_ARRAY},
    {ARCH_KEY("rope.freq_base"),                     KeyType::FLOAT},
    {ARCH_KEY("rope.dimension_count_swa"),           KeyType::UINT},
    {ARCH_KEY("final_logit_softcapping"),            KeyType::FLOAT},
    {"diffusion.canvas_length",                      KeyType::UINT},
    {"tokenizer.ggml.model",                         KeyType::STRING},
    {"tokenizer.ggml.tokens",                        KeyType::STRING_ARRAY},
    {"tokenizer.ggml.merges",                        KeyType::STRING_ARRAY},
};
const size_t kNumRequiredKeys = sizeof(kRequiredKeys) / sizeof(kRequiredKeys[0]);

const KeySpec kOptionalKeys[] = {
    {ARCH_KEY("rope.freq_base_swa"),                 KeyType::FLOAT},
    {ARCH_KEY("rope.dimension_count"),               KeyType::UINT},
    {ARCH_KEY("attention.causal"),                   KeyType::BOOL},
    {"diffusion.eb_max_steps",                       KeyType::UINT},
    {"diffusion.eb_t_min",                           KeyType::FLOAT},
    {"diffusion.eb_t_max",                           KeyType::FLOAT},
    {"diffusion.eb_entropy_bound",                   KeyType::FLOAT},
    {"diffusion.eb_stability_threshold",             KeyType::UINT},
    {"diffusion.eb_confidence_threshold",            KeyType::FLOAT},
    {"diffusion.shift_logits",                       KeyType::BOOL},
    {"tokenizer.ggml.scores",                        KeyType::FLOAT_ARRAY},
    {"tokenizer.ggml.token_type",                    KeyType::INT_ARRAY},
    {"tokenizer.ggml.bos_token_id",                  KeyType::UINT},
    {"tokenizer.ggml.eos_token_id",                  KeyType::UINT},
    {"tokenizer.ggml.unknown_token_id",              KeyType::UINT},
    {"tokenizer.ggml.padding_token_id",              KeyType::UINT},
    {"tokenizer.ggml.mask_token_id",                 KeyType::UINT},
    {"tokenizer.ggml.add_bos_token",                 KeyType::BOOL},
    {"tokenizer.ggml.add_eos_token",                 KeyType::BOOL},
    {"tokenizer.chat_template",                      KeyType::STRING},
};
const size_t kNumOptionalKeys = sizeof(kOptionalKeys) / sizeof(kOptionalKeys[0]);

#undef ARCH_KEY

using D = Dim;

const TensorSpec kGlobalTensors[] = {
    {"token_embd.weight",         {D::EMBD, D::VOCAB, D::NONE},       Need::REQUIRED,       Kind::MATRIX},
    {"output.weight",             {D::EMBD, D::VOCAB, D::NONE},       Need::OPTIONAL,       Kind::MATRIX},
    {"output_norm.weight",        {D::EMBD, D::NONE, D::NONE},        Need::REQUIRED,       Kind::VECTOR},
    {"rope_freqs.weight",         {D::ROPE_PAIRS, D::NONE, D::NONE},  Need::REQUIRED,       Kind::VECTOR},
    {"self_cond_pre_norm.weight", {D::EMBD, D::NONE, D::NONE},        Need::SELF_COND_NORM, Kind::VECTOR},
    {"self_cond_norm.weight",     {D::EMBD, D::NONE, D::NONE},        Need::SELF_COND_NORM, Kind::VECTOR},
    {"self_cond_gate.weight",     {D::EMBD, D::FF, D::NONE},          Need::SELF_COND,      Kind::MATRIX},
    {"self_cond_up.weight",       {D::EMBD, D::FF, D::NONE},          Need::SELF_COND,      Kind::MATRIX},
    {"self_cond_down.weight",     {D::FF, D::EMBD, D::NONE},          Need::SELF_COND,      Kind::MATRIX},
};
const size_t kNumGlobalTensors = sizeof(kGlobalTensors) / sizeof(kGlobalTensors[0]);

const TensorSpec kLayerTensors[] = {
    {"attn_norm.weight",              {D::EMBD, D::NONE, D::NONE},         Need::REQUIRED,      Kind::VECTOR},
    {"attn_q.weight",                 {D::EMBD, D::Q_WIDTH, D::NONE},      Need::REQUIRED,      Kind::MATRIX},
    {"attn_k.weight",                 {D::EMBD, D::KV_WIDTH, D::NONE},     Need::REQUIRED,      Kind::MATRIX},
    {"attn_v.weight",                 {D::EMBD, D::KV_WIDTH, D::NONE},     Need::OPTIONAL,      Kind::MATRIX},
    {"attn_output.weight",            {D::Q_WIDTH, D::EMBD, D::NONE},      Need::REQUIRED,      Kind::MATRIX},
    {"attn_q_norm.weight",            {D::HEAD_DIM, D::NONE, D::NONE},     Need::REQUIRED,      Kind::VECTOR},
    {"attn_k_norm.weight",            {D::HEAD_DIM, D::NONE, D::NONE},     Need::REQUIRED,      Kind::VECTOR},
    {"post_attention_norm.weight",    {D::EMBD, D::NONE, D::NONE},         Need::REQUIRED,      Kind::VECTOR},
    {"ffn_norm.weight",               {D::EMBD, D::NONE, D::NONE},         Need::REQUIRED,      Kind::VECTOR},
    {"ffn_gate.weight",               {D::EMBD, D::FF, D::NONE},           Need::REQUIRED,      Kind::MATRIX},
    {"ffn_up.weight",                 {D::EMBD, D::FF, D::NONE},           Need::REQUIRED,      Kind::MATRIX},
    {"ffn_down.weight",               {D::FF, D::EMBD, D::NONE},           Need::REQUIRED,      Kind::MATRIX},
    {"post_ffw_norm_1.weight",        {D::EMBD, D::NONE, D::NONE},         Need::REQUIRED,      Kind::VECTOR},
    {"pre_ffw_norm_2.weight",         {D::EMBD, D::NONE, D::NONE},         Need::REQUIRED,      Kind::VECTOR},
    {"post_ffw_norm_2.weight",        {D::EMBD, D::NONE, D::NONE},         Need::REQUIRED,      Kind::VECTOR},
    {"post_ffw_norm.weight",          {D::EMBD, D::NONE, D::NONE},         Need::REQUIRED,      Kind::VECTOR},
    {"ffn_gate_inp.weight",           {D::EMBD, D::EXPERT, D::NONE},       Need::REQUIRED,      Kind::MATRIX},
    {"ffn_gate_inp.scale",            {D::EMBD, D::NONE, D::NONE},         Need::REQUIRED,      Kind::VECTOR},
    {"ffn_gate_up_exps.weight",       {D::EMBD, D::FF_EXP_X2, D::EXPERT},  Need::EXPERTS_FUSED, Kind::MATRIX},
    {"ffn_gate_exps.weight",          {D::EMBD, D::FF_EXP, D::EXPERT},     Need::EXPERTS_SPLIT, Kind::MATRIX},
    {"ffn_up_exps.weight",            {D::EMBD, D::FF_EXP, D::EXPERT},     Need::EXPERTS_SPLIT, Kind::MATRIX},
    {"ffn_down_exps.weight",          {D::FF_EXP, D::EMBD, D::EXPERT},     Need::REQUIRED,      Kind::MATRIX},
    {"ffn_down_exps.scale",           {D::EXPERT, D::NONE, D::NONE},       Need::REQUIRED,      Kind::VECTOR},
    {"layer_output_scale.weight",     {D::ONE, D::NONE, D::NONE},          Need::REQUIRED,      Kind::VECTOR},
    {"enc_layer_output_scale.weight", {D::ONE, D::NONE, D::NONE},          Need::REQUIRED,      Kind::VECTOR},
};
const size_t kNumLayerTensors = sizeof(kLayerTensors) / sizeof(kLayerTensors[0]);

}  // namespace dg::schema
