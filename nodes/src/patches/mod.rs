//! Patch nodes: Model → Model, for any protocol denoiser of any plugin. Each returns a new Model
//! sharing the input's weights, with one more patch in its ordered, digested list.
//! - [`lora`]: `ApplyLoRA`, linear deltas from a LoRA file;
//! - [`cache`]: `FirstBlockCache`, `TeaCache` and `TaylorSeer`, range overrides over the block
//!   stack;
//! - [`scenes`]: `SceneCaptions`, a multi-scene video whose scenes follow their own captions;
//! - [`skip_layers`]: skip-layer guidance's patch, which `Sample` applies itself.

pub mod cache;
pub mod lora;
pub mod scenes;
pub mod skip_layers;
