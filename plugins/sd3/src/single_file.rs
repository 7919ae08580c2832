//! SD3/SD3.5 single-file checkpoints in Stability AI's layout (`sd3.5_large.safetensors`,
//! `joint_blocks.N.x_block.attn.qkv…`), with or without ComfyUI's `model.diffusion_model.`
//! prefix: the keys mapped to diffusers' names as diffusers' own converter does
//! (`convert_sd3_transformer_checkpoint_to_diffusers` in `loaders/single_file_utils.py`,
//! diffusers 0.42): the fused qkv split, and the shift and scale of the last context block and
//! of the final layer swapped. The config is inferred from the shapes (heads of 64 channels, as
//! every released SD3 has); a `config.json` beside the file overrides it.

use ditflow_nn::block_count;
use ditflow_plugin::{Error, Result, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Whether `keys` (ComfyUI's prefix stripped) are an SAI-layout SD3 checkpoint.
pub fn is_sai(keys: &HashMap<String, Tensor>) -> bool {
    keys.keys().any(|k| k.starts_with("joint_blocks."))
}

/// SAI keys (ComfyUI's prefix already stripped) → diffusers keys.
pub fn to_diffusers(
    file: &Path,
    mut ck: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let n = block_count(&ck, "joint_blocks.");
    let dim = ck
        .get("x_embedder.proj.weight")
        .map(|t| t.shape()[0])
        .ok_or_else(|| {
            Error(format!(
                "{}: the SD3 checkpoint has no 'x_embedder.proj.weight'",
                file.display()
            ))
        })?;
    let dual: Vec<bool> = (0..n)
        .map(|i| ck.contains_key(&format!("joint_blocks.{i}.x_block.attn2.qkv.weight")))
        .collect();
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let mut take = |k: &str| -> Result<Tensor> {
        ck.remove(k).ok_or_else(|| {
            Error(format!(
                "{}: the SD3 checkpoint has no '{k}'",
                file.display()
            ))
        })
    };
    let rows = |t: &Tensor, a: usize, b: usize| t.slice(0, a as i64, b as i64, 1);
    // (shift, scale) in SAI's order → (scale, shift) in diffusers'.
    let swap = |t: &Tensor| -> Result<Tensor> {
        ditflow_plugin::ops::concat(&[&rows(t, dim, 2 * dim)?, &rows(t, 0, dim)?], 0)
    };
    out.insert("pos_embed.pos_embed".into(), take("pos_embed")?);
    for t in ["weight", "bias"] {
        out.insert(
            format!("pos_embed.proj.{t}"),
            take(&format!("x_embedder.proj.{t}"))?,
        );
    }
    for (sai, parts) in sai_linears(n, &dual) {
        for t in ["weight", "bias"] {
            let fused = take(&format!("{sai}.{t}"))?;
            if fused.shape()[0] % parts.len() != 0 {
                return Err(Error(format!(
                    "{}: '{sai}.{t}' has {} rows, which do not split into {} equal parts",
                    file.display(),
                    fused.shape()[0],
                    parts.len()
                )));
            }
            let each = fused.shape()[0] / parts.len();
            for (j, part) in parts.iter().enumerate() {
                out.insert(
                    format!("{part}.{t}"),
                    rows(&fused, j * each, (j + 1) * each)?,
                );
            }
        }
    }
    for t in ["weight", "bias"] {
        let m = take(&format!("final_layer.adaLN_modulation.1.{t}"))?;
        out.insert(format!("norm_out.linear.{t}"), swap(&m)?);
        if n > 0 {
            let m = take(&format!(
                "joint_blocks.{}.context_block.adaLN_modulation.1.{t}",
                n - 1
            ))?;
            out.insert(
                format!("transformer_blocks.{}.norm1_context.linear.{t}", n - 1),
                swap(&m)?,
            );
        }
    }
    for i in 0..n {
        let (p, x, c) = (
            format!("transformer_blocks.{i}."),
            format!("joint_blocks.{i}.x_block."),
            format!("joint_blocks.{i}.context_block."),
        );
        for (from, to) in [
            (format!("{x}attn.ln_q"), format!("{p}attn.norm_q")),
            (format!("{x}attn.ln_k"), format!("{p}attn.norm_k")),
            (format!("{c}attn.ln_q"), format!("{p}attn.norm_added_q")),
            (format!("{c}attn.ln_k"), format!("{p}attn.norm_added_k")),
            (format!("{x}attn2.ln_q"), format!("{p}attn2.norm_q")),
            (format!("{x}attn2.ln_k"), format!("{p}attn2.norm_k")),
        ] {
            if let Ok(w) = take(&format!("{from}.weight")) {
                out.insert(format!("{to}.weight"), w);
            }
        }
    }
    Ok(out)
}

/// Every SAI linear layer but the swapped modulations (the final layer's and the last context
/// block's) with its diffusers parts in row order, as diffusers' converter maps them: a rename
/// is one part, a fused qkv three equal ones. `dual[i]` says block `i` has MMDiT-X's second
/// attention. SD3 publishes the SAI names as fused aliases, so LoRAs in SAI's layout (kohya's
/// `lora_unet_joint_blocks_…`, ComfyUI's) land on the parts.
pub fn sai_linears(n: usize, dual: &[bool]) -> Vec<(String, Vec<String>)> {
    let one = |sai: &str, part: &str| (sai.to_string(), vec![part.to_string()]);
    let mut out = vec![
        one(
            "t_embedder.mlp.0",
            "time_text_embed.timestep_embedder.linear_1",
        ),
        one(
            "t_embedder.mlp.2",
            "time_text_embed.timestep_embedder.linear_2",
        ),
        one("context_embedder", "context_embedder"),
        one("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
        one("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
        one("final_layer.linear", "proj_out"),
    ];
    for i in 0..n {
        let p = format!("transformer_blocks.{i}.");
        let (x, c) = (
            format!("joint_blocks.{i}.x_block."),
            format!("joint_blocks.{i}.context_block."),
        );
        let qkv = |fused: String, part: &dyn Fn(&str) -> String| {
            (
                fused,
                ["q", "k", "v"].map(|q| format!("{p}{}", part(q))).to_vec(),
            )
        };
        out.push(qkv(format!("{x}attn.qkv"), &|q| format!("attn.to_{q}")));
        out.push(qkv(format!("{c}attn.qkv"), &|q| {
            format!("attn.add_{q}_proj")
        }));
        out.extend([
            one(&format!("{x}attn.proj"), &format!("{p}attn.to_out.0")),
            one(
                &format!("{x}adaLN_modulation.1"),
                &format!("{p}norm1.linear"),
            ),
            one(&format!("{x}mlp.fc1"), &format!("{p}ff.net.0.proj")),
            one(&format!("{x}mlp.fc2"), &format!("{p}ff.net.2")),
        ]);
        if i + 1 < n {
            out.extend([
                one(
                    &format!("{c}adaLN_modulation.1"),
                    &format!("{p}norm1_context.linear"),
                ),
                one(&format!("{c}attn.proj"), &format!("{p}attn.to_add_out")),
                one(&format!("{c}mlp.fc1"), &format!("{p}ff_context.net.0.proj")),
                one(&format!("{c}mlp.fc2"), &format!("{p}ff_context.net.2")),
            ]);
        }
        if dual.get(i) == Some(&true) {
            out.push(qkv(format!("{x}attn2.qkv"), &|q| format!("attn2.to_{q}")));
            out.push(one(
                &format!("{x}attn2.proj"),
                &format!("{p}attn2.to_out.0"),
            ));
        }
    }
    out
}

/// A diffusers config for the converted weights: from `config.json` beside the file when there
/// is one, else inferred from the shapes.
pub fn config(file: &Path, w: &HashMap<String, Tensor>) -> Result<serde_json::Value> {
    if let Some(cfg) = ditflow_nn::config_beside(file)? {
        return Ok(cfg);
    }
    let shape = |k: &str| ditflow_nn::converted_shape(file, w, k);
    let proj = shape("pos_embed.proj.weight")?;
    let (dim, patch) = (proj[0], proj[2]);
    let n = block_count(w, "transformer_blocks.");
    let dual: Vec<usize> = (0..n)
        .filter(|i| w.contains_key(&format!("transformer_blocks.{i}.attn2.to_q.weight")))
        .collect();
    let pos = shape("pos_embed.pos_embed")?[1];
    let max = (pos as f64).sqrt().round() as usize;
    let mut cfg = serde_json::json!({
        "_class_name": "SD3Transformer2DModel",
        "patch_size": patch,
        "in_channels": proj[1],
        "num_layers": n,
        "attention_head_dim": 64,
        "num_attention_heads": dim / 64,
        "joint_attention_dim": shape("context_embedder.weight")?[1],
        "caption_projection_dim": dim,
        "pooled_projection_dim": shape("time_text_embed.text_embedder.linear_1.weight")?[1],
        "out_channels": shape("proj_out.weight")?[0] / (patch * patch),
        "pos_embed_max_size": max,
        "dual_attention_layers": dual,
    });
    if w.contains_key("transformer_blocks.0.attn.norm_q.weight") {
        cfg["qk_norm"] = "rms_norm".into();
    }
    Ok(cfg)
}
