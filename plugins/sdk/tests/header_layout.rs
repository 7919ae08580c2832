//! Checks `include/ditflow_plugin.h` against `src/abi.rs`.
//!
//! The test writes a C program that includes the header and prints, one `name value` pair a line,
//! the size and alignment of every ABI struct, the offset and size of every field and typedef, and
//! the value (and signedness) of every constant. It compiles the program with the system C
//! compiler (`CC`, else `cc`) under `-std=c99 -Wall -Wextra -pedantic -Werror`, runs it, and
//! compares every line with the same quantities computed here from `ditflow_plugin::abi`. The
//! program also holds one never-run function per field and typedef that assigns the header's
//! object to a pointer of the type abi.rs gives, so a wrong signedness, constness or function
//! signature fails the compilation. Both sides come from the single list in `abi_items!`, so a
//! field added to `abi.rs` but not to the list is the only thing that can slip through: keep the
//! list complete (the struct sizes catch most omissions anyway).
//!
//! It also checks that the header parses as C++ (`CXX`, else `c++`, when available) and that the
//! C example and test plugins build warning-free against it.
//!
//! A C compiler is required: without one the tests fail rather than pass vacuously.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::ErrorKind;
use std::mem::{align_of, offset_of, size_of, size_of_val};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every struct with every field, every function-pointer typedef, and every constant of the ABI:
/// the one list both the C program and the Rust expectations are generated from.
///
/// Each field is written `name: Type` in Rust syntax. The Rust side proves at compile time that
/// `Type` is exactly the field's type in `abi.rs` (so the list cannot drift from it), and the C
/// side translates `Type` into a C declarator and checks, with `-Werror`, that the header's field
/// has a compatible type: this catches wrong signedness, constness, and function signatures,
/// which sizes and offsets alone would miss. `rust_name => c_name` marks a field the header must
/// spell differently (`register` is a keyword in C).
macro_rules! abi_items {
    ($callback:ident) => {
        $callback! {
            structs {
                DfPortDesc {
                    name: *const c_char,
                    type_expr: *const c_char,
                    doc: *const c_char,
                    default_json: *const c_char,
                    min: f64,
                    max: f64,
                    choices: *const c_char,
                    flags: u32,
                    _pad: u32,
                    reserved: [*const c_void; 2],
                }
                DfNodeDesc {
                    size: u32,
                    flags: u32,
                    type_name: *const c_char,
                    category: *const c_char,
                    version: *const c_char,
                    doc: *const c_char,
                    inputs: *const DfPortDesc,
                    n_inputs: usize,
                    outputs: *const DfPortDesc,
                    n_outputs: usize,
                    user_data: *mut c_void,
                    execute: Option<DfExecuteFn>,
                    fingerprint: Option<DfFingerprintFn>,
                    drop_user_data: Option<DfDropFn>,
                    reserved: [*const c_void; 4],
                }
                DfHostApi {
                    abi_major: u32,
                    abi_minor: u32,
                    size: u64,
                    register_node: unsafe extern "C" fn(*mut DfRegistrar, *const DfNodeDesc) -> i32,
                    input: unsafe extern "C" fn(*mut DfContext, *const c_char) -> *const DfValue,
                    set_output:
                        unsafe extern "C" fn(*mut DfContext, *const c_char, *mut DfValue) -> i32,
                    set_error: unsafe extern "C" fn(*mut DfContext, *const c_char),
                    progress: unsafe extern "C" fn(*mut DfContext, u64, u64),
                    is_cancelled: unsafe extern "C" fn(*mut DfContext) -> i32,
                    log: unsafe extern "C" fn(*mut DfContext, i32, *const c_char),
                    resolve_input_path:
                        unsafe extern "C" fn(*mut DfContext, *const c_char) -> *mut DfValue,
                    resolve_output_path:
                        unsafe extern "C" fn(*mut DfContext, *const c_char) -> *mut DfValue,
                    value_bool: unsafe extern "C" fn(i32) -> *mut DfValue,
                    value_int: unsafe extern "C" fn(i64) -> *mut DfValue,
                    value_float: unsafe extern "C" fn(f64) -> *mut DfValue,
                    value_string: unsafe extern "C" fn(*const c_char, usize) -> *mut DfValue,
                    value_list: unsafe extern "C" fn(*const *mut DfValue, usize) -> *mut DfValue,
                    value_tensor: unsafe extern "C" fn(
                        i32, i32, *const i64, usize, *const c_void, usize,
                    ) -> *mut DfValue,
                    value_object: unsafe extern "C" fn(
                        *mut DfContext, *const c_char, *mut c_void, Option<DfObjectDropFn>,
                    ) -> *mut DfValue,
                    value_retain: unsafe extern "C" fn(*const DfValue),
                    value_release: unsafe extern "C" fn(*mut DfValue),
                    value_kind: unsafe extern "C" fn(*const DfValue) -> i32,
                    value_get_bool: unsafe extern "C" fn(*const DfValue, *mut i32) -> i32,
                    value_get_int: unsafe extern "C" fn(*const DfValue, *mut i64) -> i32,
                    value_get_float: unsafe extern "C" fn(*const DfValue, *mut f64) -> i32,
                    value_get_string: unsafe extern "C" fn(
                        *const DfValue, *mut *const c_char, *mut usize,
                    ) -> i32,
                    value_list_len: unsafe extern "C" fn(*const DfValue) -> usize,
                    value_list_get: unsafe extern "C" fn(*const DfValue, usize) -> *const DfValue,
                    value_tensor_info: unsafe extern "C" fn(
                        *const DfValue, *mut i32, *mut *const i64, *mut usize,
                    ) -> i32,
                    value_tensor_data:
                        unsafe extern "C" fn(*const DfValue, *mut usize) -> *const c_void,
                    value_object_get:
                        unsafe extern "C" fn(*const DfValue, *const c_char) -> *mut c_void,
                    tensor_randn:
                        unsafe extern "C" fn(i32, i32, *const i64, usize, u64) -> *mut DfValue,
                    run_device: unsafe extern "C" fn(*mut DfContext) -> i32,
                    value_tensor_device: unsafe extern "C" fn(*const DfValue) -> i32,
                    value_tensor_data_mut:
                        unsafe extern "C" fn(*mut DfValue, *mut usize) -> *mut c_void,
                    tensor_op: unsafe extern "C" fn(
                        *const c_char, *const *const DfValue, usize, *const DfOpAttr, usize, i32,
                        *mut *mut DfValue, usize, *mut usize,
                    ) -> i32,
                    last_error: unsafe extern "C" fn() -> *const c_char,
                    load_weights:
                        unsafe extern "C" fn(*mut DfContext, *const c_char, i32) -> *mut DfValue,
                    set_last_error: unsafe extern "C" fn(*const c_char),
                    value_model: unsafe extern "C" fn(
                        *mut DfContext, u32, *const c_void, *const c_char, *mut c_void,
                        Option<DfObjectDropFn>,
                    ) -> *mut DfValue,
                    model_interface:
                        unsafe extern "C" fn(*const DfValue, u32, *mut *mut c_void) -> *const c_void,
                    model_info: unsafe extern "C" fn(
                        *const DfValue, *mut u32, *mut usize, *mut u64,
                    ) -> i32,
                    model_patch: unsafe extern "C" fn(
                        *mut DfContext, *const DfValue, *const DfPatchDesc,
                    ) -> *mut DfValue,
                    denoiser_forward: unsafe extern "C" fn(
                        *const DfValue, *const DfCallContext, *const DfNamedValue, usize,
                        *mut *mut DfValue,
                    ) -> i32,
                    denoiser_lifecycle:
                        unsafe extern "C" fn(*const DfValue, i32, *const DfCallContext) -> i32,
                    model_forward: unsafe extern "C" fn(
                        *const DfValue, *const DfNamedValue, usize, *mut *mut DfValue,
                    ) -> i32,
                    new_run_id: unsafe extern "C" fn() -> u64,
                    denoiser_prepare: unsafe extern "C" fn(
                        *const DfValue, *const DfCallContext, *const DfNamedValue, usize,
                        *mut *mut DfValue,
                    ) -> i32,
                    denoiser_run_blocks: unsafe extern "C" fn(
                        *const DfValue, *const DfCallContext, *const DfValue, u32, u32, u32,
                        *mut *mut DfValue,
                    ) -> i32,
                    denoiser_finish: unsafe extern "C" fn(
                        *const DfValue, *const DfCallContext, *const DfValue, *mut *mut DfValue,
                    ) -> i32,
                    model_patch_memory: unsafe extern "C" fn(*const DfValue) -> u64,
                    denoiser_run_block_part: unsafe extern "C" fn(
                        *const DfValue, *const DfCallContext, *const DfValue, u32, u32, u32,
                        *mut *mut DfValue,
                    ) -> i32,
                    preview: unsafe extern "C" fn(*mut DfContext, u64, u64, *const u8, u64),
                    reserved: [*const c_void; 11],
                }
                DfNamedValue {
                    name: *const c_char,
                    value: *const DfValue,
                }
                DfCallContext {
                    size: u32,
                    step_index: u32,
                    num_steps: u32,
                    _pad: u32,
                    run_id: u64,
                    sigma: f64,
                    timestep: f64,
                    batch: usize,
                    branches: *const i32,
                    cond_ids: *const i64,
                    reserved: [*const c_void; 4],
                }
                DfStreamDesc {
                    name: *const c_char,
                    width: i64,
                }
                DfStackDesc {
                    name: *const c_char,
                    streams: *const c_char,
                    n_blocks: u32,
                    sites: u32,
                }
                DfLinearDesc {
                    name: *const c_char,
                    out_features: i64,
                    in_features: i64,
                    fused_into: *const c_char,
                    row_offset: i64,
                }
                DfDenoiserDesc {
                    size: u32,
                    prediction: i32,
                    latent_layout: *const c_char,
                    latent_channels: i64,
                    patch_size: i64,
                    streams: *const DfStreamDesc,
                    n_streams: usize,
                    stacks: *const DfStackDesc,
                    n_stacks: usize,
                    linears: *const DfLinearDesc,
                    n_linears: usize,
                    capabilities: u64,
                    conditioning: *const c_char,
                    reserved: [*const c_void; 4],
                }
                DfLinearDelta {
                    target: *const c_char,
                    down: *const DfValue,
                    up: *const DfValue,
                    scale: f64,
                }
                DfContinuation {
                    state: *mut c_void,
                    run: Option<DfContinuationFn>,
                }
                DfAttentionMask {
                    size: u32,
                    kind: i32,
                    n_segments: u32,
                    _pad: u32,
                    key_lengths: *mut DfValue,
                    q_segments: *mut DfValue,
                    k_segments: *mut DfValue,
                    allow: *mut DfValue,
                    dense: *mut DfValue,
                }
                DfSite {
                    stack: u32,
                    block: u32,
                    site: u32,
                    attention: u32,
                }
                DfPatchDesc {
                    size: u32,
                    flags: u32,
                    name: *const c_char,
                    plugin: *const c_char,
                    order: i32,
                    branches: u32,
                    strength: f64,
                    start: f64,
                    end: f64,
                    stack: i32,
                    first: i32,
                    last: i32,
                    _pad: u32,
                    digest: u64,
                    required_capabilities: u64,
                    user_data: *mut c_void,
                    drop_user_data: Option<DfDropFn>,
                    linear_deltas: *const DfLinearDelta,
                    n_linear_deltas: usize,
                    block_residual: Option<DfBlockResidualFn>,
                    range_override: Option<DfRangeOverrideFn>,
                    attention_edit: Option<DfAttentionEditFn>,
                    attention_mask: Option<DfAttentionMaskFn>,
                    attention_extra: Option<DfAttentionExtraFn>,
                    bridge: Option<DfBridgeFn>,
                    lifecycle: Option<DfLifecycleFn>,
                    memory_estimate: Option<DfMemoryEstimateFn>,
                    call_inputs: Option<DfCallInputsFn>,
                    reserved: [*const c_void; 7],
                }
                DfDenoiserApi {
                    size: u32,
                    version: u32,
                    describe: Option<unsafe extern "C" fn(*mut c_void) -> *const DfDenoiserDesc>,
                    forward: Option<DfDenoiserForwardFn>,
                    prepare: Option<DfDenoiserPrepareFn>,
                    run_blocks: Option<DfDenoiserRunBlocksFn>,
                    finish: Option<DfDenoiserFinishFn>,
                    run_block_part: Option<DfDenoiserRunBlockPartFn>,
                    reserved: [*const c_void; 3],
                }
                DfTextEncoderDesc {
                    size: u32,
                    _pad: u32,
                    width: i64,
                    max_tokens: i64,
                    reserved: [*const c_void; 4],
                    pad_token_id: i64,
                }
                DfTextEncoderApi {
                    size: u32,
                    version: u32,
                    describe:
                        Option<unsafe extern "C" fn(*mut c_void) -> *const DfTextEncoderDesc>,
                    tokenize: Option<unsafe extern "C" fn(
                        *mut c_void, *const DfHostApi, *const c_char, usize, i64,
                        *mut *mut DfValue,
                    ) -> i32>,
                    forward: Option<DfModelForwardFn>,
                    reserved: [*const c_void; 4],
                }
                DfAutoencoderDesc {
                    size: u32,
                    _pad: u32,
                    latent_channels: i64,
                    downscale: i64,
                    scaling_factor: f64,
                    shift_factor: f64,
                    reserved: [*const c_void; 4],
                }
                DfAutoencoderApi {
                    size: u32,
                    version: u32,
                    describe:
                        Option<unsafe extern "C" fn(*mut c_void) -> *const DfAutoencoderDesc>,
                    forward: Option<DfModelForwardFn>,
                    reserved: [*const c_void; 4],
                }
                DfOpAttr {
                    name: *const c_char,
                    kind: i32,
                    _pad: u32,
                    i: i64,
                    f: f64,
                    ints: *const i64,
                    n_ints: usize,
                    s: *const c_char,
                }
                DfPluginDescriptor {
                    magic: u32,
                    abi_major: u32,
                    abi_minor: u32,
                    size: u32,
                    name: *const c_char,
                    version: *const c_char,
                    register_plugin:
                        Option<unsafe extern "C" fn(*const DfHostApi, *mut DfRegistrar) -> i32>,
                    flags: usize,
                    reserved: [*const c_void; 7],
                }
            }
            typedefs {
                DfExecuteFn:
                    unsafe extern "C" fn(*mut c_void, *const DfHostApi, *mut DfContext) -> i32,
                DfFingerprintFn: unsafe extern "C" fn(
                    *mut c_void, *const DfHostApi, *mut DfContext, *mut u64,
                ) -> i32,
                DfDropFn: unsafe extern "C" fn(*mut c_void),
                DfObjectDropFn: unsafe extern "C" fn(*mut c_void),
                DfContinuationFn: unsafe extern "C" fn(
                    *mut c_void, *const DfValue, u32, u32, *mut *mut DfValue,
                ) -> i32,
                DfBlockResidualFn: unsafe extern "C" fn(
                    *mut c_void, *const DfHostApi, *const DfCallContext, u32, u32,
                    *const DfValue, *mut *mut DfValue, *mut i64,
                ) -> i32,
                DfRangeOverrideFn: unsafe extern "C" fn(
                    *mut c_void, *const DfHostApi, *const DfCallContext, u32, u32, u32,
                    *const DfValue, *const DfContinuation, *mut *mut DfValue,
                ) -> i32,
                DfAttentionEditFn: unsafe extern "C" fn(
                    *mut c_void, *const DfHostApi, *const DfCallContext, *const DfSite, i32,
                    *mut *mut DfValue, *mut *mut DfValue, *mut *mut DfValue,
                ) -> i32,
                DfAttentionMaskFn: unsafe extern "C" fn(
                    *mut c_void, *const DfHostApi, *const DfCallContext, *const DfSite, i32,
                    *mut DfAttentionMask,
                ) -> i32,
                DfAttentionExtraFn: unsafe extern "C" fn(
                    *mut c_void, *const DfHostApi, *const DfCallContext, *const DfSite,
                    *const DfValue, *mut *mut DfValue,
                ) -> i32,
                DfBridgeFn: unsafe extern "C" fn(
                    *mut c_void, *const DfHostApi, *const DfCallContext, *const DfSite,
                    *const DfSite, *const DfValue, *const DfValue, *mut *mut DfValue,
                    *mut *mut DfValue,
                ) -> i32,
                DfLifecycleFn: unsafe extern "C" fn(
                    *mut c_void, *const DfHostApi, i32, *const DfCallContext,
                ) -> i32,
                DfMemoryEstimateFn:
                    unsafe extern "C" fn(*mut c_void, *const DfDenoiserDesc) -> u64,
                DfCallInputsFn: unsafe extern "C" fn(
                    *mut c_void, *const DfHostApi, *const DfCallContext, *const DfNamedValue,
                    usize,
                ) -> i32,
                DfDenoiserForwardFn: unsafe extern "C" fn(
                    *mut c_void, *const DfHostApi, *const DfCallContext, *const DfNamedValue,
                    usize, *const *const DfPatchDesc, usize, *mut *mut DfValue,
                ) -> i32,
                DfDenoiserPrepareFn: unsafe extern "C" fn(
                    *mut c_void, *const DfHostApi, *const DfCallContext, *const DfNamedValue,
                    usize, *const *const DfPatchDesc, usize, *mut *mut DfValue,
                ) -> i32,
                DfDenoiserRunBlocksFn: unsafe extern "C" fn(
                    *mut c_void, *const DfHostApi, *const DfCallContext, *const DfValue, u32,
                    u32, u32, *const *const DfPatchDesc, usize, *mut *mut DfValue,
                ) -> i32,
                DfDenoiserRunBlockPartFn: unsafe extern "C" fn(
                    *mut c_void, *const DfHostApi, *const DfCallContext, *const DfValue, u32,
                    u32, u32, *const *const DfPatchDesc, usize, *mut *mut DfValue,
                ) -> i32,
                DfDenoiserFinishFn: unsafe extern "C" fn(
                    *mut c_void, *const DfHostApi, *const DfCallContext, *const DfValue,
                    *const *const DfPatchDesc, usize, *mut *mut DfValue,
                ) -> i32,
                DfModelForwardFn: unsafe extern "C" fn(
                    *mut c_void, *const DfHostApi, *const DfNamedValue, usize,
                    *mut *mut DfValue,
                ) -> i32,
            }
            integers {
                DF_ABI_MAJOR, DF_ABI_MINOR, DF_PLUGIN_MAGIC, DF_PLUGIN_UNLOADABLE,
                DF_OK, DF_ERROR, DF_NO_FINGERPRINT,
                DF_NODE_DETERMINISTIC, DF_NODE_CACHEABLE, DF_NODE_SIDE_EFFECTS,
                DF_PORT_OPTIONAL,
                DF_KIND_BOOL, DF_KIND_INT, DF_KIND_FLOAT, DF_KIND_STRING, DF_KIND_TENSOR,
                DF_KIND_LATENT, DF_KIND_CONDITIONING, DF_KIND_IMAGE, DF_KIND_AUDIO,
                DF_KIND_VIDEO, DF_KIND_MODEL, DF_KIND_LIST,
                DF_DTYPE_F32, DF_DTYPE_F16, DF_DTYPE_BF16, DF_DTYPE_I64, DF_DTYPE_I32,
                DF_DTYPE_U8, DF_DTYPE_Q8_0, DF_DTYPE_Q4_0, DF_DTYPE_Q4_1, DF_DTYPE_Q5_0,
                DF_DTYPE_Q5_1, DF_DTYPE_Q4_K, DF_DTYPE_Q5_K, DF_DTYPE_Q6_K,
                DF_LOG_ERROR, DF_LOG_WARN, DF_LOG_INFO, DF_LOG_DEBUG,
                DF_DEVICE_CPU, DF_DEVICE_CUDA0,
                DF_ATTR_INT, DF_ATTR_FLOAT, DF_ATTR_INTS, DF_ATTR_STRING,
                DF_INTERFACE_DENOISER, DF_INTERFACE_TEXT_ENCODER, DF_INTERFACE_AUTOENCODER,
                DF_PREDICTION_EPSILON, DF_PREDICTION_V, DF_PREDICTION_FLOW,
                DF_BRANCH_COND, DF_BRANCH_UNCOND, DF_BRANCH_SKIP_LAYERS,
                DF_SITE_ATTN_IN, DF_SITE_PRE_ATTN, DF_SITE_ATTN, DF_SITE_POST_SELF_ATTN,
                DF_SITE_POST_CROSS_ATTN, DF_SITE_POST_BLOCK,
                DF_CAP_LINEAR_DELTA, DF_CAP_LINEAR_MERGE, DF_CAP_BLOCK_RESIDUAL,
                DF_CAP_RANGE_OVERRIDE, DF_CAP_ATTENTION_EDIT, DF_CAP_ATTENTION_MASK,
                DF_CAP_ATTENTION_EXTRA, DF_CAP_BLOCK_STEPPING, DF_CAP_BLOCK_PARTS,
                DF_BLOCK_PART_TO_CROSS, DF_BLOCK_PART_FROM_CROSS,
                DF_PATCH_SKIPS_BLOCKS, DF_PATCH_NEEDS_FRESH, DF_PATCH_MERGE,
                DF_EVENT_RUN_BEGIN, DF_EVENT_STEP_BEGIN, DF_EVENT_STEP_END, DF_EVENT_RUN_END,
                DF_MASK_NONE, DF_MASK_KEY_LENGTHS, DF_MASK_SEGMENT_IDS, DF_MASK_DENSE,
                DF_ATTENTION_SELF, DF_ATTENTION_CROSS, DF_ATTENTION_JOINT,
            }
            strings {
                DF_PLUGIN_SYMBOL,
            }
        }
    };
}

