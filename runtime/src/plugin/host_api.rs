//! The host side of the C ABI: the `DfHostApi` function table handed to every plugin, and the
//! `extern "C"` functions behind it.
//!
//! Handles: a `DfValue*` is an `Arc<Value>` turned into a raw pointer (one reference each); a
//! `DfContext*` is an `ExecContext`; a `DfRegistrar*` is a [`Registrar`]. Every function checks its
//! pointers for NULL and catches panics, so no plugin input can unwind into plugin code.

use super::loader::Registrar;
use super::{host_tensor, model};
use crate::exec::context::ExecContext;
use crate::tensor::{rng, DType, Tensor};
use crate::value::{Object, TensorKind, Value};
use ditflow_plugin::abi::*;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// The function table is immutable static data.
struct SyncHostApi(DfHostApi);
unsafe impl Sync for SyncHostApi {}

static HOST_API: SyncHostApi = SyncHostApi(DfHostApi {
    abi_major: DF_ABI_MAJOR,
    abi_minor: DF_ABI_MINOR,
    size: std::mem::size_of::<DfHostApi>() as u64,
    register_node,
    input,
    set_output,
    set_error,
    progress,
    is_cancelled,
    log,
    resolve_input_path,
    resolve_output_path,
    value_bool,
    value_int,
    value_float,
    value_string,
    value_list,
    value_tensor,
    value_object,
    value_retain,
    value_release,
    value_kind,
    value_get_bool,
    value_get_int,
    value_get_float,
    value_get_string,
    value_list_len,
    value_list_get,
    value_tensor_info,
    value_tensor_data,
    value_object_get,
    tensor_randn,
    run_device: host_tensor::run_device,
    value_tensor_device: host_tensor::value_tensor_device,
    value_tensor_data_mut: host_tensor::value_tensor_data_mut,
    tensor_op: host_tensor::tensor_op,
    last_error: host_tensor::last_error,
    load_weights: host_tensor::load_weights,
    set_last_error: host_tensor::set_last_error_c,
    value_model: model::value_model,
    model_interface: model::model_interface,
    model_info: model::model_info,
    model_patch: model::model_patch,
    denoiser_forward: model::denoiser_forward,
    denoiser_lifecycle: model::denoiser_lifecycle,
    model_forward: model::model_forward,
    new_run_id: model::new_run_id,
    denoiser_prepare: model::denoiser_prepare,
    denoiser_run_blocks: model::denoiser_run_blocks,
    denoiser_finish: model::denoiser_finish,
    model_patch_memory: model::model_patch_memory,
    denoiser_run_block_part: model::denoiser_run_block_part,
    preview,
    reserved: [std::ptr::null(); 11],
});

/// The table passed to plugins.
pub fn host_api() -> *const DfHostApi {
    &HOST_API.0
}

/// Runs `f`, turning a panic into `default`.
pub(super) fn guard<R>(default: R, f: impl FnOnce() -> R) -> R {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(default)
}

/// Gives one reference to the plugin.
pub(crate) fn into_handle(v: Value) -> *mut DfValue {
    Arc::into_raw(Arc::new(v)) as *mut DfValue
}

/// Borrows the value behind a handle.
///
/// # Safety
/// `v` must be NULL or a live handle made by [`into_handle`].
pub(super) unsafe fn borrow<'a>(v: *const DfValue) -> Option<&'a Value> {
    // SAFETY: per the contract, a live `Arc<Value>` pointer.
    unsafe { (v as *const Value).as_ref() }
}

/// Takes back one reference from the plugin.
///
/// # Safety
/// `v` must be a live handle made by [`into_handle`] whose reference the caller gives up.
pub(crate) unsafe fn take_handle(v: *mut DfValue) -> Option<Arc<Value>> {
    if v.is_null() {
        return None;
    }
    // SAFETY: per the contract.
    Some(unsafe { Arc::from_raw(v as *const Value) })
}

/// A borrowed handle to a value already held in an `Arc`.
fn borrowed_handle(v: &Arc<Value>) -> *const DfValue {
    Arc::as_ptr(v) as *const DfValue
}

/// # Safety
/// `ctx` must be NULL or the `DfContext*` of a callback that is running.
pub(super) unsafe fn context<'a>(ctx: *mut DfContext) -> Option<&'a mut ExecContext<'a>> {
    // SAFETY: per the contract.
    unsafe { (ctx as *mut ExecContext).as_mut() }
}

