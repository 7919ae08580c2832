//! The host side of the model protocol (ABI 1.3): Model values that speak an interface, patch
//! lists and the rules that compose them, and the calls that drive a model through its interface
//! (`denoiser_forward`, `denoiser_lifecycle`, `model_forward`).
//!
//! A patched model is a new [`Object`] over the same base object: weights are never copied, and
//! the patch list is immutable, ordered and identified by a digest. Composition is checked when a
//! patch is added, not when sampling reaches step 37: a capability the model lacks, a linear
//! layer it does not have, overlapping range overrides, or a skipping cache over a patch that
//! needs fresh injections are refused with a message naming both parties.
//!
//! Whole-call range overrides (`stack` -1) wrap the base forward here, in the host, so they apply
//! to every denoiser, even one that runs no hooks itself (a C plugin's, say).

use super::host_api::{borrow, context, guard, host_api, into_handle, take_handle, text};
use super::host_tensor::{set_last_error, take_last_error};
use crate::value::{Object, Value};
use ditflow_plugin::abi::*;
use std::ffi::{c_char, c_void, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The `stack` a range override or residual gives to mean the whole denoiser call.
const WHOLE_CALL: i32 = -1;

/// A patch as the host keeps it: the plugin's descriptor with every string and value owned here.
pub struct Patch {
    pub(crate) desc: DfPatchDesc,
    name: CString,
    plugin: CString,
    _targets: Vec<CString>,
    _deltas: Vec<DfLinearDelta>,
    values: Vec<Arc<Value>>,
    /// Keeps the patch's plugin mapped while the patch lives; dropped last.
    _keep_alive: Option<Arc<dyn Send + Sync>>,
}

// The plugin promises its hooks and user data may be used from any thread.
unsafe impl Send for Patch {}
unsafe impl Sync for Patch {}

impl Drop for Patch {
    fn drop(&mut self) {
        if let Some(f) = self.desc.drop_user_data {
            let ud = self.desc.user_data;
            // SAFETY: the plugin's own cleanup for its own pointer, called once.
            let _ = std::panic::catch_unwind(|| unsafe { f(ud) });
        }
    }
}

impl Patch {
    /// `'NAME' from plugin 'PLUGIN'`, for messages.
    pub fn label(&self) -> String {
        format!(
            "patch '{}' from plugin '{}'",
            self.name.to_string_lossy(),
            self.plugin.to_string_lossy()
        )
    }

    fn is_whole_call(&self) -> bool {
        self.desc.stack == WHOLE_CALL
    }

    /// The inclusive block range `(stack, first, last)` the patch covers, `None` for the whole
    /// model.
    fn range(&self, stacks: &[StackInfo]) -> Option<(usize, u32, u32)> {
        let s = usize::try_from(self.desc.stack).ok()?;
        let n = stacks.get(s).map_or(0, |st| st.n_blocks);
        let last = if self.desc.last < 0 {
            n.saturating_sub(1)
        } else {
            self.desc.last as u32
        };
        Some((s, self.desc.first.max(0) as u32, last))
    }
}

/// Whether two ranges (`None` = the whole model) share a block.
fn overlap(a: Option<(usize, u32, u32)>, b: Option<(usize, u32, u32)>) -> bool {
    match (a, b) {
        (Some((sa, fa, la)), Some((sb, fb, lb))) => sa == sb && fa <= lb && fb <= la,
        _ => true,
    }
}

/// Whether one range holds the other.
fn nested(a: Option<(usize, u32, u32)>, b: Option<(usize, u32, u32)>) -> bool {
    match (a, b) {
        (None, _) | (_, None) => true,
        (Some((_, fa, la)), Some((_, fb, lb))) => (fa <= fb && lb <= la) || (fb <= fa && la <= lb),
    }
}

struct StackInfo {
    name: String,
    n_blocks: u32,
}

struct LinearInfo {
    name: String,
    out_features: i64,
    in_features: i64,
}

/// What composition needs of a denoiser's self-description.
struct DenoiserInfo {
    capabilities: u64,
    n_streams: usize,
    stacks: Vec<StackInfo>,
    linears: Vec<LinearInfo>,
}

/// # Safety
/// `s` must be NULL or NUL-terminated.
unsafe fn owned(s: *const c_char) -> String {
    // SAFETY: per the contract.
    unsafe { text(s) }.unwrap_or("").to_string()
}

/// # Safety
/// `ptr` must be NULL or point at `n` items.
unsafe fn items<'a, T>(ptr: *const T, n: usize) -> &'a [T] {
    if ptr.is_null() || n == 0 {
        &[]
    } else {
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts(ptr, n) }
    }
}

/// The denoiser table of a Model, checked.
fn denoiser_api(o: &Object) -> Result<&DfDenoiserApi, String> {
    if o.interface != DF_INTERFACE_DENOISER || o.api.is_null() {
        return Err(format!("the model ({}) is not a denoiser", o.tag));
    }
    // SAFETY: `value_model` checked that the table is at least a `DfDenoiserApi`.
    Ok(unsafe { &*(o.api as *const DfDenoiserApi) })
}

