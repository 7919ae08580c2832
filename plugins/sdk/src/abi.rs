//! The plugin C ABI: the `#[repr(C)]` types and constants shared by the host and every plugin.
//!
//! This module is the single Rust definition of the boundary; `include/ditflow_plugin.h` mirrors it
//! for C and C++ plugins, and `tests/header_layout.rs` compiles that header and checks every size
//! and offset against this file. Nothing here is safe to use directly from plugin code: Rust
//! plugins go through the safe SDK (`crate::Node`, `crate::Context`, `export_plugin!`).
//!
//! Versioning follows GStreamer's rule: the host accepts a plugin whose ABI major equals its own and
//! whose minor is not newer. Additions are made only at the end of a struct (in place of a reserved
//! field, or after it with a `size` check), and bump the minor.
//!
//! Ownership rules:
//! - Every `DfValue*` a host function *returns* is owned by the caller (one reference), except
//!   where the doc says "borrowed".
//! - `set_output`, `value_list` take ownership of the values passed to them.
//! - Strings in descriptors only need to live for the duration of the `register_node` call; the
//!   host copies them. `user_data` lives until the host calls `drop_user_data`.
#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_void};

/// The ABI major version. A host refuses plugins whose major differs.
pub const DF_ABI_MAJOR: u32 = 1;
/// The ABI minor version. A host refuses plugins whose minor is newer than its own.
pub const DF_ABI_MINOR: u32 = 2;
/// A descriptor flag (ABI 1.2): the library may be unmapped once nothing it made is alive, because
/// it leaves no per-thread destructors, threads or `atexit` handlers behind. Without it the host
/// keeps the library mapped for the life of the process (Rust plugins: their standard library
/// registers per-thread destructors that cannot be removed).
pub const DF_PLUGIN_UNLOADABLE: u32 = 1;
/// `"DFLW"`: the first field of every plugin descriptor.
pub const DF_PLUGIN_MAGIC: u32 = 0x4446_4C57;
/// The exported symbol naming the plugin's static `DfPluginDescriptor`.
pub const DF_PLUGIN_SYMBOL: &str = "ditflow_plugin_descriptor";

/// Status codes returned by plugin callbacks and host functions.
pub const DF_OK: i32 = 0;
/// The call failed; for node callbacks, the message was passed to `set_error`.
pub const DF_ERROR: i32 = 1;
/// Returned by a fingerprint callback that has no fingerprint for these inputs.
pub const DF_NO_FINGERPRINT: i32 = 2;

/// Node flag: the same inputs always give the same outputs.
pub const DF_NODE_DETERMINISTIC: u32 = 1 << 0;
/// Node flag: outputs may be kept in the cache and reused (requires determinism to be useful).
pub const DF_NODE_CACHEABLE: u32 = 1 << 1;
/// Node flag: the node writes files or has other side effects outside its outputs.
pub const DF_NODE_SIDE_EFFECTS: u32 = 1 << 2;

/// Port flag: an input that may be left unconnected and has no default (`input` returns NULL).
pub const DF_PORT_OPTIONAL: u32 = 1 << 0;

/// Value kinds, as returned by `value_kind`.
pub const DF_KIND_BOOL: i32 = 1;
pub const DF_KIND_INT: i32 = 2;
pub const DF_KIND_FLOAT: i32 = 3;
pub const DF_KIND_STRING: i32 = 4;
pub const DF_KIND_TENSOR: i32 = 5;
pub const DF_KIND_LATENT: i32 = 6;
pub const DF_KIND_CONDITIONING: i32 = 7;
pub const DF_KIND_IMAGE: i32 = 8;
pub const DF_KIND_AUDIO: i32 = 9;
pub const DF_KIND_VIDEO: i32 = 10;
pub const DF_KIND_MODEL: i32 = 11;
pub const DF_KIND_LIST: i32 = 12;

/// Tensor element types.
pub const DF_DTYPE_F32: i32 = 1;
pub const DF_DTYPE_F16: i32 = 2;
pub const DF_DTYPE_BF16: i32 = 3;
pub const DF_DTYPE_I64: i32 = 4;
pub const DF_DTYPE_I32: i32 = 5;
pub const DF_DTYPE_U8: i32 = 6;

/// Log levels for `log`.
/// Devices: the CPU, and CUDA device `n` as `DF_DEVICE_CUDA0 + n` (ABI 1.1).
pub const DF_DEVICE_CPU: i32 = 0;
pub const DF_DEVICE_CUDA0: i32 = 1;