/// # Safety
/// `s` must be NULL or a NUL-terminated string.
pub(super) unsafe fn text<'a>(s: *const c_char) -> Option<&'a str> {
    if s.is_null() {
        return None;
    }
    // SAFETY: per the contract.
    unsafe { CStr::from_ptr(s) }.to_str().ok()
}

unsafe extern "C" fn register_node(reg: *mut DfRegistrar, desc: *const DfNodeDesc) -> i32 {
    guard(DF_ERROR, || {
        // SAFETY: `reg` is the registrar passed to this plugin's `register` call.
        let Some(reg) = (unsafe { (reg as *mut Registrar).as_mut() }) else {
            return DF_ERROR;
        };
        // SAFETY: the plugin passes a descriptor valid for this call.
        match unsafe { reg.add(desc) } {
            Ok(()) => DF_OK,
            Err(()) => DF_ERROR,
        }
    })
}

unsafe extern "C" fn input(ctx: *mut DfContext, name: *const c_char) -> *const DfValue {
    guard(std::ptr::null(), || {
        // SAFETY: host pointers of the running callback.
        let (Some(ctx), Some(name)) = (unsafe { context(ctx) }, unsafe { text(name) }) else {
            return std::ptr::null();
        };
        ctx.input(name).map_or(std::ptr::null(), borrowed_handle)
    })
}

unsafe extern "C" fn set_output(
    ctx: *mut DfContext,
    name: *const c_char,
    value: *mut DfValue,
) -> i32 {
    guard(DF_ERROR, || {
        // SAFETY: the plugin gives up its reference to `value`, whatever happens.
        let value = unsafe { take_handle(value) };
        // SAFETY: host pointers of the running callback.
        let (Some(ctx), Some(name), Some(value)) =
            (unsafe { context(ctx) }, unsafe { text(name) }, value)
        else {
            return DF_ERROR;
        };
        match ctx.set_output(name, value) {
            Ok(()) => DF_OK,
            Err(e) => {
                ctx.set_error(e);
                DF_ERROR
            }
        }
    })
}

unsafe extern "C" fn set_error(ctx: *mut DfContext, msg: *const c_char) {
    guard((), || {
        // SAFETY: host pointers of the running callback.
        if let Some(ctx) = unsafe { context(ctx) } {
            let msg = if msg.is_null() {
                "error without a message".to_string()
            } else {
                // SAFETY: a NUL-terminated string from the plugin.
                unsafe { CStr::from_ptr(msg) }
                    .to_string_lossy()
                    .into_owned()
            };
            ctx.set_error(msg);
        }
    })
}

unsafe extern "C" fn progress(ctx: *mut DfContext, step: u64, total: u64) {
    guard((), || {
        // SAFETY: host pointers of the running callback.
        if let Some(ctx) = unsafe { context(ctx) } {
            ctx.progress(step, total);
        }
    })
}

unsafe extern "C" fn preview(ctx: *mut DfContext, step: u64, total: u64, png: *const u8, len: u64) {
    guard((), || {
        if png.is_null() {
            return;
        }
        // SAFETY: host pointers of the running callback; `len` bytes at `png` by contract.
        if let Some(ctx) = unsafe { context(ctx) } {
            let bytes = unsafe { std::slice::from_raw_parts(png, len as usize) };
            ctx.preview(step, total, bytes);
        }
    })
}

unsafe extern "C" fn is_cancelled(ctx: *mut DfContext) -> i32 {
    // SAFETY: host pointers of the running callback.
    guard(0, || {
        unsafe { context(ctx) }.map_or(0, |c| c.is_cancelled() as i32)
    })
}

unsafe extern "C" fn log(ctx: *mut DfContext, level: i32, msg: *const c_char) {
    guard((), || {
        // SAFETY: host pointers of the running callback.
        let node = unsafe { context(ctx) }
            .map(|c| c.node_id().to_string())
            .unwrap_or_default();
        let msg = if msg.is_null() {
            String::new()
        } else {
            // SAFETY: a NUL-terminated string from the plugin.
            unsafe { CStr::from_ptr(msg) }
                .to_string_lossy()
                .into_owned()
        };
        match level {
            DF_LOG_ERROR => tracing::error!(node, "{msg}"),
            DF_LOG_WARN => tracing::warn!(node, "{msg}"),
            DF_LOG_INFO => tracing::info!(node, "{msg}"),
            _ => tracing::debug!(node, "{msg}"),
        }
    })
}

