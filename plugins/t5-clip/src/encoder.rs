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
    "UMT5EncoderModel",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
];

/// Where a text encoder comes from: a transformers folder, or one component of a single file,
/// with its config (a file's inferred from its shapes without one) and its tokenizer's folder
/// (or `tokenizer.json`).
pub struct Source<'a> {
    pub path: &'a Path,
    pub component: &'a str,
    pub config: Option<&'a Path>,
    pub tokenizer: Option<&'a Path>,
}

impl TextEncoder {
    pub fn load(dir: &Path, device: Device, ctx: &Context) -> Result<TextEncoder> {
        TextEncoder::load_from(
            &Source {
                path: dir,
                component: "",
                config: None,
                tokenizer: None,
            },
            device,
            ctx,
        )
    }

    pub fn load_from(src: &Source, device: Device, ctx: &Context) -> Result<TextEncoder> {
        let dir = src.path;
        let (cfg, w) = if dir.is_file() {
            let all = ditflow_nn::read_tensors(ctx, dir, device)?;
            let t = crate::single_file::component_tensors(dir, all, src.component)?;
            let cfg = match src.config {
                Some(c) => Config::read(c)?,
                None => Config {
                    path: dir.to_path_buf(),
                    json: crate::single_file::infer_config(dir, &t)?,
                },
            };
            (cfg, Weights::from_tensors(dir, t))
        } else {
            let cfg = match src.config {
                Some(c) => Config::read(c)?,
                None => Config::read(dir)?,
            };
            (cfg, Weights::load(ctx, dir, device)?)
        };
        let class = cfg.class_name().unwrap_or("");
        if !TEXT_ENCODER_CLASSES.contains(&class) {
            bail!(
                "{}: class \"{class}\" is not a supported text encoder (supported: {})",
                cfg.path.display(),
                TEXT_ENCODER_CLASSES.join(", ")
            );
        }
        let tok_dir = match src.tokenizer {
            Some(t) if t.is_file() => t.parent().unwrap_or(t).to_path_buf(),
            Some(t) => t.to_path_buf(),
            None => dir.to_path_buf(),
        };
        let tok_path = match src.tokenizer {
            Some(t) if t.is_file() => t.to_path_buf(),
            _ => tok_dir.join("tokenizer.json"),
        };
        if src.tokenizer.is_some() && !tok_path.is_file() {
            bail!("{}: no tokenizer.json", tok_path.display());
        }
        let tokenizer = if tok_path.is_file() {
            Some(
                tokenizers::Tokenizer::from_file(&tok_path)
                    .map_err(|e| Error(format!("{}: {e}", tok_path.display())))?,
            )
        } else {
            None
        };
        let pad_token_id = tokenizer.as_ref().and_then(|t| pad_token_id(&tok_dir, t));
        Ok(TextEncoder {
            pad_token_id,
            model: match class {
                "T5EncoderModel" => {
                    TextModel::T5(Box::new(T5Encoder::load(&cfg, &w, device, false)?))
                }
                "UMT5EncoderModel" => {
                    TextModel::T5(Box::new(T5Encoder::load(&cfg, &w, device, true)?))
                }
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

/// `LoadTextEncoder`: a transformers text-encoder folder, or one encoder of a single file, as a
/// TextEncoder value.
#[derive(Default)]
pub struct LoadTextEncoder;

/// An optional path input: `None` when empty.
fn optional_path(ctx: &Context, name: &str) -> Result<Option<std::path::PathBuf>> {
    let p: String = ctx.input(name)?;
    (!p.is_empty()).then(|| ctx.input_path(&p)).transpose()
}

impl Node for LoadTextEncoder {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadTextEncoder")
            .category("loaders")
            .doc(
                "Loads a T5EncoderModel, UMT5EncoderModel (Wan's), CLIPTextModel or CLIPTextModelWithProjection: a \
                 transformers folder (config.json plus safetensors, with its tokenizer.json when \
                 there is one), or one encoder of a single .safetensors file (component: \
                 clip_l, clip_g or t5xxl of Stability AI's and ComfyUI's all-in-one files, or \
                 empty for a file holding one encoder), its config inferred from the shapes \
                 unless given, its tokenizer from the tokenizer input. Cached until a file \
                 changes.",
            )
            .input(
                Port::new("path", "String")
                    .doc("The encoder folder or a .safetensors file; a relative path is taken from the graph's folder."),
            )
            .input(Port::new("component", "String").default("").doc("For a single file: the encoder inside it (clip_l, clip_g, t5xxl)."))
            .input(Port::new("tokenizer", "String").default("").doc("A folder with tokenizer.json (and tokenizer_config.json for the pad token), or the tokenizer.json; empty: the model folder's."))
            .input(Port::new("config", "String").default("").doc("A transformers config.json to use instead of the folder's or the inferred one."))
            .output(Port::new("encoder", "Model<TextEncoder>").doc("The text encoder."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = ditflow_plugin::files::input_path(ctx, "path")?;
        let component: String = ctx.input("component")?;
        let (tokenizer, config) = (
            optional_path(ctx, "tokenizer")?,
            optional_path(ctx, "config")?,
        );
        let enc = TextEncoder::load_from(
            &Source {
                path: &dir,
                component: &component,
                config: config.as_deref(),
                tokenizer: tokenizer.as_deref(),
            },
            ctx.device(),
            ctx,
        )?;
        let value = ctx.make_text_encoder(enc)?;
        ctx.set_output("encoder", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        use ditflow_plugin::files::model_fingerprint;
        let mut f = model_fingerprint(&ditflow_plugin::files::input_path(ctx, "path")?)?;
        for (i, name) in ["tokenizer", "config"].iter().enumerate() {
            if let Some(p) = optional_path(ctx, name)? {
                f ^= model_fingerprint(&p)?.rotate_left(1 + i as u32);
            }
        }
        Ok(Some(f))
    }
}
