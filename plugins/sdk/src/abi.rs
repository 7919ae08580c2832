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
pub const DF_ABI_MINOR: u32 = 8;
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
/// ggml's block formats (ABI 1.8): a tensor's last axis is stored in blocks of 32 values (256
/// for the K-quants), each block scaled; its data are the blocks' bytes, as GGUF stores them.
pub const DF_DTYPE_Q8_0: i32 = 7;
pub const DF_DTYPE_Q4_0: i32 = 8;
pub const DF_DTYPE_Q4_1: i32 = 9;
pub const DF_DTYPE_Q5_0: i32 = 10;
pub const DF_DTYPE_Q5_1: i32 = 11;
pub const DF_DTYPE_Q4_K: i32 = 12;
pub const DF_DTYPE_Q5_K: i32 = 13;
pub const DF_DTYPE_Q6_K: i32 = 14;

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

// --- the model protocol (ABI 1.3) -----------------------------------------------------------
//
// A Model value may carry an *interface*: a versioned table of functions (`DfDenoiserApi`,
// `DfTextEncoderApi`, `DfAutoencoderApi`) over the plugin's object, made with `value_model`. Any
// plugin can then drive the model through the host (`denoiser_forward`, `model_forward`) and
// patch it (`model_patch`): a patched model is the same base object plus an immutable list of
// `DfPatchDesc`s with a digest, and the base's forward receives that list and runs the hooks at
// its sites. Tables and descriptors start with their `size`; a field past a caller's `size` is
// absent, and a NULL function means "not supported".

/// Interface kinds ([`DfHostApi::value_model`], `model_interface`).
pub const DF_INTERFACE_DENOISER: u32 = 1;
pub const DF_INTERFACE_TEXT_ENCODER: u32 = 2;
pub const DF_INTERFACE_AUTOENCODER: u32 = 3;

/// What a denoiser predicts ([`DfDenoiserDesc::prediction`]).
pub const DF_PREDICTION_EPSILON: i32 = 1;
pub const DF_PREDICTION_V: i32 = 2;
/// Flow-matching velocity (noise − data).
pub const DF_PREDICTION_FLOW: i32 = 3;

/// Guidance branches of a batch row ([`DfCallContext::branches`]); masks use bit `1 << branch`.
pub const DF_BRANCH_COND: i32 = 0;
pub const DF_BRANCH_UNCOND: i32 = 1;
/// The conditional prompt run with some blocks skipped (skip-layer guidance; ABI 1.7).
pub const DF_BRANCH_SKIP_LAYERS: i32 = 2;

/// Hook sites inside a block ([`DfStackDesc::sites`], a mask).
pub const DF_SITE_ATTN_IN: u32 = 1 << 0;
pub const DF_SITE_PRE_ATTN: u32 = 1 << 1;
pub const DF_SITE_ATTN: u32 = 1 << 2;
pub const DF_SITE_POST_SELF_ATTN: u32 = 1 << 3;
pub const DF_SITE_POST_CROSS_ATTN: u32 = 1 << 4;
pub const DF_SITE_POST_BLOCK: u32 = 1 << 5;

/// Denoiser capabilities ([`DfDenoiserDesc::capabilities`]), also a patch's requirements.
pub const DF_CAP_LINEAR_DELTA: u64 = 1 << 0;
pub const DF_CAP_LINEAR_MERGE: u64 = 1 << 1;
pub const DF_CAP_BLOCK_RESIDUAL: u64 = 1 << 2;
pub const DF_CAP_RANGE_OVERRIDE: u64 = 1 << 3;
pub const DF_CAP_ATTENTION_EDIT: u64 = 1 << 4;
pub const DF_CAP_ATTENTION_MASK: u64 = 1 << 5;
pub const DF_CAP_ATTENTION_EXTRA: u64 = 1 << 6;
pub const DF_CAP_BLOCK_STEPPING: u64 = 1 << 7;
/// Block stepping by halves (ABI 1.6): a block up to its cross-attention's input, then the rest
/// (`run_block_part`), for bridges that exchange inside a block (Ovi's fused cross-attention).
pub const DF_CAP_BLOCK_PARTS: u64 = 1 << 8;

