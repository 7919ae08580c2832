//! Wan2.1 single files in the original layout (Wan's own repository, Comfy-Org's repackaged
//! files, city96's GGUFs): the keys renamed as diffusers' `convert_wan_transformer_to_diffusers`
//! renames them (text-to-video keys; the I2V image embedder's too, which the model then refuses),
//! and a diffusers config from `config.json` beside the file or inferred from the shapes.

use ditflow_plugin::prelude::*;
use std::collections::HashMap;
use std::path::Path;

/// diffusers' renames, applied in this order to every key (norm2 and norm3 swap through a
/// placeholder, as there).
const RENAMES: &[(&str, &str)] = &[
    (
        "time_embedding.0",
        "condition_embedder.time_embedder.linear_1",
    ),
    (
        "time_embedding.2",
        "condition_embedder.time_embedder.linear_2",
    ),
    (
        "text_embedding.0",
        "condition_embedder.text_embedder.linear_1",
    ),
    (
        "text_embedding.2",
        "condition_embedder.text_embedder.linear_2",
    ),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("cross_attn", "attn2"),
    ("self_attn", "attn1"),
    (".o.", ".to_out.0."),
    (".q.", ".to_q."),
    (".k.", ".to_k."),
    (".v.", ".to_v."),
    (".k_img.", ".add_k_proj."),
    (".v_img.", ".add_v_proj."),
    (".norm_k_img.", ".norm_added_k."),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    (
        "img_emb.proj.1",
        "condition_embedder.image_embedder.ff.net.0.proj",
    ),
    (
        "img_emb.proj.3",
        "condition_embedder.image_embedder.ff.net.2",
    ),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
];

/// Whether `w` (ComfyUI's prefix stripped) is in the original layout.
pub fn is_original(w: &HashMap<String, Tensor>) -> bool {
    w.contains_key("patch_embedding.weight") && w.keys().any(|k| k.starts_with("blocks."))
}

/// The original layout's keys in diffusers' names.
pub fn to_diffusers(w: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    w.into_iter()
        .map(|(k, t)| {
            let name = RENAMES
                .iter()
                .fold(k, |key, (from, to)| key.replace(from, to));
            (name, t)
        })
        .collect()
}

/// A diffusers config for the converted weights: `config.json` beside the file when there is
/// one, else inferred from the shapes (Wan2.1's 128-wide heads, its RMS q/k norms across heads,
/// ε 1e-6, RoPE over 1024 positions).
pub fn config(file: &Path, w: &HashMap<String, Tensor>) -> Result<serde_json::Value> {
    if let Some(cfg) = ditflow_nn::config_beside(file)? {
        return Ok(cfg);
    }
    let shape = |k: &str| ditflow_nn::converted_shape(file, w, k);
    let p = shape("patch_embedding.weight")?;
    let [dim, in_channels, pt, ph, pw] = p[..] else {
        bail!(
            "{}: patch_embedding.weight is {p:?}, not a 3-D convolution",
            file.display()
        );
    };
    if !dim.is_multiple_of(128) {
        bail!(
            "{}: width {dim} is not a whole number of Wan's 128-wide heads; put a config.json \
             beside the file",
            file.display()
        );
    }
    Ok(serde_json::json!({
        "_class_name": "WanTransformer3DModel",
        "patch_size": [pt, ph, pw],
        "num_attention_heads": dim / 128,
        "attention_head_dim": 128,
        "in_channels": in_channels,
        "out_channels": shape("proj_out.weight")?[0] / (pt * ph * pw),
        "text_dim": shape("condition_embedder.text_embedder.linear_1.weight")?[1],
        "freq_dim": shape("condition_embedder.time_embedder.linear_1.weight")?[1],
        "ffn_dim": shape("blocks.0.ffn.net.0.proj.weight")?[0],
        "num_layers": ditflow_nn::block_count(w, "blocks."),
        "cross_attn_norm": w.contains_key("blocks.0.norm2.weight"),
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": null,
        "added_kv_proj_dim": null,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": null,
    }))
}
