//! diffusers' `AutoencoderKLWan` (Wan2.1's video VAE), run chunk by chunk exactly as diffusers
//! runs it, since the chunking changes the numbers: the encoder sees the first frame alone and
//! then four frames at a time, the decoder one latent frame at a time, and every causal 3-D
//! convolution keeps the last two frames of its input (`CACHE_T`) for the next chunk. The
//! resamplers have their own rules: a temporal downsampler passes the first chunk through and
//! later convolves the previous chunk's last frame with the new ones (stride 2); a temporal
//! upsampler marks the first chunk (`Rep`) and leaves it unchanged, then doubles later chunks'
//! frames, padding its cache with zeros after a `Rep`.
//!
//! Also: RMS norms over the channels (`F.normalize · √C · γ`), single-head attention per frame in
//! the middle blocks, the quant convolutions, and the decoder's clamp to [-1, 1]. As an
//! autoencoder model its forward takes `video` `[B, 3, frames, H, W]` in [-1, 1] (to `mean` and
//! `logvar`) and `latent` `[B, z, frames, h, w]` (to `decoded`); `LoadWanVAE` reads a diffusers
//! folder. Wan2.2's residual blocks and patchified input are not supported.

use ditflow_nn::{Config, Weights};
use ditflow_plugin::encoder_api::{sorted, Autoencoder, AutoencoderInfo};
use ditflow_plugin::files::{input_path, model_fingerprint};
use ditflow_plugin::model::Inputs;
use ditflow_plugin::ops::concat;
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::collections::HashMap;
use std::path::Path;

/// Frames a causal convolution keeps from its input for the next chunk.
const CACHE_T: usize = 2;

/// One cached convolution's state between chunks.
#[derive(Clone)]
enum Slot {
    Empty,
    /// A temporal upsampler after its first chunk.
    Rep,
    Frames(Tensor),
}

/// The feature cache of one encode or decode: a slot per cached convolution, in call order.
struct Cache {
    slots: Vec<Slot>,
    idx: usize,
}

impl Cache {
    fn slot(&mut self) -> &mut Slot {
        if self.idx >= self.slots.len() {
            self.slots.push(Slot::Empty);
        }
        &mut self.slots[self.idx]
    }
}

fn frames(x: &Tensor) -> usize {
    x.shape()[2]
}

/// Frames `from..to` of `[B, C, T, H, W]`.
fn time_slice(x: &Tensor, from: usize, to: usize) -> Result<Tensor> {
    x.slice(2, from as i64, to as i64, 1)
}

/// `WanCausalConv3d`: zero padding on the left in time (twice the kernel's half-width), the
/// cache's frames taking its place when given.
struct CausalConv3d {
    weight: Tensor,
    bias: Tensor,
    stride: [usize; 3],
    /// `(t, h, w)` padding of the layer; time is padded by `2·t` on the left only.
    pad: [usize; 3],
}

impl CausalConv3d {
    fn load(
        w: &Weights,
        p: &str,
        c_in: usize,
        c_out: usize,
        k: [usize; 3],
        stride: [usize; 3],
        pad: [usize; 3],
    ) -> Result<CausalConv3d> {
        Ok(CausalConv3d {
            weight: w.get(&format!("{p}.weight"), &[c_out, c_in, k[0], k[1], k[2]])?,
            bias: w.get(&format!("{p}.bias"), &[c_out])?,
            stride,
            pad,
        })
    }

    fn cube(w: &Weights, p: &str, c_in: usize, c_out: usize, k: usize) -> Result<CausalConv3d> {
        let pad = k / 2;
        CausalConv3d::load(w, p, c_in, c_out, [k; 3], [1; 3], [pad; 3])
    }

    fn forward(&self, x: &Tensor, cache: Option<&Tensor>) -> Result<Tensor> {
        let mut left = 2 * self.pad[0];
        let mut x = x.clone();
        if let (Some(c), true) = (cache, left > 0) {
            left = left.saturating_sub(frames(c));
            x = concat(&[c, &x], 2)?;
        }
        if left > 0 {
            let mut s = x.shape().to_vec();
            s[2] = left;
            let zeros = Tensor::zeros(Kind::Tensor, DType::F32, &s)?.to_device(x.device())?;
            x = concat(&[&zeros, &x], 2)?;
        }
        x.conv(
            &self.weight,
            Some(&self.bias),
            &self.stride,
            &[0, self.pad[1], self.pad[2]],
            1,
        )
    }