/// One line the C program prints: `key` and the C expression giving its value, with the value
/// the Rust side expects.
struct Item {
    key: String,
    /// `printf` format of the value (`%llu`, `%lld` or `%s`).
    format: &'static str,
    /// The C expression, already cast to match `format`.
    c_expr: String,
    expected: String,
}

impl Item {
    fn unsigned(key: String, c_expr: String, expected: usize) -> Item {
        Item {
            key,
            format: "%llu",
            c_expr: format!("(unsigned long long)({c_expr})"),
            expected: expected.to_string(),
        }
    }
}

/// A compile-time type check for the C program: `decl` declares `p` as a pointer to the expected
/// type and `init` is the address of the header's object, so a mismatch is a warning (an error
/// under `-Werror`) naming `what`.
struct TypeCheck {
    what: String,
    /// The C parameter list of the check function, e.g. `DfPortDesc* s`.
    param: String,
    decl: String,
    init: String,
}

/// Everything `abi_items!` lists, in the two forms the test needs.
struct Abi {
    items: Vec<Item>,
    checks: Vec<TypeCheck>,
    structs: Vec<&'static str>,
}

/// The C spelling of a field: the Rust name unless `=> c_name` says otherwise.
macro_rules! c_field {
    ($rust:ident) => {
        stringify!($rust)
    };
    ($rust:ident => $c:ident) => {
        stringify!($c)
    };
}

