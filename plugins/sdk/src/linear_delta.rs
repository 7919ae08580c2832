//! Linear deltas (LoRA) as a model applies them: the patches' low-rank deltas gathered per
//! weight the model holds, built once per patch set and kept by digest, and the linear forward
//! that runs them unmerged beside the base weight or from a merged copy of it.
//!
//! A model publishes fused layers and their row-slice aliases either way round: holding the
//! fused weight (an alias's delta lands in its rows of it), or holding the parts under a fused
//! name it publishes for other layouts ([`fused_aliases`]; a delta on the fused name is split
//! into its parts' rows, see [`LinearDeltaCache::holding_parts`]).
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
                    // A block-quantized weight is merged in f32 (as ComfyUI-GGUF patches).
                    let base = if weight.dtype().is_quantized() {
                        weight.cast(crate::DType::F32)?
                    } else {
                        weight.clone()
                    };
                    let w = base.add(&e.up.matmul(&e.down, false, false)?)?;
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

    /// Gathers the active linear deltas of `hooks`' patches for a model with `linears`; with
    /// `parts_held` the model holds the parts of its fused layers rather than the fused weights.
    fn build(
        hooks: &Hooks,
        linears: &[LinearInfo],
        parts_held: bool,
        key: u64,
        device: Device,
    ) -> Result<Self> {
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
                // (held weight, its delta's up rows).
                let mut placed: Vec<(&str, Tensor)> = Vec::new();
                let split: Vec<&LinearInfo> = if parts_held && layer.fused_into.is_none() {
                    linears
                        .iter()
                        .filter(|l| l.fused_into.as_ref().is_some_and(|(f, _)| *f == target))
                        .collect()
                } else {
                    Vec::new()
                };
                if !split.is_empty() {
                    for part in split {
                        let row = part.fused_into.as_ref().map_or(0, |(_, r)| *r);
                        let rows = up.slice(0, row as i64, (row + part.out_features) as i64, 1)?;
                        placed.push((part.name.as_str(), rows));
                    }
                } else {
                    let (weight, row) = match &layer.fused_into {
                        Some((fused, row)) if !parts_held => (fused.as_str(), *row),
                        _ => (layer.name.as_str(), 0),
                    };
                    let rows = by_name
                        .get(weight)
                        .map_or(layer.out_features, |l| l.out_features);
                    placed.push((weight, place_rows(&up, row, rows, rank, device)?));
                }
                for (weight, up) in placed {
                    let e = parts.entry(weight.to_string()).or_insert(Parts {
                        downs: Vec::new(),
                        ups: Vec::new(),
                        merge: false,
                    });
                    e.downs.push(down.clone());
                    e.ups.push(up);
                    e.merge |= p.flags & DF_PATCH_MERGE != 0;
                }
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

/// `physical` (the layers a model holds) plus fused names over them for another key layout:
/// each `(fused, parts)` publishes `fused` as the parts stacked on rows, and each part as its
/// row-slice alias. The model then holds the parts ([`LinearDeltaCache::holding_parts`]). An
/// error names a part that is not held or already an alias, or parts of different widths.
pub fn fused_aliases(
    mut physical: Vec<LinearInfo>,
    groups: &[(String, Vec<String>)],
) -> Result<Vec<LinearInfo>> {
    let mut fused = Vec::new();
    for (name, parts) in groups {
        let mut row = 0;
        let mut in_features = None;
        for part in parts {
            let layer = physical
                .iter_mut()
                .find(|l| l.name == *part)
                .ok_or_else(|| Error(format!("fused layer '{name}': no layer '{part}'")))?;
            if layer.fused_into.is_some()
                || *in_features.get_or_insert(layer.in_features) != layer.in_features
            {
                return Err(Error(format!(
                    "fused layer '{name}': '{part}' is already an alias or of another width"
                )));
            }
            layer.fused_into = Some((name.clone(), row));
            row += layer.out_features;
        }
        fused.push(LinearInfo {
            name: name.clone(),
            out_features: row,
            in_features: in_features.unwrap_or(0),
            fused_into: None,
        });
    }
    physical.extend(fused);
    Ok(physical)
}

/// A model's linear deltas for its current patch set, rebuilt only when the set changes.
#[derive(Default)]
pub struct LinearDeltaCache {
    slot: Mutex<Option<Arc<LinearDeltas>>>,
    parts_held: bool,
}

impl LinearDeltaCache {
    /// For a model that holds the parts of its fused layers (see [`fused_aliases`]): a delta on
    /// a fused name is split into its parts' rows, and a delta on a part stays on it.
    pub fn holding_parts() -> LinearDeltaCache {
        LinearDeltaCache {
            slot: Mutex::new(None),
            parts_held: true,
        }
    }

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
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = slot.as_ref().filter(|d| d.key == key) {
            return Ok(d.clone());
        }
        let d = Arc::new(LinearDeltas::build(
            hooks,
            linears,
            self.parts_held,
            key,
            device,
        )?);
        *slot = Some(d.clone());
        Ok(d)
    }
}
