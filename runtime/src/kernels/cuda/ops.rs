//! CUDA implementations of the ops, called by [`crate::tensor::ops`] after it has checked the
//! arguments: f32 device tensors in, a new device tensor out. GEMMs go to cuBLAS; everything else
//! launches a kernel from `kernels.cu`.
//!
//! The ops that carry a DiT's activations (linear, attention, the norms, softmax, rope and the
//! elementwise ones) also take them in bf16 or f16 and give them back in that type
//! ([`act_dtype`]): loaded into f32, computed in f32, rounded once when stored, so the result is
//! the one widening, the f32 kernel and narrowing would give, without those two passes.

use super::{Backend, DeviceBuf};
use crate::kernels::cpu::attention::AttnDims;
use crate::kernels::cpu::conv::ConvGeom;
use crate::kernels::cpu::Activation;
use crate::tensor::ops::{Binary, OpError, Reduce, Unary, Upsample};
use crate::tensor::{DType, Device, Tensor};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

type R<T = Tensor> = Result<T, OpError>;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Dims8 {
    v: [i64; 8],
}
// SAFETY: plain old data, laid out as the kernels' `struct Dims8`.
unsafe impl DeviceRepr for Dims8 {}

impl Dims8 {
    fn of(xs: &[usize]) -> R<Dims8> {
        if xs.len() > 8 {
            return Err(OpError::Device(format!(
                "rank {} is above the CUDA kernels' limit of 8",
                xs.len()
            )));
        }
        let mut d = Dims8::default();
        for (o, &x) in d.v.iter_mut().zip(xs) {
            *o = x as i64;
        }
        Ok(d)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ConvGeo {
    input: [i64; 3],
    k: [i64; 3],
    stride: [i64; 3],
    pad: [i64; 3],
    dil: [i64; 3],
    out: [i64; 3],
}
// SAFETY: plain old data, laid out as the kernels' `struct ConvGeo`.
unsafe impl DeviceRepr for ConvGeo {}

fn dev_err(what: &str) -> impl Fn(String) -> OpError + '_ {
    move |e| OpError::Device(format!("{what}: {e}"))
}

fn backend(t: &Tensor) -> R<Arc<Backend>> {
    match t.device() {
        Device::Cuda(n) => Backend::get(n).map_err(OpError::Device),
        Device::Cpu => Err(OpError::Device("expected a CUDA tensor".into())),
    }
}

fn buf(t: &Tensor) -> R<&DeviceBuf> {
    t.device_buf()
        .ok_or_else(|| OpError::Device("expected a CUDA tensor".into()))
}

fn ptr(be: &Backend, t: &Tensor) -> R<u64> {
    Ok(buf(t)?.ptr(&be.stream))
}

fn opt_ptr(be: &Backend, t: Option<&Tensor>) -> R<u64> {
    t.map_or(Ok(0), |t| ptr(be, t))
}

fn new_tensor(be: &Backend, dtype: DType, shape: &[usize]) -> R<Tensor> {
    let bytes = Tensor::nbytes_for(dtype, shape)
        .ok_or_else(|| OpError::Device(format!("shape {shape:?} is too large")))?;
    Ok(Tensor::from_device_buf(
        dtype,
        shape,
        be.alloc(bytes).map_err(OpError::Device)?,
    ))
}

/// A grid-stride launch over `n` items.
fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row.
fn rows(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.clamp(1, 65_535 * 8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

macro_rules! launch {
    ($be:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let name: &str = &$name;
        let mut b = $be.stream.launch_builder($be.func(name).map_err(OpError::Device)?);
        $( b.arg($arg); )*
        // SAFETY: the arguments match the kernel's signature in kernels.cu (the `_bf16` and
        // `_f16` ones take those types where the f32 one takes f32 activations), and every
        // pointer addresses a live buffer of the size the kernel reads or writes.
        unsafe { b.launch($cfg) }.map(|_| ()).map_err(|e| OpError::Device(format!("kernel {name}: {e}")))
    }};
}

/// The storage type of activation `t` for the kernels that read half-precision activations as
/// they are: bf16 or f16 when `t` is, else f32.
pub fn act_dtype(t: &Tensor) -> DType {
    match t.dtype() {
        DType::BF16 | DType::F16 => t.dtype(),
        _ => DType::F32,
    }
}

/// Kernel `base` for activations stored as `dt`: `base`, `base_bf16` or `base_f16`.
fn kernel_for(base: &str, dt: DType) -> String {
    match dt {
        DType::BF16 => format!("{base}_bf16"),
        DType::F16 => format!("{base}_f16"),
        _ => base.to_string(),
    }
}

/// The cuBLAS type of an f32, bf16 or f16 operand.
fn blas_type(dt: DType) -> cudaDataType {
    match dt {
        DType::BF16 => cudaDataType::CUDA_R_16BF,
        DType::F16 => cudaDataType::CUDA_R_16F,
        _ => cudaDataType::CUDA_R_32F,
    }
}

fn act_code(a: Activation) -> i32 {
    match a {
        Activation::None => 0,
        Activation::Gelu => 1,
        Activation::GeluTanh => 2,
        Activation::Silu => 3,
        Activation::Relu => 4,
    }
}

// --- movement and dtype ----------------------------------------------------------------------

pub fn to_device(host: &Tensor, ordinal: usize) -> R {
    to_device_charged(host, ordinal, 0)
}

/// [`to_device`] for a loaded weight whose `charge` bytes the VRAM cap counts while the copy
/// lives ([`crate::weights::vram::try_charge`]).
pub fn to_device_charged(host: &Tensor, ordinal: usize, charge: usize) -> R {
    let uncharge = || {
        if charge > 0 {
            crate::weights::vram::uncharge(ordinal, charge)
        }
    };
    let be = Backend::get(ordinal).map_err(|e| {
        uncharge();
        OpError::Device(e)
    })?;
    let mut b = be.upload(host.cpu_bytes()?).map_err(|e| {
        uncharge();
        dev_err("upload")(e)
    })?;
    b.vram_charge = charge;
    Ok(Tensor::from_device_buf(host.dtype(), host.shape(), b))
}

/// The device copy of host weight `w` for an op on device `ordinal` under the VRAM cap: staged
/// on first use, within what the loaded weights leave of the cap, with the weights that
/// followed it last time begun ahead on a second stream (`super::staging`).
pub fn stage(w: &Tensor, ordinal: usize) -> R {
    let cap = crate::weights::vram::cap().unwrap_or(usize::MAX);
    let be = Backend::get(ordinal).map_err(OpError::Device)?;
    let budget = cap.saturating_sub(crate::weights::vram::loaded_bytes(ordinal));
    let mut staging = be.staging.lock().unwrap_or_else(|p| p.into_inner());
    staging
        .stage(&be, w, budget, cap)
        .map_err(|e| OpError::Invalid {
            op: "stage",
            msg: e,
        })
}

pub fn to_host(t: &Tensor) -> R {
    let be = backend(t)?;
    let bytes = be
        .download(buf(t)?, t.nbytes())
        .map_err(dev_err("download"))?;
    Ok(Tensor::from_bytes(t.dtype(), t.shape(), &bytes)?)
}

pub fn cast(x: &Tensor, dtype: DType) -> R {
    let be = backend(x)?;
    let out = new_tensor(&be, dtype, x.shape())?;
    let (src, dst, n) = (ptr(&be, x)?, ptr(&be, &out)?, x.numel() as i64);
    let (sd, dd) = (x.dtype().raw(), dtype.raw());
    launch!(be, "cast", grid(x.numel()); &src, &sd, &dst, &dd, &n)?;
    Ok(out)
}

/// A block-quantized device weight (ggml's formats, as stored) dequantised into a new f32
/// tensor of its shape, bit for bit as the CPU's `weights::quant` (the decoders are checked
/// against it on the host, `tests/cuda.rs`). A linear layer calls it just before its GEMM and
/// drops the result after, so the f32 copy lives for one layer in the device's memory pool,
/// which hands the same memory to the next layer's.
pub fn dequantize(w: &Tensor) -> R {
    let be = backend(w)?;
    let format = crate::weights::quant::BlockFormat::of(w.dtype())
        .ok_or_else(|| OpError::Device(format!("{} is not a block format", w.dtype().name())))?;
    let (values, bytes) = w.dtype().block();
    let out = new_tensor(&be, DType::F32, w.shape())?;
    let parts = out.numel() / 32;
    if parts == 0 {
        return Ok(out);
    }
    let (src, dst, n) = (ptr(&be, w)?, ptr(&be, &out)?, parts as i64);
    let (code, bb, ppb) = (format as i32, bytes as i32, (values / 32) as i32);
    launch!(be, "dequantize", grid(parts); &src, &dst, &n, &code, &bb, &ppb)?;
    Ok(out)
}

pub fn randn(shape: &[usize], seed: u64, stream: u64, ordinal: usize) -> R {
    let be = Backend::get(ordinal).map_err(OpError::Device)?;
    let out = new_tensor(&be, DType::F32, shape)?;
    let n = out.numel() as i64;
    let o = ptr(&be, &out)?;
    launch!(be, "randn", grid(out.numel().div_ceil(4)); &o, &n, &seed, &stream)?;
    Ok(out)
}

// --- GEMM ------------------------------------------------------------------------------------

/// Row-major `C[batch, m, n] = op(A)·op(B)` through cuBLAS's column-major SGEMM (computing Cᵀ);
/// in TF32 on tensor cores under [`crate::kernels::tensor_cores`].
#[allow(clippy::too_many_arguments)]
fn sgemm(
    be: &Backend,
    a: u64,
    b: u64,
    c: u64,
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
    stride_a: usize,
    stride_b: usize,
) -> R<()> {
    let compute = if crate::kernels::tensor_cores() {
        cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
    } else {
        cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    let f32t = cudaDataType::CUDA_R_32F;
    gemm_typed(
        be,
        (a, f32t),
        (b, f32t),
        (c, f32t),
        (trans_a, trans_b),
        (m, n, k),
        (batch, stride_a, stride_b),
        compute,
    )
}

/// Row-major `C[batch, m, n] = op(A)·op(B)` with A, B and C of the given cuBLAS types, summed
/// under `compute` (cublasGemmStridedBatchedEx, column-major, computing Cᵀ).
#[allow(clippy::too_many_arguments)]
fn gemm_typed(
    be: &Backend,
    (a, a_type): (u64, cudaDataType),
    (b, b_type): (u64, cudaDataType),
    (c, c_type): (u64, cudaDataType),
    (trans_a, trans_b): (bool, bool),
    (m, n, k): (usize, usize, usize),
    (batch, stride_a, stride_b): (usize, usize, usize),
    compute: cublasComputeType_t,
) -> R<()> {
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let lda = if trans_b { k } else { n };
    let ldb = if trans_a { m } else { k };
    let (alpha, beta) = (1.0f32, 0.0f32);
    let _ = be.ctx.bind_to_thread();
    // SAFETY: the pointers address live buffers holding the operands' `batch` matrices of the
    // stated types; alpha and beta are f32, as the f32 compute types take them.
    unsafe {
        cudarc::cublas::result::gemm_strided_batched_ex(
            *be.blas.handle(),
            op(trans_b),
            op(trans_a),
            n as i32,
            m as i32,
            k as i32,
            (&alpha as *const f32).cast(),
            b as *const std::ffi::c_void,
            b_type,
            lda as i32,
            stride_b as i64,
            a as *const std::ffi::c_void,
            a_type,
            ldb as i32,
            stride_a as i64,
            (&beta as *const f32).cast(),
            c as *mut std::ffi::c_void,
            c_type,
            n as i32,
            (m * n) as i64,
            batch as i32,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .map_err(|e| OpError::Device(format!("cuBLAS GEMM: {e}")))
}

#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
    batch: usize,
    a_batched: bool,
    b_batched: bool,
    m: usize,
    n: usize,
    k: usize,
    out_shape: &[usize],
) -> R {
    let be = backend(a)?;
    let out = new_tensor(&be, DType::F32, out_shape)?;
    if out.numel() == 0 {
        return Ok(out);
    }
    if k == 0 {
        return fill_zero(&be, out);
    }
    let sa = if a_batched { m * k } else { 0 };
    let sb = if b_batched { k * n } else { 0 };
    sgemm(
        &be,
        ptr(&be, a)?,
        ptr(&be, b)?,
        ptr(&be, &out)?,
        trans_a,
        trans_b,
        m,
        n,
        k,
        batch.max(1),
        sa,
        sb,
    )?;
    Ok(out)
}

/// `out` with every byte zeroed (0.0 in f32, bf16 and f16 alike).
fn fill_zero(be: &Backend, out: Tensor) -> R {
    let (o, bytes) = (ptr(be, &out)?, out.nbytes());
    // SAFETY: `o` addresses the tensor's `bytes` bytes, set on the backend's stream.
    unsafe { cudarc::driver::result::memset_d8_async(o, 0, bytes, be.stream.cu_stream()) }
        .map_err(|e| OpError::Device(format!("memset: {e}")))?;
    Ok(out)
}

fn bias_act(
    be: &Backend,
    y: &Tensor,
    bias_col: u64,
    bias_row: u64,
    rows: usize,
    cols: usize,
    act: Activation,
) -> R<()> {
    if bias_col == 0 && bias_row == 0 && act == Activation::None {
        return Ok(());
    }
    let (yp, r, c, a) = (ptr(be, y)?, rows as i64, cols as i64, act_code(act));
    launch!(be, "bias_act", grid(rows * cols); &yp, &bias_col, &bias_row, &r, &c, &a)
}

/// `x·wᵀ + bias`, then `act`, summed in f32. `x` is f32, or bf16/f16 activations of `w`'s own
/// type (the dispatcher widens any other pairing); the output is of `x`'s storage type. `w` is
/// f32 (SGEMM; TF32 under tensor cores) or bf16/f16 read as stored: an f32 `x` is rounded to its
/// type (the tensor-core path passes it unwidened), a half `x` is already of it.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    act: Activation,
    m: usize,
    n: usize,
    k: usize,
    out_shape: &[usize],
) -> R {
    let be = backend(x)?;
    let out_dt = act_dtype(x);
    let out = new_tensor(&be, out_dt, out_shape)?;
    if out.numel() == 0 {
        return Ok(out);
    }
    let half = matches!(w.dtype(), DType::BF16 | DType::F16);
    let xh = if half && x.dtype() != w.dtype() {
        cast(x, w.dtype())?
    } else {
        x.clone()
    };
    // The bias and activation fused into a cuBLASLt epilogue where it has one; cuBLAS then
    // `bias_act` otherwise, or when cuBLASLt declines.
    if let (true, Some(epi), Some(lt)) =
        (k > 0, super::blaslt::epilogue(bias.is_some(), act), be.lt())
    {
        let operands = (ptr(&be, &xh)?, ptr(&be, w)?, w.dtype());
        let tf32 = crate::kernels::tensor_cores();
        let (bias_p, out_p) = (opt_ptr(&be, bias)?, ptr(&be, &out)?);
        let result = super::blaslt::linear(
            &be,
            lt,
            operands,
            bias_p,
            (out_p, out_dt),
            (m, n, k),
            tf32,
            epi,
        );
        match result {
            Ok(()) => return Ok(out),
            Err(e) => tracing::debug!("{e}: cuBLAS and bias_act instead"),
        }
    }
    let epilogue = bias.is_some() || act != Activation::None;
    // Half activations with a bias or an activation go through f32 sums, which `bias_act`
    // finishes and rounds once; without them the GEMM writes the activation type itself.
    let sums = if out_dt != DType::F32 && (epilogue || w.dtype() != out_dt) {
        new_tensor(&be, DType::F32, out_shape)?
    } else {
        out.clone()
    };
    if k == 0 {
        fill_zero(&be, sums.clone())?;
    } else if half {
        let w_type = blas_type(w.dtype());
        gemm_typed(
            &be,
            (ptr(&be, &xh)?, w_type),
            (ptr(&be, w)?, w_type),
            (ptr(&be, &sums)?, blas_type(sums.dtype())),
            (false, true),
            (m, n, k),
            (1, 0, 0),
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
        )?;
    } else {
        sgemm(
            &be,
            ptr(&be, x)?,
            ptr(&be, w)?,
            ptr(&be, &sums)?,
            false,
            true,
            m,
            n,
            k,
            1,
            0,
            0,
        )?;
    }
    if out_dt == DType::F32 {
        bias_act(&be, &out, opt_ptr(&be, bias)?, 0, m, n, act)?;
    } else if sums.dtype() == DType::F32 {
        let (sp, yp, bp, zero) = (ptr(&be, &sums)?, ptr(&be, &out)?, opt_ptr(&be, bias)?, 0u64);
        let (r, c, a) = (m as i64, n as i64, act_code(act));
        launch!(be, kernel_for("bias_act", out_dt), grid(m * n); &sp, &yp, &bp, &zero, &r, &c, &a)?;
    }
    Ok(out)
}

pub fn conv(g: &ConvGeom, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, out_shape: &[usize]) -> R {
    let be = backend(x)?;
    let out = new_tensor(&be, DType::F32, out_shape)?;
    let osz = g
        .output()
        .ok_or_else(|| OpError::Device("conv geometry".into()))?;
    let nd = g.input.len();
    let pad3 = |v: &[usize], fill: i64| -> [i64; 3] {
        let mut a = [fill; 3];
        for (i, &x) in v.iter().enumerate() {
            a[3 - nd + i] = x as i64;
        }
        a
    };
    let geo = ConvGeo {
        input: pad3(&g.input, 1),
        k: pad3(&g.kernel, 1),
        stride: pad3(&g.stride, 1),
        pad: pad3(&g.padding, 0),
        dil: pad3(&g.dilation, 1),
        out: pad3(&osz, 1),
    };
    let l_out: usize = osz.iter().product();
    let l_in: usize = g.input.iter().product();
    let kprod: usize = g.kernel.iter().product();
    let (cgi, cgo) = (g.c_in / g.groups, g.c_out / g.groups);
    let rows_k = cgi * kprod;
    let cols = new_tensor(&be, DType::F32, &[rows_k.max(1), l_out.max(1)])?;
    let (xp, wp, op, cp) = (
        ptr(&be, x)?,
        ptr(&be, w)?,
        ptr(&be, &out)?,
        ptr(&be, &cols)?,
    );
    for b in 0..g.n {
        for grp in 0..g.groups {
            let xg = xp + ((b * g.c_in + grp * cgi) * l_in * 4) as u64;
            let wg = wp + (grp * cgo * rows_k * 4) as u64;
            let og = op + ((b * g.c_out + grp * cgo) * l_out * 4) as u64;
            let c_in = cgi as i64;
            launch!(be, "im2col", grid(rows_k * l_out); &xg, &cp, &c_in, &geo)?;
            sgemm(&be, wg, cp, og, false, false, cgo, l_out, rows_k, 1, 0, 0)?;
        }
    }
    if let Some(bias) = bias {
        // The bias is per channel: rows of `l_out` within each sample.
        let bp = ptr(&be, bias)?;
        for b in 0..g.n {
            let (yp, r, c, a, zero) = (
                op + (b * g.c_out * l_out * 4) as u64,
                g.c_out as i64,
                l_out as i64,
                0i32,
                0u64,
            );
            launch!(be, "bias_act", grid(g.c_out * l_out); &yp, &zero, &bp, &r, &c, &a)?;
        }
    }
    Ok(out)
}

// --- normalisation -----------------------------------------------------------------------------

/// `t` holds x, then the present ones of weight, bias, shift, scale (per `flags`).
pub fn layer_norm(t: &[Tensor], flags: [bool; 4], d: usize, groups: usize, eps: f32) -> R {
    let x = &t[0];
    let be = backend(x)?;
    let mut it = t[1..].iter();
    let mut opt = |present: bool| -> R<u64> {
        if present {
            ptr(&be, it.next().expect("flagged input"))
        } else {
            Ok(0)
        }
    };
    let (w, b, sh, sc) = (
        opt(flags[0])?,
        opt(flags[1])?,
        opt(flags[2])?,
        opt(flags[3])?,
    );
    let dt = act_dtype(x);
    let out = new_tensor(&be, dt, x.shape())?;
    let rws = x.numel() / d.max(1);
    let (xp, yp, r, dd, per_group) = (
        ptr(&be, x)?,
        ptr(&be, &out)?,
        rws as i64,
        d as i32,
        (rws / groups.max(1)).max(1) as i64,
    );
    launch!(be, kernel_for("layer_norm", dt), rows(rws); &xp, &yp, &w, &b, &sh, &sc, &r, &dd, &per_group, &eps)?;
    Ok(out)
}

pub fn rms_norm(x: &Tensor, w: Option<&Tensor>, d: usize, eps: f32) -> R {
    let be = backend(x)?;
    let dt = act_dtype(x);
    let out = new_tensor(&be, dt, x.shape())?;
    let rws = x.numel() / d.max(1);
    let (xp, yp, wp, r, dd) = (
        ptr(&be, x)?,
        ptr(&be, &out)?,
        opt_ptr(&be, w)?,
        rws as i64,
        d as i32,
    );
    launch!(be, kernel_for("rms_norm", dt), rows(rws); &xp, &yp, &wp, &r, &dd, &eps)?;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    t: &[Tensor],
    flags: [bool; 2],
    n: usize,
    c: usize,
    s: usize,
    groups: usize,
    eps: f32,
    act: Activation,
) -> R {
    let x = &t[0];
    let be = backend(x)?;
    let mut it = t[1..].iter();
    let mut opt = |present: bool| -> R<u64> {
        if present {
            ptr(&be, it.next().expect("flagged input"))
        } else {
            Ok(0)
        }
    };
    let (w, b) = (opt(flags[0])?, opt(flags[1])?);
    let out = new_tensor(&be, DType::F32, x.shape())?;
    let (xp, yp) = (ptr(&be, x)?, ptr(&be, &out)?);
    let (nn, cc, ss, gg, a) = (n as i64, c as i64, s as i64, groups as i64, act_code(act));
    launch!(be, "group_norm", rows(n * groups); &xp, &yp, &w, &b, &nn, &cc, &ss, &gg, &eps, &a)?;
    Ok(out)
}

pub fn softmax(x: &Tensor, outer: usize, dim: usize, inner: usize) -> R {
    let be = backend(x)?;
    let dt = act_dtype(x);
    let out = new_tensor(&be, dt, x.shape())?;
    let (xp, yp, o, d, i) = (
        ptr(&be, x)?,
        ptr(&be, &out)?,
        outer as i64,
        dim as i64,
        inner as i64,
    );
    launch!(be, kernel_for("softmax", dt), rows(outer * inner); &xp, &yp, &o, &d, &i)?;
    Ok(out)
}

// --- attention and positions -------------------------------------------------------------------

/// Batch × heads as a launch's grid height (at most 65535).
fn grid_y(heads: usize) -> R<u32> {
    u32::try_from(heads)
        .ok()
        .filter(|&n| n <= 65_535)
        .ok_or_else(|| {
            OpError::Device(format!(
                "CUDA attention supports up to 65535 batch×heads, got {heads}"
            ))
        })
}

pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    strides: Option<[usize; 3]>,
    scale: f32,
    dims: AttnDims,
) -> R {
    let be = backend(q)?;
    if dims.d > 256 || dims.dv > 256 {
        return Err(OpError::Device(format!(
            "CUDA attention supports head sizes up to 256, got {} and {}",
            dims.d, dims.dv
        )));
    }
    // q, k and v share one storage type (the dispatcher widens a mixed call).
    let dt = act_dtype(q);
    let out = new_tensor(&be, dt, &[dims.b, dims.h, dims.lq, dims.dv])?;
    let total = dims.b * dims.h * dims.lq;
    if total == 0 || dims.dv == 0 {
        return Ok(out);
    }
    let st = strides.unwrap_or([0; 3]);
    let (qp, kp, vp, mp, op) = (
        ptr(&be, q)?,
        ptr(&be, k)?,
        ptr(&be, v)?,
        opt_ptr(&be, mask)?,
        ptr(&be, &out)?,
    );
    let (b, h, lq, lk, d, dv) = (
        dims.b as i32,
        dims.h as i32,
        dims.lq as i32,
        dims.lk as i32,
        dims.d as i32,
        dims.dv as i32,
    );
    let (sb, sh, sq) = (st[0] as i64, st[1] as i64, st[2] as i64);
    if crate::kernels::tensor_cores() && dims.d == dims.dv && dims.d <= 128 {
        // Tensor cores: 64 query rows of one head per block of 4 warps.
        let heads = grid_y(dims.b * dims.h)?;
        let cfg = LaunchConfig {
            grid_dim: (dims.lq.div_ceil(64) as u32, heads, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        if dims.d <= 64 {
            launch!(be, kernel_for("attention_mma64", dt), cfg; &qp, &kp, &vp, &mp, &op, &h, &lq, &lk, &d, &sb, &sh, &sq, &scale)?;
        } else {
            launch!(be, kernel_for("attention_mma128", dt), cfg; &qp, &kp, &vp, &mp, &op, &h, &lq, &lk, &d, &sb, &sh, &sq, &scale)?;
        }
    } else if dims.d <= 128 && dims.dv <= 128 {
        // Tiled kernel: 8 query rows of one head per block.
        let heads = grid_y(dims.b * dims.h)?;
        let cfg = LaunchConfig {
            grid_dim: (dims.lq.div_ceil(8) as u32, heads, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(be, kernel_for("attention", dt), cfg; &qp, &kp, &vp, &mp, &op, &b, &h, &lq, &lk, &d, &dv, &sb, &sh, &sq, &scale)?;
    } else {
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(4) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(be, kernel_for("attention_wide", dt), cfg; &qp, &kp, &vp, &mp, &op, &b, &h, &lq, &lk, &d, &dv, &sb, &sh, &sq, &scale)?;
    }
    Ok(out)
}

pub fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    l: usize,
    (heads, d): (usize, usize),
    r: usize,
    interleaved: bool,
) -> R {
    let be = backend(x)?;
    let dt = act_dtype(x);
    let out = new_tensor(&be, dt, x.shape())?;
    let rws = x.numel() / d.max(1);
    let hh = heads.max(1) as i32;
    let (xp, yp, cp, sp) = (
        ptr(&be, x)?,
        ptr(&be, &out)?,
        ptr(&be, cos)?,
        ptr(&be, sin)?,
    );
    let (rr, ll, dd, rot, il) = (rws as i64, l as i32, d as i32, r as i32, interleaved as i32);
    launch!(be, kernel_for("rope", dt), grid(x.numel()); &xp, &yp, &cp, &sp, &rr, &ll, &dd, &rot, &il, &hh)?;
    Ok(out)
}

// --- elementwise --------------------------------------------------------------------------------

pub fn unary(x: &Tensor, f: Unary) -> R {
    let be = backend(x)?;
    let dt = act_dtype(x);
    let out = new_tensor(&be, dt, x.shape())?;
    let code: i32 = match f {
        Unary::Neg => 0,
        Unary::Exp => 1,
        Unary::Log => 2,
        Unary::Sqrt => 3,
        Unary::Rsqrt => 4,
        Unary::Abs => 5,
        Unary::Tanh => 6,
        Unary::Sigmoid => 7,
        Unary::Square => 8,
        Unary::Sin => 9,
        Unary::Cos => 10,
        Unary::Act(a) => 100 + act_code(a),
    };
    let (xp, yp, n) = (ptr(&be, x)?, ptr(&be, &out)?, x.numel() as i64);
    launch!(be, kernel_for("unary", dt), grid(x.numel()); &xp, &yp, &n, &code)?;
    Ok(out)
}

pub fn affine(x: &Tensor, mul: f32, add: f32) -> R {
    let be = backend(x)?;
    let dt = act_dtype(x);
    let out = new_tensor(&be, dt, x.shape())?;
    let (xp, yp, n) = (ptr(&be, x)?, ptr(&be, &out)?, x.numel() as i64);
    launch!(be, kernel_for("affine", dt), grid(x.numel()); &xp, &yp, &n, &mul, &add)?;
    Ok(out)
}

pub fn binary(
    a: &Tensor,
    b: &Tensor,
    f: Binary,
    sa: &[usize],
    sb: &[usize],
    out_shape: &[usize],
) -> R {
    let be = backend(a)?;
    // `a` f32 with `b` f32, or `a` half with `b` of its type or f32.
    let dt = act_dtype(a);
    let out = new_tensor(&be, dt, out_shape)?;
    let name = match (dt, b.dtype()) {
        (DType::F32, _) => "binary".to_string(),
        (_, DType::F32) => format!("{}_f32", kernel_for("binary", dt)),
        _ => kernel_for("binary", dt),
    };
    let code: i32 = match f {
        Binary::Add => 0,
        Binary::Sub => 1,
        Binary::Mul => 2,
        Binary::Div => 3,
        Binary::Max => 4,
        Binary::Min => 5,
        Binary::Pow => 6,
    };
    let (shape, sa, sb) = (Dims8::of(out_shape)?, Dims8::of(sa)?, Dims8::of(sb)?);
    let (ap, bp, yp, n, rank) = (
        ptr(&be, a)?,
        ptr(&be, b)?,
        ptr(&be, &out)?,
        out.numel() as i64,
        out_shape.len() as i32,
    );
    launch!(be, name, grid(out.numel()); &ap, &bp, &yp, &n, &rank, &shape, &sa, &sb, &code)?;
    Ok(out)
}

pub fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor, d: usize, groups: usize) -> R {
    let be = backend(x)?;
    // x and y share one storage type; the gate is f32.
    let dt = act_dtype(x);
    let out = new_tensor(&be, dt, x.shape())?;
    let (xp, yp, gp, op) = (ptr(&be, x)?, ptr(&be, y)?, ptr(&be, gate)?, ptr(&be, &out)?);
    let (n, dd, per) = (
        x.numel() as i64,
        d as i64,
        (x.numel() / groups.max(1)).max(1) as i64,
    );
    launch!(be, kernel_for("gated_residual", dt), grid(x.numel()); &xp, &yp, &gp, &op, &n, &dd, &per)?;
    Ok(out)
}

pub fn reduce(
    x: &Tensor,
    op: Reduce,
    outer: usize,
    dim: usize,
    inner: usize,
    out_shape: &[usize],
) -> R {
    let be = backend(x)?;
    let out = new_tensor(&be, DType::F32, out_shape)?;
    let code: i32 = match op {
        Reduce::Sum => 0,
        Reduce::Mean => 1,
        Reduce::Max => 2,
        Reduce::Min => 3,
    };
    let (xp, yp, o, d, i) = (
        ptr(&be, x)?,
        ptr(&be, &out)?,
        outer as i64,
        dim as i64,
        inner as i64,
    );
    launch!(be, "reduce", grid(outer * inner); &xp, &yp, &o, &d, &i, &code)?;
    Ok(out)
}

// --- layout --------------------------------------------------------------------------------------

pub fn permute(x: &Tensor, perm: &[usize], out_shape: &[usize]) -> R {
    let be = backend(x)?;
    let out = new_tensor(&be, x.dtype(), out_shape)?;
    let st = crate::kernels::cpu::layout::strides(x.shape());
    let src_strides: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
    let (os, ss) = (Dims8::of(out_shape)?, Dims8::of(&src_strides)?);
    let (xp, yp, n, rank, elem) = (
        ptr(&be, x)?,
        ptr(&be, &out)?,
        x.numel() as i64,
        out_shape.len() as i32,
        x.dtype().size() as i32,
    );
    launch!(be, "permute", grid(x.numel()); &xp, &yp, &n, &rank, &os, &ss, &elem)?;
    Ok(out)
}

pub fn concat(xs: &[&Tensor], lens: &[usize], outer: usize, out_shape: &[usize]) -> R {
    let be = backend(xs[0])?;
    let out = new_tensor(&be, xs[0].dtype(), out_shape)?;
    let total: usize = lens.iter().sum();
    let base = ptr(&be, &out)?;
    let mut at = 0u64;
    for (t, &len) in xs.iter().zip(lens) {
        if len > 0 && outer > 0 {
            let (src, dst) = (ptr(&be, t)?, base + at);
            let (ss, ds, r, rb) = (len as i64, total as i64, outer as i64, len as i64);
            launch!(be, "copy_rows", grid(outer * len); &src, &ss, &dst, &ds, &r, &rb)?;
        }
        at += len as u64;
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
pub fn slice(
    x: &Tensor,
    outer: usize,
    dim: usize,
    inner: usize,
    start: usize,
    step: usize,
    count: usize,
    out_shape: &[usize],
) -> R {
    let be = backend(x)?;
    let out = new_tensor(&be, x.dtype(), out_shape)?;
    let ib = inner * x.dtype().size();
    if out.numel() == 0 {
        return Ok(out);
    }
    let (xp, yp) = (ptr(&be, x)?, ptr(&be, &out)?);
    let (o, d, i, s, st, c) = (
        outer as i64,
        dim as i64,
        ib as i64,
        start as i64,
        step as i64,
        count as i64,
    );
    launch!(be, "slice", grid(outer * count * ib); &xp, &yp, &o, &d, &i, &s, &st, &c)?;
    Ok(out)
}

pub fn upsample2d(
    x: &Tensor,
    planes: usize,
    h: usize,
    w: usize,
    size: (usize, usize),
    mode: Upsample,
    out_shape: &[usize],
) -> R {
    let be = backend(x)?;
    let out = new_tensor(&be, DType::F32, out_shape)?;
    let (bil, align) = match mode {
        Upsample::Nearest => (0i32, 0i32),
        Upsample::Bilinear { align_corners } => (1, align_corners as i32),
    };
    let (xp, yp, p) = (ptr(&be, x)?, ptr(&be, &out)?, planes as i64);
    let (hh, ww, ho, wo) = (h as i32, w as i32, size.0 as i32, size.1 as i32);
    launch!(be, "upsample2d", grid(out.numel()); &xp, &yp, &p, &hh, &ww, &ho, &wo, &bil, &align)?;
    Ok(out)
}

/// The `k` largest of each of `rows` rows of `n` (f32), descending: values and i64 indices.
pub fn topk(x: &Tensor, rows_n: usize, n: usize, k: usize, out_shape: &[usize]) -> R<Vec<Tensor>> {
    let be = backend(x)?;
    let vals = new_tensor(&be, DType::F32, out_shape)?;
    let idx = new_tensor(&be, DType::I64, out_shape)?;
    let (xp, vp, ip) = (ptr(&be, x)?, ptr(&be, &vals)?, ptr(&be, &idx)?);
    let (rr, nn, kk) = (rows_n as i64, n as i64, k as i64);
    launch!(be, "topk_rows", grid(rows_n); &xp, &vp, &ip, &rr, &nn, &kk)?;
    Ok(vec![vals, idx])
}

/// `out = x; out[index[i]] += src[i]` for `m` rows of `d` (f32; `index` already checked).
pub fn index_add(x: &Tensor, index: &[i64], src: &Tensor, m: usize, d: usize) -> R {
    let be = backend(x)?;
    let out = crate::tensor::ops::affine(x, 1.0, 0.0)?;
    if m == 0 || d == 0 {
        return Ok(out);
    }
    let id_bytes: Vec<u8> = index.iter().flat_map(|i| i.to_le_bytes()).collect();
    let id_buf = be.upload(&id_bytes).map_err(dev_err("upload"))?;
    let (op, ip, sp) = (ptr(&be, &out)?, id_buf.ptr(&be.stream), ptr(&be, src)?);
    let (mm, dd) = (m as i64, d as i64);
    launch!(be, "index_add_rows", grid(m * d); &op, &ip, &sp, &mm, &dd)?;
    drop(id_buf);
    Ok(out)
}

pub fn embedding(table: &Tensor, ids: &[i64], d: usize, ordinal: usize, out_shape: &[usize]) -> R {
    let be = Backend::get(ordinal).map_err(OpError::Device)?;
    let out = new_tensor(&be, table.dtype(), out_shape)?;
    if ids.is_empty() || d == 0 {
        return Ok(out);
    }
    let id_bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    let id_buf = be.upload(&id_bytes).map_err(dev_err("upload"))?;
    let row = (d * table.dtype().size()) as i64;
    let (tp, ip, op, n) = (
        ptr(&be, table)?,
        id_buf.ptr(&be.stream),
        ptr(&be, &out)?,
        ids.len() as i64,
    );
    launch!(be, "embedding", grid(ids.len() * row as usize); &tp, &ip, &op, &n, &row)?;
    // The ids buffer is freed stream-ordered after the kernel.
    drop(id_buf);
    Ok(out)
}
