//! cuBLASLt products with the linear layer's bias and activation fused into the GEMM's epilogue:
//! `x·wᵀ + bias`, then ReLU or tanh-GELU, in one kernel, where cuBLAS followed by `bias_act`
//! passes over the output twice.
//!
//! cuBLASLt is loaded on first use; where it is missing, cannot make a handle, or finds no
//! algorithm for a shape, the caller falls back to cuBLAS and `bias_act`, so the library is an
//! acceleration, never a requirement. Its GELU epilogue is the tanh approximation (the one
//! PyTorch's `_addmm_activation` fuses), so exact-erf GELU and SiLU are not fused.

use super::Backend;
use crate::kernels::cpu::Activation;
use crate::tensor::DType;
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaSlice, DevicePtr};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A cuBLASLt handle and its workspace, for one device.
pub(crate) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
}

// SAFETY: the handle is used under the backend's single stream, as the cuBLAS handle is.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: made by `create_handle`, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

impl Lt {
    /// A handle with NVIDIA's recommended workspace (32 MiB on Hopper, 4 MiB before), or `None`
    /// when cuBLASLt cannot be used here.
    pub(crate) fn new(be: &Backend) -> Option<Lt> {
        catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: only tries to dlopen the library.
            if !unsafe { sys::is_culib_present() } {
                return None;
            }
            let (major, _) = be.ctx.compute_capability().ok()?;
            let bytes = if major >= 9 { 32 << 20 } else { 4 << 20 };
            // SAFETY: the workspace is scratch for cuBLASLt alone.
            let workspace = unsafe { be.stream.alloc::<u8>(bytes) }.ok()?;
            let handle = lt::create_handle().ok()?;
            Some(Lt { handle, workspace })
        }))
        .ok()
        .flatten()
    }
}

/// The epilogue that fuses `bias` (present or not) and `act`, if cuBLASLt has one.
pub(crate) fn epilogue(bias: bool, act: Activation) -> Option<sys::cublasLtEpilogue_t> {
    use sys::cublasLtEpilogue_t::*;
    Some(match (bias, act) {
        (true, Activation::None) => CUBLASLT_EPILOGUE_BIAS,
        (true, Activation::Relu) => CUBLASLT_EPILOGUE_RELU_BIAS,
        (true, Activation::GeluTanh) => CUBLASLT_EPILOGUE_GELU_BIAS,
        (false, Activation::Relu) => CUBLASLT_EPILOGUE_RELU,
        (false, Activation::GeluTanh) => CUBLASLT_EPILOGUE_GELU,
        _ => return None,
    })
}

/// Destroys the cuBLASLt descriptors it holds when dropped, on every path.
#[derive(Default)]
struct Descriptors {
    layouts: Vec<sys::cublasLtMatrixLayout_t>,
    desc: Option<sys::cublasLtMatmulDesc_t>,
    pref: Option<sys::cublasLtMatmulPreference_t>,
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each was created once by cuBLASLt and is destroyed once.
        unsafe {
            for &l in &self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
            if let Some(d) = self.desc {
                let _ = lt::destroy_matmul_desc(d);
            }
            if let Some(p) = self.pref {
                let _ = lt::destroy_matmul_pref(p);
            }
        }
    }
}

