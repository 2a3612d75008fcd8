/*
 * dgemma.h - the C ABI of pydgemma, a runtime for DiffusionGemma GGUF files.
 *
 * Conventions (they hold for every function below):
 *   - Objects are opaque handles, created by a load or new call and released by the matching free.
 *   - Parameter structs come from *_default_params(); change only the fields you care about.
 *   - Functions that can fail, or be misused (a NULL handle, a NULL buffer, an index out of range),
 *     return a dg_status. On failure dg_last_error() returns a one-line, human-readable message for
 *     the calling thread; it stays valid until the next failing call on that thread. The library
 *     never calls abort() or exit() on bad input. DG_ERR_INTERNAL means a bug in this library (an
 *     invariant that failed), never a property of the input or of the machine.
 *   - The exceptions, which cannot fail: the *_free calls (NULL is a no-op), the *_default_params
 *     calls, and pure getters of a count, size or value (dg_model_n_tensors, dg_context_n_past, ...),
 *     which return 0 for a NULL handle.
 *   - Strings returned as `const char *` are owned by the library (by the handle they came from, or
 *     static); never free them. Absent is NULL, present but empty is "": a getter returns NULL for a
 *     NULL handle, an index out of range or a key that is not there, and "" only for a string that
 *     exists and is empty (a context using no CPU kernels, a device reporting no features). The
 *     calls that describe the library itself (dg_last_error, dg_status_name, dg_version,
 *     dg_ggml_version) never return NULL.
 *
 *   - Calls on a context are named dg_context_* (the oldest three, dg_prefill, dg_denoise and
 *     dg_commit, keep their names).
 *
 * This header is also the source of the Python binding's cffi declarations: keep it to plain C
 * declarations (no function-like macros, no conditional declarations) between the markers.
 *
 * DG_ABI_VERSION changes whenever a declaration below changes in a way that breaks a caller built
 * against an older header (a struct's layout, a function's signature or meaning). A caller checks
 * dg_abi_version() == DG_ABI_VERSION before anything else; the Python binding refuses a library
 * whose version differs from its header's.
 */
#ifndef DGEMMA_H
#define DGEMMA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32) && defined(DGEMMA_BUILD)
#    define DG_API __declspec(dllexport)
#elif defined(_WIN32)
#    define DG_API __declspec(dllimport)
#elif defined(DGEMMA_BUILD)
#    define DG_API __attribute__((visibility("default")))
#else
#    define DG_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* --- cffi:begin --- */

#define DG_ABI_VERSION 3

/* The DG_ABI_VERSION this library was built with. */
DG_API int32_t dg_abi_version(void);

typedef enum dg_status {
    DG_OK                 = 0,
    DG_ERR_INVALID_ARG    = 1, /* a NULL handle, an out-of-range index, a bad parameter value */
    DG_ERR_IO             = 2, /* the file cannot be opened, read or mapped                   */
    DG_ERR_FORMAT         = 3, /* not a GGUF file, or a GGUF that is not a valid DiffusionGemma */
    DG_ERR_UNSUPPORTED    = 4, /* valid, but uses something this build cannot run            */
    DG_ERR_OUT_OF_MEMORY  = 5,
    DG_ERR_BACKEND        = 6, /* a ggml backend or device failed                             */
    DG_ERR_INTERNAL       = 7  /* a bug: an invariant of this library failed (please report it) */
} dg_status;

/* Message of the last failed call on this thread ("" when none). */
DG_API const char * dg_last_error(void);
/* Short name of a status code, e.g. "DG_ERR_FORMAT" ("DG_ERR_UNKNOWN" for a value not listed above). */
DG_API const char * dg_status_name(dg_status status);

/* Version of this library ("MAJOR.MINOR.PATCH") and of the ggml it runs on. */
DG_API const char * dg_version(void);
DG_API const char * dg_ggml_version(void);

/* ---------------------------------------------------------------------------------------------
 * Devices: every device of every ggml backend registered in this process (CPU, CUDA, ...).
 */
typedef enum dg_device_type {
    DG_DEVICE_CPU   = 0,
    DG_DEVICE_GPU   = 1,
    DG_DEVICE_IGPU  = 2,
    DG_DEVICE_ACCEL = 3
} dg_device_type;

