/*
 * ditflow.h: embedding the ditflow runtime in a C or C++ application (libditflow_c).
 *
 * The nouns are those of the Rust API, as opaque handles:
 *   ditflow_runtime_t  node types loaded from plugin libraries;
 *   ditflow_graph_t    a parsed graph (YAML document or Lua script), not yet validated;
 *   ditflow_session_t  runs graphs against a runtime, keeping node outputs cached between runs;
 *   ditflow_args_t     typed values for a graph's inputs;
 *   ditflow_report_t   what a run did, and the graph's outputs;
 *   ditflow_value_t    one output value (borrowed from its report);
 *   ditflow_cancel_t   a flag that stops a run (or a watch) from any thread.
 *
 * Conventions:
 *   - Functions return a ditflow_status (DITFLOW_OK is 0) or a handle (NULL on failure). After a
 *     failure, ditflow_last_error() returns the message on the same thread.
 *   - Every handle made by a `_new`/`_from_`/`_run` function is freed by its `_free` function;
 *     `_free(NULL)` does nothing. Handles are independent: freeing a runtime while a session
 *     made from it is alive is fine (the session keeps what it needs).
 *   - Runtimes, graphs and sessions may be used from several threads at once; args, reports and
 *     values belong to one thread at a time.
 *   - Strings are UTF-8 and NUL-terminated; strings returned by the library stay valid for the
 *     life of the handle they came from, unless said otherwise.
 *   - No function lets a Rust panic cross into C: it becomes DITFLOW_ERR_PANIC.
 */
#ifndef DITFLOW_H
#define DITFLOW_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Status codes. */
typedef enum ditflow_status {
    DITFLOW_OK = 0,
    /** A NULL handle, a string that is not UTF-8, a bad option. */
    DITFLOW_ERR_INVALID_ARGUMENT = 1,
    /** A file could not be read. */
    DITFLOW_ERR_IO = 2,
    /** The graph did not parse or validate; the message lists every problem with its location. */
    DITFLOW_ERR_INVALID_GRAPH = 3,
    /** A node failed (or was skipped because an upstream node failed); the report says which. */
    DITFLOW_ERR_RUN_FAILED = 4,
    /** The run was cancelled. */
    DITFLOW_ERR_CANCELLED = 5,
    /** A plugin library was refused. */
    DITFLOW_ERR_PLUGIN = 6,
    /** No such output, or no such item. */
    DITFLOW_ERR_NOT_FOUND = 7,
    /** The value is of another type than asked for. */
    DITFLOW_ERR_TYPE = 8,
    /** A bug inside ditflow was caught at the API boundary. */
    DITFLOW_ERR_PANIC = 9
} ditflow_status;

typedef struct ditflow_runtime ditflow_runtime_t;
typedef struct ditflow_graph ditflow_graph_t;
typedef struct ditflow_session ditflow_session_t;
typedef struct ditflow_args ditflow_args_t;
typedef struct ditflow_report ditflow_report_t;
typedef struct ditflow_value ditflow_value_t;
typedef struct ditflow_cancel ditflow_cancel_t;

/** The message of the last failure on this thread ("" if none). Valid until the next call into
 *  the library on this thread. */
const char* ditflow_last_error(void);

/** The library's version, e.g. "0.1.0". */
const char* ditflow_version(void);

/** The memory cap (the CLI's --max-memory): keep at most `bytes` of the models' memory-mapped
 *  weights resident, the rest read back from disk as it is used (bit for bit as uncapped);
 *  0 removes the cap. It holds for the whole process. */
void ditflow_set_max_memory(size_t bytes);
/** The VRAM cap (the CLI's --max-vram): each GPU holds at most `bytes` of model weights; models
 *  loaded from then on leave the rest in host memory, uploaded when an op needs them (least
 *  recently used let go first). 0 removes the cap. It holds for the whole process. */
void ditflow_set_max_vram(size_t bytes);
/** Bytes of weights read back from disk under the memory cap, or uploaded to a GPU under the
 *  VRAM cap, since the process started. */