unsafe extern "C" fn resolve_input_path(ctx: *mut DfContext, path: *const c_char) -> *mut DfValue {
    guard(std::ptr::null_mut(), || {
        // SAFETY: host pointers of the running callback.
        let (Some(ctx), Some(path)) = (unsafe { context(ctx) }, unsafe { text(path) }) else {
            return std::ptr::null_mut();
        };
        into_handle(Value::string(
            &ctx.resolve_input_path(path).to_string_lossy(),
        ))
    })
}

unsafe extern "C" fn resolve_output_path(ctx: *mut DfContext, path: *const c_char) -> *mut DfValue {
    guard(std::ptr::null_mut(), || {
        // SAFETY: host pointers of the running callback.
        let (Some(ctx), Some(path)) = (unsafe { context(ctx) }, unsafe { text(path) }) else {
            return std::ptr::null_mut();
        };
        match ctx.resolve_output_path(path) {
            Ok(p) => into_handle(Value::string(&p.to_string_lossy())),
            Err(e) => {
                ctx.set_error(format!("cannot create the folder for {path}: {e}"));
                std::ptr::null_mut()
            }
        }
    })
}

unsafe extern "C" fn value_bool(v: i32) -> *mut DfValue {
    guard(std::ptr::null_mut(), || into_handle(Value::Bool(v != 0)))
}

unsafe extern "C" fn value_int(v: i64) -> *mut DfValue {
    guard(std::ptr::null_mut(), || into_handle(Value::Int(v)))
}

unsafe extern "C" fn value_float(v: f64) -> *mut DfValue {
    guard(std::ptr::null_mut(), || into_handle(Value::Float(v)))
}

unsafe extern "C" fn value_string(ptr: *const c_char, len: usize) -> *mut DfValue {
    guard(std::ptr::null_mut(), || {
        let bytes: &[u8] = if len == 0 {
            &[]
        } else if ptr.is_null() {
            return std::ptr::null_mut();
        } else {
            // SAFETY: the plugin passes `len` readable bytes.
            unsafe { std::slice::from_raw_parts(ptr as *const u8, len) }
        };
        match std::str::from_utf8(bytes) {
            Ok(s) => into_handle(Value::string(s)),
            Err(_) => std::ptr::null_mut(),
        }
    })
}

unsafe extern "C" fn value_list(items: *const *mut DfValue, n: usize) -> *mut DfValue {
    guard(std::ptr::null_mut(), || {
        if n > 0 && items.is_null() {
            return std::ptr::null_mut();
        }
        let raw: &[*mut DfValue] = if n == 0 {
            &[]
        } else {
            // SAFETY: the plugin passes `n` handles.
            unsafe { std::slice::from_raw_parts(items, n) }
        };
        // The host takes every reference, even when refusing the list.
        // SAFETY: the plugin gives up each reference.
        let values: Vec<Option<Arc<Value>>> =
            raw.iter().map(|&v| unsafe { take_handle(v) }).collect();
        match values.into_iter().collect::<Option<Arc<[Arc<Value>]>>>() {
            Some(values) => into_handle(Value::List(values)),
            None => std::ptr::null_mut(),
        }
    })
}

pub(super) fn kind_from_raw(kind: i32) -> Option<TensorKind> {
    Some(match kind {
        DF_KIND_TENSOR => TensorKind::Tensor,
        DF_KIND_LATENT => TensorKind::Latent,
        DF_KIND_CONDITIONING => TensorKind::Conditioning,
        DF_KIND_IMAGE => TensorKind::Image,
        DF_KIND_AUDIO => TensorKind::Audio,
        DF_KIND_VIDEO => TensorKind::Video,
        _ => return None,
    })
}

pub(super) fn kind_to_raw(kind: TensorKind) -> i32 {
    match kind {
        TensorKind::Tensor => DF_KIND_TENSOR,
        TensorKind::Latent => DF_KIND_LATENT,
        TensorKind::Conditioning => DF_KIND_CONDITIONING,
        TensorKind::Image => DF_KIND_IMAGE,
        TensorKind::Audio => DF_KIND_AUDIO,
        TensorKind::Video => DF_KIND_VIDEO,
    }
}

