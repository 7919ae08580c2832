//! The tensor engine's entry points in the host API (ABI 1.1): the run's device, zero-copy
//! writable tensor bytes, ops by name, weights loading, and the per-thread last error.
//!
//! Like the rest of the host API, every function checks its pointers and catches panics; errors
//! are left in a thread-local message that `last_error` hands out.

use super::host_api::{borrow, context, guard, into_handle, kind_from_raw, text};
use crate::tensor::op_call::{self, Attr, Attrs};
use crate::tensor::{Device, Tensor};
use crate::value::{TensorKind, Value};
use crate::weights::{LoadOptions, Weights};
use ditflow_plugin::abi::*;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};
use std::sync::Arc;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// `set_last_error` in the host API: a plugin records why its protocol function or hook failed.
pub(super) unsafe extern "C" fn set_last_error_c(msg: *const c_char) {
    // SAFETY: NULL or a NUL-terminated string from the plugin.
    let msg = unsafe { text(msg) }.unwrap_or("an error without a message (not UTF-8 or NULL)");
    set_last_error(msg);
}

/// This thread's last error message.
pub(crate) fn take_last_error() -> String {
    LAST_ERROR.with(|e| e.borrow().to_string_lossy().into_owned())
}

pub(crate) fn set_last_error(msg: impl Into<String>) {
    let msg = msg.into().replace('\0', " ");
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::new(msg).unwrap_or_default());
}

fn device_code(d: Device) -> i32 {
    match d {
        Device::Cpu => DF_DEVICE_CPU,
        Device::Cuda(n) => DF_DEVICE_CUDA0 + n as i32,
    }
}

fn device_from_code(code: i32) -> Option<Device> {
    match code {
        DF_DEVICE_CPU => Some(Device::Cpu),
        c if c >= DF_DEVICE_CUDA0 => Some(Device::Cuda((c - DF_DEVICE_CUDA0) as usize)),
        _ => None,
    }
}

pub(super) unsafe extern "C" fn run_device(ctx: *mut DfContext) -> i32 {
    // SAFETY: NULL or the running callback's context.
    guard(DF_DEVICE_CPU, || {
        unsafe { context(ctx) }.map_or(DF_DEVICE_CPU, |c| device_code(c.device()))
    })
}

pub(super) unsafe extern "C" fn value_tensor_device(v: *const DfValue) -> i32 {
    // SAFETY: NULL or a live handle.
    guard(-1, || match unsafe { borrow(v) } {
        Some(Value::Tensor(_, t)) => device_code(t.device()),
        _ => -1,
    })
}

pub(super) unsafe extern "C" fn value_tensor_data_mut(
    v: *mut DfValue,
    nbytes: *mut usize,
) -> *mut c_void {
    guard(std::ptr::null_mut(), || {
        if v.is_null() {
            return std::ptr::null_mut();
        }
        // SAFETY: a live handle owns one reference; we borrow it without taking it over.
        let mut arc = std::mem::ManuallyDrop::new(unsafe { Arc::from_raw(v as *const Value) });
        let Some(Value::Tensor(_, t)) = Arc::get_mut(&mut arc) else {
            return std::ptr::null_mut();
        };
        match t.unique_bytes_mut() {
            Some(bytes) => {
                if !nbytes.is_null() {
                    // SAFETY: checked for NULL.
                    unsafe { *nbytes = bytes.len() };
                }
                bytes.as_mut_ptr() as *mut c_void
            }
            None => std::ptr::null_mut(),
        }
    })
}

/// Reads the C attributes.
///
/// # Safety
/// `attrs` must point at `n` valid `DfOpAttr`s whose strings and arrays are live.
unsafe fn read_attrs(attrs: *const DfOpAttr, n: usize) -> Result<Attrs, String> {
    if n == 0 {
        return Ok(Attrs::default());
    }
    if attrs.is_null() {
        return Err("attrs is NULL".into());
    }
    // SAFETY: per the contract.
    let raw = unsafe { std::slice::from_raw_parts(attrs, n) };
    let mut out = Vec::with_capacity(n);
    for a in raw {
        // SAFETY: per the contract.
        let name = unsafe { text(a.name) }.ok_or("an attribute without a UTF-8 name")?;
        let value = match a.kind {
            DF_ATTR_INT => Attr::Int(a.i),
            DF_ATTR_FLOAT => Attr::Float(a.f),
            DF_ATTR_INTS => {
                if a.n_ints > 0 && a.ints.is_null() {
                    return Err(format!("attribute '{name}': ints is NULL"));
                }
                // SAFETY: per the contract.
                Attr::Ints(if a.n_ints == 0 {
                    Vec::new()
                } else {
                    unsafe { std::slice::from_raw_parts(a.ints, a.n_ints) }.to_vec()
                })
            }
            // SAFETY: per the contract.
            DF_ATTR_STRING => Attr::Str(
                unsafe { text(a.s) }
                    .ok_or_else(|| format!("attribute '{name}': not a UTF-8 string"))?
                    .to_string(),
            ),
            k => return Err(format!("attribute '{name}': unknown kind {k}")),
        };
        out.push((name.to_string(), value));
    }
    Ok(Attrs(out))
}

