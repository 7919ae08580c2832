//! `ditflow-nodes`: the standard node library, built as a plugin against the safe SDK only.
//!
//! Modules, by concern:
//! - [`constants`]: `Int`, `Float`, `Bool`, `String`, the literal-value nodes;
//! - [`math`]: `Math` (floats) and `IntMath` (checked integers);
//! - [`text`]: `FormatString`, template filling;
//! - [`noise`]: `RandomNoise` (seeded latents) and `NoiseToImage` (visualise a latent);
//! - [`tensor`]: `TensorStats` and `LatentToTensor`;
//! - [`tensor_io`]: `LoadTensor` and `SaveTensor` (safetensors files);
//! - [`image`]: `LoadImage` and `SaveImage` (PNG files);
//! - [`models`]: the architectures (PixArt, DiT, AutoencoderKL, T5) on the host's tensor engine;
//! - [`diffusion`]: `LoadDiffusionModel`, `LoadVAE` and `Forward`;
//! - [`encoders`]: `LoadTextEncoder` (T5, with its tokenizer);
//! - [`patches`]: `ApplyLoRA` and the feature caches, Model → Model patches;
//! - [`pipeline`]: `TextEncode`, `EmptyLatent`, `Sample`, `VAEDecode` and `VAEEncode`;
//! - [`samplers`]: the schedulers' maths (DDIM, Euler, DPM-Solver++(2M), flow matching).
//!
//! Node logic that does not need the host lives in plain functions next to each node, so it is
//! unit-tested without loading the plugin.

#![forbid(unsafe_code)]

pub mod constants;
pub mod diffusion;
pub mod encoders;
mod files;
pub mod image;
pub mod math;
pub mod models;
pub mod noise;
pub mod patches;
pub mod pipeline;
pub mod samplers;
pub mod tensor;
pub mod tensor_io;
pub mod text;

use ditflow_plugin::export_plugin;

export_plugin!(
    name: "ditflow-nodes",
    version: env!("CARGO_PKG_VERSION"),
    nodes: [
        constants::IntConstant,
        constants::FloatConstant,
        constants::BoolConstant,
        constants::StringConstant,
        math::Math,
        math::IntMath,
        text::FormatString,
        noise::RandomNoise,
        noise::NoiseToImage,
        tensor::TensorStats,
        tensor::LatentToTensor,
        tensor_io::LoadTensor,
        tensor_io::SaveTensor,
        image::LoadImage,
        image::SaveImage,
        diffusion::LoadDiffusionModel,
        diffusion::LoadVAE,
        encoders::LoadTextEncoder,
        diffusion::Forward,
        patches::lora::ApplyLoRA,
        patches::cache::FirstBlockCache,
        patches::cache::TeaCache,
        patches::cache::TaylorSeer,
        pipeline::TextEncode,
        pipeline::EmptyLatent,
        pipeline::Sample,
        pipeline::VAEDecode,
        pipeline::VAEEncode,
    ]
);
