//! Text encoders: `LoadTextEncoder` reads a transformers model folder (T5EncoderModel, CLIPTextModel,
//! CLIPTextModelWithProjection) into a `Model<TextEncoder>`. Its forward names follow transformers'
//! arguments: `input_ids` and `attention_mask` in, `last_hidden_state` (and CLIP's
//! `pooler_output`, `text_embeds` and `penultimate_hidden_state`, transformers'
//! `hidden_states[-2]`) out.

use crate::{clip::ClipText, t5::T5Encoder};
use ditflow_nn::{Config, Weights};
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::collections::HashMap;
use std::path::Path;

/// The encoder network.
pub enum TextModel {
    T5(Box<T5Encoder>),
    Clip(Box<ClipText>),
}

/// A loaded text encoder and, when its folder has a `tokenizer.json`, its tokenizer.
pub struct TextEncoder {
    pub model: TextModel,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    /// The tokenizer's pad token, from `tokenizer_config.json` (or `special_tokens_map.json`,
    /// or the padding in `tokenizer.json`).
    pub pad_token_id: Option<i64>,
    pub dir: std::path::PathBuf,
}

/// The pad token named beside a tokenizer: `pad_token` in `tokenizer_config.json` or
/// `special_tokens_map.json` (a string or `{"content": ...}`), else `tokenizer.json`'s padding.
fn pad_token_id(dir: &Path, tok: &tokenizers::Tokenizer) -> Option<i64> {
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(file)) else {
            continue;
        };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let pad = &json["pad_token"];
        let name = pad.as_str().or_else(|| pad["content"].as_str());
        if let Some(id) = name.and_then(|n| tok.token_to_id(n)) {
            return Some(id as i64);
        }
    }
    tok.get_padding().map(|p| p.pad_id as i64)
}

impl Object for TextEncoder {
    const TAG: &'static str = "ditflow.text_encoder";
}

/// The classes `LoadTextEncoder` understands.
pub const TEXT_ENCODER_CLASSES: &[&str] = &[
    "T5EncoderModel",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
];

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
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.is_file() {
            Some(
                tokenizers::Tokenizer::from_file(&tok_path)
                    .map_err(|e| Error(format!("{}: {e}", tok_path.display())))?,
            )
        } else {
            None
        };
        let pad_token_id = tokenizer.as_ref().and_then(|t| pad_token_id(dir, t));
        Ok(TextEncoder {
            pad_token_id,
            model: match class {
                "T5EncoderModel" => TextModel::T5(Box::new(T5Encoder::load(&cfg, &w, device)?)),
                _ => TextModel::Clip(Box::new(ClipText::load(
                    &cfg,
                    &w,
                    device,
                    class == "CLIPTextModelWithProjection",
                )?)),
            },
            tokenizer,
            dir: dir.to_path_buf(),
        })
    }

    /// The token ids of `text` (special tokens added, padding dropped), at most `max`: a longer
    /// text is truncated before the special tokens are added, as transformers' `truncation=True`
    /// does, so an end-of-text token stays last.
    pub fn tokenize(&self, text: &str, max: usize) -> Result<Vec<i64>> {
        use tokenizers::PostProcessor;
        let tok = self.tokenizer.as_ref().ok_or_else(|| {
            Error(format!(
                "{}: no tokenizer.json beside the encoder",
                self.dir.display()
            ))
        })?;
        let fail = |e: tokenizers::Error| Error(format!("tokenizing {text:?}: {e}"));
        let mut enc = tok.encode(text, false).map_err(fail)?;
        let added = tok
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if enc.len() + added > max {
            enc.truncate(
                max.saturating_sub(added),
                0,
                tokenizers::TruncationDirection::Right,
            );
        }
        let enc = tok.post_process(enc, None, true).map_err(fail)?;
        let ids: Vec<i64> = enc
            .get_ids()
            .iter()
            .zip(enc.get_attention_mask())
            .filter(|(_, &m)| m != 0)
            .map(|(&i, _)| i as i64)
            .take(max)
            .collect();
        if ids.is_empty() {
            bail!("the tokenizer made no tokens for {text:?}");
        }
        Ok(ids)
    }

    /// The last hidden state `[B, L, width]` for ids `[B, L]` (no padding).
    pub fn encode(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.model {
            TextModel::T5(m) => m.forward(ids, None),
            TextModel::Clip(m) => Ok(m.forward(ids, None)?.last_hidden_state),
        }
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
        let mut outs = HashMap::new();
        match &self.model {
            TextModel::T5(m) => {
                outs.insert("last_hidden_state".to_string(), m.forward(&ids, mask)?);
            }
            TextModel::Clip(m) => {
                let o = m.forward(&ids, mask)?;
                outs.insert("last_hidden_state".to_string(), o.last_hidden_state);
                outs.insert("pooler_output".to_string(), o.pooler_output);
                outs.insert(
                    "penultimate_hidden_state".to_string(),
                    o.penultimate_hidden_state,
                );
                if let Some(t) = o.text_embeds {
                    outs.insert("text_embeds".to_string(), t);
                }
            }
        }
        Ok(outs)
    }
}

impl ditflow_plugin::encoder_api::TextEncoder for TextEncoder {
    fn describe(&self) -> ditflow_plugin::encoder_api::TextEncoderInfo {
        let (width, max_tokens) = match &self.model {
            TextModel::T5(m) => (m.d_model, 0),
            TextModel::Clip(m) => (
                m.token_embedding.shape().get(1).copied().unwrap_or(0),
                m.max_positions,
            ),
        };
        ditflow_plugin::encoder_api::TextEncoderInfo {
            width,
            max_tokens,
            pad_token_id: self.pad_token_id,
        }
    }

    fn tokenize(&self, text: &str, max_tokens: usize) -> Result<Tensor> {
        let max = if max_tokens == 0 {
            usize::MAX
        } else {
            max_tokens
        };
        let ids = self.tokenize(text, max)?;
        let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        Tensor::from_bytes(Kind::Tensor, DType::I64, &[1, ids.len()], &bytes)
    }

    fn forward(&self, inputs: &ditflow_plugin::model::Inputs) -> Result<Vec<(String, Tensor)>> {
        Ok(ditflow_plugin::encoder_api::sorted(
            self.forward_named(&inputs.to_map())?,
        ))
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
                 a T5EncoderModel, CLIPTextModel or CLIPTextModelWithProjection, with the folder's
                 tokenizer.json when there is one. Cached \
                 until a file in the folder changes.",
            )
            .input(
                Port::new("path", "String")
                    .doc("The encoder folder; a relative path is taken from the graph's folder."),
            )
            .output(Port::new("encoder", "Model<TextEncoder>").doc("The text encoder."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = ditflow_plugin::files::input_path(ctx, "path")?;
        let enc = TextEncoder::load(&dir, ctx.device(), ctx)?;
        let value = ctx.make_text_encoder(enc)?;
        ctx.set_output("encoder", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        ditflow_plugin::files::folder_fingerprint(&ditflow_plugin::files::input_path(ctx, "path")?)
            .map(Some)
    }
}