typedef struct dg_device_info {
    const char *   name;         /* ggml device name, e.g. "CPU", "CUDA0" */
    const char *   description;  /* e.g. the GPU or CPU model              */
    const char *   backend;      /* backend registry name, e.g. "CUDA"    */
    dg_device_type type;
    uint64_t       memory_free;  /* bytes */
    uint64_t       memory_total; /* bytes */
    const char *   features;     /* the backend's build features, space-separated, e.g.
                                    "AVX2 AVX512 LLAMAFILE REPACK OPENMP" ("" when it reports none) */
} dg_device_info;

DG_API size_t    dg_device_count(void);
DG_API dg_status dg_device_get(size_t index, dg_device_info * out);

/* ---------------------------------------------------------------------------------------------
 * Model: a memory-mapped, validated DiffusionGemma GGUF file. Immutable after load; one model may
 * be shared by several threads.
 */
typedef struct dg_model dg_model;

typedef struct dg_model_params {
    const char * device;    /* "auto" (first GPU, else CPU), "cpu", or a device name such as "CUDA0" */
    int32_t      n_threads; /* CPU threads for compute; <= 0 means one per available core          */
    bool         use_mmap;  /* map the file instead of reading it into memory                        */
    bool         repack;    /* CPU: let ggml re-lay out quantized matmul weights for its tiled kernels
                               (faster; those weights are copied out of the mapping). Default true. */
} dg_model_params;

DG_API dg_model_params dg_model_default_params(void);

/* Opens, maps and validates `path`. On success *out_model owns the file mapping. A model split with
 * llama.cpp's gguf-split is opened by its first part (PREFIX-00001-of-0000N.gguf): every part is
 * mapped and checked (split.no, split.count, split.tensors.count); the metadata is the first part's. */
DG_API dg_status dg_model_load(const char * path, const dg_model_params * params, dg_model ** out_model);
DG_API void      dg_model_free(dg_model * model);

/* The device the model was placed on (resolved from params.device; NULL for a NULL model) and the
 * thread count. */
DG_API const char * dg_model_device(const dg_model * model);
DG_API int32_t      dg_model_n_threads(const dg_model * model);

/* Hyper-parameters read from the GGUF metadata (spec section 1). */
typedef struct dg_hparams {
    uint32_t n_vocab;
    uint32_t n_ctx_train;         /* diffusion-gemma.context_length              */
    uint32_t n_embd;
    uint32_t n_layer;
    uint32_t n_head;
    uint32_t n_ff;                /* dense MLP and self-conditioning MLP width   */
    uint32_t n_ff_exp;            /* per-expert width                            */
    uint32_t n_expert;
    uint32_t n_expert_used;
    uint32_t head_dim;            /* full-attention layers                       */
    uint32_t head_dim_swa;        /* sliding-window layers                       */
    uint32_t n_rot;               /* rope.dimension_count                        */
    uint32_t n_rot_swa;           /* rope.dimension_count_swa                    */
    uint32_t sliding_window;
    uint32_t canvas_length;
    float    rope_freq_base;
    float    rope_freq_base_swa;
    float    rms_norm_eps;
    float    final_logit_softcap;
    bool     has_self_conditioning;
    bool     has_output_weight;   /* false: the output head is tied to token_embd */
} dg_hparams;

DG_API dg_status dg_model_hparams(const dg_model * model, dg_hparams * out);

/* Per-layer attention layout. */
typedef struct dg_layer_info {
    bool     is_sliding;
    uint32_t n_head_kv;
    uint32_t head_dim;
    bool     has_v_proj;          /* full layers reuse the raw K projection as V */
} dg_layer_info;

DG_API dg_status dg_model_layer(const dg_model * model, uint32_t layer, dg_layer_info * out);

/* Tensors in file order. */
typedef struct dg_tensor_info {
    const char * name;
    const char * type_name;       /* ggml type name, e.g. "q4_K" */
    int32_t      type;            /* ggml_type value             */
    int32_t      n_dims;
    int64_t      ne[4];           /* GGUF order: ne[0] is the row length */
    uint64_t     n_bytes;
    uint64_t     file_offset;     /* absolute byte offset of the data in the file (a split model: its part's) */
} dg_tensor_info;

DG_API size_t    dg_model_n_tensors(const dg_model * model);
DG_API dg_status dg_model_tensor(const dg_model * model, size_t index, dg_tensor_info * out);

