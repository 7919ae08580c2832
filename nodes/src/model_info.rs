//! `ModelInfo`: what a Model value is, from whichever plugin: its interface, its patches, their
//! digest, and the memory the patches hold beyond the base weights.

use ditflow_plugin::model::{describe_model, model_info, patch_memory};
use ditflow_plugin::prelude::*;

/// `ModelInfo`.
#[derive(Default)]
pub struct ModelInfo;

impl Node for ModelInfo {
    fn schema() -> NodeSchema {
        NodeSchema::new("ModelInfo")
            .category("models")
            .doc(
                "Describes a Model: what it is (a denoiser, a text encoder, an autoencoder), how \
                 many patches it carries, the digest that enters the cache key, and the bytes \
                 its patches hold beyond the shared base weights (LoRA deltas, merged copies, \
                 caches).",
            )
            .input(Port::new("model", "Model"))
            .output(Port::new("kind", "String").doc("`a denoiser`, `a text encoder`, ..."))
            .output(Port::new("patches", "Int"))
            .output(Port::new("digest", "String").doc("16 hex digits."))
            .output(Port::new("patch_bytes", "Int"))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("model")?;
        let (_, patches, digest) = model_info(&model)?;
        ctx.set_output("kind", describe_model(&model))?;
        ctx.set_output("patches", patches as i64)?;
        ctx.set_output("digest", format!("{digest:016x}"))?;
        ctx.set_output("patch_bytes", patch_memory(&model) as i64)
    }
}
