//! VAEs inside single-file checkpoints: the original (LDM) layout under `first_stage_model.`
//! (Stability AI's and ComfyUI's all-in-one files) or `vae.`, or a bare VAE file, mapped to
//! diffusers' keys as diffusers' `convert_ldm_vae_checkpoint` maps them (resnets, the
//! down/upsamplers, the mid block's attention with its 1×1 convolutions as linear weights, the
//! decoder's blocks in reverse order). Without a config the shapes give one, with the scaling
//! and shift factors of the family the rest of the file belongs to (SD3's, Flux's, or SD's).

use ditflow_nn::block_count;
use ditflow_plugin::{Error, Result, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The VAE's tensors of a checkpoint, without their prefix, and the family the other keys
/// say the file is for.
pub fn vae_tensors(
    file: &Path,
    all: HashMap<String, Tensor>,
) -> Result<(HashMap<String, Tensor>, &'static str)> {
    let any = |p: &str| all.keys().any(|k| k.contains(p));
    let family = if any("joint_blocks.") {
        "sd3"
    } else if any("double_blocks.") {
        "flux"
    } else {
        "sd"
    };
    let prefix = ["first_stage_model.", "vae."]
        .into_iter()
        .find(|p| all.keys().any(|k| k.starts_with(p)));
    let vae: HashMap<String, Tensor> = match prefix {
        Some(p) => all
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(p).map(|r| (r.to_string(), v)))
            .collect(),
        None => all,
    };
    if !vae
        .keys()
        .any(|k| k.starts_with("encoder.") || k.starts_with("decoder."))
    {
        return Err(Error(format!(
            "{}: no VAE in the file (no first_stage_model., vae., encoder. or decoder. keys)",
            file.display()
        )));
    }
    Ok((vae, family))
}

/// Whether the keys are in the original (LDM) layout.
pub fn is_ldm(keys: &HashMap<String, Tensor>) -> bool {
    keys.keys()
        .any(|k| k.starts_with("encoder.down.") || k.starts_with("decoder.up."))
}

/// LDM keys → diffusers keys.
pub fn to_diffusers(ck: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let n_up = block_count(&ck, "decoder.up.");
    let mut out = HashMap::new();
    for (key, t) in ck {
        let mut k = key.replace("nin_shortcut", "conv_shortcut");
        for side in ["encoder", "decoder"] {
            k = k.replace(
                &format!("{side}.norm_out."),
                &format!("{side}.conv_norm_out."),
            );
            for (i, j) in [(1, 0), (2, 1)] {
                k = k.replace(
                    &format!("{side}.mid.block_{i}."),
                    &format!("{side}.mid_block.resnets.{j}."),
                );
            }
        }
        let mut attention = false;
        if let Some(pos) = k.find(".mid.attn_1.") {
            let (head, rest) = k.split_at(pos);
            let rest = &rest[".mid.attn_1.".len()..];
            let rest = match rest.split_once('.') {
                Some(("norm", r)) => format!("group_norm.{r}"),
                Some(("q", r)) => format!("to_q.{r}"),
                Some(("k", r)) => format!("to_k.{r}"),
                Some(("v", r)) => format!("to_v.{r}"),
                Some(("proj_out", r)) => format!("to_out.0.{r}"),
                _ => rest.to_string(),
            };
            attention = !rest.starts_with("group_norm");
            k = format!("{head}.mid_block.attentions.0.{rest}");
        }
        // Down and up blocks: `encoder.down.I.block.J`, `encoder.down.I.downsample.conv`, and the
        // decoder's `up.B` in reverse order.
        let parts: Vec<&str> = k.split('.').collect();
        let k = match parts.as_slice() {
            ["encoder", "down", i, "block", rest @ ..] => {
                format!("encoder.down_blocks.{i}.resnets.{}", rest.join("."))
            }
            ["encoder", "down", i, "downsample", rest @ ..] => {
                format!("encoder.down_blocks.{i}.downsamplers.0.{}", rest.join("."))
            }
            ["decoder", "up", b, kind, rest @ ..] if *kind == "block" || *kind == "upsample" => {
                let b: usize = b
                    .parse()
                    .map_err(|_| Error(format!("'{key}': not a block index")))?;
                let i = n_up
                    .checked_sub(b + 1)
                    .ok_or_else(|| Error(format!("'{key}': block {b} of {n_up}")))?;
                if *kind == "block" {
                    format!("decoder.up_blocks.{i}.resnets.{}", rest.join("."))
                } else {
                    format!("decoder.up_blocks.{i}.upsamplers.0.{}", rest.join("."))
                }
            }
            _ => k.clone(),
        };
        // The attention's 1×1 convolutions as linear weights.
        let t = if attention && k.ends_with(".weight") && t.shape().len() == 4 {
            let s = t.shape().to_vec();
            t.reshape(&[s[0] as i64, s[1] as i64])?
        } else {
            t
        };
        out.insert(k, t);
    }
    Ok(out)
}

/// A diffusers config for converted weights, from their shapes, with `family`'s factors.
pub fn infer_config(
    file: &Path,
    w: &HashMap<String, Tensor>,
    family: &str,
) -> Result<serde_json::Value> {
    let shape = |k: &str| -> Result<Vec<usize>> {
        w.get(k)
            .map(|t| t.shape().to_vec())
            .ok_or_else(|| Error(format!("{}: the VAE has no '{k}'", file.display())))
    };
    let levels = block_count(w, "encoder.down_blocks.");
    let channels = (0..levels)
        .map(|i| Ok(shape(&format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"))?[0]))
        .collect::<Result<Vec<usize>>>()?;
    let (scaling, shift) = match family {
        "sd3" => (1.5305, 0.0609),
        "flux" => (0.3611, 0.1159),
        _ => (0.18215, 0.0),
    };
    Ok(serde_json::json!({
        "_class_name": "AutoencoderKL",
        "in_channels": shape("encoder.conv_in.weight")?[1],
        "out_channels": shape("decoder.conv_out.weight")?[0],
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "layers_per_block": block_count(w, "encoder.down_blocks.0.resnets."),
        "latent_channels": shape("decoder.conv_in.weight")?[1],
        "norm_num_groups": 32,
        "scaling_factor": scaling,
        "shift_factor": shift,
        "use_quant_conv": w.contains_key("quant_conv.weight"),
        "use_post_quant_conv": w.contains_key("post_quant_conv.weight"),
    }))
}
