//! The op dispatcher: every tensor op checks its arguments once here, then runs on the device
//! the inputs live on (CPU kernels, or CUDA kernels when built with `cuda`).
//!
//! Ops compute in f32. f16 and bf16 inputs are widened on the way in and the result is narrowed
//! back to the first input's dtype, so a half-precision model stays half-precision in memory.
//! Shapes follow PyTorch's conventions, named in each op's doc.

use super::convert::{self, Element};
use super::shape;
use super::{DType, Device, Tensor, TensorError};
pub use crate::kernels::cpu::elementwise::{Binary, Unary};
pub use crate::kernels::cpu::layout::Upsample;
pub use crate::kernels::cpu::reduce::Reduce;
use crate::kernels::cpu::{self, attention as cpu_attn, layout, norm, Activation};
use std::borrow::Cow;

/// Why an op refused its arguments or failed on its device.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum OpError {
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
    #[error(transparent)]
    Tensor(#[from] TensorError),
    #[error("{0}")]
    Device(String),
}

/// The error of a CUDA tensor met by a build without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
fn no_cuda() -> OpError {
    OpError::Device("this build has no CUDA support".into())
}

pub(crate) fn invalid(op: &'static str, msg: impl Into<String>) -> OpError {
    OpError::Invalid {
        op,
        msg: msg.into(),
    }
}

type R<T = Tensor> = Result<T, OpError>;

fn is_float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F16 | DType::BF16)
}

fn same_device(op: &'static str, ts: &[&Tensor]) -> R<Device> {
    let d = ts.first().map_or(Device::Cpu, |t| t.device());
    for t in ts {
        if t.device() != d {
            if let Some(gpu) = staging_device(ts) {
                return Ok(gpu);
            }
            return Err(invalid(
                op,
                format!("inputs on different devices ({d} and {})", t.device()),
            ));
        }
    }
    Ok(d)
}

/// Under the VRAM cap ([`crate::weights::vram`]) weights left in host memory join ops on a GPU,
/// which stage them ([`on_cuda`]): the GPU of inputs on one GPU and the CPU, else `None`.
fn staging_device(ts: &[&Tensor]) -> Option<Device> {
    crate::weights::vram::cap()?;
    let gpu = ts.iter().map(|t| t.device()).find(|d| *d != Device::Cpu)?;
    ts.iter()
        .all(|t| t.device() == gpu || t.device() == Device::Cpu)
        .then_some(gpu)
}

/// `t` on `device`: itself, or a host weight staged on the GPU under the VRAM cap.
#[cfg(feature = "cuda")]
fn on_device(t: &Tensor, device: Device) -> R<Tensor> {
    match device {
        Device::Cuda(n) if t.device() == Device::Cpu => cuda::ops::stage(t, n),
        _ => Ok(t.clone()),
    }
}

fn float_input(op: &'static str, t: &Tensor) -> R<()> {
    if is_float(t.dtype()) {
        Ok(())
    } else {
        Err(invalid(
            op,
            format!("expects a float tensor, got {}", t.dtype().name()),
        ))
    }
}

/// An error unless `t` is of a dense dtype (not a block format, whose values are only read by
/// `linear`, `cast` and the ops that move whole rows).
fn dense(op: &'static str, t: &Tensor) -> R<()> {
    if t.dtype().is_quantized() {
        return Err(invalid(
            op,
            format!(
                "does not take {} tensors (block-quantized weights); cast to f32 first",
                t.dtype().name()
            ),
        ));
    }
    Ok(())
}

/// Bytes of `shape[from..]` of `dtype`: a row unit of the layout ops (for a block format,
/// whole rows of the last axis).
fn inner_bytes(dtype: DType, shape: &[usize], from: usize) -> usize {
    Tensor::nbytes_for(dtype, &shape[from.min(shape.len())..]).unwrap_or(0)
}

/// The f32 elements of a CPU tensor, borrowed when already f32.
fn f32s(t: &Tensor) -> R<Cow<'_, [f32]>> {
    if t.dtype() == DType::F32 {
        Ok(Cow::Borrowed(t.as_slice::<f32>()?))
    } else {
        Ok(Cow::Owned(convert::to_f32_vec(t.dtype(), t.cpu_bytes()?)))
    }
}

fn opt_f32s(t: Option<&Tensor>) -> R<Option<Cow<'_, [f32]>>> {
    t.map(f32s).transpose()
}

/// A CPU output of `shape` filled by `fill` in f32, then stored as `dtype`.
fn cpu_out(dtype: DType, shape: &[usize], fill: impl FnOnce(&mut [f32]) -> R<()>) -> R {
    // Every CPU kernel writes its whole output, so recycled storage needs no zeroing.
    let mut t = Tensor::for_overwrite(DType::F32, shape)?;
    fill(t.as_mut_slice::<f32>()?)?;
    if dtype == DType::F32 {
        Ok(t)
    } else {
        cast(&t, dtype)
    }
}

#[cfg(feature = "cuda")]
use crate::kernels::cuda;

/// Runs a CUDA op on f32 copies of half-precision inputs and narrows the result back.
#[cfg(feature = "cuda")]
fn on_cuda(dtype: DType, inputs: &[&Tensor], f: impl FnOnce(&[Tensor]) -> R) -> R {
    on_cuda_keeping(dtype, inputs, &[], f)
}

/// [`on_cuda`] for an op whose kernels also read and write bf16/f16 activations
/// ([`cuda::ops::act_dtype`]): when `dtype` is half and every input at a `native` position is
/// of it, those inputs reach the kernel as they are and the result comes back in `dtype`
/// without a widening or narrowing pass; the other inputs (weights, modulations, gates) are
/// widened to f32 as [`on_cuda`] widens them. Otherwise it is [`on_cuda`].
#[cfg(feature = "cuda")]
fn on_cuda_keeping(
    dtype: DType,
    inputs: &[&Tensor],
    native: &[usize],
    f: impl FnOnce(&[Tensor]) -> R,
) -> R {
    let half = matches!(dtype, DType::BF16 | DType::F16);
    let keep = half
        && native
            .iter()
            .all(|&i| inputs.get(i).is_some_and(|t| t.dtype() == dtype));
    let gpu = inputs
        .iter()
        .map(|t| t.device())
        .find(|d| *d != Device::Cpu)
        .unwrap_or(Device::Cpu);
    let widened = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let t = on_device(t, gpu)?;
            let kept = keep && native.contains(&i);
            if !kept && is_float(t.dtype()) && t.dtype() != DType::F32 {
                cast(&t, DType::F32)
            } else {
                Ok(t)
            }
        })
        .collect::<R<Vec<_>>>()?;
    let out = f(&widened)?;
    if dtype != DType::F32 && is_float(dtype) && out.dtype() == DType::F32 {
        cast(&out, dtype)
    } else {
        Ok(out)
    }
}

/// Dispatches on the device: `$cpu` runs on the CPU; `$cuda` receives f32 device tensors, or,
/// with `native [..]`, those inputs in bf16/f16 as they are ([`on_cuda_keeping`]).
macro_rules! dispatch {
    ($op:expr, $dtype:expr, [$($t:expr),*], native $native:expr, cpu => $cpu:expr, cuda => |$ins:ident| $cuda:expr) => {{
        match same_device($op, &[$($t),*])? {
            Device::Cpu => $cpu,
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => on_cuda_keeping($dtype, &[$($t),*], &$native, |$ins: &[Tensor]| $cuda),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => {
                let _ = $native;
                Err(no_cuda())
            }
        }
    }};
    ($op:expr, $dtype:expr, [$($t:expr),*], cpu => $cpu:expr, cuda => |$ins:ident| $cuda:expr) => {{
        match same_device($op, &[$($t),*])? {
            Device::Cpu => $cpu,
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => on_cuda($dtype, &[$($t),*], |$ins: &[Tensor]| $cuda),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(no_cuda()),
        }
    }};
}

// --- dtype and device ----------------------------------------------------------------------

/// Converts to `dtype` (floats to integers truncate; any dtype to any).
pub fn cast(x: &Tensor, dtype: DType) -> R {
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    if dtype.is_quantized() {
        return Err(invalid(
            "cast",
            format!(
                "cannot quantize to {}: block formats are only loaded",
                dtype.name()
            ),
        ));
    }
    match x.device() {
        Device::Cpu => {
            let mut out = Tensor::zeros(dtype, x.shape())?;
            let dst = out.unique_bytes_mut().expect("fresh tensor");
            convert::convert(x.dtype(), x.cpu_bytes()?, dtype, dst);
            Ok(out)
        }
        // A block format on a GPU is dequantised to f32 first.
        #[cfg(feature = "cuda")]
        Device::Cuda(_) if x.dtype().is_quantized() => cast(&cuda::ops::dequantize(x)?, dtype),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::ops::cast(x, dtype),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(no_cuda()),
    }
}

impl Tensor {
    /// A copy on `device` (the same tensor when it is already there).
    pub fn to_device(&self, device: Device) -> R {
        if self.device() == device {
            return Ok(self.clone());
        }
        // A block format moves as its bytes (a GPU's linear layers dequantise it per layer).
        #[cfg(feature = "cuda")]
        {
            match device {
                Device::Cpu => cuda::ops::to_host(self),
                Device::Cuda(n) => {
                    let host = self.to_device(Device::Cpu)?;
                    cuda::ops::to_device(&host, n)
                }
            }
        }
        #[cfg(not(feature = "cuda"))]
        Err(OpError::Device(format!(
            "cannot move a tensor to {device}: this build has no CUDA support"
        )))
    }