/// # Safety
/// `shape` must point at `rank` dims (or be NULL with rank 0).
unsafe fn shape_from_raw(shape: *const i64, rank: usize) -> Option<Vec<usize>> {
    if rank == 0 {
        return Some(Vec::new());
    }
    if shape.is_null() || rank > 16 {
        return None;
    }
    // SAFETY: per the contract.
    let dims = unsafe { std::slice::from_raw_parts(shape, rank) };
    dims.iter().map(|&d| usize::try_from(d).ok()).collect()
}

unsafe extern "C" fn value_tensor(
    kind: i32,
    dtype: i32,
    shape: *const i64,
    rank: usize,
    data: *const c_void,
    nbytes: usize,
) -> *mut DfValue {
    guard(std::ptr::null_mut(), || {
        // SAFETY: the plugin passes `rank` dims.
        let (Some(kind), Some(dtype), Some(shape)) =
            (kind_from_raw(kind), DType::from_raw(dtype), unsafe {
                shape_from_raw(shape, rank)
            })
        else {
            return std::ptr::null_mut();
        };
        let tensor = if data.is_null() {
            Tensor::zeros(dtype, &shape)
        } else {
            // SAFETY: the plugin passes `nbytes` readable bytes.
            let bytes = unsafe { std::slice::from_raw_parts(data as *const u8, nbytes) };
            Tensor::from_bytes(dtype, &shape, bytes)
        };
        match tensor {
            Ok(t) => into_handle(Value::Tensor(kind, t)),
            Err(_) => std::ptr::null_mut(),
        }
    })
}

unsafe extern "C" fn value_object(
    ctx: *mut DfContext,
    type_tag: *const c_char,
    object: *mut c_void,
    drop: Option<DfObjectDropFn>,
) -> *mut DfValue {
    // Built first so the plugin's object is released even when the call is refused.
    // SAFETY: host pointers of the running callback.
    let (keep_alive, weight_bytes) = match unsafe { context(ctx) } {
        Some(c) => (c.keep_alive.clone(), std::mem::take(&mut c.weight_bytes)),
        None => (None, 0),
    };
    // SAFETY: a NUL-terminated tag from the plugin.
    let tag = unsafe { text(type_tag) }.unwrap_or("").to_string();
    let mut obj = Object::new(tag, object, drop, keep_alive);
    obj.weight_bytes = weight_bytes;
    if obj.tag.is_empty() || object.is_null() {
        return std::ptr::null_mut();
    }
    guard(std::ptr::null_mut(), || {
        into_handle(Value::Object(Arc::new(obj)))
    })
}

unsafe extern "C" fn value_retain(v: *const DfValue) {
    if !v.is_null() {
        // SAFETY: a live handle; adds one reference.
        unsafe { Arc::increment_strong_count(v as *const Value) }
    }
}

unsafe extern "C" fn value_release(v: *mut DfValue) {
    if !v.is_null() {
        // Dropping a value can run a plugin's object drop function: never unwind from here.
        // SAFETY: a live handle; gives up one reference.
        guard((), || drop(unsafe { Arc::from_raw(v as *const Value) }))
    }
}

unsafe extern "C" fn value_kind(v: *const DfValue) -> i32 {
    // SAFETY: NULL or a live handle.
    match unsafe { borrow(v) } {
        Some(Value::Bool(_)) => DF_KIND_BOOL,
        Some(Value::Int(_)) => DF_KIND_INT,
        Some(Value::Float(_)) => DF_KIND_FLOAT,
        Some(Value::String(_)) => DF_KIND_STRING,
        Some(Value::Tensor(kind, _)) => kind_to_raw(*kind),
        Some(Value::Object(_)) => DF_KIND_MODEL,
        Some(Value::List(_)) => DF_KIND_LIST,
        None => 0,
    }
}

unsafe extern "C" fn value_get_bool(v: *const DfValue, out: *mut i32) -> i32 {
    // SAFETY: NULL or a live handle; `out` checked for NULL.
    match (unsafe { borrow(v) }, out.is_null()) {
        (Some(Value::Bool(b)), false) => {
            unsafe { *out = *b as i32 };
            DF_OK
        }
        _ => DF_ERROR,
    }
}

