//! Flux single-file checkpoints in Black Forest Labs' layout (`flux1-dev.safetensors`,
//! `double_blocks.N.img_attn.qkv…`), with or without ComfyUI's `model.diffusion_model.` prefix:
//! the keys mapped to diffusers' names as diffusers' own converter does
//! (`convert_flux_transformer_checkpoint_to_diffusers` in `loaders/single_file_utils.py`,
//! diffusers 0.42): the fused qkv and the single blocks' `linear1` split into their parts, and the
//! final layer's shift and scale swapped. The config is inferred from the shapes; a
//! `config.json` beside the file overrides it.

use ditflow_nn::block_count;
use ditflow_plugin::{Error, Result, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Whether `keys` (ComfyUI's prefix stripped) are a BFL-layout Flux checkpoint.
pub fn is_bfl(keys: &HashMap<String, Tensor>) -> bool {
    keys.keys().any(|k| k.starts_with("double_blocks."))
}

/// Every BFL linear layer but the final modulation (whose halves are swapped) with its diffusers
/// parts in row order: a rename is one part; the fused qkv is q, k and v (`dim` rows each); the
/// single blocks' `linear1` is q, k, v and the MLP input (the rest). diffusers' converter maps
/// them so; Flux publishes the BFL names as fused aliases, so LoRAs in BFL's layout (kohya's
/// `lora_unet_double_blocks_…`, ComfyUI's) land on the parts.
pub fn bfl_linears(
    n_double: usize,
    n_single: usize,
    has_guidance: bool,
) -> Vec<(String, Vec<String>)> {
    let one = |bfl: &str, part: &str| (bfl.to_string(), vec![part.to_string()]);
    let mut out = vec![
        one(
            "time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_1",
        ),
        one(
            "time_in.out_layer",
            "time_text_embed.timestep_embedder.linear_2",
        ),
        one(
            "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_1",
        ),
        one(
            "vector_in.out_layer",
            "time_text_embed.text_embedder.linear_2",
        ),
        one("txt_in", "context_embedder"),
        one("img_in", "x_embedder"),
        one("final_layer.linear", "proj_out"),
    ];
    if has_guidance {
        out.push(one(
            "guidance_in.in_layer",
            "time_text_embed.guidance_embedder.linear_1",
        ));
        out.push(one(
            "guidance_in.out_layer",
            "time_text_embed.guidance_embedder.linear_2",
        ));
    }
    for i in 0..n_double {
        let (q, p) = (
            format!("double_blocks.{i}."),
            format!("transformer_blocks.{i}."),
        );
        let pair = |b: &str, d: &str| one(&format!("{q}{b}"), &format!("{p}{d}"));
        out.extend([
            pair("img_mod.lin", "norm1.linear"),
            pair("txt_mod.lin", "norm1_context.linear"),
            pair("img_mlp.0", "ff.net.0.proj"),
            pair("img_mlp.2", "ff.net.2"),
            pair("txt_mlp.0", "ff_context.net.0.proj"),
            pair("txt_mlp.2", "ff_context.net.2"),
            pair("img_attn.proj", "attn.to_out.0"),
            pair("txt_attn.proj", "attn.to_add_out"),
        ]);
        out.push((
            format!("{q}img_attn.qkv"),
            ["q", "k", "v"].map(|x| format!("{p}attn.to_{x}")).to_vec(),
        ));
        out.push((
            format!("{q}txt_attn.qkv"),
            ["q", "k", "v"]
                .map(|x| format!("{p}attn.add_{x}_proj"))
                .to_vec(),
        ));
    }
    for i in 0..n_single {
        let (q, p) = (
            format!("single_blocks.{i}."),
            format!("single_transformer_blocks.{i}."),
        );
        out.push(one(
            &format!("{q}modulation.lin"),
            &format!("{p}norm.linear"),
        ));
        out.push(one(&format!("{q}linear2"), &format!("{p}proj_out")));
        let mut parts = ["q", "k", "v"].map(|x| format!("{p}attn.to_{x}")).to_vec();
        parts.push(format!("{p}proj_mlp"));
        out.push((format!("{q}linear1"), parts));
    }
    out
}

/// BFL keys (ComfyUI's prefix already stripped) → diffusers keys.
pub fn to_diffusers(
    file: &Path,
    mut ck: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let (n_double, n_single) = (
        block_count(&ck, "double_blocks."),
        block_count(&ck, "single_blocks."),
    );
    let has_guidance = ck.keys().any(|k| k.starts_with("guidance_in."));
    let dim = ck
        .get("img_in.weight")
        .map(|t| t.shape()[0])
        .ok_or_else(|| {
            Error(format!(
                "{}: the BFL Flux checkpoint has no 'img_in.weight'",
                file.display()
            ))
        })?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let mut put = |k: String, v: Tensor| {
        out.insert(k, v);
    };
    let mut take = |k: &str| -> Result<Tensor> {
        ck.remove(k).ok_or_else(|| {
            Error(format!(
                "{}: the BFL Flux checkpoint has no '{k}'",
                file.display()
            ))
        })
    };
    for (bfl, parts) in bfl_linears(n_double, n_single, has_guidance) {
        for t in ["weight", "bias"] {
            let fused = take(&format!("{bfl}.{t}"))?;
            let n = fused.shape()[0];
            // Every part but the last is `dim` rows (q, k, v); the last takes the rest (v, or
            // the single blocks' 4x MLP input).
            let rest = n.checked_sub((parts.len() - 1) * dim).filter(|&r| r > 0);
            let Some(rest) = rest else {
                return Err(Error(format!(
                    "{}: '{bfl}.{t}' has {n} rows, too few for its parts {}",
                    file.display(),
                    parts.join(", ")
                )));
            };
            for (j, part) in parts.iter().enumerate() {
                let (a, b) = if j + 1 == parts.len() {
                    (j * dim, j * dim + rest)
                } else {
                    (j * dim, (j + 1) * dim)
                };
                put(
                    format!("{part}.{t}"),
                    fused.slice(0, a as i64, b as i64, 1)?,
                );
            }
        }
    }
    // Rows `[a, b)` of a weight or bias.
    let rows = |t: &Tensor, a: usize, b: usize| t.slice(0, a as i64, b as i64, 1);
    for i in 0..n_double {
        let (p, q) = (
            format!("transformer_blocks.{i}."),
            format!("double_blocks.{i}."),
        );
        for (to, from) in [
            ("norm_q", "img_attn.norm.query_norm"),
            ("norm_k", "img_attn.norm.key_norm"),
            ("norm_added_q", "txt_attn.norm.query_norm"),
            ("norm_added_k", "txt_attn.norm.key_norm"),
        ] {
            put(
                format!("{p}attn.{to}.weight"),
                take(&format!("{q}{from}.scale"))?,
            );
        }
    }
    for i in 0..n_single {
        let (p, q) = (
            format!("single_transformer_blocks.{i}."),
            format!("single_blocks.{i}."),
        );
        put(
            format!("{p}attn.norm_q.weight"),
            take(&format!("{q}norm.query_norm.scale"))?,
        );
        put(
            format!("{p}attn.norm_k.weight"),
            take(&format!("{q}norm.key_norm.scale"))?,
        );
    }
    // BFL's final modulation is (shift, scale); diffusers' AdaLayerNormContinuous reads
    // (scale, shift).
    for t in ["weight", "bias"] {
        let m = take(&format!("final_layer.adaLN_modulation.1.{t}"))?;
        let swapped =
            ditflow_plugin::ops::concat(&[&rows(&m, dim, 2 * dim)?, &rows(&m, 0, dim)?], 0)?;
        put(format!("norm_out.linear.{t}"), swapped);
    }
    Ok(out)
}

/// A diffusers config for the converted weights: from `config.json` beside the file when there
/// is one, else inferred from the shapes (Flux's RoPE axes 16, 56, 56 for 128-wide heads).
pub fn config(file: &Path, w: &HashMap<String, Tensor>) -> Result<serde_json::Value> {
    if let Some(cfg) = ditflow_nn::config_beside(file)? {
        return Ok(cfg);
    }
    let shape = |k: &str| ditflow_nn::converted_shape(file, w, k);
    let x = shape("x_embedder.weight")?;
    let head_dim = shape("transformer_blocks.0.attn.norm_q.weight")?[0];
    if head_dim != 128 {
        return Err(Error(format!(
            "{}: heads of {head_dim} channels: the RoPE axes cannot be inferred (Flux's are 16, 56, 56 for 128); put a config.json beside the file",
            file.display()
        )));
    }
    Ok(serde_json::json!({
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": x[1],
        "out_channels": shape("proj_out.weight")?[0],
        "num_layers": block_count(w, "transformer_blocks."),
        "num_single_layers": block_count(w, "single_transformer_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": x[0] / head_dim,
        "joint_attention_dim": shape("context_embedder.weight")?[1],
        "pooled_projection_dim": shape("time_text_embed.text_embedder.linear_1.weight")?[1],
        "guidance_embeds": w.contains_key("time_text_embed.guidance_embedder.linear_1.weight"),
        "axes_dims_rope": [16, 56, 56],
    }))
}