/// Row-major `out[m, n] = x[m, k]·w[n, k]ᵀ` then `epi` (bias `[n]` f32 at `bias`, or 0), with x
/// and w of type `ab` (f32, bf16 or f16) and `out` of `out_type` (f32, or bf16/f16 for half
/// activations, rounded once after the epilogue), summed in f32 (TF32 products for f32
/// operands when `tf32`). cuBLASLt is
/// column-major, so it computes `outᵀ[n, m] = w·xᵀ`: A is w (transposed), B is xᵀ, and the
/// bias runs along outᵀ's rows, one per output feature.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear(
    be: &Backend,
    lt_: &Lt,
    (x, w, ab): (u64, u64, DType),
    bias: u64,
    (out, out_type): (u64, DType),
    (m, n, k): (usize, usize, usize),
    tf32: bool,
    epi: sys::cublasLtEpilogue_t,
) -> Result<(), String> {
    use sys::cublasComputeType_t::*;
    use sys::cudaDataType_t::*;
    let (ab_type, compute) = match ab {
        DType::BF16 => (CUDA_R_16BF, CUBLAS_COMPUTE_32F),
        DType::F16 => (CUDA_R_16F, CUBLAS_COMPUTE_32F),
        DType::F32 if tf32 => (CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32),
        DType::F32 => (CUDA_R_32F, CUBLAS_COMPUTE_32F),
        other => return Err(format!("cuBLASLt linear on {}", other.name())),
    };
    let d_type = match out_type {
        DType::BF16 => CUDA_R_16BF,
        DType::F16 => CUDA_R_16F,
        DType::F32 => CUDA_R_32F,
        other => return Err(format!("cuBLASLt linear into {}", other.name())),
    };
    let err = |what: &'static str| move |e: lt::CublasError| format!("cuBLASLt {what}: {e:?}");
    let mut d = Descriptors::default();
    let layout = |d: &mut Descriptors, ty, rows: usize, cols: usize, ld: usize| {
        let l = lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)
            .map_err(err("layout"))?;
        d.layouts.push(l);
        Ok::<_, String>(l)
    };
    // A: w stored column-major as [k, n] (ld k), used transposed; B: xᵀ as [k, m] (ld k); C, D:
    // outᵀ as [n, m] (ld n).
    let a_l = layout(&mut d, ab_type, k, n, k)?;
    let b_l = layout(&mut d, ab_type, k, m, k)?;
    let c_l = layout(&mut d, d_type, n, m, n)?;
    let desc = lt::create_matmul_desc(compute, sys::cudaDataType_t::CUDA_R_32F)
        .map_err(err("descriptor"))?;
    d.desc = Some(desc);
    let set = |attr, ptr: *const c_void, size: usize| {
        // SAFETY: `ptr` addresses `size` bytes of the attribute's type.
        unsafe { lt::set_matmul_desc_attribute(desc, attr, ptr, size) }.map_err(err("attribute"))
    };
    use sys::cublasLtMatmulDescAttributes_t::*;
    // cublasOperation_t as an i32: 1 is CUBLAS_OP_T.
    let trans_a: i32 = 1;
    set(
        CUBLASLT_MATMUL_DESC_TRANSA,
        (&trans_a as *const i32).cast(),
        std::mem::size_of_val(&trans_a),
    )?;
    set(
        CUBLASLT_MATMUL_DESC_EPILOGUE,
        (&epi as *const sys::cublasLtEpilogue_t).cast(),
        std::mem::size_of_val(&epi),
    )?;
    if bias != 0 {
        set(
            CUBLASLT_MATMUL_DESC_BIAS_POINTER,
            (&bias as *const u64).cast(),
            std::mem::size_of::<u64>(),
        )?;
        // The bias stays f32 when the output is half (by default cuBLASLt reads it in the
        // output's type); a layout it does not take is declined, and the caller falls back.
        let bias_type = CUDA_R_32F;
        set(
            CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
            (&bias_type as *const sys::cudaDataType_t).cast(),
            std::mem::size_of::<i32>(),
        )?;
    }
    let pref = lt::create_matmul_pref().map_err(err("preference"))?;
    d.pref = Some(pref);
    let ws_size = lt_.workspace.len();
    // SAFETY: a usize attribute, as documented.
    unsafe {
        lt::set_matmul_pref_attribute(
            pref,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&ws_size as *const usize).cast(),
            std::mem::size_of::<usize>(),
        )
    }
    .map_err(err("preference"))?;
    // SAFETY: live descriptors.
    let heuristic =
        unsafe { lt::get_matmul_algo_heuristic(lt_.handle, desc, a_l, b_l, c_l, c_l, pref) }
            .map_err(err("algorithm"))?;
    let (alpha, beta) = (1.0f32, 0.0f32);
    let (ws, _guard) = lt_.workspace.device_ptr(&be.stream);
    let _ = be.ctx.bind_to_thread();
    // SAFETY: the pointers address live device buffers holding the operands as laid out above,
    // the workspace is this handle's, and the stream is the backend's.
    unsafe {
        lt::matmul(
            lt_.handle,
            desc,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            w as *const c_void,
            a_l,
            x as *const c_void,
            b_l,
            out as *const c_void,
            c_l,
            out as *mut c_void,
            c_l,
            &heuristic.algo,
            ws as *mut c_void,
            ws_size,
            be.stream.cu_stream() as sys::cudaStream_t,
        )
    }
    .map_err(err("matmul"))
}
