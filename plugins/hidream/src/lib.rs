//! `ditflow-hidream`: HiDream-I1 as a plugin, diffusers' `HiDreamImageTransformer2DModel`, built
//! on the SDK and the shared layers. `LoadHiDream` reads a diffusers folder into a
//! `Model<Denoiser>`.
//! - [`moe`]: the sparse mixture-of-experts SwiGLU feed-forward (softmax gate, top-k with no
//!   renormalisation, a shared expert), on the engine's top-k and row scatter-add;
//! - [`hidream`]: the architecture: double-stream and single-stream blocks with q/k RMS norms
//!   across the heads, 3-axis RoPE, and the per-layer Llama-token wiring;
//! - [`denoiser`]: the protocol model and its loader node.

#![forbid(unsafe_code)]

pub mod denoiser;
pub mod hidream;
pub mod moe;

ditflow_plugin::export_plugin!(
    name: "ditflow-hidream",
    version: env!("CARGO_PKG_VERSION"),
    nodes: [denoiser::LoadHiDream]
);