    /// Typed elements copied to a vector (from any device).
    pub fn to_vec<T: Element>(&self) -> R<Vec<T>> {
        let host = self.to_device(Device::Cpu)?;
        Ok(host.as_slice::<T>()?.to_vec())
    }
}

/// Standard-normal f32 noise from the counter-based RNG: the same numbers for the same seed on
/// every device.
pub fn randn(shape: &[usize], seed: u64, device: Device) -> R {
    randn_stream(shape, seed, 0, device)
}

/// [`randn`] from one of the seed's independent streams (see [`super::rng`]).
pub fn randn_stream(shape: &[usize], seed: u64, stream: u64, device: Device) -> R {
    match device {
        Device::Cpu => {
            let mut t = Tensor::zeros(DType::F32, shape)?;
            super::rng::fill_randn_stream(seed, stream, t.as_f32_mut());
            Ok(t)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => cuda::ops::randn(shape, seed, stream, n),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(no_cuda()),
    }
}

// --- matrix products ------------------------------------------------------------------------

/// `op(a)·op(b)` over the last two axes, where `op` transposes when asked. Leading (batch) axes
/// must be equal, or one side has none.
pub fn matmul(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> R {
    const OP: &str = "matmul";
    float_input(OP, a)?;
    float_input(OP, b)?;
    if a.rank() < 2 || b.rank() < 2 {
        return Err(invalid(
            OP,
            format!("needs rank >= 2, got {:?} and {:?}", a.shape(), b.shape()),
        ));
    }
    let (ar, br) = (a.rank(), b.rank());
    let (m, ka) = if trans_a {
        (a.shape()[ar - 1], a.shape()[ar - 2])
    } else {
        (a.shape()[ar - 2], a.shape()[ar - 1])
    };
    let (kb, n) = if trans_b {
        (b.shape()[br - 1], b.shape()[br - 2])
    } else {
        (b.shape()[br - 2], b.shape()[br - 1])
    };
    if ka != kb {
        return Err(invalid(
            OP,
            format!("inner sizes differ: {:?} and {:?}", a.shape(), b.shape()),
        ));
    }
    let (ab, bb) = (&a.shape()[..ar - 2], &b.shape()[..br - 2]);
    let batch_shape: Vec<usize> = if ab == bb || bb.is_empty() {
        ab.to_vec()
    } else if ab.is_empty() {
        bb.to_vec()
    } else {
        return Err(invalid(
            OP,
            format!("batch axes differ: {:?} and {:?}", a.shape(), b.shape()),
        ));
    };
    let batch: usize = batch_shape.iter().product();
    let mut out_shape = batch_shape.clone();
    out_shape.extend([m, n]);
    let (a_batched, b_batched) = (!ab.is_empty(), !bb.is_empty());
    dispatch!(OP, a.dtype(), [a, b],
        cpu => {
            let (af, bf) = (f32s(a)?, f32s(b)?);
            cpu_out(a.dtype(), &out_shape, |out| {
                let run = |i: usize, o: &mut [f32], parallel: bool| {
                    let ad = if a_batched { &af[i * m * ka..(i + 1) * m * ka] } else { &af[..] };
                    let bd = if b_batched { &bf[i * ka * n..(i + 1) * ka * n] } else { &bf[..] };
                    let am = cpu::gemm::MatRef::row_major(ad, if trans_a { m } else { ka }, trans_a);
                    let bm = cpu::gemm::MatRef::row_major(bd, if trans_b { ka } else { n }, trans_b);
                    // SAFETY: slices sized from the checked shapes.
                    unsafe { cpu::gemm::sgemm(m, n, ka, am, bm, o.as_mut_ptr(), n, Default::default(), parallel) };
                };
                if m * n == 0 {
                    return Ok(());
                }
                if batch > 1 && m * n * ka < 128 * 128 * 128 {
                    use rayon::prelude::*;
                    out.par_chunks_mut(m * n).enumerate().for_each(|(i, o)| run(i, o, false));
                } else {
                    for (i, o) in out.chunks_mut(m * n).enumerate() {
                        run(i, o, true);
                    }
                }
                Ok(())
            })
        },
        cuda => |t| cuda::ops::matmul(&t[0], &t[1], trans_a, trans_b, batch, a_batched, b_batched, m, n, ka, &out_shape))
}

/// A linear weight `[n, k]` as the GEMM's B operand: an f32 weight packed once and kept with
/// it (in place of its file pages), or read as stored and packed per call, so no widened copy
/// of a model's weights is kept: bf16 widened and block formats dequantised while packed; f16
/// (rare in checkpoints) widened per call.
enum WeightOperand<'a> {
    /// An f32 weight packed once and kept with it ([`crate::weights::packed`]).
    Packed(&'a cpu::gemm::PackedB),
    Bf16(&'a [u16]),
    F32(Cow<'a, [f32]>),
    /// A block-quantized weight's bytes and format, dequantised per panel.
    Quant(&'a [u8], crate::weights::quant::BlockFormat),
}

impl<'a> WeightOperand<'a> {
    /// The operand for a product of `rows` rows.
    fn of(w: &'a Tensor, rows: usize) -> R<WeightOperand<'a>> {
        if let Some(packed) = crate::weights::packed::packed_linear_weight(w, rows) {
            return Ok(WeightOperand::Packed(packed));
        }
        crate::weights::residency::touch(w).map_err(|msg| invalid("linear", msg))?;
        if let Some(format) = crate::weights::quant::BlockFormat::of(w.dtype()) {
            return Ok(WeightOperand::Quant(w.cpu_bytes()?, format));
        }
        Ok(match w.dtype() {
            DType::BF16 => {
                let v = w.as_slice::<half::bf16>()?;
                // SAFETY: `bf16` is a `repr(transparent)` u16.
                WeightOperand::Bf16(unsafe {
                    std::slice::from_raw_parts(v.as_ptr() as *const u16, v.len())
                })
            }
            _ => WeightOperand::F32(f32s(w)?),
        })
    }

    fn operand(&self, k: usize) -> cpu::gemm::BOperand<'_> {
        match self {
            WeightOperand::Packed(packed) => cpu::gemm::BOperand::Packed(packed),
            WeightOperand::Bf16(bits) => {
                cpu::gemm::BOperand::Bf16(cpu::gemm::MatRefBf16::row_major(bits, k, true))
            }
            WeightOperand::F32(w) => {
                cpu::gemm::BOperand::Strided(cpu::gemm::MatRef::row_major(w, k, true))
            }
            WeightOperand::Quant(bytes, format) => {
                cpu::gemm::BOperand::Quant(cpu::gemm::MatRefQuant {
                    ptr: bytes.as_ptr(),
                    row_bytes: k / format.block_len() * format.block_bytes(),
                    format: *format,
                })
            }
        }
    }
}

/// A float weight, or a block-quantized one (read by the CPU GEMM as it is, dequantised per
/// layer on a GPU).
fn weight_input(op: &'static str, w: &Tensor) -> R<()> {
    if w.dtype().is_quantized() {
        return Ok(());
    }
    float_input(op, w)
}

/// `x·wᵀ + bias`, then `act`: x `[..., K]`, w `[N, K]` (PyTorch's Linear layout; f32, f16,
/// bf16 or a block format, each read as stored), bias `[N]`.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, act: Activation) -> R {
    const OP: &str = "linear";
    float_input(OP, x)?;
    weight_input(OP, w)?;
    if w.rank() != 2 || x.rank() == 0 || x.shape()[x.rank() - 1] != w.shape()[1] {
        return Err(invalid(
            OP,
            format!(
                "input {:?} does not fit weight {:?} ([out, in])",
                x.shape(),
                w.shape()
            ),
        ));
    }
    let (n, k) = (w.shape()[0], w.shape()[1]);
    if let Some(b) = bias {
        if b.numel() != n {
            return Err(invalid(
                OP,
                format!("bias {:?} does not match {n} outputs", b.shape()),
            ));
        }
    }
    let m = x.numel() / k.max(1);
    let mut out_shape = x.shape().to_vec();
    *out_shape.last_mut().unwrap() = n;
    let mut ins = vec![x, w];
    ins.extend(bias);
    match same_device(OP, &ins)? {
        Device::Cpu => {
            let xf = f32s(x)?;
            let bf = bias.map(f32s).transpose()?;
            let weight = WeightOperand::of(w, m)?;
            let b_operand = weight.operand(k);
            cpu_out(x.dtype(), &out_shape, |out| {
                let ep = cpu::gemm::Epilogue {
                    bias: bf
                        .as_deref()
                        .map_or(cpu::gemm::Bias::None, cpu::gemm::Bias::PerColumn),
                    act,
                    accumulate: false,
                };
                // SAFETY: x is [m, k], the packed weight is k×n, out is [m, n].
                unsafe {
                    cpu::gemm::sgemm_with(
                        m,
                        n,
                        k,
                        cpu::gemm::MatRef::row_major(&xf, k, false),
                        b_operand,
                        out.as_mut_ptr(),
                        n,
                        ep,
                        true,
                    )
                };
                Ok(())
            })
        }
        // A block-quantized weight (on the GPU as stored, or in host memory under the VRAM
        // cap) is dequantised into f32 for this product alone: the copy goes back to the
        // device's memory pool when it is dropped, for the next layer's.
        #[cfg(feature = "cuda")]
        gpu @ Device::Cuda(_) if w.dtype().is_quantized() => {
            let w = cuda::ops::dequantize(&on_device(w, gpu)?)?;
            let mut rest = vec![x];
            rest.extend(bias);
            on_cuda(x.dtype(), &rest, |t| {
                cuda::ops::linear(&t[0], &w, t.get(1), act, m, n, k, &out_shape)
            })
        }
        #[cfg(feature = "cuda")]
        gpu @ Device::Cuda(_)
            if crate::kernels::tensor_cores() && matches!(w.dtype(), DType::BF16 | DType::F16) =>
        {
            // The weight stays in its own type, for the tensor cores.
            let w = on_device(w, gpu)?;
            let mut rest = vec![x];
            rest.extend(bias);
            on_cuda_keeping(x.dtype(), &rest, &[0], |t| {
                cuda::ops::linear(&t[0], &w, t.get(1), act, m, n, k, &out_shape)
            })
        }
        // Half activations meet a weight of their own type as they are.
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => on_cuda_keeping(x.dtype(), &ins, &[0, 1], |t| {
            cuda::ops::linear(&t[0], &t[1], t.get(2), act, m, n, k, &out_shape)
        }),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(no_cuda()),
    }
}

/// [`linear`] whose `parts` equal column ranges come out as separate tensors (a fused QKV
/// projection as q, k and v): on the CPU one product writes them all, with no copies; where the
/// parts do not fit the GEMM's panels, or on CUDA, the whole product is split.
pub fn linear_split(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    act: Activation,
    parts: usize,
) -> R<Vec<Tensor>> {
    const OP: &str = "linear_split";
    if w.rank() != 2 || parts == 0 || !w.shape()[0].is_multiple_of(parts) {
        return Err(invalid(
            OP,
            format!("weight {:?} does not split into {parts} parts", w.shape()),
        ));
    }
    let (n, k) = (w.shape()[0], w.shape()[1]);
    let fast = x.device() == Device::Cpu
        && w.device() == Device::Cpu
        && x.dtype() == DType::F32
        && cpu::gemm::parts_fit(n, parts)
        && x.rank() > 0
        && x.shape()[x.rank() - 1] == k
        && bias.is_none_or(|b| b.numel() == n && b.device() == Device::Cpu);
    if !fast {
        let y = linear(x, w, bias, act)?;
        return split(&y, -1, &vec![n / parts; parts]);
    }
    weight_input(OP, w)?;
    let m = x.numel() / k.max(1);
    let mut out_shape = x.shape().to_vec();
    *out_shape.last_mut().unwrap() = n / parts;
    let xf = f32s(x)?;
    let bf = bias.map(f32s).transpose()?;
    let weight = WeightOperand::of(w, m)?;
    let b_operand = weight.operand(k);
    let mut outs = Vec::with_capacity(parts);
    for _ in 0..parts {
        outs.push(Tensor::for_overwrite(DType::F32, &out_shape)?);
    }
    let mut ptrs = Vec::with_capacity(parts);
    for t in outs.iter_mut() {
        ptrs.push(t.as_mut_slice::<f32>()?.as_mut_ptr());
    }
    let ep = cpu::gemm::Epilogue {
        bias: bf
            .as_deref()
            .map_or(cpu::gemm::Bias::None, cpu::gemm::Bias::PerColumn),
        act,
        accumulate: false,
    };
    // SAFETY: x is [m, k], the packed weight is k×n, and each output is [m, n / parts].
    unsafe {
        cpu::gemm::sgemm_parts(
            m,
            n,
            k,
            cpu::gemm::MatRef::row_major(&xf, k, false),
            b_operand,
            &ptrs,
            ep,
            true,
        )
    };
    Ok(outs)
}

/// Convolution over 1, 2 or 3 spatial axes: x `[N, C, *S]`, w `[O, C/groups, *K]`, bias `[O]`.
/// `stride`, `padding` and `dilation` have one value per spatial axis (or one for all).
pub fn conv(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: &[usize],
    padding: &[usize],
    dilation: &[usize],
    groups: usize,
) -> R {
    const OP: &str = "conv";
    float_input(OP, x)?;
    float_input(OP, w)?;
    let nd = w.rank().saturating_sub(2);
    if !(1..=3).contains(&nd) || x.rank() != nd + 2 {
        return Err(invalid(
            OP,
            format!(
                "input {:?} and weight {:?} are not a 1-, 2- or 3-D convolution",
                x.shape(),
                w.shape()
            ),
        ));
    }
    let per_axis = |v: &[usize], name: &str, default: usize| -> R<Vec<usize>> {
        match v.len() {
            0 => Ok(vec![default; nd]),
            1 => Ok(vec![v[0]; nd]),
            l if l == nd => Ok(v.to_vec()),
            l => Err(invalid(
                OP,
                format!("{name} has {l} values for {nd} spatial axes"),
            )),
        }
    };
    let g = cpu::conv::ConvGeom {
        n: x.shape()[0],
        c_in: x.shape()[1],
        c_out: w.shape()[0],
        groups,
        input: x.shape()[2..].to_vec(),
        kernel: w.shape()[2..].to_vec(),
        stride: per_axis(stride, "stride", 1)?,
        padding: per_axis(padding, "padding", 0)?,
        dilation: per_axis(dilation, "dilation", 1)?,
    };
    if groups == 0
        || !g.c_in.is_multiple_of(groups)
        || !g.c_out.is_multiple_of(groups)
        || w.shape()[1] * groups != g.c_in
    {
        return Err(invalid(
            OP,
            format!(
                "{} input channels, weight {:?} and {groups} groups do not agree",
                g.c_in,
                w.shape()
            ),
        ));
    }
    if g.stride.contains(&0) || g.dilation.contains(&0) {
        return Err(invalid(OP, "stride and dilation must be at least 1"));
    }
    if let Some(b) = bias {
        if b.numel() != g.c_out {
            return Err(invalid(
                OP,
                format!(
                    "bias {:?} does not match {} output channels",
                    b.shape(),
                    g.c_out
                ),
            ));
        }
    }
    let osz = g.output().ok_or_else(|| {
        invalid(
            OP,
            format!(
                "kernel {:?} larger than the padded input {:?}",
                g.kernel, g.input
            ),
        )
    })?;
    let mut out_shape = vec![g.n, g.c_out];
    out_shape.extend(&osz);
    let mut ins = vec![x, w];
    ins.extend(bias);
    match same_device(OP, &ins)? {
        Device::Cpu => {
            let (xf, wf) = (f32s(x)?, f32s(w)?);
            let bf = bias.map(f32s).transpose()?;
            cpu_out(x.dtype(), &out_shape, |out| {
                cpu::conv::conv(&g, &xf, &wf, bf.as_deref(), out);
                Ok(())
            })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => on_cuda(x.dtype(), &ins, |t| {
            cuda::ops::conv(&g, &t[0], &t[1], t.get(2), &out_shape)
        }),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(no_cuda()),
    }
}

// --- normalisation --------------------------------------------------------------------------

/// Optional parts of a layer norm: the affine weight and bias (`[D]`), and adaLN's modulation
/// `shift` and `scale` (`[D]`, `[B, D]` or `[B, 1, D]`: one row per leading batch entry).
#[derive(Clone, Copy, Default)]
pub struct LayerNorm<'a> {
    pub weight: Option<&'a Tensor>,
    pub bias: Option<&'a Tensor>,
    pub shift: Option<&'a Tensor>,
    pub scale: Option<&'a Tensor>,
    pub eps: f32,
}

/// Layer norm over the last axis, then `·(1 + scale) + shift` when given (fused).
pub fn layer_norm(x: &Tensor, p: LayerNorm) -> R {
    const OP: &str = "layer_norm";
    float_input(OP, x)?;
    let d = *x
        .shape()
        .last()
        .ok_or_else(|| invalid(OP, "needs rank >= 1"))?;
    let rows = x.numel() / d.max(1);
    for (name, t) in [("weight", p.weight), ("bias", p.bias)] {
        if t.is_some_and(|t| t.numel() != d) {
            return Err(invalid(OP, format!("{name} must have {d} elements")));
        }
    }
    let mut groups = None;
    for (name, t) in [("shift", p.shift), ("scale", p.scale)] {
        if let Some(t) = t {
            let g = t.numel() / d.max(1);
            if t.numel() % d.max(1) != 0
                || g == 0
                || !rows.is_multiple_of(g)
                || groups.is_some_and(|h| h != g)
            {
                return Err(invalid(
                    OP,
                    format!(
                        "{name} {:?} does not modulate input {:?}",
                        t.shape(),
                        x.shape()
                    ),
                ));
            }
            groups = Some(g);
        }
    }
    let ins: Vec<&Tensor> = [Some(x), p.weight, p.bias, p.shift, p.scale]
        .into_iter()
        .flatten()
        .collect();
    match same_device(OP, &ins)? {
        Device::Cpu => {
            let xf = f32s(x)?;
            let (w, b) = (opt_f32s(p.weight)?, opt_f32s(p.bias)?);
            let (sh, sc) = (opt_f32s(p.shift)?, opt_f32s(p.scale)?);
            cpu_out(x.dtype(), x.shape(), |out| {
                let m = groups.map(|g| norm::Modulation {
                    shift: sh.as_deref(),
                    scale: sc.as_deref(),
                    groups: g,
                });
                norm::layer_norm(&xf, d, w.as_deref(), b.as_deref(), m, p.eps, out);
                Ok(())
            })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let flags = [
                p.weight.is_some(),
                p.bias.is_some(),
                p.shift.is_some(),
                p.scale.is_some(),
            ];
            on_cuda_keeping(x.dtype(), &ins, &[0], |t| {
                cuda::ops::layer_norm(t, flags, d, groups.unwrap_or(1), p.eps)
            })
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(no_cuda()),
    }
}

/// RMS norm over the last axis, times `weight` (`[D]`) when given.
pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f32) -> R {
    const OP: &str = "rms_norm";
    float_input(OP, x)?;
    let d = *x
        .shape()
        .last()
        .ok_or_else(|| invalid(OP, "needs rank >= 1"))?;
    if weight.is_some_and(|w| w.numel() != d) {
        return Err(invalid(OP, format!("weight must have {d} elements")));
    }
    let mut ins = vec![x];
    ins.extend(weight);
    match same_device(OP, &ins)? {
        Device::Cpu => {
            let xf = f32s(x)?;
            let w = weight.map(f32s).transpose()?;
            cpu_out(x.dtype(), x.shape(), |out| {
                norm::rms_norm(&xf, d, w.as_deref(), eps, out);
                Ok(())
            })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => on_cuda_keeping(x.dtype(), &ins, &[0], |t| {
            cuda::ops::rms_norm(&t[0], t.get(1), d, eps)
        }),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(no_cuda()),
    }
}

/// Group norm of `[N, C, *S]` over `groups` channel groups, the per-channel affine (`[C]`), then
/// `act` (fused; VAEs use SiLU).
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
    act: Activation,
) -> R {
    const OP: &str = "group_norm";
    float_input(OP, x)?;
    if x.rank() < 2 {
        return Err(invalid(
            OP,
            format!("needs [N, C, ...], got {:?}", x.shape()),
        ));
    }
    let (n, c) = (x.shape()[0], x.shape()[1]);
    if groups == 0 || c % groups != 0 {
        return Err(invalid(
            OP,
            format!("{c} channels do not split into {groups} groups"),
        ));
    }
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if t.is_some_and(|t| t.numel() != c) {
            return Err(invalid(OP, format!("{name} must have {c} elements")));
        }
    }
    let s = x.numel() / (n * c).max(1);
    let ins: Vec<&Tensor> = [Some(x), weight, bias].into_iter().flatten().collect();
    match same_device(OP, &ins)? {
        Device::Cpu => {
            let xf = f32s(x)?;
            let (w, b) = (weight.map(f32s).transpose()?, bias.map(f32s).transpose()?);
            cpu_out(x.dtype(), x.shape(), |out| {
                norm::group_norm(
                    &xf,
                    n,
                    c,
                    s,
                    groups,
                    w.as_deref(),
                    b.as_deref(),
                    eps,
                    act,
                    out,
                );
                Ok(())
            })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let flags = [weight.is_some(), bias.is_some()];
            on_cuda(x.dtype(), &ins, |t| {
                cuda::ops::group_norm(t, flags, n, c, s, groups, eps, act)
            })
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(no_cuda()),
    }
}

/// Softmax along `axis` (negative counts from the end).
pub fn softmax(x: &Tensor, axis: i64) -> R {
    const OP: &str = "softmax";
    float_input(OP, x)?;
    let ax = shape::axis(axis, x.rank())
        .ok_or_else(|| invalid(OP, format!("axis {axis} out of range for {:?}", x.shape())))?;
    let (outer, dim, inner) = shape::split_at_axis(x.shape(), ax);
    dispatch!(OP, x.dtype(), [x], native [0],
        cpu => {
            let xf = f32s(x)?;
            cpu_out(x.dtype(), x.shape(), |out| {
                norm::softmax(&xf, outer, dim, inner, out);
                Ok(())
            })
        },
        cuda => |t| cuda::ops::softmax(&t[0], outer, dim, inner))
}

// --- attention and positions -----------------------------------------------------------------

/// Scaled-dot-product attention: q `[B, H, Lq, D]`, k `[B, H, Lk, D]`, v `[B, H, Lk, Dv]` →
/// `[B, H, Lq, Dv]`. `mask` broadcasts to `[B, H, Lq, Lk]`: float masks are added to the scores,
/// u8 masks keep positions where non-zero. `scale` defaults to `1/sqrt(D)`. Computed blockwise;
/// a query that may attend to nothing gives zeros.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: Option<f32>,
) -> R {
    const OP: &str = "attention";
    for t in [q, k, v] {
        float_input(OP, t)?;
        if t.rank() != 4 {
            return Err(invalid(
                OP,
                format!("q, k and v must be [B, H, L, D], got {:?}", t.shape()),
            ));
        }
    }
    let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
    if qs[0] != ks[0] || qs[1] != ks[1] || ks[..3] != vs[..3] || qs[3] != ks[3] {
        return Err(invalid(
            OP,
            format!("q {qs:?}, k {ks:?} and v {vs:?} do not agree"),
        ));
    }
    let dims = cpu_attn::AttnDims {
        b: qs[0],
        h: qs[1],
        lq: qs[2],
        lk: ks[2],
        d: qs[3],
        dv: vs[3],
    };
    let scale = scale.unwrap_or(1.0 / (dims.d.max(1) as f32).sqrt());
    // The mask as f32 additive values with broadcast strides.
    let mask_f = attention_mask(OP, mask, dims)?;
    let mut ins = vec![q, k, v];
    if let Some((m, _)) = &mask_f {
        ins.push(m);
    }
    let out_shape = [dims.b, dims.h, dims.lq, dims.dv];
    match same_device(OP, &ins)? {
        Device::Cpu => {
            let (qf, kf, vf) = (f32s(q)?, f32s(k)?, f32s(v)?);
            let mref = mask_f.as_ref().map(|(m, st)| cpu_attn::MaskRef {
                data: m.as_f32(),
                sb: st[0],
                sh: st[1],
                sq: st[2],
            });
            cpu_out(q.dtype(), &out_shape, |out| {
                cpu_attn::attention(&qf, &kf, &vf, mref, scale, dims, out);
                Ok(())
            })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let strides = mask_f.as_ref().map(|(_, st)| *st);
            on_cuda_keeping(q.dtype(), &ins, &[0, 1, 2], |t| {
                cuda::ops::attention(&t[0], &t[1], &t[2], t.get(3), strides, scale, dims)
            })
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(no_cuda()),
    }
}

/// An attention mask as additive f32 values of shape `[?, ?, ?, Lk]` with its broadcast strides
/// over `(batch, head, query)`.
fn attention_mask(
    op: &'static str,
    mask: Option<&Tensor>,
    dims: cpu_attn::AttnDims,
) -> R<Option<(Tensor, [usize; 3])>> {
    let full = [dims.b, dims.h, dims.lq, dims.lk];
    Ok(match mask {
        None => None,
        Some(m) => {
            if m.rank() > 4 || shape::broadcast(m.shape(), &full).as_deref() != Some(&full[..]) {
                return Err(invalid(
                    op,
                    format!("mask {:?} does not broadcast to {full:?}", m.shape()),
                ));
            }
            let mut mshape = vec![1; 4 - m.rank()];
            mshape.extend(m.shape());
            if mshape[3] != dims.lk {
                return Err(invalid(
                    op,
                    format!("mask {:?} must cover all {} keys", m.shape(), dims.lk),
                ));
            }
            let additive = match m.dtype() {
                DType::U8 | DType::I32 | DType::I64 => {
                    let keep = cast(m, DType::F32)?;
                    // keep != 0 → 0, else -inf
                    let host = keep.to_device(Device::Cpu)?;
                    let vals: Vec<f32> = host
                        .as_f32()
                        .iter()
                        .map(|&v| if v != 0.0 { 0.0 } else { f32::NEG_INFINITY })
                        .collect();
                    Tensor::from_f32(&mshape, &vals)?.to_device(m.device())?
                }
                _ => cast(m, DType::F32)?.reshaped(&mshape)?,
            };
            let st = shape::broadcast_strides(&mshape, &full);
            Some((additive, [st[0], st[1], st[2]]))
        }
    })
}

/// Multi-head attention straight from projections: the queries are `heads·head_dim` columns of
/// `q_src` `[B, Lq, Cq]` starting at `q_offset`, the keys and values as many columns of `kv_src`
/// `[B, Lk, Ckv]` starting at `k_offset` and `v_offset` (one fused QKV projection can be both),
/// or the values from `v_src` `[B, Lk, Cv]` when given (separate projections need no copies).
/// The result is `[B, Lq, heads·head_dim]`, heads side by side, as an output projection reads it;
/// no per-head copies are made on the CPU. Mask and scale as for [`attention`].
#[allow(clippy::too_many_arguments)]
pub fn attention_fused(
    q_src: &Tensor,
    kv_src: &Tensor,
    v_src: Option<&Tensor>,
    mask: Option<&Tensor>,
    heads: usize,
    head_dim: usize,
    offsets: [usize; 3],
    scale: Option<f32>,
) -> R {
    const OP: &str = "attention_fused";
    float_input(OP, q_src)?;
    float_input(OP, kv_src)?;
    let v_src_t = v_src.unwrap_or(kv_src);
    float_input(OP, v_src_t)?;
    let (qs, ks, vs) = (q_src.shape(), kv_src.shape(), v_src_t.shape());
    let width = heads * head_dim;
    let [qo, ko, vo] = offsets;
    if qs.len() != 3
        || ks.len() != 3
        || vs.len() != 3
        || qs[0] != ks[0]
        || vs[0] != ks[0]
        || vs[1] != ks[1]
        || heads == 0
        || head_dim == 0
    {
        return Err(invalid(OP, format!("q_src {qs:?}, kv_src {ks:?} and v_src {vs:?} must be [B, L, C] with one batch and one key length, and heads and head_dim above 0")));
    }
    if qo + width > qs[2] || ko + width > ks[2] || vo + width > vs[2] {
        return Err(invalid(OP, format!("{heads} heads of {head_dim} from columns {offsets:?} do not fit q_src {qs:?}, kv_src {ks:?} and v_src {vs:?}")));
    }
    let dims = cpu_attn::AttnDims {
        b: qs[0],
        h: heads,
        lq: qs[1],
        lk: ks[1],
        d: head_dim,
        dv: head_dim,
    };
    let scale_v = scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
    let (b, lq, lk) = (dims.b, dims.lq, dims.lk);
    match same_device(OP, &[q_src, kv_src, v_src_t])? {
        Device::Cpu => {
            let mask_f = attention_mask(OP, mask, dims)?;
            let (qf, kf) = (f32s(q_src)?, f32s(kv_src)?);
            let vf = match v_src {
                Some(v) => Some(f32s(v)?),
                None => None,
            };
            let mref = mask_f.as_ref().map(|(m, st)| cpu_attn::MaskRef {
                data: m.as_f32(),
                sb: st[0],
                sh: st[1],
                sq: st[2],
            });
            let lay = |off: usize, rows: usize, c: usize| cpu_attn::Layout {
                offset: off,
                batch: rows * c,
                head: head_dim,
                row: c,
            };
            let layouts = [
                lay(qo, lq, qs[2]),
                lay(ko, lk, ks[2]),
                lay(vo, lk, vs[2]),
                lay(0, lq, width),
            ];
            let vref = vf.as_deref().unwrap_or(&kf);
            cpu_out(q_src.dtype(), &[b, lq, width], |out| {
                cpu_attn::attention_strided(&qf, &kf, vref, layouts, mref, scale_v, dims, out);
                Ok(())
            })
        }
        Device::Cuda(_) => {
            // Per-head copies, then the plain kernel.
            let heads_of = |src: &Tensor, off: usize, l: usize| -> R {
                let t = slice(src, 2, off as i64, (off + width) as i64, 1)?;
                permute(
                    &reshape(&t, &[b as i64, l as i64, heads as i64, head_dim as i64])?,
                    &[0, 2, 1, 3],
                )
            };
            let o = attention(
                &heads_of(q_src, qo, lq)?,
                &heads_of(kv_src, ko, lk)?,
                &heads_of(v_src_t, vo, lk)?,
                mask,
                Some(scale_v),
            )?;
            reshape(
                &permute(&o, &[0, 2, 1, 3])?,
                &[b as i64, lq as i64, width as i64],
            )
        }
    }
}

/// RoPE angle tables for positions `[L, A]` (one column per axis) and per-axis channel counts
/// `dims` (each even): `(cos, sin)`, each `[L, Σ dims / 2]`, on `device`.
pub fn rope_tables(
    positions: &Tensor,
    dims: &[usize],
    theta: f64,
    device: Device,
) -> R<(Tensor, Tensor)> {
    const OP: &str = "rope_tables";
    if positions.rank() != 2
        || positions.shape()[1] != dims.len()
        || dims.iter().any(|d| d % 2 != 0)
    {
        return Err(invalid(
            OP,
            format!(
                "positions {:?} need one column per axis of {dims:?} (each even)",
                positions.shape()
            ),
        ));
    }
    let l = positions.shape()[0];
    let pos: Vec<f64> = positions.to_f32_vec()?.iter().map(|&p| p as f64).collect();
    let (c, s) = layout::rope_tables(&pos, l, dims, theta);
    let half = dims.iter().sum::<usize>() / 2;
    Ok((
        Tensor::from_f32(&[l, half], &c)?.to_device(device)?,
        Tensor::from_f32(&[l, half], &s)?.to_device(device)?,
    ))
}

/// Rotary position embedding: `x` `[.., L, D]` rotated by the tables `cos`, `sin` `[L, R/2]`
/// (`R <= D`, the rotated prefix), `interleaved` pairs (2i, 2i+1), else (i, i + R/2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> R {
    rope_heads(x, cos, sin, interleaved, 1)
}

/// [`rope`] of `heads` heads side by side: `x` `[.., L, heads·Dh]` as a projection writes them,
/// each head's first `R <= Dh` channels rotated at its row's position, so attention can read the
/// heads in place ([`attention_fused`]) with no per-head copies.
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool, heads: usize) -> R {
    const OP: &str = "rope";
    float_input(OP, x)?;
    if x.rank() < 2 || cos.rank() != 2 || cos.shape() != sin.shape() {
        return Err(invalid(
            OP,
            format!(
                "x {:?} needs [.., L, D] and tables [L, R/2], got {:?} and {:?}",
                x.shape(),
                cos.shape(),
                sin.shape()
            ),
        ));
    }
    let (l, width) = (x.shape()[x.rank() - 2], x.shape()[x.rank() - 1]);
    if heads == 0 || !width.is_multiple_of(heads) {
        return Err(invalid(
            OP,
            format!("{heads} heads do not split x {:?}'s last axis", x.shape()),
        ));
    }
    let d = width / heads;
    let r = cos.shape()[1] * 2;
    if cos.shape()[0] != l || r > d {
        return Err(invalid(
            OP,
            format!(
                "tables {:?} do not fit x {:?} ({heads} heads of {d})",
                cos.shape(),
                x.shape()
            ),
        ));
    }
    dispatch!(OP, x.dtype(), [x, cos, sin], native [0],
        cpu => {
            let (xf, cf, sf) = (f32s(x)?, f32s(cos)?, f32s(sin)?);
            cpu_out(x.dtype(), x.shape(), |out| {
                layout::rope(&xf, l, (heads, d), &cf, &sf, r, interleaved, out);
                Ok(())
            })
        },
        cuda => |t| cuda::ops::rope(&t[0], &t[1], &t[2], l, (heads, d), r, interleaved))
}

// --- elementwise ----------------------------------------------------------------------------

/// `f(x)` elementwise.
pub fn unary(x: &Tensor, f: Unary) -> R {
    float_input("unary", x)?;
    dispatch!("unary", x.dtype(), [x], native [0],
        cpu => {
            let xf = f32s(x)?;
            cpu_out(x.dtype(), x.shape(), |out| {
                cpu::elementwise::unary(f, &xf, out);
                Ok(())
            })
        },
        cuda => |t| cuda::ops::unary(&t[0], f))
}

/// An activation elementwise.
pub fn activation(x: &Tensor, act: Activation) -> R {
    unary(x, Unary::Act(act))
}

/// `x·mul + add` with scalars.
pub fn affine(x: &Tensor, mul: f32, add: f32) -> R {
    float_input("affine", x)?;
    dispatch!("affine", x.dtype(), [x], native [0],
        cpu => {
            let xf = f32s(x)?;
            cpu_out(x.dtype(), x.shape(), |out| {
                cpu::elementwise::affine(&xf, mul, add, out);
                Ok(())
            })
        },
        cuda => |t| cuda::ops::affine(&t[0], mul, add))
}

/// `a ∘ b` with NumPy broadcasting.
pub fn binary(a: &Tensor, b: &Tensor, f: Binary) -> R {
    const OP: &str = "binary";
    float_input(OP, a)?;
    float_input(OP, b)?;
    let out_shape = shape::broadcast(a.shape(), b.shape()).ok_or_else(|| {
        invalid(
            OP,
            format!(
                "shapes {:?} and {:?} do not broadcast",
                a.shape(),
                b.shape()
            ),
        )
    })?;
    let (sa, sb) = (
        shape::broadcast_strides(a.shape(), &out_shape),
        shape::broadcast_strides(b.shape(), &out_shape),
    );
    // Half `a` is kept with `b` of its type, or with `b` in f32 (another type is widened).
    let keep = if b.dtype() == a.dtype() {
        vec![0, 1]
    } else {
        vec![0]
    };
    dispatch!(OP, a.dtype(), [a, b], native keep,
        cpu => {
            let (af, bf) = (f32s(a)?, f32s(b)?);
            cpu_out(a.dtype(), &out_shape, |out| {
                if out_shape.is_empty() {
                    out[0] = f.apply(af[0], bf[0]);
                } else {
                    cpu::elementwise::binary(f, &af, &sa, &bf, &sb, &out_shape, out);
                }
                Ok(())
            })
        },
        cuda => |t| cuda::ops::binary(&t[0], &t[1], f, &sa, &sb, &out_shape))
}

/// adaLN's gated residual `x + gate ⊙ y`: x and y `[B, L, D]` (any leading axes), gate one row
/// of `D` per leading batch entry (`[D]`, `[B, D]` or `[B, 1, D]`).
pub fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> R {
    const OP: &str = "gated_residual";
    for t in [x, y, gate] {
        float_input(OP, t)?;
    }
    if x.shape() != y.shape() || x.rank() == 0 {
        return Err(invalid(
            OP,
            format!(
                "x {:?} and y {:?} must have one shape",
                x.shape(),
                y.shape()
            ),
        ));
    }
    let d = x.shape()[x.rank() - 1];
    let rows = x.numel() / d.max(1);
    let groups = gate.numel() / d.max(1);
    if !gate.numel().is_multiple_of(d.max(1)) || groups == 0 || !rows.is_multiple_of(groups) {
        return Err(invalid(
            OP,
            format!("gate {:?} does not fit x {:?}", gate.shape(), x.shape()),
        ));
    }
    dispatch!(OP, x.dtype(), [x, y, gate], native [0, 1],
        cpu => {
            let (xf, yf, gf) = (f32s(x)?, f32s(y)?, f32s(gate)?);
            cpu_out(x.dtype(), x.shape(), |out| {
                cpu::elementwise::gated_residual(&xf, &yf, &gf, d, groups, out);
                Ok(())
            })
        },
        cuda => |t| cuda::ops::gated_residual(&t[0], &t[1], &t[2], d, groups))
}

/// Reduces over `axes` (negative count from the end), keeping them as size 1 when `keepdim`.
pub fn reduce(x: &Tensor, axes: &[i64], keepdim: bool, op: Reduce) -> R {
    const OP: &str = "reduce";
    float_input(OP, x)?;
    let mut ax: Vec<usize> = axes
        .iter()
        .map(|&a| {
            shape::axis(a, x.rank())
                .ok_or_else(|| invalid(OP, format!("axis {a} out of range for {:?}", x.shape())))
        })
        .collect::<R<_>>()?;
    if ax.is_empty() {
        ax = (0..x.rank()).collect();
    }
    ax.sort_unstable();
    ax.dedup();
    // Reduce one axis at a time, last first, keeping dims so indices stay valid.
    let mut cur = cast(x, DType::F32)?;
    for &a in ax.iter().rev() {
        let (outer, dim, inner) = shape::split_at_axis(cur.shape(), a);
        let mut s = cur.shape().to_vec();
        s[a] = 1;
        cur = match cur.device() {
            Device::Cpu => {
                let xf = f32s(&cur)?;
                debug_assert_eq!(xf.len(), outer * dim * inner);
                cpu_out(DType::F32, &s, |out| {
                    cpu::reduce::reduce(op, &xf, dim, inner, out);
                    Ok(())
                })?
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => cuda::ops::reduce(&cur, op, outer, dim, inner, &s)?,
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(no_cuda()),
        };
    }
    let final_shape: Vec<usize> = if keepdim {
        cur.shape().to_vec()
    } else {
        x.shape()
            .iter()
            .enumerate()
            .filter(|(i, _)| !ax.contains(i))
            .map(|(_, &d)| d)
            .collect()
    };
    cast(&cur.reshaped(&final_shape)?, x.dtype())
}

// --- layout ---------------------------------------------------------------------------------

/// The same data under `shape`; one entry may be -1.
pub fn reshape(x: &Tensor, shape_req: &[i64]) -> R {
    let s = shape::resolve_reshape(shape_req, x.numel()).map_err(|m| invalid("reshape", m))?;
    Ok(x.reshaped(&s)?)
}

/// Reorders axes: output axis `i` is input axis `perm[i]`.
pub fn permute(x: &Tensor, perm: &[usize]) -> R {
    const OP: &str = "permute";
    dense(OP, x)?;
    let mut seen = vec![false; x.rank()];
    if perm.len() != x.rank()
        || perm
            .iter()
            .any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true))
    {
        return Err(invalid(
            OP,
            format!("{perm:?} is not a permutation of {} axes", x.rank()),
        ));
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    if perm.iter().enumerate().all(|(i, &p)| i == p) {
        return Ok(x.clone());
    }
    match x.device() {
        Device::Cpu => {
            let mut out = Tensor::zeros(x.dtype(), &out_shape)?;
            macro_rules! go {
                ($t:ty) => {
                    layout::permute(
                        x.as_slice::<$t>()?,
                        x.shape(),
                        perm,
                        out.as_mut_slice::<$t>()?,
                    )
                };
            }
            match x.dtype().size() {
                4 => match x.dtype() {
                    DType::F32 => go!(f32),
                    _ => go!(i32),
                },
                2 => match x.dtype() {
                    DType::F16 => go!(half::f16),
                    _ => go!(half::bf16),
                },
                8 => go!(i64),
                _ => go!(u8),
            }
            Ok(out)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::ops::permute(x, perm, &out_shape),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(no_cuda()),
    }
}

/// Joins tensors along `axis`; all other axes must agree.
pub fn concat(xs: &[&Tensor], axis: i64) -> R {
    const OP: &str = "concat";
    let first = xs
        .first()
        .ok_or_else(|| invalid(OP, "needs at least one tensor"))?;
    let ax = shape::axis(axis, first.rank()).ok_or_else(|| {
        invalid(
            OP,
            format!("axis {axis} out of range for {:?}", first.shape()),
        )
    })?;
    // Float tensors of other float types join in the first's type (as `binary` gives `a`'s), so
    // a learned f32 token joins bf16 activations ([`crate::kernels::gpu_activations`]).
    let recast: Vec<Tensor>;
    let recast_refs: Vec<&Tensor>;
    let xs = if is_float(first.dtype())
        && xs
            .iter()
            .any(|t| t.dtype() != first.dtype() && is_float(t.dtype()))
    {
        recast = xs
            .iter()
            .map(|t| {
                if is_float(t.dtype()) {
                    cast(t, first.dtype())
                } else {
                    Ok((*t).clone())
                }
            })
            .collect::<R<_>>()?;
        recast_refs = recast.iter().collect();
        &recast_refs[..]
    } else {
        xs
    };
    let mut out_shape = first.shape().to_vec();
    out_shape[ax] = 0;
    for t in xs {
        let same = t.rank() == first.rank()
            && t.dtype() == first.dtype()
            && (0..t.rank()).all(|i| i == ax || t.shape()[i] == first.shape()[i]);
        if !same {
            return Err(invalid(
                OP,
                format!(
                    "{} {:?} does not join {} {:?} on axis {ax}",
                    t.dtype().name(),
                    t.shape(),
                    first.dtype().name(),
                    first.shape()
                ),
            ));
        }
        out_shape[ax] += t.shape()[ax];
    }
    // Weights split between a GPU and host memory by the VRAM cap (a loader fusing q, k and v)
    // join in host memory, to be staged on use.
    let on_host: Vec<Tensor>;
    let host_refs: Vec<&Tensor>;
    let xs = if staging_device(xs).is_some() && xs.iter().any(|t| t.device() == Device::Cpu) {
        on_host = xs
            .iter()
            .map(|t| t.to_device(Device::Cpu))
            .collect::<R<_>>()?;
        host_refs = on_host.iter().collect();
        &host_refs[..]
    } else {
        xs
    };
    let dev = same_device(OP, xs)?;
    if ax + 1 == first.rank() {
        dense(OP, first)?;
    }
    let (outer, _, _) = shape::split_at_axis(first.shape(), ax);
    let lens: Vec<usize> = xs
        .iter()
        .map(|t| inner_bytes(t.dtype(), t.shape(), ax))
        .collect();
    match dev {
        Device::Cpu => {
            let parts = xs
                .iter()
                .map(|t| t.cpu_bytes())
                .collect::<Result<Vec<_>, _>>()?;
            // Under the memory cap, mapped weights joined at load (a loader fusing q, k and v)
            // stay mapped: the join goes to a file of its own, whose pages the cap releases
            // like any weight's.
            if crate::weights::residency::cap().is_some() && xs.iter().all(|t| t.is_mapped()) {
                if let Some(t) =
                    crate::weights::residency::mapped_join(first.dtype(), &out_shape, |dst| {
                        layout::concat(&parts, &lens, outer, dst)
                    })
                {
                    // The parts were read for the join only: their pages go too.
                    xs.iter()
                        .for_each(|x| crate::weights::residency::release(x));
                    return Ok(t);
                }
            }
            let mut out = Tensor::zeros(first.dtype(), &out_shape)?;
            layout::concat(
                &parts,
                &lens,
                outer,
                out.unique_bytes_mut().expect("fresh tensor"),
            );
            Ok(out)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::ops::concat(xs, &lens, outer, &out_shape),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(no_cuda()),
    }
}

/// `x[start:end:step]` along `axis` (negative `start`/`end` count from the end, clamped as in
/// Python).
pub fn slice(x: &Tensor, axis: i64, start: i64, end: i64, step: usize) -> R {
    const OP: &str = "slice";
    let ax = shape::axis(axis, x.rank())
        .ok_or_else(|| invalid(OP, format!("axis {axis} out of range for {:?}", x.shape())))?;
    if step == 0 {
        return Err(invalid(OP, "step must be at least 1"));
    }
    let (outer, dim, inner) = shape::split_at_axis(x.shape(), ax);
    let clamp = |i: i64| -> usize {
        let i = if i < 0 { i + dim as i64 } else { i };
        i.clamp(0, dim as i64) as usize
    };
    let (s, e) = (clamp(start), clamp(end));
    let count = if e > s { (e - s).div_ceil(step) } else { 0 };
    let mut out_shape = x.shape().to_vec();
    out_shape[ax] = count;
    if ax + 1 == x.rank() {
        dense(OP, x)?;
    }
    match x.device() {
        Device::Cpu => {
            let mut out = Tensor::zeros(x.dtype(), &out_shape)?;
            // Moved in bytes: the `inner` values after the axis are one element of `row` bytes
            // (whole blocks for a block format).
            let row = inner_bytes(x.dtype(), x.shape(), ax + 1);
            layout::slice(
                x.cpu_bytes()?,
                row,
                outer,
                dim,
                1,
                s,
                step,
                count,
                out.unique_bytes_mut().expect("fresh tensor"),
            );
            Ok(out)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::ops::slice(x, outer, dim, inner, s, step, count, &out_shape),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(no_cuda()),
    }
}

/// Splits along `axis` into pieces of `sizes` (which must sum to the axis length).
pub fn split(x: &Tensor, axis: i64, sizes: &[usize]) -> R<Vec<Tensor>> {
    let ax = shape::axis(axis, x.rank()).ok_or_else(|| {
        invalid(
            "split",
            format!("axis {axis} out of range for {:?}", x.shape()),
        )
    })?;
    if sizes.iter().sum::<usize>() != x.shape()[ax] {
        return Err(invalid(
            "split",
            format!("sizes {sizes:?} do not sum to {}", x.shape()[ax]),
        ));
    }
    let mut at = 0;
    sizes
        .iter()
        .map(|&s| {
            let t = slice(x, ax as i64, at as i64, (at + s) as i64, 1);
            at += s;
            t
        })
        .collect()
}

/// Resizes the last two axes of `[..., H, W]` to `size`.
pub fn upsample2d(x: &Tensor, size: (usize, usize), mode: Upsample) -> R {
    const OP: &str = "upsample";
    float_input(OP, x)?;
    if x.rank() < 2
        || (x.numel() > 0 && (x.shape()[x.rank() - 2] == 0 || x.shape()[x.rank() - 1] == 0))
    {
        return Err(invalid(
            OP,
            format!("needs [..., H, W] with H, W >= 1, got {:?}", x.shape()),
        ));
    }
    let (h, w) = (x.shape()[x.rank() - 2], x.shape()[x.rank() - 1]);
    let planes = x.numel() / (h * w).max(1);
    let mut out_shape = x.shape().to_vec();
    let r = out_shape.len();
    out_shape[r - 2] = size.0;
    out_shape[r - 1] = size.1;
    dispatch!(OP, x.dtype(), [x],
        cpu => {
            let xf = f32s(x)?;
            cpu_out(x.dtype(), &out_shape, |out| {
                layout::upsample2d(&xf, planes, h, w, size.0, size.1, mode, out);
                Ok(())
            })
        },
        cuda => |t| cuda::ops::upsample2d(&t[0], planes, h, w, size, mode, &out_shape))
}

/// The `k` largest entries along the last axis of `x` `[..., N]`, descending (ties: the lower
/// index first), as `torch.topk(x, k)` returns them: values `[..., k]` and their i64 indices.
pub fn topk(x: &Tensor, k: usize) -> R<Vec<Tensor>> {
    const OP: &str = "topk";
    float_input(OP, x)?;
    let n = x.shape().last().copied().unwrap_or(0);
    if x.rank() == 0 || k == 0 || k > n {
        return Err(invalid(
            OP,
            format!("k {k} for rows of {n} (x {:?})", x.shape()),
        ));
    }
    let rows = x.numel() / n;
    let mut out_shape = x.shape().to_vec();
    *out_shape.last_mut().unwrap() = k;
    match x.device() {
        Device::Cpu => {
            let xf = f32s(x)?;
            let (mut vals, mut idx) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * k));
            let mut order: Vec<usize> = Vec::with_capacity(n);
            for row in xf.chunks(n) {
                order.clear();
                order.extend(0..n);
                // Stable: equal values keep the lower index first.
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                for &j in &order[..k] {
                    vals.push(row[j]);
                    idx.push(j as i64);
                }
            }
            let v = Tensor::from_f32(&out_shape, &vals)?;
            let v = if x.dtype() == DType::F32 {
                v
            } else {
                cast(&v, x.dtype())?
            };
            let ib: Vec<u8> = idx.iter().flat_map(|i| i.to_le_bytes()).collect();
            Ok(vec![v, Tensor::from_bytes(DType::I64, &out_shape, &ib)?])
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let xf = cast(x, DType::F32)?;
            let mut out = cuda::ops::topk(&xf, rows, n, k, &out_shape)?;
            if x.dtype() != DType::F32 {
                out[0] = cast(&out[0], x.dtype())?;
            }
            Ok(out)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(no_cuda()),
    }
}

/// `x` `[M, D]` with rows of `src` `[R, D]` added at rows `index` `[R]` (repeated indices add
/// up): `torch.index_add(x, 0, index, src)`, the scatter that combines MoE experts' outputs.
pub fn index_add(x: &Tensor, index: &Tensor, src: &Tensor) -> R {
    const OP: &str = "index_add";
    float_input(OP, x)?;
    float_input(OP, src)?;
    if x.rank() != 2 || src.rank() != 2 || src.shape()[1] != x.shape()[1] {
        return Err(invalid(
            OP,
            format!(
                "x {:?} and src {:?} must be [M, D] and [R, D]",
                x.shape(),
                src.shape()
            ),
        ));
    }
    let (m, d, r) = (x.shape()[0], x.shape()[1], src.shape()[0]);
    if !matches!(index.dtype(), DType::I64 | DType::I32 | DType::U8) || index.numel() != r {
        return Err(invalid(
            OP,
            format!(
                "index must be {r} integers, got {} {:?}",
                index.dtype().name(),
                index.shape()
            ),
        ));
    }
    let idv: Vec<i64> = cast(index, DType::I64)?.to_vec::<i64>()?;
    if let Some(bad) = idv.iter().find(|&&i| i < 0 || i as usize >= m) {
        return Err(invalid(OP, format!("index {bad} is outside x's {m} rows")));
    }
    match same_device(OP, &[x, src])? {
        Device::Cpu => {
            let (xf, sf) = (f32s(x)?, f32s(src)?);
            cpu_out(x.dtype(), x.shape(), |out| {
                out.copy_from_slice(&xf);
                for (row, &i) in sf.chunks(d.max(1)).zip(&idv) {
                    for (o, s) in out[i as usize * d..(i as usize + 1) * d]
                        .iter_mut()
                        .zip(row)
                    {
                        *o += s;
                    }
                }
                Ok(())
            })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => on_cuda(x.dtype(), &[x, src], |t| {
            cuda::ops::index_add(&t[0], &idv, &t[1], r, d)
        }),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(no_cuda()),
    }
}

/// Rows of `table` `[V, D]` picked by integer `ids` `[...]` → `[..., D]`.
pub fn embedding(table: &Tensor, ids: &Tensor) -> R {
    const OP: &str = "embedding";
    dense(OP, table)?;
    if table.rank() != 2 {
        return Err(invalid(
            OP,
            format!("table must be [V, D], got {:?}", table.shape()),
        ));
    }
    if !matches!(ids.dtype(), DType::I64 | DType::I32 | DType::U8) {
        return Err(invalid(
            OP,
            format!("ids must be integers, got {}", ids.dtype().name()),
        ));
    }
    let (vocab, d) = (table.shape()[0], table.shape()[1]);
    let mut out_shape = ids.shape().to_vec();
    out_shape.push(d);
    let idv: Vec<i64> = cast(ids, DType::I64)?.to_vec::<i64>()?;
    if let Some(bad) = idv.iter().find(|&&i| i < 0 || i as usize >= vocab) {
        return Err(invalid(
            OP,
            format!("id {bad} is outside the table's {vocab} rows"),
        ));
    }
    match table.device() {
        Device::Cpu => {
            let mut out = Tensor::zeros(table.dtype(), &out_shape)?;
            let row = d * table.dtype().size();
            layout::embedding(
                table.cpu_bytes()?,
                vocab,
                row,
                &idv,
                out.unique_bytes_mut().expect("fresh tensor"),
            )
            .map_err(|id| invalid(OP, format!("id {id} is outside the table")))?;
            Ok(out)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => cuda::ops::embedding(table, &idv, d, n, &out_shape),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(no_cuda()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], seed: u64) -> Tensor {
        randn(shape, seed, Device::Cpu).unwrap()
    }

    #[test]
    fn concat_joins_other_float_types_in_the_first_ones_type() {
        // A bf16 tensor after an f32 one is widened (exactly), an f32 one after a bf16 one
        // rounded to bf16 as `cast` rounds; an integer tensor still does not join floats.
        let (a, b) = (t(&[2, 3], 1), cast(&t(&[2, 2], 2), DType::BF16).unwrap());
        let ab = concat(&[&a, &b], 1).unwrap();
        assert_eq!((ab.dtype(), ab.shape()), (DType::F32, &[2, 5][..]));
        let (av, bv, abv) = (
            a.to_f32_vec().unwrap(),
            b.to_f32_vec().unwrap(),
            ab.to_f32_vec().unwrap(),
        );
        for r in 0..2 {
            assert_eq!(&abv[r * 5..r * 5 + 3], &av[r * 3..r * 3 + 3]);
            assert_eq!(&abv[r * 5 + 3..r * 5 + 5], &bv[r * 2..r * 2 + 2]);
        }
        let ba = concat(&[&b, &a], 1).unwrap();
        assert_eq!(ba.dtype(), DType::BF16);
        let a16 = cast(&a, DType::BF16).unwrap().to_f32_vec().unwrap();
        assert_eq!(&ba.to_f32_vec().unwrap()[2..5], &a16[0..3]);
        let ids = Tensor::from_slice(&[2, 1], &[1i64, 2]).unwrap();
        assert!(concat(&[&a, &ids], 1).is_err());
    }

    #[test]
    fn topk_picks_the_largest_in_order_with_ties_by_index() {
        // Reference: each row sorted here (descending, ties by lower index).
        let x = t(&[4, 9], 5);
        let out = topk(&x, 3).unwrap();
        let (vals, idx) = (
            out[0].to_f32_vec().unwrap(),
            out[1].to_vec::<i64>().unwrap(),
        );
        assert_eq!(out[1].shape(), &[4, 3]);
        for (r, row) in x.to_f32_vec().unwrap().chunks(9).enumerate() {
            let mut order: Vec<usize> = (0..9).collect();
            order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
            for j in 0..3 {
                assert_eq!(idx[r * 3 + j], order[j] as i64);
                assert_eq!(vals[r * 3 + j], row[order[j]]);
            }
        }
        let ties = Tensor::from_f32(&[1, 5], &[1.0, 3.0, 3.0, 0.5, 3.0]).unwrap();
        let out = topk(&ties, 4).unwrap();
        assert_eq!(out[1].to_vec::<i64>().unwrap(), vec![1, 2, 4, 0]);
        assert!(topk(&ties, 6).is_err() && topk(&ties, 0).is_err());
    }

    #[test]
    fn index_add_sums_rows_at_repeated_indices() {
        // Reference: the sums accumulated in f64 here.
        let (x, src) = (t(&[4, 3], 6), t(&[5, 3], 7));
        let index = Tensor::from_bytes(
            DType::I64,
            &[5],
            &[2i64, 0, 2, 3, 2]
                .iter()
                .flat_map(|i| i.to_le_bytes())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let y = index_add(&x, &index, &src).unwrap().to_f32_vec().unwrap();
        let (xf, sf) = (x.to_f32_vec().unwrap(), src.to_f32_vec().unwrap());
        let mut want: Vec<f64> = xf.iter().map(|&v| v as f64).collect();
        for (r, &i) in [2usize, 0, 2, 3, 2].iter().enumerate() {
            for c in 0..3 {
                want[i * 3 + c] += sf[r * 3 + c] as f64;
            }
        }
        for (g, w) in y.iter().zip(&want) {
            assert!(
                (*g as f64 - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{g} vs {w}"
            );
        }
        let bad = Tensor::from_bytes(DType::I64, &[5], &[9u8; 40]).unwrap();
        assert!(index_add(&x, &bad, &src).is_err());
        assert!(index_add(&x, &index, &t(&[5, 4], 8)).is_err());
    }

    #[test]
    fn half_precision_ops_match_f64_within_1e_2() {
        // Inputs are rounded to f16/bf16 first; the f64 reference uses the rounded values, and
        // the bound (1e-2 relative to the largest output) covers rounding the result.
        for dt in [DType::F16, DType::BF16] {
            let x = cast(&t(&[3, 5, 24], 1), dt).unwrap();
            let w = cast(&t(&[10, 24], 2), dt).unwrap();
            let y = linear(&x, &w, None, Activation::None).unwrap();
            assert_eq!(y.dtype(), dt);
            let (xf, wf, yf) = (
                x.to_f32_vec().unwrap(),
                w.to_f32_vec().unwrap(),
                y.to_f32_vec().unwrap(),
            );
            let want: Vec<f64> = (0..15)
                .flat_map(|r| {
                    let (xf, wf) = (&xf, &wf);
                    (0..10).map(move |n| {
                        (0..24)
                            .map(|k| xf[r * 24 + k] as f64 * wf[n * 24 + k] as f64)
                            .sum()
                    })
                })
                .collect();
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let err = yf
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0f64, f64::max)
                / scale;
            assert!(err < 1e-2, "{dt:?}: {err}");
        }
    }

    #[test]
    fn bad_arguments_are_errors_not_panics() {
        let a = t(&[2, 3], 1);
        let b = t(&[4, 5], 2);
        let ids = Tensor::from_slice(&[2], &[0i64, 7]).unwrap();
        let cases: Vec<(&str, R)> = vec![
            ("matmul", matmul(&a, &b, false, false)),
            ("matmul rank", matmul(&t(&[3], 1), &b, false, false)),
            ("linear", linear(&a, &b, None, Activation::None)),
            (
                "conv groups",
                conv(
                    &t(&[1, 3, 8, 8], 1),
                    &t(&[4, 2, 3, 3], 2),
                    None,
                    &[],
                    &[],
                    &[],
                    2,
                ),
            ),
            (
                "conv kernel",
                conv(
                    &t(&[1, 2, 2, 2], 1),
                    &t(&[4, 2, 3, 3], 2),
                    None,
                    &[],
                    &[],
                    &[],
                    1,
                ),
            ),
            (
                "conv stride",
                conv(
                    &t(&[1, 2, 8, 8], 1),
                    &t(&[4, 2, 3, 3], 2),
                    None,
                    &[0],
                    &[],
                    &[],
                    1,
                ),
            ),
            (
                "attention",
                attention(
                    &t(&[1, 2, 3, 4], 1),
                    &t(&[1, 2, 3, 5], 2),
                    &t(&[1, 2, 3, 4], 3),
                    None,
                    None,
                ),
            ),
            (
                "attention mask",
                attention(
                    &t(&[1, 2, 3, 4], 1),
                    &t(&[1, 2, 5, 4], 2),
                    &t(&[1, 2, 5, 4], 3),
                    Some(&t(&[3, 3], 4)),
                    None,
                ),
            ),
            (
                "layer_norm",
                layer_norm(
                    &a,
                    LayerNorm {
                        weight: Some(&b),
                        ..Default::default()
                    },
                ),
            ),
            (
                "group_norm",
                group_norm(&t(&[1, 6, 4], 1), 4, None, None, 1e-5, Activation::None),
            ),
            ("softmax", softmax(&a, 2)),
            ("binary", binary(&a, &b, Binary::Add)),
            ("reshape", reshape(&a, &[4, -1])),
            ("permute", permute(&a, &[0, 0])),
            ("slice", slice(&a, 1, 0, 2, 0)),
            ("concat", concat(&[&a, &b], 0)),
            ("split", split(&a, 1, &[1, 1]).map(|mut v| v.remove(0))),
            ("embedding", embedding(&b, &ids)),
            ("embedding ids", embedding(&b, &a)),
            (
                "upsample",
                upsample2d(&t(&[3], 1), (2, 2), Upsample::Nearest),
            ),
            (
                "rope",
                rope(&t(&[2, 4, 6], 1), &t(&[4, 4], 2), &t(&[4, 4], 3), true),
            ),
            ("cuda", a.to_device(Device::Cuda(99))),
        ];
        for (name, r) in cases {
            let e = r.err().unwrap_or_else(|| panic!("{name}: accepted"));
            assert!(!e.to_string().is_empty(), "{name}");
        }
        assert!(matches!(
            matmul(&a, &b, false, false),
            Err(OpError::Invalid { op: "matmul", .. })
        ));
    }

    #[test]
    fn a_quantized_weight_is_read_as_stored_and_gives_its_dequantised_product() {
        // A Q8_0 weight [48, 64] (two blocks per row): `linear` reads its bytes as they are
        // (no f32 copy) and gives the product of its dequantised values bit for bit, with a
        // bias and an activation, for few rows and many; rows sliced out stay Q8_0.
        let (n, k) = (48, 64);
        let mut bytes = Vec::new();
        for r in 0..n * k / 32 {
            bytes.extend(half::f16::from_f32(0.01 + 0.001 * r as f32).to_le_bytes());
            bytes.extend((0..32).map(|i| ((r * 7 + i * 13) % 255) as u8));
        }
        let w = Tensor::from_bytes(DType::Q8_0, &[n, k], &bytes).unwrap();
        assert_eq!(w.nbytes(), n * k / 32 * 34);
        let wf = cast(&w, DType::F32).unwrap();
        let b = t(&[n], 2);
        for m in [3, 70] {
            let x = t(&[1, m, k], 1);
            let got = linear(&x, &w, Some(&b), Activation::GeluTanh).unwrap();
            let want = linear(&x, &wf, Some(&b), Activation::GeluTanh).unwrap();
            assert_eq!(got.as_f32(), want.as_f32(), "m = {m}");
        }
        let rows = slice(&w, 0, 8, 24, 1).unwrap();
        assert_eq!(
            (rows.dtype(), rows.shape()),
            (DType::Q8_0, &[16usize, 64][..])
        );
        assert_eq!(
            cast(&rows, DType::F32).unwrap().as_f32(),
            slice(&wf, 0, 8, 24, 1).unwrap().as_f32()
        );
        let joined = concat(&[&rows, &rows], 0).unwrap();
        assert_eq!(joined.nbytes(), 2 * rows.nbytes());
        // What cannot read blocks says so.
        for e in [
            permute(&w, &[1, 0]).unwrap_err(),
            slice(&w, 1, 0, 32, 1).unwrap_err(),
            cast(&wf, DType::Q8_0).unwrap_err(),
            binary(&w, &w, Binary::Add).unwrap_err(),
        ] {
            assert!(e.to_string().contains("q8_0"), "{e}");
        }
        assert!(w.reshaped(&[n * 2, k / 2]).is_err());
        assert!(Tensor::from_bytes(DType::Q8_0, &[2, 33], &[0; 68]).is_err());
    }

    #[test]
    fn layout_ops_round_trip() {
        let x = t(&[2, 3, 4], 5);
        let p = permute(&permute(&x, &[2, 0, 1]).unwrap(), &[1, 2, 0]).unwrap();
        assert_eq!(p.as_f32(), x.as_f32());
        let parts = split(&x, 1, &[1, 2]).unwrap();
        let back = concat(&[&parts[0], &parts[1]], 1).unwrap();
        assert_eq!(back.as_f32(), x.as_f32());
        let ev = slice(&x, -1, 0, i64::MAX, 2).unwrap();
        assert_eq!(ev.shape(), &[2, 3, 2]);
        assert_eq!(ev.as_f32()[1], x.as_f32()[2]);
        let m = reduce(&x, &[0, -1], false, Reduce::Sum).unwrap();
        assert_eq!(m.shape(), &[3]);
        let want: f32 = (0..2)
            .flat_map(|a| (0..4).map(move |c| (a, c)))
            .map(|(a, c)| x.as_f32()[a * 12 + 4 + c])
            .sum();
        assert!((m.as_f32()[1] - want).abs() < 1e-5);
    }
}
