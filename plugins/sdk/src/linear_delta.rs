//! Linear deltas (LoRA) as a model applies them: the patches' low-rank deltas gathered per
//! weight the model holds (an alias's delta lands in its rows of the fused weight), built once per
//! patch set and kept by digest, and the linear forward that runs them unmerged beside the base
//! weight or from a merged copy of it.
//!
//! Removal is dropping the patch: the base weights are never written, so a model without the
//! patch is bit-exactly the base model. A patch at strength 0 is left out, so it is bit-exact too.

use crate::abi::{DfLinearDelta, DfPatchDesc, DF_PATCH_MERGE};
use crate::model::{Hooks, LinearInfo};
use crate::value::Value;
use crate::{Device, Error, Kind, Result, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The deltas on one weight: `y += x·downᵀ·upᵀ`, with the scales and strengths folded into `up`.
struct Entry {
    /// `[R, in]`: every delta's down projection, stacked.
    down: Tensor,
    /// `[out, R]`: every delta's up projection, in its rows of the weight (zeros elsewhere).
    up: Tensor,
    /// Run from a merged copy of the weight rather than beside it.
    merge: bool,
    merged: OnceLock<Tensor>,
}

/// The linear deltas of one patch set, by the name of the weight they apply to.
#[derive(Default)]
pub struct LinearDeltas {
    key: u64,
    entries: HashMap<String, Entry>,
}

static NONE: OnceLock<LinearDeltas> = OnceLock::new();

impl LinearDeltas {
    /// No deltas (a model with no LoRA, or a layer outside any patchable model).
    pub fn none() -> &'static LinearDeltas {
        NONE.get_or_init(LinearDeltas::default)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The patch set's key: equal keys mean the same deltas.
    pub fn key(&self) -> u64 {
        self.key
    }

    /// `activation(x·Wᵀ + b + Σ deltas)` for the weight named `name`.
    pub fn linear(
        &self,
        name: &str,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        activation: &str,
    ) -> Result<Tensor> {
        let Some(e) = (!self.entries.is_empty())
            .then(|| self.entries.get(name))
            .flatten()
        else {
            return x.linear(weight, bias, activation);
        };
        if e.merge {
            let w = match e.merged.get() {
                Some(w) => w,
                None => {
                    let w = weight.add(&e.up.matmul(&e.down, false, false)?)?;
                    e.merged.get_or_init(|| w)
                }
            };
            return x.linear(w, bias, activation);
        }
        let y = x.linear(weight, bias, "none")?.add(
            &x.linear(&e.down, None, "none")?
                .linear(&e.up, None, "none")?,
        )?;
        if activation == "none" {
            Ok(y)
        } else {
            y.unary(activation)
        }
    }

    /// Gathers the active linear deltas of `hooks`' patches for a model with `linears`.
    fn build(hooks: &Hooks, linears: &[LinearInfo], key: u64, device: Device) -> Result<Self> {
        struct Parts {
            downs: Vec<Tensor>,
            ups: Vec<Tensor>,
            merge: bool,
        }
        let by_name: HashMap<&str, &LinearInfo> =
            linears.iter().map(|l| (l.name.as_str(), l)).collect();
        let mut parts: HashMap<String, Parts> = HashMap::new();
        for p in hooks.active_delta_patches() {
            // SAFETY: the host's copies, live for the call.
            for d in unsafe { deltas(p) } {
                // SAFETY: a NUL-terminated, host-owned name.
                let target = unsafe { crate::model::string(d.target) };
                let layer = by_name.get(target.as_str()).ok_or_else(|| {
                    Error(format!(
                        "a linear delta targets '{target}', which the model does not have"
                    ))
                })?;
                let (weight, row) = match &layer.fused_into {
                    Some((fused, row)) => (fused.as_str(), *row),
                    None => (layer.name.as_str(), 0),
                };
                let rows = by_name
                    .get(weight)
                    .map_or(layer.out_features, |l| l.out_features);
                let tensor = |v, what| -> Result<Tensor> {
                    Value::from_borrowed(v)
                        .ok_or_else(|| Error(format!("the delta for '{target}' has no {what}")))?
                        .as_tensor()?
                        .cast(crate::DType::F32)?
                        .to_device(device)
                };
                let down = tensor(d.down, "down")?;
                let up = tensor(d.up, "up")?.affine(d.scale * p.strength, 0.0)?;
                let rank = up.shape().get(1).copied().unwrap_or(0);
                let up = place_rows(&up, row, rows, rank, device)?;
                let e = parts.entry(weight.to_string()).or_insert(Parts {
                    downs: Vec::new(),
                    ups: Vec::new(),
                    merge: false,
                });
                e.downs.push(down);
                e.ups.push(up);
                e.merge |= p.flags & DF_PATCH_MERGE != 0;
            }
        }
        let mut entries = HashMap::new();
        for (name, p) in parts {
            let cat = |ts: &[Tensor], axis| -> Result<Tensor> {
                match ts {
                    [one] => Ok(one.clone()),
                    _ => crate::ops::concat(&ts.iter().collect::<Vec<_>>(), axis),
                }
            };
            entries.insert(
                name,
                Entry {
                    down: cat(&p.downs, 0)?,
                    up: cat(&p.ups, 1)?,
                    merge: p.merge,
                    merged: OnceLock::new(),
                },
            );
        }
        Ok(LinearDeltas { key, entries })
    }
}

/// `up` `[o, r]` as rows `row..row+o` of a `[rows, r]` matrix.
fn place_rows(up: &Tensor, row: usize, rows: usize, rank: usize, device: Device) -> Result<Tensor> {
    let o = up.shape()[0];
    if row == 0 && o == rows {
        return Ok(up.clone());
    }
    if row + o > rows {
        return Err(Error(format!(
            "a delta of {o} rows at row {row} does not fit a weight of {rows} rows"
        )));
    }
    let zeros =
        |n: usize| Tensor::zeros(Kind::Tensor, crate::DType::F32, &[n, rank])?.to_device(device);
    let mut parts = Vec::new();
    if row > 0 {
        parts.push(zeros(row)?);
    }
    parts.push(up.clone());
    if rows > row + o {
        parts.push(zeros(rows - row - o)?);
    }
    crate::ops::concat(&parts.iter().collect::<Vec<_>>(), 0)
}

/// # Safety
/// `p` must be a live descriptor.
unsafe fn deltas(p: &DfPatchDesc) -> &[DfLinearDelta] {
    if p.linear_deltas.is_null() || p.n_linear_deltas == 0 {
        return &[];
    }
    // SAFETY: per the contract.
    unsafe { std::slice::from_raw_parts(p.linear_deltas, p.n_linear_deltas) }
}

/// A model's linear deltas for its current patch set, rebuilt only when the set changes.
#[derive(Default)]
pub struct LinearDeltaCache(Mutex<Option<Arc<LinearDeltas>>>);

impl LinearDeltaCache {
    /// The deltas of `hooks`' patches that are active at this call, for a model with `linears`
    /// whose weights live on `device`.
    pub fn get(
        &self,
        hooks: &Hooks,
        linears: &[LinearInfo],
        device: Device,
    ) -> Result<Arc<LinearDeltas>> {
        let key = hooks.delta_key();
        if key == 0 {
            static EMPTY: OnceLock<Arc<LinearDeltas>> = OnceLock::new();
            return Ok(EMPTY.get_or_init(Default::default).clone());
        }
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = slot.as_ref().filter(|d| d.key == key) {
            return Ok(d.clone());
        }
        let d = Arc::new(LinearDeltas::build(hooks, linears, key, device)?);
        *slot = Some(d.clone());
        Ok(d)
    }
}