/// Expands `abi_items!` into an `Abi`.
macro_rules! build_abi {
    (
        structs { $( $s:ident { $( $f:ident $(=> $cf:ident)? : $t:ty ),* $(,)? } )* }
        typedefs { $( $td:ident : $tdt:ty ),* $(,)? }
        integers { $( $int:ident ),* $(,)? }
        strings { $( $string:ident ),* $(,)? }
    ) => {{
        #[allow(unused_imports)]
        use ditflow_plugin::abi::*;
        #[allow(unused_imports)]
        use std::ffi::{c_char, c_void};

        let mut abi = Abi { items: Vec::new(), checks: Vec::new(), structs: Vec::new() };
        $(
            let s = stringify!($s);
            abi.structs.push(s);
            abi.items.push(Item::unsigned(
                format!("sizeof({s})"),
                format!("sizeof({s})"),
                size_of::<$s>(),
            ));
            abi.items.push(Item::unsigned(
                format!("alignof({s})"),
                format!("offsetof(struct df_align_{s}, value)"),
                align_of::<$s>(),
            ));
            $(
                // Compiles only if `$t` is exactly the field's type in abi.rs.
                let _: fn(&$s) -> &$t = |v| &v.$f;
                let f = stringify!($f);
                let cf = c_field!($f $(=> $cf)?);
                abi.items.push(Item::unsigned(
                    format!("offsetof({s}.{f})"),
                    format!("offsetof({s}, {cf})"),
                    offset_of!($s, $f),
                ));
                abi.items.push(Item::unsigned(
                    format!("sizeof({s}.{f})"),
                    format!("sizeof((({s}*)0)->{cf})"),
                    size_of::<$t>(),
                ));
                abi.checks.push(TypeCheck {
                    what: format!("{s}.{f}"),
                    param: format!("{s}* s"),
                    decl: c_decl(stringify!($t), "*p"),
                    init: format!("&s->{cf}"),
                });
            )*
        )*
        $(
            // Compiles only if `$tdt` is exactly the typedef in abi.rs.
            let _: fn(&$td) -> &$tdt = |v| v;
            let td = stringify!($td);
            abi.items.push(Item::unsigned(
                format!("sizeof({td})"),
                format!("sizeof({td})"),
                size_of::<$tdt>(),
            ));
            abi.checks.push(TypeCheck {
                what: td.to_string(),
                param: format!("{td} t"),
                decl: c_decl(stringify!($tdt), "*p"),
                init: "&t".to_string(),
            });
        )*
        $(
            let name = stringify!($int);
            abi.items.push(Item {
                key: name.to_string(),
                format: "%lld",
                c_expr: format!("(long long)({name})"),
                expected: ($int as i64).to_string(),
            });
            // `1` if the macro's C type is signed (`1` versus `1u`), as the Rust type is.
            abi.items.push(Item {
                key: format!("signed({name})"),
                format: "%lld",
                // Compared in the macro's own type, so a 64-bit unsigned constant is not
                // mistaken for a signed one by a cast.
                c_expr: format!("(long long)(((({name}) * 0 - 1) > 0) ? 0 : 1)"),
                expected: ($int.is_signed() as i64).to_string(),
            });
            abi.items.push(Item::unsigned(
                format!("sizeof({name})"),
                format!("sizeof({name})"),
                size_of_val(&$int),
            ));
        )*
        $(
            let name = stringify!($string);
            abi.items.push(Item {
                key: name.to_string(),
                format: "%s",
                c_expr: name.to_string(),
                expected: $string.to_string(),
            });
        )*
        abi
    }};
}

