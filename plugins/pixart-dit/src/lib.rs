//! `ditflow-pixart-dit`: the image DiTs of diffusers as a plugin, `PixArtTransformer2DModel`
//! (PixArt-α and -Σ) and `DiTTransformer2DModel`, built on the SDK and the shared layers
//! (`ditflow-nn`). `LoadDiffusionModel` reads a model folder into a `Model<Denoiser>` that any
//! sampler drives and any patch applies to.
//! - [`pixart`], [`dit`]: the architectures, named like diffusers' modules so weight keys map one
//!   to one;
//! - [`denoiser`]: the protocol model and its loader node.

#![forbid(unsafe_code)]

pub mod denoiser;
pub mod dit;
pub mod pixart;

ditflow_plugin::export_plugin!(
    name: "ditflow-pixart-dit",
    version: env!("CARGO_PKG_VERSION"),
    nodes: [denoiser::LoadDiffusionModel]
);
