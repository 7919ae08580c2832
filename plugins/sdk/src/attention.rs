//! Attention hooks of the model protocol: edits of q, k and v before attention, structured masks
//! (key lengths, segment ids; a dense bias only as a last resort) and additive extra branches
//! (IP-Adapter), as a patch writes them ([`PatchHooks`]) and as a model runs them at its attention
//! sites ([`Hooks::attention`]). With no attention patch at a site the model's own fused attention
//! runs unchanged.

use crate::abi::*;
use crate::model::{label, trampoline, Call, Hooks, PatchHooks};
use crate::value::{host, Value};
use crate::{DType, Error, Kind, Result, Tensor};
use std::ffi::c_void;

/// Which attention a site holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    /// Queries, keys and values from the same tokens.
    SelfAttention,
    /// Keys and values from a context (the captions).
    Cross,
    /// Two streams' tokens attending together (MMDiT).
    Joint,
}

impl AttentionKind {
    fn raw(self) -> i32 {
        match self {
            AttentionKind::SelfAttention => DF_ATTENTION_SELF,
            AttentionKind::Cross => DF_ATTENTION_CROSS,
            AttentionKind::Joint => DF_ATTENTION_JOINT,
        }
    }

    fn from_raw(raw: i32) -> AttentionKind {
        match raw {
            DF_ATTENTION_CROSS => AttentionKind::Cross,
            DF_ATTENTION_JOINT => AttentionKind::Joint,
            _ => AttentionKind::SelfAttention,
        }
    }
}

/// An attention site: block `block` of stack `stack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionSite {
    pub stack: usize,
    pub block: usize,
    pub kind: AttentionKind,
}

impl AttentionSite {
    fn raw(&self) -> DfSite {
        DfSite {
            stack: self.stack as u32,
            block: self.block as u32,
            site: DF_SITE_ATTN,
            attention: self.kind.raw() as u32,
        }
    }
}

/// A structured attention mask.
#[derive(Clone)]
pub enum Mask {
    /// Row `b` sees its first `lengths[b]` keys.
    KeyLengths(Vec<i64>),
    /// Query `i` sees key `j` when `allow[q[i] · n + k[j]]`.
    Segments {
        q: Vec<i64>,
        k: Vec<i64>,
        n: usize,
        allow: Vec<bool>,
    },
    /// An additive bias broadcasting to `[B, H, Lq, Lk]` (the slow path: avoid when a structured
    /// mask says the same).
    Dense(Tensor),
}

/// The bias a masked-out key gets: large enough that softmax drops it, finite so that gating a
/// row off (multiplying by 0) is exact.
const MASKED: f32 = -1e9;

fn i64_tensor(v: &[i64]) -> Result<Tensor> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    Tensor::from_bytes(Kind::Tensor, DType::I64, &[v.len()], &bytes)
}