/* Metadata key/value pairs in file order. Values are rendered as text; arrays show their first
 * items and their length, e.g. "[true, true, false, ...] (30 items)"; an empty string value is "".
 * Key and value are NULL for a NULL model or an index out of range. */
DG_API size_t       dg_model_n_meta(const dg_model * model);
DG_API const char * dg_model_meta_key(const dg_model * model, size_t index);
DG_API const char * dg_model_meta_value(const dg_model * model, size_t index);
/* The value of `key` rendered as text, or NULL when the key is absent (or model or key is NULL). */
DG_API const char * dg_model_meta_get(const dg_model * model, const char * key);

/* Size of the file in bytes (a split model: of all its parts). */
DG_API uint64_t dg_model_file_size(const dg_model * model);

/* ---------------------------------------------------------------------------------------------
 * Tokenizer: the model's own (tokenizer.ggml.model "gemma4": BPE over tokens and merges, byte
 * fallback, special tokens matched whole). Both calls report the full size in *n_out; when it is
 * larger than the buffer given, only the buffer is filled: call again with a larger one.
 */
DG_API dg_status dg_tokenize(const dg_model * model, const char * text, size_t text_len, bool add_bos,
                             bool parse_special, int32_t * ids_out, size_t max_ids, size_t * n_out);
/* UTF-8 text of `ids` (control tokens are skipped unless render_special). */
DG_API dg_status dg_detokenize(const dg_model * model, const int32_t * ids, size_t n_ids, bool render_special,
                               char * text_out, size_t max_bytes, size_t * n_out);

/* ---------------------------------------------------------------------------------------------
 * Context: the state of one generation over a model: the KV cache of the prefix (prompt and
 * committed canvases) and scratch buffers. A model may have several contexts (one per thread);
 * it must outlive them. A context is not thread-safe.
 */
typedef struct dg_context dg_context;

/* Our CPU kernels: ggml custom ops that a context's graphs use in place of stock ggml ops on the CPU
 * backend, where the CPU and the weights allow (never on other devices). Each computes what the stock
 * op computes, exactly or within float32 rounding (README, "CPU kernels"). */
typedef enum dg_cpu_kernel {
    DG_CPU_KERNEL_Q8_0_MATMUL   = 1,  /* Q8_0 dense and routed-expert products (x86 AVX-512 VNNI)    */
    DG_CPU_KERNEL_SELF_COND_MIX = 2,  /* self-conditioning's probabilities x F16 embedding (AVX-512) */
    DG_CPU_KERNEL_ACTIVATIONS   = 4,  /* vectorised GELU and final softcap                           */
    DG_CPU_KERNEL_SAMPLER       = 8,  /* the step's sampler reductions, one pass per row             */
    DG_CPU_KERNELS_ALL          = 15,
    DG_CPU_KERNELS_DEFAULT      = 256 /* all, less those the DGEMMA_NO_CPU_KERNELS environment variable
                                         switches off ("1" or "all": every one; else a comma-separated
                                         list of names: q8_0_matmul, self_cond_mix, activations, sampler) */
} dg_cpu_kernel;

/* The type of the KV cache's entries. F16 (the default) halves F32's memory; Q8_0 (about 8.5 bits)
 * needs flash attention (DG_FLASH_ATTN_AUTO picks it). Measured against F32: README, "Memory". */
typedef enum dg_kv_type {
    DG_KV_F16  = 0,
    DG_KV_F32  = 1,
    DG_KV_Q8_0 = 2
} dg_kv_type;

/* Attention through ggml_flash_attn_ext (no score matrix, no transposed V) or through two matmuls
 * and a softmax (V stored transposed). AUTO: flash attention wherever the device runs it (the CPU
 * does: it is also the faster there), except Vulkan (ggml-vulkan 0.15.3's crashed lavapipe), else
 * matmuls; a Q8_0 cache always takes flash attention. */
typedef enum dg_flash_attn {
    DG_FLASH_ATTN_AUTO = 0,
    DG_FLASH_ATTN_ON   = 1,
    DG_FLASH_ATTN_OFF  = 2
} dg_flash_attn;

/* The self-conditioning table (the embedding transposed, one per model and type, shared by its
 * contexts; unused with sc_top_k > 0). AUTO: F32 when the embedding is F32 (exact), else Q8_0 (0.78 GB
 * for the 26B vocabulary, against 1.5 GB in F16; its drift is in README, "Memory"). */