    /// The cached call every causal convolution of a chunked pass makes: its input's last
    /// frames (with the previous cache's last frame when the chunk has one) become the cache.
    fn cached(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let t = frames(x);
        let mut keep = time_slice(x, t.saturating_sub(CACHE_T), t)?;
        let prev = match cache.slot().clone() {
            Slot::Frames(f) => Some(f),
            _ => None,
        };
        if frames(&keep) < CACHE_T {
            if let Some(p) = &prev {
                let n = frames(p);
                keep = concat(&[&time_slice(p, n - 1, n)?, &keep], 2)?;
            }
        }
        let y = self.forward(x, prev.as_ref())?;
        *cache.slot() = Slot::Frames(keep);
        cache.idx += 1;
        Ok(y)
    }
}

/// `WanRMS_norm` over the channel axis 1: `x / ‖x‖ · √C · γ`.
struct RmsNorm {
    gamma: Tensor,
}

impl RmsNorm {
    fn load(w: &Weights, p: &str, c: usize, rank: usize) -> Result<RmsNorm> {
        let mut shape = vec![c];
        shape.extend(std::iter::repeat_n(1, rank - 2));
        Ok(RmsNorm {
            gamma: w.get(&format!("{p}.gamma"), &shape)?.reshape(&[c as i64])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Channels last, the RMS norm (its eps standing for F.normalize's 1e-12 floor), back.
        let r = x.shape().len();
        let mut to_last: Vec<usize> = (0..r).filter(|&a| a != 1).collect();
        to_last.push(1);
        let mut back: Vec<usize> = vec![0, r - 1];
        back.extend(1..r - 1);
        let c = x.shape()[1] as f32;
        x.permute(&to_last)?
            .rms_norm(Some(&self.gamma), 1e-24 / c)?
            .permute(&back)
    }
}

/// A 2-D convolution applied to every frame of `[B, C, T, H, W]`.
struct FrameConv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    pad: usize,
}

impl FrameConv {
    #[allow(clippy::too_many_arguments)]
    fn load(
        w: &Weights,
        p: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<FrameConv> {
        Ok(FrameConv {
            weight: w.get(&format!("{p}.weight"), &[c_out, c_in, k, k])?,
            bias: w.get(&format!("{p}.bias"), &[c_out])?,
            stride,
            pad,
        })
    }

    /// On frames `[B·T, C, H, W]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv(
            &self.weight,
            Some(&self.bias),
            &[self.stride],
            &[self.pad],
            1,
        )
    }
}

/// `[B, C, T, H, W]` → frames `[B·T, C, H, W]` and back.
fn to_frames(x: &Tensor) -> Result<Tensor> {
    let s = x.shape().to_vec();
    x.permute(&[0, 2, 1, 3, 4])?.reshape(&[
        (s[0] * s[2]) as i64,
        s[1] as i64,
        s[3] as i64,
        s[4] as i64,
    ])
}

fn from_frames(x: &Tensor, b: usize) -> Result<Tensor> {
    let s = x.shape().to_vec();
    x.reshape(&[
        b as i64,
        (s[0] / b) as i64,
        s[1] as i64,
        s[2] as i64,
        s[3] as i64,
    ])?
    .permute(&[0, 2, 1, 3, 4])
}

/// `WanResidualBlock`.
struct ResBlock {
    norm1: RmsNorm,
    conv1: CausalConv3d,
    norm2: RmsNorm,
    conv2: CausalConv3d,
    shortcut: Option<CausalConv3d>,
}

impl ResBlock {
    fn load(w: &Weights, p: &str, c_in: usize, c_out: usize) -> Result<ResBlock> {
        Ok(ResBlock {
            norm1: RmsNorm::load(w, &format!("{p}.norm1"), c_in, 5)?,
            conv1: CausalConv3d::cube(w, &format!("{p}.conv1"), c_in, c_out, 3)?,
            norm2: RmsNorm::load(w, &format!("{p}.norm2"), c_out, 5)?,
            conv2: CausalConv3d::cube(w, &format!("{p}.conv2"), c_out, c_out, 3)?,
            shortcut: if c_in != c_out {
                Some(CausalConv3d::cube(
                    w,
                    &format!("{p}.conv_shortcut"),
                    c_in,
                    c_out,
                    1,
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let h = match &self.shortcut {
            Some(s) => s.forward(x, None)?,
            None => x.clone(),
        };
        let y = self.norm1.forward(x)?.unary("silu")?;
        let y = self.conv1.cached(&y, cache)?;
        let y = self.norm2.forward(&y)?.unary("silu")?;
        let y = self.conv2.cached(&y, cache)?;
        y.add(&h)
    }
}

/// `WanAttentionBlock`: single-head attention over each frame's pixels.
struct AttnBlock {
    norm: RmsNorm,
    qkv: FrameConv,
    proj: FrameConv,
    c: usize,
}

impl AttnBlock {
    fn load(w: &Weights, p: &str, c: usize) -> Result<AttnBlock> {
        Ok(AttnBlock {
            norm: RmsNorm::load(w, &format!("{p}.norm"), c, 4)?,
            qkv: FrameConv::load(w, &format!("{p}.to_qkv"), c, 3 * c, 1, 1, 0)?,
            proj: FrameConv::load(w, &format!("{p}.proj"), c, c, 1, 1, 0)?,
            c,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.shape().to_vec();
        let (b, h, w) = (s[0], s[3], s[4]);
        let f = to_frames(x)?;
        let bt = f.shape()[0];
        let qkv = self.qkv.forward(&self.norm.forward(&f)?)?;
        // [BT, 3C, HW] → [BT, 1, HW, 3C], split into q, k, v.
        let qkv = qkv
            .reshape(&[bt as i64, 3 * self.c as i64, (h * w) as i64])?
            .permute(&[0, 2, 1])?
            .reshape(&[bt as i64, 1, (h * w) as i64, 3 * self.c as i64])?;
        let parts = qkv.split(3, &[self.c, self.c, self.c])?;
        let o = ditflow_plugin::ops::attention(&parts[0], &parts[1], &parts[2], None, None)?;
        let o = o
            .reshape(&[bt as i64, (h * w) as i64, self.c as i64])?
            .permute(&[0, 2, 1])?
            .reshape(&[bt as i64, self.c as i64, h as i64, w as i64])?;
        from_frames(&self.proj.forward(&o)?, b)?.add(x)
    }
}

/// `WanResample`.
enum Resample {
    Down2d(FrameConv),
    Down3d(FrameConv, CausalConv3d),
    Up2d(FrameConv),
    Up3d(FrameConv, CausalConv3d),
}

impl Resample {
    fn load(w: &Weights, p: &str, c: usize, mode: &str) -> Result<Resample> {
        let conv = |out: usize, stride: usize, pad: usize| {
            FrameConv::load(w, &format!("{p}.resample.1"), c, out, 3, stride, pad)
        };
        let time = |out: usize, stride: usize, pad: usize| {
            CausalConv3d::load(
                w,
                &format!("{p}.time_conv"),
                c,
                out,
                [3, 1, 1],
                [stride, 1, 1],
                [pad, 0, 0],
            )
        };
        Ok(match mode {
            "downsample2d" => Resample::Down2d(conv(c, 2, 0)?),
            "downsample3d" => Resample::Down3d(conv(c, 2, 0)?, time(c, 2, 0)?),
            "upsample2d" => Resample::Up2d(conv(c / 2, 1, 1)?),
            _ => Resample::Up3d(conv(c / 2, 1, 1)?, time(2 * c, 1, 1)?),
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let s = x.shape().to_vec();
        let (b, c) = (s[0], s[1]);
        let mut x = x.clone();
        if let Resample::Up3d(_, time_conv) = self {
            match cache.slot().clone() {
                Slot::Empty => {
                    *cache.slot() = Slot::Rep;
                    cache.idx += 1;
                }
                prev => {
                    let t = frames(&x);
                    let mut keep = time_slice(&x, t.saturating_sub(CACHE_T), t)?;
                    if frames(&keep) < CACHE_T {
                        let head = match &prev {
                            Slot::Frames(p) => {
                                let n = frames(p);
                                time_slice(p, n - 1, n)?
                            }
                            _ => keep.affine(0.0, 0.0)?,
                        };
                        keep = concat(&[&head, &keep], 2)?;
                    }
                    let y = match &prev {
                        Slot::Frames(p) => time_conv.forward(&x, Some(p))?,
                        _ => time_conv.forward(&x, None)?,
                    };
                    *cache.slot() = Slot::Frames(keep);
                    cache.idx += 1;
                    // [B, 2C, T, H, W] → the two halves interleaved in time.
                    let (t, h, w) = (s[2] as i64, s[3] as i64, s[4] as i64);
                    let y = y
                        .reshape(&[b as i64, 2, c as i64, t, h, w])?
                        .permute(&[0, 2, 3, 1, 4, 5])?;
                    x = y.reshape(&[b as i64, c as i64, 2 * t, h, w])?;
                }
            }
        }
        let f = to_frames(&x)?;
        let f = match self {
            Resample::Down2d(conv) | Resample::Down3d(conv, _) => {
                // ZeroPad2d((0, 1, 0, 1)): one zero column on the right, one row at the bottom.
                let fs = f.shape().to_vec();
                let dev = f.device();
                let col = Tensor::zeros(Kind::Tensor, DType::F32, &[fs[0], fs[1], fs[2], 1])?
                    .to_device(dev)?;
                let f = concat(&[&f, &col], 3)?;
                let row = Tensor::zeros(Kind::Tensor, DType::F32, &[fs[0], fs[1], 1, fs[3] + 1])?
                    .to_device(dev)?;
                conv.forward(&concat(&[&f, &row], 2)?)?
            }
            Resample::Up2d(conv) | Resample::Up3d(conv, _) => {
                let fs = f.shape().to_vec();
                conv.forward(&f.upsample(2 * fs[2], 2 * fs[3], "nearest")?)?
            }
        };
        let mut x = from_frames(&f, b)?;
        if let Resample::Down3d(_, time_conv) = self {
            match cache.slot().clone() {
                Slot::Frames(p) => {
                    let t = frames(&x);
                    let keep = time_slice(&x, t - 1, t)?;
                    let n = frames(&p);
                    x = time_conv.forward(&concat(&[&time_slice(&p, n - 1, n)?, &x], 2)?, None)?;
                    *cache.slot() = Slot::Frames(keep);
                }
                _ => *cache.slot() = Slot::Frames(x.clone()),
            }
            cache.idx += 1;
        }
        Ok(x)
    }
}

/// A stage of the encoder or decoder, in call order.
enum Layer {
    Res(Box<ResBlock>),
    Attn(AttnBlock),
    Resample(Resample),
}

impl Layer {
    fn forward(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        match self {
            Layer::Res(r) => r.forward(x, cache),
            Layer::Attn(a) => a.forward(x),
            Layer::Resample(r) => r.forward(x, cache),
        }
    }
}

/// `WanMidBlock` (one attention between two residual blocks).
fn mid_block(w: &Weights, p: &str, c: usize) -> Result<Vec<Layer>> {
    Ok(vec![
        Layer::Res(Box::new(ResBlock::load(
            w,
            &format!("{p}.resnets.0"),
            c,
            c,
        )?)),
        Layer::Attn(AttnBlock::load(w, &format!("{p}.attentions.0"), c)?),
        Layer::Res(Box::new(ResBlock::load(
            w,
            &format!("{p}.resnets.1"),
            c,
            c,
        )?)),
    ])
}

/// The encoder or the decoder: a cached input convolution, the layers, the RMS norm and SiLU,
/// a cached output convolution.
struct Coder {
    conv_in: CausalConv3d,
    layers: Vec<Layer>,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Coder {
    fn forward(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        cache.idx = 0;
        let mut x = self.conv_in.cached(x, cache)?;
        for l in &self.layers {
            x = l.forward(&x, cache)?;
        }
        let x = self.norm_out.forward(&x)?.unary("silu")?;
        self.conv_out.cached(&x, cache)
    }
}

/// A loaded `AutoencoderKLWan` (Wan2.1).
pub struct WanVae {
    encoder: Coder,
    decoder: Coder,
    quant_conv: CausalConv3d,
    post_quant_conv: CausalConv3d,
    pub z_dim: usize,
    pub spatial: usize,
    device: Device,
}

impl Object for WanVae {
    const TAG: &'static str = "ditflow-wan.vae";
}

impl WanVae {
    pub fn load(path: &Path, device: Device, ctx: &Context) -> Result<WanVae> {
        let cfg = Config::read(path)?;
        let bad = |what: String| Error(format!("{}: {what}", cfg.path.display()));
        if cfg.class_name() != Some("AutoencoderKLWan") {
            return Err(bad(format!(
                "class \"{}\" is not an AutoencoderKLWan",
                cfg.class_name().unwrap_or("")
            )));
        }
        if cfg.bool_or("is_residual", false)?
            || cfg.json.get("patch_size").is_some_and(|v| !v.is_null())
        {
            return Err(bad(
                "Wan2.2's residual VAE (is_residual, patch_size) is not supported yet".into(),
            ));
        }
        let list = |key: &str| -> Option<Vec<Option<f64>>> {
            cfg.json
                .get(key)?
                .as_array()
                .map(|a| a.iter().map(|v| v.as_f64()).collect())
        };
        let ints = |key: &str, default: &[usize]| -> Result<Vec<usize>> {
            match list(key) {
                None => Ok(default.to_vec()),
                Some(v) => v
                    .iter()
                    .map(|n| {
                        n.filter(|f| *f >= 0.0 && f.fract() == 0.0)
                            .map(|f| f as usize)
                    })
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad(format!("{key} must be a list of integers"))),
            }
        };
        let base = cfg.usize_or("base_dim", 96)?;
        let dec_base = cfg.opt_usize("decoder_base_dim")?.unwrap_or(base);
        let z = cfg.usize_or("z_dim", 16)?;
        let mult = ints("dim_mult", &[1, 2, 4, 4])?;
        let n_res = cfg.usize_or("num_res_blocks", 2)?;
        let attn_scales: Vec<f64> = list("attn_scales")
            .unwrap_or_default()
            .into_iter()
            .flatten()
            .collect();
        let temporal: Vec<bool> = match cfg.json.get("temperal_downsample") {
            None => vec![false, true, true],
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_bool()).collect())
                .ok_or_else(|| bad("temperal_downsample must be a list of booleans".into()))?,
        };
        let (cin, cout) = (
            cfg.usize_or("in_channels", 3)?,
            cfg.usize_or("out_channels", 3)?,
        );
        if mult.is_empty() || temporal.len() + 1 < mult.len() {
            return Err(bad(format!(
                "{} temporal flags for {} stages",
                temporal.len(),
                mult.len()
            )));
        }
        let w = Weights::load(ctx, path, device)?;
        // Encoder.
        let dims: Vec<usize> = std::iter::once(1)
            .chain(mult.iter().copied())
            .map(|m| base * m)
            .collect();
        let mut layers = Vec::new();
        let mut scale = 1.0;
        let mut i_layer = 0;
        let n = mult.len();
        for i in 0..n {
            let (mut c_in, c_out) = (dims[i], dims[i + 1]);
            for _ in 0..n_res {
                let p = format!("encoder.down_blocks.{i_layer}");
                layers.push(Layer::Res(Box::new(ResBlock::load(&w, &p, c_in, c_out)?)));
                i_layer += 1;
                if attn_scales.contains(&scale) {
                    let p = format!("encoder.down_blocks.{i_layer}");
                    layers.push(Layer::Attn(AttnBlock::load(&w, &p, c_out)?));
                    i_layer += 1;
                }
                c_in = c_out;
            }
            if i != n - 1 {
                let mode = if temporal[i] {
                    "downsample3d"
                } else {
                    "downsample2d"
                };
                let p = format!("encoder.down_blocks.{i_layer}");
                layers.push(Layer::Resample(Resample::load(&w, &p, c_out, mode)?));
                i_layer += 1;
                scale /= 2.0;
            }
        }
        let top = dims[n];
        layers.extend(mid_block(&w, "encoder.mid_block", top)?);
        let encoder = Coder {
            conv_in: CausalConv3d::cube(&w, "encoder.conv_in", cin, dims[0], 3)?,
            layers,
            norm_out: RmsNorm::load(&w, "encoder.norm_out", top, 5)?,
            conv_out: CausalConv3d::cube(&w, "encoder.conv_out", top, 2 * z, 3)?,
        };
        // Decoder: the stages reversed, the temporal flags too.
        let upsample: Vec<bool> = temporal.iter().rev().copied().collect();
        let ddims: Vec<usize> = std::iter::once(mult[n - 1])
            .chain(mult.iter().rev().copied())
            .map(|m| dec_base * m)
            .collect();
        let mut layers = mid_block(&w, "decoder.mid_block", ddims[0])?;
        for i in 0..n {
            let (mut c_in, c_out) = (ddims[i], ddims[i + 1]);
            if i > 0 {
                c_in /= 2;
            }
            for j in 0..=n_res {
                let p = format!("decoder.up_blocks.{i}.resnets.{j}");
                layers.push(Layer::Res(Box::new(ResBlock::load(&w, &p, c_in, c_out)?)));
                c_in = c_out;
            }
            if i != n - 1 {
                let mode = if upsample[i] {
                    "upsample3d"
                } else {
                    "upsample2d"
                };
                let p = format!("decoder.up_blocks.{i}.upsamplers.0");
                layers.push(Layer::Resample(Resample::load(&w, &p, c_out, mode)?));
            }
        }
        let last = ddims[n];
        let decoder = Coder {
            conv_in: CausalConv3d::cube(&w, "decoder.conv_in", z, ddims[0], 3)?,
            layers,
            norm_out: RmsNorm::load(&w, "decoder.norm_out", last, 5)?,
            conv_out: CausalConv3d::cube(&w, "decoder.conv_out", last, cout, 3)?,
        };
        Ok(WanVae {
            encoder,
            decoder,
            quant_conv: CausalConv3d::cube(&w, "quant_conv", 2 * z, 2 * z, 1)?,
            post_quant_conv: CausalConv3d::cube(&w, "post_quant_conv", z, z, 1)?,
            z_dim: z,
            spatial: 1 << (n - 1),
            device,
        })
    }

    /// `(mean, logvar)` of a video `[B, 3, T, H, W]`: the first frame alone, then four at a
    /// time, through one feature cache.
    pub fn encode(&self, video: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = video.to_device(self.device)?;
        let s = x.shape().to_vec();
        if s.len() != 5 || s[2] == 0 || s[3] % self.spatial != 0 || s[4] % self.spatial != 0 {
            bail!(
                "Wan VAE: the video must be [B, C, frames, H, W] with H and W multiples of {}, \
                 got {s:?}",
                self.spatial
            );
        }
        let mut cache = Cache {
            slots: Vec::new(),
            idx: 0,
        };
        // As diffusers: 1 + (T − 1) // 4 chunks (frames past the last whole chunk are dropped).
        let chunks = 1 + (s[2] - 1) / 4;
        let mut outs = vec![self.encoder.forward(&time_slice(&x, 0, 1)?, &mut cache)?];
        for i in 1..chunks {
            let part = time_slice(&x, 1 + 4 * (i - 1), 1 + 4 * i)?;
            outs.push(self.encoder.forward(&part, &mut cache)?);
        }
        let refs: Vec<&Tensor> = outs.iter().collect();
        let h = self.quant_conv.forward(&concat(&refs, 2)?, None)?;
        let parts = h.split(1, &[self.z_dim, self.z_dim])?;
        Ok((parts[0].clone(), parts[1].clamp(-30.0, 20.0)?))
    }

    /// A video `[B, 3, frames, H, W]` in [-1, 1] of a latent `[B, z, t, h, w]`, one latent
    /// frame at a time.
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        let z = latent.to_device(self.device)?;
        let s = z.shape().to_vec();
        if s.len() != 5 || s[1] != self.z_dim || s[2] == 0 {
            bail!(
                "Wan VAE: the latent must be [B, {}, frames, h, w], got {s:?}",
                self.z_dim
            );
        }
        let x = self.post_quant_conv.forward(&z, None)?;
        let mut cache = Cache {
            slots: Vec::new(),
            idx: 0,
        };
        let outs: Vec<Tensor> = (0..s[2])
            .map(|i| self.decoder.forward(&time_slice(&x, i, i + 1)?, &mut cache))
            .collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = outs.iter().collect();
        concat(&refs, 2)?.clamp(-1.0, 1.0)
    }
}

impl Autoencoder for WanVae {
    fn describe(&self) -> AutoencoderInfo {
        AutoencoderInfo {
            latent_channels: self.z_dim,
            downscale: self.spatial,
            scaling_factor: 1.0,
            shift_factor: 0.0,
        }
    }

    fn forward(&self, inputs: &Inputs) -> Result<Vec<(String, Tensor)>> {
        let mut out = HashMap::new();
        if let Some(v) = inputs.get("video") {
            let (mean, logvar) = self.encode(v)?;
            out.insert("mean".to_string(), mean);
            out.insert("logvar".to_string(), logvar);
        }
        if let Some(z) = inputs.get("latent") {
            out.insert("decoded".to_string(), self.decode(z)?);
        }
        if out.is_empty() {
            bail!("Wan VAE: give 'video' to encode or 'latent' to decode");
        }
        Ok(sorted(out))
    }
}

/// `LoadWanVAE`: a diffusers `AutoencoderKLWan` folder.
#[derive(Default)]
pub struct LoadWanVAE;

impl Node for LoadWanVAE {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadWanVAE")
            .category("loaders")
            .doc(
                "Loads Wan2.1's video VAE: a diffusers AutoencoderKLWan folder. As a model its \
                 forward takes video [B, 3, frames, H, W] in [-1, 1] (giving mean and logvar) \
                 and latent [B, z, frames, h, w] (giving decoded), run chunk by chunk with the \
                 causal convolutions' feature cache exactly as diffusers runs it.",
            )
            .input(
                Port::new("path", "String")
                    .doc("The VAE folder; a relative path is taken from the graph's folder."),
            )
            .output(Port::new("vae", "Model<Autoencoder>").doc("The VAE."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = input_path(ctx, "path")?;
        let vae = WanVae::load(&dir, ctx.device(), ctx)?;
        let value = ctx.make_autoencoder(vae)?;
        ctx.set_output("vae", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        model_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}

/// `DecodeVideo`: a Wan latent as video frames.
#[derive(Default)]
pub struct DecodeVideo;

impl Node for DecodeVideo {
    fn schema() -> NodeSchema {
        NodeSchema::new("DecodeVideo")
            .category("video")
            .doc("Decodes a Wan video latent [1, z, t, h, w] with the Wan VAE into frames [frames, H, W, 3] in [0, 1] (the first of a batch) at the given frame rate.")
            .input(Port::new("vae", "Model<Autoencoder>").doc("From LoadWanVAE."))
            .input(Port::new("latent", "Latent").doc("The latent."))
            .input(Port::new("fps", "Float").default(16.0).range(0.001, 1000.0).doc("The frame rate (Wan2.1: 16)."))
            .output(Port::new("video", "Video").doc("The frames with their rate."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let v: Value = ctx.input("vae")?;
        let vae = v
            .as_object::<WanVae>()
            .map_err(|e| Error(format!("input 'vae': {e} (load it with LoadWanVAE)")))?;
        let latent: Tensor = ctx.input("latent")?;
        let fps: f64 = ctx.input("fps")?;
        let y = vae.decode(&latent)?;
        let s = y.shape().to_vec();
        // [1, 3, T, H, W] in [-1, 1] → [T, H, W, 3] in [0, 1].
        let frames = y
            .slice(0, 0, 1, 1)?
            .reshape(&[s[1] as i64, s[2] as i64, s[3] as i64, s[4] as i64])?
            .permute(&[1, 2, 3, 0])?
            .affine(0.5, 0.5)?
            .clamp(0.0, 1.0)?
            .to_device(Device::Cpu)?;
        ctx.set_output("video", ditflow_plugin::Video::new(frames, fps)?)
    }
}
