//! `ditflow-nodes`: the standard node library, built as a plugin against the safe SDK only.
//!
//! Modules, by concern:
//! - [`constants`]: `Int`, `Float`, `Bool`, `String`, the literal-value nodes;
//! - [`math`]: `Math` (floats) and `IntMath` (checked integers);
//! - [`text`]: `FormatString`, template filling;
//! - [`noise`]: `RandomNoise` (seeded latents) and `NoiseToImage` (visualise a latent);
//! - [`tensor`]: `TensorStats`, `LatentToTensor`, `TensorAs` and `ConditioningPart`;
//! - [`tensor_io`]: `LoadTensor` and `SaveTensor` (safetensors files);
//! - [`image`]: `LoadImage` and `SaveImage` (PNG files);
//! - [`media`]: `LoadAudio`, `SaveAudio` (WAV), `LoadVideo`, `SaveVideo` (APNG, PNG sequences,
//!   MP4/WebM through ffmpeg), `VideoFrame`, `AudioRate` and `VideoRate`;
//! - [`preprocess`]: `ResizeImage`, `CannyEdges`, `GrayscaleMap`, ControlNet hint images;
//! - [`forward`]: `Forward`, one forward of any protocol model from a file of tensors;
//! - [`model_info`]: `ModelInfo`, a Model's interface, patches, digest and patch memory;
//! - [`patches`]: `ApplyLoRA`, the feature caches and `SceneCaptions`, Model → Model patches (and `EncodeScenes`, the scene prompts it reads);
//! - [`pipeline`]: `TextEncode`, `EmptyLatent`, `EmptyVideoLatent`, `EmptyAudioLatent`, `Sample`,
//!   `Invert`, `VAEDecode` and `VAEEncode`;
//! - [`samplers`]: the schedulers' maths (diffusers' samplers, RF-Solver and the inversions), the
//!   `ditflow-samplers` crate.
//!
//! The model families are plugins of their own (`plugins/pixart-dit`, `plugins/t5-clip`,
//! `plugins/autoencoder-kl`); the nodes here reach them only through the model protocol.
//!
//! Node logic that does not need the host lives in plain functions next to each node, so it is
//! unit-tested without loading the plugin.

#![forbid(unsafe_code)]

pub mod constants;
pub mod forward;
pub mod image;
pub mod math;
pub mod media;
pub mod model_info;
pub mod noise;
pub mod patches;
pub mod pipeline;
pub mod preprocess;
/// The schedulers' maths (the `ditflow-samplers` crate, shared with other plugins' sampling nodes).
pub use ditflow_samplers as samplers;
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
        tensor::TensorAs,
        tensor::ConditioningPart,
        tensor_io::LoadTensor,
        tensor_io::SaveTensor,
        image::LoadImage,
        image::SaveImage,
        image::PadImage,
        image::MaskImage,
        media::audio::LoadAudio,
        media::audio::SaveAudio,
        media::audio::AudioRate,
        media::video::LoadVideo,
        media::video::SaveVideo,
        media::video::VideoFrame,
        media::video::VideoRate,
        media::video::PixelsToVideo,
        media::video::JoinVideos,
        media::audio::JoinAudio,
        preprocess::ResizeImage,
        preprocess::CannyEdges,
        preprocess::GrayscaleMap,
        forward::Forward,
        model_info::ModelInfo,
        patches::lora::ApplyLoRA,
        patches::cache::FirstBlockCache,
        patches::cache::TeaCache,
        patches::cache::TaylorSeer,
        patches::scenes::SceneCaptions,
        patches::scenes::EncodeScenes,
        pipeline::TextEncode,
        pipeline::EmptyLatent,
        pipeline::EmptyVideoLatent,
        pipeline::EmptyAudioLatent,
        pipeline::Sample,
        pipeline::Invert,
        pipeline::VAEDecode,
        pipeline::VAEEncode,
    ]
);
