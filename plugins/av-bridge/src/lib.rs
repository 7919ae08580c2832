//! `ditflow-av-bridge`: bridges that couple two towers (a video and an audio denoiser) so that
//! what is heard happens when it is seen. Built on the SDK and the shared layers' bridge blocks.
//! - [`bridge`]: `LoadBridge` reads a bridge (BridgeDiT's dual cross-attention blocks and the
//!   tower blocks they follow), `BridgeBlock` runs one of its blocks on two streams' tokens, and
//!   `BridgedForward` runs two separately loaded towers coupled by it through block stepping;
//! - [`fused`]: Ovi's fused cross-attention, key/value paths into each tower's own
//!   cross-attention, run through block stepping by halves;
//! - [`sample`]: `SampleAudioVideo`, both towers' latents denoised in lockstep, with captions,
//!   guidance and a scheduler per modality, and modality-isolation guidance.

#![forbid(unsafe_code)]

pub mod bridge;
pub mod fused;
pub mod sample;

ditflow_plugin::export_plugin!(
    name: "ditflow-av-bridge",
    version: env!("CARGO_PKG_VERSION"),
    nodes: [
        bridge::LoadBridge,
        bridge::BridgeBlock,
        bridge::BridgedForward,
        sample::SampleAudioVideo
    ]
);
