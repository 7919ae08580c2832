//! The model protocol in the safe SDK (ABI 1.3).
//!
//! - A plugin that *implements* a denoiser implements [`Denoiser`] and wraps it with
//!   [`Context::make_denoiser`]. Its forward receives the per-call [`Call`], its named
//!   [`Inputs`], and the model's patches as [`Hooks`], which it runs at its sites:
//!   [`Hooks::run_stack`] around each stack of blocks (range overrides and block residuals).
//! - A plugin that *drives* a denoiser (a sampler) gets a [`DenoiserRef`] from any Model value
//!   with [`Value::as_denoiser`], whichever plugin made it, and calls [`DenoiserRef::forward`].
//! - A plugin that *patches* a model describes the patch in a [`PatchSpec`], implements
//!   [`PatchHooks`] for the hooks it sets, and calls [`Context::patch_model`]: the result is a new
//!   Model over the same weights.
//!
//! Every trampoline catches panics; a hook's error or panic becomes the calling node's error,
//! naming the patch and its plugin.

use crate::abi::*;
use crate::value::{host, set_host, Object, Value};
use crate::{Context, Error, Kind, Result, Tensor};
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What a denoiser predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prediction {
    /// Not known to the model (its scheduler config says).
    #[default]
    Unknown,
    Epsilon,
    V,
    /// Flow-matching velocity, noise − data.
    Flow,
}

impl Prediction {
    fn raw(self) -> i32 {
        match self {
            Prediction::Unknown => 0,
            Prediction::Epsilon => DF_PREDICTION_EPSILON,
            Prediction::V => DF_PREDICTION_V,
            Prediction::Flow => DF_PREDICTION_FLOW,
        }
    }

    fn from_raw(raw: i32) -> Prediction {
        match raw {
            DF_PREDICTION_EPSILON => Prediction::Epsilon,
            DF_PREDICTION_V => Prediction::V,
            DF_PREDICTION_FLOW => Prediction::Flow,
            _ => Prediction::Unknown,
        }
    }
}

/// One stream of hidden states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub name: String,
    pub width: usize,
}

/// One stack of blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackInfo {
    pub name: String,
    pub streams: Vec<String>,
    pub n_blocks: usize,
    /// `DF_SITE_*` mask.
    pub sites: u32,
}

/// One linear layer by native name; `fused_into` is `(fused layer, first row)` for an alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearInfo {
    pub name: String,
    pub out_features: usize,
    pub in_features: usize,
    pub fused_into: Option<(String, usize)>,
}

/// A denoiser's self-description.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DenoiserInfo {
    pub prediction: Prediction,
    /// E.g. `BCHW`.
    pub latent_layout: String,
    pub latent_channels: usize,
    pub patch_size: usize,
    pub streams: Vec<StreamInfo>,
    pub stacks: Vec<StackInfo>,
    pub linears: Vec<LinearInfo>,
    /// `DF_CAP_*`.
    pub capabilities: u64,
    /// The conditioning arguments its forward reads.
    pub conditioning: Vec<String>,
}

impl DenoiserInfo {
    /// Whether the forward reads conditioning argument `name`.
    pub fn reads(&self, name: &str) -> bool {
        self.conditioning.iter().any(|c| c == name)
    }
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

/// # Safety
/// NULL or NUL-terminated.
pub(crate) unsafe fn string(s: *const c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    // SAFETY: per the contract.
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

/// # Safety
/// NULL or `n` items.
unsafe fn items<'a, T>(p: *const T, n: usize) -> &'a [T] {
    if p.is_null() || n == 0 {
        &[]
    } else {
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts(p, n) }
    }
}

/// A [`DenoiserInfo`] in its C form, with the strings and arrays it points at.
struct CDesc {
    desc: DfDenoiserDesc,
    _strings: Vec<CString>,
    _streams: Vec<DfStreamDesc>,
    _stacks: Vec<DfStackDesc>,
    _linears: Vec<DfLinearDesc>,
}

impl CDesc {
    fn new(info: &DenoiserInfo) -> CDesc {
        let mut strings = Vec::new();
        let mut keep = |s: &str| {
            let c = cstring(s);
            let p = c.as_ptr();
            strings.push(c);
            p
        };
        let streams: Vec<DfStreamDesc> = info
            .streams
            .iter()
            .map(|s| DfStreamDesc {
                name: keep(&s.name),
                width: s.width as i64,
            })
            .collect();
        let stacks: Vec<DfStackDesc> = info
            .stacks
            .iter()
            .map(|s| DfStackDesc {
                name: keep(&s.name),
                streams: keep(&s.streams.join(",")),
                n_blocks: s.n_blocks as u32,
                sites: s.sites,
            })
            .collect();
        let linears: Vec<DfLinearDesc> = info
            .linears
            .iter()
            .map(|l| DfLinearDesc {
                name: keep(&l.name),
                out_features: l.out_features as i64,
                in_features: l.in_features as i64,
                fused_into: l
                    .fused_into
                    .as_ref()
                    .map_or(std::ptr::null(), |(f, _)| keep(f)),
                row_offset: l.fused_into.as_ref().map_or(0, |(_, r)| *r as i64),
            })
            .collect();
        let desc = DfDenoiserDesc {
            size: std::mem::size_of::<DfDenoiserDesc>() as u32,
            prediction: info.prediction.raw(),
            latent_layout: keep(&info.latent_layout),
            latent_channels: info.latent_channels as i64,
            patch_size: info.patch_size as i64,
            streams: streams.as_ptr(),
            n_streams: streams.len(),
            stacks: stacks.as_ptr(),
            n_stacks: stacks.len(),
            linears: linears.as_ptr(),
            n_linears: linears.len(),
            capabilities: info.capabilities,
            conditioning: keep(&info.conditioning.join(",")),
            reserved: [std::ptr::null(); 4],
        };
        CDesc {
            desc,
            _strings: strings,
            _streams: streams,
            _stacks: stacks,
            _linears: linears,
        }
    }
}

fn split_list(s: String) -> Vec<String> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

/// # Safety
/// `d` must be a live description.
unsafe fn read_desc(d: &DfDenoiserDesc) -> DenoiserInfo {
    // SAFETY: the arrays and strings of a live description.
    unsafe {
        DenoiserInfo {
            prediction: Prediction::from_raw(d.prediction),
            latent_layout: string(d.latent_layout),
            latent_channels: d.latent_channels.max(0) as usize,
            patch_size: d.patch_size.max(1) as usize,
            streams: items(d.streams, d.n_streams)
                .iter()
                .map(|s| StreamInfo {
                    name: string(s.name),
                    width: s.width.max(0) as usize,
                })
                .collect(),
            stacks: items(d.stacks, d.n_stacks)
                .iter()
                .map(|s| StackInfo {
                    name: string(s.name),
                    streams: split_list(string(s.streams)),
                    n_blocks: s.n_blocks as usize,
                    sites: s.sites,
                })
                .collect(),
            linears: items(d.linears, d.n_linears)
                .iter()
                .map(|l| LinearInfo {
                    name: string(l.name),
                    out_features: l.out_features.max(0) as usize,
                    in_features: l.in_features.max(0) as usize,
                    fused_into: (!l.fused_into.is_null())
                        .then(|| (string(l.fused_into), l.row_offset.max(0) as usize)),
                })
                .collect(),
            capabilities: d.capabilities,
            conditioning: split_list(string(d.conditioning)),
        }
    }
}

/// Guidance branch of a batch row.
pub const BRANCH_COND: i32 = DF_BRANCH_COND;
pub const BRANCH_UNCOND: i32 = DF_BRANCH_UNCOND;
pub const BRANCH_SKIP_LAYERS: i32 = DF_BRANCH_SKIP_LAYERS;

/// The per-call context: which step of how many, the noise level, and each batch row's guidance
/// branch and conditioning id.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// Unique per sampling run ([`new_run_id`]); 0 for a lone forward.
    pub run_id: u64,
    pub step_index: usize,
    pub num_steps: usize,
    pub sigma: f64,
    pub timestep: f64,
    pub branches: Vec<i32>,
    pub cond_ids: Vec<i64>,
}