/// Signedness of the Rust type of a constant.
trait IntType {
    fn is_signed(&self) -> bool;
}
macro_rules! int_type {
    ($($t:ty: $signed:expr),*) => {
        $(impl IntType for $t {
            fn is_signed(&self) -> bool {
                $signed
            }
        })*
    };
}
int_type!(u32: false, u64: false, usize: false, i32: true, i64: true, isize: true);

fn abi() -> Abi {
    abi_items!(build_abi)
}

// --- Rust types to C declarators ------------------------------------------------------------

/// The subset of Rust type syntax used by abi.rs.
#[derive(Debug)]
enum Ty {
    /// A primitive or a named ABI type.
    Named(String),
    /// `*const T` (true) or `*mut T` (false).
    Ptr(bool, Box<Ty>),
    Array(Box<Ty>, String),
    /// `extern "C" fn(args) -> ret`; `Option<fn>` is the same (nullable) pointer.
    Fn(Vec<Ty>, Option<Box<Ty>>),
}

fn tokenize(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_whitespace() {
            continue;
        }
        if c.is_alphanumeric() || c == '_' {
            let mut word = c.to_string();
            while let Some(&n) = chars.peek().filter(|n| n.is_alphanumeric() || **n == '_') {
                word.push(n);
                chars.next();
            }
            tokens.push(word);
        } else if c == '"' {
            let mut lit = c.to_string();
            for n in chars.by_ref() {
                lit.push(n);
                if n == '"' {
                    break;
                }
            }
            tokens.push(lit);
        } else if c == '-' && chars.peek() == Some(&'>') {
            chars.next();
            tokens.push("->".to_string());
        } else {
            tokens.push(c.to_string());
        }
    }
    tokens
}