/// Kinds of an op attribute ([`DfOpAttr::kind`], ABI 1.1).
pub const DF_ATTR_INT: i32 = 1;
pub const DF_ATTR_FLOAT: i32 = 2;
pub const DF_ATTR_INTS: i32 = 3;
pub const DF_ATTR_STRING: i32 = 4;

pub const DF_LOG_ERROR: i32 = 1;
pub const DF_LOG_WARN: i32 = 2;
pub const DF_LOG_INFO: i32 = 3;
pub const DF_LOG_DEBUG: i32 = 4;

/// A value owned by the host: refcounted, immutable once made.
#[repr(C)]
pub struct DfValue {
    _private: [u8; 0],
}

/// The host's per-execution context: inputs, outputs, progress, cancellation.
#[repr(C)]
pub struct DfContext {
    _private: [u8; 0],
}

/// The host's registrar, valid only during the plugin's `register` call.
#[repr(C)]
pub struct DfRegistrar {
    _private: [u8; 0],
}

/// One input or output port of a node type.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DfPortDesc {
    /// Port name: `[A-Za-z_][A-Za-z0-9_]*`.
    pub name: *const c_char,
    /// Type expression: `Int`, `Float`, `Bool`, `String`, `Tensor`, `Tensor<f32>`,
    /// `Tensor<f32, 4>`, `Latent`, `Conditioning`, `Image`, `Audio`, `Video`, `Model`,
    /// `List<T>` or `Any`.
    pub type_expr: *const c_char,
    /// One-line documentation (may be NULL).
    pub doc: *const c_char,
    /// The default as JSON text, or NULL when the input is required (inputs only).
    pub default_json: *const c_char,
    /// Inclusive numeric range; NaN means unbounded on that side.
    pub min: f64,
    pub max: f64,
    /// Allowed values separated by `|`, or NULL.
    pub choices: *const c_char,
    /// `DF_PORT_*` flags.
    pub flags: u32,
    pub _pad: u32,
    pub reserved: [*const c_void; 2],
}

/// Runs the node: reads inputs and sets outputs through the context. Returns `DF_OK`, or
/// `DF_ERROR` after calling `set_error`.
pub type DfExecuteFn = unsafe extern "C" fn(
    user_data: *mut c_void,
    host: *const DfHostApi,
    ctx: *mut DfContext,
) -> i32;
/// Computes a fingerprint over the resolved inputs (for example a file's modification time), mixed
/// into the cache key. Returns `DF_OK` and writes `*out`.
pub type DfFingerprintFn = unsafe extern "C" fn(
    user_data: *mut c_void,
    host: *const DfHostApi,
    ctx: *mut DfContext,
    out: *mut u64,
) -> i32;
/// Frees a node type's `user_data` when the host unloads the plugin.
pub type DfDropFn = unsafe extern "C" fn(user_data: *mut c_void);

/// A node type, passed to `register_node`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DfNodeDesc {
    /// `sizeof(DfNodeDesc)` as the plugin was compiled.
    pub size: u32,
    /// `DF_NODE_*` flags.
    pub flags: u32,
    /// The node type name: `[A-Za-z_][A-Za-z0-9_]*`, unique across all loaded plugins.
    pub type_name: *const c_char,
    /// A category path such as `math` or `image/io` (may be NULL).
    pub category: *const c_char,
    /// The node type's own version (may be NULL: the plugin's version is used).
    pub version: *const c_char,
    /// Documentation (may be NULL).
    pub doc: *const c_char,
    pub inputs: *const DfPortDesc,
    pub n_inputs: usize,
    pub outputs: *const DfPortDesc,
    pub n_outputs: usize,
    pub user_data: *mut c_void,
    pub execute: Option<DfExecuteFn>,
    pub fingerprint: Option<DfFingerprintFn>,
    pub drop_user_data: Option<DfDropFn>,
    pub reserved: [*const c_void; 4],
}

/// Releases a plugin object (a Model, say) when its last reference is dropped.
pub type DfObjectDropFn = unsafe extern "C" fn(object: *mut c_void);

/// One named attribute of a `tensor_op` call; `kind` says which of `i`, `f`, `ints`/`n_ints` or
/// `s` holds the value (ABI 1.1).
#[repr(C)]
pub struct DfOpAttr {
    pub name: *const c_char,
    pub kind: i32,
    pub _pad: u32,
    pub i: i64,
    pub f: f64,
    pub ints: *const i64,
    pub n_ints: usize,
    pub s: *const c_char,
}

/// The host's function table, passed to `register` and to every node callback.
///
/// Fields are only ever appended. A plugin built against a newer minor checks `size` before
/// calling a function it did not know about.
#[repr(C)]
pub struct DfHostApi {
    pub abi_major: u32,
    pub abi_minor: u32,
    /// `sizeof(DfHostApi)` in the host.
    pub size: u64,

