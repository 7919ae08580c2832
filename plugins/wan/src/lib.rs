//! `ditflow-wan`: Wan2.1 video as a plugin, diffusers' `WanTransformer3DModel`, built on the SDK
//! and the shared layers. `LoadWan` reads a diffusers folder into a `Model<Denoiser>`.
//! - [`wan`]: the architecture: 3-D patch embedding, the 3-way RoPE split of the head dimension,
//!   the time and text embeddings, blocks with q/k RMS norms across the heads and the
//!   cross-attention norm, the output layer and unpatchify;
//! - [`denoiser`]: the protocol model and its loader node;
//! - [`single_file`]: one file in Wan's original layout, renamed as diffusers does;
//! - [`vae`]: `AutoencoderKLWan`, the causal video VAE run chunk by chunk (`LoadWanVAE`,
//!   `DecodeVideo`).

#![forbid(unsafe_code)]

pub mod denoiser;
pub mod single_file;
pub mod vae;
pub mod wan;

ditflow_plugin::export_plugin!(
    name: "ditflow-wan",
    version: env!("CARGO_PKG_VERSION"),
    nodes: [denoiser::LoadWan, vae::LoadWanVAE, vae::DecodeVideo]
);
