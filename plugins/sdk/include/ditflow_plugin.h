/*
 * ditflow_plugin.h - the ditflow plugin C ABI, for plugins written in C or C++.
 *
 * This header mirrors `plugins/sdk/src/abi.rs`, the single definition of the boundary between
 * the ditflow host and its plugins. `plugins/sdk/tests/header_layout.rs` compiles this header and
 * checks every size, offset and constant against the Rust side: change both together.
 *
 * A plugin is a shared library exporting one symbol, `ditflow_plugin_descriptor` (see
 * DF_PLUGIN_SYMBOL), a static `DfPluginDescriptor`. Use DF_DEFINE_PLUGIN to define it. The host
 * calls the descriptor's register function once, with its function table (`DfHostApi`); the
 * plugin registers its node types through `host->register_node(reg, &desc)`. Every node callback
 * gets the same function table, and only ever talks to the host through it.
 *
 * Versioning follows GStreamer's rule: the host accepts a plugin whose ABI major equals its own
 * and whose minor is not newer. Additions are made only at the end of a struct (in place of a
 * reserved field, or after it with a `size` check), and bump the minor.
 *
 * Ownership rules:
 * - Every `DfValue*` a host function *returns* is owned by the caller (one reference), except
 *   where the doc says "borrowed". Release owned values with `host->value_release`.
 * - `set_output`, `value_list` take ownership of the values passed to them.
 * - Strings in descriptors only need to live for the duration of the `register_node` call; the
 *   host copies them. `user_data` lives until the host calls `drop_user_data`.
 *
 * Status codes: functions returning `int32_t` return DF_OK on success and DF_ERROR on failure.
 * A node callback that fails calls `host->set_error(ctx, message)` first, then returns DF_ERROR.
 *
 * Strings are UTF-8. Unless noted otherwise, `const char*` arguments are NUL-terminated.
 *
 * The header is C99 and also valid C++ (C++11 or later).
 */
#ifndef DITFLOW_PLUGIN_H
#define DITFLOW_PLUGIN_H

#include <stddef.h> /* size_t */
#include <stdint.h> /* uint32_t, int32_t, uint64_t, int64_t */
#include <math.h>   /* NAN, for DF_UNBOUNDED */

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* Versions and the exported symbol                                                            */
/* ------------------------------------------------------------------------------------------ */

/** The ABI major version. A host refuses plugins whose major differs. */
#define DF_ABI_MAJOR 1u
/** The ABI minor version. A host refuses plugins whose minor is newer than its own. */
#define DF_ABI_MINOR 8u
/** "DFLW": the first field of every plugin descriptor. */
#define DF_PLUGIN_MAGIC 0x44464C57u
/**
 * A descriptor flag (ABI 1.2): the library may be unmapped once nothing it made is alive, because
 * it leaves no per-thread destructors, threads or atexit handlers behind. Without it the host keeps
 * the library mapped for the life of the process. Set it with DF_DEFINE_PLUGIN_FLAGS.
 */
#define DF_PLUGIN_UNLOADABLE (1u << 0)

/** The exported symbol naming the plugin's static `DfPluginDescriptor`. */
#define DF_PLUGIN_SYMBOL "ditflow_plugin_descriptor"

/* ------------------------------------------------------------------------------------------ */
/* Constants                                                                                   */
/* ------------------------------------------------------------------------------------------ */

/** Status codes returned by plugin callbacks and host functions. */
#define DF_OK 0
/** The call failed; for node callbacks, the message was passed to `set_error`. */
#define DF_ERROR 1
/** Returned by a fingerprint callback that has no fingerprint for these inputs. */
#define DF_NO_FINGERPRINT 2

/** Node flag: the same inputs always give the same outputs. */
#define DF_NODE_DETERMINISTIC (1u << 0)
/** Node flag: outputs may be kept in the cache and reused (requires determinism to be useful). */
#define DF_NODE_CACHEABLE (1u << 1)
/** Node flag: the node writes files or has other side effects outside its outputs. */
#define DF_NODE_SIDE_EFFECTS (1u << 2)

/** Port flag: an input that may be left unconnected and has no default (`input` returns NULL). */
#define DF_PORT_OPTIONAL (1u << 0)

/** Value kinds, as returned by `value_kind`. */
#define DF_KIND_BOOL 1
#define DF_KIND_INT 2
#define DF_KIND_FLOAT 3
#define DF_KIND_STRING 4
#define DF_KIND_TENSOR 5
#define DF_KIND_LATENT 6
#define DF_KIND_CONDITIONING 7
#define DF_KIND_IMAGE 8
#define DF_KIND_AUDIO 9
#define DF_KIND_VIDEO 10
#define DF_KIND_MODEL 11
#define DF_KIND_LIST 12

/** Tensor element types. */
#define DF_DTYPE_F32 1
#define DF_DTYPE_F16 2
#define DF_DTYPE_BF16 3
#define DF_DTYPE_I64 4
#define DF_DTYPE_I32 5
#define DF_DTYPE_U8 6
/* ggml's block formats (ABI 1.8): the last axis stored in blocks of 32 values (256 for the
 * K-quants), each block scaled; the data are the blocks' bytes, as GGUF stores them. */
#define DF_DTYPE_Q8_0 7
#define DF_DTYPE_Q4_0 8
#define DF_DTYPE_Q4_1 9
#define DF_DTYPE_Q5_0 10
#define DF_DTYPE_Q5_1 11
#define DF_DTYPE_Q4_K 12
#define DF_DTYPE_Q5_K 13
#define DF_DTYPE_Q6_K 14

