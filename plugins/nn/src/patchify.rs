//! Patchify and unpatchify: latents `[B, C, H, W]` to patch tokens and back, with the grid check
//! that names the model.

use ditflow_plugin::{Error, Result, Tensor};

/// `(B, H/p, W/p)` of latents `[B, in_channels, H, W]` whose sides are multiples of the patch
/// size `p`; an error naming `model` otherwise.
pub fn patch_grid(
    model: &str,
    x: &Tensor,
    in_channels: usize,
    patch: usize,
) -> Result<(usize, usize, usize)> {
    let s = x.shape();
    if s.len() != 4
        || s[1] != in_channels
        || !s[2].is_multiple_of(patch)
        || !s[3].is_multiple_of(patch)
    {
        return Err(Error(format!(
            "{model}: hidden_states must be [B, {in_channels}, H, W] with H and W multiples of {patch}, got {s:?}"
        )));
    }
    Ok((s[0], s[2] / patch, s[3] / patch))
}

/// diffusers' `PatchEmbed` convolution: `[B, C, H, W]` → `[B, (H/p)·(W/p), D]` (no position
/// embedding; the caller adds it).
pub fn patchify(x: &Tensor, proj_w: &Tensor, proj_b: &Tensor, patch: usize) -> Result<Tensor> {
    let y = x.conv(proj_w, Some(proj_b), &[patch], &[0], 1)?;
    let s = y.shape().to_vec();
    y.reshape(&[s[0] as i64, s[1] as i64, -1])?
        .permute(&[0, 2, 1])
}

/// `[B, h·w, p·p·C]` → `[B, C, h·p, w·p]` (diffusers' `nhwpqc->nchpwq`).
pub fn unpatchify(x: &Tensor, h: usize, w: usize, patch: usize, channels: usize) -> Result<Tensor> {
    let b = x.shape()[0] as i64;
    let (h, w, p, c) = (h as i64, w as i64, patch as i64, channels as i64);
    x.reshape(&[b, h, w, p, p, c])?
        .permute(&[0, 5, 1, 3, 2, 4])?
        .reshape(&[b, c, h * p, w * p])
}

/// FluxPipeline's `_pack_latents`: `[B, C, H, W]` → `[B, (H/p)·(W/p), C·p·p]`, each token's
/// features channel-major (`c, dy, dx`). The sides must be multiples of `p`.
pub fn pack_latents(x: &Tensor, p: usize) -> Result<Tensor> {
    let s = x.shape();
    if s.len() != 4 || !s[2].is_multiple_of(p) || !s[3].is_multiple_of(p) {
        return Err(Error(format!(
            "latents must be [B, C, H, W] with H and W multiples of {p}, got {s:?}"
        )));
    }
    let (b, c, h, w, p) = (s[0] as i64, s[1] as i64, s[2] as i64, s[3] as i64, p as i64);
    x.reshape(&[b, c, h / p, p, w / p, p])?
        .permute(&[0, 2, 4, 1, 3, 5])?
        .reshape(&[b, (h / p) * (w / p), c * p * p])
}

/// FluxPipeline's `_unpack_latents`, the inverse of [`pack_latents`]: `[B, h·w, C·p·p]` →
/// `[B, C, h·p, w·p]`.
pub fn unpack_latents(x: &Tensor, h: usize, w: usize, p: usize) -> Result<Tensor> {
    let s = x.shape();
    if s.len() != 3 || s[1] != h * w || !s[2].is_multiple_of(p * p) {
        return Err(Error(format!(
            "packed latents must be [B, {}, C·{}], got {s:?}",
            h * w,
            p * p
        )));
    }
    let (b, c, h, w, p) = (
        s[0] as i64,
        (s[2] / (p * p)) as i64,
        h as i64,
        w as i64,
        p as i64,
    );
    x.reshape(&[b, h, w, c, p, p])?
        .permute(&[0, 3, 1, 4, 2, 5])?
        .reshape(&[b, c, h * p, w * p])
}
