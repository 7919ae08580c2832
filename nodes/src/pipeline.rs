//! The text-to-image pipeline as nodes: `TextEncode` (tokenizer plus text encoder), `EmptyLatent`,
//! `Sample` (a scheduler from [`crate::samplers`] driving a denoiser, with classifier-free guidance
//! on a batched conditional/unconditional forward), `VAEDecode` and `VAEEncode`. `SaveImage`
//! writes the result.

use crate::samplers;
use ditflow_plugin::model::forward_named;
use ditflow_plugin::model::{Call, DenoiserRef, Event, BRANCH_COND, BRANCH_UNCOND};
use ditflow_plugin::prelude::*;

/// Output `name` of a model's named forward, or an error naming the model's kind.
fn output(outputs: Vec<(String, Tensor)>, name: &str, what: &str) -> Result<Tensor> {
    outputs
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .ok_or_else(|| Error(format!("{what} gave no '{name}'")))
}

/// A scalar input tensor for a named forward.
fn scalar(v: f32) -> Result<Tensor> {
    Tensor::from_f32(Kind::Tensor, &[1], &[v])
}

/// A prompt's last hidden state `[1, tokens, width]` (at most `max` tokens), zero-padded to
/// `pad_to` tokens when that is more.
pub fn encode_text(enc: &Value, text: &str, max: usize, pad_to: usize) -> Result<Tensor> {
    let ids = enc
        .tokenize(text, max)
        .map_err(|e| Error(format!("input 'encoder': {e}")))?;
    let out = output(
        forward_named(enc, &[("input_ids", &ids)])?,
        "last_hidden_state",
        "the text encoder",
    )?;
    ditflow_plugin::ops::pad_tokens(&out, pad_to)
}

/// `TextEncode`: a prompt as a Conditioning tensor.
#[derive(Default)]
pub struct TextEncode;