/* Devices (ABI 1.1): the CPU, and CUDA device n as DF_DEVICE_CUDA0 + n. */
#define DF_DEVICE_CPU 0
#define DF_DEVICE_CUDA0 1

/* Kinds of an op attribute (ABI 1.1). */
#define DF_ATTR_INT 1
#define DF_ATTR_FLOAT 2
#define DF_ATTR_INTS 3
#define DF_ATTR_STRING 4

/** Log levels for `log`. */
#define DF_LOG_ERROR 1
#define DF_LOG_WARN 2
#define DF_LOG_INFO 3
#define DF_LOG_DEBUG 4

/**
 * Header-only convenience (not part of abi.rs): the value for `DfPortDesc.min` / `.max` meaning
 * "unbounded on that side". Note that a zero-initialised port has the range [0, 0], not an
 * unbounded one: always set both `min` and `max`.
 */
#define DF_UNBOUNDED ((double)NAN)

/* ------------------------------------------------------------------------------------------ */
/* Opaque host types                                                                           */
/* ------------------------------------------------------------------------------------------ */

/** A value owned by the host: refcounted, immutable once made. */
typedef struct DfValue DfValue;
/** The host's per-execution context: inputs, outputs, progress, cancellation. */
typedef struct DfContext DfContext;
/** The host's registrar, valid only during the plugin's register call. */
typedef struct DfRegistrar DfRegistrar;

/** The host's function table (defined below). */
typedef struct DfHostApi DfHostApi;

/* ------------------------------------------------------------------------------------------ */
/* Node descriptions                                                                           */
/* ------------------------------------------------------------------------------------------ */

/** One input or output port of a node type. */
typedef struct DfPortDesc {
    /** Port name: [A-Za-z_][A-Za-z0-9_]*. */
    const char* name;
    /**
     * Type expression: Int, Float, Bool, String, Tensor, Tensor<f32>, Tensor<f32, 4>, Latent,
     * Conditioning, Image, Audio, Video, Model, List<T> or Any.
     */
    const char* type_expr;
    /** One-line documentation (may be NULL). */
    const char* doc;
    /** The default as JSON text, or NULL when the input is required (inputs only). */
    const char* default_json;
    /** Inclusive numeric range; NaN (DF_UNBOUNDED) means unbounded on that side. */
    double min;
    double max;
    /** Allowed values separated by '|', or NULL. */
    const char* choices;
    /** DF_PORT_* flags. */
    uint32_t flags;
    /** Padding: set to 0. */
    uint32_t _pad;
    /** Reserved: set to NULL. */
    const void* reserved[2];
} DfPortDesc;

/**
 * Runs the node: reads inputs and sets outputs through the context. Returns DF_OK, or DF_ERROR
 * after calling `set_error`.
 */
typedef int32_t (*DfExecuteFn)(void* user_data, const DfHostApi* host, DfContext* ctx);

/**
 * Computes a fingerprint over the resolved inputs (for example a file's modification time),
 * mixed into the cache key. Returns DF_OK and writes `*out`.
 */
typedef int32_t (*DfFingerprintFn)(void* user_data, const DfHostApi* host, DfContext* ctx,
                                   uint64_t* out);

/** Frees a node type's `user_data` when the host unloads the plugin. */
typedef void (*DfDropFn)(void* user_data);

/** A node type, passed to `register_node`. */
typedef struct DfNodeDesc {
    /** sizeof(DfNodeDesc) as the plugin was compiled. */
    uint32_t size;
    /** DF_NODE_* flags. */
    uint32_t flags;
    /** The node type name: [A-Za-z_][A-Za-z0-9_]*, unique across all loaded plugins. */
    const char* type_name;
    /** A category path such as "math" or "image/io" (may be NULL). */
    const char* category;
    /** The node type's own version (may be NULL: the plugin's version is used). */
    const char* version;
    /** Documentation (may be NULL). */
    const char* doc;
    /** The input ports: an array of `n_inputs` entries (may be NULL when `n_inputs` is 0). */
    const DfPortDesc* inputs;
    size_t n_inputs;
    /** The output ports: an array of `n_outputs` entries (may be NULL when `n_outputs` is 0). */
    const DfPortDesc* outputs;
    size_t n_outputs;
    /** Passed to every callback; freed through `drop_user_data` (may be NULL). */
    void* user_data;
    /** Runs the node (nullable in the ABI, but a node without one cannot run). */
    DfExecuteFn execute;
    /** Optional extra cache-key input (NULL: none). */
    DfFingerprintFn fingerprint;
    /** Frees `user_data` (NULL: nothing to free). */
    DfDropFn drop_user_data;
    /** Reserved: set to NULL. */
    const void* reserved[4];
} DfNodeDesc;

/** Releases a plugin object (a Model, say) when its last reference is dropped. */
typedef void (*DfObjectDropFn)(void* object);

/* ------------------------------------------------------------------------------------------ */
/* The model protocol (ABI 1.3)                                                                */
/* ------------------------------------------------------------------------------------------ */

/*
 * A Model value may carry an interface: a versioned table of functions (DfDenoiserApi,
 * DfTextEncoderApi, DfAutoencoderApi) over the plugin's object, made with host->value_model. Any
 * plugin can then drive the model through the host (denoiser_forward, model_forward) and patch it
 * (model_patch): a patched model is the same base object plus an immutable list of DfPatchDesc
 * with a digest, and the base's forward receives that list and runs the hooks at its sites.
 * Tables and descriptors start with their `size`; a NULL function means "not supported".
 */

/** Interface kinds (value_model, model_interface). */
#define DF_INTERFACE_DENOISER 1u
#define DF_INTERFACE_TEXT_ENCODER 2u
#define DF_INTERFACE_AUTOENCODER 3u