impl Call {
    /// A lone forward of `batch` conditional rows at `timestep`.
    pub fn single(batch: usize, timestep: f64) -> Call {
        Call {
            run_id: 0,
            step_index: 0,
            num_steps: 1,
            sigma: 0.0,
            timestep,
            branches: vec![BRANCH_COND; batch],
            cond_ids: vec![0; batch],
        }
    }

    /// The fraction of the run done before this step, in `[0, 1)`.
    pub fn fraction(&self) -> f64 {
        self.step_index as f64 / self.num_steps.max(1) as f64
    }

    /// The rows' branches as a mask of `1 << branch` (for per-branch state).
    pub fn branch_mask(&self) -> u32 {
        self.branches
            .iter()
            .fold(0, |m, &b| m | 1u32.checked_shl(b as u32).unwrap_or(0))
    }

    fn raw(&self) -> DfCallContext {
        DfCallContext {
            size: std::mem::size_of::<DfCallContext>() as u32,
            step_index: self.step_index as u32,
            num_steps: self.num_steps as u32,
            _pad: 0,
            run_id: self.run_id,
            sigma: self.sigma,
            timestep: self.timestep,
            batch: self.branches.len().min(self.cond_ids.len()),
            branches: self.branches.as_ptr(),
            cond_ids: self.cond_ids.as_ptr(),
            reserved: [std::ptr::null(); 4],
        }
    }

    /// # Safety
    /// `c` must be NULL or a live call context.
    pub(crate) unsafe fn from_raw(c: *const DfCallContext) -> Call {
        // SAFETY: per the contract.
        let Some(c) = (unsafe { c.as_ref() }) else {
            return Call::single(0, 0.0);
        };
        // SAFETY: `batch` entries each.
        let (branches, cond_ids) =
            unsafe { (items(c.branches, c.batch), items(c.cond_ids, c.batch)) };
        Call {
            run_id: c.run_id,
            step_index: c.step_index as usize,
            num_steps: c.num_steps as usize,
            sigma: c.sigma,
            timestep: c.timestep,
            branches: branches.to_vec(),
            cond_ids: cond_ids.to_vec(),
        }
    }
}

/// A run id no other run of this process has.
pub fn new_run_id() -> u64 {
    // SAFETY: a plain host function.
    unsafe { (host().new_run_id)() }
}

/// A forward's named inputs.
pub struct Inputs {
    named: Vec<(String, Tensor)>,
}

impl Inputs {
    pub fn new(named: Vec<(String, Tensor)>) -> Inputs {
        Inputs { named }
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.named.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Every input by name.
    pub fn to_map(&self) -> std::collections::HashMap<String, Tensor> {
        self.named.iter().cloned().collect()
    }

    /// Input `name`, or an error naming it.
    pub fn require(&self, name: &str) -> Result<&Tensor> {
        self.get(name)
            .ok_or_else(|| Error(format!("missing input '{name}'")))
    }

    /// # Safety
    /// `p` must be NULL or `n` named values with live handles.
    pub(crate) unsafe fn from_raw(p: *const DfNamedValue, n: usize) -> Result<Inputs> {
        let mut named = Vec::new();
        // SAFETY: per the contract.
        for nv in unsafe { items(p, n) } {
            // SAFETY: NUL-terminated names.
            let name = unsafe { string(nv.name) };
            if let Some(v) = Value::from_borrowed(nv.value) {
                let t = v
                    .as_tensor()
                    .map_err(|e| Error(format!("input '{name}': {e}")))?;
                named.push((name, t));
            }
        }
        Ok(Inputs { named })
    }
}

/// A denoiser any plugin can drive and patch.
pub trait Denoiser: Object {
    /// The self-description (read once, when the model value is made).
    fn describe(&self) -> DenoiserInfo;

    /// The prediction for `inputs` (`hidden_states` and the conditioning it reads) at `call`,
    /// running `hooks` at its sites.
    fn forward(&self, call: &Call, inputs: &Inputs, hooks: &Hooks) -> Result<Tensor>;

    /// Block stepping (`DF_CAP_BLOCK_STEPPING`, for bridges between separately loaded towers),
    /// 1: the embeddings and conditioning as a state. `forward` must equal `prepare`, then
    /// `run_blocks` over each stack, then `finish`.
    fn prepare(&self, _call: &Call, _inputs: &Inputs, _hooks: &Hooks) -> Result<StepState> {
        Err(Error::new("this denoiser does not step block by block"))
    }

    /// Block stepping, 2: blocks `from..=to` of `stack`.
    fn run_blocks(
        &self,
        _call: &Call,
        _state: StepState,
        _stack: usize,
        _from: usize,
        _to: usize,
        _hooks: &Hooks,
    ) -> Result<StepState> {
        Err(Error::new("this denoiser does not step block by block"))
    }

    /// Block stepping, 3: the head, from the last state to the prediction.
    fn finish(&self, _call: &Call, _state: StepState, _hooks: &Hooks) -> Result<Tensor> {
        Err(Error::new("this denoiser does not step block by block"))
    }

    /// Block stepping by halves (`DF_CAP_BLOCK_PARTS`): half `part` of block `block` of
    /// `stack`. `ToCross` then `FromCross` must equal `run_blocks` over the block.
    fn run_block_part(
        &self,
        _call: &Call,
        _state: StepState,
        _stack: usize,
        _block: usize,
        _part: BlockPart,
        _hooks: &Hooks,
    ) -> Result<StepState> {
        Err(Error::new(
            "this denoiser does not step its blocks by halves",
        ))
    }
}

/// The halves of a block for block stepping by halves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockPart {
    /// Up to the cross-attention's input: the hidden state after the self-attention's residual.
    ToCross,
    /// From the cross-attention to the end of the block, with the block's post-block hooks.
    FromCross,
}

impl BlockPart {
    fn raw(self) -> u32 {
        match self {
            BlockPart::ToCross => DF_BLOCK_PART_TO_CROSS,
            BlockPart::FromCross => DF_BLOCK_PART_FROM_CROSS,
        }
    }

    fn from_raw(raw: u32) -> Result<BlockPart> {
        match raw {
            DF_BLOCK_PART_TO_CROSS => Ok(BlockPart::ToCross),
            DF_BLOCK_PART_FROM_CROSS => Ok(BlockPart::FromCross),
            other => Err(Error(format!(
                "block part {other} is not one of 0 (to the cross-attention) and 1 (from it)"
            ))),
        }
    }
}

/// A stepped denoiser's state between block ranges: the hidden state `[B, L, D]`, which bridges
/// and other towers may read and change, the model's own data (an object value), and, for
/// bridges that modulate by it, the tower's time embedding `[B, E]` when the model gives one.
#[derive(Clone)]
pub struct StepState {
    pub hidden: Tensor,
    pub inner: Value,
    pub embedding: Option<Tensor>,
}

impl StepState {
    /// As a List `[hidden, inner]` or `[hidden, inner, embedding]`, the state's C form.
    fn into_value(self) -> Value {
        let mut items = vec![self.hidden.into_value(), self.inner];
        if let Some(e) = self.embedding {
            items.push(e.into_value());
        }
        Value::list(items)
    }

