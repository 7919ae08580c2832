//! `CLIPVisionModelWithProjection` (transformers): the picture cut into patches by a
//! convolution, a class token and learned positions, a pre-norm, the encoder layers (no mask),
//! the class token's post-norm as the pooled output, and its projection as the image embedding.
//! Its preprocessing is CLIPImageProcessor's: the shortest side resized to the model's size
//! (bicubic), the centre cropped, scaled and normalised by CLIP's mean and deviation.
//! `LoadImageEncoder` reads a folder; `CLIPVisionEncode` turns an image into `image_embeds`.

use crate::clip::{activation, layer_norm, Layer};
use ditflow_nn::image::{resize, Filter, Pixels};
use ditflow_nn::{Config, Linear, Weights};
use ditflow_plugin::files::{folder_fingerprint, input_path};
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::path::{Path, PathBuf};

/// A loaded CLIP vision tower with its projection.
pub struct ClipVision {
    pub patch_embedding: Tensor,
    pub class_embedding: Tensor,
    pub position_embedding: Tensor,
    pub pre_norm: (Tensor, Tensor),
    pub layers: Vec<Layer>,
    pub post_norm: (Tensor, Tensor),
    pub projection: Linear,
    pub image_size: usize,
    pub patch: usize,
    pub heads: usize,
    pub eps: f32,
    pub activation: &'static str,
    /// CLIPImageProcessor's normalisation.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub dir: PathBuf,
    pub device: Device,
}

impl Object for ClipVision {
    const TAG: &'static str = "ditflow-t5-clip.vision";
}

/// The outputs of one forward.
pub struct VisionOutput {
    /// `[B, 1 + patches, D]`.
    pub last_hidden_state: Tensor,
    /// `[B, P]`.
    pub image_embeds: Tensor,
    /// `[B, 1 + patches, D]`: the input of the last layer (`hidden_states[-2]`).
    pub penultimate_hidden_state: Tensor,
}

impl ClipVision {
    pub fn load(dir: &Path, device: Device, ctx: &Context) -> Result<ClipVision> {
        let cfg = Config::read(dir)?;
        if cfg.class_name() != Some("CLIPVisionModelWithProjection") {
            bail!(
                "{}: class \"{}\" is not a CLIPVisionModelWithProjection",
                cfg.path.display(),
                cfg.class_name().unwrap_or("")
            );
        }
        // Hub configs nest the tower's settings under vision_config.
        let vcfg = match cfg.json.get("vision_config") {
            Some(v) if v.is_object() => Config {
                path: cfg.path.clone(),
                json: v.clone(),
            },
            _ => Config {
                path: cfg.path.clone(),
                json: cfg.json.clone(),
            },
        };
        let d = vcfg.usize_or("hidden_size", 768)?;
        let ff = vcfg.usize_or("intermediate_size", 3072)?;
        let heads = vcfg.usize_or("num_attention_heads", 12)?;
        let n_layers = vcfg.usize_or("num_hidden_layers", 12)?;
        let image_size = vcfg.usize_or("image_size", 224)?;
        let patch = vcfg.usize_or("patch_size", 32)?;
        let channels = vcfg.usize_or("num_channels", 3)?;
        let proj = vcfg
            .opt_usize("projection_dim")?
            .or(cfg.opt_usize("projection_dim")?)
            .unwrap_or(512);
        if heads == 0 || d % heads != 0 || patch == 0 || image_size % patch != 0 || channels != 3 {
            bail!(
                "{}: a vision tower of width {d}, {heads} heads, {channels} channels and \
                 {image_size}-pixel images in {patch}-pixel patches is not supported",
                cfg.path.display()
            );
        }
        let w = Weights::load(ctx, dir, device)?;
        let vm = "vision_model";
        let positions = (image_size / patch).pow(2) + 1;
        let (mean, std) = processor_normalisation(dir);
        Ok(ClipVision {
            patch_embedding: w.get(
                &format!("{vm}.embeddings.patch_embedding.weight"),
                &[d, 3, patch, patch],
            )?,
            class_embedding: w.get(&format!("{vm}.embeddings.class_embedding"), &[d])?,
            position_embedding: w.get(
                &format!("{vm}.embeddings.position_embedding.weight"),
                &[positions, d],
            )?,
            pre_norm: layer_norm(&w, &format!("{vm}.pre_layrnorm"), d)?,
            layers: (0..n_layers)
                .map(|i| Layer::load(&w, &format!("{vm}.encoder.layers.{i}"), d, ff))
                .collect::<Result<_>>()?,
            post_norm: layer_norm(&w, &format!("{vm}.post_layernorm"), d)?,
            projection: w.linear("visual_projection", d, proj, false)?,
            image_size,
            patch,
            heads,
            eps: vcfg.f64_or("layer_norm_eps", 1e-5)? as f32,
            activation: activation(&vcfg)?,
            mean,
            std,
            dir: dir.to_path_buf(),
            device,
        })
    }

