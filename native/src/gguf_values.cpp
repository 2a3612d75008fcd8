#include "gguf_values.h"

namespace dg {

bool is_integer(enum gguf_type t) {
    switch (t) {
        case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16:
        case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64:
            return true;
        default:
            return false;
    }
}

bool is_float(enum gguf_type t) { return t == GGUF_TYPE_FLOAT32 || t == GGUF_TYPE_FLOAT64; }

// Reads element i of an integer scalar (i = 0) or integer array as int64.
int64_t integer_at(const gguf_context * g, int64_t id, size_t i) {
    const bool is_arr = gguf_get_kv_type(g, id) == GGUF_TYPE_ARRAY;
    const enum gguf_type t = is_arr ? gguf_get_arr_type(g, id) : gguf_get_kv_type(g, id);
    const void * p = is_arr ? gguf_get_arr_data(g, id) : gguf_get_val_data(g, id);
    switch (t) {
        case GGUF_TYPE_UINT8:  return static_cast<const uint8_t *>(p)[i];
        case GGUF_TYPE_INT8:   return static_cast<const int8_t *>(p)[i];
        case GGUF_TYPE_UINT16: return static_cast<const uint16_t *>(p)[i];
        case GGUF_TYPE_INT16:  return static_cast<const int16_t *>(p)[i];
        case GGUF_TYPE_UINT32: return static_cast<const uint32_t *>(p)[i];
        case GGUF_TYPE_INT32:  return static_cast<const int32_t *>(p)[i];
        case GGUF_TYPE_UINT64: {
            const uint64_t v = static_cast<const uint64_t *>(p)[i];
            return v > static_cast<uint64_t>(INT64_MAX) ? -1 : static_cast<int64_t>(v);
        }
        case GGUF_TYPE_INT64:  return static_cast<const int64_t *>(p)[i];
        default:               return -1;
    }
}

double float_at(const gguf_context * g, int64_t id, size_t i) {
    const bool is_arr = gguf_get_kv_type(g, id) == GGUF_TYPE_ARRAY;
    const enum gguf_type t = is_arr ? gguf_get_arr_type(g, id) : gguf_get_kv_type(g, id);
    const void * p = is_arr ? gguf_get_arr_data(g, id) : gguf_get_val_data(g, id);
    if (t == GGUF_TYPE_FLOAT64) {
        return static_cast<const double *>(p)[i];
    }
    return static_cast<const float *>(p)[i];
}

}  // namespace dg