    fn from_value(v: &Value) -> Result<StepState> {
        let items = v.as_list()?;
        match items.as_slice() {
            [hidden, inner, rest @ ..] => Ok(StepState {
                hidden: hidden.as_tensor()?,
                inner: inner.clone(),
                embedding: rest.first().map(Value::as_tensor).transpose()?,
            }),
            _ => Err(Error::new("a step state must be a List [hidden, state]")),
        }
    }

    fn from_raw(v: *const DfValue) -> Result<StepState> {
        StepState::from_value(&Value::from_borrowed(v).ok_or_else(|| Error::new("no state"))?)
    }
}

/// The object behind a denoiser Model: the plugin's model first, so the tag's downcast
/// ([`Value::as_object`]) still finds it, then the interface table and the description.
#[repr(C)]
struct DenoiserBox<T> {
    inner: T,
    api: DfDenoiserApi,
    desc: CDesc,
}

/// Records `msg` for the host and returns DF_ERROR.
fn fail(msg: &str) -> i32 {
    let c = cstring(msg);
    // SAFETY: a NUL-terminated message, copied by the host.
    unsafe { (host().set_last_error)(c.as_ptr()) };
    DF_ERROR
}

/// Runs `f` with panics caught; an error or panic is recorded for the host.
pub(crate) fn trampoline(host_api: *const DfHostApi, f: impl FnOnce() -> Result<()>) -> i32 {
    set_host(host_api);
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => DF_OK,
        Ok(Err(e)) => fail(&e.0),
        Err(p) => fail(&format!("panicked: {}", crate::panic_message(&*p))),
    }
}

unsafe extern "C" fn describe_box<T: Denoiser>(object: *mut c_void) -> *const DfDenoiserDesc {
    // SAFETY: the host passes the object made by `make_denoiser::<T>`.
    let b = unsafe { &*(object as *const DenoiserBox<T>) };
    &b.desc.desc
}

unsafe extern "C" fn forward_box<T: Denoiser>(
    object: *mut c_void,
    host_api: *const DfHostApi,
    call: *const DfCallContext,
    inputs: *const DfNamedValue,
    n_inputs: usize,
    patches: *const *const DfPatchDesc,
    n_patches: usize,
    out: *mut *mut DfValue,
) -> i32 {
    trampoline(host_api, || {
        // SAFETY: the host's live arguments for the call.
        let inputs = unsafe { Inputs::from_raw(inputs, n_inputs)? };
        // SAFETY: as above; the object is the one made by `make_denoiser::<T>`.
        let y = unsafe {
            with_model::<T, _>(object, call, patches, n_patches, |m, c, h| {
                m.forward(c, &inputs, h)
            })?
        };
        put(out, y.into_value())
    })
}

/// The patch descriptors the host passed.
///
/// # Safety
/// `patches` must be NULL or `n` pointers to live descriptors.
unsafe fn patch_list<'a>(patches: *const *const DfPatchDesc, n: usize) -> Vec<&'a DfPatchDesc> {
    // SAFETY: per the contract.
    unsafe { items(patches, n) }
        .iter()
        // SAFETY: non-NULL pointers to host-owned descriptors.
        .filter_map(|p| unsafe { p.as_ref() })
        .collect()
}

/// Runs `f` on the plugin's model behind `object` with the call and the host's patches.
///
/// # Safety
/// `object` must be the object made by `make_denoiser::<T>`, `call` NULL or a live context, and
/// `patches` NULL or `n_patches` pointers to live descriptors.
unsafe fn with_model<T: Denoiser, R>(
    object: *mut c_void,
    call: *const DfCallContext,
    patches: *const *const DfPatchDesc,
    n_patches: usize,
    f: impl FnOnce(&T, &Call, &Hooks) -> Result<R>,
) -> Result<R> {
    // SAFETY: per the contract.
    let (b, call_v, patches) = unsafe {
        (
            &*(object as *const DenoiserBox<T>),
            Call::from_raw(call),
            patch_list(patches, n_patches),
        )
    };
    let hooks = Hooks {
        call: &call_v,
        raw: call,
        patches,
    };
    f(&b.inner, &call_v, &hooks)
}