/// The halves of a block ([`DfDenoiserRunBlockPartFn`]): up to the cross-attention's input (the
/// hidden state after the self-attention's residual), and from the cross-attention to the end of
/// the block (with the block's post-block hooks).
pub const DF_BLOCK_PART_TO_CROSS: u32 = 0;
pub const DF_BLOCK_PART_FROM_CROSS: u32 = 1;

/// Patch flags ([`DfPatchDesc::flags`]).
/// Its range override may skip or forecast blocks instead of computing them.
pub const DF_PATCH_SKIPS_BLOCKS: u32 = 1 << 0;
/// Its injections must run at every step: it cannot sit inside a range another patch may skip.
pub const DF_PATCH_NEEDS_FRESH: u32 = 1 << 1;
/// Its linear deltas may be merged into a copy of the weights (kept per patch-set digest) instead
/// of running unmerged beside them.
pub const DF_PATCH_MERGE: u32 = 1 << 2;

/// Lifecycle events ([`DfPatchDesc::lifecycle`], `denoiser_lifecycle`).
pub const DF_EVENT_RUN_BEGIN: i32 = 1;
pub const DF_EVENT_STEP_BEGIN: i32 = 2;
pub const DF_EVENT_STEP_END: i32 = 3;
pub const DF_EVENT_RUN_END: i32 = 4;

/// Attention mask kinds ([`DfAttentionMask::kind`]): structured first, dense as a last resort.
pub const DF_MASK_NONE: i32 = 0;
pub const DF_MASK_KEY_LENGTHS: i32 = 1;
pub const DF_MASK_SEGMENT_IDS: i32 = 2;
pub const DF_MASK_DENSE: i32 = 3;

/// Attention kinds at an attention site.
pub const DF_ATTENTION_SELF: i32 = 1;
pub const DF_ATTENTION_CROSS: i32 = 2;
pub const DF_ATTENTION_JOINT: i32 = 3;

/// A named value: a forward argument (`hidden_states`, `encoder_hidden_states`, ...), borrowed.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DfNamedValue {
    pub name: *const c_char,
    pub value: *const DfValue,
}

/// What one denoiser call is, for the model and every hook: which step of how many, at which
/// noise level, and the guidance branch and conditioning of each batch row. Hooks read this
/// instead of counting calls or matching sigmas.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DfCallContext {
    /// `sizeof(DfCallContext)` as the caller was compiled.
    pub size: u32,
    pub step_index: u32,
    pub num_steps: u32,
    pub _pad: u32,
    /// Unique per sampling run (`new_run_id`): per-run state is keyed on it.
    pub run_id: u64,
    pub sigma: f64,
    pub timestep: f64,
    /// Rows of the batch; `branches` and `cond_ids` hold one entry per row.
    pub batch: usize,
    pub branches: *const i32,
    pub cond_ids: *const i64,
    pub reserved: [*const c_void; 4],
}

/// One stream of hidden states (`image`, `text`, `video`, `audio`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DfStreamDesc {
    pub name: *const c_char,
    pub width: i64,
}

/// One stack of blocks, in execution order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DfStackDesc {
    pub name: *const c_char,
    /// The streams it carries, comma-separated (`image`, `image,text`).
    pub streams: *const c_char,
    pub n_blocks: u32,
    /// `DF_SITE_*` mask of the hook sites inside each block.
    pub sites: u32,
}

/// One linear layer by its native weight name (without `.weight`). A fused weight's parts are
/// aliases: `fused_into` names the fused layer and `row_offset` the alias's first output row.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DfLinearDesc {
    pub name: *const c_char,
    pub out_features: i64,
    pub in_features: i64,
    /// NULL for a layer of its own; else the fused layer this is a row slice of.
    pub fused_into: *const c_char,
    pub row_offset: i64,
}