struct Parser {
    tokens: Vec<String>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> &str {
        self.tokens.get(self.pos).map(String::as_str).unwrap_or("")
    }
    fn next(&mut self) -> String {
        let t = self.peek().to_string();
        self.pos += 1;
        t
    }
    fn expect(&mut self, want: &str) {
        let got = self.next();
        assert_eq!(
            got,
            want,
            "unexpected token in type {:?}",
            self.tokens.join(" ")
        );
    }
    fn ty(&mut self) -> Ty {
        match self.next().as_str() {
            "*" => {
                let constness = self.next();
                Ty::Ptr(constness == "const", Box::new(self.ty()))
            }
            "[" => {
                let elem = self.ty();
                self.expect(";");
                let n = self.next();
                self.expect("]");
                Ty::Array(Box::new(elem), n)
            }
            "Option" => {
                self.expect("<");
                let inner = self.ty();
                self.expect(">");
                inner
            }
            "unsafe" => self.ty(),
            "extern" => {
                if self.peek().starts_with('"') {
                    self.next();
                }
                self.ty()
            }
            "fn" => {
                self.expect("(");
                let mut args = Vec::new();
                while self.peek() != ")" {
                    args.push(self.ty());
                    if self.peek() == "," {
                        self.next();
                    }
                }
                self.expect(")");
                let ret = if self.peek() == "->" {
                    self.next();
                    Some(Box::new(self.ty()))
                } else {
                    None
                };
                Ty::Fn(args, ret)
            }
            name => {
                // Keep the last segment of a path such as `std::ffi::c_char`.
                let mut name = name.to_string();
                while self.peek() == ":" {
                    self.next();
                    self.expect(":");
                    name = self.next();
                }
                Ty::Named(name)
            }
        }
    }
}

