//! The kernels behind the op dispatcher in [`crate::tensor::ops`]: a CPU backend everywhere, and a
//! CUDA backend (cudarc, kernels compiled at run time by NVRTC) when built with the `cuda`
//! feature and a GPU is present.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

/// `Ok` when CUDA device `ordinal` can be used, else why not (never panics).
pub fn cuda_available(ordinal: usize) -> Result<(), String> {
    #[cfg(feature = "cuda")]
    {
        cuda::Backend::get(ordinal).map(|_| ())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err("this build has no CUDA support (built without the `cuda` feature)".into())
    }
}

/// Whether CUDA ops may trade f32 for tensor-core speed (off by default; the CLI's
/// `--tensor-cores`, `DITFLOW_TENSOR_CORES=1`, or [`set_tensor_cores`]): attention runs on
/// mma.sync with bf16 operands and f32 sums, linear layers with bf16 or f16 weights multiply
/// in the weights' own type through cuBLAS (activations rounded to it, f32 accumulation), and
/// f32 GEMMs use TF32. Results then differ from the CPU's by about bf16's precision (1e-2).
/// CPU ops are not affected.
pub fn tensor_cores() -> bool {
    use std::sync::atomic::Ordering;
    match TENSOR_CORES.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("DITFLOW_TENSOR_CORES").is_ok_and(|v| v == "1");
            TENSOR_CORES.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        v => v == 2,
    }
}

/// Sets [`tensor_cores`] for the whole process.
pub fn set_tensor_cores(on: bool) {
    TENSOR_CORES.store(if on { 2 } else { 1 }, std::sync::atomic::Ordering::Relaxed);
}

/// 0: not read yet (the environment decides), 1: off, 2: on.
static TENSOR_CORES: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The storage type of a denoiser's activations on a GPU: f32 by default; bf16 or f16 with the
/// CLI's `--gpu-activations`, `DITFLOW_GPU_ACTIVATIONS=bf16|f16`, [`set_gpu_activations`] or C's
/// `ditflow_set_gpu_activations`. The host narrows the latent and the token sequences a denoiser
/// on a GPU is called with and widens its prediction back to f32, so samplers stay in f32; inside,
/// linear, attention, the norms, rope, softmax and the elementwise kernels read and write that
/// type with f32 sums, halving the activations' memory and traffic, and bf16/f16 weights meet
/// them in cuBLAS in their own type. Results then differ from f32 by about the type's precision
/// (bf16 1e-2). The CPU is not affected.
pub fn gpu_activations() -> crate::tensor::DType {
    use crate::tensor::DType;
    use std::sync::atomic::Ordering;
    let code = match GPU_ACTIVATIONS.load(Ordering::Relaxed) {
        0 => {
            let code = match std::env::var("DITFLOW_GPU_ACTIVATIONS") {
                Ok(v) => match parse_gpu_activations(&v) {
                    Ok(dt) => activation_code(dt),
                    Err(e) => {
                        tracing::warn!("DITFLOW_GPU_ACTIVATIONS: {e}; using f32");
                        1
                    }
                },
                Err(_) => 1,
            };
            GPU_ACTIVATIONS.store(code, Ordering::Relaxed);
            code
        }
        c => c,
    };
    match code {
        2 => DType::BF16,
        3 => DType::F16,
        _ => DType::F32,
    }
}

/// Sets [`gpu_activations`] for the whole process: f32, bf16 or f16 (another type is refused).
pub fn set_gpu_activations(dt: crate::tensor::DType) -> Result<(), String> {
    use crate::tensor::DType;
    if !matches!(dt, DType::F32 | DType::BF16 | DType::F16) {
        return Err(format!(
            "GPU activations are f32, bf16 or f16, not {}",
            dt.name()
        ));
    }
    GPU_ACTIVATIONS.store(activation_code(dt), std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// `f32`, `bf16` or `f16` (also `float32`, `bfloat16`, `float16`, `half`) as a GPU activation
/// type, or an error that lists them.
pub fn parse_gpu_activations(s: &str) -> Result<crate::tensor::DType, String> {
    use crate::tensor::DType;
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
        other => Err(format!(
            "unknown GPU activation type '{other}' (expected f32, bf16 or f16)"
        )),
    }
}

fn activation_code(dt: crate::tensor::DType) -> u8 {
    match dt {
        crate::tensor::DType::BF16 => 2,
        crate::tensor::DType::F16 => 3,
        _ => 1,
    }
}

/// 0: not read yet (the environment decides), 1: f32, 2: bf16, 3: f16.
static GPU_ACTIVATIONS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The ops whose CUDA kernels read and write bf16/f16 activations as they are (under
/// [`gpu_activations`], or whenever their inputs are half); the others widen them to f32.
pub const HALF_ACTIVATION_OPS: &[&str] = &[
    "linear",
    "attention",
    "layer_norm",
    "rms_norm",
    "softmax",
    "rope",
    "unary",
    "affine",
    "binary",
    "gated_residual",
    "permute",
    "concat",
    "slice",
];

/// The ops with a tensor-core path on CUDA under [`tensor_cores`], and what it is.
pub const TENSOR_CORE_OPS: &[(&str, &str)] = &[
    (
        "attention",
        "mma.sync bf16, f32 sums (FlashAttention-2 loop; head size up to 128, D = Dv)",
    ),
    ("attention_fused", "as attention, after the per-head copies"),
    (
        "linear",
        "cuBLAS GEMM in the weight's bf16/f16 (f32 sums), TF32 for f32 weights",
    ),
    ("matmul", "cuBLAS TF32"),
];