impl Node for TextEncode {
    fn schema() -> NodeSchema {
        NodeSchema::new("TextEncode")
            .category("conditioning")
            .doc(
                "Tokenizes the text with the encoder's tokenizer.json and runs the text encoder. \
                 The result holds the embeddings of the real tokens only (padding dropped), \
                 [1, tokens, width]; Sample pads and masks when it batches prompts.",
            )
            .input(
                Port::new("encoder", "Model<TextEncoder>").doc(
                    "A text encoder from LoadTextEncoder (its folder must hold tokenizer.json).",
                ),
            )
            .input(
                Port::new("text", "String")
                    .default("")
                    .doc("The prompt; empty for an unconditional embedding."),
            )
            .input(
                Port::new("max_tokens", "Int")
                    .default(120i64)
                    .range(1.0, 4096.0)
                    .doc("Tokens kept at most (diffusers' max_sequence_length)."),
            )
            .input(
                Port::new("pad_to", "Int")
                    .default(0i64)
                    .range(0.0, 4096.0)
                    .doc("Zero-pad the embeddings to this many tokens, as Wan's pipeline pads its prompts (to 512); 0: the real tokens only."),
            )
            .output(Port::new("conditioning", "Conditioning").doc("[1, tokens, width] embeddings."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let enc: Value = ctx.input("encoder")?;
        let text: String = ctx.input("text")?;
        let max: i64 = ctx.input("max_tokens")?;
        let pad = ctx.input::<i64>("pad_to")?.max(0) as usize;
        let out = encode_text(&enc, &text, max.max(1) as usize, pad)?;
        ctx.set_output("conditioning", out.with_kind(Kind::Conditioning)?)
    }
}

/// `EmptyLatent`: a zero latent of the size an image needs.
#[derive(Default)]
pub struct EmptyLatent;

impl Node for EmptyLatent {
    fn schema() -> NodeSchema {
        NodeSchema::new("EmptyLatent")
            .category("latent")
            .doc("A latent of zeros, [batch, channels, height/downscale, width/downscale]: the shape Sample fills with seeded noise.")
            .input(Port::new("width", "Int").default(512i64).range(8.0, 16384.0).doc("Image width in pixels."))
            .input(Port::new("height", "Int").default(512i64).range(8.0, 16384.0).doc("Image height in pixels."))
            .input(Port::new("channels", "Int").default(4i64).range(1.0, 64.0).doc("Latent channels (the VAE's latent_channels)."))
            .input(Port::new("downscale", "Int").default(8i64).range(1.0, 64.0).doc("Image pixels per latent pixel (the VAE's factor)."))
            .input(Port::new("batch", "Int").default(1i64).range(1.0, 64.0).doc("Images at once."))
            .output(Port::new("latent", "Latent").doc("The zero latent."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let get = |n: &str| -> Result<usize> { Ok(ctx.input::<i64>(n)? as usize) };
        let (w, h, c, f, b) = (
            get("width")?,
            get("height")?,
            get("channels")?,
            get("downscale")?,
            get("batch")?,
        );
        if w % f != 0 || h % f != 0 {
            bail!("width {w} and height {h} must be multiples of downscale {f}");
        }
        ctx.set_output(
            "latent",
            Tensor::zeros(Kind::Latent, DType::F32, &[b, c, h / f, w / f])?,
        )
    }
}

/// The latent shape of a video of `frames` frames at `width`×`height`: `[1, C, (frames − 1) /
/// temporal + 1, height / downscale, width / downscale]` (Wan's count of latent frames: the first
/// frame alone, then `temporal` per latent frame).
pub fn video_latent_shape(
    frames: usize,
    width: usize,
    height: usize,
    channels: usize,
    downscale: usize,
    temporal: usize,
) -> Result<[usize; 5]> {
    if frames == 0 || temporal == 0 || !(frames - 1).is_multiple_of(temporal) {
        bail!(
            "{frames} frames do not make whole latent frames of {temporal} (give 1 + k·{temporal})"
        );
    }
    if downscale == 0 || !width.is_multiple_of(downscale) || !height.is_multiple_of(downscale) {
        bail!("width {width} and height {height} must be multiples of downscale {downscale}");
    }
    Ok([
        1,
        channels,
        (frames - 1) / temporal + 1,
        height / downscale,
        width / downscale,
    ])
}

/// `EmptyVideoLatent`: a video latent of zeros.
#[derive(Default)]
pub struct EmptyVideoLatent;

impl Node for EmptyVideoLatent {
    fn schema() -> NodeSchema {
        NodeSchema::new("EmptyVideoLatent")
            .category("latent")
            .doc("A video latent of zeros, [1, channels, (frames - 1)/temporal + 1, height/downscale, width/downscale] (Wan's VAE: 16 channels, 8x, 4 frames per latent frame after the first): the shape SampleAudioVideo fills with seeded noise.")
            .input(Port::new("frames", "Int").default(17i64).range(1.0, 10000.0).doc("Video frames (1 + k·temporal)."))
            .input(Port::new("width", "Int").default(416i64).range(8.0, 16384.0).doc("Width in pixels."))
            .input(Port::new("height", "Int").default(240i64).range(8.0, 16384.0).doc("Height in pixels."))
            .input(Port::new("channels", "Int").default(16i64).range(1.0, 256.0).doc("Latent channels."))
            .input(Port::new("downscale", "Int").default(8i64).range(1.0, 64.0).doc("Pixels per latent pixel."))
            .input(Port::new("temporal", "Int").default(4i64).range(1.0, 64.0).doc("Frames per latent frame after the first."))
            .output(Port::new("latent", "Latent").doc("The zero latent."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let get = |n: &str| -> Result<usize> { Ok(ctx.input::<i64>(n)?.max(0) as usize) };
        let shape = video_latent_shape(
            get("frames")?,
            get("width")?,
            get("height")?,
            get("channels")?,
            get("downscale")?,
            get("temporal")?,
        )?;
        ctx.set_output("latent", Tensor::zeros(Kind::Latent, DType::F32, &shape)?)
    }
}

/// `EmptyAudioLatent`: an audio latent of zeros.
#[derive(Default)]
pub struct EmptyAudioLatent;

impl Node for EmptyAudioLatent {
    fn schema() -> NodeSchema {
        NodeSchema::new("EmptyAudioLatent")
            .category("latent")
            .doc("An audio latent of zeros, [1, channels, int(seconds · sample_rate / hop)] (Stable Audio's Oobleck: 64 channels, hop 2048 at 44.1 kHz).")
            .input(Port::new("seconds", "Float").default(5.4).range(0.001, 3600.0).doc("Duration."))
            .input(Port::new("sample_rate", "Int").default(44100i64).range(1.0, 1e6).doc("The VAE's sample rate."))
            .input(Port::new("channels", "Int").default(64i64).range(1.0, 1024.0).doc("Latent channels."))
            .input(Port::new("hop", "Int").default(2048i64).range(1.0, 1e6).doc("Samples per latent frame (the VAE's hop)."))
            .output(Port::new("latent", "Latent").doc("The zero latent."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let seconds: f64 = ctx.input("seconds")?;
        let rate = ctx.input::<i64>("sample_rate")?.max(1) as f64;
        let hop = ctx.input::<i64>("hop")?.max(1) as f64;
        let c = ctx.input::<i64>("channels")?.max(1) as usize;
        let n = (seconds * rate / hop) as usize;
        if n == 0 {
            bail!("{seconds} s at {rate} Hz is less than one latent frame of {hop} samples");
        }
        ctx.set_output(
            "latent",
            Tensor::zeros(Kind::Latent, DType::F32, &[1, c, n])?,
        )
    }
}

/// Pads `[1, L, D]` conditionings to one length; returns the batch `[N, Lmax, D]` and its mask.
fn batch_conditionings(conds: &[&Tensor], device: Device) -> Result<(Tensor, Tensor)> {
    let width = conds[0].shape()[2];
    let lmax = conds.iter().map(|c| c.shape()[1]).max().unwrap_or(1).max(1);
    let mut padded = Vec::new();
    let mut mask = Vec::new();
    for c in conds {
        let s = c.shape();
        if s.len() != 3 || s[0] != 1 || s[2] != width {
            bail!("conditionings must be [1, tokens, {width}], got {s:?}");
        }
        let c = c.to_device(device)?.cast(DType::F32)?;
        padded.push(ditflow_plugin::ops::pad_tokens(&c, lmax)?);
        mask.extend((0..lmax).map(|i| (i < s[1]) as i64));
    }
    let batch = ditflow_plugin::ops::concat(&padded.iter().collect::<Vec<_>>(), 0)?;
    let m = Tensor::from_bytes(
        Kind::Tensor,
        DType::I64,
        &[conds.len(), lmax],
        &mask
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )?;
    Ok((batch, m.to_device(device)?))
}

/// Parts passed once for the whole batch rather than per row (Flux's position ids).
const SHARED_PARTS: &[&str] = &["img_ids", "txt_ids"];

/// The forward arguments for a batch of conditioning sets (one per row): each part the model
/// reads, rows stacked. Token sequences of different lengths are zero-padded, with an
/// `encoder_attention_mask`, which the model must read; other parts must match in shape.
fn batch_conditioning_sets(
    rows: &[&Conditioning],
    info: &ditflow_plugin::model::DenoiserInfo,
    device: Device,
) -> Result<Vec<(String, Tensor)>> {
    let first = rows[0];
    for row in rows {
        for (has, lacks, name) in [(first, *row, "negative"), (*row, first, "positive")] {
            if let Some(part) = has
                .names()
                .into_iter()
                .find(|n| info.reads(n) && lacks.get(n).is_none())
            {
                bail!(
                    "the {name} conditioning has no '{part}', which the {} has (encode both \
                     prompts the same way)",
                    if name == "negative" {
                        "positive"
                    } else {
                        "negative"
                    }
                );
            }
        }
    }
    let mut out = Vec::new();
    for name in first.names() {
        if !info.reads(name) {
            continue;
        }
        let parts: Vec<&Tensor> = rows.iter().filter_map(|c| c.get(name)).collect();
        if SHARED_PARTS.contains(&name) {
            out.push((name.to_string(), parts[0].to_device(device)?));
        } else if name == ditflow_plugin::conditioning::TOKENS {
            let (tokens, mask) = batch_conditionings(&parts, device)?;
            let differing = parts.iter().find(|p| p.shape() != parts[0].shape());
            if info.reads("encoder_attention_mask") {
                out.push(("encoder_attention_mask".to_string(), mask));
            } else if let Some(other) = differing {
                bail!(
                    "the prompts' token sequences differ in shape ({:?} and {:?}) and the \
                     model takes no attention mask to pad them: encode them to one length",
                    parts[0].shape(),
                    other.shape()
                );
            }
            out.push((name.to_string(), tokens));
        } else {
            let s = parts[0].shape();
            if s.first() != Some(&1) {
                bail!("conditioning part '{name}' must have a batch of 1, got {s:?}");
            }
            if let Some(other) = parts.iter().find(|p| p.shape() != s) {
                bail!(
                    "conditioning part '{name}' is {s:?} in one prompt and {:?} in another",
                    other.shape()
                );
            }
            let parts = parts
                .iter()
                .map(|p| p.to_device(device)?.cast(DType::F32))
                .collect::<Result<Vec<_>>>()?;
            out.push((
                name.to_string(),
                ditflow_plugin::ops::concat(&parts.iter().collect::<Vec<_>>(), 0)?,
            ));
        }
    }
    Ok(out)
}

/// `Sample`: runs a scheduler over a denoiser with classifier-free guidance.
#[derive(Default)]
pub struct Sample;

impl Node for Sample {
    fn schema() -> NodeSchema {
        NodeSchema::new("Sample")
            .category("sampling")
            .doc(
                "Denoises seeded noise of the latent's shape with a diffusion model under a \
                 diffusers-equivalent scheduler: ddim, euler, euler_ancestral, heun (two model \
                 calls per step), dpmpp_2m (DPM-Solver++(2M)), dpmpp_2m_sde (its SDE form), lcm, \
                 flow_euler and flow_heun (flow matching), rf_solver (RF-Solver, second order, \
                 for flow models; Invert's inversion) or unipc (UniPC, on flow sigmas for flow \
                 models), or `auto` for the class in scheduler_config. Stochastic samplers draw \
                 each step's noise from the seed's own stream for that step, so a seed gives the \
                 same picture on every device. \
                 Classifier-free guidance runs the conditional and unconditional prompts as one \
                 batch: u + cfg·(c − u); guidance_method apg projects out the part of c − u \
                 parallel to c (adaptive projected guidance), guidance_rescale mixes in the \
                 guided prediction rescaled to c's standard deviation, and guidance_start and \
                 guidance_stop guide only that fraction of the steps (the others run the \
                 conditional prompt alone), as diffusers' guiders. Reports progress per step and \
                 stops when cancelled.",
            )
            .input(Port::new("model", "Model<Denoiser>").doc("A denoiser from any plugin (LoadDiffusionModel, a patch node, a C plugin)."))
            .input(Port::new("positive", "Conditioning").optional().doc("The prompt's conditioning (needed by text-conditioned models): TextEncode's tokens, or a named set such as SD3TextEncode's or FluxTextEncode's (tokens plus pooled_projections). Each part the model reads goes to its forward under its name."))
            .input(Port::new("negative", "Conditioning").optional().doc("The unconditional conditioning (needed when cfg != 1), with the same parts as the positive."))
            .input(Port::new("latent", "Latent").optional().doc("Sets the output shape (an EmptyLatent); may be left out with an init_latent."))
            .input(Port::new("init_latent", "Latent").optional().doc("An encoded image to start from (VAEEncode): image-to-image, and inpainting with a mask."))
            .input(Port::new("denoise", "Float").default(1.0).range(0.0, 1.0).doc("With an init_latent, the fraction of the schedule to run (diffusers' strength): the sampling starts from the init latent noised to the level of step ⌊steps·(1 − denoise)⌋."))
            .input(Port::new("mask", "Image").optional().doc("Inpainting: where to repaint (≥ 0.5, in the first channel or the luminance of [H, W, C] pixels, or [h, w] at the latent's size); elsewhere the init latent is held at each step's noise level, and given back clean at the end. A dedicated inpainting model (SD3 with 33 input channels, FLUX.1-Fill) takes the mask as input instead."))
            .input(Port::new("masked_latent", "Latent").optional().doc("A dedicated inpainting model's encoded masked image: the image through MaskImage and VAEEncode."))
            .input(Port::new("sampler", "String").default("auto").choices(&["auto", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "lcm", "flow_euler", "flow_heun", "rf_solver", "unipc"]).doc("The scheduler."))
            .input(Port::new("scheduler_config", "String").default("").doc("A diffusers scheduler_config.json (relative to the graph's folder); empty for the class defaults."))
            .input(Port::new("karras", "Bool").default(false).doc("Karras sigmas (euler, heun, dpmpp_2m, unipc)."))
            .input(Port::new("shift", "Float").default(0.0).range(0.0, 100.0).doc("Flow-matching shift; 0 keeps the config's."))
            .input(Port::new("flow_sigmas", "String").default("linspace").choices(&["linspace", "scheduler", "custom"]).doc("Where flow_euler's unshifted sigmas come from: linspace(1, 1/N, N) as FluxPipeline and PixArt pass them, the scheduler's own spacing, as StableDiffusion3Pipeline leaves it, or the list in `sigmas`."))
            .input(Port::new("sigmas", "String").default("").doc("A custom schedule as a list (\"1.0, 0.75, 0.5, 0.25\"), decreasing: a graph input or a Lua node can make it. With flow_sigmas: custom (flow_euler, rf_solver), the unshifted sigmas, one per step, which the shift applies to as to the others; with spacing: custom (euler), the model's σ, one per step and optionally the final one (else 0, or the config's final_sigmas_type), as diffusers' set_timesteps(sigmas=...)."))
            .input(Port::new("spacing", "String").default("default").choices(&["default", "karras", "exponential", "beta", "custom"]).doc("The sigmas' spacing for the samplers that have them (euler, heun, dpmpp_2m, dpmpp_2m_sde; karras for unipc too): Karras's ρ = 7, evenly in log σ, or Beta(0.6, 0.6) quantiles, between the schedule's ends; custom (euler) takes the list in `sigmas`."))
            .input(Port::new("guidance", "Float").default(3.5).range(0.0, 100.0).doc("Distilled guidance for models with a guidance embedding (Flux dev), given to the model as its 'guidance' input; other models ignore it."))
            .input(Port::new("steps", "Int").default(20i64).range(1.0, 1000.0).doc("Sampling steps."))
            .input(Port::new("cfg", "Float").default(4.5).range(0.0, 100.0).doc("Guidance scale; 1 disables guidance."))
            .input(Port::new("seed", "Int").default(0i64).doc("Noise seed (the same noise on every device)."))
            .input(Port::new("guidance_method", "String").default("cfg").choices(&["cfg", "apg"]).doc("How the two predictions combine: cfg, or apg (adaptive projected guidance)."))
            .input(Port::new("guidance_rescale", "Float").default(0.0).range(0.0, 1.0).doc("CFG rescale's factor (0: off): the guided prediction mixed with itself rescaled to the conditional one's standard deviation."))
            .input(Port::new("guidance_start", "Float").default(0.0).range(0.0, 1.0).doc("The fraction of the steps where guidance starts."))
            .input(Port::new("guidance_stop", "Float").default(1.0).range(0.0, 1.0).doc("The fraction of the steps where guidance stops."))
            .input(Port::new("apg_eta", "Float").default(1.0).range(0.0, 10.0).doc("APG: the weight of the difference's part parallel to the conditional prediction."))
            .input(Port::new("apg_norm_threshold", "Float").default(15.0).range(0.0, 1e6).doc("APG: the difference's norm per row is capped here (0: no cap)."))
            .input(Port::new("apg_momentum", "Float").default(0.0).range(-10.0, 10.0).doc("APG: the momentum of the difference's running average (0: none; diffusers' examples use -0.5)."))
            .input(Port::new("preview_every", "Int").default(0).range(0.0, 1e6).doc("Every this many steps (and at the last), a node_preview event with a small PNG of the current x₀ estimate, one pixel per latent pixel through preview_map (0: none)."))
            .input(Port::new("preview_map", "String").default("").doc("The VAE's latent-to-RGB map, latent_rgb.json (tools/fit_latent_rgb.py; relative to the graph's folder); empty: the first three latent channels as colours."))
            .input(Port::new("slg_scale", "Float").default(0.0).range(-100.0, 100.0).doc("Skip-layer guidance (SD3.5's): adds scale·(c − c without slg_layers) to the guided prediction at the steps between slg_start and slg_stop (0: off; 2.8 is SD3.5's). Needs cfg != 1 and a denoiser with range overrides."))
            .input(Port::new("slg_layers", "String").default("7, 8, 9").doc("The blocks of the model's first stack that skip-layer guidance leaves out (SD3.5 Medium: 7, 8, 9)."))
            .input(Port::new("slg_start", "Float").default(0.01).range(0.0, 1.0).doc("Skip-layer guidance runs at steps i with i > steps·slg_start ..."))
            .input(Port::new("slg_stop", "Float").default(0.2).range(0.0, 1.0).doc("... and i < steps·slg_stop, as StableDiffusion3Pipeline counts them."))
            .input(Port::new("noise", "Latent").optional().doc("The starting noise instead of the seed's (an Invert's latent: sampling it under an edited prompt edits the inverted image)."))
            .output(Port::new("latent", "Latent").doc("The denoised latent."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        run_denoiser(ctx, Mode::Sample)
    }
}

/// What [`run_denoiser`] does: sample down the noise levels, or invert up them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Sample,
    Invert,
}

/// `Invert`: a clean latent to the noise that samples back to it.
#[derive(Default)]
pub struct Invert;

impl Node for Invert {
    fn schema() -> NodeSchema {
        NodeSchema::new("Invert")
            .category("sampling")
            .doc(
                "Inverts a clean latent (an image through VAEEncode) into the noise that a \
                 sampler takes back to it, by walking the schedule up the noise levels under \
                 the conditioning: rf_solver (RF-Solver's second-order inversion, for flow \
                 models), flow_euler (first-order, the baseline) or ddim (DDIMInverseScheduler, \
                 for epsilon and v models). Sampling the result with Sample's `noise` input and \
                 the same sampler under an edited prompt edits the image (RF-Solver-Edit without \
                 its feature sharing). Guidance as in Sample (cfg 1, the default, runs the \
                 conditional prompt alone). Reports progress per step.",
            )
            .input(Port::new("model", "Model<Denoiser>").doc("A denoiser from any plugin."))
            .input(Port::new("positive", "Conditioning").optional().doc("The conditioning of the image's own prompt."))
            .input(Port::new("negative", "Conditioning").optional().doc("The unconditional conditioning (needed when cfg != 1)."))
            .input(Port::new("latent", "Latent").doc("The clean latent to invert (VAEEncode)."))
            .input(Port::new("sampler", "String").default("rf_solver").choices(&["rf_solver", "flow_euler", "ddim"]).doc("The inversion."))
            .input(Port::new("scheduler_config", "String").default("").doc("A diffusers scheduler_config.json (relative to the graph's folder): the schedule's fields (shift, betas, ...)."))
            .input(Port::new("shift", "Float").default(0.0).range(0.0, 100.0).doc("Flow-matching shift; 0 keeps the config's."))
            .input(Port::new("flow_sigmas", "String").default("linspace").choices(&["linspace", "scheduler"]).doc("Where the flow sigmas come from, as in Sample: use the same as the Sample that follows."))
            .input(Port::new("steps", "Int").default(28).range(1.0, 1000.0).doc("Inference steps (rf_solver calls the model twice per step)."))
            .input(Port::new("cfg", "Float").default(1.0).range(0.0, 100.0).doc("Classifier-free guidance scale (1: none)."))
            .input(Port::new("guidance", "Float").default(3.5).range(0.0, 100.0).doc("Distilled guidance for models with a guidance embedding, as in Sample."))
            .input(Port::new("guidance_method", "String").default("cfg").choices(&["cfg", "apg"]).doc("As in Sample."))
            .input(Port::new("guidance_rescale", "Float").default(0.0).range(0.0, 1.0).doc("As in Sample."))
            .input(Port::new("guidance_start", "Float").default(0.0).range(0.0, 1.0).doc("As in Sample."))
            .input(Port::new("guidance_stop", "Float").default(1.0).range(0.0, 1.0).doc("As in Sample."))
            .input(Port::new("apg_eta", "Float").default(1.0).range(0.0, 10.0).doc("As in Sample."))
            .input(Port::new("apg_norm_threshold", "Float").default(15.0).range(0.0, 1e6).doc("As in Sample."))
            .input(Port::new("apg_momentum", "Float").default(0.0).range(-10.0, 10.0).doc("As in Sample."))
            .output(Port::new("latent", "Latent").doc("The inverted latent: the noise to sample from."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        run_denoiser(ctx, Mode::Invert)
    }
}

/// `Sample` and `Invert`: one model call per scheduler step, with guidance, over the latent.
fn run_denoiser(ctx: &mut Context, mode: Mode) -> Result<()> {
    let invert = mode == Mode::Invert;
    let model: Value = ctx.input("model")?;
    let den = model
        .as_denoiser()
        .map_err(|e| Error(format!("input 'model': {e}")))?;
    let info = den.info().clone();
    let device = ctx.device();
    let positive: Option<Conditioning> = ctx.input_opt("positive")?;
    let negative: Option<Conditioning> = ctx.input_opt("negative")?;
    let init: Option<Tensor> = if invert {
        None
    } else {
        ctx.input_opt("init_latent")?
    };
    let latent = match (ctx.input_opt::<Tensor>("latent")?, &init) {
        (Some(l), _) => l,
        (None, Some(i)) => i.clone(),
        (None, None) => bail!("connect a 'latent' (an EmptyLatent) or an 'init_latent'"),
    };
    let denoise: f64 = if invert { 1.0 } else { ctx.input("denoise")? };
    let steps = ctx.input::<i64>("steps")? as usize;
    let cfg: f64 = ctx.input("cfg")?;
    let seed: i64 = if invert { 0 } else { ctx.input("seed")? };
    let given_noise: Option<Tensor> = if invert {
        None
    } else {
        ctx.input_opt("noise")?
    };
    if let Some(n) = &given_noise {
        if n.shape() != latent.shape() {
            bail!(
                "the noise is {:?} but the latent is {:?}",
                n.shape(),
                latent.shape()
            );
        }
    }
    let s = latent.shape().to_vec();
    if s.len() != 4 || s[1] != info.latent_channels {
        bail!(
            "the latent must be [B, {}, H, W], got {s:?}",
            info.latent_channels
        );
    }
    if let Some(i) = &init {
        if i.shape() != &s[..] {
            bail!("the init latent is {:?} but the latent is {s:?}", i.shape());
        }
    } else if denoise < 1.0 {
        bail!("denoise {denoise} needs an init_latent to start from");
    }
    let mask: Option<Tensor> = if invert { None } else { ctx.input_opt("mask")? };
    // A dedicated inpainting model reads the mask and the masked image itself, and its
    // output is not blended with the init latent (as diffusers' 33-channel SD3 inpainting).
    let inpaint_model = info.reads(ditflow_plugin::conditioning::MASKED_IMAGE_LATENTS);
    let masked_latent: Option<Tensor> = if invert {
        None
    } else {
        ctx.input_opt("masked_latent")?
    };
    if inpaint_model {
        if mask.is_none() || masked_latent.is_none() {
            bail!(
                "this is an inpainting model: connect a 'mask' and a 'masked_latent' (the image \
                 through MaskImage and VAEEncode)"
            );
        }
    } else if masked_latent.is_some() {
        bail!("masked_latent is for dedicated inpainting models, and this model reads none");
    } else if mask.is_some() && init.is_none() {
        bail!("a mask needs the init_latent it keeps outside the mask");
    }
    if let Some(m) = &masked_latent {
        if m.shape() != &s[..] {
            bail!(
                "the masked latent is {:?} but the latent is {s:?}",
                m.shape()
            );
        }
    }
    let text = info.reads(ditflow_plugin::conditioning::TOKENS);
    if text && positive.is_none() {
        bail!("the model is text-conditioned: connect a 'positive' conditioning");
    }
    let batch = s[0];
    let guided = cfg != 1.0;
    if guided && text && negative.is_none() {
        bail!("cfg {cfg} needs a negative conditioning (an empty prompt works)");
    }
    // The scheduler.
    let sampler: String = ctx.input("sampler")?;
    let cfg_path: String = ctx.input("scheduler_config")?;
    let file = if cfg_path.is_empty() {
        None
    } else {
        Some(ctx.input_path(&cfg_path)?)
    };
    let (class, mut fields) =
        samplers::scheduler_for(&sampler, file.as_deref(), info.prediction.into())
            .map_err(|e| Error(e.0))?;
    let unipc = class == "UniPCMultistepScheduler";
    if !invert {
        let spacing: String = ctx.input("spacing")?;
        let key = match spacing.as_str() {
            "karras" => Some("use_karras_sigmas"),
            "exponential" => Some("use_exponential_sigmas"),
            "beta" => Some("use_beta_sigmas"),
            _ if ctx.input::<bool>("karras")? => Some("use_karras_sigmas"),
            _ => None,
        };
        if let Some(key) = key {
            fields.push((key.into(), "true".into()));
        }
    }
    let shift: f64 = ctx.input("shift")?;
    if shift > 0.0 {
        let key = if unipc { "flow_shift" } else { "shift" };
        fields.push((key.into(), shift.to_string()));
    }
    let patch = info.patch_size.max(1);
    let tokens = (s[2] / patch) * (s[3] / patch);
    // A custom list: flow_sigmas: custom for the flow samplers, spacing: custom for euler.
    let flow_sigmas: String = ctx.input("flow_sigmas")?;
    let custom =
        !invert && (flow_sigmas == "custom" || ctx.input::<String>("spacing")? == "custom");
    let flow_sigmas = match flow_sigmas.as_str() {
        _ if custom => {
            let text: String = ctx.input("sigmas")?;
            let list = parse_sigmas(&text)?;
            // Euler may add the final sigma; the flow samplers take one per step.
            let euler = class == "EulerDiscreteScheduler";
            if list.len() != steps && !(euler && list.len() == steps + 1) {
                bail!(
                    "sigmas lists {} values for {steps} steps: give one per step{}",
                    list.len(),
                    if euler {
                        " (and optionally the final one)"
                    } else {
                        ""
                    }
                );
            }
            if let Some(w) = list.windows(2).find(|w| w[1] >= w[0]) {
                bail!(
                    "sigmas must decrease from step to step, but {} is followed by {}",
                    w[0],
                    w[1]
                );
            }
            samplers::SigmaSource::Custom(list)
        }
        "scheduler" => samplers::SigmaSource::SchedulerDefault,
        _ => samplers::SigmaSource::Pipeline,
    };
    let sched = if invert {
        samplers::build_inversion(&sampler, &fields, steps, tokens, flow_sigmas)
    } else {
        samplers::build_scheduler(&class, &fields, steps, tokens, flow_sigmas)
    }
    .map_err(|e| Error(e.0))?;
    // Image-to-image starts part-way down the schedule, as diffusers' img2img pipelines do.
    let start = match &init {
        Some(_) => {
            let start = samplers::img2img_start(steps, denoise, sched.order());
            if start >= sched.num_steps() {
                bail!("denoise {denoise} of {steps} steps leaves no step to run");
            }
            if !samplers::can_start_at(sched.as_ref(), start) {
                bail!(
                    "the {} sampler cannot start part-way (its step {start} uses estimates \
                     of earlier steps)",
                    sched.class_name()
                );
            }
            start
        }
        None => 0,
    };
    // The mask at the image's size, for an inpainting model that folds pixels into channels.
    let mask_pixels = match &mask {
        Some(m) if info.reads(ditflow_plugin::conditioning::INPAINT_MASK_PIXELS) => {
            Some(pixel_mask(m)?.to_device(device)?)
        }
        _ => None,
    };
    let mask = match &mask {
        Some(m) => Some(latent_mask(m, &s)?.to_device(device)?),
        None => None,
    };
    // The mask and masked image as the inpainting model's conditioning (the parts it reads),
    // for every row.
    let inpaint_parts = |rows: usize| -> Result<Vec<(String, Tensor)>> {
        let (Some(m), Some(ml), true) = (&mask, &masked_latent, inpaint_model) else {
            return Ok(Vec::new());
        };
        let repeat = |t: &Tensor, n: usize| ditflow_plugin::ops::concat(&vec![t; n], 0);
        use ditflow_plugin::conditioning::{
            INPAINT_MASK, INPAINT_MASK_PIXELS, MASKED_IMAGE_LATENTS,
        };
        let mut parts = vec![(
            MASKED_IMAGE_LATENTS.to_string(),
            repeat(&ml.to_device(device)?, rows / batch)?,
        )];
        if info.reads(INPAINT_MASK) {
            parts.push((INPAINT_MASK.to_string(), repeat(m, rows)?));
        }
        if let Some(p) = &mask_pixels {
            parts.push((INPAINT_MASK_PIXELS.to_string(), repeat(p, rows)?));
        }
        Ok(parts)
    };
    // Latent blending, for models that do not inpaint by themselves.
    let blend = if inpaint_model { None } else { mask.clone() };
    let method = match ctx.input::<String>("guidance_method")?.as_str() {
        "apg" => samplers::guidance::Method::Apg {
            eta: ctx.input("apg_eta")?,
            norm_threshold: ctx.input("apg_norm_threshold")?,
            momentum: Some(ctx.input::<f64>("apg_momentum")?).filter(|&m| m != 0.0),
        },
        _ => samplers::guidance::Method::Cfg,
    };
    let gconfig = samplers::guidance::GuidanceConfig {
        scale: cfg,
        method,
        rescale: ctx.input("guidance_rescale")?,
        start: ctx.input("guidance_start")?,
        stop: ctx.input("guidance_stop")?,
    };
    gconfig.validate().map_err(|e| Error(e.0))?;
    let mut guide = samplers::guidance::Guidance::new(gconfig);
    // Conditioning batch: positives then negatives; the positives alone for the steps
    // outside the guidance interval.
    let rows = if guided { 2 * batch } else { batch };
    let (conditioning, cond_only) = match &positive {
        Some(positive) => {
            let mut list: Vec<&Conditioning> = vec![positive; batch];
            let only = if guided {
                batch_conditioning_sets(&list, &info, device)?
            } else {
                Vec::new()
            };
            if guided {
                let negative = negative.as_ref().unwrap_or(positive);
                list.extend(std::iter::repeat_n(negative, batch));
            }
            (batch_conditioning_sets(&list, &info, device)?, only)
        }
        None => (Vec::new(), Vec::new()),
    };
    let (mut conditioning, mut cond_only) = (conditioning, cond_only);
    conditioning.extend(inpaint_parts(rows)?);
    if guided {
        cond_only.extend(inpaint_parts(batch)?);
    }
    let guidance = if info.reads("guidance") {
        Some(scalar(ctx.input::<f64>("guidance")? as f32)?)
    } else {
        None
    };
    let supplied: Vec<&str> = conditioning.iter().map(|(n, _)| n.as_str()).collect();
    let supplied = if supplied.is_empty() {
        "nothing".to_string()
    } else {
        supplied.join(", ")
    };
    let mut call = Call {
        run_id: ditflow_plugin::model::new_run_id(),
        step_index: 0,
        num_steps: sched.num_steps(),
        sigma: 0.0,
        timestep: 0.0,
        branches: (0..rows)
            .map(|r| {
                if r < batch {
                    BRANCH_COND
                } else {
                    BRANCH_UNCOND
                }
            })
            .collect(),
        cond_ids: (0..rows).map(|r| (r >= batch) as i64).collect(),
    };
    den.lifecycle(Event::RunBegin, &call)?;
    // The steps run: a multistep solver restarts its order count where image-to-image starts.
    let steps_run = sched.steps_from(start);
    let noise = match &given_noise {
        Some(n) => n.to_device(device)?,
        None => ditflow_plugin::ops::randn(&s, seed as u64, device)?,
    };
    // The init latent noised to the level `sigma` (diffusers' add_noise / scale_noise).
    let noised = |x0: &Tensor, sigma: f64| -> Result<Tensor> {
        let (a, b) = sched.noising().coefficients(sigma);
        x0.affine(a, 0.0)?.add(&noise.affine(b, 0.0)?)
    };
    // The init latent on the run's device, once.
    let init = match init {
        Some(x0) => Some(x0.to_device(device)?),
        None => None,
    };
    let mut x = match &init {
        Some(x0) => noised(x0, steps_run[start].sigma)?,
        // Inversion starts from the clean latent itself.
        None if invert => latent.to_device(device)?,
        None => noise.affine(sched.init_noise_sigma(), 0.0)?,
    };
    let mut history = samplers::History::new(sched.as_ref());
    let preview_every = if invert {
        0
    } else {
        ctx.input::<i64>("preview_every")?.max(0) as usize
    };
    let preview_map = if preview_every > 0 {
        let path: String = ctx.input("preview_map")?;
        Some(samplers::preview::LatentRgb::for_input(ctx, &path, s[1])?)
    } else {
        None
    };
    let n = sched.num_steps();
    let total = (n - start) as u64;
    // Skip-layer guidance: the model again, with blocks left out in the skip-layers branch.
    let slg_scale: f64 = if invert { 0.0 } else { ctx.input("slg_scale")? };
    let slg_model = if slg_scale != 0.0 {
        if !guided {
            bail!("slg_scale {slg_scale} needs cfg != 1: skip-layer guidance adds to CFG");
        }
        let layers = parse_layers(&ctx.input::<String>("slg_layers")?)?;
        Some(crate::patches::skip_layers::skip_layers_model(
            ctx, &model, &layers,
        )?)
    } else {
        None
    };
    let (slg_start, slg_stop): (f64, f64) = if slg_model.is_some() {
        (ctx.input("slg_start")?, ctx.input("slg_stop")?)
    } else {
        (0.0, 0.0)
    };
    for (i, step) in steps_run.iter().enumerate().skip(start) {
        ctx.check_cancelled()?;
        // Outside the guidance interval the conditional rows run alone.
        let both = guided && gconfig.active(i, n);
        call.step_index = i;
        call.sigma = step.sigma;
        call.timestep = step.timestep;
        call.branches
            .resize(if both || !guided { rows } else { batch }, BRANCH_UNCOND);
        call.cond_ids.resize(call.branches.len(), 1);
        den.lifecycle(Event::StepBegin, &call)?;
        let input = x.affine(step.input_scale, 0.0)?;
        let input = if both {
            ditflow_plugin::ops::concat(&[&input, &input], 0)?
        } else {
            input
        };
        let parts = if guided && !both {
            &cond_only
        } else {
            &conditioning
        };
        let out = prediction(&den, &call, &input, parts, guidance.as_ref(), s[1]).map_err(|e| {
            Error(format!(
                "{e} (the model reads {}; the conditioning gave {supplied})",
                info.conditioning.join(", ")
            ))
        })?;
        // Skip-layer guidance at this step: the conditional rows before the guidance combines them.
        let runs = (n - start) as f64;
        let j = (i - start) as f64;
        let skip_cond = match &slg_model {
            Some(_) if both && j > runs * slg_start && j < runs * slg_stop => {
                Some(out.slice(0, 0, batch as i64, 1)?)
            }
            _ => None,
        };
        let out = if guided && gconfig.is_plain() {
            let parts = out.split(0, &[batch, batch])?;
            let (c, u) = (&parts[0], &parts[1]);
            u.add(&c.sub(u)?.affine(cfg, 0.0)?)?
        } else if guided {
            guided_prediction(&mut guide, i, n, &out, both, batch)?
        } else {
            out
        };
        let out = match (&slg_model, skip_cond) {
            (Some(m), Some(c)) => {
                let mut skip_call = call.clone();
                skip_call.branches = vec![ditflow_plugin::model::BRANCH_SKIP_LAYERS; batch];
                skip_call.cond_ids = vec![0; batch];
                let input = x.affine(step.input_scale, 0.0)?;
                let skipped = prediction(
                    &m.as_denoiser()?,
                    &skip_call,
                    &input,
                    &cond_only,
                    guidance.as_ref(),
                    s[1],
                )?;
                out.add(&c.sub(&skipped)?.affine(slg_scale, 0.0)?)?
            }
            _ => out,
        };
        let done = (i - start) as u64 + 1;
        if let Some(map) = &preview_map {
            if done.is_multiple_of(preview_every as u64) || i + 1 == n {
                // This step's x₀ estimate, from the sample and the (guided) prediction.
                let x0 = x
                    .affine(step.denoised_x, 0.0)?
                    .add(&out.affine(step.denoised_output, 0.0)?)?;
                ctx.preview(done, total, &map.png(&x0)?);
            }
        }
        // A stochastic step's fresh noise: stream i + 1 of the seed.
        let fresh = if step.noise != 0.0 {
            let stream = samplers::step_noise_stream(i);
            Some(ditflow_plugin::ops::randn_stream(
                &s,
                seed as u64,
                stream,
                device,
            )?)
        } else {
            None
        };
        x = samplers::apply_step(step, i, &x, &out, fresh.as_ref(), &mut history)?;
        // Inpainting: outside the mask, the init latent at the next step's level (clean
        // after the last step).
        if let (Some(m), Some(x0)) = (&blend, &init) {
            let kept = match steps_run.get(i + 1) {
                Some(next) => noised(x0, next.sigma)?,
                None => x0.clone(),
            };
            x = kept.add(&x.sub(&kept)?.mul(m)?)?;
        }
        den.lifecycle(Event::StepEnd, &call)?;
        ctx.progress((i - start) as u64 + 1, total);
    }
    den.lifecycle(Event::RunEnd, &call)?;
    ctx.set_output("latent", x.with_kind(Kind::Latent)?)
}

/// One forward of `den` on `input` with the conditioning `parts` (and the distilled `guidance`,
/// for models that read it), keeping the first `channels` channels: a learned-sigma model
/// predicts twice as many, and the first half is the noise.
fn prediction(
    den: &DenoiserRef,
    call: &Call,
    input: &Tensor,
    parts: &[(String, Tensor)],
    guidance: Option<&Tensor>,
    channels: usize,
) -> Result<Tensor> {
    let mut args: Vec<(&str, &Tensor)> = vec![("hidden_states", input)];
    args.extend(parts.iter().map(|(n, t)| (n.as_str(), t)));
    if let Some(g) = guidance {
        args.push(("guidance", g));
    }
    let out = den.forward(call, &args)?;
    if out.shape()[1] != channels {
        out.slice(1, 0, channels as i64, 1)
    } else {
        Ok(out)
    }
}

/// Block indices written as integers separated by commas or spaces, in optional brackets.
fn parse_layers(text: &str) -> Result<Vec<usize>> {
    let inner = text.trim().trim_start_matches('[').trim_end_matches(']');
    let layers: Vec<usize> = inner
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<usize>().map_err(|_| {
                Error(format!(
                    "slg_layers: {t:?} is not a block index (give a list like 7, 8, 9)"
                ))
            })
        })
        .collect::<Result<_>>()?;
    if layers.is_empty() {
        bail!("slg_layers is empty: name the blocks to skip, like 7, 8, 9");
    }
    Ok(layers)
}

/// A list of sigmas written as numbers separated by commas or spaces, in optional brackets.
fn parse_sigmas(text: &str) -> Result<Vec<f64>> {
    let inner = text.trim().trim_start_matches('[').trim_end_matches(']');
    inner
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| match t.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
            _ => Err(Error(format!(
                "sigmas: {t:?} is not a non-negative number (give a list like 1.0, 0.75, 0.5)"
            ))),
        })
        .collect()
}

/// A mask's pixels binarized at 0.5, `(H, W, values)`: from `[H, W]` or `[H, W, C]` (the
/// luminance of 3 channels, else the first; 8-bit values read as 0–255), as diffusers' mask
/// processor binarizes.
fn binary_mask(m: &Tensor) -> Result<(usize, usize, Vec<f32>)> {
    let (h, w, c) = match *m.shape() {
        [h, w] => (h, w, 1),
        [h, w, c] if c > 0 => (h, w, c),
        _ => bail!(
            "the mask must be [H, W] or [H, W, C] pixels, got {:?}",
            m.shape()
        ),
    };
    let v = m.cast(DType::F32)?.to_device(Device::Cpu)?.to_f32_vec()?;
    let scale = if m.dtype() == DType::U8 {
        1.0 / 255.0
    } else {
        1.0
    };
    let out = v
        .chunks_exact(c)
        .map(|p| f32::from(u8::from(crate::image::mask_value(p) * scale >= 0.5)))
        .collect();
    Ok((h, w, out))
}

/// An inpainting mask `[1, 1, h, w]` of 0s and 1s for a latent of shape `s` (`[B, C, h, w]`):
/// the [`binary_mask`] taken at every `H/h`-th row and column, as diffusers' nearest resize does
/// (a mask `[h, w]` at the latent's size as it is).
fn latent_mask(m: &Tensor, s: &[usize]) -> Result<Tensor> {
    let (h, w) = (s[2], s[3]);
    let (mh, mw, v) = binary_mask(m)?;
    if mh % h != 0 || mw % w != 0 {
        bail!("the mask is {mh}x{mw}, which is not a whole multiple of the latent's {h}x{w}");
    }
    let (fy, fx) = (mh / h, mw / w);
    let out: Vec<f32> = (0..h * w)
        .map(|i| v[(i / w) * fy * mw + (i % w) * fx])
        .collect();
    Tensor::from_f32(Kind::Tensor, &[1, 1, h, w], &out)
}

/// An inpainting mask `[1, 1, H, W]` of 0s and 1s at the pixels' own size ([`binary_mask`]).
fn pixel_mask(m: &Tensor) -> Result<Tensor> {
    let (h, w, v) = binary_mask(m)?;
    Tensor::from_f32(Kind::Tensor, &[1, 1, h, w], &v)
}

/// The guided prediction of step `i` of `n` from the model's output `out` (the conditional
/// rows, then the unconditional ones when `both`), combined in f64.
fn guided_prediction(
    guide: &mut samplers::guidance::Guidance,
    i: usize,
    n: usize,
    out: &Tensor,
    both: bool,
    batch: usize,
) -> Result<Tensor> {
    let wide = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.to_f32_vec()?.into_iter().map(f64::from).collect())
    };
    let (cond, uncond) = if both {
        let parts = out.split(0, &[batch, batch])?;
        (wide(&parts[0])?, Some(wide(&parts[1])?))
    } else {
        (wide(out)?, None)
    };
    let pred = guide
        .combine(i, n, &cond, uncond.as_deref(), batch)
        .map_err(|e| Error(e.0))?;
    let mut shape = out.shape().to_vec();
    shape[0] = batch;
    let pred: Vec<f32> = pred.into_iter().map(|v| v as f32).collect();
    Tensor::from_f32(Kind::Tensor, &shape, &pred)?.to_device(out.device())
}

/// `VAEDecode`: a latent as an image.
#[derive(Default)]
pub struct VAEDecode;

impl Node for VAEDecode {
    fn schema() -> NodeSchema {
        NodeSchema::new("VAEDecode")
            .category("latent")
            .doc(
                "Decodes a latent with the VAE (undoing its scaling and shift factors) into an \
                 image in [0, 1], [height, width, 3] (the first of a batch). A tile size above 0 \
                 decodes in overlapping tiles blended as diffusers does, so large images fit in \
                 memory.",
            )
            .input(Port::new("vae", "Model<Autoencoder>").doc("A VAE from LoadVAE."))
            .input(Port::new("latent", "Latent").doc("[B, C, h, w] latents."))
            .input(
                Port::new("tile_size", "Int")
                    .default(0i64)
                    .range(0.0, 4096.0)
                    .doc("Latent pixels per tile; 0 decodes whole."),
            )
            .output(Port::new("image", "Image").doc("[height, width, 3] in [0, 1]."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("vae")?;
        let vae = model
            .autoencoder_info()
            .map_err(|e| Error(format!("input 'vae': {e}")))?;
        let latent: Tensor = ctx.input("latent")?;
        let tile = ctx.input::<i64>("tile_size")? as usize;
        let s = latent.shape().to_vec();
        if s.len() != 4 || s[1] != vae.latent_channels {
            bail!(
                "the latent must be [B, {}, h, w], got {s:?}",
                vae.latent_channels
            );
        }
        let z = latent.cast(DType::F32)?.slice(0, 0, 1, 1)?;
        let z = z.affine(1.0 / vae.scaling_factor, vae.shift_factor)?;
        let img = if tile > 0 {
            let (size, overlap, only) = (scalar(tile as f32)?, scalar(0.25)?, scalar(1.0)?);
            let named = [
                ("latent", &z),
                ("tile_size", &size),
                ("tile_overlap", &overlap),
                ("tiled_only", &only),
            ];
            output(forward_named(&model, &named)?, "tiled", "the VAE")?
        } else {
            output(
                forward_named(&model, &[("latent", &z)])?,
                "decoded",
                "the VAE",
            )?
        };
        let (h, w) = (img.shape()[2] as i64, img.shape()[3] as i64);
        let img = img
            .affine(0.5, 0.5)?
            .clamp(0.0, 1.0)?
            .reshape(&[3, h, w])?
            .permute(&[1, 2, 0])?;
        ctx.set_output("image", img.to_device(Device::Cpu)?.with_kind(Kind::Image)?)
    }
}

/// `VAEEncode`: an image as a latent (the distribution's mean, scaled as the denoiser expects).
#[derive(Default)]
pub struct VAEEncode;

impl Node for VAEEncode {
    fn schema() -> NodeSchema {
        NodeSchema::new("VAEEncode")
            .category("latent")
            .doc(
                "Encodes an image [height, width, 3] (f32 in [0, 1] or u8) with the VAE into a latent \
                 [1, C, height/f, width/f]: the latent distribution's mean, shifted and scaled by \
                 the VAE's config (the inverse of VAEDecode). Height and width must be \
                 multiples of the VAE's downscale factor.",
            )
            .input(Port::new("vae", "Model<Autoencoder>").doc("A VAE from LoadVAE."))
            .input(Port::new("image", "Image").doc("[height, width, 3] in [0, 1] (LoadImage)."))
            .output(Port::new("latent", "Latent").doc("[1, C, h, w] latents."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("vae")?;
        let vae = model
            .autoencoder_info()
            .map_err(|e| Error(format!("input 'vae': {e}")))?;
        let image: Tensor = ctx.input("image")?;
        let mean = model.encode_image_mean(&image)?;
        let z = mean.affine(vae.scaling_factor, -vae.shift_factor * vae.scaling_factor)?;
        ctx.set_output("latent", z.with_kind(Kind::Latent)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn video_latents_count_frames_as_wan_does() {
        // 81 frames of 480x832 at 8x and 4 per latent frame: Wan's [16, 21, 60, 104].
        assert_eq!(
            video_latent_shape(81, 832, 480, 16, 8, 4).unwrap(),
            [1, 16, 21, 60, 104]
        );
        assert_eq!(
            video_latent_shape(1, 16, 16, 4, 8, 4).unwrap(),
            [1, 4, 1, 2, 2]
        );
        assert!(video_latent_shape(10, 16, 16, 4, 8, 4)
            .unwrap_err()
            .0
            .contains("1 + k"));
        assert!(video_latent_shape(9, 20, 16, 4, 8, 4)
            .unwrap_err()
            .0
            .contains("multiples"));
    }
}
