//! The runtime's tensor engine from plugin code: [`Tensor`] methods that call the host's ops by
//! name (`tensor_op` in the C ABI), the [`Device`] a tensor lives on, zero-copy writable tensors,
//! and weights loading. The kernels run in the host, shared by every plugin; nothing here computes.

use crate::abi::{self, DfOpAttr, DfValue};
use crate::value::{host, Kind, Tensor, Value};
use crate::{Context, DType, Error, Result};
use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};

/// A device: the CPU or CUDA device `n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl Device {
    pub(crate) fn from_raw(code: i32) -> Option<Device> {
        match code {
            abi::DF_DEVICE_CPU => Some(Device::Cpu),
            c if c >= abi::DF_DEVICE_CUDA0 => {
                Some(Device::Cuda((c - abi::DF_DEVICE_CUDA0) as usize))
            }
            _ => None,
        }
    }

    pub(crate) fn raw(self) -> i32 {
        match self {
            Device::Cpu => abi::DF_DEVICE_CPU,
            Device::Cuda(n) => abi::DF_DEVICE_CUDA0 + n as i32,
        }
    }

    /// The name ops take: `cpu` or `cuda:N`.
    pub fn name(self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda(n) => format!("cuda:{n}"),
        }
    }
}

/// An op attribute.
#[derive(Clone, Copy, Debug)]
pub enum Attr<'a> {
    Int(i64),
    Float(f64),
    Ints(&'a [i64]),
    Str(&'a str),
}

pub(crate) fn last_error() -> String {
    // SAFETY: the host returns a NUL-terminated string valid until its next call on this thread.
    let p = unsafe { (host().last_error)() };
    if p.is_null() {
        return "unknown error".into();
    }
    // SAFETY: as above.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Calls op `op` (see `ditflow ops`) with optional tensor inputs and attributes; outputs take
/// `out_kind`, or the first input's kind.
pub fn call(
    op: &str,
    inputs: &[Option<&Tensor>],
    attrs: &[(&str, Attr)],
    out_kind: Option<Kind>,
) -> Result<Vec<Tensor>> {
    let name = CString::new(op).map_err(|_| Error::new("op name contains NUL"))?;
    let handles: Vec<*const DfValue> = inputs
        .iter()
        .map(|t| t.map_or(std::ptr::null(), |t| t.as_value().as_ptr()))
        .collect();
    let mut keep: Vec<CString> = Vec::new();
    let mut raw: Vec<DfOpAttr> = Vec::with_capacity(attrs.len());
    for (n, a) in attrs {
        keep.push(CString::new(*n).map_err(|_| Error::new("attribute name contains NUL"))?);
        let name_ptr = keep.last().expect("just pushed").as_ptr();
        let mut r = DfOpAttr {
            name: name_ptr,
            kind: 0,
            _pad: 0,
            i: 0,
            f: 0.0,
            ints: std::ptr::null(),
            n_ints: 0,
            s: std::ptr::null(),
        };
        match a {
            Attr::Int(v) => (r.kind, r.i) = (abi::DF_ATTR_INT, *v),
            Attr::Float(v) => (r.kind, r.f) = (abi::DF_ATTR_FLOAT, *v),
            Attr::Ints(v) => (r.kind, r.ints, r.n_ints) = (abi::DF_ATTR_INTS, v.as_ptr(), v.len()),
            Attr::Str(v) => {
                keep.push(
                    CString::new(*v).map_err(|_| Error::new("attribute value contains NUL"))?,
                );
                (r.kind, r.s) = (
                    abi::DF_ATTR_STRING,
                    keep.last().expect("just pushed").as_ptr() as *const c_char,
                );
            }
        }
        raw.push(r);
    }
    let mut outs: [*mut DfValue; 16] = [std::ptr::null_mut(); 16];
    let mut n_out = 0usize;
    // SAFETY: every pointer is valid for the call; the host writes at most 16 outputs.
    let rc = unsafe {
        (host().tensor_op)(
            name.as_ptr(),
            handles.as_ptr(),
            handles.len(),
            raw.as_ptr(),
            raw.len(),
            out_kind.map_or(0, Kind::raw),
            outs.as_mut_ptr(),
            outs.len(),
            &mut n_out,
        )
    };
    if rc != abi::DF_OK {
        return Err(Error(last_error()));
    }
    outs[..n_out]
        .iter()
        .map(|&p| {
            Tensor::from_owned_value(
                Value::from_owned(p).ok_or_else(|| Error::new("the host returned no output"))?,
            )
        })
        .collect()
}

fn one(op: &str, inputs: &[Option<&Tensor>], attrs: &[(&str, Attr)]) -> Result<Tensor> {
    call(op, inputs, attrs, None)?
        .pop()
        .ok_or_else(|| Error(format!("{op} returned nothing")))
}

fn ints(xs: &[usize]) -> Vec<i64> {
    xs.iter().map(|&x| x as i64).collect()
}

/// Scaled-dot-product attention: q `[B,H,Lq,D]`, k `[B,H,Lk,D]`, v `[B,H,Lk,Dv]`; the mask
/// broadcasts to `[B,H,Lq,Lk]` (float: added; u8: keep where non-zero).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: Option<f32>,
) -> Result<Tensor> {
    match scale {
        Some(s) => one(
            "attention",
            &[Some(q), Some(k), Some(v), mask],
            &[("scale", Attr::Float(s as f64))],
        ),
        None => one("attention", &[Some(q), Some(k), Some(v), mask], &[]),
    }
}

/// Multi-head attention reading the heads straight from `[B, L, C]` projections: queries are
/// `heads·head_dim` columns of `q_src` from `offsets[0]`, keys and values as many columns of
/// `kv_src` from `offsets[1]` and `offsets[2]`. Returns `[B, Lq, heads·head_dim]`.
pub fn attention_fused(
    q_src: &Tensor,
    kv_src: &Tensor,
    mask: Option<&Tensor>,
    heads: usize,
    head_dim: usize,
    offsets: [usize; 3],
    scale: Option<f32>,
) -> Result<Tensor> {
    let mut attrs = vec![
        ("heads", Attr::Int(heads as i64)),
        ("head_dim", Attr::Int(head_dim as i64)),
        ("q_offset", Attr::Int(offsets[0] as i64)),
        ("k_offset", Attr::Int(offsets[1] as i64)),
        ("v_offset", Attr::Int(offsets[2] as i64)),
    ];
    if let Some(s) = scale {
        attrs.push(("scale", Attr::Float(s as f64)));
    }
    one(
        "attention_fused",
        &[Some(q_src), Some(kv_src), mask],
        &attrs,
    )
}

/// Multi-head attention from separate projections `q` `[B, Lq, H·D]`, `k` and `v`
/// `[B, Lk, H·D]` (no copies: the kernel reads the heads in place). Returns `[B, Lq, H·D]`.
pub fn attention_qkv(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    heads: usize,
    head_dim: usize,
) -> Result<Tensor> {
    one(
        "attention_fused",
        &[Some(q), Some(k), mask, Some(v)],
        &[
            ("heads", Attr::Int(heads as i64)),
            ("head_dim", Attr::Int(head_dim as i64)),
            ("q_offset", Attr::Int(0)),
            ("k_offset", Attr::Int(0)),
            ("v_offset", Attr::Int(0)),
        ],
    )
}

/// Joins tensors along `axis`.
pub fn concat(xs: &[&Tensor], axis: i64) -> Result<Tensor> {
    let inputs: Vec<Option<&Tensor>> = xs.iter().map(|t| Some(*t)).collect();
    one("concat", &inputs, &[("axis", Attr::Int(axis))])
}

/// Token sequences `[B, L, D]` zero-padded at the end to `len` tokens (unchanged when `L` is
/// already that long), in their dtype and on their device.
pub fn pad_tokens(x: &Tensor, len: usize) -> Result<Tensor> {
    match *x.shape() {
        [b, l, d] if l < len => {
            let zeros =
                Tensor::zeros(Kind::Tensor, x.dtype(), &[b, len - l, d])?.to_device(x.device())?;
            concat(&[x, &zeros], 1)
        }
        _ => Ok(x.clone()),
    }
}

/// Seeded standard-normal f32 noise on `device` (the same numbers on every device).
pub fn randn(shape: &[usize], seed: u64, device: Device) -> Result<Tensor> {
    randn_stream(shape, seed, 0, device)
}

/// [`randn`] from one of the seed's independent streams: stream 0 is [`randn`]'s, and a
/// stochastic sampler's step `k` draws from stream `k + 1`.
pub fn randn_stream(shape: &[usize], seed: u64, stream: u64, device: Device) -> Result<Tensor> {
    let s = ints(shape);
    let dev = device.name();
    one(
        "randn",
        &[],
        &[
            ("shape", Attr::Ints(&s)),
            ("seed", Attr::Int(seed as i64)),
            ("stream", Attr::Int(stream as i64)),
            ("device", Attr::Str(&dev)),
        ],
    )
}

/// RoPE tables `(cos, sin)`, each `[L, Σdims/2]`, for positions `[L, axes]`.
pub fn rope_tables(positions: &Tensor, dims: &[usize], theta: f64) -> Result<(Tensor, Tensor)> {
    let d = ints(dims);
    let mut v = call(
        "rope_tables",
        &[Some(positions)],
        &[("dims", Attr::Ints(&d)), ("theta", Attr::Float(theta))],
        Some(Kind::Tensor),
    )?;
    let sin = v
        .pop()
        .ok_or_else(|| Error::new("rope_tables returned nothing"))?;
    let cos = v
        .pop()
        .ok_or_else(|| Error::new("rope_tables returned one table"))?;
    Ok((cos, sin))
}

impl Tensor {
    /// A tensor of zeros on the CPU, writable in place through [`Tensor::data_mut`].
    pub fn zeros(kind: Kind, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let dims = ints(shape);
        // SAFETY: valid pointers; NULL data asks for zeros.
        let raw = unsafe {
            (host().value_tensor)(
                kind.raw(),
                dtype.raw(),
                dims.as_ptr(),
                dims.len(),
                std::ptr::null(),
                0,
            )
        };
        Tensor::from_owned_value(Value::from_owned(raw).ok_or_else(|| {
            Error(format!(
                "cannot make a {} tensor of shape {shape:?}",
                dtype.name()
            ))
        })?)
    }

    /// The device the data is on.
    pub fn device(&self) -> Device {
        // SAFETY: a live value.
        Device::from_raw(unsafe { (host().value_tensor_device)(self.as_value().as_ptr()) })
            .unwrap_or_default()
    }

    /// Writable bytes, zero-copy, when this handle alone owns CPU data (a fresh tensor).
    pub fn data_mut(&mut self) -> Result<&mut [u8]> {
        let mut n = 0usize;
        // SAFETY: a live value this handle owns.
        let p = unsafe {
            (host().value_tensor_data_mut)(self.as_value().as_ptr() as *mut DfValue, &mut n)
        };
        if p.is_null() {
            return Err(Error::new("the tensor's data is shared, mapped or on a GPU: make a fresh tensor to write into"));
        }
        // SAFETY: the host returns `n` writable bytes owned by this value.
        Ok(unsafe { std::slice::from_raw_parts_mut(p as *mut u8, n) })
    }

    /// Writable f32 elements, zero-copy (see [`Tensor::data_mut`]).
    pub fn as_f32_mut(&mut self) -> Result<&mut [f32]> {
        if self.dtype() != DType::F32 {
            return Err(Error(format!(
                "expected an f32 tensor, got {}",
                self.dtype().name()
            )));
        }
        let bytes = self.data_mut()?;
        // SAFETY: host tensor storage is 64-byte aligned and holds whole f32s.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut f32, bytes.len() / 4)
        })
    }

    /// A copy on `device`.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        let d = device.name();
        one("to_device", &[Some(self)], &[("device", Attr::Str(&d))])
    }

    pub fn cast(&self, dtype: DType) -> Result<Tensor> {
        one("cast", &[Some(self)], &[("dtype", Attr::Str(dtype.name()))])
    }

    /// `op(self)·op(b)` over the last two axes.
    pub fn matmul(&self, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
        one(
            "matmul",
            &[Some(self), Some(b)],
            &[
                ("trans_a", Attr::Int(trans_a as i64)),
                ("trans_b", Attr::Int(trans_b as i64)),
            ],
        )
    }

    /// The values as f32 on the host, whatever the dtype and device (small inputs: timesteps,
    /// labels, guidance scales).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        self.cast(crate::DType::F32)?
            .to_device(Device::Cpu)?
            .as_f32()
            .map(<[f32]>::to_vec)
    }

    /// `self·wᵀ + bias` then `activation` (`none`, `gelu`, `gelu_tanh`, `silu`, `relu`).
    pub fn linear(&self, w: &Tensor, bias: Option<&Tensor>, activation: &str) -> Result<Tensor> {
        one(
            "linear",
            &[Some(self), Some(w), bias],
            &[("activation", Attr::Str(activation))],
        )
    }

    /// [`Tensor::linear`] with its output columns as `parts` separate tensors (a fused QKV
    /// projection as q, k and v), made by one product without copies where the kernel can.
    pub fn linear_split(
        &self,
        w: &Tensor,
        bias: Option<&Tensor>,
        activation: &str,
        parts: usize,
    ) -> Result<Vec<Tensor>> {
        call(
            "linear_split",
            &[Some(self), Some(w), bias],
            &[
                ("activation", Attr::Str(activation)),
                ("parts", Attr::Int(parts as i64)),
            ],
            None,
        )
    }

    /// The `k` largest along the last axis, descending (ties: the lower index first): values
    /// and i64 indices, as `torch.topk`.
    pub fn topk(&self, k: usize) -> Result<(Tensor, Tensor)> {
        let mut v = call("topk", &[Some(self)], &[("k", Attr::Int(k as i64))], None)?;
        match (v.pop(), v.pop()) {
            (Some(idx), Some(vals)) => Ok((vals, idx)),
            _ => Err(Error::new("topk returned too few outputs")),
        }
    }

    /// `self` `[M, D]` with the rows of `src` `[R, D]` added at rows `index` `[R]`
    /// (`torch.index_add` on axis 0).
    pub fn index_add(&self, index: &Tensor, src: &Tensor) -> Result<Tensor> {
        one("index_add", &[Some(self), Some(index), Some(src)], &[])
    }

    /// 1-, 2- or 3-D convolution (`[N, C, *S]` by `[O, C/groups, *K]`).
    pub fn conv(
        &self,
        w: &Tensor,
        bias: Option<&Tensor>,
        stride: &[usize],
        padding: &[usize],
        groups: usize,
    ) -> Result<Tensor> {
        self.conv_dilated(w, bias, stride, padding, &[], groups)
    }

    /// [`Tensor::conv`] with a dilation per spatial axis (one value for all; empty for 1).
    pub fn conv_dilated(
        &self,
        w: &Tensor,
        bias: Option<&Tensor>,
        stride: &[usize],
        padding: &[usize],
        dilation: &[usize],
        groups: usize,
    ) -> Result<Tensor> {
        let (s, p, d) = (ints(stride), ints(padding), ints(dilation));
        one(
            "conv",
            &[Some(self), Some(w), bias],
            &[
                ("stride", Attr::Ints(&s)),
                ("padding", Attr::Ints(&p)),
                ("dilation", Attr::Ints(&d)),
                ("groups", Attr::Int(groups as i64)),
            ],
        )
    }

    /// Layer norm over the last axis, then `·(1 + scale) + shift` (adaLN, fused).
    pub fn layer_norm(
        &self,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        shift: Option<&Tensor>,
        scale: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        one(
            "layer_norm",
            &[Some(self), weight, bias, shift, scale],
            &[("eps", Attr::Float(eps as f64))],
        )
    }

    pub fn rms_norm(&self, weight: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        one(
            "rms_norm",
            &[Some(self), weight],
            &[("eps", Attr::Float(eps as f64))],
        )
    }

    /// Group norm of `[N, C, *S]`, the affine, then `activation`.
    pub fn group_norm(
        &self,
        groups: usize,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
        activation: &str,
    ) -> Result<Tensor> {
        one(
            "group_norm",
            &[Some(self), weight, bias],
            &[
                ("groups", Attr::Int(groups as i64)),
                ("eps", Attr::Float(eps as f64)),
                ("activation", Attr::Str(activation)),
            ],
        )
    }

    pub fn softmax(&self, axis: i64) -> Result<Tensor> {
        one("softmax", &[Some(self)], &[("axis", Attr::Int(axis))])
    }

    /// Rotary embedding by tables from [`rope_tables`].
    pub fn rope(&self, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
        one(
            "rope",
            &[Some(self), Some(cos), Some(sin)],
            &[("interleaved", Attr::Int(interleaved as i64))],
        )
    }

    /// [`Tensor::rope`] of `heads` heads side by side: `self` `[.., L, heads·Dh]`, as a projection
    /// writes them, each head rotated at its row's position (then [`attention_fused`] reads
    /// them in place, with no per-head copies).
    pub fn rope_heads(
        &self,
        cos: &Tensor,
        sin: &Tensor,
        interleaved: bool,
        heads: usize,
    ) -> Result<Tensor> {
        one(
            "rope",
            &[Some(self), Some(cos), Some(sin)],
            &[
                ("interleaved", Attr::Int(interleaved as i64)),
                ("heads", Attr::Int(heads as i64)),
            ],
        )
    }

    /// An elementwise function by name (`exp`, `silu`, `gelu`, ...).
    pub fn unary(&self, f: &str) -> Result<Tensor> {
        one("unary", &[Some(self)], &[("fn", Attr::Str(f))])
    }

    fn binary(&self, b: &Tensor, f: &str) -> Result<Tensor> {
        one("binary", &[Some(self), Some(b)], &[("fn", Attr::Str(f))])
    }

    /// Broadcasting `self + b`.
    pub fn add(&self, b: &Tensor) -> Result<Tensor> {
        self.binary(b, "add")
    }

    pub fn sub(&self, b: &Tensor) -> Result<Tensor> {
        self.binary(b, "sub")
    }

    pub fn mul(&self, b: &Tensor) -> Result<Tensor> {
        self.binary(b, "mul")
    }

    pub fn div(&self, b: &Tensor) -> Result<Tensor> {
        self.binary(b, "div")
    }

    /// Elementwise `max(self, b)` (broadcasting).
    pub fn maximum(&self, b: &Tensor) -> Result<Tensor> {
        self.binary(b, "maximum")
    }

    /// Elementwise `min(self, b)` (broadcasting).
    pub fn minimum(&self, b: &Tensor) -> Result<Tensor> {
        self.binary(b, "minimum")
    }

    /// Clamps every element into `[lo, hi]`.
    pub fn clamp(&self, lo: f32, hi: f32) -> Result<Tensor> {
        let bounds = Tensor::from_f32(Kind::Tensor, &[2], &[lo, hi])?.to_device(self.device())?;
        let (lo, hi) = (bounds.slice(0, 0, 1, 1)?, bounds.slice(0, 1, 2, 1)?);
        self.maximum(&lo)?.minimum(&hi)
    }

    /// `self·mul + add`.
    pub fn affine(&self, mul: f64, add: f64) -> Result<Tensor> {
        one(
            "affine",
            &[Some(self)],
            &[("mul", Attr::Float(mul)), ("add", Attr::Float(add))],
        )
    }

    /// `self + gate ⊙ y` (adaLN's gated residual).
    pub fn gated_residual(&self, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
        one("gated_residual", &[Some(self), Some(y), Some(gate)], &[])
    }

    /// `sum`, `mean`, `max` or `min` over `axes` (all when empty).
    pub fn reduce(&self, f: &str, axes: &[i64], keepdim: bool) -> Result<Tensor> {
        one(
            "reduce",
            &[Some(self)],
            &[
                ("fn", Attr::Str(f)),
                ("axes", Attr::Ints(axes)),
                ("keepdim", Attr::Int(keepdim as i64)),
            ],
        )
    }

    /// The same data in another shape (one entry may be -1); shares storage.
    pub fn reshape(&self, shape: &[i64]) -> Result<Tensor> {
        one("reshape", &[Some(self)], &[("shape", Attr::Ints(shape))])
    }

    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let p = ints(perm);
        one("permute", &[Some(self)], &[("perm", Attr::Ints(&p))])
    }

    /// `self[start:end:step]` along `axis`.
    pub fn slice(&self, axis: i64, start: i64, end: i64, step: usize) -> Result<Tensor> {
        one(
            "slice",
            &[Some(self)],
            &[
                ("axis", Attr::Int(axis)),
                ("start", Attr::Int(start)),
                ("end", Attr::Int(end)),
                ("step", Attr::Int(step as i64)),
            ],
        )
    }

    pub fn split(&self, axis: i64, sizes: &[usize]) -> Result<Vec<Tensor>> {
        let s = ints(sizes);
        call(
            "split",
            &[Some(self)],
            &[("axis", Attr::Int(axis)), ("sizes", Attr::Ints(&s))],
            None,
        )
    }

    /// Resizes the last two axes: `nearest` or `bilinear`.
    pub fn upsample(&self, height: usize, width: usize, mode: &str) -> Result<Tensor> {
        let s = [height as i64, width as i64];
        one(
            "upsample",
            &[Some(self)],
            &[("size", Attr::Ints(&s)), ("mode", Attr::Str(mode))],
        )
    }

    /// Rows of this `[V, D]` table picked by integer `ids`.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        one("embedding", &[Some(self), Some(ids)], &[])
    }
}

impl Context {
    /// The run's device (`--device`).
    pub fn device(&self) -> Device {
        // SAFETY: the running callback's context.
        Device::from_raw(unsafe { (host().run_device)(self.raw()) }).unwrap_or_default()
    }

    /// Opens weights (a `.safetensors` file, a sharded index, or a diffusers folder; relative to
    /// the graph's folder), memory-mapped, with tensors on `device`.
    pub fn load_weights(&self, path: &str, device: Device) -> Result<HashMap<String, Tensor>> {
        let p = CString::new(path).map_err(|_| Error::new("path contains NUL"))?;
        // SAFETY: valid pointers.
        let raw = unsafe { (host().load_weights)(self.raw(), p.as_ptr(), device.raw()) };
        let list = Value::from_owned(raw).ok_or_else(|| Error(last_error()))?;
        let mut out = HashMap::new();
        for pair in list.as_list()? {
            let items = pair.as_list()?;
            let [name, tensor] = &items[..] else {
                return Err(Error::new("malformed weights list from the host"));
            };
            out.insert(name.as_str()?.to_string(), tensor.as_tensor()?);
        }
        Ok(out)
    }
}
