//! diffusers' `AutoencoderOobleck`, Stable Audio's waveform VAE: weight-normalised 1-D
//! convolutions (the norms folded into plain weights at load: `g · v / ‖v‖` over every axis but
//! the first, which for a transposed convolution is its *input* channels), Snake activations
//! (`x + sin²(αx) / (β + 1e-9)`, α and β stored as logarithms), residual units with dilations 1,
//! 3 and 9, strided encoder blocks and transposed-convolution decoder blocks (run as a
//! convolution over the zero-stuffed input with the flipped kernel). The encoder's output halves
//! are the latent mean and the scale, `std = softplus(scale) + 1e-4`.
//!
//! As an autoencoder model its forward takes `audio` `[B, channels, samples]` (to `mean` and
//! `std`) and `latent` `[B, C, frames]` (to `decoded`). `LoadOobleck` reads a diffusers folder.

use ditflow_nn::{Config, Weights};
use ditflow_plugin::encoder_api::{sorted, Autoencoder, AutoencoderInfo};
use ditflow_plugin::files::{input_path, model_fingerprint};
use ditflow_plugin::model::Inputs;
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::collections::HashMap;
use std::path::Path;

/// A folded weight-normalised convolution (1-D).
struct Conv1d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    dilation: usize,
}

impl Conv1d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv_dilated(
            &self.weight,
            self.bias.as_ref(),
            &[self.stride],
            &[self.padding],
            &[self.dilation],
            1,
        )
    }
}

/// A `ConvTranspose1d` as a convolution: the input stuffed with `stride − 1` zeros between
/// samples, padded by `k − 1 − padding`, convolved with the flipped kernel `[out, in, k]`.
struct ConvTranspose1d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    pad: usize,
}

impl ConvTranspose1d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.shape().to_vec();
        let (b, c, l) = (s[0], s[1], s[2]);
        let stuffed = if self.stride > 1 {
            let zeros = Tensor::zeros(Kind::Tensor, DType::F32, &[b, c, l, self.stride - 1])?
                .to_device(x.device())?;
            let x4 = x.reshape(&[b as i64, c as i64, l as i64, 1])?;
            ditflow_plugin::ops::concat(&[&x4, &zeros], 3)?
                .reshape(&[b as i64, c as i64, (l * self.stride) as i64])?
                .slice(2, 0, ((l - 1) * self.stride + 1) as i64, 1)?
        } else {
            x.clone()
        };
        stuffed.conv(&self.weight, Some(&self.bias), &[1], &[self.pad], 1)
    }
}

/// `Snake1d` with its per-channel α and 1/(β + 1e-9), `[1, C, 1]`.
struct Snake {
    alpha: Tensor,
    inv_beta: Tensor,
}