/// Declares `inner` (a declarator such as `*p`) with the C equivalent of `ty`; `constant`
/// qualifies the outermost type.
fn declare(ty: &Ty, inner: &str, constant: bool) -> String {
    let qualifier = if constant { "const " } else { "" };
    match ty {
        Ty::Named(name) => {
            let c = match name.as_str() {
                "u8" => "uint8_t",
                "u32" => "uint32_t",
                "i32" => "int32_t",
                "u64" => "uint64_t",
                "i64" => "int64_t",
                "f32" => "float",
                "f64" => "double",
                "usize" => "size_t",
                "c_char" => "char",
                "c_void" => "void",
                other => other,
            };
            format!("{qualifier}{c} {inner}").trim_end().to_string()
        }
        Ty::Ptr(pointee_const, pointee) => {
            let qualifier = if constant { " const " } else { "" };
            declare(pointee, &format!("*{qualifier}{inner}"), *pointee_const)
        }
        Ty::Array(elem, n) => {
            let inner = if inner.starts_with('*') {
                format!("({inner})")
            } else {
                inner.to_string()
            };
            declare(elem, &format!("{inner}[{n}]"), constant)
        }
        Ty::Fn(args, ret) => {
            let args: Vec<String> = args.iter().map(|a| declare(a, "", false)).collect();
            let args = if args.is_empty() {
                "void".to_string()
            } else {
                args.join(", ")
            };
            let inner = format!("(*{inner})({args})");
            match ret {
                Some(ret) => declare(ret, &inner, false),
                None => format!("void {inner}"),
            }
        }
    }
}