/// Writes an owned value to `out`.
fn put(out: *mut *mut DfValue, v: Value) -> Result<()> {
    if out.is_null() {
        return Err(Error::new("no output slot"));
    }
    // SAFETY: checked for NULL; one reference to the host.
    unsafe { *out = v.into_raw() };
    Ok(())
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn prepare_box<T: Denoiser>(
    object: *mut c_void,
    host_api: *const DfHostApi,
    call: *const DfCallContext,
    inputs: *const DfNamedValue,
    n_inputs: usize,
    patches: *const *const DfPatchDesc,
    n_patches: usize,
    out: *mut *mut DfValue,
) -> i32 {
    trampoline(host_api, || {
        // SAFETY: the host's live arguments for the call.
        let inputs = unsafe { Inputs::from_raw(inputs, n_inputs)? };
        // SAFETY: as above.
        let state = unsafe {
            with_model::<T, _>(object, call, patches, n_patches, |m, c, h| {
                m.prepare(c, &inputs, h)
            })?
        };
        put(out, state.into_value())
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn run_blocks_box<T: Denoiser>(
    object: *mut c_void,
    host_api: *const DfHostApi,
    call: *const DfCallContext,
    state: *const DfValue,
    stack: u32,
    from: u32,
    to: u32,
    patches: *const *const DfPatchDesc,
    n_patches: usize,
    out: *mut *mut DfValue,
) -> i32 {
    trampoline(host_api, || {
        let state = StepState::from_raw(state)?;
        // SAFETY: the host's live arguments for the call.
        let next = unsafe {
            with_model::<T, _>(object, call, patches, n_patches, |m, c, h| {
                m.run_blocks(c, state, stack as usize, from as usize, to as usize, h)
            })?
        };
        put(out, next.into_value())
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn run_block_part_box<T: Denoiser>(
    object: *mut c_void,
    host_api: *const DfHostApi,
    call: *const DfCallContext,
    state: *const DfValue,
    stack: u32,
    block: u32,
    part: u32,
    patches: *const *const DfPatchDesc,
    n_patches: usize,
    out: *mut *mut DfValue,
) -> i32 {
    trampoline(host_api, || {
        let state = StepState::from_raw(state)?;
        let part = BlockPart::from_raw(part)?;
        // SAFETY: the host's live arguments for the call.
        let next = unsafe {
            with_model::<T, _>(object, call, patches, n_patches, |m, c, h| {
                m.run_block_part(c, state, stack as usize, block as usize, part, h)
            })?
        };
        put(out, next.into_value())
    })
}

unsafe extern "C" fn finish_box<T: Denoiser>(
    object: *mut c_void,
    host_api: *const DfHostApi,
    call: *const DfCallContext,
    state: *const DfValue,
    patches: *const *const DfPatchDesc,
    n_patches: usize,
    out: *mut *mut DfValue,
) -> i32 {
    trampoline(host_api, || {
        let state = StepState::from_raw(state)?;
        // SAFETY: the host's live arguments for the call.
        let y = unsafe {
            with_model::<T, _>(object, call, patches, n_patches, |m, c, h| {
                m.finish(c, state, h)
            })?
        };
        put(out, y.into_value())
    })
}

unsafe extern "C" fn drop_box<T: Denoiser>(object: *mut c_void) {
    if !object.is_null() {
        let _ = catch_unwind(|| {
            // SAFETY: made by `Box::into_raw` in `make_denoiser::<T>`.
            drop(unsafe { Box::from_raw(object as *mut DenoiserBox<T>) });
        });
    }
}

impl Context {
    /// Wraps a denoiser in a Model value that every plugin can drive and patch.
    pub fn make_denoiser<T: Denoiser>(&self, model: T) -> Result<Value> {
        let desc = CDesc::new(&model.describe());
        let tag = cstring(T::TAG);
        let b = Box::new(DenoiserBox {
            inner: model,
            api: DfDenoiserApi {
                size: std::mem::size_of::<DfDenoiserApi>() as u32,
                version: 1,
                describe: Some(describe_box::<T>),
                forward: Some(forward_box::<T>),
                prepare: Some(prepare_box::<T>),
                run_blocks: Some(run_blocks_box::<T>),
                finish: Some(finish_box::<T>),
                run_block_part: Some(run_block_part_box::<T>),
                reserved: [std::ptr::null(); 3],
            },
            desc,
        });
        let api = &b.api as *const DfDenoiserApi as *const c_void;
        let raw = Box::into_raw(b) as *mut c_void;
        // SAFETY: the host takes ownership of `raw` and calls `drop_box::<T>` once; `api` lives
        // inside the object.
        let v = unsafe {
            (host().value_model)(
                self.raw(),
                DF_INTERFACE_DENOISER,
                api,
                tag.as_ptr(),
                raw,
                Some(drop_box::<T>),
            )
        };
        Value::from_owned(v).ok_or_else(|| Error(crate::ops::last_error()))
    }

    /// A new Model: `model` with one more patch, sharing its weights. Refused with a message
    /// when the model lacks what the patch needs or the combination cannot be correct.
    pub fn patch_model<H: PatchHooks>(
        &self,
        model: &Value,
        spec: &PatchSpec,
        hooks: H,
    ) -> Result<Value> {
        let name = cstring(&spec.name);
        let targets: Vec<CString> = spec
            .linear_deltas
            .iter()
            .map(|d| cstring(&d.target))
            .collect();
        let deltas: Vec<DfLinearDelta> = spec
            .linear_deltas
            .iter()
            .zip(&targets)
            .map(|(d, t)| DfLinearDelta {
                target: t.as_ptr(),
                down: d.down.as_value().as_ptr(),
                up: d.up.as_value().as_ptr(),
                scale: d.scale,
            })
            .collect();
        let user = Box::into_raw(Box::new(hooks)) as *mut c_void;
        let desc = DfPatchDesc {
            size: std::mem::size_of::<DfPatchDesc>() as u32,
            flags: spec.flags,
            name: name.as_ptr(),
            plugin: std::ptr::null(),
            order: spec.order,
            branches: spec.branches,
            strength: spec.strength,
            start: spec.start,
            end: spec.end,
            stack: spec.stack.map_or(-1, |s| s as i32),
            first: spec.first as i32,
            last: spec.last.map_or(-1, |l| l as i32),
            _pad: 0,
            digest: spec.digest,
            required_capabilities: spec.required_capabilities,
            user_data: user,
            drop_user_data: Some(drop_hooks::<H>),
            linear_deltas: deltas.as_ptr(),
            n_linear_deltas: deltas.len(),
            block_residual: spec.block_residual.then_some(block_residual_tramp::<H>),
            range_override: spec.range_override.then_some(range_override_tramp::<H>),
            attention_edit: spec
                .attention_edit
                .then_some(crate::attention::edit_tramp::<H>),
            attention_mask: spec
                .attention_mask
                .then_some(crate::attention::mask_tramp::<H>),
            attention_extra: spec
                .attention_extra
                .then_some(crate::attention::extra_tramp::<H>),
            bridge: spec.bridge.then_some(bridge_tramp::<H>),
            lifecycle: spec.lifecycle.then_some(lifecycle_tramp::<H>),
            memory_estimate: spec.memory_estimate.then_some(memory_tramp::<H>),
            call_inputs: spec.call_inputs.then_some(call_inputs_tramp::<H>),
            reserved: [std::ptr::null(); 7],
        };
        // SAFETY: a complete descriptor; the host copies it and owns `user` from here on.
        let v = unsafe { (host().model_patch)(self.raw(), model.as_ptr(), &desc) };
        Value::from_owned(v).ok_or_else(|| Error(crate::ops::last_error()))
    }
}

/// A Model's patch count and digest.
pub fn model_info(model: &Value) -> Result<(u32, usize, u64)> {
    let (mut i, mut n, mut d) = (0u32, 0usize, 0u64);
    // SAFETY: a live handle and three out-slots.
    if unsafe { (host().model_info)(model.as_ptr(), &mut i, &mut n, &mut d) } != DF_OK {
        return Err(Error::new("not a Model"));
    }
    Ok((i, n, d))
}

/// A denoiser Model, from whichever plugin made it.
pub struct DenoiserRef<'a> {
    value: &'a Value,
    info: DenoiserInfo,
}

impl Value {
    /// This Model as a denoiser, or an error saying what it is instead.
    pub fn as_denoiser(&self) -> Result<DenoiserRef<'_>> {
        let mut object: *mut c_void = std::ptr::null_mut();
        // SAFETY: a live handle and an out-slot.
        let api =
            unsafe { (host().model_interface)(self.as_ptr(), DF_INTERFACE_DENOISER, &mut object) };
        if api.is_null() {
            return Err(Error(format!(
                "expected a denoiser, got {}",
                describe_model(self)
            )));
        }
        // SAFETY: the host checked the table's size for the interface.
        let api = unsafe { &*(api as *const DfDenoiserApi) };
        let describe = api
            .describe
            .ok_or_else(|| Error::new("the denoiser does not describe itself"))?;
        // SAFETY: the plugin's function on its own object; the description lives with it.
        let d = unsafe { describe(object).as_ref() }
            .ok_or_else(|| Error::new("the denoiser gave no description"))?;
        Ok(DenoiserRef {
            value: self,
            // SAFETY: a live description.
            info: unsafe { read_desc(d) },
        })
    }
}

/// What a Model is, for messages: `a text encoder`, `a VAE`, `a Model without an interface`.
pub fn describe_model(v: &Value) -> String {
    if v.kind() != Kind::Model {
        return format!("a {:?}", v.kind());
    }
    match model_info(v).map(|i| i.0) {
        Ok(DF_INTERFACE_DENOISER) => "a denoiser".into(),
        Ok(DF_INTERFACE_TEXT_ENCODER) => "a text encoder".into(),
        Ok(DF_INTERFACE_AUTOENCODER) => "an autoencoder (VAE)".into(),
        _ => "a Model without a protocol interface".into(),
    }
}

/// Lifecycle events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    RunBegin,
    StepBegin,
    StepEnd,
    RunEnd,
}

impl Event {
    fn raw(self) -> i32 {
        match self {
            Event::RunBegin => DF_EVENT_RUN_BEGIN,
            Event::StepBegin => DF_EVENT_STEP_BEGIN,
            Event::StepEnd => DF_EVENT_STEP_END,
            Event::RunEnd => DF_EVENT_RUN_END,
        }
    }

    fn from_raw(raw: i32) -> Option<Event> {
        Some(match raw {
            DF_EVENT_RUN_BEGIN => Event::RunBegin,
            DF_EVENT_STEP_BEGIN => Event::StepBegin,
            DF_EVENT_STEP_END => Event::StepEnd,
            DF_EVENT_RUN_END => Event::RunEnd,
            _ => return None,
        })
    }
}

/// Named inputs in their C form; the names (first) must outlive the call.
fn named_values(inputs: &[(&str, &Tensor)]) -> (Vec<CString>, Vec<DfNamedValue>) {
    let names: Vec<CString> = inputs.iter().map(|(n, _)| cstring(n)).collect();
    let named = inputs
        .iter()
        .zip(&names)
        .map(|((_, t), n)| DfNamedValue {
            name: n.as_ptr(),
            value: t.as_value().as_ptr(),
        })
        .collect();
    (names, named)
}

impl DenoiserRef<'_> {
    pub fn info(&self) -> &DenoiserInfo {
        &self.info
    }

    /// One forward with the model's patches.
    pub fn forward(&self, call: &Call, inputs: &[(&str, &Tensor)]) -> Result<Tensor> {
        let (_names, named) = named_values(inputs);
        let raw = call.raw();
        let mut out: *mut DfValue = std::ptr::null_mut();
        // SAFETY: live arguments for the duration of the call.
        let rc = unsafe {
            (host().denoiser_forward)(
                self.value.as_ptr(),
                &raw,
                named.as_ptr(),
                named.len(),
                &mut out,
            )
        };
        match (rc, Value::from_owned(out)) {
            (DF_OK, Some(v)) => v.as_tensor(),
            _ => Err(Error(crate::ops::last_error())),
        }
    }

    /// Block stepping, 1: the state for `inputs` at `call`, with the model's patches.
    pub fn prepare(&self, call: &Call, inputs: &[(&str, &Tensor)]) -> Result<StepState> {
        let (_names, named) = named_values(inputs);
        let raw = call.raw();
        let mut out: *mut DfValue = std::ptr::null_mut();
        // SAFETY: live arguments for the duration of the call.
        let rc = unsafe {
            (host().denoiser_prepare)(
                self.value.as_ptr(),
                &raw,
                named.as_ptr(),
                named.len(),
                &mut out,
            )
        };
        match (rc, Value::from_owned(out)) {
            (DF_OK, Some(v)) => StepState::from_value(&v),
            _ => Err(Error(crate::ops::last_error())),
        }
    }

    /// Block stepping, 2: blocks `from..=to` of `stack`.
    pub fn run_blocks(
        &self,
        call: &Call,
        state: &StepState,
        stack: usize,
        from: usize,
        to: usize,
    ) -> Result<StepState> {
        let raw = call.raw();
        let state = state.clone().into_value();
        let mut out: *mut DfValue = std::ptr::null_mut();
        // SAFETY: live arguments for the duration of the call.
        let rc = unsafe {
            (host().denoiser_run_blocks)(
                self.value.as_ptr(),
                &raw,
                state.as_ptr(),
                stack as u32,
                from as u32,
                to as u32,
                &mut out,
            )
        };
        match (rc, Value::from_owned(out)) {
            (DF_OK, Some(v)) => StepState::from_value(&v),
            _ => Err(Error(crate::ops::last_error())),
        }
    }

    /// Block stepping by halves: half `part` of block `block` of `stack`
    /// (`DF_CAP_BLOCK_PARTS`).
    pub fn run_block_part(
        &self,
        call: &Call,
        state: &StepState,
        stack: usize,
        block: usize,
        part: BlockPart,
    ) -> Result<StepState> {
        let raw = call.raw();
        let state = state.clone().into_value();
        let mut out: *mut DfValue = std::ptr::null_mut();
        // SAFETY: live arguments for the duration of the call.
        let rc = unsafe {
            (host().denoiser_run_block_part)(
                self.value.as_ptr(),
                &raw,
                state.as_ptr(),
                stack as u32,
                block as u32,
                part.raw(),
                &mut out,
            )
        };
        match (rc, Value::from_owned(out)) {
            (DF_OK, Some(v)) => StepState::from_value(&v),
            _ => Err(Error(crate::ops::last_error())),
        }
    }

    /// Block stepping, 3: the prediction from the last state.
    pub fn finish(&self, call: &Call, state: &StepState) -> Result<Tensor> {
        let raw = call.raw();
        let state = state.clone().into_value();
        let mut out: *mut DfValue = std::ptr::null_mut();
        // SAFETY: live arguments for the duration of the call.
        let rc = unsafe {
            (host().denoiser_finish)(self.value.as_ptr(), &raw, state.as_ptr(), &mut out)
        };
        match (rc, Value::from_owned(out)) {
            (DF_OK, Some(v)) => v.as_tensor(),
            _ => Err(Error(crate::ops::last_error())),
        }
    }

    /// Tells the model's patches about a lifecycle event.
    pub fn lifecycle(&self, event: Event, call: &Call) -> Result<()> {
        let raw = call.raw();
        // SAFETY: live arguments.
        match unsafe { (host().denoiser_lifecycle)(self.value.as_ptr(), event.raw(), &raw) } {
            DF_OK => Ok(()),
            _ => Err(Error(crate::ops::last_error())),
        }
    }
}

/// A linear delta of a patch: `y += scale · up·(down·x)` on layer `target`.
#[derive(Clone)]
pub struct LinearDelta {
    pub target: String,
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
}

/// What a patch is and which hooks it sets; the hooks themselves are a [`PatchHooks`].
#[derive(Clone)]
pub struct PatchSpec {
    pub name: String,
    /// `DF_PATCH_*`.
    pub flags: u32,
    pub order: i32,
    /// Mask of `1 << branch`; 0 for all branches.
    pub branches: u32,
    pub strength: f64,
    pub start: f64,
    pub end: f64,
    /// `None` for the whole denoiser call (range overrides only).
    pub stack: Option<usize>,
    pub first: usize,
    /// `None` for the stack's last block.
    pub last: Option<usize>,
    /// The patch's identity (its file and settings).
    pub digest: u64,
    pub required_capabilities: u64,
    pub linear_deltas: Vec<LinearDelta>,
    pub block_residual: bool,
    pub range_override: bool,
    pub lifecycle: bool,
    pub attention_edit: bool,
    pub attention_mask: bool,
    pub attention_extra: bool,
    pub memory_estimate: bool,
    pub bridge: bool,
    pub call_inputs: bool,
}

impl PatchSpec {
    /// A patch named `name` with no hooks yet, over every block, step and branch.
    pub fn new(name: &str) -> PatchSpec {
        PatchSpec {
            name: name.to_string(),
            flags: 0,
            order: 0,
            branches: 0,
            strength: 1.0,
            start: 0.0,
            end: 1.0,
            stack: None,
            first: 0,
            last: None,
            digest: 0,
            required_capabilities: 0,
            linear_deltas: Vec::new(),
            block_residual: false,
            range_override: false,
            lifecycle: false,
            attention_edit: false,
            attention_mask: false,
            attention_extra: false,
            memory_estimate: false,
            bridge: false,
            call_inputs: false,
        }
    }
}

/// The continuation of a range override: runs original blocks.
pub struct Continuation<'a> {
    raw: &'a DfContinuation,
}

impl Continuation<'_> {
    /// Runs blocks `from..=to` on `hidden` (contiguous, in order, each at most once). For a
    /// whole-call override, `hidden` is the latent and the result the prediction.
    pub fn run(&mut self, hidden: &Tensor, from: usize, to: usize) -> Result<Tensor> {
        let f = self
            .raw
            .run
            .ok_or_else(|| Error::new("the continuation has no function"))?;
        let mut out: *mut DfValue = std::ptr::null_mut();
        // SAFETY: the host's or model's continuation, live for the override call.
        let rc = unsafe {
            f(
                self.raw.state,
                hidden.as_value().as_ptr(),
                from as u32,
                to as u32,
                &mut out,
            )
        };
        match (rc, Value::from_owned(out)) {
            (DF_OK, Some(v)) => v.as_tensor(),
            _ => Err(Error(crate::ops::last_error())),
        }
    }
}

/// The hooks of a patch. Only those its [`PatchSpec`] sets are called.
pub trait PatchHooks: Send + Sync + 'static {
    /// A delta to add after block `block` of `stack`, and the token it starts at.
    fn block_residual(
        &self,
        _call: &Call,
        _stack: usize,
        _block: usize,
        _hidden: &Tensor,
    ) -> Result<Option<(Tensor, usize)>> {
        Ok(None)
    }

    /// Blocks `first..=last` of `stack` (`None`: the whole call) from `hidden`.
    fn range_override(
        &self,
        _call: &Call,
        _stack: Option<usize>,
        first: usize,
        last: usize,
        hidden: &Tensor,
        cont: &mut Continuation,
    ) -> Result<Tensor> {
        cont.run(hidden, first, last)
    }

    fn lifecycle(&self, _event: Event, _call: &Call) -> Result<()> {
        Ok(())
    }

    /// The call's named inputs, before each forward (and each block-stepping `prepare`) of a
    /// model holding the patch: a ControlNet runs its network on them here and hands the
    /// results out from its block residuals.
    fn call_inputs(&self, _call: &Call, _inputs: &Inputs) -> Result<()> {
        Ok(())
    }

    /// New `(q, k, v)` (`[B, L, heads·head_dim]`) for an attention site, or `None` to keep them.
    fn attention_edit(
        &self,
        _call: &Call,
        _site: &crate::attention::AttentionSite,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        Ok(None)
    }

    /// A mask for an attention site, intersected with the model's own.
    fn attention_mask(
        &self,
        _call: &Call,
        _site: &crate::attention::AttentionSite,
    ) -> Result<Option<crate::attention::Mask>> {
        Ok(None)
    }

    /// A bridge between two streams of one model at sites `a` and `b` (stack, block): deltas for
    /// each stream's hidden state, from both. Run by models with two streams.
    fn bridge(
        &self,
        _call: &Call,
        _a: (usize, usize),
        _b: (usize, usize),
        _hidden_a: &Tensor,
        _hidden_b: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((None, None))
    }

    /// Bytes this patch holds beyond the base model (merged weight copies, cached state, extra
    /// networks), for schedulers deciding what fits; its linear deltas are counted by the host.
    fn memory_estimate(&self, _info: &DenoiserInfo) -> u64 {
        0
    }

    /// A delta added to an attention site's output (before its output projection), from its
    /// queries `q`; scaled by the patch's strength and gated by its steps and branches.
    fn attention_extra(
        &self,
        _call: &Call,
        _site: &crate::attention::AttentionSite,
        _q: &Tensor,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

unsafe extern "C" fn drop_hooks<H: PatchHooks>(user: *mut c_void) {
    if !user.is_null() {
        let _ = catch_unwind(|| {
            // SAFETY: made by `Box::into_raw` in `patch_model::<H>`.
            drop(unsafe { Box::from_raw(user as *mut H) })
        });
    }
}

unsafe extern "C" fn block_residual_tramp<H: PatchHooks>(
    user: *mut c_void,
    host_api: *const DfHostApi,
    call: *const DfCallContext,
    stack: u32,
    block: u32,
    hidden: *const DfValue,
    delta: *mut *mut DfValue,
    token_offset: *mut i64,
) -> i32 {
    trampoline(host_api, || {
        // SAFETY: the user data made for `H`, and live arguments.
        let (h, call) = unsafe { (&*(user as *const H), Call::from_raw(call)) };
        let hidden = Value::from_borrowed(hidden)
            .ok_or_else(|| Error::new("no hidden state"))?
            .as_tensor()?;
        let r = h.block_residual(&call, stack as usize, block as usize, &hidden)?;
        if delta.is_null() || token_offset.is_null() {
            return Err(Error::new("no output slots"));
        }
        // SAFETY: checked for NULL.
        unsafe {
            match r {
                Some((d, off)) => {
                    *delta = d.into_value().into_raw();
                    *token_offset = off as i64;
                }
                None => *delta = std::ptr::null_mut(),
            }
        }
        Ok(())
    })
}

unsafe extern "C" fn range_override_tramp<H: PatchHooks>(
    user: *mut c_void,
    host_api: *const DfHostApi,
    call: *const DfCallContext,
    stack: u32,
    first: u32,
    last: u32,
    hidden: *const DfValue,
    cont: *const DfContinuation,
    out: *mut *mut DfValue,
) -> i32 {
    trampoline(host_api, || {
        // SAFETY: the user data made for `H`, and live arguments.
        let (h, call) = unsafe { (&*(user as *const H), Call::from_raw(call)) };
        // SAFETY: NULL or the caller's continuation.
        let raw = unsafe { cont.as_ref() }.ok_or_else(|| Error::new("no continuation"))?;
        let hidden = Value::from_borrowed(hidden)
            .ok_or_else(|| Error::new("no hidden state"))?
            .as_tensor()?;
        let stack = (stack != u32::MAX).then_some(stack as usize);
        let y = h.range_override(
            &call,
            stack,
            first as usize,
            last as usize,
            &hidden,
            &mut Continuation { raw },
        )?;
        if out.is_null() {
            return Err(Error::new("no output slot"));
        }
        // SAFETY: checked for NULL.
        unsafe { *out = y.into_value().into_raw() };
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn bridge_tramp<H: PatchHooks>(
    user: *mut c_void,
    host_api: *const DfHostApi,
    call: *const DfCallContext,
    a: *const DfSite,
    b: *const DfSite,
    hidden_a: *const DfValue,
    hidden_b: *const DfValue,
    delta_a: *mut *mut DfValue,
    delta_b: *mut *mut DfValue,
) -> i32 {
    trampoline(host_api, || {
        // SAFETY: the user data made for `H`, and live arguments.
        let (h, call, a, b) = unsafe {
            (
                &*(user as *const H),
                Call::from_raw(call),
                a.as_ref().ok_or_else(|| Error::new("no site a"))?,
                b.as_ref().ok_or_else(|| Error::new("no site b"))?,
            )
        };
        let tensor = |v| -> Result<Tensor> {
            Value::from_borrowed(v)
                .ok_or_else(|| Error::new("no hidden state"))?
                .as_tensor()
        };
        if delta_a.is_null() || delta_b.is_null() {
            return Err(Error::new("no output slots"));
        }
        let (da, db) = h.bridge(
            &call,
            (a.stack as usize, a.block as usize),
            (b.stack as usize, b.block as usize),
            &tensor(hidden_a)?,
            &tensor(hidden_b)?,
        )?;
        // SAFETY: checked for NULL; owned values to the caller.
        unsafe {
            *delta_a = da.map_or(std::ptr::null_mut(), |d| d.into_value().into_raw());
            *delta_b = db.map_or(std::ptr::null_mut(), |d| d.into_value().into_raw());
        }
        Ok(())
    })
}

unsafe extern "C" fn memory_tramp<H: PatchHooks>(
    user: *mut c_void,
    desc: *const DfDenoiserDesc,
) -> u64 {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the user data made for `H`; NULL or the base model's live description.
        let (h, info) = unsafe {
            (
                &*(user as *const H),
                desc.as_ref().map(|d| read_desc(d)).unwrap_or_default(),
            )
        };
        h.memory_estimate(&info)
    }))
    .unwrap_or(0)
}

/// Bytes `model`'s patches hold beyond its base (their linear deltas and memory estimates).
pub fn patch_memory(model: &Value) -> u64 {
    // SAFETY: a live handle.
    unsafe { (host().model_patch_memory)(model.as_ptr()) }
}

unsafe extern "C" fn call_inputs_tramp<H: PatchHooks>(
    user: *mut c_void,
    host_api: *const DfHostApi,
    call: *const DfCallContext,
    inputs: *const DfNamedValue,
    n_inputs: usize,
) -> i32 {
    trampoline(host_api, || {
        // SAFETY: the user data made for `H`, and live arguments for the call.
        let (h, call, inputs) = unsafe {
            (
                &*(user as *const H),
                Call::from_raw(call),
                Inputs::from_raw(inputs, n_inputs)?,
            )
        };
        h.call_inputs(&call, &inputs)
    })
}

unsafe extern "C" fn lifecycle_tramp<H: PatchHooks>(
    user: *mut c_void,
    host_api: *const DfHostApi,
    event: i32,
    call: *const DfCallContext,
) -> i32 {
    trampoline(host_api, || {
        // SAFETY: the user data made for `H`, and live arguments.
        let (h, call) = unsafe { (&*(user as *const H), Call::from_raw(call)) };
        match Event::from_raw(event) {
            Some(e) => h.lifecycle(e, &call),
            None => Ok(()),
        }
    })
}

/// The patches a denoiser's forward received, with the helpers that run them at its sites.
/// With no patches every helper is a plain pass-through.
pub struct Hooks<'a> {
    pub(crate) call: &'a Call,
    raw: *const DfCallContext,
    pub(crate) patches: Vec<&'a DfPatchDesc>,
}

fn mix(h: u64, x: u64) -> u64 {
    let mut h = h ^ x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^ (h >> 29)
}

/// `'NAME' from plugin 'PLUGIN'`.
pub(crate) fn label(p: &DfPatchDesc) -> String {
    // SAFETY: host-owned strings.
    unsafe {
        format!(
            "patch '{}' from plugin '{}'",
            string(p.name),
            string(p.plugin)
        )
    }
}

/// The inclusive block range of a patch within a stack of `n` blocks.
pub(crate) fn block_range(p: &DfPatchDesc, n: usize) -> (usize, usize) {
    let last = if p.last < 0 {
        n.saturating_sub(1)
    } else {
        p.last as usize
    };
    (p.first.max(0) as usize, last)
}

/// The model side of a range override's continuation.
struct StackRun<'a, 'b> {
    run: &'a mut dyn FnMut(Tensor, usize, usize) -> Result<Tensor>,
    /// Blocks before this one were already run in this override call.
    next: usize,
    first: usize,
    last: usize,
    error: Option<Error>,
    _hooks: std::marker::PhantomData<&'b ()>,
}

unsafe extern "C" fn stack_continuation(
    state: *mut c_void,
    hidden: *const DfValue,
    from: u32,
    to: u32,
    out: *mut *mut DfValue,
) -> i32 {
    // SAFETY: the `StackRun` of the running override.
    let Some(s) = (unsafe { (state as *mut StackRun).as_mut() }) else {
        return DF_ERROR;
    };
    let (from, to) = (from as usize, to as usize);
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<Tensor> {
        if from < s.next || to < from || from < s.first || to > s.last {
            return Err(Error(format!(
                "a range override asked for blocks {from}..={to}, but only {}..={} remain to run, in order",
                s.next.max(s.first),
                s.last
            )));
        }
        let h = Value::from_borrowed(hidden)
            .ok_or_else(|| Error::new("no hidden state"))?
            .as_tensor()?;
        s.next = to + 1;
        (s.run)(h, from, to)
    }))
    .unwrap_or_else(|p| Err(Error(format!("panicked: {}", crate::panic_message(&*p)))));
    match r {
        Ok(t) if !out.is_null() => {
            // SAFETY: checked for NULL.
            unsafe { *out = t.into_value().into_raw() };
            DF_OK
        }
        Ok(_) => DF_ERROR,
        Err(e) => {
            let rc = fail(&e.0);
            s.error = Some(e);
            rc
        }
    }
}