/// A denoiser's self-description, owned by the model object and valid while it lives.
#[repr(C)]
pub struct DfDenoiserDesc {
    pub size: u32,
    /// `DF_PREDICTION_*`.
    pub prediction: i32,
    /// The latent's axes, e.g. `BCHW` or `BCFHW`.
    pub latent_layout: *const c_char,
    pub latent_channels: i64,
    /// Latent pixels per token side (the patch size); 1 for a model without patches.
    pub patch_size: i64,
    pub streams: *const DfStreamDesc,
    pub n_streams: usize,
    pub stacks: *const DfStackDesc,
    pub n_stacks: usize,
    pub linears: *const DfLinearDesc,
    pub n_linears: usize,
    /// `DF_CAP_*`.
    pub capabilities: u64,
    /// The conditioning arguments its forward reads, comma-separated
    /// (`encoder_hidden_states,encoder_attention_mask`; empty for an unconditional model).
    pub conditioning: *const c_char,
    pub reserved: [*const c_void; 4],
}

/// A LoRA-style delta on one linear layer (by native name or alias):
/// `y += scale · up·(down·x)` with `down` `[r, in]` and `up` `[out, r]`, applied unmerged.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DfLinearDelta {
    pub target: *const c_char,
    pub down: *const DfValue,
    pub up: *const DfValue,
    pub scale: f64,
}

/// Runs a contiguous range of the original blocks, `from..=to`, in order and each at most once
/// per override call, on `hidden`; writes the new hidden state (owned) to `out`.
pub type DfContinuationFn = unsafe extern "C" fn(
    state: *mut c_void,
    hidden: *const DfValue,
    from: u32,
    to: u32,
    out: *mut *mut DfValue,
) -> i32;

/// The continuation handed to a range override.
#[repr(C)]
pub struct DfContinuation {
    pub state: *mut c_void,
    pub run: Option<DfContinuationFn>,
}

/// A structured attention mask. `SEGMENT_IDS`: query token `i` may see key `j` when
/// `allow[q_segments[i] * n_segments + k_segments[j]]` is non-zero; `KEY_LENGTHS`: row `b` sees
/// its first `key_lengths[b]` keys; `DENSE`: an additive `[B, 1|H, Lq, Lk]` tensor. Several
/// masks intersect.
#[repr(C)]
pub struct DfAttentionMask {
    pub size: u32,
    pub kind: i32,
    pub n_segments: u32,
    pub _pad: u32,
    pub key_lengths: *mut DfValue,
    pub q_segments: *mut DfValue,
    pub k_segments: *mut DfValue,
    pub allow: *mut DfValue,
    pub dense: *mut DfValue,
}

/// A hook position: block `block` of stack `stack`, at site `site` (`DF_SITE_*`); at attention
/// sites `attention` is its kind (`DF_ATTENTION_*`), 0 elsewhere.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DfSite {
    pub stack: u32,
    pub block: u32,
    pub site: u32,
    pub attention: u32,
}

/// Block residual: a delta (owned, `[B, tokens, width]`) to add into the hidden state
/// `[B, L, width]` from token `*token_offset` on, after block `block` of `stack`; DF_OK with
/// `*delta` NULL adds nothing. The host gates it by the patch's strength, step range and branches.
pub type DfBlockResidualFn = unsafe extern "C" fn(
    user_data: *mut c_void,
    host: *const DfHostApi,
    call: *const DfCallContext,
    stack: u32,
    block: u32,
    hidden: *const DfValue,
    delta: *mut *mut DfValue,
    token_offset: *mut i64,
) -> i32;

/// Range override: computes blocks `first..=last` of `stack` from `hidden`, through `cont` or by
/// skipping or forecasting them, and writes the resulting hidden state (owned) to `out`.
/// Injections inside the range run only when `cont` runs them (the atomic rule).
pub type DfRangeOverrideFn = unsafe extern "C" fn(
    user_data: *mut c_void,
    host: *const DfHostApi,
    call: *const DfCallContext,
    stack: u32,
    first: u32,
    last: u32,
    hidden: *const DfValue,
    cont: *const DfContinuation,
    out: *mut *mut DfValue,
) -> i32;

