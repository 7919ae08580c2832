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
    let mut renames = vec![
        (
            "time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_1",
        ),
        (
            "time_in.out_layer",
            "time_text_embed.timestep_embedder.linear_2",
        ),
        (
            "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_1",
        ),
        (
            "vector_in.out_layer",
            "time_text_embed.text_embedder.linear_2",
        ),
        ("txt_in", "context_embedder"),
        ("img_in", "x_embedder"),
        ("final_layer.linear", "proj_out"),
    ];
    if has_guidance {
        renames.push((
            "guidance_in.in_layer",
            "time_text_embed.guidance_embedder.linear_1",
        ));
        renames.push((
            "guidance_in.out_layer",
            "time_text_embed.guidance_embedder.linear_2",
        ));
    }
    for (from, to) in renames {
        for t in ["weight", "bias"] {
            put(format!("{to}.{t}"), take(&format!("{from}.{t}"))?);
        }
    }
    // Rows `[a, b)` of a weight or bias.
    let rows = |t: &Tensor, a: usize, b: usize| t.slice(0, a as i64, b as i64, 1);
    for i in 0..n_double {
        let (p, q) = (
            format!("transformer_blocks.{i}."),
            format!("double_blocks.{i}."),
        );
        for t in ["weight", "bias"] {
            put(
                format!("{p}norm1.linear.{t}"),
                take(&format!("{q}img_mod.lin.{t}"))?,
            );
            put(
                format!("{p}norm1_context.linear.{t}"),
                take(&format!("{q}txt_mod.lin.{t}"))?,
            );
            let img = take(&format!("{q}img_attn.qkv.{t}"))?;
            let txt = take(&format!("{q}txt_attn.qkv.{t}"))?;
            for (j, x) in ["q", "k", "v"].iter().enumerate() {
                put(
                    format!("{p}attn.to_{x}.{t}"),
                    rows(&img, j * dim, (j + 1) * dim)?,
                );
                put(
                    format!("{p}attn.add_{x}_proj.{t}"),
                    rows(&txt, j * dim, (j + 1) * dim)?,
                );
            }
            put(
                format!("{p}ff.net.0.proj.{t}"),
                take(&format!("{q}img_mlp.0.{t}"))?,
            );
            put(
                format!("{p}ff.net.2.{t}"),
                take(&format!("{q}img_mlp.2.{t}"))?,
            );
            put(
                format!("{p}ff_context.net.0.proj.{t}"),
                take(&format!("{q}txt_mlp.0.{t}"))?,
            );
            put(
                format!("{p}ff_context.net.2.{t}"),
                take(&format!("{q}txt_mlp.2.{t}"))?,
            );
            put(
                format!("{p}attn.to_out.0.{t}"),
                take(&format!("{q}img_attn.proj.{t}"))?,
            );
            put(
                format!("{p}attn.to_add_out.{t}"),
                take(&format!("{q}txt_attn.proj.{t}"))?,
            );
        }
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
        for t in ["weight", "bias"] {
            put(
                format!("{p}norm.linear.{t}"),
                take(&format!("{q}modulation.lin.{t}"))?,
            );
            // linear1 is q, k, v (dim each) and the MLP's input (4·dim).
            let l1 = take(&format!("{q}linear1.{t}"))?;
            if l1.shape()[0] != 7 * dim {
                return Err(Error(format!(
                    "{}: '{q}linear1.{t}' has {} rows, expected {} (q, k, v and a 4× MLP)",
                    file.display(),
                    l1.shape()[0],
                    7 * dim
                )));
            }
            for (j, x) in ["q", "k", "v"].iter().enumerate() {
                put(
                    format!("{p}attn.to_{x}.{t}"),
                    rows(&l1, j * dim, (j + 1) * dim)?,
                );
            }
            put(format!("{p}proj_mlp.{t}"), rows(&l1, 3 * dim, 7 * dim)?);
            put(
                format!("{p}proj_out.{t}"),
                take(&format!("{q}linear2.{t}"))?,
            );
        }
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
    let shape = |k: &str| -> Result<Vec<usize>> {
        w.get(k)
            .map(|t| t.shape().to_vec())
            .ok_or_else(|| Error(format!("{}: no '{k}' after conversion", file.display())))
    };
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
