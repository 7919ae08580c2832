//! `ditflow-stable-audio`: Stable Audio's transformer and VAE as a plugin, diffusers'
//! `StableAudioDiTModel` and `AutoencoderOobleck`, built on the SDK and the shared layers. `LoadStableAudio` reads a
//! diffusers folder into a `Model<Denoiser>`.
//! - [`dit`]: the architecture: the prepended global token (the global conditioning plus the
//!   timestep's Fourier features), grouped-query cross-attention, the partial half-split RoPE
//!   and its table as `StableAudioPipeline` builds it;
//! - [`denoiser`]: the protocol model and its loader node;
//! - [`oobleck`]: `AutoencoderOobleck`, the waveform VAE (`LoadOobleck`, `EncodeAudio`,
//!   `DecodeAudio`);
//! - [`projection`]: `StableAudioProjectionModel` and the pipeline's conditioning
//!   (`LoadStableAudioProjection`, `StableAudioConditioning`).

#![forbid(unsafe_code)]

pub mod denoiser;
pub mod dit;
pub mod oobleck;
pub mod projection;

ditflow_plugin::export_plugin!(
    name: "ditflow-stable-audio",
    version: env!("CARGO_PKG_VERSION"),
    nodes: [
        denoiser::LoadStableAudio,
        oobleck::LoadOobleck,
        oobleck::EncodeAudio,
        oobleck::DecodeAudio,
        projection::LoadStableAudioProjection,
        projection::StableAudioConditioning
    ]
);