fn read_denoiser(o: &Object) -> Result<DenoiserInfo, String> {
    let api = denoiser_api(o)?;
    let describe = api
        .describe
        .ok_or_else(|| format!("the denoiser ({}) does not describe itself", o.tag))?;
    // SAFETY: the plugin's own function on its own object.
    let d = unsafe { describe(o.ptr) };
    // SAFETY: NULL or a description owned by the object.
    let Some(d) = (unsafe { d.as_ref() }) else {
        return Err(format!("the denoiser ({}) gave no description", o.tag));
    };
    // SAFETY: the arrays and strings of a live description.
    unsafe {
        Ok(DenoiserInfo {
            capabilities: d.capabilities,
            n_streams: if d.streams.is_null() { 0 } else { d.n_streams },
            stacks: items(d.stacks, d.n_stacks)
                .iter()
                .map(|s| StackInfo {
                    name: owned(s.name),
                    n_blocks: s.n_blocks,
                })
                .collect(),
            linears: items(d.linears, d.n_linears)
                .iter()
                .map(|l| LinearInfo {
                    name: owned(l.name),
                    out_features: l.out_features,
                    in_features: l.in_features,
                })
                .collect(),
        })
    }
}

const CAP_NAMES: [(u64, &str); 8] = [
    (DF_CAP_LINEAR_DELTA, "linear deltas"),
    (DF_CAP_LINEAR_MERGE, "merged linear deltas"),
    (DF_CAP_BLOCK_RESIDUAL, "block residuals"),
    (DF_CAP_RANGE_OVERRIDE, "block-range overrides"),
    (DF_CAP_ATTENTION_EDIT, "attention edits"),
    (DF_CAP_ATTENTION_MASK, "attention masks"),
    (DF_CAP_ATTENTION_EXTRA, "extra attention branches"),
    (DF_CAP_BLOCK_STEPPING, "block stepping"),
];