/// Attention edit: may replace `*q`, `*k`, `*v` (`[B, L, H·Dh]`, owned) before attention at a
/// site of kind `DF_ATTENTION_*`; release what is replaced.
pub type DfAttentionEditFn = unsafe extern "C" fn(
    user_data: *mut c_void,
    host: *const DfHostApi,
    call: *const DfCallContext,
    site: *const DfSite,
    kind: i32,
    q: *mut *mut DfValue,
    k: *mut *mut DfValue,
    v: *mut *mut DfValue,
) -> i32;

/// Attention mask: fills `mask` for an attention site (kind `DF_MASK_NONE` for none).
pub type DfAttentionMaskFn = unsafe extern "C" fn(
    user_data: *mut c_void,
    host: *const DfHostApi,
    call: *const DfCallContext,
    site: *const DfSite,
    kind: i32,
    mask: *mut DfAttentionMask,
) -> i32;

/// Extra attention branch (IP-Adapter): from the query `q`, a delta (owned) added to the
/// attention output; NULL adds nothing.
pub type DfAttentionExtraFn = unsafe extern "C" fn(
    user_data: *mut c_void,
    host: *const DfHostApi,
    call: *const DfCallContext,
    site: *const DfSite,
    q: *const DfValue,
    out: *mut *mut DfValue,
) -> i32;

/// Bridge: two streams (or two towers stepped block by block) exchange hidden states at sites
/// `a` and `b`; the deltas (owned, or NULL) are added after both are computed.
pub type DfBridgeFn = unsafe extern "C" fn(
    user_data: *mut c_void,
    host: *const DfHostApi,
    call: *const DfCallContext,
    a: *const DfSite,
    b: *const DfSite,
    hidden_a: *const DfValue,
    hidden_b: *const DfValue,
    delta_a: *mut *mut DfValue,
    delta_b: *mut *mut DfValue,
) -> i32;

/// Lifecycle: `DF_EVENT_*` (run and step begin/end); no tensors.
pub type DfLifecycleFn = unsafe extern "C" fn(
    user_data: *mut c_void,
    host: *const DfHostApi,
    event: i32,
    call: *const DfCallContext,
) -> i32;

/// The call's named inputs (the latent and the conditioning, as the model receives them), before
/// each forward and each block-stepping `prepare` of a model holding the patch (ABI 1.5): for
/// patches that run a network of their own on them, such as a ControlNet.
pub type DfCallInputsFn = unsafe extern "C" fn(
    user_data: *mut c_void,
    host: *const DfHostApi,
    call: *const DfCallContext,
    inputs: *const DfNamedValue,
    n_inputs: usize,
) -> i32;

/// Memory estimate of the patch's own state and extra networks, in bytes.
pub type DfMemoryEstimateFn =
    unsafe extern "C" fn(user_data: *mut c_void, desc: *const DfDenoiserDesc) -> u64;

/// A patch, passed to `model_patch` (copied; the values in `linear_deltas` are retained) and
/// handed back, as the host's copy, to the denoiser's forward. A NULL hook is not used.
#[repr(C)]
pub struct DfPatchDesc {
    pub size: u32,
    /// `DF_PATCH_*`.
    pub flags: u32,
    /// Names the patch in messages, e.g. `LoRA(style.safetensors)`.
    pub name: *const c_char,
    /// Filled by the host: the plugin that made the patch.
    pub plugin: *const c_char,
    /// Order key among patches of one kind (lower runs first, then insertion order).
    pub order: i32,
    /// Guidance branches the patch applies to, as a mask of `1 << DF_BRANCH_*`; 0 for all.
    pub branches: u32,
    /// Block-residual strength and the fraction of the steps, `[start, end)`, it applies in.
    pub strength: f64,
    pub start: f64,
    pub end: f64,
    /// The stack and inclusive block range the block residual or range override covers;
    /// `last` -1 is the stack's last block.
    pub stack: i32,
    pub first: i32,
    pub last: i32,
    pub _pad: u32,
    /// The patch's own identity (its file and settings), mixed into the model's digest.
    pub digest: u64,
    /// `DF_CAP_*` the model must have; the hooks set imply their own.
    pub required_capabilities: u64,
    pub user_data: *mut c_void,
    /// Frees `user_data` when the last model holding the patch is gone.
    pub drop_user_data: Option<DfDropFn>,
    pub linear_deltas: *const DfLinearDelta,
    pub n_linear_deltas: usize,
    pub block_residual: Option<DfBlockResidualFn>,
    pub range_override: Option<DfRangeOverrideFn>,
    pub attention_edit: Option<DfAttentionEditFn>,
    pub attention_mask: Option<DfAttentionMaskFn>,
    pub attention_extra: Option<DfAttentionExtraFn>,
    pub bridge: Option<DfBridgeFn>,
    pub lifecycle: Option<DfLifecycleFn>,
    pub memory_estimate: Option<DfMemoryEstimateFn>,
    /// ABI 1.5 (was the first reserved slot, so NULL in older plugins).
    pub call_inputs: Option<DfCallInputsFn>,
    pub reserved: [*const c_void; 7],
}