/// The C declaration of `inner` with the C type matching the Rust type text `rust`.
fn c_decl(rust: &str, inner: &str) -> String {
    let mut parser = Parser {
        tokens: tokenize(rust),
        pos: 0,
    };
    let ty = parser.ty();
    assert_eq!(
        parser.pos,
        parser.tokens.len(),
        "trailing tokens in type {rust:?}"
    );
    declare(&ty, inner, false)
}

// --- the C program ----------------------------------------------------------------------------

fn c_program(abi: &Abi) -> String {
    let mut c = String::new();
    c.push_str("/* Generated by plugins/sdk/tests/header_layout.rs. */\n");
    c.push_str("#include <stddef.h>\n#include <stdio.h>\n#include \"ditflow_plugin.h\"\n\n");
    // C99 has no alignof: the offset of a member placed after a `char` is the alignment.
    for s in &abi.structs {
        c.push_str(&format!(
            "struct df_align_{s} {{ char pad; {s} value; }};\n"
        ));
    }
    // Type checks: never run, only compiled (an incompatible type is an error under -Werror).
    c.push('\n');
    for check in &abi.checks {
        let f = format!("df_check_type_of_{}", check.what.replace('.', "_"));
        c.push_str(&format!(
            "void {f}({param});\nvoid {f}({param}) {{\n    {} = {};\n    (void)p;\n}}\n",
            check.decl,
            check.init,
            param = check.param
        ));
    }
    // The convenience macro must compile warning-free too.
    c.push_str(
        "\nstatic int32_t register_nothing(const DfHostApi* host, DfRegistrar* reg) {\n    \
         (void)host;\n    (void)reg;\n    return DF_OK;\n}\n\
         DF_DEFINE_PLUGIN(\"layout-test\", \"0.0.0\", register_nothing);\n\n",
    );
    c.push_str("int main(void) {\n");
    c.push_str("    if (ditflow_plugin_descriptor.size != sizeof(DfPluginDescriptor)) return 2;\n");
    for item in &abi.items {
        c.push_str(&format!(
            "    printf(\"%s {}\\n\", \"{}\", {});\n",
            item.format, item.key, item.c_expr
        ));
    }
    c.push_str("    return 0;\n}\n");
    c
}

fn include_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("include")
}

/// A fresh scratch folder for one test of this process.
fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ditflow-header-layout-{}-{test}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// A compiler command from the environment variable `var` (which may hold extra arguments, as in
/// `CC="ccache gcc"`), else `default`.
fn compiler(var: &str, default: &str) -> Command {
    let value = std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| OsString::from(default));
    let text = value.to_string_lossy().into_owned();
    let mut words = text.split_whitespace();
    let mut cmd = Command::new(words.next().unwrap_or(default));
    cmd.args(words);
    cmd
}

