//! Text encoders: `LoadTextEncoder` reads a transformers model folder (T5EncoderModel) into a
//! TextEncoder value. Its `Forward` names follow transformers' arguments: `input_ids` and
//! `attention_mask` in, `last_hidden_state` out.

use crate::models::{t5::T5Encoder, Config, Weights};
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::collections::HashMap;
use std::path::Path;

/// A loaded text encoder.
pub enum TextEncoder {
    T5(Box<T5Encoder>),
}

impl Object for TextEncoder {
    const TAG: &'static str = "ditflow.text_encoder";
}

/// The classes `LoadTextEncoder` understands.
pub const TEXT_ENCODER_CLASSES: &[&str] = &["T5EncoderModel"];

impl TextEncoder {
    pub fn load(dir: &Path, device: Device, ctx: &Context) -> Result<TextEncoder> {
        let cfg = Config::read(dir)?;
        let class = cfg.class_name().unwrap_or("");
        if !TEXT_ENCODER_CLASSES.contains(&class) {
            bail!(
                "{}: class \"{class}\" is not a supported text encoder (supported: {})",
                cfg.path.display(),
                TEXT_ENCODER_CLASSES.join(", ")
            );
        }
        let w = Weights::load(ctx, dir, device)?;
        Ok(TextEncoder::T5(Box::new(T5Encoder::load(
            &cfg, &w, device,
        )?)))
    }

    /// `input_ids` (and `attention_mask`) → `last_hidden_state`.
    pub fn forward_named(
        &self,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>> {
        let ids = inputs
            .get("input_ids")
            .ok_or_else(|| Error::new("missing input 'input_ids'"))?;
        let ids = ids.cast(DType::I64)?;
        let mask = inputs.get("attention_mask");
        let out = match self {
            TextEncoder::T5(m) => m.forward(&ids, mask)?,
        };
        Ok(HashMap::from([("last_hidden_state".to_string(), out)]))
    }
}

/// `LoadTextEncoder`: a transformers text-encoder folder as a TextEncoder value.
#[derive(Default)]
pub struct LoadTextEncoder;

impl Node for LoadTextEncoder {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadTextEncoder")
            .category("loaders")
            .doc(
                "Loads a transformers text-encoder folder (config.json plus safetensors) holding \
                 a T5EncoderModel. Cached until a file in the folder changes.",
            )
            .input(
                Port::new("path", "String")
                    .doc("The encoder folder; a relative path is taken from the graph's folder."),
            )
            .output(Port::new("encoder", "Model").doc("The text encoder."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = crate::files::input_path(ctx, "path")?;
        let enc = TextEncoder::load(&dir, ctx.device(), ctx)?;
        let value = ctx.make_object(enc)?;
        ctx.set_output("encoder", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        crate::diffusion::folder_fingerprint(&crate::files::input_path(ctx, "path")?).map(Some)
    }
}