typedef enum dg_sc_table {
    DG_SC_TABLE_AUTO = 0,
    DG_SC_TABLE_F32  = 1,
    DG_SC_TABLE_F16  = 2,
    DG_SC_TABLE_Q8_0 = 3
} dg_sc_table;

typedef struct dg_context_params {
    uint32_t n_ctx;     /* tokens the cache holds: prompt + committed canvases; 0 = min(4096, context_length) */
    uint32_t n_batch;   /* tokens per encoder pass when prefilling; 0 = 512                                  */
    int32_t  n_threads; /* CPU threads; <= 0 = the model's                                                   */
    uint32_t sc_top_k;  /* 0 (default) = exact self-conditioning over the whole vocabulary. k > 0 = APPROXIMATE:
                           each canvas row's k most likely tokens only, renormalised (faster, no transposed
                           embedding copy; it changes the model's output, see README)                         */
    uint32_t cpu_kernels; /* DG_CPU_KERNEL_* bits allowed, or DG_CPU_KERNELS_DEFAULT (the default)                */
    uint32_t kv_type;     /* a dg_kv_type; DG_KV_F16 (0) by default                                           */
    uint32_t flash_attn;  /* a dg_flash_attn; DG_FLASH_ATTN_AUTO (0) by default                               */
    uint32_t sc_table;    /* a dg_sc_table; DG_SC_TABLE_AUTO (0) by default                                   */
} dg_context_params;

DG_API dg_context_params dg_context_default_params(void);
DG_API dg_status         dg_context_new(const dg_model * model, const dg_context_params * params, dg_context ** out_ctx);
DG_API void              dg_context_free(dg_context * ctx);

/* Causal encoder pass over `tokens`, appended to the cache (the prompt). */
DG_API dg_status dg_prefill(dg_context * ctx, const int32_t * tokens, size_t n_tokens);
/* One bidirectional decoder pass of a canvas over the cached prefix. `sc_logits` (NULL: none) is the
 * previous step's processed logits, [n_canvas][n_vocab]; `logits_out` receives [n_canvas][n_vocab]
 * float logits (after the final softcap). The cache is not changed. */
DG_API dg_status dg_denoise(dg_context * ctx, const int32_t * canvas, size_t n_canvas, const float * sc_logits,
                            float * logits_out);
/* Appends a finished canvas to the cache through the encoder, before the next canvas. */
DG_API dg_status dg_commit(dg_context * ctx, const int32_t * canvas, size_t n_canvas);
/* Empties the cache. */
DG_API dg_status dg_context_reset(dg_context * ctx);
/* Keeps only the first n_past cached tokens (n_past <= dg_context_n_past), e.g. to reuse a shared
 * prefix of the next prompt. */
DG_API dg_status dg_context_truncate(dg_context * ctx, uint32_t n_past);
DG_API uint32_t  dg_context_n_past(const dg_context * ctx);
DG_API uint32_t  dg_context_n_ctx(const dg_context * ctx);
/* The CPU kernels this context's graphs use, space-separated DG_CPU_KERNEL_* names in lower case
 * without the prefix, e.g. "q8_0_matmul self_cond_mix activations sampler" ("" for none: stock ggml
 * ops only, as on every non-CPU device; NULL for a NULL context). */
DG_API const char * dg_context_kernels(const dg_context * ctx);

/* One denoising step of a canvas, on the model's device (what dg_generate runs): the decoder pass,
 * the processed logits logits / temperature, and per position the sampler's reductions over them:
 * the entropy of softmax(processed), its argmax and a categorical draw (the first id whose
 * cumulative probability reaches uniforms[i], which must lie in (0, 1); see dg_sampler_uniforms).
 * The processed logits stay on the device: with self_cond the pass reads those of the previous
 * dg_context_step (same n_canvas, and no prefill, commit, truncate or reset since), as dg_denoise
 * reads sc_logits. No vocabulary-sized data crosses: the canvas, its positions, n_canvas uniforms,
 * the temperature and the KV cache's slots and mask rows (one float per slot of the full layers'
 * view and of the sliding ring; with matmul attention also V's places, 4 bytes per canvas value) in;
 * argmax_out, draws_out and entropy_out ([n_canvas] each) out. */
DG_API dg_status dg_context_step(dg_context * ctx, const int32_t * canvas, size_t n_canvas, float temperature,
                                 const float * uniforms, bool self_cond, int32_t * argmax_out, int32_t * draws_out,
                                 float * entropy_out);