/// Runs a compiler: `Ok(None)` when it is not installed, `Err` with its output when it fails.
fn run_compiler(mut cmd: Command) -> Result<Option<()>, String> {
    let shown = format!("{cmd:?}");
    match cmd.output() {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot run {shown}: {e}")),
        Ok(out) if out.status.success() => Ok(Some(())),
        Ok(out) => Err(format!(
            "{shown} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// Runs the C compiler, failing the test when it is missing or reports anything; `hint` explains
/// a failure.
fn run_cc(cmd: Command, hint: &str) {
    let shown = format!("{cmd:?}");
    match run_compiler(cmd) {
        Ok(Some(())) => {}
        Ok(None) => panic!(
            "no C compiler found (ran {shown}): these tests compile include/ditflow_plugin.h and \
             need one; install cc/gcc/clang or set CC"
        ),
        Err(message) => panic!("{hint}\n{message}"),
    }
}

/// Flags for C: strict C99, every warning an error.
const C_FLAGS: &[&str] = &["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror"];

#[test]
fn header_matches_abi_rs() {
    let abi = abi();
    let items = &abi.items;
    let dir = scratch_dir("layout");
    let source = dir.join("layout.c");
    let exe = dir.join(format!("layout{}", std::env::consts::EXE_SUFFIX));
    std::fs::write(&source, c_program(&abi)).unwrap();

    let mut cc = compiler("CC", "cc");
    cc.args(C_FLAGS)
        .arg("-I")
        .arg(include_dir())
        .arg("-o")
        .arg(&exe)
        .arg(&source);
    run_cc(
        cc,
        "the layout program does not compile against include/ditflow_plugin.h (an error in \
         `df_check_type_of_X` means the header's type for X differs from src/abi.rs):",
    );

    let out = Command::new(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    assert!(
        out.status.success(),
        "{} failed ({}): {}",
        exe.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("the C program printed non-UTF-8");

    let mut actual: BTreeMap<&str, &str> = BTreeMap::new();
    for line in stdout.lines() {
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        assert!(
            actual.insert(key, value).is_none(),
            "the C program printed {key} twice"
        );
    }

    let mut mismatches = Vec::new();
    for item in items {
        match actual.remove(item.key.as_str()) {
            Some(c) if c == item.expected => {}
            Some(c) => mismatches.push(format!(
                "  {}: abi.rs {} != header {}",
                item.key, item.expected, c
            )),
            None => mismatches.push(format!(
                "  {}: abi.rs {}, not printed by the C program",
                item.key, item.expected
            )),
        }
    }
    for (key, value) in actual {
        mismatches.push(format!(
            "  {key}: printed by the C program ({value}) but not expected"
        ));
    }
    assert!(
        mismatches.is_empty(),
        "include/ditflow_plugin.h does not match src/abi.rs \
         ({} of {} checks differ; program in {}):\n{}",
        mismatches.len(),
        items.len(),
        source.display(),
        mismatches.join("\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn header_parses_as_cpp() {
    let dir = scratch_dir("cpp");
    let source = dir.join("header.cpp");
    std::fs::write(
        &source,
        "#include \"ditflow_plugin.h\"\n\
         static_assert(sizeof(DfPluginDescriptor) > 0, \"complete\");\n\
         static int32_t register_nothing(const DfHostApi* host, DfRegistrar* reg) {\n\
         \x20   (void)host;\n    (void)reg;\n    return DF_OK;\n}\n\
         DF_DEFINE_PLUGIN(\"cpp-test\", \"0.0.0\", register_nothing);\n",
    )
    .unwrap();

    let mut cxx = compiler("CXX", "c++");
    cxx.args([
        "-x",
        "c++",
        "-std=c++11",
        "-fsyntax-only",
        "-Wall",
        "-Wextra",
        "-pedantic",
        "-Werror",
    ])
    .arg("-I")
    .arg(include_dir())
    .arg(&source);
    let shown = format!("{cxx:?}");
    match run_compiler(cxx) {
        Ok(Some(())) => {}
        Ok(None) => eprintln!("note: no C++ compiler ({shown}); the C++ check was skipped"),
        Err(message) => panic!("the header does not parse as C++: {message}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The C example and the host's C test plugins build as shared libraries without a warning.
#[test]
#[cfg(unix)]
fn c_plugins_build_cleanly() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.join("../..");
    let sources = [
        root.join("plugins/examples/c/hello_plugin.c"),
        root.join("plugins/examples/c/gmm_denoiser.c"),
        root.join("plugins/examples/c/residual_patch.c"),
        root.join("tests/plugins/c/bad_abi_plugin.c"),
        root.join("tests/plugins/c/newer_minor_plugin.c"),
        root.join("tests/plugins/c/no_descriptor.c"),
    ];
    let dir = scratch_dir("plugins");
    for source in &sources {
        assert!(source.exists(), "{} is missing", source.display());
        let stem = source.file_stem().unwrap().to_string_lossy();
        let mut cc = compiler("CC", "cc");
        cc.args(C_FLAGS)
            .args(["-shared", "-fPIC"])
            .arg("-I")
            .arg(include_dir())
            .arg("-o")
            .arg(dir.join(format!("lib{stem}.so")))
            .arg(source);
        run_cc(
            cc,
            &format!(
                "{} does not build cleanly against the header:",
                source.display()
            ),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