/// A denoiser's forward: `inputs` are named after the diffusers forward arguments
/// (`hidden_states`, `timestep` is taken from `call`, plus its conditioning), `patches` the
/// model's patch list (the host's copies, in order). Writes the prediction (owned) to `out`.
/// Returns DF_OK, or DF_ERROR after `host->set_last_error`.
pub type DfDenoiserForwardFn = unsafe extern "C" fn(
    object: *mut c_void,
    host: *const DfHostApi,
    call: *const DfCallContext,
    inputs: *const DfNamedValue,
    n_inputs: usize,
    patches: *const *const DfPatchDesc,
    n_patches: usize,
    out: *mut *mut DfValue,
) -> i32;

/// Block stepping, step 1: embeddings, positions and modulation for one call, as a state value
/// (owned) holding every stream's hidden states.
pub type DfDenoiserPrepareFn = unsafe extern "C" fn(
    object: *mut c_void,
    host: *const DfHostApi,
    call: *const DfCallContext,
    inputs: *const DfNamedValue,
    n_inputs: usize,
    patches: *const *const DfPatchDesc,
    n_patches: usize,
    state: *mut *mut DfValue,
) -> i32;

/// Block stepping, step 2: runs blocks `from..=to` of `stack` on a state, giving the next state.
pub type DfDenoiserRunBlocksFn = unsafe extern "C" fn(
    object: *mut c_void,
    host: *const DfHostApi,
    call: *const DfCallContext,
    state: *const DfValue,
    stack: u32,
    from: u32,
    to: u32,
    patches: *const *const DfPatchDesc,
    n_patches: usize,
    out: *mut *mut DfValue,
) -> i32;

/// Block stepping by halves (`DF_CAP_BLOCK_PARTS`, ABI 1.6): runs half `part`
/// (`DF_BLOCK_PART_*`) of block `block` of `stack` on a state, giving the next state.
pub type DfDenoiserRunBlockPartFn = unsafe extern "C" fn(
    object: *mut c_void,
    host: *const DfHostApi,
    call: *const DfCallContext,
    state: *const DfValue,
    stack: u32,
    block: u32,
    part: u32,
    patches: *const *const DfPatchDesc,
    n_patches: usize,
    out: *mut *mut DfValue,
) -> i32;

/// Block stepping, step 3: the head, from the last state to the prediction.
pub type DfDenoiserFinishFn = unsafe extern "C" fn(
    object: *mut c_void,
    host: *const DfHostApi,
    call: *const DfCallContext,
    state: *const DfValue,
    patches: *const *const DfPatchDesc,
    n_patches: usize,
    out: *mut *mut DfValue,
) -> i32;

