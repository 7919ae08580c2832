//! `ditflow-nn`: the layers shared by ditflow's model plugins, in candle-nn's spirit, on the host's
//! tensor engine through the SDK. Writing a model on it means writing the architecture: loading
//! gives located errors, and the linear layers are the linear-delta (LoRA) sites, costing nothing
//! when no patch is set.
//! - [`weights`]: `Config` and `Weights`, a model folder's config and tensors;
//! - [`layers`]: `Linear`, `Attention`, `FeedForward`, `Conv2d`, `GroupNorm`, adaLN chunks, masks;
//! - [`embeddings`]: timestep embeddings and sinusoids, 2-D sincos positions, float32 RoPE
//!   tables;
//! - [`heads`]: attention over explicit heads with per-head q/k norms and RoPE (MMDiT);
//! - [`patchify`]: latents to patch tokens and back;
//! - [`image`]: pixels, PIL's resampling and fitting, for the image preprocessors;
//! - [`controlnet`]: the ControlNet pipelines' shared rules (activity window, hint latent,
//!   residual maps);
//! - [`bridge`]: the audio-video bridge blocks that couple two towers (BridgeDiT's dual
//!   cross-attention).

pub mod bridge;
pub mod controlnet;
pub mod embeddings;
pub mod heads;
pub mod image;
pub mod layers;
pub mod patchify;
pub mod weights;

pub use embeddings::{
    rotary_tables_f32, sincos_pos_embed_2d, timestep_sinusoids, PosEmbedCache, TimestepEmbedding,
};
pub use heads::{attend_heads, split_heads, HeadProjections};
pub use layers::{
    chunks, mask_bias, Attention, ContinuousOutput, Conv2d, FeedForward, GroupNorm, Linear,
};
pub use patchify::{pack_latents, patch_grid, patchify, unpack_latents, unpatchify};
pub use weights::{
    block_count, config_beside, converted_shape, describe_checkpoint, not_a, open_model,
    read_tensors, strip_comfy_prefix, Config, Weights,
};