/* The sampler's half of dg_context_step over raw logits the caller gives, [n_rows][n_vocab], on the
 * context's device: argmax, draw and entropy of softmax(logits / temperature) per row, as
 * dg_context_step computes them (to check a backend against the host sampler, dg_sampler_step). */
DG_API dg_status dg_context_reduce_logits(dg_context * ctx, const float * logits, size_t n_rows, float temperature,
                                          const float * uniforms, int32_t * argmax_out, int32_t * draws_out,
                                          float * entropy_out);

/* What the context's steps have moved and spent since it was created. */
typedef struct dg_step_stats {
    uint64_t n_steps;
    uint64_t bytes_to_device;   /* canvas, positions, temperature and uniforms */
    uint64_t bytes_from_device; /* argmax, draws and entropies                 */
    double   seconds;           /* wall time inside dg_context_step            */
} dg_step_stats;

DG_API dg_status dg_context_step_stats(const dg_context * ctx, dg_step_stats * out);

/* What a context holds: its KV cache (the sliding layers' ring and the full layers' slots), the
 * attention path, and the memory it has allocated so far on its device. */
typedef struct dg_context_info {
    uint32_t kv_type;          /* dg_kv_type                                                        */
    bool     flash_attn;       /* the graphs use ggml_flash_attn_ext                                 */
    uint32_t kv_slots_full;    /* positions a full-attention layer holds (n_ctx, padded)             */
    uint32_t kv_slots_swa;     /* positions a sliding layer holds (its ring)                         */
    uint64_t kv_bytes;         /* K and V of every layer                                             */
    uint64_t compute_bytes;    /* the scheduler's compute buffers, every backend                     */
    uint64_t self_cond_bytes;  /* the step loop's self-conditioning state (the table is the model's) */
    uint64_t sc_table_bytes;   /* the model's self-conditioning tables built so far (shared)         */
    uint64_t graphs_built;     /* forward graphs built since creation (reused while the shape holds) */
} dg_context_info;

DG_API dg_status dg_context_get_info(const dg_context * ctx, dg_context_info * out);

/* What a context with `params` would take on the model's device, before anything is allocated
 * (dg_context_new refuses with this breakdown when it does not fit). Bytes. */
typedef struct dg_memory_plan {
    uint64_t weights_copied;   /* weights in the device's own memory: uploaded, or (CPU) repacked  */
    uint64_t weights_mapped;   /* weights read in place from the file mapping (file-backed pages)  */
    uint64_t kv;               /* the KV cache (dg_context_info.kv_bytes)                            */
    uint64_t self_cond_table;  /* the model's table, when this context would build it (else 0)       */
    uint64_t self_cond_state;  /* the step loop's processed logits of one canvas                     */
    uint64_t compute;          /* the largest graph's activations and the CPU's work buffer (estimate) */
    uint64_t total;            /* all of the above (what the device must hold: off the CPU, less weights_mapped) */
    uint64_t device_free;      /* as the device reports it (0: unknown)                                */
    uint64_t device_total;
    bool     fits;             /* what the device must hold <= device_free (true when unknown)         */
    bool     flash_attn;       /* the attention path the context would take                            */
    uint32_t n_ctx;            /* resolved (0 in params: min(4096, context length))                    */
} dg_memory_plan;

DG_API dg_status dg_plan_memory(const dg_model * model, const dg_context_params * params, dg_memory_plan * out);

/* Importance matrix ("imatrix"): while collecting, every later dg_prefill/dg_denoise/dg_commit (and
 * so dg_generate) adds, for each weight matrix W used as a matrix product W x, the per-input-channel
 * sums of x[j]^2 over the rows of x, and the number of rows. For the expert tensors (a product per
 * routed expert) each expert gets its own sums and count over the (token, slot) pairs routed to it,
 * so their counts sum to tokens x n_expert_used. Entries are named after the weight (the tied output
 * head is "token_embd.weight": its rows are the final-norm activations of every canvas position).
 * The sums are what llama.cpp's imatrix files store as "<weight>.in_sum2" / "<weight>.counts".
 * Collecting makes the scheduler compute node by node (slower). */