/// The denoiser interface.
#[repr(C)]
pub struct DfDenoiserApi {
    /// `sizeof(DfDenoiserApi)` as the plugin was compiled.
    pub size: u32,
    /// The interface's own version (1).
    pub version: u32,
    /// The self-description, owned by the object.
    pub describe: Option<unsafe extern "C" fn(object: *mut c_void) -> *const DfDenoiserDesc>,
    pub forward: Option<DfDenoiserForwardFn>,
    /// Block stepping (`DF_CAP_BLOCK_STEPPING`), for bridges between separately loaded towers.
    pub prepare: Option<DfDenoiserPrepareFn>,
    pub run_blocks: Option<DfDenoiserRunBlocksFn>,
    pub finish: Option<DfDenoiserFinishFn>,
    /// Block stepping by halves (`DF_CAP_BLOCK_PARTS`, ABI 1.6).
    pub run_block_part: Option<DfDenoiserRunBlockPartFn>,
    pub reserved: [*const c_void; 3],
}

/// A generic forward over named inputs, writing a List of `[name, tensor]` pairs (owned) to
/// `out`: the `Forward` node's contract for every model of every plugin.
pub type DfModelForwardFn = unsafe extern "C" fn(
    object: *mut c_void,
    host: *const DfHostApi,
    inputs: *const DfNamedValue,
    n_inputs: usize,
    out: *mut *mut DfValue,
) -> i32;

/// A text encoder's self-description.
#[repr(C)]
pub struct DfTextEncoderDesc {
    pub size: u32,
    pub _pad: u32,
    /// Width of the hidden states.
    pub width: i64,
    /// Its longest sequence.
    pub max_tokens: i64,
    pub reserved: [*const c_void; 4],
    /// The token that pads a sequence to a fixed length, or -1 when it has none (ABI 1.5; a
    /// smaller `size` means an older plugin, read as -1).
    pub pad_token_id: i64,
}

/// The text-encoder interface.
#[repr(C)]
pub struct DfTextEncoderApi {
    pub size: u32,
    pub version: u32,
    pub describe: Option<unsafe extern "C" fn(object: *mut c_void) -> *const DfTextEncoderDesc>,
    /// Token ids (an owned `[1, n]` i64 tensor) of `len` bytes of UTF-8 text, at most
    /// `max_tokens`.
    pub tokenize: Option<
        unsafe extern "C" fn(
            object: *mut c_void,
            host: *const DfHostApi,
            text: *const c_char,
            len: usize,
            max_tokens: i64,
            out: *mut *mut DfValue,
        ) -> i32,
    >,
    /// `input_ids` (and `attention_mask`) → `last_hidden_state`, and what else the family has.
    pub forward: Option<DfModelForwardFn>,
    pub reserved: [*const c_void; 4],
}

/// An autoencoder's self-description.
#[repr(C)]
pub struct DfAutoencoderDesc {
    pub size: u32,
    pub _pad: u32,
    pub latent_channels: i64,
    /// Image pixels per latent pixel.
    pub downscale: i64,
    pub scaling_factor: f64,
    pub shift_factor: f64,
    pub reserved: [*const c_void; 4],
}

/// The autoencoder interface.
#[repr(C)]
pub struct DfAutoencoderApi {
    pub size: u32,
    pub version: u32,
    pub describe: Option<unsafe extern "C" fn(object: *mut c_void) -> *const DfAutoencoderDesc>,
    /// `image` → `mean`, `logvar`; `latent` (with `tile_size`, `tile_overlap`) → `decoded`.
    pub forward: Option<DfModelForwardFn>,
    pub reserved: [*const c_void; 4],
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

