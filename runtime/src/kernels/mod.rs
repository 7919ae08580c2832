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