typedef struct dg_imatrix_entry {
    const char *    name;    /* the weight, e.g. "blk.0.attn_q.weight"                     */
    uint32_t        n_mat;   /* 1, or n_expert for the expert tensors                        */
    int64_t         ne0;     /* values per matrix: the weight's row length (input channels)  */
    const double *  in_sum2; /* [n_mat][ne0] sums of squared inputs                          */
    const int64_t * counts;  /* [n_mat] rows (experts: routed (token, slot) pairs) summed     */
} dg_imatrix_entry;

/* Starts (or resumes) collecting; what was collected before is kept. */
DG_API dg_status dg_context_imatrix_start(dg_context * ctx);
/* Stops collecting; the data stays readable. */
DG_API dg_status dg_context_imatrix_stop(dg_context * ctx);
/* Drops the collected data. */
DG_API dg_status dg_context_imatrix_clear(dg_context * ctx);
/* Entries in the order their weights were first used. The pointers in *out are owned by the
 * context and stay valid until dg_context_imatrix_clear or dg_context_free; the values they point
 * to grow with each later pass while collecting. */
DG_API size_t    dg_context_imatrix_n_entries(const dg_context * ctx);
DG_API dg_status dg_context_imatrix_entry(const dg_context * ctx, size_t index, dg_imatrix_entry * out);

/* ---------------------------------------------------------------------------------------------
 * Sampler: the entropy-bound sampler of one canvas at a time (spec section 4). Deterministic for a
 * given seed, whatever the thread count.
 */
typedef struct dg_sampler dg_sampler;

typedef struct dg_sampler_params {
    uint32_t max_steps;            /* denoising steps per canvas                                   */
    float    t_min;                /* temperature of the last step is t_min + (t_max - t_min)/steps */
    float    t_max;                /* temperature of the first step                                 */
    float    entropy_bound;        /* accept low-entropy positions while their entropies sum <= it  */
    uint32_t stability_threshold;  /* steps the argmax canvas must repeat to count as stable        */
    float    confidence_threshold; /* mean entropy below which a stable canvas is done              */
    uint64_t seed;
    int32_t  n_threads;            /* <= 0: one per core                                            */
} dg_sampler_params;

typedef struct dg_step_result {
    uint32_t step;          /* 0-based step on this canvas                  */
    float    temperature;   /* the temperature this step used               */
    float    mean_entropy;  /* mean entropy of the processed distributions  */
    uint32_t n_accepted;    /* positions whose sample was kept              */
    bool     converged;     /* stable and confident                         */
    bool     stop;          /* converged, or max_steps reached              */
} dg_step_result;

/* The model's diffusion.eb_* settings (a NULL model: 48 steps, t 0.4..0.8, bound 0.1, stability 1,
 * confidence 0.005). */
DG_API dg_sampler_params dg_sampler_default_params(const dg_model * model);
DG_API dg_status         dg_sampler_new(const dg_sampler_params * params, uint32_t canvas_len, uint32_t n_vocab,
                                        dg_sampler ** out_sampler);
DG_API void              dg_sampler_free(dg_sampler * sampler);
/* Fills `canvas` [canvas_len] with uniform random ids and starts a new canvas (step 0). */
DG_API dg_status         dg_sampler_init_canvas(dg_sampler * sampler, int32_t * canvas);
/* The temperature the next step will use (0 for a NULL sampler). */
DG_API float             dg_sampler_temperature(const dg_sampler * sampler);
/* The uniforms in (0, 1) of the next step's categorical draws, [canvas_len] (one per position, from
 * the seed, canvas and step): what dg_context_step takes. */
DG_API dg_status         dg_sampler_uniforms(const dg_sampler * sampler, float * uniforms_out);
/* The host half of a step, from its per-position reductions ([canvas_len] each, e.g. from
 * dg_context_step): accept the lowest-entropy draws while their entropies sum to at most the bound,
 * re-noise the rest of `canvas`, apply the stop rule, advance the step. accepted_out may be NULL. */
DG_API dg_status         dg_sampler_decide(dg_sampler * sampler, const int32_t * argmax, const int32_t * draws,
                                           const float * entropy, int32_t * canvas, uint8_t * accepted_out,
                                           dg_step_result * result);
/* One whole step on the host over the raw logits of the current canvas, [canvas_len][n_vocab]
 * (the reductions of dg_context_step in double precision, then dg_sampler_decide). `logits` is divided by
 * the temperature in place (the processed logits: pass them as sc_logits to the next dg_denoise);
 * `canvas` becomes the next canvas. argmax_out (the answer when result->stop), draws_out,
 * accepted_out and entropy_out ([canvas_len] each) may be NULL. */