fn cap_names(caps: u64) -> String {
    let names: Vec<&str> = CAP_NAMES
        .iter()
        .filter(|(c, _)| caps & c != 0)
        .map(|(_, n)| *n)
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// The shape of a tensor value, if it is one.
fn shape_of(v: &Value) -> Option<&[usize]> {
    match v {
        Value::Tensor(_, t) => Some(t.shape()),
        _ => None,
    }
}

/// Checks that `patch` can join `current`'s patches on a denoiser described by `info`.
fn check_composition(
    tag: &str,
    info: &DenoiserInfo,
    current: &[Arc<Patch>],
    patch: &Patch,
) -> Result<(), String> {
    let d = &patch.desc;
    let label = patch.label();
    let mut needed = d.required_capabilities;
    if d.n_linear_deltas > 0 {
        needed |= DF_CAP_LINEAR_DELTA;
    }
    if d.block_residual.is_some() {
        needed |= DF_CAP_BLOCK_RESIDUAL;
    }
    if d.range_override.is_some() && !patch.is_whole_call() {
        needed |= DF_CAP_RANGE_OVERRIDE;
    }
    if d.attention_edit.is_some() {
        needed |= DF_CAP_ATTENTION_EDIT;
    }
    if d.attention_mask.is_some() {
        needed |= DF_CAP_ATTENTION_MASK;
    }
    if d.attention_extra.is_some() {
        needed |= DF_CAP_ATTENTION_EXTRA;
    }
    let missing = needed & !info.capabilities;
    if missing != 0 {
        return Err(format!(
            "{label} needs {} but the model ({tag}) offers {}",
            cap_names(missing),
            cap_names(info.capabilities)
        ));
    }
    if d.bridge.is_some() && info.n_streams < 2 {
        return Err(format!(
            "{label} bridges two streams, but the model ({tag}) has {} (a bridge between two \
             separately loaded towers steps them block by block instead)",
            info.n_streams
        ));
    }
    if d.block_residual.is_some() && patch.is_whole_call() {
        return Err(format!("{label}: a block residual must name a stack"));
    }
    if !patch.is_whole_call() && (d.block_residual.is_some() || d.range_override.is_some()) {
        let stacks: Vec<String> = info
            .stacks
            .iter()
            .map(|s| format!("{} ({} blocks)", s.name, s.n_blocks))
            .collect();
        let Some(stack) = usize::try_from(d.stack)
            .ok()
            .and_then(|s| info.stacks.get(s))
        else {
            return Err(format!(
                "{label} names stack {} but the model ({tag}) has {}",
                d.stack,
                stacks.join(", ")
            ));
        };
        let last = if d.last < 0 {
            i64::from(stack.n_blocks) - 1
        } else {
            i64::from(d.last)
        };
        if d.first < 0 || i64::from(d.first) > last || last >= i64::from(stack.n_blocks) {
            return Err(format!(
                "{label} covers blocks {}..={} of stack '{}', which has {} blocks",
                d.first, last, stack.name, stack.n_blocks
            ));
        }
    }
    // SAFETY: the host's own copies.
    for delta in unsafe { items(d.linear_deltas, d.n_linear_deltas) } {
        // SAFETY: owned by the patch.
        let target = unsafe { text(delta.target) }.unwrap_or("");
        let Some(layer) = info.linears.iter().find(|l| l.name == target) else {
            let names = info.linears.iter().map(|l| l.name.as_str());
            return Err(format!(
                "{label}: '{target}' matches no linear layer of the model ({tag}){}",
                crate::graph::diag::did_you_mean(target, names)
            ));
        };
        // SAFETY: values retained by the patch.
        let (down, up) = unsafe { (borrow(delta.down), borrow(delta.up)) };
        let (Some(down), Some(up)) = (down.and_then(shape_of), up.and_then(shape_of)) else {
            return Err(format!(
                "{label}: the delta for '{target}' is not two tensors"
            ));
        };
        let (o, i) = (layer.out_features as usize, layer.in_features as usize);
        if down.len() != 2 || up.len() != 2 || down[0] != up[1] {
            return Err(format!(
                "{label}: the delta for '{target}' has down {down:?} and up {up:?}: their ranks do not match"
            ));
        }
        if down[1] != i || up[0] != o {
            return Err(format!(
                "{label}: the delta for '{target}' maps {} to {} features, but the layer maps {i} to {o}",
                down[1], up[0]
            ));
        }
    }
    let range = patch.range(&info.stacks);
    for other in current {
        let other_range = other.range(&info.stacks);
        let both = || format!("{label} and {}", other.label());
        if d.range_override.is_some()
            && other.desc.range_override.is_some()
            && overlap(range, other_range)
            && !nested(range, other_range)
        {
            return Err(format!(
                "{} override block ranges that overlap without one holding the other",
                both()
            ));
        }
        let skips =
            |p: &DfPatchDesc| p.range_override.is_some() && p.flags & DF_PATCH_SKIPS_BLOCKS != 0;
        let fresh = |p: &DfPatchDesc| p.flags & DF_PATCH_NEEDS_FRESH != 0;
        if ((skips(d) && fresh(&other.desc)) || (fresh(d) && skips(&other.desc)))
            && overlap(range, other_range)
        {
            return Err(format!(
                "{}: one may skip blocks whose injections the other needs computed at every step",
                both()
            ));
        }
    }
    Ok(())
}

fn mix(h: u64, x: u64) -> u64 {
    let mut h = h ^ x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^ (h >> 29)
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Copies a plugin's patch descriptor into a host-owned [`Patch`].
///
/// # Safety
/// `d` must be a valid descriptor whose strings are NUL-terminated and whose deltas' values are
/// live handles.
unsafe fn own_patch(
    d: &DfPatchDesc,
    plugin: &str,
    keep_alive: Option<Arc<dyn Send + Sync>>,
) -> Patch {
    let cstring = |s: &str| CString::new(s.replace('\0', " ")).unwrap_or_default();
    // SAFETY: per the contract.
    let name = cstring(unsafe { text(d.name) }.unwrap_or("unnamed"));
    let plugin = cstring(plugin);
    let mut targets = Vec::new();
    let mut values = Vec::new();
    let mut deltas = Vec::new();
    // SAFETY: per the contract.
    for delta in unsafe { items(d.linear_deltas, d.n_linear_deltas) } {
        // SAFETY: per the contract.
        targets.push(cstring(unsafe { text(delta.target) }.unwrap_or("")));
        let mut retain = |v: *const DfValue| {
            if v.is_null() {
                return std::ptr::null();
            }
            // SAFETY: a live handle: take one more reference and keep it.
            let arc = unsafe {
                Arc::increment_strong_count(v as *const Value);
                Arc::from_raw(v as *const Value)
            };
            let p = Arc::as_ptr(&arc) as *const DfValue;
            values.push(arc);
            p
        };
        let (down, up) = (retain(delta.down), retain(delta.up));
        deltas.push(DfLinearDelta {
            target: targets.last().map_or(std::ptr::null(), |t| t.as_ptr()),
            down,
            up,
            scale: delta.scale,
        });
    }
    let mut desc = DfPatchDesc {
        size: std::mem::size_of::<DfPatchDesc>() as u32,
        name: name.as_ptr(),
        plugin: plugin.as_ptr(),
        linear_deltas: deltas.as_ptr(),
        n_linear_deltas: deltas.len(),
        digest: if d.digest == 0 {
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        } else {
            d.digest
        },
        ..*d
    };
    desc.reserved = [std::ptr::null(); 7];
    Patch {
        desc,
        name,
        plugin,
        _targets: targets,
        _deltas: deltas,
        values,
        _keep_alive: keep_alive,
    }
}

pub(super) unsafe extern "C" fn value_model(
    ctx: *mut DfContext,
    interface: u32,
    api: *const c_void,
    type_tag: *const c_char,
    object: *mut c_void,
    drop: Option<DfObjectDropFn>,
) -> *mut DfValue {
    // SAFETY: host pointers of the running callback.
    let (keep_alive, weight_bytes) = match unsafe { context(ctx) } {
        Some(c) => (c.keep_alive.clone(), std::mem::take(&mut c.weight_bytes)),
        None => (None, 0),
    };
    // SAFETY: a NUL-terminated tag from the plugin.
    let tag = unsafe { text(type_tag) }.unwrap_or("").to_string();
    // Built first so the plugin's object is released even when the call is refused.
    let mut obj = Object::new(tag, object, drop, keep_alive);
    obj.weight_bytes = weight_bytes;
    let min_size = match interface {
        DF_INTERFACE_DENOISER => std::mem::size_of::<DfDenoiserApi>(),
        DF_INTERFACE_TEXT_ENCODER => std::mem::size_of::<DfTextEncoderApi>(),
        DF_INTERFACE_AUTOENCODER => std::mem::size_of::<DfAutoencoderApi>(),
        other => {
            set_last_error(format!("value_model: unknown interface {other}"));
            return std::ptr::null_mut();
        }
    };
    // SAFETY: every interface table starts with its u32 size.
    if api.is_null() || (unsafe { *(api as *const u32) } as usize) < min_size {
        set_last_error("value_model: the interface table is missing or too small");
        return std::ptr::null_mut();
    }
    if obj.tag.is_empty() || object.is_null() {
        set_last_error("value_model: a model needs a type tag and an object");
        return std::ptr::null_mut();
    }
    obj.interface = interface;
    obj.api = api;
    guard(std::ptr::null_mut(), || {
        into_handle(Value::Object(Arc::new(obj)))
    })
}

/// The Model behind a handle.
///
/// # Safety
/// `v` must be NULL or a live handle.
unsafe fn model<'a>(v: *const DfValue) -> Result<&'a Arc<Object>, String> {
    // SAFETY: per the contract.
    match unsafe { borrow(v) } {
        Some(Value::Object(o)) => Ok(o),
        Some(other) => Err(format!("expected a Model, got a {}", other.type_name())),
        None => Err("expected a Model, got NULL".into()),
    }
}

pub(super) unsafe extern "C" fn model_interface(
    v: *const DfValue,
    interface: u32,
    object: *mut *mut c_void,
) -> *const c_void {
    guard(std::ptr::null(), || {
        // SAFETY: NULL or a live handle.
        match unsafe { model(v) } {
            Ok(o) if o.interface == interface && interface != 0 => {
                if !object.is_null() {
                    // SAFETY: checked for NULL.
                    unsafe { *object = o.ptr };
                }
                o.api
            }
            _ => std::ptr::null(),
        }
    })
}

pub(super) unsafe extern "C" fn model_info(
    v: *const DfValue,
    interface: *mut u32,
    n_patches: *mut usize,
    digest: *mut u64,
) -> i32 {
    guard(DF_ERROR, || {
        // SAFETY: NULL or a live handle.
        let Ok(o) = (unsafe { model(v) }) else {
            return DF_ERROR;
        };
        // SAFETY: each checked for NULL.
        unsafe {
            if !interface.is_null() {
                *interface = o.interface;
            }
            if !n_patches.is_null() {
                *n_patches = o.patches.len();
            }
            if !digest.is_null() {
                *digest = o.digest;
            }
        }
        DF_OK
    })
}

pub(super) unsafe extern "C" fn model_patch(
    ctx: *mut DfContext,
    v: *const DfValue,
    desc: *const DfPatchDesc,
) -> *mut DfValue {
    let run = || -> Result<*mut DfValue, String> {
        // SAFETY: NULL or the running callback's context.
        let (plugin, keep_alive) = match unsafe { context(ctx) } {
            Some(c) => (c.node_type.plugin.name.clone(), c.keep_alive.clone()),
            None => ("(unknown)".to_string(), None),
        };
        // SAFETY: NULL or the plugin's descriptor.
        let d = unsafe { desc.as_ref() }.ok_or("model_patch: no patch")?;
        if (d.size as usize) < std::mem::size_of::<DfPatchDesc>() {
            return Err(format!(
                "model_patch: the patch descriptor is {} bytes, the host needs {}",
                d.size,
                std::mem::size_of::<DfPatchDesc>()
            ));
        }
        // SAFETY: a valid descriptor per the ABI; owned from here on, so its user data is
        // released even if the patch is refused.
        let patch = unsafe { own_patch(d, &plugin, keep_alive) };
        // SAFETY: NULL or a live handle.
        let current = unsafe { model(v) }?;
        let base = current.base.clone().unwrap_or_else(|| current.clone());
        let info = read_denoiser(&base).map_err(|e| format!("{}: {e}", patch.label()))?;
        check_composition(&base.tag, &info, &current.patches, &patch)?;
        let digest = mix(
            mix(current.digest, patch.desc.digest),
            patch
                .name
                .as_bytes()
                .iter()
                .fold(0, |h, &b| mix(h, b as u64)),
        );
        let mut patches = current.patches.clone();
        patches.push(Arc::new(patch));
        // Stable: equal order keys keep their insertion order.
        patches.sort_by_key(|p| p.desc.order);
        let mut obj = Object::new(base.tag.clone(), base.ptr, None, None);
        obj.interface = base.interface;
        obj.api = base.api;
        obj.base = Some(base);
        obj.patches = patches;
        obj.digest = digest;
        Ok(into_handle(Value::Object(Arc::new(obj))))
    };
    match guard(Err("model_patch panicked".to_string()), run) {
        Ok(v) => v,
        Err(e) => {
            set_last_error(e);
            std::ptr::null_mut()
        }
    }
}

/// The state behind a host-made [`DfContinuation`]: the rest of the onion.
struct WholeCall<'a> {
    run: &'a mut dyn FnMut(*const DfValue) -> Result<Arc<Value>, String>,
    /// The error of the inner call, kept so the override's failure reports it unchanged.
    inner_error: Option<String>,
}

unsafe extern "C" fn whole_call_continuation(
    state: *mut c_void,
    hidden: *const DfValue,
    _from: u32,
    _to: u32,
    out: *mut *mut DfValue,
) -> i32 {
    // SAFETY: `state` is the `WholeCall` of the running override.
    let Some(state) = (unsafe { (state as *mut WholeCall).as_mut() }) else {
        return DF_ERROR;
    };
    let result = guard(Err("the continuation panicked".to_string()), || {
        (state.run)(hidden)
    });
    match result {
        Ok(v) if !out.is_null() => {
            // SAFETY: checked for NULL; one reference to the caller.
            unsafe { *out = Arc::into_raw(v) as *mut DfValue };
            DF_OK
        }
        Ok(_) => DF_ERROR,
        Err(e) => {
            set_last_error(e.clone());
            state.inner_error = Some(e);
            DF_ERROR
        }
    }
}

/// Runs the base forward of `o` under its whole-call overrides `wrappers` (outermost first).
fn run_denoiser(
    o: &Object,
    wrappers: &[&Arc<Patch>],
    call: *const DfCallContext,
    inputs: &[DfNamedValue],
    hidden: *const DfValue,
) -> Result<Arc<Value>, String> {
    let Some((outer, rest)) = wrappers.split_first() else {
        let api = denoiser_api(o)?;
        let forward = api
            .forward
            .ok_or_else(|| format!("the denoiser ({}) has no forward", o.tag))?;
        let named: Vec<DfNamedValue> = inputs
            .iter()
            .map(|n| {
                // SAFETY: names are NUL-terminated strings of the caller.
                if unsafe { text(n.name) } == Some("hidden_states") {
                    DfNamedValue {
                        name: n.name,
                        value: hidden,
                    }
                } else {
                    *n
                }
            })
            .collect();
        // Under half-precision GPU activations the blocks' inputs go in narrowed.
        let narrowed = super::half_activations::narrow(&named)?;
        let named = narrowed.as_ref().map_or(&named[..], |n| &n.named[..]);
        // Every patch: a whole-call override's stack (-1) matches no stack of the model, so the
        // model runs only its other hooks (linear deltas, lifecycle).
        let hooks: Vec<*const DfPatchDesc> = o
            .patches
            .iter()
            .map(|p| &p.desc as *const DfPatchDesc)
            .collect();
        let mut out: *mut DfValue = std::ptr::null_mut();
        // SAFETY: the plugin's forward on its own object, with live borrowed arguments.
        let rc = unsafe {
            forward(
                o.ptr,
                host_api(),
                call,
                named.as_ptr(),
                named.len(),
                hooks.as_ptr(),
                hooks.len(),
                &mut out,
            )
        };
        // SAFETY: an owned handle from the plugin, or NULL.
        let out = unsafe { take_handle(out) };
        return match (rc, out) {
            (DF_OK, Some(v)) if narrowed.is_some() => super::half_activations::widen(v),
            (DF_OK, Some(v)) => Ok(v),
            (DF_OK, None) => Err(format!("the denoiser ({}) returned no prediction", o.tag)),
            _ => Err(take_last_error()),
        };
    };
    let hook = outer.desc.range_override.ok_or("not a range override")?;
    let mut inner = |h: *const DfValue| run_denoiser(o, rest, call, inputs, h);
    let mut state = WholeCall {
        run: &mut inner,
        inner_error: None,
    };
    let cont = DfContinuation {
        state: &mut state as *mut WholeCall as *mut c_void,
        run: Some(whole_call_continuation),
    };
    let mut out: *mut DfValue = std::ptr::null_mut();
    // SAFETY: the patch's hook with its own user data; `cont` outlives the call.
    let rc = unsafe {
        hook(
            outer.desc.user_data,
            host_api(),
            call,
            u32::MAX,
            0,
            0,
            hidden,
            &cont,
            &mut out,
        )
    };
    // SAFETY: an owned handle from the plugin, or NULL.
    let out = unsafe { take_handle(out) };
    match (rc, out) {
        (DF_OK, Some(v)) => Ok(v),
        (DF_OK, None) => Err(format!("{} returned no prediction", outer.label())),
        _ => Err(state.inner_error.take().unwrap_or_else(|| {
            format!(
                "{} failed in its range override: {}",
                outer.label(),
                take_last_error()
            )
        })),
    }
}

/// Hands the call's named inputs to every patch of `o` with a `call_inputs` hook, in order.
fn patch_call_inputs(
    o: &Object,
    call: *const DfCallContext,
    inputs: *const DfNamedValue,
    n_inputs: usize,
) -> Result<(), String> {
    for p in &o.patches {
        if let Some(f) = p.desc.call_inputs {
            // SAFETY: the patch's hook with its own user data and the caller's live inputs.
            if unsafe { f(p.desc.user_data, host_api(), call, inputs, n_inputs) } != DF_OK {
                return Err(format!(
                    "{} failed on the call's inputs: {}",
                    p.label(),
                    take_last_error()
                ));
            }
        }
    }
    Ok(())
}

pub(super) unsafe extern "C" fn denoiser_forward(
    v: *const DfValue,
    call: *const DfCallContext,
    inputs: *const DfNamedValue,
    n_inputs: usize,
    out: *mut *mut DfValue,
) -> i32 {
    let run = || -> Result<Arc<Value>, String> {
        // SAFETY: NULL or a live handle.
        let o = unsafe { model(v) }?;
        if call.is_null() || out.is_null() {
            return Err("denoiser_forward: no call context or no output".into());
        }
        patch_call_inputs(o, call, inputs, n_inputs)?;
        // SAFETY: the caller's `n_inputs` named values.
        let inputs = unsafe { items(inputs, n_inputs) };
        let hidden = inputs
            .iter()
            // SAFETY: the caller's NUL-terminated names.
            .find(|n| unsafe { text(n.name) } == Some("hidden_states"))
            .map_or(std::ptr::null(), |n| n.value);
        let wrappers: Vec<&Arc<Patch>> = o
            .patches
            .iter()
            .filter(|p| p.is_whole_call() && p.desc.range_override.is_some())
            .collect();
        run_denoiser(o, &wrappers, call, inputs, hidden)
    };
    match guard(Err("denoiser_forward panicked".to_string()), run) {
        Ok(value) => {
            // SAFETY: checked for NULL above; one reference to the caller.
            unsafe { *out = Arc::into_raw(value) as *mut DfValue };
            DF_OK
        }
        Err(e) => {
            set_last_error(e);
            DF_ERROR
        }
    }
}

/// The patch descriptors a stepped denoiser runs with, or an error when a whole-call override
/// wraps it (a stepped model has no whole call to wrap).
fn stepping_patches(o: &Object) -> Result<Vec<*const DfPatchDesc>, String> {
    if let Some(p) = o
        .patches
        .iter()
        .find(|p| p.is_whole_call() && p.desc.range_override.is_some())
    {
        return Err(format!(
            "{} wraps the whole denoiser call, so the model cannot be stepped block by block",
            p.label()
        ));
    }
    Ok(o.patches
        .iter()
        .map(|p| &p.desc as *const DfPatchDesc)
        .collect())
}

/// Runs one block-stepping phase `f` of a denoiser with its patches and hands back its output.
fn step(
    what: &str,
    v: *const DfValue,
    out: *mut *mut DfValue,
    f: impl FnOnce(&Object, &DfDenoiserApi, &[*const DfPatchDesc], &mut *mut DfValue) -> Option<i32>,
) -> i32 {
    let run = || -> Result<Arc<Value>, String> {
        // SAFETY: NULL or a live handle.
        let o = unsafe { model(v) }?;
        if out.is_null() {
            return Err(format!("{what}: no output slot"));
        }
        let api = denoiser_api(o)?;
        let patches = stepping_patches(o)?;
        let mut result: *mut DfValue = std::ptr::null_mut();
        let rc = f(o, api, &patches, &mut result).ok_or_else(|| {
            format!(
                "the denoiser ({}) does not step block by block (no {what})",
                o.tag
            )
        })?;
        // SAFETY: an owned handle from the plugin, or NULL.
        match (rc, unsafe { take_handle(result) }) {
            (DF_OK, Some(v)) if what == "finish" => super::half_activations::widen(v),
            (DF_OK, Some(v)) => Ok(v),
            (DF_OK, None) => Err(format!(
                "the denoiser ({}) returned nothing from {what}",
                o.tag
            )),
            _ => Err(take_last_error()),
        }
    };
    match guard(Err(format!("{what} panicked")), run) {
        Ok(value) => {
            // SAFETY: checked for NULL above; one reference to the caller.
            unsafe { *out = Arc::into_raw(value) as *mut DfValue };
            DF_OK
        }
        Err(e) => {
            set_last_error(e);
            DF_ERROR
        }
    }
}

pub(super) unsafe extern "C" fn denoiser_prepare(
    v: *const DfValue,
    call: *const DfCallContext,
    inputs: *const DfNamedValue,
    n_inputs: usize,
    state: *mut *mut DfValue,
) -> i32 {
    step("prepare", v, state, |o, api, patches, out| {
        let f = api.prepare?;
        if let Err(e) = patch_call_inputs(o, call, inputs, n_inputs) {
            set_last_error(e);
            return Some(DF_ERROR);
        }
        // Under half-precision GPU activations the blocks' inputs go in narrowed (and
        // `finish` widens the prediction).
        // SAFETY: the caller's `n_inputs` named values.
        let narrowed = match super::half_activations::narrow(unsafe { items(inputs, n_inputs) }) {
            Ok(n) => n,
            Err(e) => {
                set_last_error(e);
                return Some(DF_ERROR);
            }
        };
        let (inputs, n_inputs) = narrowed
            .as_ref()
            .map_or((inputs, n_inputs), |n| (n.named.as_ptr(), n.named.len()));
        // SAFETY: the plugin's function on its own object with live borrowed arguments.
        Some(unsafe {
            f(
                o.ptr,
                host_api(),
                call,
                inputs,
                n_inputs,
                patches.as_ptr(),
                patches.len(),
                out,
            )
        })
    })
}

pub(super) unsafe extern "C" fn denoiser_run_blocks(
    v: *const DfValue,
    call: *const DfCallContext,
    state: *const DfValue,
    stack: u32,
    from: u32,
    to: u32,
    out: *mut *mut DfValue,
) -> i32 {
    step("run_blocks", v, out, |o, api, patches, out| {
        let f = api.run_blocks?;
        // SAFETY: as above.
        Some(unsafe {
            f(
                o.ptr,
                host_api(),
                call,
                state,
                stack,
                from,
                to,
                patches.as_ptr(),
                patches.len(),
                out,
            )
        })
    })
}

pub(super) unsafe extern "C" fn denoiser_run_block_part(
    v: *const DfValue,
    call: *const DfCallContext,
    state: *const DfValue,
    stack: u32,
    block: u32,
    part: u32,
    out: *mut *mut DfValue,
) -> i32 {
    step("run_block_part", v, out, |o, api, patches, out| {
        // NULL in a plugin built before ABI 1.6 (a reserved slot then).
        let f = api.run_block_part?;
        // SAFETY: as above.
        Some(unsafe {
            f(
                o.ptr,
                host_api(),
                call,
                state,
                stack,
                block,
                part,
                patches.as_ptr(),
                patches.len(),
                out,
            )
        })
    })
}

pub(super) unsafe extern "C" fn denoiser_finish(
    v: *const DfValue,
    call: *const DfCallContext,
    state: *const DfValue,
    out: *mut *mut DfValue,
) -> i32 {
    step("finish", v, out, |o, api, patches, out| {
        let f = api.finish?;
        // SAFETY: as above.
        Some(unsafe {
            f(
                o.ptr,
                host_api(),
                call,
                state,
                patches.as_ptr(),
                patches.len(),
                out,
            )
        })
    })
}

pub(super) unsafe extern "C" fn model_patch_memory(v: *const DfValue) -> u64 {
    let run = || -> Result<u64, String> {
        // SAFETY: NULL or a live handle.
        let o = unsafe { model(v) }?;
        let base = o.base.as_ref().unwrap_or(o);
        let desc = denoiser_api(base)
            .ok()
            .and_then(|api| api.describe)
            // SAFETY: the plugin's own function on its own object.
            .map_or(std::ptr::null(), |d| unsafe { d(base.ptr) });
        let mut total = 0u64;
        for p in &o.patches {
            for v in &p.values {
                if let Value::Tensor(_, t) = &**v {
                    total += t.nbytes() as u64;
                }
            }
            if let Some(f) = p.desc.memory_estimate {
                // SAFETY: the patch's hook with its own user data.
                total += unsafe { f(p.desc.user_data, desc) };
            }
        }
        Ok(total)
    };
    guard(Ok(0), run).unwrap_or(0)
}

pub(super) unsafe extern "C" fn denoiser_lifecycle(
    v: *const DfValue,
    event: i32,
    call: *const DfCallContext,
) -> i32 {
    let run = || -> Result<(), String> {
        // SAFETY: NULL or a live handle.
        let o = unsafe { model(v) }?;
        for p in &o.patches {
            if let Some(f) = p.desc.lifecycle {
                // SAFETY: the patch's hook with its own user data.
                if unsafe { f(p.desc.user_data, host_api(), event, call) } != DF_OK {
                    return Err(format!(
                        "{} failed in its lifecycle hook: {}",
                        p.label(),
                        take_last_error()
                    ));
                }
            }
        }
        Ok(())
    };
    match guard(Err("denoiser_lifecycle panicked".to_string()), run) {
        Ok(()) => DF_OK,
        Err(e) => {
            set_last_error(e);
            DF_ERROR
        }
    }
}

/// A List of one `[name, tensor]` pair.
fn named_list(name: &str, value: Arc<Value>) -> Value {
    Value::List(Arc::from(vec![Arc::new(Value::List(Arc::from(vec![
        Arc::new(Value::string(name)),
        value,
    ])))]))
}

pub(super) unsafe extern "C" fn model_forward(
    v: *const DfValue,
    inputs: *const DfNamedValue,
    n_inputs: usize,
    out: *mut *mut DfValue,
) -> i32 {
    let run = || -> Result<*mut DfValue, String> {
        // SAFETY: NULL or a live handle.
        let o = unsafe { model(v) }?;
        if out.is_null() {
            return Err("model_forward: no output".into());
        }
        // SAFETY: the caller's `n_inputs` named values.
        let named = unsafe { items(inputs, n_inputs) };
        let find = |name: &str| {
            named
                .iter()
                // SAFETY: NUL-terminated names.
                .find(|n| unsafe { text(n.name) } == Some(name))
                // SAFETY: live borrowed handles.
                .and_then(|n| unsafe { borrow(n.value) })
        };
        let forward = match o.interface {
            DF_INTERFACE_DENOISER => {
                let batch = find("hidden_states")
                    .and_then(shape_of)
                    .and_then(|s| s.first().copied())
                    .ok_or("a denoiser's forward needs 'hidden_states'")?;
                let timestep = match find("timestep") {
                    Some(Value::Tensor(_, t)) => t
                        .to_f32_vec()
                        .map_err(|e| e.to_string())?
                        .first()
                        .map_or(0.0, |&x| f64::from(x)),
                    _ => 0.0,
                };
                let branches = vec![DF_BRANCH_COND; batch];
                let cond_ids = vec![0i64; batch];
                let call = DfCallContext {
                    size: std::mem::size_of::<DfCallContext>() as u32,
                    step_index: 0,
                    num_steps: 1,
                    _pad: 0,
                    run_id: 0,
                    sigma: 0.0,
                    timestep,
                    batch,
                    branches: branches.as_ptr(),
                    cond_ids: cond_ids.as_ptr(),
                    reserved: [std::ptr::null(); 4],
                };
                let mut pred: *mut DfValue = std::ptr::null_mut();
                // SAFETY: live arguments for the duration of the call.
                let rc = unsafe { denoiser_forward(v, &call, inputs, n_inputs, &mut pred) };
                // SAFETY: an owned handle, or NULL.
                return match (rc, unsafe { take_handle(pred) }) {
                    (DF_OK, Some(p)) => Ok(into_handle(named_list("sample", p))),
                    _ => Err(take_last_error()),
                };
            }
            // SAFETY: `value_model` checked the table's size for its interface.
            DF_INTERFACE_TEXT_ENCODER => unsafe { (*(o.api as *const DfTextEncoderApi)).forward },
            // SAFETY: as above.
            DF_INTERFACE_AUTOENCODER => unsafe { (*(o.api as *const DfAutoencoderApi)).forward },
            _ => return Err(format!("the model ({}) has no interface", o.tag)),
        };
        let forward = forward.ok_or_else(|| format!("the model ({}) has no forward", o.tag))?;
        let mut list: *mut DfValue = std::ptr::null_mut();
        // SAFETY: the plugin's function on its own object with live borrowed arguments.
        let rc = unsafe { forward(o.ptr, host_api(), inputs, n_inputs, &mut list) };
        // SAFETY: an owned handle, or NULL.
        match (rc, unsafe { take_handle(list) }) {
            (DF_OK, Some(l)) => Ok(Arc::into_raw(l) as *mut DfValue),
            (DF_OK, None) => Err(format!("the model ({}) returned nothing", o.tag)),
            _ => Err(take_last_error()),
        }
    };
    match guard(Err("model_forward panicked".to_string()), run) {
        Ok(list) => {
            // SAFETY: checked for NULL above.
            unsafe { *out = list };
            DF_OK
        }
        Err(e) => {
            set_last_error(e);
            DF_ERROR
        }
    }
}

pub(super) unsafe extern "C" fn new_run_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_overlap_and_nest() {
        let r = |f, l| Some((0usize, f, l));
        assert!(overlap(r(0, 3), r(3, 5)));
        assert!(!overlap(r(0, 2), r(3, 5)));
        assert!(!overlap(Some((1, 0, 9)), r(0, 9)));
        assert!(overlap(None, r(4, 4)));
        assert!(nested(r(0, 9), r(2, 3)));
        assert!(nested(r(2, 3), r(0, 9)));
        assert!(!nested(r(0, 4), r(3, 6)));
        assert!(nested(None, r(3, 6)));
    }
}