unsafe extern "C" fn value_get_int(v: *const DfValue, out: *mut i64) -> i32 {
    // SAFETY: NULL or a live handle; `out` checked for NULL.
    match (unsafe { borrow(v) }, out.is_null()) {
        (Some(Value::Int(i)), false) => {
            unsafe { *out = *i };
            DF_OK
        }
        _ => DF_ERROR,
    }
}

unsafe extern "C" fn value_get_float(v: *const DfValue, out: *mut f64) -> i32 {
    // SAFETY: NULL or a live handle; `out` checked for NULL.
    let x = match unsafe { borrow(v) } {
        Some(Value::Float(f)) => *f,
        Some(Value::Int(i)) => *i as f64,
        _ => return DF_ERROR,
    };
    if out.is_null() {
        return DF_ERROR;
    }
    // SAFETY: checked above.
    unsafe { *out = x };
    DF_OK
}

unsafe extern "C" fn value_get_string(
    v: *const DfValue,
    ptr: *mut *const c_char,
    len: *mut usize,
) -> i32 {
    // SAFETY: NULL or a live handle; out pointers checked for NULL.
    match unsafe { borrow(v) } {
        Some(Value::String(s)) if !ptr.is_null() && !len.is_null() => {
            unsafe {
                *ptr = s.as_c_bytes().as_ptr() as *const c_char;
                *len = s.as_str().len();
            }
            DF_OK
        }
        _ => DF_ERROR,
    }
}

unsafe extern "C" fn value_list_len(v: *const DfValue) -> usize {
    // SAFETY: NULL or a live handle.
    match unsafe { borrow(v) } {
        Some(Value::List(items)) => items.len(),
        _ => 0,
    }
}

unsafe extern "C" fn value_list_get(v: *const DfValue, i: usize) -> *const DfValue {
    // SAFETY: NULL or a live handle.
    match unsafe { borrow(v) } {
        Some(Value::List(items)) if i < items.len() => borrowed_handle(&items[i]),
        _ => std::ptr::null(),
    }
}

unsafe extern "C" fn value_tensor_info(
    v: *const DfValue,
    dtype: *mut i32,
    shape: *mut *const i64,
    rank: *mut usize,
) -> i32 {
    // SAFETY: NULL or a live handle; out pointers checked for NULL.
    match unsafe { borrow(v) } {
        Some(Value::Tensor(_, t)) if !dtype.is_null() && !shape.is_null() && !rank.is_null() => {
            unsafe {
                *dtype = t.dtype().raw();
                *shape = t.dims().as_ptr();
                *rank = t.dims().len();
            }
            DF_OK
        }
        _ => DF_ERROR,
    }
}

unsafe extern "C" fn value_tensor_data(v: *const DfValue, nbytes: *mut usize) -> *const c_void {
    // SAFETY: NULL or a live handle.
    match unsafe { borrow(v) } {
        Some(Value::Tensor(_, t)) => match t.cpu_bytes() {
            Ok(bytes) => {
                if !nbytes.is_null() {
                    // SAFETY: checked for NULL.
                    unsafe { *nbytes = bytes.len() };
                }
                bytes.as_ptr() as *const c_void
            }
            Err(_) => std::ptr::null(),
        },
        _ => std::ptr::null(),
    }
}

unsafe extern "C" fn value_object_get(v: *const DfValue, type_tag: *const c_char) -> *mut c_void {
    // SAFETY: NULL or a live handle; a NUL-terminated tag.
    match (unsafe { borrow(v) }, unsafe { text(type_tag) }) {
        (Some(Value::Object(o)), Some(tag)) if o.tag() == tag => o.ptr,
        _ => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn tensor_randn(
    kind: i32,
    dtype: i32,
    shape: *const i64,
    rank: usize,
    seed: u64,
) -> *mut DfValue {
    guard(std::ptr::null_mut(), || {
        // SAFETY: the plugin passes `rank` dims.
        let (Some(kind), Some(DType::F32), Some(shape)) =
            (kind_from_raw(kind), DType::from_raw(dtype), unsafe {
                shape_from_raw(shape, rank)
            })
        else {
            return std::ptr::null_mut();
        };
        match Tensor::zeros(DType::F32, &shape) {
            Ok(mut t) => {
                rng::fill_randn(seed, t.as_f32_mut());
                into_handle(Value::Tensor(kind, t))
            }
            Err(_) => std::ptr::null_mut(),
        }
    })
}
