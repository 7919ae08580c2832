//! Stable Audio's conditioning: diffusers' `StableAudioProjectionModel` (the text projection, a
//! linear or the identity, and the two number conditioners that embed the clip's start and end in
//! seconds) and the way `StableAudioPipeline` assembles its inputs: `encoder_hidden_states` are
//! the projected text tokens (padding zeroed) followed by the start and end tokens, and
//! `global_hidden_states` the start and end embeddings side by side. `LoadStableAudioProjection`
//! reads the folder; `StableAudioConditioning` makes the conditioning from a `TextEncode` result.

use ditflow_nn::layers::Linear;
use ditflow_nn::{Config, Weights};
use ditflow_plugin::files::{input_path, model_fingerprint};
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::ops::concat;
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::path::{Path, PathBuf};

/// The number conditioners' Fourier width (`internal_dim`, 256 in `StableAudioProjectionModel`).
const INTERNAL: usize = 256;

/// `StableAudioNumberConditioner`: a number in `[min, max]`, normalised to `[0, 1]`, as its
/// value and random Fourier features `[v, sin(2π v w), cos(2π v w)]`, then a linear.
pub struct NumberConditioner {
    /// The Fourier frequencies `w`, `[internal / 2]`.
    weights: Vec<f32>,
    linear: Linear,
}

impl NumberConditioner {
    fn load(w: &Weights, prefix: &str, dim: usize) -> Result<NumberConditioner> {
        // diffusers' projection model always uses the conditioner's default internal width.
        let half = INTERNAL / 2;
        let key = format!("{prefix}.time_positional_embedding.0.weights");
        Ok(NumberConditioner {
            weights: w.get(&key, &[half])?.to_f32_vec()?,
            linear: w.linear(
                &format!("{prefix}.time_positional_embedding.1"),
                2 * half + 1,
                dim,
                true,
            )?,
        })
    }

    /// The embedding `[1, 1, dim]` of `value`, normalised over `[min, max]` in float32 as
    /// PyTorch computes it.
    fn embed(&self, value: f64, min: f64, max: f64, device: Device) -> Result<Tensor> {
        let v = ((value.clamp(min, max) - min) / (max - min)) as f32;
        let n = self.weights.len();
        let mut features = Vec::with_capacity(2 * n + 1);
        features.push(v);
        // `times * weights * 2 * pi`, left to right in float32.
        let angles: Vec<f32> = self
            .weights
            .iter()
            .map(|w| v * w * 2.0 * std::f32::consts::PI)
            .collect();
        features.extend(angles.iter().map(|a| a.sin()));
        features.extend(angles.iter().map(|a| a.cos()));
        let x = Tensor::from_f32(Kind::Tensor, &[1, 1, 2 * n + 1], &features)?.to_device(device)?;
        self.linear.apply(&x, "none", LinearDeltas::none())
    }
}

/// A loaded `StableAudioProjectionModel`.
pub struct Projection {
    /// `None` when the text width equals the conditioning width (diffusers' identity).
    text: Option<Linear>,
    start: NumberConditioner,
    end: NumberConditioner,
    text_dim: usize,
    min: f64,
    max: f64,
    device: Device,
    pub path: PathBuf,
}

impl Object for Projection {
    const TAG: &'static str = "ditflow-stable-audio.projection";
}

impl Projection {
    pub fn load(path: &Path, device: Device, ctx: &Context) -> Result<Projection> {
        let cfg = Config::read(path)?;
        if cfg.class_name() != Some("StableAudioProjectionModel") {
            bail!(
                "{}: class \"{}\" is not a StableAudioProjectionModel",
                cfg.path.display(),
                cfg.class_name().unwrap_or("")
            );
        }
        let text_dim = cfg.usize("text_encoder_dim")?;
        let dim = cfg.usize("conditioning_dim")?;
        let (min, max) = (
            cfg.f64_or("min_value", 0.0)?,
            cfg.f64_or("max_value", 512.0)?,
        );
        if max.partial_cmp(&min) != Some(std::cmp::Ordering::Greater) {
            bail!(
                "{}: max_value {max} must exceed min_value {min}",
                cfg.path.display()
            );
        }
        let w = Weights::load(ctx, path, device)?;
        Ok(Projection {
            text: if text_dim == dim {
                None
            } else {
                Some(w.linear("text_projection", text_dim, dim, true)?)
            },
            start: NumberConditioner::load(&w, "start_number_conditioner", dim)?,
            end: NumberConditioner::load(&w, "end_number_conditioner", dim)?,
            text_dim,
            min,
            max,
            device,
            path: path.to_path_buf(),
        })
    }

