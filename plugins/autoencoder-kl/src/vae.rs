//! `AutoencoderKL` (diffusers): the convolutional VAE of Stable Diffusion and PixArt. The encoder
//! gives the latent distribution's mean and log-variance; the decoder maps latents to images, whole
//! or in overlapping tiles blended as diffusers' `tiled_decode` does, so large images stay within
//! memory. Latents are scaled by `scaling_factor` and shifted by `shift_factor` from the config.

use ditflow_nn::{Attention, Config, Conv2d, GroupNorm, Weights};
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::{DType, Device, Error, Kind, Result, Tensor};

/// `ResnetBlock2D` without a time embedding.
pub struct ResnetBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(
        w: &Weights,
        p: &str,
        input: usize,
        output: usize,
        groups: usize,
    ) -> Result<ResnetBlock> {
        Ok(ResnetBlock {
            norm1: GroupNorm::load(w, &format!("{p}.norm1"), input, groups, 1e-6)?,
            conv1: Conv2d::load(w, &format!("{p}.conv1"), input, output, 3, 1, 1)?,
            norm2: GroupNorm::load(w, &format!("{p}.norm2"), output, groups, 1e-6)?,
            conv2: Conv2d::load(w, &format!("{p}.conv2"), output, output, 3, 1, 1)?,
            conv_shortcut: if input != output {
                Some(Conv2d::load(
                    w,
                    &format!("{p}.conv_shortcut"),
                    input,
                    output,
                    1,
                    1,
                    0,
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x, "silu")?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h, "silu")?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        skip.add(&h)
    }
}

/// `UNetMidBlock2D`: resnet, single-head spatial self-attention with a residual, resnet.
pub struct MidBlock {
    pub resnet0: ResnetBlock,
    pub attn_norm: GroupNorm,
    pub attn: Attention,
    pub resnet1: ResnetBlock,
}

impl MidBlock {
    fn load(w: &Weights, p: &str, ch: usize, groups: usize) -> Result<MidBlock> {
        Ok(MidBlock {
            resnet0: ResnetBlock::load(w, &format!("{p}.resnets.0"), ch, ch, groups)?,
            attn_norm: GroupNorm::load(
                w,
                &format!("{p}.attentions.0.group_norm"),
                ch,
                groups,
                1e-6,
            )?,
            attn: Attention::load(w, &format!("{p}.attentions.0"), ch, ch, 1, true, false)?,
            resnet1: ResnetBlock::load(w, &format!("{p}.resnets.1"), ch, ch, groups)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.resnet0.forward(x)?;
        let s = x.shape().to_vec();
        let (b, c) = (s[0] as i64, s[1] as i64);
        let tokens = self
            .attn_norm
            .forward(&x, "none")?
            .reshape(&[b, c, -1])?
            .permute(&[0, 2, 1])?;
        let a = self
            .attn
            .forward(&tokens, None, None, LinearDeltas::none())?
            .permute(&[0, 2, 1])?
            .reshape(&[b, c, s[2] as i64, s[3] as i64])?;
        self.resnet1.forward(&x.add(&a)?)
    }
}

pub struct Encoder {
    pub conv_in: Conv2d,
    /// Per level: resnets, then a stride-2 downsampling conv (all levels but the last).
    pub down: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    pub mid: MidBlock,
    pub norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid: MidBlock,
    /// Per level: resnets, then nearest ×2 upsampling and a conv (all levels but the last).
    pub up: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    pub norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

pub struct AutoencoderKL {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
    pub latent_channels: usize,
    pub scaling_factor: f64,
    pub shift_factor: f64,
    /// Image pixels per latent pixel.
    pub downscale: usize,
    pub device: Device,
}

/// One encoder or decoder level: `resnets` ResnetBlocks (`input` → `channels`), then the
/// optional resampling conv `PREFIX.{kind}.0.conv` with `(kind, stride, padding)`.
fn load_level(
    w: &Weights,
    prefix: &str,
    input: usize,
    channels: usize,
    resnets: usize,
    groups: usize,
    resample: Option<(&str, usize, usize)>,
) -> Result<(Vec<ResnetBlock>, Option<Conv2d>)> {
    let blocks = (0..resnets)
        .map(|j| {
            ResnetBlock::load(
                w,
                &format!("{prefix}.resnets.{j}"),
                if j == 0 { input } else { channels },
                channels,
                groups,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let conv = resample
        .map(|(kind, stride, padding)| {
            Conv2d::load(
                w,
                &format!("{prefix}.{kind}.0.conv"),
                channels,
                channels,
                3,
                stride,
                padding,
            )
        })
        .transpose()?;
    Ok((blocks, conv))
}

/// Zero-pads the right and bottom edges by one pixel (diffusers' `Downsample2D` padding).
fn pad_right_bottom(x: &Tensor, device: Device) -> Result<Tensor> {
    let s = x.shape().to_vec();
    let col = Tensor::zeros(Kind::Tensor, DType::F32, &[s[0], s[1], s[2], 1])?.to_device(device)?;
    let x = ditflow_plugin::ops::concat(&[x, &col], 3)?;
    let row =
        Tensor::zeros(Kind::Tensor, DType::F32, &[s[0], s[1], 1, s[3] + 1])?.to_device(device)?;
    ditflow_plugin::ops::concat(&[&x, &row], 2)
}

impl AutoencoderKL {
    pub fn load(cfg: &Config, w: &Weights, device: Device) -> Result<AutoencoderKL> {
        let channels: Vec<usize> = match cfg.json.get("block_out_channels") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().map(|v| v as usize))
                .collect::<Option<_>>(),
            None => Some(vec![64]),
            _ => None,
        }
        .filter(|c: &Vec<usize>| !c.is_empty())
        .ok_or_else(|| {
            Error(format!(
                "{}: \"block_out_channels\" must be a list of integers",
                cfg.path.display()
            ))
        })?;
        if cfg.str_or("act_fn", "silu")? != "silu" {
            return Err(Error(format!(
                "{}: only act_fn \"silu\" is supported",
                cfg.path.display()
            )));
        }
        if !cfg.bool_or("mid_block_add_attention", true)? {
            return Err(Error(format!(
                "{}: mid_block_add_attention = false is not supported",
                cfg.path.display()
            )));
        }
        let layers = cfg.usize_or("layers_per_block", 1)?;
        let groups = cfg.usize_or("norm_num_groups", 32)?;
        let in_ch = cfg.usize_or("in_channels", 3)?;
        let out_ch = cfg.usize_or("out_channels", 3)?;
        let lc = cfg.usize_or("latent_channels", 4)?;
        let levels = channels.len();
        let top = channels[levels - 1];

        let mut down = Vec::new();
        let mut prev = channels[0];
        for (i, &c) in channels.iter().enumerate() {
            let last = i + 1 == levels;
            let p = format!("encoder.down_blocks.{i}");
            // A stride-2 conv (with diffusers' right/bottom padding) below every level but the last.
            down.push(load_level(
                w,
                &p,
                prev,
                c,
                layers,
                groups,
                (!last).then_some(("downsamplers", 2, 0)),
            )?);
            prev = c;
        }
        let encoder = Encoder {
            conv_in: Conv2d::load(w, "encoder.conv_in", in_ch, channels[0], 3, 1, 1)?,
            down,
            mid: MidBlock::load(w, "encoder.mid_block", top, groups)?,
            norm_out: GroupNorm::load(w, "encoder.conv_norm_out", top, groups, 1e-6)?,
            conv_out: Conv2d::load(w, "encoder.conv_out", top, 2 * lc, 3, 1, 1)?,
        };
        let mut up = Vec::new();
        let mut prev = top;
        for (i, &c) in channels.iter().rev().enumerate() {
            let last = i + 1 == levels;
            let p = format!("decoder.up_blocks.{i}");
            // One more resnet than the encoder, then a conv after ×2 upsampling but at the top.
            up.push(load_level(
                w,
                &p,
                prev,
                c,
                layers + 1,
                groups,
                (!last).then_some(("upsamplers", 1, 1)),
            )?);
            prev = c;
        }
        let decoder = Decoder {
            conv_in: Conv2d::load(w, "decoder.conv_in", lc, top, 3, 1, 1)?,
            mid: MidBlock::load(w, "decoder.mid_block", top, groups)?,
            up,
            norm_out: GroupNorm::load(w, "decoder.conv_norm_out", channels[0], groups, 1e-6)?,
            conv_out: Conv2d::load(w, "decoder.conv_out", channels[0], out_ch, 3, 1, 1)?,
        };
        Ok(AutoencoderKL {
            encoder,
            decoder,
            quant_conv: if cfg.bool_or("use_quant_conv", true)? {
                Some(Conv2d::load(w, "quant_conv", 2 * lc, 2 * lc, 1, 1, 0)?)
            } else {
                None
            },
            post_quant_conv: if cfg.bool_or("use_post_quant_conv", true)? {
                Some(Conv2d::load(w, "post_quant_conv", lc, lc, 1, 1, 0)?)
            } else {
                None
            },
            latent_channels: lc,
            scaling_factor: cfg.f64_or("scaling_factor", 0.18215)?,
            shift_factor: cfg.f64_or("shift_factor", 0.0)?,
            downscale: 1 << (levels - 1),
            device,
        })
    }

    /// The latent distribution of images `[B, 3, H, W]` in [-1, 1]: `(mean, logvar)`, each
    /// `[B, latent_channels, H/f, W/f]` (unscaled; logvar clamped to [-30, 20] as diffusers does).
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let e = &self.encoder;
        let mut h = e.conv_in.forward(x)?;
        for (resnets, ds) in &e.down {
            for r in resnets {
                h = r.forward(&h)?;
            }
            if let Some(ds) = ds {
                h = ds.forward(&pad_right_bottom(&h, self.device)?)?;
            }
        }
        h = e.mid.forward(&h)?;
        h = e.conv_out.forward(&e.norm_out.forward(&h, "silu")?)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        let parts = h.split(1, &[self.latent_channels, self.latent_channels])?;
        let logvar = parts[1].clamp(-30.0, 20.0)?;
        Ok((parts[0].clone(), logvar))
    }

    /// Images `[B, 3, H·f, W·f]` from unscaled latents `[B, C, H, W]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let d = &self.decoder;
        let mut h = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        h = d.mid.forward(&d.conv_in.forward(&h)?)?;
        for (resnets, us) in &d.up {
            for r in resnets {
                h = r.forward(&h)?;
            }
            if let Some(us) = us {
                let s = h.shape().to_vec();
                h = us.forward(&h.upsample(2 * s[2], 2 * s[3], "nearest")?)?;
            }
        }
        d.conv_out.forward(&d.norm_out.forward(&h, "silu")?)
    }

    /// diffusers' `tiled_decode`: tiles of `tile` latents overlapping by `overlap` (a fraction),
    /// decoded one by one and blended linearly over the overlap.
    pub fn tiled_decode(&self, z: &Tensor, tile: usize, overlap: f64) -> Result<Tensor> {
        let s = z.shape().to_vec();
        if s.len() != 4 || tile == 0 || !(0.0..1.0).contains(&overlap) {
            return Err(Error(format!(
                "tiled decode of {s:?} with tiles of {tile} and overlap {overlap}"
            )));
        }
        let sample_tile = tile * self.downscale;
        let step = ((tile as f64 * (1.0 - overlap)) as usize).max(1);
        let blend = (sample_tile as f64 * overlap) as usize;
        let limit = sample_tile - blend;
        let mut rows: Vec<Vec<Tensor>> = Vec::new();
        for i in (0..s[2]).step_by(step) {
            let mut row = Vec::new();
            for j in (0..s[3]).step_by(step) {
                let t = z.slice(2, i as i64, (i + tile) as i64, 1)?.slice(
                    3,
                    j as i64,
                    (j + tile) as i64,
                    1,
                )?;
                let mut t = self.decode(&t)?;
                if let Some(above) = rows.last().and_then(|r: &Vec<Tensor>| r.get(row.len())) {
                    t = blend_edge(above, &t, blend, 2, self.device)?;
                }
                if let Some(left) = row.last() {
                    t = blend_edge(left, &t, blend, 3, self.device)?;
                }
                row.push(t);
            }
            rows.push(row);
        }
        let mut out_rows = Vec::new();
        for row in &rows {
            let cropped = row
                .iter()
                .map(|t| t.slice(2, 0, limit as i64, 1)?.slice(3, 0, limit as i64, 1))
                .collect::<Result<Vec<_>>>()?;
            out_rows.push(ditflow_plugin::ops::concat(
                &cropped.iter().collect::<Vec<_>>(),
                3,
            )?);
        }
        ditflow_plugin::ops::concat(&out_rows.iter().collect::<Vec<_>>(), 2)
    }
}

/// diffusers' `blend_v` (axis 2) and `blend_h` (axis 3): the first `extent` rows (columns) of `b`
/// fade in from the last ones of `a`.
fn blend_edge(
    a: &Tensor,
    b: &Tensor,
    extent: usize,
    axis: usize,
    device: Device,
) -> Result<Tensor> {
    let e = extent.min(a.shape()[axis]).min(b.shape()[axis]);
    if e == 0 {
        return Ok(b.clone());
    }
    let na = a.shape()[axis] as i64;
    let tail = a.slice(axis as i64, na - e as i64, na, 1)?;
    let head = b.slice(axis as i64, 0, e as i64, 1)?;
    let rest = b.slice(axis as i64, e as i64, i64::MAX, 1)?;
    let weights: Vec<f32> = (0..e).map(|y| y as f32 / e as f32).collect();
    let mut wshape = vec![1usize; 4];
    wshape[axis] = e;
    let w = Tensor::from_f32(Kind::Tensor, &wshape, &weights)?.to_device(device)?;
    // a·(1 - w) + b·w
    let mixed = tail.add(&head.sub(&tail)?.mul(&w)?)?;
    ditflow_plugin::ops::concat(&[&mixed, &rest], axis as i64)
}