uint64_t ditflow_weights_streamed_bytes(void);
/** Tensor cores on CUDA (the CLI's --tensor-cores), for the whole process: nonzero lets
 *  attention and bf16/f16-weight linears run in bf16/f16 with f32 sums and f32 GEMMs in TF32
 *  (results within about 1e-2 of the CPU's); 0 (the default) keeps f32. No effect on the CPU. */
void ditflow_set_tensor_cores(int on);
/** The storage type of a denoiser's activations on a GPU (the CLI's --gpu-activations), for the
 *  whole process: "f32" (the default), "bf16" or "f16". The latent and the token sequences go
 *  into a denoiser on a GPU in that type and its prediction comes back in f32; inside, the
 *  kernels read and write it with f32 sums (results within about the type's precision of f32).
 *  DITFLOW_ERR_INVALID_ARGUMENT for another name. No effect on the CPU. */
ditflow_status ditflow_set_gpu_activations(const char* dtype);

/* ---- Runtime ------------------------------------------------------------------------------ */

/** A runtime with no node types. */
ditflow_runtime_t* ditflow_runtime_new(void);
/** Loads every plugin library in `dir`. Libraries that are not ditflow plugins are skipped;
 *  refused plugins are reported by ditflow_runtime_problems. */
ditflow_status ditflow_runtime_load_plugin_dir(ditflow_runtime_t* rt, const char* dir);
/** Loads one plugin library; DITFLOW_ERR_PLUGIN (with the reason) if it is refused. */
ditflow_status ditflow_runtime_load_plugin(ditflow_runtime_t* rt, const char* path);
/** How many node types the runtime knows. */
size_t ditflow_runtime_node_type_count(const ditflow_runtime_t* rt);
/** Problems met loading plugins, one per line ("" if none). Valid until the next call on `rt`. */
const char* ditflow_runtime_problems(ditflow_runtime_t* rt);
void ditflow_runtime_free(ditflow_runtime_t* rt);

/* ---- Graphs ------------------------------------------------------------------------------- */

/** Reads a graph file: a Lua script (`.lua`, sandboxed) or a YAML document. NULL on failure. */
ditflow_graph_t* ditflow_graph_from_file(const char* path);
/** Parses YAML text; `name` is used in messages, relative paths resolve against `base_dir`. */
ditflow_graph_t* ditflow_graph_from_yaml(const char* text, const char* name, const char* base_dir);
/** Runs a Lua graph script given as text, in the default sandbox. */
ditflow_graph_t* ditflow_graph_from_lua(const char* text, const char* name, const char* base_dir);
void ditflow_graph_free(ditflow_graph_t* graph);

/* ---- Graph inputs --------------------------------------------------------------------------- */

ditflow_args_t* ditflow_args_new(void);
ditflow_status ditflow_args_set_int(ditflow_args_t* args, const char* name, int64_t value);
ditflow_status ditflow_args_set_float(ditflow_args_t* args, const char* name, double value);
ditflow_status ditflow_args_set_bool(ditflow_args_t* args, const char* name, int value);
ditflow_status ditflow_args_set_string(ditflow_args_t* args, const char* name, const char* value);
/** Text parsed by the input's declared type, as `ditflow run --set name=text` does. */
ditflow_status ditflow_args_set_text(ditflow_args_t* args, const char* name, const char* text);
void ditflow_args_free(ditflow_args_t* args);

/* ---- Cancellation --------------------------------------------------------------------------- */

ditflow_cancel_t* ditflow_cancel_new(void);
/** Asks runs using this flag to stop: no new node starts and running nodes are asked to stop. */
void ditflow_cancel_trigger(ditflow_cancel_t* cancel);
void ditflow_cancel_free(ditflow_cancel_t* cancel);

/* ---- Sessions and runs ------------------------------------------------------------------------ */

/** Called for each event of a run, with the event as one line of JSON (the same objects as
 *  `ditflow run --events jsonl`), from worker threads: be quick and thread-safe. The string is
 *  valid during the call only. */
typedef void (*ditflow_event_fn)(const char* event_json, void* user_data);