fn i64s(v: *mut DfValue, what: &str) -> Result<Vec<i64>> {
    let v = Value::from_owned(v).ok_or_else(|| Error(format!("a mask without its {what}")))?;
    let t = v
        .as_tensor()?
        .cast(DType::I64)?
        .to_device(crate::Device::Cpu)?;
    Ok(t.bytes()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

impl Mask {
    /// Into its C form (the values owned by the receiver).
    fn into_raw(self, out: &mut DfAttentionMask) -> Result<()> {
        match self {
            Mask::KeyLengths(l) => {
                out.kind = DF_MASK_KEY_LENGTHS;
                out.key_lengths = i64_tensor(&l)?.into_value().into_raw();
            }
            Mask::Segments { q, k, n, allow } => {
                out.kind = DF_MASK_SEGMENT_IDS;
                out.n_segments = n as u32;
                out.q_segments = i64_tensor(&q)?.into_value().into_raw();
                out.k_segments = i64_tensor(&k)?.into_value().into_raw();
                let a: Vec<i64> = allow.iter().map(|&x| x as i64).collect();
                out.allow = i64_tensor(&a)?.into_value().into_raw();
            }
            Mask::Dense(t) => {
                out.kind = DF_MASK_DENSE;
                out.dense = t.into_value().into_raw();
            }
        }
        Ok(())
    }

    /// From its C form, taking the values.
    fn from_raw(m: &DfAttentionMask) -> Result<Option<Mask>> {
        Ok(match m.kind {
            DF_MASK_NONE => None,
            DF_MASK_KEY_LENGTHS => Some(Mask::KeyLengths(i64s(m.key_lengths, "key lengths")?)),
            DF_MASK_SEGMENT_IDS => Some(Mask::Segments {
                q: i64s(m.q_segments, "query segments")?,
                k: i64s(m.k_segments, "key segments")?,
                n: m.n_segments as usize,
                allow: i64s(m.allow, "allow table")?
                    .into_iter()
                    .map(|x| x != 0)
                    .collect(),
            }),
            DF_MASK_DENSE => Some(Mask::Dense(
                Value::from_owned(m.dense)
                    .ok_or_else(|| Error::new("a dense mask without its tensor"))?
                    .as_tensor()?,
            )),
            other => return Err(Error(format!("unknown mask kind {other}"))),
        })
    }

    /// The additive bias for `b` rows, `lq` queries and `lk` keys: `[B, 1, 1, Lk]` for key
    /// lengths, `[1, 1, Lq, Lk]` for segments.
    fn bias(&self, b: usize, lq: usize, lk: usize) -> Result<Tensor> {
        match self {
            Mask::KeyLengths(l) => {
                if l.len() != b {
                    return Err(Error(format!(
                        "a key-length mask for {} rows on a batch of {b}",
                        l.len()
                    )));
                }
                let mut v = vec![0f32; b * lk];
                for (row, &n) in l.iter().enumerate() {
                    for j in (n.max(0) as usize).min(lk)..lk {
                        v[row * lk + j] = MASKED;
                    }
                }
                Tensor::from_f32(Kind::Tensor, &[b, 1, 1, lk], &v)
            }
            Mask::Segments { q, k, n, allow } => {
                if q.len() != lq || k.len() != lk || allow.len() != n * n {
                    return Err(Error(format!(
                        "a segment mask of {} queries, {} keys and {} allow entries for {lq} queries, {lk} keys and {n} segments",
                        q.len(),
                        k.len(),
                        allow.len()
                    )));
                }
                let seg = |s: i64| -> Result<usize> {
                    usize::try_from(s)
                        .ok()
                        .filter(|&s| s < *n)
                        .ok_or_else(|| Error(format!("segment id {s} is not below {n}")))
                };
                let mut v = vec![0f32; lq * lk];
                for (i, &qs) in q.iter().enumerate() {
                    let qs = seg(qs)?;
                    for (j, &ks) in k.iter().enumerate() {
                        if !allow[qs * n + seg(ks)?] {
                            v[i * lk + j] = MASKED;
                        }
                    }
                }
                Tensor::from_f32(Kind::Tensor, &[1, 1, lq, lk], &v)
            }
            Mask::Dense(t) => t.cast(DType::F32),
        }
    }
}

/// The hooks a patch sets at attention sites (the [`PatchHooks`] methods' trampolines).
pub(crate) unsafe extern "C" fn edit_tramp<H: PatchHooks>(
    user: *mut c_void,
    host_api: *const DfHostApi,
    call: *const DfCallContext,
    site: *const DfSite,
    kind: i32,
    q: *mut *mut DfValue,
    k: *mut *mut DfValue,
    v: *mut *mut DfValue,
) -> i32 {
    trampoline(host_api, || {
        // SAFETY: the user data made for `H`, and live arguments.
        let (h, call, site) = unsafe {
            (
                &*(user as *const H),
                Call::from_raw(call),
                site.as_ref().ok_or_else(|| Error::new("no site"))?,
            )
        };
        if q.is_null() || k.is_null() || v.is_null() {
            return Err(Error::new("no q, k or v"));
        }
        let site = AttentionSite {
            stack: site.stack as usize,
            block: site.block as usize,
            kind: AttentionKind::from_raw(kind),
        };
        // SAFETY: the caller's live values, borrowed for the call.
        let get = |p: *mut *mut DfValue| -> Result<Tensor> {
            Value::from_borrowed(unsafe { *p })
                .ok_or_else(|| Error::new("no tensor"))?
                .as_tensor()
        };
        let (qt, kt, vt) = (get(q)?, get(k)?, get(v)?);
        if let Some((nq, nk, nv)) = h.attention_edit(&call, &site, &qt, &kt, &vt)? {
            // SAFETY: the caller owned the old values; hand back owned new ones.
            unsafe {
                for (slot, t) in [(q, nq), (k, nk), (v, nv)] {
                    drop(Value::from_owned(*slot));
                    *slot = t.into_value().into_raw();
                }
            }
        }
        Ok(())
    })
}

pub(crate) unsafe extern "C" fn mask_tramp<H: PatchHooks>(
    user: *mut c_void,
    host_api: *const DfHostApi,
    call: *const DfCallContext,
    site: *const DfSite,
    kind: i32,
    mask: *mut DfAttentionMask,
) -> i32 {
    trampoline(host_api, || {
        // SAFETY: the user data made for `H`, and live arguments.
        let (h, call, site, out) = unsafe {
            (
                &*(user as *const H),
                Call::from_raw(call),
                site.as_ref().ok_or_else(|| Error::new("no site"))?,
                mask.as_mut().ok_or_else(|| Error::new("no mask slot"))?,
            )
        };
        let site = AttentionSite {
            stack: site.stack as usize,
            block: site.block as usize,
            kind: AttentionKind::from_raw(kind),
        };
        out.kind = DF_MASK_NONE;
        if let Some(m) = h.attention_mask(&call, &site)? {
            m.into_raw(out)?;
        }
        Ok(())
    })
}

pub(crate) unsafe extern "C" fn extra_tramp<H: PatchHooks>(
    user: *mut c_void,
    host_api: *const DfHostApi,
    call: *const DfCallContext,
    site: *const DfSite,
    q: *const DfValue,
    out: *mut *mut DfValue,
) -> i32 {
    trampoline(host_api, || {
        // SAFETY: the user data made for `H`, and live arguments.
        let (h, call, site) = unsafe {
            (
                &*(user as *const H),
                Call::from_raw(call),
                site.as_ref().ok_or_else(|| Error::new("no site"))?,
            )
        };
        if out.is_null() {
            return Err(Error::new("no output slot"));
        }
        let site = AttentionSite {
            stack: site.stack as usize,
            block: site.block as usize,
            kind: AttentionKind::from_raw(site.attention as i32),
        };
        let q = Value::from_borrowed(q)
            .ok_or_else(|| Error::new("no query"))?
            .as_tensor()?;
        let d = h.attention_extra(&call, &site, &q)?;
        // SAFETY: checked for NULL.
        unsafe { *out = d.map_or(std::ptr::null_mut(), |d| d.into_value().into_raw()) };
        Ok(())
    })
}

/// A row gate `[B, 1, 1]` (or `[B, 1, 1, 1]`) of 0 and 1, or `None` when every row is on.
fn row_gate(rows: &[f32], rank: usize) -> Result<Option<Tensor>> {
    if rows.iter().all(|&r| r == 1.0) {
        return Ok(None);
    }
    let mut shape = vec![rows.len()];
    shape.resize(rank, 1);
    Ok(Some(Tensor::from_f32(Kind::Tensor, &shape, rows)?))
}

/// `a` where the gate is 0, `b` where it is 1 (exact for a 0/1 gate).
fn blend(a: &Tensor, b: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let g = gate.to_device(a.device())?;
    let keep = g.affine(-1.0, 1.0)?;
    a.mul(&keep)?.add(&b.mul(&g)?)
}

impl Hooks<'_> {
    /// The attention patches active at `site` at this call, with their row gates.
    fn attention_patches(
        &self,
        site: &AttentionSite,
        pick: impl Fn(&DfPatchDesc) -> bool,
    ) -> Vec<(&DfPatchDesc, Vec<f32>)> {
        let frac = self.call.fraction();
        self.patches
            .iter()
            .copied()
            .filter(|p| pick(p) && p.stack == site.stack as i32)
            .filter(|p| {
                let (first, last) = crate::model::block_range(p, usize::MAX);
                site.block >= first && site.block <= last && frac >= p.start && frac < p.end
            })
            .filter_map(|p| {
                let rows = self.rows(p);
                rows.iter().any(|&r| r != 0.0).then_some((p, rows))
            })
            .collect()
    }

    /// Whether any attention hook may run at `site` (a model keeps its fused path otherwise).
    pub fn has_attention(&self, site: &AttentionSite) -> bool {
        !self.patches.is_empty()
            && !self
                .attention_patches(site, |p| {
                    p.attention_edit.is_some()
                        || p.attention_mask.is_some()
                        || p.attention_extra.is_some()
                })
                .is_empty()
    }

    /// Whether an attention edit may run at `site`: the edit reads q, k and v as tensors of their
    /// own, so a model hands them over separately ([`Hooks::attention_qkv`]) rather than as
    /// column ranges of fused projections.
    pub fn has_attention_edit(&self, site: &AttentionSite) -> bool {
        !self.patches.is_empty()
            && !self
                .attention_patches(site, |p| p.attention_edit.is_some())
                .is_empty()
    }

    /// Attention at `site` with the patches' hooks: queries from `q_src` columns `offsets[0]..`,
    /// keys and values from `kv_src` columns `offsets[1]..` and `offsets[2]..` (`[B, L, C]`),
    /// under the model's additive `mask`. Returns `[B, Lq, heads·head_dim]`, before the output
    /// projection. Masks and extra branches run on the fused projections; an edit copies q, k
    /// and v out of them (a model avoids that with [`Hooks::attention_qkv`]).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        site: &AttentionSite,
        q_src: &Tensor,
        kv_src: &Tensor,
        offsets: [usize; 3],
        mask: Option<&Tensor>,
        heads: usize,
        head_dim: usize,
    ) -> Result<Tensor> {
        let d = heads * head_dim;
        let columns = |t: &Tensor, at: usize| -> Result<Tensor> {
            if at == 0 && t.shape().last() == Some(&d) {
                Ok(t.clone())
            } else {
                t.slice(2, at as i64, (at + d) as i64, 1)
            }
        };
        if self.has_attention_edit(site) {
            return self.attention_qkv(
                site,
                columns(q_src, offsets[0])?,
                columns(kv_src, offsets[1])?,
                columns(kv_src, offsets[2])?,
                mask,
                heads,
                head_dim,
            );
        }
        let (b, lq, lk) = (q_src.shape()[0], q_src.shape()[1], kv_src.shape()[1]);
        let bias = self.masks(site, mask, b, lq, lk, q_src.device())?;
        let o = crate::ops::attention_fused(
            q_src,
            kv_src,
            bias.as_ref(),
            heads,
            head_dim,
            offsets,
            None,
        )?;
        self.add_extras(site, o, || columns(q_src, offsets[0]))
    }

    /// Attention at `site` from separate projections `q` `[B, Lq, H·D]`, `k` and `v`
    /// `[B, Lk, H·D]`, running the patches' edits, masks and extra branches; the kernel reads
    /// the heads in place. Returns `[B, Lq, H·D]`, before the output projection.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_qkv(
        &self,
        site: &AttentionSite,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Option<&Tensor>,
        heads: usize,
        head_dim: usize,
    ) -> Result<Tensor> {
        let (q, k, v) = self.edits(site, q, k, v)?;
        let (b, lq, lk) = (q.shape()[0], q.shape()[1], k.shape()[1]);
        let bias = self.masks(site, mask, b, lq, lk, q.device())?;
        let o = crate::ops::attention_qkv(&q, &k, &v, bias.as_ref(), heads, head_dim)?;
        self.add_extras(site, o, || Ok(q))
    }

    /// q, k and v after the edits at `site`, in patch order (each gated to its rows).
    fn edits(
        &self,
        site: &AttentionSite,
        q: Tensor,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let edits = self.attention_patches(site, |p| p.attention_edit.is_some());
        let raw_call = self.call_raw();
        let raw_site = site.raw();
        let (mut q, mut k, mut v) = (q, k, v);
        for (p, rows) in &edits {
            let f = p.attention_edit.ok_or_else(|| Error::new("no edit"))?;
            let mut slots = [
                q.clone().into_value().into_raw(),
                k.clone().into_value().into_raw(),
                v.clone().into_value().into_raw(),
            ];
            let before = slots;
            let [sq, sk, sv] = &mut slots;
            // SAFETY: the patch's hook with its user data; the slots hold owned values.
            let rc = unsafe {
                f(
                    p.user_data,
                    host(),
                    raw_call.as_ptr(),
                    &raw_site,
                    site.kind.raw(),
                    sq,
                    sk,
                    sv,
                )
            };
            let same = slots == before;
            let taken: Vec<Option<Value>> = slots.iter().map(|&s| Value::from_owned(s)).collect();
            if rc != DF_OK {
                return Err(Error(format!(
                    "{} failed in its attention edit: {}",
                    label(p),
                    crate::ops::last_error()
                )));
            }
            if same {
                continue;
            }
            let mut new = Vec::new();
            for t in taken {
                new.push(
                    t.ok_or_else(|| Error(format!("{} dropped q, k or v", label(p))))?
                        .as_tensor()?,
                );
            }
            let gate = row_gate(rows, 3)?;
            let pick = |old: &Tensor, new: &Tensor| -> Result<Tensor> {
                match &gate {
                    None => Ok(new.clone()),
                    Some(g) => blend(old, new, g),
                }
            };
            (q, k, v) = (pick(&q, &new[0])?, pick(&k, &new[1])?, pick(&v, &new[2])?);
        }
        Ok((q, k, v))
    }

    /// The model's additive `mask` with the patches' masks at `site` added (each gated to its
    /// rows), for `b` rows, `lq` queries and `lk` keys.
    #[allow(clippy::too_many_arguments)]
    fn masks(
        &self,
        site: &AttentionSite,
        mask: Option<&Tensor>,
        b: usize,
        lq: usize,
        lk: usize,
        device: crate::Device,
    ) -> Result<Option<Tensor>> {
        let masks = self.attention_patches(site, |p| p.attention_mask.is_some());
        let raw_call = self.call_raw();
        let raw_site = site.raw();
        let mut bias = mask.cloned();
        for (p, rows) in &masks {
            let f = p.attention_mask.ok_or_else(|| Error::new("no mask hook"))?;
            let mut m = DfAttentionMask {
                size: std::mem::size_of::<DfAttentionMask>() as u32,
                kind: DF_MASK_NONE,
                n_segments: 0,
                _pad: 0,
                key_lengths: std::ptr::null_mut(),
                q_segments: std::ptr::null_mut(),
                k_segments: std::ptr::null_mut(),
                allow: std::ptr::null_mut(),
                dense: std::ptr::null_mut(),
            };
            // SAFETY: the patch's hook with its user data and a mask to fill.
            let rc = unsafe {
                f(
                    p.user_data,
                    host(),
                    raw_call.as_ptr(),
                    &raw_site,
                    site.kind.raw(),
                    &mut m,
                )
            };
            let got = Mask::from_raw(&m);
            if rc != DF_OK {
                return Err(Error(format!(
                    "{} failed in its attention mask: {}",
                    label(p),
                    crate::ops::last_error()
                )));
            }
            let Some(got) = got.map_err(|e| Error(format!("{}: {e}", label(p))))? else {
                continue;
            };
            let mut extra = got
                .bias(b, lq, lk)
                .map_err(|e| Error(format!("{}: {e}", label(p))))?
                .to_device(device)?;
            if let Some(g) = row_gate(rows, 4)? {
                extra = extra.mul(&g.to_device(device)?)?;
            }
            bias = Some(match bias {
                None => extra,
                Some(m) => m.add(&extra)?,
            });
        }
        Ok(bias)
    }

    /// Adds the extra branches at `site` to the attention output `o`, from the queries (`q`, or
    /// made by `make_q` when an extra branch needs them).
    fn add_extras(
        &self,
        site: &AttentionSite,
        o: Tensor,
        make_q: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        match self.attention_extras(site, make_q)? {
            Some(extra) => o.add(&extra.cast(o.dtype())?),
            None => Ok(o),
        }
    }

    /// The sum of the extra attention branches at `site` from its queries `[B, L, H·D]` (made
    /// only when a branch runs), each scaled by its patch's strength and gated to its rows;
    /// `None` when no branch runs. Most models add it to the attention's output before the
    /// output projection ([`Hooks::attention`] does); a model whose reference adds such a
    /// branch elsewhere (Flux's IP-Adapter: after the block's feed-forward) calls this and adds
    /// it there.
    pub fn attention_extras(
        &self,
        site: &AttentionSite,
        make_q: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Option<Tensor>> {
        let extras = self.attention_patches(site, |p| p.attention_extra.is_some());
        if extras.is_empty() {
            return Ok(None);
        }
        let q = make_q()?;
        let raw_call = self.call_raw();
        let raw_site = site.raw();
        let mut sum: Option<Tensor> = None;
        for (p, rows) in &extras {
            let f = p
                .attention_extra
                .ok_or_else(|| Error::new("no extra hook"))?;
            let mut out: *mut DfValue = std::ptr::null_mut();
            // SAFETY: the patch's hook with its user data and live arguments.
            let rc = unsafe {
                f(
                    p.user_data,
                    host(),
                    raw_call.as_ptr(),
                    &raw_site,
                    q.as_value().as_ptr(),
                    &mut out,
                )
            };
            if rc != DF_OK {
                return Err(Error(format!(
                    "{} failed in its extra attention branch: {}",
                    label(p),
                    crate::ops::last_error()
                )));
            }
            let Some(delta) = Value::from_owned(out) else {
                continue;
            };
            let mut delta = delta.as_tensor()?.cast(crate::DType::F32)?;
            if delta.shape() != q.shape() {
                return Err(Error(format!(
                    "{}: an extra attention branch of {:?} for queries of {:?}",
                    label(p),
                    delta.shape(),
                    q.shape()
                )));
            }
            if p.strength != 1.0 {
                delta = delta.affine(p.strength, 0.0)?;
            }
            if let Some(g) = row_gate(rows, 3)? {
                delta = delta.mul(&g.to_device(q.device())?)?;
            }
            sum = Some(match sum {
                Some(s) => s.add(&delta)?,
                None => delta,
            });
        }
        Ok(sum)
    }
}

/// A call context in its C form, kept alive while hooks read it.
pub(crate) struct RawCall(pub(crate) DfCallContext, *const DfCallContext);

impl RawCall {
    pub(crate) fn new(c: DfCallContext, given: *const DfCallContext) -> RawCall {
        RawCall(c, given)
    }

    pub(crate) fn as_ptr(&self) -> *const DfCallContext {
        if self.1.is_null() {
            &self.0
        } else {
            self.1
        }
    }
}
