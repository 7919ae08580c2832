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
