//! Previews of a sample as it forms: a linear latent-to-RGB map (a VAE folder's
//! `latent_rgb.json`, fitted by `tools/fit_latent_rgb.py` as ComfyUI's latent2rgb factors are),
//! applied to a step's x₀ estimate and encoded as a small PNG for a `node_preview` event. One
//! pixel per latent pixel; a video latent's frames side by side.

use ditflow_plugin::prelude::*;
use std::path::Path;

/// `rgb = Σ_c z_c · weights[c] + bias` per latent pixel, colours in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct LatentRgb {
    weights: Vec<[f32; 3]>,
    bias: [f32; 3],
}

impl LatentRgb {
    /// The first three of `channels` channels as red, green and blue (`z/2 + 1/2`): right for
    /// pixel-space latents in [-1, 1], a rough look at any other.
    pub fn first_channels(channels: usize) -> LatentRgb {
        let weights = (0..channels)
            .map(|c| {
                let mut w = [0.0; 3];
                if c < 3 {
                    w[c] = 0.5;
                }
                w
            })
            .collect();
        LatentRgb {
            weights,
            bias: [0.5; 3],
        }
    }

    /// A node's `preview_map` input: the map in file `path` (relative to the graph's folder), or
    /// for an empty path [`LatentRgb::first_channels`].
    pub fn for_input(ctx: &Context, path: &str, channels: usize) -> Result<LatentRgb> {
        if path.is_empty() {
            return Ok(LatentRgb::first_channels(channels));
        }
        LatentRgb::from_file(&ctx.input_path(path)?, channels)
    }

    /// The map in `file` (`{"weights": [[r, g, b] per channel], "bias": [r, g, b]}`) for a latent
    /// of `channels` channels; errors name the file.
    pub fn from_file(file: &Path, channels: usize) -> Result<LatentRgb> {
        let bad = |why: &str| Error(format!("preview_map {}: {why}", file.display()));
        let text = std::fs::read_to_string(file).map_err(|e| bad(&e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(&format!("not JSON: {e}")))?;
        let triple = |v: &serde_json::Value| -> Option<[f32; 3]> {
            let a = v.as_array().filter(|a| a.len() == 3)?;
            let f = |i: usize| a[i].as_f64().map(|x| x as f32);
            Some([f(0)?, f(1)?, f(2)?])
        };
        let weights: Vec<[f32; 3]> = json["weights"]
            .as_array()
            .ok_or_else(|| bad("no \"weights\" list"))?
            .iter()
            .map(triple)
            .collect::<Option<_>>()
            .ok_or_else(|| bad("each weight must be [r, g, b]"))?;
        if weights.len() != channels {
            return Err(bad(&format!(
                "{} weight rows for a latent of {channels} channels",
                weights.len()
            )));
        }
        let bias = triple(&json["bias"]).ok_or_else(|| bad("\"bias\" must be [r, g, b]"))?;
        Ok(LatentRgb { weights, bias })
    }

    /// The PNG of the first row of latent `x0`: `[B, C, h, w]` one pixel per latent pixel, or a
    /// video's `[B, C, F, h, w]` with its F frames side by side (`F·w` wide).
    pub fn png(&self, x0: &Tensor) -> Result<Vec<u8>> {
        let mut shape = x0.shape().to_vec();
        if !matches!(shape.len(), 4 | 5) {
            bail!(
                "a preview needs a [B, C, H, W] or [B, C, F, H, W] latent, got {:?}",
                x0.shape()
            );
        }
        shape[0] = 1;
        let v = x0.slice(0, 0, 1, 1)?.to_device(Device::Cpu)?.to_f32_vec()?;
        let (w, h, rgb) = self.rgb(&v, &shape[1..]);
        encode_rgb_png(w, h, &rgb)
    }

    /// The colours of one latent `values` of shape `[C, h, w]` or `[C, F, h, w]`: (width, height,
    /// RGB bytes), frames side by side.
    fn rgb(&self, values: &[f32], shape: &[usize]) -> (usize, usize, Vec<u8>) {
        let (c, f, h, w) = match *shape {
            [c, h, w] => (c, 1, h, w),
            [c, f, h, w] => (c, f, h, w),
            _ => unreachable!("checked by png"),
        };
        let (plane, width) = (f * h * w, f * w);
        let mut rgb = vec![0u8; plane * 3];
        for frame in 0..f {
            for y in 0..h {
                for x in 0..w {
                    let p = (frame * h + y) * w + x;
                    let out = (y * width + frame * w + x) * 3;
                    for k in 0..3 {
                        let mut acc = self.bias[k];
                        for (ch, wt) in self.weights.iter().enumerate().take(c) {
                            acc += values[ch * plane + p] * wt[k];
                        }
                        rgb[out + k] = (acc.clamp(0.0, 1.0) * 255.0).round() as u8;
                    }
                }
            }
        }
        (width, h, rgb)
    }
}

/// 8-bit RGB samples (`[height, width, 3]` row-major) as a PNG.
fn encode_rgb_png(width: usize, height: usize, rgb: &[u8]) -> Result<Vec<u8>> {
    let (Ok(w), Ok(h)) = (u32::try_from(width), u32::try_from(height)) else {
        bail!("a {width}×{height} preview is too large for PNG");
    };
    let failed = |e: png::EncodingError| Error(format!("preview PNG encoding failed: {e}"));
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // Previews are small and frequent: the fastest deflate (the default level's set-up costs
    // more than a 16x16 picture's whole encoding).
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header().map_err(failed)?;
    writer.write_image_data(rgb).map_err(failed)?;
    writer.finish().map_err(failed)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pixels of a PNG made here.
    fn decode(png: &[u8]) -> (u32, u32, Vec<u8>) {
        let mut reader = png::Decoder::new(std::io::Cursor::new(png))
            .read_info()
            .expect("a PNG");
        let mut buf = vec![0; reader.output_buffer_size().expect("a size")];
        let info = reader.next_frame(&mut buf).expect("a frame");
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    #[test]
    fn video_frames_lie_side_by_side() {
        // [3, 2, 1, 2]: frame 0 black (-1), frame 1 white (+1), one row of two pixels each.
        let v = [-1.0f32, -1.0, 1.0, 1.0];
        let data: Vec<f32> = (0..3).flat_map(|_| v).collect();
        let (w, h, px) = LatentRgb::first_channels(3).rgb(&data, &[3, 2, 1, 2]);
        assert_eq!((w, h), (4, 1));
        assert_eq!(px, [0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 255, 255]);
        let png = encode_rgb_png(w, h, &px).expect("a PNG");
        assert_eq!(decode(&png), (4, 1, px));
    }

    #[test]
    fn a_map_of_the_wrong_width_names_the_file() {
        let dir = std::env::temp_dir().join(format!("ditflow-preview-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a folder");
        let file = dir.join("latent_rgb.json");
        std::fs::write(&file, r#"{"weights": [[1, 0, 0]], "bias": [0, 0, 0]}"#).expect("written");
        let e = LatentRgb::from_file(&file, 4).expect_err("4 channels, 1 row");
        assert!(
            e.0.contains("latent_rgb.json") && e.0.contains("1 weight rows"),
            "{}",
            e.0
        );
        let map = LatentRgb::from_file(&file, 1).expect("1 channel");
        assert_eq!(map.weights, vec![[1.0, 0.0, 0.0]]);
    }
}
