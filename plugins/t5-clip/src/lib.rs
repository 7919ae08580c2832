//! `ditflow-t5-clip`: transformers' text encoders as a plugin, `T5EncoderModel`, `CLIPTextModel`
//! and `CLIPTextModelWithProjection`, with their `tokenizer.json`, and CLIP's vision tower
//! (`CLIPVisionModelWithProjection`, IP-Adapters' image encoder), built on the SDK and the shared
//! layers (`ditflow-nn`). `LoadTextEncoder` reads a model folder into a `Model<TextEncoder>`.
//! - [`t5`], [`clip`]: the text architectures;
//! - [`encoder`]: the protocol model (tokenize and forward) and its loader node;
//! - [`single_file`]: encoders inside single-file checkpoints, their configs from the shapes;
//! - [`clip_vision`]: the vision tower, its preprocessing, `LoadImageEncoder` and
//!   `CLIPVisionEncode`.

#![forbid(unsafe_code)]

pub mod clip;
pub mod clip_vision;
pub mod encoder;
pub mod single_file;
pub mod t5;

ditflow_plugin::export_plugin!(
    name: "ditflow-t5-clip",
    version: env!("CARGO_PKG_VERSION"),
    nodes: [
        encoder::LoadTextEncoder,
        clip_vision::LoadImageEncoder,
        clip_vision::ClipVisionEncode
    ]
);