    // --- registration -------------------------------------------------------------------
    pub register_node: unsafe extern "C" fn(reg: *mut DfRegistrar, desc: *const DfNodeDesc) -> i32,

    // --- execution context --------------------------------------------------------------
    /// The value connected to input `name` (borrowed), or NULL if it is absent.
    pub input: unsafe extern "C" fn(ctx: *mut DfContext, name: *const c_char) -> *const DfValue,
    /// Sets output `name`, taking ownership of `value`.
    pub set_output:
        unsafe extern "C" fn(ctx: *mut DfContext, name: *const c_char, value: *mut DfValue) -> i32,
    /// Records the node's error message (copied).
    pub set_error: unsafe extern "C" fn(ctx: *mut DfContext, msg: *const c_char),
    /// Reports progress: `step` of `total` done.
    pub progress: unsafe extern "C" fn(ctx: *mut DfContext, step: u64, total: u64),
    /// Non-zero once the run was cancelled: the node should return soon.
    pub is_cancelled: unsafe extern "C" fn(ctx: *mut DfContext) -> i32,
    /// Writes a log line attributed to the node.
    pub log: unsafe extern "C" fn(ctx: *mut DfContext, level: i32, msg: *const c_char),
    /// Resolves a path to read (relative to the graph's folder) into a NUL-terminated string
    /// returned as a String value (owned).
    pub resolve_input_path:
        unsafe extern "C" fn(ctx: *mut DfContext, path: *const c_char) -> *mut DfValue,
    /// Resolves a path to write (relative to the run's output folder, created on demand).
    pub resolve_output_path:
        unsafe extern "C" fn(ctx: *mut DfContext, path: *const c_char) -> *mut DfValue,

    // --- values ---------------------------------------------------------------------------
    pub value_bool: unsafe extern "C" fn(v: i32) -> *mut DfValue,
    pub value_int: unsafe extern "C" fn(v: i64) -> *mut DfValue,
    pub value_float: unsafe extern "C" fn(v: f64) -> *mut DfValue,
    /// A string value from UTF-8 bytes (copied); NULL if the bytes are not UTF-8.
    pub value_string: unsafe extern "C" fn(ptr: *const c_char, len: usize) -> *mut DfValue,
    /// A list taking ownership of `n` items.
    pub value_list: unsafe extern "C" fn(items: *const *mut DfValue, n: usize) -> *mut DfValue,
    /// A tensor-like value (`kind` is one of TENSOR, LATENT, CONDITIONING, IMAGE, AUDIO,
    /// VIDEO) copying `nbytes` of `data`; `data` may be NULL for zeros. NULL on a bad argument.
    pub value_tensor: unsafe extern "C" fn(
        kind: i32,
        dtype: i32,
        shape: *const i64,
        rank: usize,
        data: *const c_void,
        nbytes: usize,
    ) -> *mut DfValue,
    /// A Model (or other opaque) value owning a plugin object; `drop` runs when the last
    /// reference goes, and the plugin stays loaded until then. `type_tag` names the object's
    /// type for `value_object` checks.
    pub value_object: unsafe extern "C" fn(
        ctx: *mut DfContext,
        type_tag: *const c_char,
        object: *mut c_void,
        drop: Option<DfObjectDropFn>,
    ) -> *mut DfValue,
    pub value_retain: unsafe extern "C" fn(v: *const DfValue),
    pub value_release: unsafe extern "C" fn(v: *mut DfValue),
    pub value_kind: unsafe extern "C" fn(v: *const DfValue) -> i32,
    pub value_get_bool: unsafe extern "C" fn(v: *const DfValue, out: *mut i32) -> i32,
    /// Reads an Int.
    pub value_get_int: unsafe extern "C" fn(v: *const DfValue, out: *mut i64) -> i32,
    /// Reads a Float (an Int converts).
    pub value_get_float: unsafe extern "C" fn(v: *const DfValue, out: *mut f64) -> i32,
    /// Borrows a String's UTF-8 bytes (NUL-terminated, `len` excludes the NUL).
    pub value_get_string:
        unsafe extern "C" fn(v: *const DfValue, ptr: *mut *const c_char, len: *mut usize) -> i32,
    pub value_list_len: unsafe extern "C" fn(v: *const DfValue) -> usize,
    /// Borrows item `i` of a List, or NULL.
    pub value_list_get: unsafe extern "C" fn(v: *const DfValue, i: usize) -> *const DfValue,
    /// Describes a tensor-like value; `shape` is borrowed.
    pub value_tensor_info: unsafe extern "C" fn(
        v: *const DfValue,
        dtype: *mut i32,
        shape: *mut *const i64,
        rank: *mut usize,
    ) -> i32,
    /// Borrows a CPU tensor's bytes (row-major, contiguous, aligned to 64 bytes).
    pub value_tensor_data:
        unsafe extern "C" fn(v: *const DfValue, nbytes: *mut usize) -> *const c_void,
    /// The object inside a Model value when its tag equals `type_tag`, else NULL.
    pub value_object_get:
        unsafe extern "C" fn(v: *const DfValue, type_tag: *const c_char) -> *mut c_void,