/** What a denoiser predicts (DfDenoiserDesc.prediction); FLOW is the velocity noise - data. */
#define DF_PREDICTION_EPSILON 1
#define DF_PREDICTION_V 2
#define DF_PREDICTION_FLOW 3

/** Guidance branches of a batch row; masks use bit (1 << branch). */
#define DF_BRANCH_COND 0
#define DF_BRANCH_UNCOND 1
/** The conditional prompt run with some blocks skipped (skip-layer guidance; ABI 1.7). */
#define DF_BRANCH_SKIP_LAYERS 2

/** Hook sites inside a block (DfStackDesc.sites, a mask). */
#define DF_SITE_ATTN_IN (1u << 0)
#define DF_SITE_PRE_ATTN (1u << 1)
#define DF_SITE_ATTN (1u << 2)
#define DF_SITE_POST_SELF_ATTN (1u << 3)
#define DF_SITE_POST_CROSS_ATTN (1u << 4)
#define DF_SITE_POST_BLOCK (1u << 5)

/** Denoiser capabilities (DfDenoiserDesc.capabilities), also a patch's requirements. */
#define DF_CAP_LINEAR_DELTA (1ull << 0)
#define DF_CAP_LINEAR_MERGE (1ull << 1)
#define DF_CAP_BLOCK_RESIDUAL (1ull << 2)
#define DF_CAP_RANGE_OVERRIDE (1ull << 3)
#define DF_CAP_ATTENTION_EDIT (1ull << 4)
#define DF_CAP_ATTENTION_MASK (1ull << 5)
#define DF_CAP_ATTENTION_EXTRA (1ull << 6)
#define DF_CAP_BLOCK_STEPPING (1ull << 7)
/**
 * Block stepping by halves (ABI 1.6): a block up to its cross-attention's input, then the rest
 * (run_block_part), for bridges that exchange inside a block (Ovi's fused cross-attention).
 */
#define DF_CAP_BLOCK_PARTS (1ull << 8)

/**
 * The halves of a block: up to the cross-attention's input (the hidden state after the
 * self-attention's residual), and from the cross-attention to the end of the block (with the
 * block's post-block hooks).
 */
#define DF_BLOCK_PART_TO_CROSS 0u
#define DF_BLOCK_PART_FROM_CROSS 1u

/** Patch flags: its range override may skip or forecast blocks. */
#define DF_PATCH_SKIPS_BLOCKS (1u << 0)
/** Patch flags: its injections must run at every step (never inside a skippable range). */
#define DF_PATCH_NEEDS_FRESH (1u << 1)
/** Patch flags: its linear deltas may be merged into a weight copy kept per patch-set digest. */
#define DF_PATCH_MERGE (1u << 2)

/** Lifecycle events. */
#define DF_EVENT_RUN_BEGIN 1
#define DF_EVENT_STEP_BEGIN 2
#define DF_EVENT_STEP_END 3
#define DF_EVENT_RUN_END 4

/** Attention mask kinds: structured first, dense as a last resort. */
#define DF_MASK_NONE 0
#define DF_MASK_KEY_LENGTHS 1
#define DF_MASK_SEGMENT_IDS 2
#define DF_MASK_DENSE 3

/** Attention kinds at an attention site. */
#define DF_ATTENTION_SELF 1
#define DF_ATTENTION_CROSS 2
#define DF_ATTENTION_JOINT 3

/** A named value (borrowed): a forward argument such as "hidden_states". */
typedef struct DfNamedValue {
    const char* name;
    const DfValue* value;
} DfNamedValue;

/**
 * What one denoiser call is: which step of how many, at which noise level, and the guidance
 * branch and conditioning of each batch row. Hooks read this instead of counting calls.
 */
typedef struct DfCallContext {
    /** sizeof(DfCallContext) as the caller was compiled. */
    uint32_t size;
    uint32_t step_index;
    uint32_t num_steps;
    uint32_t _pad;
    /** Unique per sampling run (new_run_id): per-run state is keyed on it. */
    uint64_t run_id;
    double sigma;
    double timestep;
    /** Rows of the batch; `branches` and `cond_ids` hold one entry per row. */
    size_t batch;
    const int32_t* branches;
    const int64_t* cond_ids;
    const void* reserved[4];
} DfCallContext;

/** One stream of hidden states ("image", "text", "video", "audio"). */
typedef struct DfStreamDesc {
    const char* name;
    int64_t width;
} DfStreamDesc;

/** One stack of blocks, in execution order. */
typedef struct DfStackDesc {
    const char* name;
    /** The streams it carries, comma-separated ("image", "image,text"). */
    const char* streams;
    uint32_t n_blocks;
    /** DF_SITE_* mask of the hook sites inside each block. */
    uint32_t sites;
} DfStackDesc;

/**
 * One linear layer by its native weight name (without ".weight"). A fused weight's parts are
 * aliases: `fused_into` names the fused layer and `row_offset` the alias's first output row.
 */
typedef struct DfLinearDesc {
    const char* name;
    int64_t out_features;
    int64_t in_features;
    /** NULL for a layer of its own; else the fused layer this is a row slice of. */
    const char* fused_into;
    int64_t row_offset;
} DfLinearDesc;

