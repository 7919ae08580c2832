//! `ditflow-sd3`: Stability AI's Stable Diffusion 3 and 3.5 as a plugin, diffusers'
//! `SD3Transformer2DModel`, built on the SDK and the shared layers. `LoadSD3` reads a diffusers
//! folder into a `Model<Denoiser>`.
//! - [`sd3`]: the architecture: MMDiT joint blocks, q/k RMS norms, MMDiT-X dual attention, the
//!   cropped position table, `skip_layers`;
//! - [`denoiser`]: the protocol model and its loader node;
//! - [`controlnet`]: `SD3ControlNetModel` as a block-residual patch (`LoadSD3ControlNet`,
//!   `ApplySD3ControlNet`);
//! - [`conditioning`]: `SD3TextEncode`, the pipeline's CLIP-L + CLIP-G + T5 conditioning;
//! - [`single_file`]: Stability AI/ComfyUI single-file checkpoints mapped to diffusers' keys.

#![forbid(unsafe_code)]

pub mod conditioning;
pub mod controlnet;
pub mod denoiser;
pub mod sd3;
pub mod single_file;

ditflow_plugin::export_plugin!(
    name: "ditflow-sd3",
    version: env!("CARGO_PKG_VERSION"),
    nodes: [
        denoiser::LoadSD3,
        conditioning::SD3TextEncode,
        controlnet::LoadSD3ControlNet,
        controlnet::ApplySD3ControlNet
    ]
);
