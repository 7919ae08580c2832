//! `ditflow-flux`: Black Forest Labs' Flux.1 as a plugin, diffusers' `FluxTransformer2DModel`
//! (dev with its guidance embedding, schnell without), built on the SDK and the shared layers.
//! `LoadFlux` reads a diffusers folder into a `Model<Denoiser>`.
//! - [`flux`]: the architecture: double-stream and single-stream blocks, 3-axis RoPE;
//! - [`denoiser`]: the protocol model (taking the VAE's latents, packed 2×2 inside) and its
//!   loader node;
//! - [`controlnet`]: `FluxControlNetModel` (union mode too) as block-residual patches
//!   (`LoadFluxControlNet`, `ApplyFluxControlNet`);
//! - [`ip_adapter`]: the Flux IP-Adapter as an extra attention branch (`ApplyFluxIPAdapter`);
//! - [`conditioning`]: `FluxTextEncode`, the pipeline's CLIP-L pooled + T5 conditioning;
//! - [`single_file`]: BFL/ComfyUI single-file checkpoints mapped to diffusers' keys.

#![forbid(unsafe_code)]

pub mod conditioning;
pub mod controlnet;
pub mod denoiser;
pub mod flux;
pub mod ip_adapter;
pub mod single_file;

ditflow_plugin::export_plugin!(
    name: "ditflow-flux",
    version: env!("CARGO_PKG_VERSION"),
    nodes: [
        denoiser::LoadFlux,
        conditioning::FluxTextEncode,
        controlnet::LoadFluxControlNet,
        controlnet::ApplyFluxControlNet,
        ip_adapter::ApplyFluxIPAdapter
    ]
);