/** A denoiser's self-description, owned by the model object and valid while it lives. */
typedef struct DfDenoiserDesc {
    uint32_t size;
    /** DF_PREDICTION_*. */
    int32_t prediction;
    /** The latent's axes, e.g. "BCHW" or "BCFHW". */
    const char* latent_layout;
    int64_t latent_channels;
    /** Latent pixels per token side; 1 for a model without patches. */
    int64_t patch_size;
    const DfStreamDesc* streams;
    size_t n_streams;
    const DfStackDesc* stacks;
    size_t n_stacks;
    const DfLinearDesc* linears;
    size_t n_linears;
    /** DF_CAP_*. */
    uint64_t capabilities;
    /** The conditioning arguments its forward reads, comma-separated (may be empty). */
    const char* conditioning;
    const void* reserved[4];
} DfDenoiserDesc;

/** A LoRA-style delta on one linear layer: y += scale * up(down x), down [r, in], up [out, r]. */
typedef struct DfLinearDelta {
    const char* target;
    const DfValue* down;
    const DfValue* up;
    double scale;
} DfLinearDelta;

/**
 * Runs a contiguous range of the original blocks, from..=to, in order and each at most once per
 * override call, on `hidden`; writes the new hidden state (owned) to `out`.
 */
typedef int32_t (*DfContinuationFn)(void* state, const DfValue* hidden, uint32_t from,
                                    uint32_t to, DfValue** out);

/** The continuation handed to a range override. */
typedef struct DfContinuation {
    void* state;
    DfContinuationFn run;
} DfContinuation;

/**
 * A structured attention mask. SEGMENT_IDS: query i sees key j when
 * allow[q_segments[i] * n_segments + k_segments[j]] != 0; KEY_LENGTHS: row b sees its first
 * key_lengths[b] keys; DENSE: an additive [B, 1|H, Lq, Lk] tensor. Several masks intersect.
 */
typedef struct DfAttentionMask {
    uint32_t size;
    int32_t kind;
    uint32_t n_segments;
    uint32_t _pad;
    DfValue* key_lengths;
    DfValue* q_segments;
    DfValue* k_segments;
    DfValue* allow;
    DfValue* dense;
} DfAttentionMask;

/** A hook position: block `block` of stack `stack`, at site `site` (DF_SITE_*). */
typedef struct DfSite {
    uint32_t stack;
    uint32_t block;
    uint32_t site;
    /** At attention sites its kind (DF_ATTENTION_*), 0 elsewhere. */
    uint32_t attention;
} DfSite;

/**
 * Block residual: a delta (owned, [B, tokens, width]) added into the hidden state from token
 * *token_offset on, after block `block` of `stack`; DF_OK with *delta NULL adds nothing. The
 * host gates it by the patch's strength, step range and branches.
 */
typedef int32_t (*DfBlockResidualFn)(void* user_data, const DfHostApi* host,
                                     const DfCallContext* call, uint32_t stack, uint32_t block,
                                     const DfValue* hidden, DfValue** delta,
                                     int64_t* token_offset);

/**
 * Range override: computes blocks first..=last of `stack` from `hidden`, through `cont` or by
 * skipping or forecasting them, and writes the hidden state after them (owned) to `out`.
 * Injections inside the range run only when `cont` runs them (the atomic rule).
 */
typedef int32_t (*DfRangeOverrideFn)(void* user_data, const DfHostApi* host,
                                     const DfCallContext* call, uint32_t stack, uint32_t first,
                                     uint32_t last, const DfValue* hidden,
                                     const DfContinuation* cont, DfValue** out);

/** Attention edit: may replace *q, *k, *v (owned) before attention; release what it replaces. */
typedef int32_t (*DfAttentionEditFn)(void* user_data, const DfHostApi* host,
                                     const DfCallContext* call, const DfSite* site, int32_t kind,
                                     DfValue** q, DfValue** k, DfValue** v);

/** Attention mask: fills `mask` for an attention site (DF_MASK_NONE for none). */
typedef int32_t (*DfAttentionMaskFn)(void* user_data, const DfHostApi* host,
                                     const DfCallContext* call, const DfSite* site, int32_t kind,
                                     DfAttentionMask* mask);

/** Extra attention branch (IP-Adapter): a delta (owned, or NULL) added to the attention output. */
typedef int32_t (*DfAttentionExtraFn)(void* user_data, const DfHostApi* host,
                                      const DfCallContext* call, const DfSite* site,
                                      const DfValue* q, DfValue** out);

/** Bridge: two streams or towers exchange hidden states at sites a and b (deltas owned or NULL). */
typedef int32_t (*DfBridgeFn)(void* user_data, const DfHostApi* host, const DfCallContext* call,
                              const DfSite* a, const DfSite* b, const DfValue* hidden_a,
                              const DfValue* hidden_b, DfValue** delta_a, DfValue** delta_b);

/** Lifecycle: DF_EVENT_* (run and step begin/end). */
typedef int32_t (*DfLifecycleFn)(void* user_data, const DfHostApi* host, int32_t event,
                                 const DfCallContext* call);

/**
 * The call's named inputs (the latent and the conditioning, as the model receives them), before
 * each forward and each block-stepping prepare of a model holding the patch (ABI 1.5): for
 * patches that run a network of their own on them, such as a ControlNet.
 */
typedef int32_t (*DfCallInputsFn)(void* user_data, const DfHostApi* host, const DfCallContext* call,
                                  const DfNamedValue* inputs, size_t n_inputs);

/** Memory estimate of the patch's own state and extra networks, in bytes. */
typedef uint64_t (*DfMemoryEstimateFn)(void* user_data, const DfDenoiserDesc* desc);

/**
 * A patch, passed to model_patch (copied; the values in linear_deltas are retained) and handed
 * back, as the host's copy, to the denoiser's forward. A NULL hook is not used.
 */