#[allow(clippy::too_many_arguments)]
pub(super) unsafe extern "C" fn tensor_op(
    op: *const c_char,
    inputs: *const *const DfValue,
    n_inputs: usize,
    attrs: *const DfOpAttr,
    n_attrs: usize,
    out_kind: i32,
    outputs: *mut *mut DfValue,
    max_outputs: usize,
    n_outputs: *mut usize,
) -> i32 {
    if !n_outputs.is_null() {
        // SAFETY: checked for NULL.
        unsafe { *n_outputs = 0 };
    }
    let run = || -> Result<(), String> {
        // SAFETY: per the host API contract.
        let name = unsafe { text(op) }.ok_or("op name is NULL or not UTF-8")?;
        if n_inputs > 0 && inputs.is_null() {
            return Err(format!("{name}: inputs is NULL"));
        }
        // SAFETY: per the contract, `n_inputs` handles (each NULL or live).
        let handles = if n_inputs == 0 {
            &[][..]
        } else {
            unsafe { std::slice::from_raw_parts(inputs, n_inputs) }
        };
        let mut first_kind = None;
        let mut tensors: Vec<Option<&Tensor>> = Vec::with_capacity(n_inputs);
        for (i, &h) in handles.iter().enumerate() {
            // SAFETY: NULL or a live handle.
            match unsafe { borrow(h) } {
                None => tensors.push(None),
                Some(Value::Tensor(k, t)) => {
                    first_kind.get_or_insert(*k);
                    tensors.push(Some(t));
                }
                Some(other) => {
                    return Err(format!(
                        "{name}: input {i} is a {}, not a tensor",
                        other.type_name()
                    ))
                }
            }
        }
        // SAFETY: per the contract.
        let attrs = unsafe { read_attrs(attrs, n_attrs) }.map_err(|e| format!("{name}: {e}"))?;
        let kind = match out_kind {
            0 => first_kind.unwrap_or(TensorKind::Tensor),
            k => kind_from_raw(k)
                .ok_or_else(|| format!("{name}: out_kind {k} is not a tensor kind"))?,
        };
        let results = op_call::call(name, &tensors, &attrs).map_err(|e| e.to_string())?;
        if results.len() > max_outputs || (!results.is_empty() && outputs.is_null()) {
            return Err(format!(
                "{name}: makes {} outputs, room for {max_outputs}",
                results.len()
            ));
        }
        for (i, t) in results.into_iter().enumerate() {
            // SAFETY: `outputs` has room for `max_outputs` handles.
            unsafe { *outputs.add(i) = into_handle(Value::Tensor(kind, t)) };
            if !n_outputs.is_null() {
                // SAFETY: checked for NULL.
                unsafe { *n_outputs = i + 1 };
            }
        }
        Ok(())
    };
    match guard(Err("the op panicked".to_string()), run) {
        Ok(()) => DF_OK,
        Err(e) => {
            set_last_error(e);
            DF_ERROR
        }
    }
}

pub(super) unsafe extern "C" fn last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

pub(super) unsafe extern "C" fn load_weights(
    ctx: *mut DfContext,
    path: *const c_char,
    device: i32,
) -> *mut DfValue {
    let run = || -> Result<*mut DfValue, String> {
        // SAFETY: per the contract.
        let ctx = unsafe { context(ctx) }.ok_or("ctx is NULL")?;
        // SAFETY: per the contract.
        let path = unsafe { text(path) }.ok_or("path is NULL or not UTF-8")?;
        let device =
            device_from_code(device).ok_or_else(|| format!("unknown device code {device}"))?;
        let full = ctx.resolve_input_path(path);
        let w = Weights::open(
            &full,
            LoadOptions {
                device,
                float_dtype: None,
            },
        )
        .map_err(|e| e.to_string())?;
        ctx.weight_bytes += w.tensors.values().map(|t| t.nbytes()).sum::<usize>();
        let pairs: Vec<Arc<Value>> = w
            .tensors
            .into_iter()
            .map(|(name, t)| {
                let pair: Arc<[Arc<Value>]> = vec![
                    Arc::new(Value::string(&name)),
                    Arc::new(Value::Tensor(TensorKind::Tensor, t)),
                ]
                .into();
                Arc::new(Value::List(pair))
            })
            .collect();
        Ok(into_handle(Value::List(pairs.into())))
    };
    match guard(Err("loading weights panicked".to_string()), run) {
        Ok(v) => v,
        Err(e) => {
            set_last_error(e);
            std::ptr::null_mut()
        }
    }
}