impl<'a> Hooks<'a> {
    /// No patches (a model calling itself directly).
    pub fn none(call: &'a Call) -> Hooks<'a> {
        Hooks {
            call,
            raw: std::ptr::null(),
            patches: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.patches.is_empty()
    }

    pub fn call(&self) -> &Call {
        self.call
    }

    /// 1 for each batch row in `p`'s branches, 0 for the others.
    pub(crate) fn rows(&self, p: &DfPatchDesc) -> Vec<f32> {
        self.call
            .branches
            .iter()
            .map(|&b| (p.branches == 0 || p.branches & (1u32 << (b as u32 & 31)) != 0) as u8 as f32)
            .collect()
    }

    /// The call context in its C form, as the hooks receive it.
    pub(crate) fn call_raw(&self) -> crate::attention::RawCall {
        crate::attention::RawCall::new(self.call.raw(), self.raw)
    }

    /// The patches with linear deltas that apply at this call: strength not 0 and the step
    /// inside their `[start, end)` window.
    pub(crate) fn active_delta_patches(&self) -> impl Iterator<Item = &DfPatchDesc> + '_ {
        let frac = self.call.fraction();
        self.patches.iter().copied().filter(move |p| {
            p.n_linear_deltas > 0 && p.strength != 0.0 && frac >= p.start && frac < p.end
        })
    }

    /// The identity of the active linear deltas (0 for none): their patches' digests and
    /// strengths, in order.
    pub(crate) fn delta_key(&self) -> u64 {
        self.active_delta_patches()
            .fold(0, |h, p| mix(mix(h, p.digest), p.strength.to_bits()).max(1))
    }

    /// Adds every block residual gated in for block `block` of `stack` into `hidden`
    /// `[B, L, D]`.
    pub fn after_block(&self, stack: usize, block: usize, hidden: Tensor) -> Result<Tensor> {
        let mut hidden = hidden;
        for p in &self.patches {
            let Some(f) = p.block_residual else { continue };
            if p.stack != stack as i32 {
                continue;
            }
            let (first, last) = block_range(p, usize::MAX);
            let frac = self.call.fraction();
            if block < first || block > last || frac < p.start || frac >= p.end {
                continue;
            }
            let rows = self.rows(p);
            if rows.iter().all(|&r| r == 0.0) {
                continue;
            }
            let mut delta: *mut DfValue = std::ptr::null_mut();
            let mut offset = 0i64;
            let raw = self.call.raw();
            // SAFETY: the patch's hook with its own user data and live arguments.
            let rc = unsafe {
                f(
                    p.user_data,
                    host(),
                    if self.raw.is_null() { &raw } else { self.raw },
                    stack as u32,
                    block as u32,
                    hidden.as_value().as_ptr(),
                    &mut delta,
                    &mut offset,
                )
            };
            if rc != DF_OK {
                return Err(Error(format!(
                    "{} failed in its block residual: {}",
                    label(p),
                    crate::ops::last_error()
                )));
            }
            let Some(delta) = Value::from_owned(delta) else {
                continue;
            };
            let delta = delta.as_tensor()?;
            hidden = add_into(&hidden, &delta, offset.max(0) as usize, p.strength, &rows)
                .map_err(|e| Error(format!("{}: {e}", label(p))))?;
        }
        Ok(hidden)
    }

    /// Runs blocks `0..n_blocks` of `stack` on `hidden` through `block(i, hidden)`, with the
    /// patches' range overrides as onion layers over their ranges and the block residuals after
    /// each block that runs.
    pub fn run_stack(
        &self,
        stack: usize,
        n_blocks: usize,
        hidden: Tensor,
        block: &mut dyn FnMut(usize, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if n_blocks == 0 {
            return Ok(hidden);
        }
        self.run_blocks(stack, n_blocks, 0, n_blocks - 1, hidden, block)
    }

    /// [`Hooks::run_stack`] over blocks `from..=to` only (block stepping). A range override
    /// that covers some of these blocks and some others cannot run and is an error.
    pub fn run_blocks(
        &self,
        stack: usize,
        n_blocks: usize,
        from: usize,
        to: usize,
        hidden: Tensor,
        block: &mut dyn FnMut(usize, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if from > to || to >= n_blocks {
            return Err(Error(format!(
                "blocks {from}..={to} of a stack of {n_blocks}"
            )));
        }
        if self.patches.is_empty() {
            let mut h = hidden;
            for i in from..=to {
                h = block(i, h)?;
            }
            return Ok(h);
        }
        let overrides: Vec<&DfPatchDesc> = self
            .patches
            .iter()
            .copied()
            .filter(|p| p.range_override.is_some() && p.stack == stack as i32)
            .collect();
        for p in &overrides {
            let (f, l) = block_range(p, n_blocks);
            if f <= to && l >= from && (f < from || l > to) {
                return Err(Error(format!(
                    "{} overrides blocks {f}..={l}, which a step over blocks {from}..={to} would cut",
                    label(p)
                )));
            }
        }
        self.run_range(stack, n_blocks, from, to, hidden, &overrides, block)
    }

    /// Half `part` of block `block` of `stack` (of `n_blocks`) on `hidden`: `to_cross` runs the
    /// block up to its cross-attention's input, `from_cross` the rest, followed by the block's
    /// post-block hooks. A range override over the block is refused: it replaces whole blocks.
    #[allow(clippy::too_many_arguments)]
    pub fn run_block_part(
        &self,
        stack: usize,
        n_blocks: usize,
        block: usize,
        part: BlockPart,
        hidden: Tensor,
        to_cross: &mut dyn FnMut(usize, Tensor) -> Result<Tensor>,
        from_cross: &mut dyn FnMut(usize, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if block >= n_blocks {
            return Err(Error(format!("block {block} of a stack of {n_blocks}")));
        }
        if let Some(p) = self.patches.iter().find(|p| {
            let (f, l) = block_range(p, n_blocks);
            p.range_override.is_some() && p.stack == stack as i32 && f <= block && l >= block
        }) {
            return Err(Error(format!(
                "{} overrides whole blocks, which a step by halves of block {block} would cut",
                label(p)
            )));
        }
        match part {
            BlockPart::ToCross => to_cross(block, hidden),
            BlockPart::FromCross => {
                let h = from_cross(block, hidden)?;
                if self.patches.is_empty() {
                    Ok(h)
                } else {
                    self.after_block(stack, block, h)
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_range(
        &self,
        stack: usize,
        n_blocks: usize,
        from: usize,
        to: usize,
        hidden: Tensor,
        overrides: &[&DfPatchDesc],
        block: &mut dyn FnMut(usize, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut h = hidden;
        let mut i = from;
        while i <= to {
            let outer = overrides.iter().position(|p| {
                let (f, l) = block_range(p, n_blocks);
                f == i && l <= to
            });
            let Some(k) = outer else {
                h = block(i, h)?;
                h = self.after_block(stack, i, h)?;
                i += 1;
                continue;
            };
            let p = overrides[k];
            let (first, last) = block_range(p, n_blocks);
            let rest: Vec<&DfPatchDesc> = overrides
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != k)
                .map(|(_, p)| *p)
                .collect();
            let mut inner = |x: Tensor, a: usize, b: usize| {
                self.run_range(stack, n_blocks, a, b, x, &rest, &mut *block)
            };
            let mut state = StackRun {
                run: &mut inner,
                next: first,
                first,
                last,
                error: None,
                _hooks: std::marker::PhantomData,
            };
            let cont = DfContinuation {
                state: &mut state as *mut StackRun as *mut c_void,
                run: Some(stack_continuation),
            };
            let f = p
                .range_override
                .ok_or_else(|| Error::new("not a range override"))?;
            let raw = self.call.raw();
            let mut out: *mut DfValue = std::ptr::null_mut();
            // SAFETY: the patch's hook with its own user data; `cont` outlives the call.
            let rc = unsafe {
                f(
                    p.user_data,
                    host(),
                    if self.raw.is_null() { &raw } else { self.raw },
                    stack as u32,
                    first as u32,
                    last as u32,
                    h.as_value().as_ptr(),
                    &cont,
                    &mut out,
                )
            };
            h = match (rc, Value::from_owned(out)) {
                (DF_OK, Some(v)) => v.as_tensor()?,
                (DF_OK, None) => bail_patch(p, "returned no hidden state")?,
                _ => match state.error.take() {
                    Some(e) => return Err(e),
                    None => bail_patch(
                        p,
                        &format!("failed in its range override: {}", crate::ops::last_error()),
                    )?,
                },
            };
            i = last + 1;
        }
        Ok(h)
    }
}

fn bail_patch(p: &DfPatchDesc, what: &str) -> Result<Tensor> {
    Err(Error(format!("{} {what}", label(p))))
}

/// `hidden[:, offset..offset+n] += strength · rows[b] · delta[b]` for `hidden` `[B, L, D]` and
/// `delta` `[B, n, D]`.
fn add_into(
    hidden: &Tensor,
    delta: &Tensor,
    offset: usize,
    strength: f64,
    rows: &[f32],
) -> Result<Tensor> {
    let (hs, ds) = (hidden.shape(), delta.shape());
    if hs.len() != 3 || ds.len() != 3 || ds[0] != hs[0] || ds[2] != hs[2] || offset + ds[1] > hs[1]
    {
        return Err(Error(format!(
            "a residual {ds:?} at token {offset} does not fit the hidden state {hs:?}"
        )));
    }
    let mut d = delta.cast(hidden.dtype())?;
    if strength != 1.0 {
        d = d.affine(strength, 0.0)?;
    }
    if rows.iter().any(|&r| r != 1.0) {
        let m = Tensor::from_f32(Kind::Tensor, &[rows.len(), 1, 1], rows)?
            .to_device(hidden.device())?;
        d = d.mul(&m)?;
    }
    if offset == 0 && ds[1] == hs[1] {
        return hidden.add(&d);
    }
    let dev = hidden.device();
    let zeros = |n: usize| -> Result<Tensor> {
        Tensor::zeros(Kind::Tensor, hidden.dtype(), &[hs[0], n, hs[2]])?.to_device(dev)
    };
    let mut parts = Vec::new();
    if offset > 0 {
        parts.push(zeros(offset)?);
    }
    parts.push(d);
    let tail = hs[1] - offset - ds[1];
    if tail > 0 {
        parts.push(zeros(tail)?);
    }
    let refs: Vec<&Tensor> = parts.iter().collect();
    hidden.add(&crate::ops::concat(&refs, 1)?)
}

/// The generic forward of any Model with an interface (the `Forward` node's contract): named
/// inputs to named outputs, whichever plugin made the model.
pub fn forward_named(model: &Value, inputs: &[(&str, &Tensor)]) -> Result<Vec<(String, Tensor)>> {
    let (_names, named) = named_values(inputs);
    let mut out: *mut DfValue = std::ptr::null_mut();
    // SAFETY: live arguments for the duration of the call.
    let rc =
        unsafe { (host().model_forward)(model.as_ptr(), named.as_ptr(), named.len(), &mut out) };
    let list = match (rc, Value::from_owned(out)) {
        (DF_OK, Some(v)) => v,
        _ => return Err(Error(crate::ops::last_error())),
    };
    list.as_list()?
        .into_iter()
        .map(|pair| {
            let pair = pair.as_list()?;
            match pair.as_slice() {
                [name, t] => Ok((name.as_str()?.to_string(), t.as_tensor()?)),
                _ => Err(Error::new("a model's outputs must be [name, tensor] pairs")),
            }
        })
        .collect()
}