typedef struct DfPatchDesc {
    uint32_t size;
    /** DF_PATCH_*. */
    uint32_t flags;
    /** Names the patch in messages. */
    const char* name;
    /** Filled by the host: the plugin that made the patch. */
    const char* plugin;
    /** Order key among patches of one kind (lower first, then insertion order). */
    int32_t order;
    /** Branches it applies to, a mask of (1 << DF_BRANCH_*); 0 for all. */
    uint32_t branches;
    /** Block-residual strength, and the fraction of the steps [start, end) it applies in. */
    double strength;
    double start;
    double end;
    /** The stack and inclusive block range it covers; last -1 is the stack's last block. */
    int32_t stack;
    int32_t first;
    int32_t last;
    uint32_t _pad;
    /** The patch's own identity (its file and settings), mixed into the model's digest. */
    uint64_t digest;
    /** DF_CAP_* the model must have; the hooks set imply their own. */
    uint64_t required_capabilities;
    void* user_data;
    /** Frees user_data when the last model holding the patch is gone. */
    DfDropFn drop_user_data;
    const DfLinearDelta* linear_deltas;
    size_t n_linear_deltas;
    DfBlockResidualFn block_residual;
    DfRangeOverrideFn range_override;
    DfAttentionEditFn attention_edit;
    DfAttentionMaskFn attention_mask;
    DfAttentionExtraFn attention_extra;
    DfBridgeFn bridge;
    DfLifecycleFn lifecycle;
    DfMemoryEstimateFn memory_estimate;
    /** ABI 1.5 (was the first reserved slot, so NULL in older plugins). */
    DfCallInputsFn call_inputs;
    const void* reserved[7];
} DfPatchDesc;

/**
 * A denoiser's forward: `inputs` are named after the diffusers forward arguments
 * ("hidden_states" and its conditioning; the timestep is in `call`), `patches` the model's patch
 * list in order. Writes the prediction (owned) to `out`. Returns DF_OK, or DF_ERROR after
 * host->set_last_error.
 */
typedef int32_t (*DfDenoiserForwardFn)(void* object, const DfHostApi* host,
                                       const DfCallContext* call, const DfNamedValue* inputs,
                                       size_t n_inputs, const DfPatchDesc* const* patches,
                                       size_t n_patches, DfValue** out);

/** Block stepping, 1: embeddings, positions and modulation, as a state value (owned). */
typedef int32_t (*DfDenoiserPrepareFn)(void* object, const DfHostApi* host,
                                       const DfCallContext* call, const DfNamedValue* inputs,
                                       size_t n_inputs, const DfPatchDesc* const* patches,
                                       size_t n_patches, DfValue** state);

/** Block stepping, 2: blocks from..=to of `stack` on a state, giving the next state (owned). */
typedef int32_t (*DfDenoiserRunBlocksFn)(void* object, const DfHostApi* host,
                                         const DfCallContext* call, const DfValue* state,
                                         uint32_t stack, uint32_t from, uint32_t to,
                                         const DfPatchDesc* const* patches, size_t n_patches,
                                         DfValue** out);

/**
 * Block stepping by halves (DF_CAP_BLOCK_PARTS, ABI 1.6): half `part` (DF_BLOCK_PART_*) of block
 * `block` of `stack` on a state, giving the next state (owned).
 */
typedef int32_t (*DfDenoiserRunBlockPartFn)(void* object, const DfHostApi* host,
                                            const DfCallContext* call, const DfValue* state,
                                            uint32_t stack, uint32_t block, uint32_t part,
                                            const DfPatchDesc* const* patches, size_t n_patches,
                                            DfValue** out);

/** Block stepping, 3: the head, from the last state to the prediction (owned). */
typedef int32_t (*DfDenoiserFinishFn)(void* object, const DfHostApi* host,
                                      const DfCallContext* call, const DfValue* state,
                                      const DfPatchDesc* const* patches, size_t n_patches,
                                      DfValue** out);

/** The denoiser interface. */
typedef struct DfDenoiserApi {
    /** sizeof(DfDenoiserApi) as the plugin was compiled. */
    uint32_t size;
    /** The interface's own version (1). */
    uint32_t version;
    /** The self-description, owned by the object. */
    const DfDenoiserDesc* (*describe)(void* object);
    DfDenoiserForwardFn forward;
    /** Block stepping (DF_CAP_BLOCK_STEPPING), for bridges between separately loaded towers. */
    DfDenoiserPrepareFn prepare;
    DfDenoiserRunBlocksFn run_blocks;
    DfDenoiserFinishFn finish;
    /** Block stepping by halves (DF_CAP_BLOCK_PARTS, ABI 1.6). */
    DfDenoiserRunBlockPartFn run_block_part;
    const void* reserved[3];
} DfDenoiserApi;

/** A generic forward over named inputs: a List of [name, tensor] pairs (owned) in *out. */
typedef int32_t (*DfModelForwardFn)(void* object, const DfHostApi* host,
                                    const DfNamedValue* inputs, size_t n_inputs, DfValue** out);

/** A text encoder's self-description. */
typedef struct DfTextEncoderDesc {
    uint32_t size;
    uint32_t _pad;
    /** Width of the hidden states. */
    int64_t width;
    /** Its longest sequence. */
    int64_t max_tokens;
    const void* reserved[4];
    /** The token that pads a sequence to a fixed length, or -1 (ABI 1.5; a smaller size means
     *  an older plugin, read as -1). */
    int64_t pad_token_id;
} DfTextEncoderDesc;

