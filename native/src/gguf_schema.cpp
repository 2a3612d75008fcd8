#include "gguf_schema.h"

#include <string_view>

namespace dg::schema {

// The tables are generated from pydgemma/gguf/diffusion_gemma_schema.json, the one source of the
// layout that the converter and the Python writers read as well.
#include "gguf_schema_tables.inc"

}  // namespace dg::schema
