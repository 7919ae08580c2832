//! What the ControlNet patches of every family share: diffusers' ControlNet pipelines' rules for
//! when a ControlNet is active and how its hint image becomes a latent, the maps from a base
//! block to the ControlNet residual it reads, and a digest of the hint for the patch's identity.

use ditflow_plugin::files::{fnv1a, model_fingerprint};
use ditflow_plugin::model::{Call, DenoiserInfo};
use ditflow_plugin::{Result, Tensor, Value};
use std::path::Path;

/// diffusers' ControlNet pipelines' `controlnet_keep`: active at step `i` of `n` unless
/// `i/n < start` or `(i+1)/n > end`.
pub fn kept(call: &Call, start: f64, end: f64) -> bool {
    let n = call.num_steps.max(1) as f64;
    let i = call.step_index as f64;
    !(i / n < start || (i + 1.0) / n > end)
}

/// SD3's map: base block `block` of `n_base` reads residual `int(block / (n_base / n_res))`
/// (`interval_control` divided in floats, then truncated).
pub fn residual_index_sd3(block: usize, n_base: usize, n_res: usize) -> usize {
    let interval = n_base as f64 / n_res.max(1) as f64;
    ((block as f64 / interval) as usize).min(n_res.saturating_sub(1))
}

/// Flux's map: base block `block` reads residual `block // ceil(n_base / n_res)`.
pub fn residual_index_flux(block: usize, n_base: usize, n_res: usize) -> usize {
    let interval = n_base.div_ceil(n_res.max(1)).max(1);
    (block / interval).min(n_res.saturating_sub(1))
}

/// XLabs' map (`controlnet_blocks_repeat`): base block `block` reads residual
/// `block % n_res`.
pub fn residual_index_repeat(block: usize, n_res: usize) -> usize {
    block % n_res.max(1)
}

/// The hint latent as the ControlNet pipelines make it from an image `[H, W, 3]`: the VAE's
/// mean (the pipelines sample; the mean is its expectation), minus the VAE's shift when
/// `shift`, times its scaling factor.
pub fn hint_latent(vae: &Value, image: &Tensor, shift: bool) -> Result<Tensor> {
    let info = vae.autoencoder_info()?;
    let mean = vae.encode_image_mean(image)?;
    let shift = if shift { info.shift_factor } else { 0.0 };
    mean.affine(info.scaling_factor, -shift * info.scaling_factor)
}

/// A ControlNet patch's identity: its hint, its file (name, size and time) and its settings.
pub fn patch_digest(hint: &Tensor, file: &Path, settings: &[f64]) -> Result<u64> {
    Ok(settings
        .iter()
        .fold(tensor_digest(hint)? ^ model_fingerprint(file)?, |h, v| {
            fnv1a(h, &v.to_le_bytes())
        }))
}

/// A model's block stacks for a message: `transformer_blocks (19 blocks), ...`.
pub fn stacks_summary(info: &DenoiserInfo) -> String {
    info.stacks
        .iter()
        .map(|s| format!("{} ({} blocks)", s.name, s.n_blocks))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The last part of a path, for a patch's name (the whole path when it has none).
pub fn file_label(path: &Path) -> String {
    path.file_name().map_or(path.display().to_string(), |n| {
        n.to_string_lossy().into_owned()
    })
}

/// A digest of a tensor's values, for a patch's identity.
pub fn tensor_digest(t: &Tensor) -> Result<u64> {
    let v = t.to_f32_vec()?;
    Ok(v.iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, x| fnv1a(h, &x.to_le_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residual_maps_follow_diffusers() {
        // SD3: 4 base blocks, 2 residuals: interval 2.0 → 0, 0, 1, 1; 3 residuals: 1.33 →
        // int(0/1.33)=0, int(1/1.33)=0, int(2/1.33)=1, int(3/1.33)=2.
        let sd3: Vec<usize> = (0..4).map(|b| residual_index_sd3(b, 4, 2)).collect();
        assert_eq!(sd3, [0, 0, 1, 1]);
        let sd3: Vec<usize> = (0..4).map(|b| residual_index_sd3(b, 4, 3)).collect();
        assert_eq!(sd3, [0, 0, 1, 2]);
        // Flux: 19 blocks, 5 residuals: ceil(3.8) = 4 → 0,0,0,0,1,...,4 for block 16..18.
        let flux: Vec<usize> = (0..19).map(|b| residual_index_flux(b, 19, 5)).collect();
        assert_eq!(flux[..5], [0, 0, 0, 0, 1]);
        assert_eq!(flux[16..], [4, 4, 4]);
        let flux: Vec<usize> = (0..4).map(|b| residual_index_flux(b, 4, 3)).collect();
        assert_eq!(flux, [0, 0, 1, 1]);
        // XLabs: 2 residuals over 5 blocks repeat: 0, 1, 0, 1, 0.
        let xlabs: Vec<usize> = (0..5).map(|b| residual_index_repeat(b, 2)).collect();
        assert_eq!(xlabs, [0, 1, 0, 1, 0]);
    }
}
