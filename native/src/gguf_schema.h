// What a valid diffusion-gemma GGUF contains: metadata keys and tensors as tables, read by the
// loader (gguf_model.cpp). Source of truth: docs/spec/gguf-diffusion-gemma.md sections 1 and 2, as
// pydgemma/gguf/diffusion_gemma_schema.json holds it; the tables are generated from that file
// (gguf_schema_tables.inc, python -m pydgemma.gguf.schema --emit-cpp).
#pragma once

#include <cstddef>
#include <cstdint>

namespace dg::schema {

inline constexpr const char * kArchitecture = "diffusion-gemma";
inline constexpr const char * kTokenizerModel = "gemma4";

enum class KeyType : uint8_t {
    UINT,            // any integer scalar type, value >= 0
    FLOAT,           // f32 or f64 scalar
    BOOL,
    STRING,
    UINT_OR_ARRAY,   // an integer scalar or an integer array (per-layer values)
    BOOL_ARRAY,
    STRING_ARRAY,
    INT_ARRAY,
    FLOAT_ARRAY,
};

struct KeySpec {
    const char * name;
    KeyType      type;
};

// Keys the loader refuses to run without: those llama.cpp requires, plus those whose built-in
// default would give wrong shapes or wrong math for this model (marked R and E in the spec).
extern const KeySpec kRequiredKeys[];
extern const size_t  kNumRequiredKeys;

// Keys that are optional but, when present, must have this type.
extern const KeySpec kOptionalKeys[];
extern const size_t  kNumOptionalKeys;

// Symbolic tensor dimensions, resolved against the hyper-parameters (and the layer) at load time.
enum class Dim : uint8_t {
    NONE,        // unused trailing dimension
    ONE,
    EMBD,        // n_embd
    VOCAB,       // n_vocab
    FF,          // feed_forward_length
    FF_EXP,      // expert_feed_forward_length
    FF_EXP_X2,   // fused gate+up rows
    EXPERT,      // expert_count
    HEAD_DIM,    // head_dim of this layer (sliding or full)
    Q_WIDTH,     // n_head * head_dim of this layer
    KV_WIDTH,    // n_head_kv(layer) * head_dim of this layer
    ROPE_PAIRS,  // rope.dimension_count / 2
};

enum class Need : uint8_t {
    REQUIRED,
    OPTIONAL,          // checked when present
    SELF_COND,         // all of this group or none
    SELF_COND_NORM,    // one of the two accepted names, when the group is present
    EXPERTS_FUSED,     // either the fused gate_up tensor ...
    EXPERTS_SPLIT,     // ... or both split tensors
};

enum class Kind : uint8_t {
    MATRIX,  // any ggml type
    VECTOR,  // norms, scales, frequencies: must be a float type (F32, F16, BF16)
};

struct TensorSpec {
    const char * name;     // per-layer names omit the "blk.N." prefix
    Dim          dims[3];
    Need         need;
    Kind         kind;
};

extern const TensorSpec kGlobalTensors[];
extern const size_t     kNumGlobalTensors;
extern const TensorSpec kLayerTensors[];
extern const size_t     kNumLayerTensors;

}  // namespace dg::schema