    /// The pipeline's `(encoder_hidden_states, global_hidden_states)` for text tokens
    /// `[1, L, text_dim]`: the projected tokens zero-padded to `pad_to` (when longer than L),
    /// then the start and end tokens; and `[1, 1, 2·dim]`. With `unconditional`, the encoder
    /// states are all zeros (the pipeline's negative when no negative prompt is given).
    pub fn conditioning(
        &self,
        text: &Tensor,
        seconds: (f64, f64),
        pad_to: usize,
        unconditional: bool,
    ) -> Result<(Tensor, Tensor)> {
        let file = self.path.display();
        let s = text.shape();
        if s.len() != 3 || s[0] != 1 || s[2] != self.text_dim {
            bail!(
                "{file}: the text must be [1, tokens, {}] (a TextEncode result), got {s:?}",
                self.text_dim
            );
        }
        let (start, end) = seconds;
        for (what, v) in [("seconds_start", start), ("seconds_end", end)] {
            if !(self.min..=self.max).contains(&v) {
                bail!(
                    "{file}: {what} {v} is outside the model's range [{}, {}]",
                    self.min,
                    self.max
                );
            }
        }
        if end < start {
            bail!("{file}: seconds_end {end} is before seconds_start {start}");
        }
        let text = text.cast(DType::F32)?.to_device(self.device)?;
        let tokens = match &self.text {
            Some(l) => l.apply(&text, "none", LinearDeltas::none())?,
            None => text,
        };
        let tokens = ditflow_plugin::ops::pad_tokens(&tokens, pad_to)?;
        let a = self.start.embed(start, self.min, self.max, self.device)?;
        let b = self.end.embed(end, self.min, self.max, self.device)?;
        let states = concat(&[&tokens, &a, &b], 1)?;
        let states = if unconditional {
            Tensor::zeros(Kind::Tensor, DType::F32, states.shape())?.to_device(self.device)?
        } else {
            states
        };
        Ok((states, concat(&[&a, &b], 2)?))
    }
}

/// `LoadStableAudioProjection`: a diffusers `StableAudioProjectionModel` folder.
#[derive(Default)]
pub struct LoadStableAudioProjection;

impl Node for LoadStableAudioProjection {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadStableAudioProjection")
            .category("loaders")
            .doc(
                "Loads Stable Audio's conditioning projection: a diffusers \
                 StableAudioProjectionModel folder (projection_model/ of a Stable Audio \
                 checkpoint): the text projection and the seconds start/end conditioners.",
            )
            .input(
                Port::new("path", "String")
                    .doc("The folder; a relative path is taken from the graph's folder."),
            )
            .output(Port::new("projection", "Model").doc("The projection."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = input_path(ctx, "path")?;
        let p = Projection::load(&dir, ctx.device(), ctx)?;
        let value = ctx.make_object(p)?;
        ctx.set_output("projection", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        model_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}

/// `StableAudioConditioning`: a text encoding as Stable Audio's conditioning.
#[derive(Default)]
pub struct StableAudioConditioning;

impl Node for StableAudioConditioning {
    fn schema() -> NodeSchema {
        NodeSchema::new("StableAudioConditioning")
            .category("conditioning")
            .doc(
                "Stable Audio's conditioning, as StableAudioPipeline builds it: \
                 encoder_hidden_states are the projected text tokens (zero-padded to pad_to), \
                 then the seconds_start and seconds_end tokens; global_hidden_states the two \
                 seconds embeddings side by side. unconditional zeroes the encoder states (the \
                 pipeline's negative when no negative prompt is given).",
            )
            .input(Port::new("projection", "Model").doc("From LoadStableAudioProjection."))
            .input(Port::new("text", "Conditioning").doc("The prompt's TextEncode result."))
            .input(
                Port::new("seconds_start", "Float")
                    .default(0.0)
                    .range(0.0, 1e6)
                    .doc("Where the clip starts, in seconds."),
            )
            .input(
                Port::new("seconds_end", "Float")
                    .default(10.0)
                    .range(0.0, 1e6)
                    .doc("Where it ends, in seconds (the clip's length from 0)."),
            )
            .input(
                Port::new("pad_to", "Int")
                    .default(0i64)
                    .range(0.0, 4096.0)
                    .doc("Zero-pad the text tokens to this many (the tokenizer's max_length; 0: as they are)."),
            )
            .input(
                Port::new("unconditional", "Bool")
                    .default(false)
                    .doc("All-zero encoder states (the negative without a negative prompt)."),
            )
            .output(Port::new("conditioning", "Conditioning").doc(
                "encoder_hidden_states and global_hidden_states for LoadStableAudio's model.",
            ))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let projection: Value = ctx.input("projection")?;
        let p = projection.as_object::<Projection>().map_err(|e| {
            Error(format!(
                "input 'projection': {e} (load it with LoadStableAudioProjection)"
            ))
        })?;
        let text: Conditioning = ctx.input("text")?;
        let tokens = text
            .get("encoder_hidden_states")
            .ok_or_else(|| Error("input 'text' has no encoder_hidden_states".into()))?;
        let pad: i64 = ctx.input("pad_to")?;
        let (states, global) = p.conditioning(
            tokens,
            (ctx.input("seconds_start")?, ctx.input("seconds_end")?),
            pad.max(0) as usize,
            ctx.input("unconditional")?,
        )?;
        let c = Conditioning::new()
            .with("encoder_hidden_states", states.to_device(Device::Cpu)?)
            .with("global_hidden_states", global.to_device(Device::Cpu)?);
        ctx.set_output("conditioning", c)
    }
}
