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
#define DF_ABI_MINOR 2u
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

    /** Reserved for functions added by later minors. */
    const void* reserved[26];
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
