"""The format layer: facts about the diffusion-gemma GGUF layout (metadata keys, tensor names, symbolic
shapes), read from one data file, `diffusion_gemma_schema.json`.

Nothing here imports the rest of pydgemma or the native library: the converter, the writers, the tests
and the C++ build (through the generated `native/src/gguf_schema_tables.inc`) all read it from below.
"""