/** Options of a run; zero-initialise and set what you need. */
typedef struct ditflow_run_options {
    /** sizeof(ditflow_run_options_t). */
    uint32_t size;
    /** Worker threads; 0 for the number of cores. */
    uint32_t workers;
    /** Where nodes write relative output paths; NULL for "out". */
    const char* out_dir;
    /** Called for every event; may be NULL. */
    ditflow_event_fn on_event;
    void* user_data;
    /** Stops the run when triggered; may be NULL. */
    const ditflow_cancel_t* cancel;
} ditflow_run_options_t;

/** A session over `rt` (which it keeps alive) with a 2 GiB output cache. */
ditflow_session_t* ditflow_session_new(const ditflow_runtime_t* rt);
/** Validates and runs `graph` with `args` (may be NULL) and `options` (may be NULL). On
 *  DITFLOW_OK, DITFLOW_ERR_RUN_FAILED and DITFLOW_ERR_CANCELLED `*report` is set (free it);
 *  otherwise it is NULL. Several runs may go at once on one session. */
ditflow_status ditflow_session_run(ditflow_session_t* session, const ditflow_graph_t* graph,
                                   const ditflow_args_t* args, const ditflow_run_options_t* options,
                                   ditflow_report_t** report);
/** Runs the graph file at `path`, then re-runs it whenever it or a Lua module it requires
 *  changes (only changed nodes execute), until `options->cancel` is triggered. Invalid edits
 *  keep the last good graph and are reported as `graph_invalid` events. */
ditflow_status ditflow_session_watch(ditflow_session_t* session, const char* path,
                                     const ditflow_args_t* args,
                                     const ditflow_run_options_t* options);
void ditflow_session_free(ditflow_session_t* session);

/* ---- Reports and values ---------------------------------------------------------------------- */

/** 1 if every node ran or came from the cache, 0 otherwise. */
int ditflow_report_ok(const ditflow_report_t* report);
/** The failures, one per line: "node 'id' (Type): message" ("" if none). */
const char* ditflow_report_errors(const ditflow_report_t* report);
size_t ditflow_report_executed_count(const ditflow_report_t* report);
size_t ditflow_report_cached_count(const ditflow_report_t* report);
size_t ditflow_report_output_count(const ditflow_report_t* report);
/** The name of output `index`, or NULL. */
const char* ditflow_report_output_name(const ditflow_report_t* report, size_t index);
/** The output called `name`, borrowed from the report (do not free it), or NULL. */
const ditflow_value_t* ditflow_report_output(const ditflow_report_t* report, const char* name);
void ditflow_report_free(ditflow_report_t* report);

typedef enum ditflow_value_type {
    DITFLOW_VALUE_BOOL = 0,
    DITFLOW_VALUE_INT = 1,
    DITFLOW_VALUE_FLOAT = 2,
    DITFLOW_VALUE_STRING = 3,
    DITFLOW_VALUE_TENSOR = 4,
    DITFLOW_VALUE_OBJECT = 5,
    DITFLOW_VALUE_LIST = 6
} ditflow_value_type;

ditflow_value_type ditflow_value_get_type(const ditflow_value_t* value);
ditflow_status ditflow_value_get_bool(const ditflow_value_t* value, int* out);
ditflow_status ditflow_value_get_int(const ditflow_value_t* value, int64_t* out);
/** A Float, or an Int converted. */
ditflow_status ditflow_value_get_float(const ditflow_value_t* value, double* out);
/** A String's bytes (NUL-terminated; `len` may be NULL), valid while the report lives. */
ditflow_status ditflow_value_get_string(const ditflow_value_t* value, const char** out, size_t* len);
/** A tensor's shape: writes up to `max` dimensions to `dims` and the rank to `*ndim`. */
ditflow_status ditflow_value_tensor_shape(const ditflow_value_t* value, int64_t* dims, size_t max,
                                          size_t* ndim);
/** Copies a tensor's elements as f32 (converted from its dtype, from any device) into `out`,
 *  which holds `capacity` floats; `*count` gets the element count. DITFLOW_ERR_INVALID_ARGUMENT
 *  when `capacity` is too small. */
ditflow_status ditflow_value_tensor_f32(const ditflow_value_t* value, float* out, size_t capacity,
                                        size_t* count);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DITFLOW_H */