    // --- the model protocol (ABI 1.3) ------------------------------------------------------
    /// Records this thread's error message (copied), for a protocol function or hook that
    /// returns DF_ERROR; `last_error` hands it to the caller.
    pub set_last_error: unsafe extern "C" fn(msg: *const c_char),
    /// A Model value owning `object` that speaks interface `interface` (`DF_INTERFACE_*`) through
    /// the table `api` (static, or living as long as the object). Otherwise as `value_object`.
    pub value_model: unsafe extern "C" fn(
        ctx: *mut DfContext,
        interface: u32,
        api: *const c_void,
        type_tag: *const c_char,
        object: *mut c_void,
        drop: Option<DfObjectDropFn>,
    ) -> *mut DfValue,
    /// The table of interface `interface` of a Model, with its object written to `*object`;
    /// NULL when the value is not a Model speaking it.
    pub model_interface: unsafe extern "C" fn(
        v: *const DfValue,
        interface: u32,
        object: *mut *mut c_void,
    ) -> *const c_void,
    /// A Model's interface (0 for none), number of patches and digest.
    pub model_info: unsafe extern "C" fn(
        v: *const DfValue,
        interface: *mut u32,
        n_patches: *mut usize,
        digest: *mut u64,
    ) -> i32,
    /// A new Model: the base of `v` with its patches plus `patch` (copied; its user data is owned
    /// by the host from here on, even when the call is refused). No weights are copied. NULL with
    /// the message in `last_error` when the combination cannot be correct.
    pub model_patch: unsafe extern "C" fn(
        ctx: *mut DfContext,
        v: *const DfValue,
        patch: *const DfPatchDesc,
    ) -> *mut DfValue,
    /// Runs a denoiser's forward with its patches; writes the prediction (owned) to `out`.
    pub denoiser_forward: unsafe extern "C" fn(
        v: *const DfValue,
        call: *const DfCallContext,
        inputs: *const DfNamedValue,
        n_inputs: usize,
        out: *mut *mut DfValue,
    ) -> i32,
    /// Tells a denoiser's patches about a lifecycle event (`DF_EVENT_*`), in order.
    pub denoiser_lifecycle:
        unsafe extern "C" fn(v: *const DfValue, event: i32, call: *const DfCallContext) -> i32,
    /// The generic forward of any Model with an interface: a List of `[name, tensor]` (owned).
    pub model_forward: unsafe extern "C" fn(
        v: *const DfValue,
        inputs: *const DfNamedValue,
        n_inputs: usize,
        out: *mut *mut DfValue,
    ) -> i32,
    /// A run id no other run of this process has.
    pub new_run_id: unsafe extern "C" fn() -> u64,
    // --- ABI 1.4 ------------------------------------------------------------------------------
    /// Block stepping with the model's patches (`DF_CAP_BLOCK_STEPPING`): the state (owned) from
    /// named inputs, a List whose first item is the hidden state `[B, L, D]`.
    pub denoiser_prepare: unsafe extern "C" fn(
        v: *const DfValue,
        call: *const DfCallContext,
        inputs: *const DfNamedValue,
        n_inputs: usize,
        state: *mut *mut DfValue,
    ) -> i32,
    /// Blocks `from..=to` of `stack` on a state, giving the next state (owned).
    pub denoiser_run_blocks: unsafe extern "C" fn(
        v: *const DfValue,
        call: *const DfCallContext,
        state: *const DfValue,
        stack: u32,
        from: u32,
        to: u32,
        out: *mut *mut DfValue,
    ) -> i32,
    /// The head: from the last state to the prediction (owned).
    pub denoiser_finish: unsafe extern "C" fn(
        v: *const DfValue,
        call: *const DfCallContext,
        state: *const DfValue,
        out: *mut *mut DfValue,
    ) -> i32,
    /// Bytes a Model's patches hold beyond its base: their linear deltas, and what their
    /// `memory_estimate` hooks report. 0 for a value that is not a Model.
    pub model_patch_memory: unsafe extern "C" fn(v: *const DfValue) -> u64,
    // --- ABI 1.6 ------------------------------------------------------------------------------
    /// Half `part` (`DF_BLOCK_PART_*`) of block `block` of `stack` on a state, with the model's
    /// patches (`DF_CAP_BLOCK_PARTS`), giving the next state (owned).
    pub denoiser_run_block_part: unsafe extern "C" fn(
        v: *const DfValue,
        call: *const DfCallContext,
        state: *const DfValue,
        stack: u32,
        block: u32,
        part: u32,
        out: *mut *mut DfValue,
    ) -> i32,
    // --- ABI 1.7 ------------------------------------------------------------------------------
    /// Reports a preview of the node's work at `step` of `total`: `len` bytes of a PNG image
    /// (copied). Subscribers receive it as a `node_preview` event.
    pub preview:
        unsafe extern "C" fn(ctx: *mut DfContext, step: u64, total: u64, png: *const u8, len: u64),

    pub reserved: [*const c_void; 11],
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