    /// One forward of normalised pixels `[B, 3, S, S]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<VisionOutput> {
        let s = pixels.shape().to_vec();
        if s.len() != 4 || s[1] != 3 || s[2] != self.image_size || s[3] != self.image_size {
            bail!(
                "CLIP vision: pixel_values must be [B, 3, {0}, {0}], got {s:?}",
                self.image_size
            );
        }
        let b = s[0] as i64;
        let d = self.class_embedding.shape()[0] as i64;
        let x = pixels.to_device(self.device)?;
        let patches = x
            .conv(&self.patch_embedding, None, &[self.patch], &[0], 1)?
            .reshape(&[b, d, -1])?
            .permute(&[0, 2, 1])?;
        let cls = self.class_embedding.reshape(&[1, 1, d])?;
        let cls = ditflow_plugin::ops::concat(&vec![&cls; b as usize], 0)?;
        let x = ditflow_plugin::ops::concat(&[&cls, &patches], 1)?.add(&self.position_embedding)?;
        let mut x = x.layer_norm(
            Some(&self.pre_norm.0),
            Some(&self.pre_norm.1),
            None,
            None,
            self.eps,
        )?;
        let mut penultimate = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = x.clone();
            }
            x = layer.forward(&x, None, self.heads, self.eps, self.activation)?;
        }
        let pooled = x.slice(1, 0, 1, 1)?.reshape(&[b, d])?.layer_norm(
            Some(&self.post_norm.0),
            Some(&self.post_norm.1),
            None,
            None,
            self.eps,
        )?;
        Ok(VisionOutput {
            image_embeds: self.projection.forward(&pooled, "none")?,
            last_hidden_state: x,
            penultimate_hidden_state: penultimate,
        })
    }

    /// CLIPImageProcessor on an image `[H, W, 3]` in [0, 1]: the shortest side to the model's
    /// size (bicubic), the centre crop, then `(x - mean) / std`; `[1, 3, S, S]`.
    pub fn preprocess(&self, image: &Tensor) -> Result<Tensor> {
        let s = self.image_size;
        let p = Pixels::from_tensor(image)?;
        let (h, w) = (p.h as f64, p.w as f64);
        let scale = s as f64 / h.min(w);
        let (nh, nw) = ((h * scale).round() as usize, (w * scale).round() as usize);
        let r = resize(&p, nw.max(s), nh.max(s), Filter::Bicubic);
        let (top, left) = ((r.h - s) / 2, (r.w - s) / 2);
        let mut out = vec![0f32; 3 * s * s];
        for c in 0..3 {
            for y in 0..s {
                for x in 0..s {
                    let v = r.data[((top + y) * r.w + left + x) * r.c + c.min(r.c - 1)];
                    out[(c * s + y) * s + x] = (v - self.mean[c]) / self.std[c];
                }
            }
        }
        Tensor::from_f32(Kind::Tensor, &[1, 3, s, s], &out)
    }
}

/// The mean and deviation in `preprocessor_config.json` beside the model (or one folder up, as
/// a pipeline's `feature_extractor/` holds it), else CLIP's.
fn processor_normalisation(dir: &Path) -> ([f32; 3], [f32; 3]) {
    let clip = (
        [0.481_454_66, 0.457_827_5, 0.408_210_73],
        [0.268_629_54, 0.261_302_6, 0.275_777_1],
    );
    let read = |p: PathBuf| -> Option<([f32; 3], [f32; 3])> {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
        let three = |k: &str| -> Option<[f32; 3]> {
            let a = json.get(k)?.as_array()?;
            Some([
                a.first()?.as_f64()? as f32,
                a.get(1)?.as_f64()? as f32,
                a.get(2)?.as_f64()? as f32,
            ])
        };
        Some((three("image_mean")?, three("image_std")?))
    };
    read(dir.join("preprocessor_config.json")).unwrap_or(clip)
}

/// `LoadImageEncoder`: a transformers CLIP vision folder.
#[derive(Default)]
pub struct LoadImageEncoder;

impl Node for LoadImageEncoder {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadImageEncoder")
            .category("loaders")
            .doc(
                "Loads a transformers CLIPVisionModelWithProjection folder (an IP-Adapter's \
                 image_encoder), with the mean and deviation of a preprocessor_config.json beside \
                 it (CLIP's otherwise). Cached until a file in the folder changes.",
            )
            .input(
                Port::new("path", "String")
                    .doc("The folder; a relative path is taken from the graph's folder."),
            )
            .output(Port::new("encoder", "Model").doc("The image encoder, for CLIPVisionEncode."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = input_path(ctx, "path")?;
        let enc = ClipVision::load(&dir, ctx.device(), ctx)?;
        let v = ctx.make_object(enc)?;
        ctx.set_output("encoder", v)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        folder_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}

/// `CLIPVisionEncode`: an image as CLIP image embeddings.
#[derive(Default)]
pub struct ClipVisionEncode;

impl Node for ClipVisionEncode {
    fn schema() -> NodeSchema {
        NodeSchema::new("CLIPVisionEncode")
            .category("conditioning")
            .doc(
                "Encodes an image with a CLIP vision tower as an IP-Adapter pipeline does: \
                 CLIPImageProcessor's preprocessing (shortest side to the model's size, bicubic; \
                 centre crop; CLIP normalisation), then the projected image embedding \
                 (image_embeds) and the penultimate layer's tokens.",
            )
            .input(Port::new("encoder", "Model").doc("From LoadImageEncoder."))
            .input(Port::new("image", "Image").doc("[height, width, 3] in [0, 1]."))
            .output(Port::new("image_embeds", "Tensor").doc("[1, projection_dim]."))
            .output(
                Port::new("hidden_states", "Tensor")
                    .doc("[1, 1 + patches, width]: the penultimate layer's tokens."),
            )
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let enc: Value = ctx.input("encoder")?;
        let enc = enc.as_object::<ClipVision>().map_err(|e| {
            Error(format!(
                "input 'encoder': {e} (load it with LoadImageEncoder)"
            ))
        })?;
        let image: Tensor = ctx.input("image")?;
        let out = enc.forward(&enc.preprocess(&image)?)?;
        ctx.set_output("image_embeds", out.image_embeds)?;
        ctx.set_output("hidden_states", out.penultimate_hidden_state)
    }
}