impl Snake {
    fn load(w: &Weights, p: &str, c: usize) -> Result<Snake> {
        let alpha = w.get(&format!("{p}.alpha"), &[1, c, 1])?;
        let device = alpha.device();
        let alpha: Vec<f32> = alpha.to_f32_vec()?.iter().map(|a| a.exp()).collect();
        let inv_beta: Vec<f32> = w
            .get(&format!("{p}.beta"), &[1, c, 1])?
            .to_f32_vec()?
            .iter()
            .map(|b| 1.0 / (b.exp() + 1e-9))
            .collect();
        let t = |v: &[f32]| -> Result<Tensor> {
            Tensor::from_f32(Kind::Tensor, &[1, c, 1], v)?.to_device(device)
        };
        Ok(Snake {
            alpha: t(&alpha)?,
            inv_beta: t(&inv_beta)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.mul(&self.alpha)?
            .unary("sin")?
            .unary("square")?
            .mul(&self.inv_beta)?
            .add(x)
    }
}

/// `g · v / ‖v‖`, the norm over every axis but the first, as a tensor of `shape` on the
/// weights' device (or its values reordered by `arrange` first).
fn fold_weight_norm(
    w: &Weights,
    p: &str,
    shape: &[usize],
    arrange: impl Fn(&[f32]) -> (Vec<usize>, Vec<f32>),
) -> Result<Tensor> {
    let v = w.get(&format!("{p}.weight_v"), shape)?;
    let device = v.device();
    let v = v.to_f32_vec()?;
    let g = w
        .get(&format!("{p}.weight_g"), &[shape[0], 1, 1])?
        .to_f32_vec()?;
    let per = v.len() / shape[0];
    let mut out = Vec::with_capacity(v.len());
    for (row, gain) in v.chunks_exact(per).zip(&g) {
        let norm = row
            .iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt();
        out.extend(
            row.iter()
                .map(|x| (f64::from(*x) * f64::from(*gain) / norm) as f32),
        );
    }
    let (shape, values) = arrange(&out);
    Tensor::from_f32(Kind::Tensor, &shape, &values)?.to_device(device)
}

#[allow(clippy::too_many_arguments)]
fn conv(
    w: &Weights,
    p: &str,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
    bias: bool,
) -> Result<Conv1d> {
    let shape = [c_out, c_in, k];
    let weight = fold_weight_norm(w, p, &shape, |v| (shape.to_vec(), v.to_vec()))?;
    Ok(Conv1d {
        weight,
        bias: if bias {
            Some(w.get(&format!("{p}.bias"), &[c_out])?)
        } else {
            None
        },
        stride,
        padding,
        dilation,
    })
}

fn conv_transpose(
    w: &Weights,
    p: &str,
    c_in: usize,
    c_out: usize,
    stride: usize,
) -> Result<ConvTranspose1d> {
    let (k, padding) = (2 * stride, stride.div_ceil(2));
    // Stored [in, out, k]; weight norm over (out, k) per input channel; then [out, in, k] with
    // the kernel flipped.
    let weight = fold_weight_norm(w, p, &[c_in, c_out, k], |folded| {
        let mut flipped = vec![0f32; folded.len()];
        for i in 0..c_in {
            for o in 0..c_out {
                for j in 0..k {
                    flipped[(o * c_in + i) * k + (k - 1 - j)] = folded[(i * c_out + o) * k + j];
                }
            }
        }
        (vec![c_out, c_in, k], flipped)
    })?;
    Ok(ConvTranspose1d {
        weight,
        bias: w.get(&format!("{p}.bias"), &[c_out])?,
        stride,
        pad: k - 1 - padding,
    })
}

/// `OobleckResidualUnit`.
struct ResidualUnit {
    snake1: Snake,
    conv1: Conv1d,
    snake2: Snake,
    conv2: Conv1d,
}

impl ResidualUnit {
    fn load(w: &Weights, p: &str, c: usize, dilation: usize) -> Result<ResidualUnit> {
        Ok(ResidualUnit {
            snake1: Snake::load(w, &format!("{p}.snake1"), c)?,
            conv1: conv(
                w,
                &format!("{p}.conv1"),
                c,
                c,
                7,
                1,
                3 * dilation,
                dilation,
                true,
            )?,
            snake2: Snake::load(w, &format!("{p}.snake2"), c)?,
            conv2: conv(w, &format!("{p}.conv2"), c, c, 1, 1, 0, 1, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv1.forward(&self.snake1.forward(x)?)?;
        let y = self.conv2.forward(&self.snake2.forward(&y)?)?;
        // The same length in and out (padding 3·dilation), so no cropping.
        x.add(&y)
    }
}

struct EncoderBlock {
    units: [ResidualUnit; 3],
    snake: Snake,
    conv: Conv1d,
}

struct DecoderBlock {
    snake: Snake,
    conv_t: ConvTranspose1d,
    units: [ResidualUnit; 3],
}

fn units(w: &Weights, p: &str, c: usize) -> Result<[ResidualUnit; 3]> {
    Ok([
        ResidualUnit::load(w, &format!("{p}.res_unit1"), c, 1)?,
        ResidualUnit::load(w, &format!("{p}.res_unit2"), c, 3)?,
        ResidualUnit::load(w, &format!("{p}.res_unit3"), c, 9)?,
    ])
}

/// A loaded `AutoencoderOobleck`.
pub struct Oobleck {
    enc_conv1: Conv1d,
    enc_blocks: Vec<EncoderBlock>,
    enc_snake: Snake,
    enc_conv2: Conv1d,
    dec_conv1: Conv1d,
    dec_blocks: Vec<DecoderBlock>,
    dec_snake: Snake,
    dec_conv2: Conv1d,
    pub audio_channels: usize,
    pub latent_channels: usize,
    pub hop: usize,
    pub sampling_rate: usize,
    device: Device,
}

impl Object for Oobleck {
    const TAG: &'static str = "ditflow-stable-audio.oobleck";
}

impl Oobleck {
    pub fn load(path: &Path, device: Device, ctx: &Context) -> Result<Oobleck> {
        let cfg = Config::read(path)?;
        let bad = |what: String| Error(format!("{}: {what}", cfg.path.display()));
        if cfg.class_name() != Some("AutoencoderOobleck") {
            return Err(bad(format!(
                "class \"{}\" is not an AutoencoderOobleck",
                cfg.class_name().unwrap_or("")
            )));
        }
        let list = |key: &str, default: &[usize]| -> Result<Vec<usize>> {
            match cfg.json.get(key) {
                None => Ok(default.to_vec()),
                Some(v) => v
                    .as_array()
                    .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
                    .ok_or_else(|| bad(format!("{key} must be a list of integers"))),
            }
        };
        let ratios = list("downsampling_ratios", &[2, 4, 4, 8, 8])?;
        let multiples = list("channel_multiples", &[1, 2, 4, 8, 16])?;
        if ratios.len() != multiples.len() || ratios.contains(&0) {
            return Err(bad(format!(
                "{} downsampling ratios for {} channel multiples",
                ratios.len(),
                multiples.len()
            )));
        }
        let enc_h = cfg.usize_or("encoder_hidden_size", 128)?;
        let dec_c = cfg.usize_or("decoder_channels", 128)?;
        let dec_in = cfg.usize_or("decoder_input_channels", 64)?;
        let audio = cfg.usize_or("audio_channels", 2)?;
        let rate = cfg.usize_or("sampling_rate", 44100)?;
        if enc_h % 2 != 0 || enc_h / 2 != dec_in {
            return Err(bad(format!(
                "the encoder's {enc_h} output channels do not split into a mean and a scale of \
                 the decoder's {dec_in} input channels"
            )));
        }
        let w = Weights::load(ctx, path, device)?;
        let m: Vec<usize> = std::iter::once(1)
            .chain(multiples.iter().copied())
            .collect();
        let enc_blocks = ratios
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let p = format!("encoder.block.{i}");
                let (ci, co) = (enc_h * m[i], enc_h * m[i + 1]);
                Ok(EncoderBlock {
                    units: units(&w, &p, ci)?,
                    snake: Snake::load(&w, &format!("{p}.snake1"), ci)?,
                    conv: conv(
                        &w,
                        &format!("{p}.conv1"),
                        ci,
                        co,
                        2 * s,
                        s,
                        s.div_ceil(2),
                        1,
                        true,
                    )?,
                })
            })
            .collect::<Result<_>>()?;
        let n = ratios.len();
        let dec_blocks = ratios
            .iter()
            .rev()
            .enumerate()
            .map(|(i, &s)| {
                let p = format!("decoder.block.{i}");
                let (ci, co) = (dec_c * m[n - i], dec_c * m[n - i - 1]);
                Ok(DecoderBlock {
                    snake: Snake::load(&w, &format!("{p}.snake1"), ci)?,
                    conv_t: conv_transpose(&w, &format!("{p}.conv_t1"), ci, co, s)?,
                    units: units(&w, &p, co)?,
                })
            })
            .collect::<Result<_>>()?;
        let d_model = enc_h * m[n];
        Ok(Oobleck {
            enc_conv1: conv(&w, "encoder.conv1", audio, enc_h, 7, 1, 3, 1, true)?,
            enc_blocks,
            enc_snake: Snake::load(&w, "encoder.snake1", d_model)?,
            enc_conv2: conv(&w, "encoder.conv2", d_model, enc_h, 3, 1, 1, 1, true)?,
            dec_conv1: conv(&w, "decoder.conv1", dec_in, dec_c * m[n], 7, 1, 3, 1, true)?,
            dec_blocks,
            dec_snake: Snake::load(&w, "decoder.snake1", dec_c)?,
            dec_conv2: conv(&w, "decoder.conv2", dec_c, audio, 7, 1, 3, 1, false)?,
            audio_channels: audio,
            latent_channels: dec_in,
            hop: ratios.iter().product(),
            sampling_rate: rate,
            device,
        })
    }

    /// `(mean, std)` `[B, C, frames]` of audio `[B, channels, samples]`.
    pub fn encode(&self, audio: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = audio.shape();
        if s.len() != 3 || s[1] != self.audio_channels || s[2] == 0 {
            bail!(
                "Oobleck: audio must be [B, {}, samples], got {s:?}",
                self.audio_channels
            );
        }
        let mut h = self.enc_conv1.forward(&audio.to_device(self.device)?)?;
        for b in &self.enc_blocks {
            for u in &b.units {
                h = u.forward(&h)?;
            }
            h = b.conv.forward(&b.snake.forward(&h)?)?;
        }
        let h = self.enc_conv2.forward(&self.enc_snake.forward(&h)?)?;
        let c = self.latent_channels;
        let parts = h.split(1, &[c, c])?;
        // softplus(x) = max(x, 0) + log(1 + e^−|x|), then + 1e-4.
        let scale = &parts[1];
        let zero = scale.affine(0.0, 0.0)?;
        let std = scale
            .maximum(&zero)?
            .add(
                &scale
                    .unary("abs")?
                    .unary("neg")?
                    .unary("exp")?
                    .affine(1.0, 1.0)?
                    .unary("log")?,
            )?
            .affine(1.0, 1e-4)?;
        Ok((parts[0].clone(), std))
    }

    /// Audio `[B, channels, frames·hop]` of a latent `[B, C, frames]`.
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        let s = latent.shape();
        if s.len() != 3 || s[1] != self.latent_channels || s[2] == 0 {
            bail!(
                "Oobleck: the latent must be [B, {}, frames], got {s:?}",
                self.latent_channels
            );
        }
        let mut h = self.dec_conv1.forward(&latent.to_device(self.device)?)?;
        for b in &self.dec_blocks {
            h = b.conv_t.forward(&b.snake.forward(&h)?)?;
            for u in &b.units {
                h = u.forward(&h)?;
            }
        }
        self.dec_conv2.forward(&self.dec_snake.forward(&h)?)
    }
}

impl Autoencoder for Oobleck {
    fn describe(&self) -> AutoencoderInfo {
        AutoencoderInfo {
            latent_channels: self.latent_channels,
            downscale: self.hop,
            scaling_factor: 1.0,
            shift_factor: 0.0,
        }
    }

    fn forward(&self, inputs: &Inputs) -> Result<Vec<(String, Tensor)>> {
        let mut out = HashMap::new();
        if let Some(a) = inputs.get("audio") {
            let (mean, std) = self.encode(a)?;
            out.insert("mean".to_string(), mean);
            out.insert("std".to_string(), std);
        }
        if let Some(z) = inputs.get("latent") {
            out.insert("decoded".to_string(), self.decode(z)?);
        }
        if out.is_empty() {
            bail!("Oobleck: give 'audio' to encode or 'latent' to decode");
        }
        Ok(sorted(out))
    }
}

/// `LoadOobleck`: a diffusers `AutoencoderOobleck` folder.
#[derive(Default)]
pub struct LoadOobleck;

impl Node for LoadOobleck {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadOobleck")
            .category("loaders")
            .doc(
                "Loads Stable Audio's waveform VAE: a diffusers AutoencoderOobleck folder. As a \
                 model its forward takes audio [B, channels, samples] (giving mean and std, \
                 std = softplus(scale) + 1e-4) and latent [B, C, frames] (giving decoded, \
                 frames x hop samples).",
            )
            .input(
                Port::new("path", "String")
                    .doc("The VAE folder; a relative path is taken from the graph's folder."),
            )
            .output(Port::new("vae", "Model<Autoencoder>").doc("The VAE."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = input_path(ctx, "path")?;
        let vae = Oobleck::load(&dir, ctx.device(), ctx)?;
        let value = ctx.make_autoencoder(vae)?;
        ctx.set_output("vae", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        model_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}

/// The Oobleck VAE behind a value (only this plugin's).
fn oobleck(v: &Value) -> Result<&Oobleck> {
    v.as_object::<Oobleck>()
        .map_err(|e| Error(format!("input 'vae': {e} (load it with LoadOobleck)")))
}

/// `EncodeAudio`: audio as an Oobleck latent (the distribution's mean).
#[derive(Default)]
pub struct EncodeAudio;

impl Node for EncodeAudio {
    fn schema() -> NodeSchema {
        NodeSchema::new("EncodeAudio")
            .category("audio")
            .doc(
                "Encodes audio with the Oobleck VAE into its latent mean [1, C, frames]. The \
                 audio must be at the VAE's sample rate with its channel count (resample it \
                 first otherwise).",
            )
            .input(Port::new("vae", "Model<Autoencoder>").doc("From LoadOobleck."))
            .input(Port::new("audio", "Audio").doc("Samples [channels, samples] with a rate."))
            .output(Port::new("latent", "Latent").doc("The latent mean."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let v: Value = ctx.input("vae")?;
        let vae = oobleck(&v)?;
        let audio: ditflow_plugin::Audio = ctx.input("audio")?;
        let rate = audio.rate("EncodeAudio")?;
        if rate != vae.sampling_rate as f64 {
            bail!(
                "the audio is at {rate} Hz but this VAE takes {} Hz: resample it first",
                vae.sampling_rate
            );
        }
        if audio.channels() != vae.audio_channels {
            bail!(
                "the audio has {} channels but this VAE takes {}",
                audio.channels(),
                vae.audio_channels
            );
        }
        let s = audio.samples.shape().to_vec();
        let x = audio
            .samples
            .reshape(&[1, s[0] as i64, s[1] as i64])?
            .to_device(ctx.device())?;
        let (mean, _) = vae.encode(&x)?;
        ctx.set_output("latent", mean.with_kind(Kind::Latent)?)
    }
}

/// `DecodeAudio`: an Oobleck latent as audio at the VAE's sample rate.
#[derive(Default)]
pub struct DecodeAudio;

impl Node for DecodeAudio {
    fn schema() -> NodeSchema {
        NodeSchema::new("DecodeAudio")
            .category("audio")
            .doc("Decodes an Oobleck latent [1, C, frames] into audio [channels, frames x hop] at the VAE's sample rate (the first of a batch).")
            .input(Port::new("vae", "Model<Autoencoder>").doc("From LoadOobleck."))
            .input(Port::new("latent", "Latent").doc("The latent."))
            .output(Port::new("audio", "Audio").doc("The waveform with the VAE's sample rate."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let v: Value = ctx.input("vae")?;
        let vae = oobleck(&v)?;
        let latent: Tensor = ctx.input("latent")?;
        let y = vae.decode(&latent)?;
        let s = y.shape().to_vec();
        let first = y
            .slice(0, 0, 1, 1)?
            .reshape(&[s[1] as i64, s[2] as i64])?
            .to_device(Device::Cpu)?;
        ctx.set_output(
            "audio",
            ditflow_plugin::Audio::new(first, vae.sampling_rate as f64)?,
        )
    }
}
