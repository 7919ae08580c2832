//! Text encoders inside single-file checkpoints: Stability AI's and ComfyUI's all-in-one files
//! hold them in transformers' own layout under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`
//! (ComfyUI's standalone files have no prefix). Without a config, the shapes give one:
//! CLIP's width, depth, MLP, positions and projection (64-wide heads; OpenAI's QuickGELU for the
//! 768-wide CLIP-L, GELU for OpenCLIP's wider ones; the legacy end-of-text rule), T5's width,
//! heads (from its relative-position table), depth and gated MLP.

use ditflow_nn::block_count;
use ditflow_plugin::{Error, Result, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The tensors of `component` (`clip_l`, `clip_g`, `t5xxl`, ...) without their prefix; an empty
/// component takes the file as one encoder.
pub fn component_tensors(
    file: &Path,
    all: HashMap<String, Tensor>,
    component: &str,
) -> Result<HashMap<String, Tensor>> {
    if component.is_empty() {
        return Ok(all);
    }
    for prefix in [
        format!("text_encoders.{component}.transformer."),
        format!("text_encoders.{component}."),
    ] {
        if all.keys().any(|k| k.starts_with(&prefix)) {
            return Ok(all
                .into_iter()
                .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|r| (r.to_string(), v)))
                .collect());
        }
    }
    let mut found: Vec<&str> = all
        .keys()
        .filter_map(|k| k.strip_prefix("text_encoders.")?.split('.').next())
        .collect();
    found.sort();
    found.dedup();
    Err(Error(format!(
        "{}: no text encoder '{component}' in the file ({})",
        file.display(),
        if found.is_empty() {
            "it holds none".to_string()
        } else {
            format!("it holds {}", found.join(", "))
        }
    )))
}

/// A transformers config for an encoder's tensors, from their shapes.
pub fn infer_config(file: &Path, w: &HashMap<String, Tensor>) -> Result<serde_json::Value> {
    let shape = |k: &str| -> Result<Vec<usize>> {
        w.get(k)
            .map(|t| t.shape().to_vec())
            .ok_or_else(|| Error(format!("{}: no '{k}'", file.display())))
    };
    if w.contains_key("text_model.embeddings.token_embedding.weight") {
        let [vocab, d] = shape("text_model.embeddings.token_embedding.weight")?[..] else {
            return Err(Error(format!(
                "{}: a token embedding that is not 2-D",
                file.display()
            )));
        };
        let projection = w.contains_key("text_projection.weight");
        let mut cfg = serde_json::json!({
            "_class_name": if projection { "CLIPTextModelWithProjection" } else { "CLIPTextModel" },
            "vocab_size": vocab,
            "hidden_size": d,
            "intermediate_size": shape("text_model.encoder.layers.0.mlp.fc1.weight")?[0],
            "num_hidden_layers": block_count(w, "text_model.encoder.layers."),
            "num_attention_heads": (d / 64).max(1),
            "max_position_embeddings": shape("text_model.embeddings.position_embedding.weight")?[0],
            "hidden_act": if d == 768 { "quick_gelu" } else { "gelu" },
            "eos_token_id": 2,
            "layer_norm_eps": 1e-5,
        });
        if projection {
            cfg["projection_dim"] = shape("text_projection.weight")?[0].into();
        }
        return Ok(cfg);
    }
    if w.contains_key("encoder.block.0.layer.0.SelfAttention.q.weight") {
        let rel = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")?;
        let (buckets, heads) = (rel[0], rel[1].max(1));
        let q = shape("encoder.block.0.layer.0.SelfAttention.q.weight")?;
        let embed = if w.contains_key("encoder.embed_tokens.weight") {
            "encoder.embed_tokens.weight"
        } else {
            "shared.weight"
        };
        let gated = w.contains_key("encoder.block.0.layer.1.DenseReluDense.wi_0.weight");
        let wi = if gated { "wi_0" } else { "wi" };
        return Ok(serde_json::json!({
            "_class_name": "T5EncoderModel",
            "vocab_size": shape(embed)?[0],
            "d_model": q[1],
            "d_kv": q[0] / heads,
            "d_ff": shape(&format!("encoder.block.0.layer.1.DenseReluDense.{wi}.weight"))?[0],
            "num_layers": block_count(w, "encoder.block."),
            "num_heads": heads,
            "relative_attention_num_buckets": buckets,
            "relative_attention_max_distance": 128,
            "feed_forward_proj": if gated { "gated-gelu" } else { "relu" },
            "layer_norm_epsilon": 1e-6,
        }));
    }
    Err(Error(format!(
        "{}: neither a CLIP text model nor a T5 encoder (no text_model. or encoder.block. keys)",
        file.display()
    )))
}