DG_API dg_status         dg_sampler_step(dg_sampler * sampler, float * logits, int32_t * canvas, int32_t * argmax_out,
                                         int32_t * draws_out, uint8_t * accepted_out, float * entropy_out,
                                         dg_step_result * result);

/* ---------------------------------------------------------------------------------------------
 * Generation: prefill the prompt, then denoise canvases with the sampler, committing each finished
 * canvas before the next, until max_new_tokens or an end-of-generation token. Each step is one
 * dg_context_step (the logits never leave the device) and one dg_sampler_decide.
 */
typedef struct dg_step_event {
    uint32_t        canvas;        /* 0-based canvas index                     */
    uint32_t        step;          /* 0-based step on this canvas              */
    float           temperature;
    float           mean_entropy;
    uint32_t        n_accepted;
    bool            converged;
    bool            stop;          /* the last step of this canvas             */
    uint32_t        canvas_len;
    const int32_t * argmax;        /* [canvas_len] the draft answer            */
    const int32_t * canvas_ids;    /* [canvas_len] the next canvas             */
    const uint8_t * accepted;      /* [canvas_len] 1 = sample kept this step   */
} dg_step_event;

/* Called after every step; return false to cancel the generation (dg_generate then returns DG_OK
 * with what was finished so far and *cancelled set). */
typedef bool (*dg_step_callback)(const dg_step_event * event, void * user_data);

typedef struct dg_generate_params {
    uint32_t          max_new_tokens;
    const int32_t *   eos_ids;     /* tokens that end the generation (default: the model's EOG tokens) */
    size_t            n_eos;
    dg_step_callback  on_step;     /* may be NULL */
    void *            user_data;
} dg_generate_params;

typedef struct dg_generate_result {
    size_t   n_tokens;      /* tokens written to tokens_out (<= max_new_tokens)          */
    uint32_t n_canvases;    /* canvases denoised                                          */
    uint32_t n_forwards;    /* decoder passes in all                                      */
    bool     hit_eos;
    bool     cancelled;
    double   t_prefill;     /* seconds: the prompt's and the committed canvases' encoder passes */
    double   t_steps;       /* seconds in the denoising steps' graphs (dg_context_step)        */
    double   t_sampler;     /* seconds in the sampler's host decisions                         */
    double   t_callback;    /* seconds in on_step                                              */
    uint64_t bytes_to_device;   /* moved by the denoising steps (see dg_step_stats)            */
    uint64_t bytes_from_device;
} dg_generate_result;

/* max_new_tokens 256, no callback, and the model's end-of-generation tokens (its tokenizer's: its
 * eos_token_id and the tokens spelled <eos>, <turn|> and <|tool_response>; none for a NULL model).
 * eos_ids points into the model. */
DG_API dg_generate_params dg_generate_default_params(const dg_model * model);
/* `tokens_out` holds max_new_tokens ids; `steps_out` (may be NULL) receives the step count of each
 * canvas and holds ceil(max_new_tokens / canvas_length) entries. */
DG_API dg_status dg_generate(dg_context * ctx, const dg_sampler_params * sampler, const int32_t * prompt, size_t n_prompt,
                             const dg_generate_params * params, int32_t * tokens_out, uint32_t * steps_out,
                             dg_generate_result * result);

/* ---------------------------------------------------------------------------------------------
 * Quantization with ggml's quantizers (types are ggml_type values, e.g. 12 = Q4_K, 40 = NVFP4).
 */
/* Quantizes n_rows rows of n_per_row floats into `dst` (n_rows * dg_type_row_size bytes);
 * `imatrix` ([n_per_row] importance weights) may be NULL. *n_bytes receives the bytes written. */
DG_API dg_status dg_quantize(int32_t type, const float * src, void * dst, int64_t n_rows, int64_t n_per_row,
                             const float * imatrix, int32_t n_threads, size_t * n_bytes);
/* Bytes of one row; 0 when the type is unknown or n_per_row is not a multiple of its block. */
DG_API size_t    dg_type_row_size(int32_t type, int64_t n_per_row);

/* --- cffi:end --- */

#ifdef __cplusplus
}
#endif

#endif /* DGEMMA_H */