/** The text-encoder interface. */
typedef struct DfTextEncoderApi {
    uint32_t size;
    uint32_t version;
    const DfTextEncoderDesc* (*describe)(void* object);
    /** Token ids (an owned [1, n] i64 tensor) of `len` bytes of text, at most max_tokens. */
    int32_t (*tokenize)(void* object, const DfHostApi* host, const char* text, size_t len,
                        int64_t max_tokens, DfValue** out);
    /** input_ids (and attention_mask) -> last_hidden_state, and what else the family has. */
    DfModelForwardFn forward;
    const void* reserved[4];
} DfTextEncoderApi;

/** An autoencoder's self-description. */
typedef struct DfAutoencoderDesc {
    uint32_t size;
    uint32_t _pad;
    int64_t latent_channels;
    /** Image pixels per latent pixel. */
    int64_t downscale;
    double scaling_factor;
    double shift_factor;
    const void* reserved[4];
} DfAutoencoderDesc;

/** The autoencoder interface. */
typedef struct DfAutoencoderApi {
    uint32_t size;
    uint32_t version;
    const DfAutoencoderDesc* (*describe)(void* object);
    /** image -> mean, logvar; latent (with tile_size, tile_overlap) -> decoded. */
    DfModelForwardFn forward;
    const void* reserved[4];
} DfAutoencoderApi;

/* ------------------------------------------------------------------------------------------ */
/* The host's function table                                                                   */
/* ------------------------------------------------------------------------------------------ */

/**
 * The host's function table, passed to the register function and to every node callback.
 *
 * Fields are only ever appended. A plugin built against a newer minor checks `size` before
 * calling a function it did not know about. None of the function pointers is NULL.
 */
/** One named attribute of a tensor_op call; `kind` (DF_ATTR_*) says which field holds it. */
typedef struct DfOpAttr {
    const char* name;
    int32_t kind;
    uint32_t _pad;
    int64_t i;
    double f;
    const int64_t* ints;
    size_t n_ints;
    const char* s;
} DfOpAttr;

struct DfHostApi {
    uint32_t abi_major;
    uint32_t abi_minor;
    /** sizeof(DfHostApi) in the host. */
    uint64_t size;

    /* --- registration ---------------------------------------------------------------------- */

    /** Registers a node type (valid only during the register call). */
    int32_t (*register_node)(DfRegistrar* reg, const DfNodeDesc* desc);

    /* --- execution context ----------------------------------------------------------------- */

    /** The value connected to input `name` (borrowed), or NULL if it is absent. */
    const DfValue* (*input)(DfContext* ctx, const char* name);
    /** Sets output `name`, taking ownership of `value`. */
    int32_t (*set_output)(DfContext* ctx, const char* name, DfValue* value);
    /** Records the node's error message (copied). */
    void (*set_error)(DfContext* ctx, const char* msg);
    /** Reports progress: `step` of `total` done. */
    void (*progress)(DfContext* ctx, uint64_t step, uint64_t total);
    /** Non-zero once the run was cancelled: the node should return soon. */
    int32_t (*is_cancelled)(DfContext* ctx);
    /** Writes a log line attributed to the node; `level` is one of DF_LOG_*. */
    void (*log)(DfContext* ctx, int32_t level, const char* msg);
    /**
     * Resolves a path to read (relative to the graph's folder) into a NUL-terminated string
     * returned as a String value (owned).
     */
    DfValue* (*resolve_input_path)(DfContext* ctx, const char* path);
    /** Resolves a path to write (relative to the run's output folder, created on demand). */
    DfValue* (*resolve_output_path)(DfContext* ctx, const char* path);

    /* --- values ---------------------------------------------------------------------------- */

    /** A Bool value (non-zero is true), owned. */
    DfValue* (*value_bool)(int32_t v);
    /** An Int value, owned. */
    DfValue* (*value_int)(int64_t v);
    /** A Float value, owned. */
    DfValue* (*value_float)(double v);
    /** A String value from `len` UTF-8 bytes (copied); NULL if the bytes are not UTF-8. */
    DfValue* (*value_string)(const char* ptr, size_t len);
    /** A List taking ownership of `n` items. */
    DfValue* (*value_list)(DfValue* const* items, size_t n);
    /**
     * A tensor-like value (`kind` is one of DF_KIND_TENSOR, _LATENT, _CONDITIONING, _IMAGE,
     * _AUDIO, _VIDEO) copying `nbytes` of `data`; `data` may be NULL for zeros. NULL on a bad
     * argument.
     */
    DfValue* (*value_tensor)(int32_t kind, int32_t dtype, const int64_t* shape, size_t rank,
                             const void* data, size_t nbytes);
    /**
     * A Model (or other opaque) value owning a plugin object; `drop` (nullable) runs when the
     * last reference goes, and the plugin stays loaded until then. `type_tag` names the
     * object's type for `value_object_get` checks.
     */
    DfValue* (*value_object)(DfContext* ctx, const char* type_tag, void* object,
                             DfObjectDropFn drop);
    /** Adds a reference to `v`. */
    void (*value_retain)(const DfValue* v);
    /** Drops a reference to `v`. */
    void (*value_release)(DfValue* v);
    /** The value's DF_KIND_*. */
    int32_t (*value_kind)(const DfValue* v);
    /** Reads a Bool (0 or 1). */
    int32_t (*value_get_bool)(const DfValue* v, int32_t* out);
    /** Reads an Int. */
    int32_t (*value_get_int)(const DfValue* v, int64_t* out);
    /** Reads a Float (an Int converts). */
    int32_t (*value_get_float)(const DfValue* v, double* out);
    /** Borrows a String's UTF-8 bytes (NUL-terminated, `len` excludes the NUL). */
    int32_t (*value_get_string)(const DfValue* v, const char** ptr, size_t* len);
    /** The number of items in a List. */
    size_t (*value_list_len)(const DfValue* v);
    /** Borrows item `i` of a List, or NULL. */
    const DfValue* (*value_list_get)(const DfValue* v, size_t i);
    /** Describes a tensor-like value; `shape` is borrowed. */
    int32_t (*value_tensor_info)(const DfValue* v, int32_t* dtype, const int64_t** shape,
                                 size_t* rank);
    /** Borrows a CPU tensor's bytes (row-major, contiguous, aligned to 64 bytes). */
    const void* (*value_tensor_data)(const DfValue* v, size_t* nbytes);
    /** The object inside a Model value when its tag equals `type_tag`, else NULL. */
    void* (*value_object_get)(const DfValue* v, const char* type_tag);

