//! Half-precision activations on the GPU ([`crate::kernels::gpu_activations`]) at the denoiser
//! boundary: the host narrows the tensors a denoiser's blocks carry before the plugin's forward
//! (or block stepping's `prepare`) and widens the prediction back to f32 after it, so every
//! plugin's model runs its blocks in bf16/f16 (the CUDA kernels read and write that type, summing
//! in f32) while samplers, guidance, whole-call overrides and the C API keep seeing f32.

use super::host_api::borrow;
use crate::tensor::{ops, DType, Device, Tensor};
use crate::value::Value;
use ditflow_plugin::abi::{DfNamedValue, DfValue};
use std::sync::Arc;

/// Whether `t` is narrowed: a float tensor on a GPU with at least three axes — the latent and
/// the token sequences. Timesteps, masks, position ids and pooled vectors (one or two axes)
/// keep their type, as diffusers keeps them when a pipeline runs in bf16.
fn carried(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cuda(_))
        && t.rank() >= 3
        && matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16)
}

/// The named inputs for a denoiser's forward with its carried tensors narrowed to the activation
/// type, and the values that back them (kept alive for the call).
pub(super) struct Narrowed {
    _held: Vec<Arc<Value>>,
    pub(super) named: Vec<DfNamedValue>,
}

/// `inputs` narrowed, or `None` when activations are f32 or no input is carried.
pub(super) fn narrow(inputs: &[DfNamedValue]) -> Result<Option<Narrowed>, String> {
    let dt = crate::kernels::gpu_activations();
    if dt == DType::F32 {
        return Ok(None);
    }
    let mut held = Vec::new();
    let mut named = Vec::with_capacity(inputs.len());
    for n in inputs {
        // SAFETY: the caller's live handles (or NULL).
        let narrowed = match unsafe { borrow(n.value) } {
            Some(Value::Tensor(kind, t)) if carried(t) && t.dtype() != dt => {
                let h = ops::cast(t, dt).map_err(|e| format!("narrowing an input: {e}"))?;
                Some(Arc::new(Value::Tensor(*kind, h)))
            }
            _ => None,
        };
        match narrowed {
            Some(v) => {
                named.push(DfNamedValue {
                    name: n.name,
                    value: Arc::as_ptr(&v) as *const DfValue,
                });
                held.push(v);
            }
            None => named.push(*n),
        }
    }
    Ok((!held.is_empty()).then_some(Narrowed { _held: held, named }))
}

/// A denoiser's prediction widened back to f32 when it came out in the activation type on a GPU.
pub(super) fn widen(v: Arc<Value>) -> Result<Arc<Value>, String> {
    let dt = crate::kernels::gpu_activations();
    match &*v {
        Value::Tensor(kind, t)
            if dt != DType::F32 && t.dtype() == dt && matches!(t.device(), Device::Cuda(_)) =>
        {
            let f =
                ops::cast(t, DType::F32).map_err(|e| format!("widening the prediction: {e}"))?;
            Ok(Arc::new(Value::Tensor(*kind, f)))
        }
        _ => Ok(v),
    }
}