    // --- ops ------------------------------------------------------------------------------
    /// Standard-normal noise from the counter-based RNG: the same seed gives the same tensor on
    /// every device. `kind` as for `value_tensor`; only `DF_DTYPE_F32` for now.
    pub tensor_randn: unsafe extern "C" fn(
        kind: i32,
        dtype: i32,
        shape: *const i64,
        rank: usize,
        seed: u64,
    ) -> *mut DfValue,

    // --- tensor engine (ABI 1.1) ---------------------------------------------------------
    /// The run's device (`--device`), as `DF_DEVICE_CPU` or `DF_DEVICE_CUDA0 + n`.
    pub run_device: unsafe extern "C" fn(ctx: *mut DfContext) -> i32,
    /// The device of a tensor-like value (`DF_DEVICE_*`), or -1 for another value.
    pub value_tensor_device: unsafe extern "C" fn(v: *const DfValue) -> i32,
    /// Writable bytes of a CPU tensor that this handle alone owns (a fresh `value_tensor` or op
    /// output), zero-copy; NULL when the data is shared, mapped from a file, or on a GPU.
    pub value_tensor_data_mut:
        unsafe extern "C" fn(v: *mut DfValue, nbytes: *mut usize) -> *mut c_void,
    /// Runs the engine's op `op` (see `ditflow ops`) on `n_inputs` tensor values (NULL for an
    /// absent optional input) with `n_attrs` attributes. Writes up to `max_outputs` owned values
    /// to `outputs` and their count to `n_outputs`. Outputs are of `out_kind`, or with 0 of the
    /// first input's kind. Returns `DF_OK`, or `DF_ERROR` with the message in `last_error`.
    pub tensor_op: unsafe extern "C" fn(
        op: *const c_char,
        inputs: *const *const DfValue,
        n_inputs: usize,
        attrs: *const DfOpAttr,
        n_attrs: usize,
        out_kind: i32,
        outputs: *mut *mut DfValue,
        max_outputs: usize,
        n_outputs: *mut usize,
    ) -> i32,
    /// This thread's message for the last failed `tensor_op` or `load_weights` (valid until the
    /// next such call on the thread), or an empty string.
    pub last_error: unsafe extern "C" fn() -> *const c_char,
    /// Opens weights: a `.safetensors` file (memory-mapped, zero-copy), a sharded
    /// `*.safetensors.index.json`, or a diffusers model folder; `path` is relative to the graph's
    /// folder. Returns a List of `[name, tensor]` pairs (owned) with tensors on `device`
    /// (`DF_DEVICE_*`), or NULL with the message in `last_error`.
    pub load_weights:
        unsafe extern "C" fn(ctx: *mut DfContext, path: *const c_char, device: i32) -> *mut DfValue,

    pub reserved: [*const c_void; 26],
}

/// Registers a plugin's node types through `host->register_node(reg, ...)`.
pub type DfRegisterFn = unsafe extern "C" fn(host: *const DfHostApi, reg: *mut DfRegistrar) -> i32;

/// The static descriptor every plugin exports under `DF_PLUGIN_SYMBOL`.
#[repr(C)]
pub struct DfPluginDescriptor {
    /// Always `DF_PLUGIN_MAGIC`.
    pub magic: u32,
    pub abi_major: u32,
    pub abi_minor: u32,
    /// `sizeof(DfPluginDescriptor)` as the plugin was compiled.
    pub size: u32,
    /// The plugin's name, e.g. `ditflow-nodes`.
    pub name: *const c_char,
    /// The plugin's version, e.g. `0.1.0`.
    pub version: *const c_char,
    /// Registers the plugin's node types through `host->register_node(reg, ...)`.
    pub register_plugin: Option<DfRegisterFn>,
    /// `DF_PLUGIN_*` flags (ABI 1.2; was the first reserved slot, so 0 in older plugins).
    pub flags: usize,
    pub reserved: [*const c_void; 7],
}

// The descriptor is immutable static data: its pointers point at string literals and code.
unsafe impl Sync for DfPluginDescriptor {}