    /* --- ops ------------------------------------------------------------------------------- */

    /**
     * Standard-normal noise from the counter-based RNG: the same seed gives the same tensor on
     * every device. `kind` as for `value_tensor`; only DF_DTYPE_F32 for now.
     */
    DfValue* (*tensor_randn)(int32_t kind, int32_t dtype, const int64_t* shape, size_t rank,
                             uint64_t seed);

    /* --- tensor engine (ABI 1.1) ---------------------------------------------------------- */
    /** The run's device (--device): DF_DEVICE_CPU or DF_DEVICE_CUDA0 + n. */
    int32_t (*run_device)(DfContext* ctx);
    /** The device of a tensor-like value (DF_DEVICE_*), or -1 for another value. */
    int32_t (*value_tensor_device)(const DfValue* v);
    /**
     * Writable bytes of a CPU tensor that this handle alone owns (a fresh value_tensor or op
     * output), zero-copy; NULL when the data is shared, mapped from a file, or on a GPU.
     */
    void* (*value_tensor_data_mut)(DfValue* v, size_t* nbytes);
    /**
     * Runs the engine's op `op` (see `ditflow ops`) on `n_inputs` tensor values (NULL for an
     * absent optional input) with `n_attrs` attributes. Writes up to `max_outputs` owned values to
     * `outputs` and their count to `n_outputs`. Outputs are of `out_kind`, or with 0 of the first
     * input's kind. Returns DF_OK, or DF_ERROR with the message in last_error().
     */
    int32_t (*tensor_op)(const char* op, const DfValue* const* inputs, size_t n_inputs,
                         const DfOpAttr* attrs, size_t n_attrs, int32_t out_kind,
                         DfValue** outputs, size_t max_outputs, size_t* n_outputs);
    /**
     * This thread's message for the last failed tensor_op or load_weights (valid until the next
     * such call on the thread), or an empty string.
     */
    const char* (*last_error)(void);
    /**
     * Opens weights: a .safetensors file (memory-mapped, zero-copy), a sharded
     * *.safetensors.index.json, or a diffusers model folder; `path` is relative to the graph's
     * folder. Returns a List of [name, tensor] pairs (owned) with tensors on `device`
     * (DF_DEVICE_*), or NULL with the message in last_error().
     */
    DfValue* (*load_weights)(DfContext* ctx, const char* path, int32_t device);

    /* --- the model protocol (ABI 1.3) ------------------------------------------------------ */
    /**
     * Records this thread's error message (copied), for a protocol function or hook that returns
     * DF_ERROR; last_error() hands it to the caller.
     */
    void (*set_last_error)(const char* msg);
    /**
     * A Model value owning `object` that speaks interface `interface` (DF_INTERFACE_*) through the
     * table `api` (static, or living as long as the object). Otherwise as value_object.
     */
    DfValue* (*value_model)(DfContext* ctx, uint32_t iface, const void* api,
                            const char* type_tag, void* object, DfObjectDropFn drop);
    /**
     * The table of interface `interface` of a Model, with its object written to *object; NULL
     * when the value is not a Model speaking it.
     */
    const void* (*model_interface)(const DfValue* v, uint32_t iface, void** object);
    /** A Model's interface (0 for none), number of patches and digest. */
    int32_t (*model_info)(const DfValue* v, uint32_t* iface, size_t* n_patches,
                          uint64_t* digest);
    /**
     * A new Model: the base of `v` with its patches plus `patch` (copied; its user data is owned
     * by the host from here on, even when the call is refused). No weights are copied. NULL with
     * the message in last_error() when the combination cannot be correct.
     */
    DfValue* (*model_patch)(DfContext* ctx, const DfValue* v, const DfPatchDesc* patch);
    /** Runs a denoiser's forward with its patches; writes the prediction (owned) to *out. */
    int32_t (*denoiser_forward)(const DfValue* v, const DfCallContext* call,
                                const DfNamedValue* inputs, size_t n_inputs, DfValue** out);
    /** Tells a denoiser's patches about a lifecycle event (DF_EVENT_*), in order. */
    int32_t (*denoiser_lifecycle)(const DfValue* v, int32_t event, const DfCallContext* call);
    /** The generic forward of any Model with an interface: a List of [name, tensor] (owned). */
    int32_t (*model_forward)(const DfValue* v, const DfNamedValue* inputs, size_t n_inputs,
                             DfValue** out);
    /** A run id no other run of this process has. */
    uint64_t (*new_run_id)(void);
    /* --- ABI 1.4 ---------------------------------------------------------------------------- */
    /**
     * Block stepping with the model's patches (DF_CAP_BLOCK_STEPPING): the state (owned) from
     * named inputs; a List whose first item is the hidden state [B, L, D].
     */
    int32_t (*denoiser_prepare)(const DfValue* v, const DfCallContext* call,
                                const DfNamedValue* inputs, size_t n_inputs, DfValue** state);
    /** Blocks from..=to of `stack` on a state, giving the next state (owned). */
    int32_t (*denoiser_run_blocks)(const DfValue* v, const DfCallContext* call,
                                   const DfValue* state, uint32_t stack, uint32_t from,
                                   uint32_t to, DfValue** out);
    /** The head: from the last state to the prediction (owned). */
    int32_t (*denoiser_finish)(const DfValue* v, const DfCallContext* call, const DfValue* state,
                               DfValue** out);
    /**
     * Bytes a Model's patches hold beyond its base: their linear deltas, and what their
     * memory_estimate hooks report (merged weight copies, caches, extra networks). 0 for a
     * value that is not a Model.
     */
    uint64_t (*model_patch_memory)(const DfValue* v);
    /* --- ABI 1.6 ---------------------------------------------------------------------------- */
    /**
     * Half `part` (DF_BLOCK_PART_*) of block `block` of `stack` on a state, with the model's
     * patches (DF_CAP_BLOCK_PARTS), giving the next state (owned).
     */
    int32_t (*denoiser_run_block_part)(const DfValue* v, const DfCallContext* call,
                                       const DfValue* state, uint32_t stack, uint32_t block,
                                       uint32_t part, DfValue** out);
    /* --- ABI 1.7 ---------------------------------------------------------------------------- */
    /**
     * Reports a preview of the node's work at `step` of `total`: `len` bytes of a PNG image
     * (copied). Subscribers receive it as a `node_preview` event.
     */
    void (*preview)(DfContext* ctx, uint64_t step, uint64_t total, const uint8_t* png,
                    uint64_t len);

    /** Reserved for functions added by later minors. */
    const void* reserved[11];
};

/* ------------------------------------------------------------------------------------------ */
/* The plugin descriptor                                                                       */
/* ------------------------------------------------------------------------------------------ */

/**
 * The descriptor's register function:
 * registers the plugin's node types through `host->register_node(reg, ...)`.
 */
typedef int32_t (*DfRegisterFn)(const DfHostApi* host, DfRegistrar* reg);

/**
 * The static descriptor every plugin exports under DF_PLUGIN_SYMBOL.
 *
 * The Rust field `register` is called `register_plugin` here: `register` is a keyword in C and
 * C++. Name and position are otherwise identical.
 */
typedef struct DfPluginDescriptor {
    /** Always DF_PLUGIN_MAGIC. */
    uint32_t magic;
    uint32_t abi_major;
    uint32_t abi_minor;
    /** sizeof(DfPluginDescriptor) as the plugin was compiled. */
    uint32_t size;
    /** The plugin's name, e.g. "ditflow-nodes". */
    const char* name;
    /** The plugin's version, e.g. "0.1.0". */
    const char* version;
    /** Registers the plugin's node types (the Rust field `register`). */
    DfRegisterFn register_plugin;
    /** DF_PLUGIN_* flags (ABI 1.2; the first reserved slot before, so 0 in older plugins). */
    uintptr_t flags;
    /** Reserved: set to NULL. */
    const void* reserved[7];
} DfPluginDescriptor;

#ifdef __cplusplus
} /* extern "C" */
#endif

/* ------------------------------------------------------------------------------------------ */
/* Defining the descriptor                                                                     */
/* ------------------------------------------------------------------------------------------ */

/** Gives a definition default (exported) visibility from a shared library. */
#if defined(_WIN32) || defined(__CYGWIN__)
#define DF_EXPORT __declspec(dllexport)
#elif defined(__GNUC__) || defined(__clang__)
#define DF_EXPORT __attribute__((visibility("default")))
#else
#define DF_EXPORT
#endif

/** C linkage for a definition (a `const` object has internal linkage in C++ without it). */
#ifdef __cplusplus
#define DF_EXTERN_C extern "C"
#else
#define DF_EXTERN_C
#endif

/**
 * Defines and exports the plugin's descriptor, built against this header's ABI version:
 *
 *     static int32_t register_nodes(const DfHostApi* host, DfRegistrar* reg) { ... }
 *     DF_DEFINE_PLUGIN("my-plugin", "1.0.0", register_nodes);
 *
 * Use it exactly once per shared library, at file scope, followed by a semicolon. `name_str` and
 * `version_str` must be string literals (or other static strings); `register_fn` is a
 * `DfRegisterFn`. The symbol is `ditflow_plugin_descriptor` (DF_PLUGIN_SYMBOL).
 */
#define DF_DEFINE_PLUGIN(name_str, version_str, register_fn)                                   \
    DF_DEFINE_PLUGIN_FLAGS(name_str, version_str, register_fn, 0)

/**
 * DF_DEFINE_PLUGIN with DF_PLUGIN_* flags, e.g. DF_PLUGIN_UNLOADABLE for a library the host may
 * unmap after a reload once nothing it made is alive.
 */
#define DF_DEFINE_PLUGIN_FLAGS(name_str, version_str, register_fn, flag_bits)                    \
    DF_EXTERN_C DF_EXPORT const DfPluginDescriptor ditflow_plugin_descriptor = {               \
        DF_PLUGIN_MAGIC,                                                                       \
        DF_ABI_MAJOR,                                                                          \
        DF_ABI_MINOR,                                                                          \
        (uint32_t)sizeof(DfPluginDescriptor),                                                  \
        (name_str),                                                                            \
        (version_str),                                                                         \
        (register_fn),                                                                         \
        (flag_bits),                                                                           \
        {0}}

#endif /* DITFLOW_PLUGIN_H */
