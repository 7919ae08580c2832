//! `SampleAudioVideo`: one sampler driving two towers' latents in lockstep, as BridgeDiT samples
//! them: at every step both towers are evaluated together (coupled by the bridge when one is
//! given, through block stepping), each with its own captions, its own classifier-free guidance
//! scale and negative prompt, and its own scheduler; the two schedules share the step count (a
//! timestep per modality). Modality-isolation guidance pushes each prediction away from the one
//! with the bridge switched off: `p + s·(p − p_alone)`. A video can continue an earlier one (a
//! scene extension): the first `context_frames` latent frames are held to the last frames of
//! `video_context`, noised to each step's level with the noise they started from, and set to
//! them exactly at the end, so the new frames grow out of the old ones.

use crate::bridge::{bridged_forward, Bridge, Coupled};
use ditflow_plugin::model::{
    Call, DenoiserInfo, DenoiserRef, Prediction, BRANCH_COND, BRANCH_UNCOND,
};
use ditflow_plugin::ops::concat;
use ditflow_plugin::prelude::*;
use ditflow_samplers::{self as samplers, apply_step, History, SamplerError, Scheduler};

/// One tower's side of the sampling: its model, schedule, conditioning rows and guidance.
struct Tower<'a> {
    name: &'static str,
    model: DenoiserRef<'a>,
    sched: Box<dyn Scheduler>,
    /// The conditioning parts the model reads, rows stacked (positive, then negative).
    conditioning: Vec<(String, Tensor)>,
    cfg: f64,
    x: Tensor,
    history: History<Tensor>,
    /// The seed of the tower's noise (its start, and a stochastic step's fresh noise).
    seed: u64,
}

/// A scheduler for a tower: `sampler` by name, or the class of `config`, with the fields the
/// model's prediction needs (the samplers' `scheduler_for`).
fn scheduler(
    ctx: &Context,
    info: &DenoiserInfo,
    sampler: &str,
    config: &str,
    steps: usize,
    who: &str,
) -> Result<Box<dyn Scheduler>> {
    let e = |e: SamplerError| Error(format!("the {who} scheduler: {}", e.0));
    let file = if config.is_empty() {
        None
    } else {
        Some(ctx.input_path(config)?)
    };
    let prediction = match info.prediction {
        Prediction::Unknown => samplers::ModelPrediction::Unknown,
        Prediction::Epsilon => samplers::ModelPrediction::Epsilon,
        Prediction::V => samplers::ModelPrediction::V,
        Prediction::Flow => samplers::ModelPrediction::Flow,
    };
    let (class, fields) =
        samplers::scheduler_for(sampler, file.as_deref(), prediction).map_err(e)?;
    samplers::build_scheduler(
        &class,
        &fields,
        steps,
        0,
        samplers::SigmaSource::SchedulerDefault,
    )
    .map_err(e)
}

/// The parts `info` reads of each row's conditioning, stacked along the batch.
fn stack_rows(
    rows: &[&Conditioning],
    info: &DenoiserInfo,
    who: &str,
) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for name in &info.conditioning {
        let parts: Vec<&Tensor> = rows
            .iter()
            .map(|c| {
                c.get(name).ok_or_else(|| {
                    Error(format!(
                        "the {who} conditioning has no '{name}', which the {who} tower reads"
                    ))
                })
            })
            .collect::<Result<_>>()?;
        if let Some(p) = parts.iter().find(|p| p.shape() != parts[0].shape()) {
            bail!(
                "the {who} prompts' '{name}' differ in shape ({:?} and {:?}): encode them to one \
                 length",
                parts[0].shape(),
                p.shape()
            );
        }
        out.push((name.clone(), concat(&parts, 0)?));
    }
    Ok(out)
}

/// Borrowed `(name, tensor)` pairs.
fn named_refs(v: &[(String, Tensor)]) -> Vec<(&str, &Tensor)> {
    v.iter().map(|(k, t)| (k.as_str(), t)).collect()
}

/// Known opening frames of a video latent: the context's frames and the noise they started from.
struct KnownFrames {
    frames: Tensor,
    noise: Tensor,
    k: usize,
}

impl KnownFrames {
    /// `x` with its first frames replaced by `a·frames + b·noise`.
    fn hold(&self, x: &Tensor, (a, b): (f64, f64)) -> Result<Tensor> {
        let f = x.shape()[2];
        let rest = x.split(2, &[self.k, f - self.k])?;
        let known = self
            .frames
            .affine(a, 0.0)?
            .add(&self.noise.affine(b, 0.0)?)?;
        concat(&[&known, &rest[1]], 2)
    }
}

/// The `video_context` input's last `context_frames` frames, for a video latent `x` that starts
/// as `init_sigma · noise`.
fn video_context(ctx: &Context, x: &Tensor, init_sigma: f64) -> Result<Option<KnownFrames>> {
    let k = ctx.input::<i64>("context_frames")?.max(0) as usize;
    let given: Option<Tensor> = ctx.input_opt("video_context")?;
    let (k, c) = match (k, given) {
        (0, _) => return Ok(None),
        (_, None) => bail!("context_frames {k} needs a video_context"),
        (k, Some(c)) => (k, c),
    };
    let (cs, xs) = (c.shape().to_vec(), x.shape().to_vec());
    if cs.len() != 5 || cs[0] != 1 || cs[1] != xs[1] || cs[3..] != xs[3..] {
        bail!("the video_context {cs:?} must be a latent like the video's {xs:?}, frames aside");
    }
    if k > cs[2] || k >= xs[2] {
        bail!(
            "context_frames {k}: the context has {} latent frames and the video {}; keep fewer \
             than the video's",
            cs[2],
            xs[2]
        );
    }
    let frames = c
        .to_device(x.device())?
        .cast(DType::F32)?
        .split(2, &[cs[2] - k, k])?
        .remove(1);
    let noise = x
        .split(2, &[k, xs[2] - k])?
        .remove(0)
        .affine(1.0 / init_sigma, 0.0)?;
    Ok(Some(KnownFrames { frames, noise, k }))
}

/// `SampleAudioVideo`.
#[derive(Default)]
pub struct SampleAudioVideo;

impl Node for SampleAudioVideo {
    fn schema() -> NodeSchema {
        NodeSchema::new("SampleAudioVideo")
            .category("sampling")
            .doc(
                "Denoises a video and an audio latent together, in lockstep by step index: both \
                 towers are evaluated at each step, coupled by the bridge (when given) through \
                 block stepping; each tower has its own captions, negative prompt, guidance \
                 scale and scheduler (video: unipc on flow sigmas by default; audio: dpmpp_2m). \
                 isolation > 0 adds modality-isolation guidance, p + isolation·(p − p without \
                 the bridge). Seeded noise: the video's from seed, the audio's from seed + 1.",
            )
            .input(Port::new("video", "Model<Denoiser>").doc("The video tower (LoadWan)."))
            .input(Port::new("audio", "Model<Denoiser>").doc("The audio tower (LoadStableAudio)."))
            .input(
                Port::new("bridge", "Model")
                    .optional()
                    .doc("From LoadBridge; without one the towers are sampled side by side."),
            )
            .input(Port::new("bridged", "Bool").default(true).doc(
                "Couple the towers through the bridge (false: switched off, each tower alone).",
            ))
            .input(
                Port::new("video_positive", "Conditioning")
                    .doc("The video caption's conditioning."),
            )
            .input(
                Port::new("video_negative", "Conditioning")
                    .optional()
                    .doc("The video negative (needed when video_cfg != 1)."),
            )
            .input(Port::new("audio_positive", "Conditioning").doc(
                "The audio caption's conditioning (with global_hidden_states for Stable Audio).",
            ))
            .input(
                Port::new("audio_negative", "Conditioning")
                    .optional()
                    .doc("The audio negative (needed when audio_cfg != 1)."),
            )
            .input(
                Port::new("video_latent", "Latent")
                    .doc("Sets the video latent's shape [1, C, frames, h, w]."),
            )
            .input(
                Port::new("audio_latent", "Latent")
                    .doc("Sets the audio latent's shape [1, C, length]."),
            )
            .input(
                Port::new("video_context", "Latent")
                    .optional()
                    .doc("An earlier video latent [1, C, frames, h, w] this one continues."),
            )
            .input(
                Port::new("context_frames", "Int")
                    .default(0i64)
                    .range(0.0, 10000.0)
                    .doc(
                        "How many of video_context's last latent frames open this video (0: none).",
                    ),
            )
            .input(
                Port::new("video_sampler", "String")
                    .default("unipc")
                    .doc("The video scheduler (unipc, flow_euler, or auto with a config)."),
            )
            .input(
                Port::new("video_scheduler_config", "String")
                    .default("")
                    .doc("A diffusers scheduler_config.json for the video."),
            )
            .input(
                Port::new("audio_sampler", "String")
                    .default("dpmpp_2m")
                    .doc("The audio scheduler (one of Sample's samplers, or auto)."),
            )
            .input(
                Port::new("audio_scheduler_config", "String")
                    .default("")
                    .doc("A diffusers scheduler_config.json for the audio."),
            )
            .input(
                Port::new("steps", "Int")
                    .default(20i64)
                    .range(1.0, 1000.0)
                    .doc("Steps, shared by both schedules."),
            )
            .input(
                Port::new("video_cfg", "Float")
                    .default(1.0)
                    .range(0.0, 100.0)
                    .doc("The video's guidance scale."),
            )
            .input(
                Port::new("audio_cfg", "Float")
                    .default(1.0)
                    .range(0.0, 100.0)
                    .doc("The audio's guidance scale."),
            )
            .input(
                Port::new("isolation", "Float")
                    .default(0.0)
                    .range(0.0, 100.0)
                    .doc("Modality-isolation guidance (0: off)."),
            )
            .input(
                Port::new("seed", "Int")
                    .default(0i64)
                    .doc("The noise seed."),
            )
            .input(
                Port::new("preview_every", "Int")
                    .default(0i64)
                    .range(0.0, 1e6)
                    .doc(
                        "Every this many steps (and at the last), a node_preview event with a \
                         PNG of the video's current x₀ estimate, its latent frames side by \
                         side, one pixel per latent pixel through preview_map (0: none).",
                    ),
            )
            .input(Port::new("preview_map", "String").default("").doc(
                "The video VAE's latent-to-RGB map, latent_rgb.json (tools/fit_latent_rgb.py; \
                 relative to the graph's folder); empty: the first three channels as colours, \
                 which is the picture itself for a pixel-space tower.",
            ))
            .output(Port::new("video_latent", "Latent").doc("The denoised video latent."))
            .output(Port::new("audio_latent", "Latent").doc("The denoised audio latent."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let device = ctx.device();
        let bridge_value: Option<Value> = ctx.input_opt("bridge")?;
        let bridge = match &bridge_value {
            Some(v) => Some(
                v.as_object::<Bridge>()
                    .map_err(|e| Error(format!("input 'bridge': {e} (load it with LoadBridge)")))?,
            ),
            None => None,
        };
        let bridge = if ctx.input::<bool>("bridged")? {
            bridge
        } else {
            None
        };
        let isolation: f64 = ctx.input("isolation")?;
        if isolation != 0.0 && bridge.is_none() {
            bail!(
                "isolation guidance compares with the bridge switched off: connect a bridge and \
                 leave it on"
            );
        }
        let steps = ctx.input::<i64>("steps")?.max(1) as usize;
        let seed = ctx.input::<i64>("seed")? as u64;
        let video_value: Value = ctx.input("video")?;
        let audio_value: Value = ctx.input("audio")?;
        let mut towers = Vec::with_capacity(2);
        for (k, (name, value)) in [("video", &video_value), ("audio", &audio_value)]
            .into_iter()
            .enumerate()
        {
            let model = value
                .as_denoiser()
                .map_err(|e| Error(format!("input '{name}': {e}")))?;
            let info = model.info().clone();
            let sampler: String = ctx.input(&format!("{name}_sampler"))?;
            let config: String = ctx.input(&format!("{name}_scheduler_config"))?;
            let sched = scheduler(ctx, &info, &sampler, &config, steps, name)?;
            let cfg: f64 = ctx.input(&format!("{name}_cfg"))?;
            let positive: Conditioning = ctx.input(&format!("{name}_positive"))?;
            let negative: Option<Conditioning> = ctx.input_opt(&format!("{name}_negative"))?;
            let guided = cfg != 1.0;
            let rows: Vec<&Conditioning> = match (&negative, guided) {
                (_, false) => vec![&positive],
                (Some(n), true) => vec![&positive, n],
                (None, true) => bail!("{name}_cfg {cfg} needs a {name}_negative"),
            };
            let conditioning = stack_rows(&rows, &info, name)?;
            let shape = ctx
                .input::<Tensor>(&format!("{name}_latent"))?
                .shape()
                .to_vec();
            if shape.first() != Some(&1) {
                bail!("the {name} latent must have one row, got {shape:?}");
            }
            let seed = seed + k as u64;
            let x = ditflow_plugin::ops::randn(&shape, seed, device)?
                .affine(sched.init_noise_sigma(), 0.0)?;
            let history = History::new(sched.as_ref());
            towers.push(Tower {
                name,
                model,
                sched,
                conditioning,
                cfg,
                x,
                history,
                seed,
            });
        }
        if towers[0].sched.num_steps() != towers[1].sched.num_steps() {
            bail!(
                "the video schedule has {} steps and the audio one {}: they step in lockstep",
                towers[0].sched.num_steps(),
                towers[1].sched.num_steps()
            );
        }
        let n = towers[0].sched.num_steps();
        let coupled = bridge
            .map(|b| Coupled::new(ctx, b, &video_value, &audio_value))
            .transpose()?;
        let context = video_context(ctx, &towers[0].x, towers[0].sched.init_noise_sigma())?;
        let preview_every = ctx.input::<i64>("preview_every")?.max(0) as usize;
        let preview_map = if preview_every > 0 {
            let path: String = ctx.input("preview_map")?;
            let channels = towers[0].x.shape()[1];
            Some(samplers::preview::LatentRgb::for_input(
                ctx, &path, channels,
            )?)
        } else {
            None
        };
        let noising = towers[0].sched.noising();
        for i in 0..n {
            ctx.check_cancelled()?;
            if let Some(c) = &context {
                let step = &towers[0].sched.steps()[i];
                towers[0].x = c.hold(&towers[0].x, noising.coefficients(step.sigma))?;
            }
            // Each tower's inputs: the scaled latent (rows for the guided batch), its timestep,
            // its conditioning.
            let mut calls = Vec::with_capacity(2);
            let mut inputs: Vec<Vec<(String, Tensor)>> = Vec::with_capacity(2);
            for t in &towers {
                let step = &t.sched.steps()[i];
                let rows = if t.cfg != 1.0 { 2 } else { 1 };
                let x = t.x.affine(step.input_scale, 0.0)?;
                let x = concat(&vec![&x; rows], 0)?;
                let ts =
                    Tensor::from_f32(Kind::Tensor, &[rows], &vec![step.timestep as f32; rows])?;
                let mut named = vec![
                    ("hidden_states".to_string(), x),
                    ("timestep".to_string(), ts),
                ];
                named.extend(t.conditioning.iter().cloned());
                inputs.push(named);
                let mut call = Call::single(rows, step.timestep);
                call.step_index = i;
                call.num_steps = n;
                call.sigma = step.sigma;
                call.branches = (0..rows)
                    .map(|r| if r == 0 { BRANCH_COND } else { BRANCH_UNCOND })
                    .collect();
                call.cond_ids = (0..rows as i64).collect();
                calls.push(call);
            }
            let (rv, ra) = (named_refs(&inputs[0]), named_refs(&inputs[1]));
            let (pv, pa) = match bridge.zip(coupled.as_ref()) {
                Some((b, coupled)) => {
                    if (towers[0].cfg != 1.0) != (towers[1].cfg != 1.0) {
                        bail!(
                            "with a bridge, both towers are guided or neither (the bridge pairs \
                             their rows): set video_cfg and audio_cfg both to 1 or both above"
                        );
                    }
                    let on = bridged_forward(b, coupled, (&calls[0], &calls[1]), (&rv, &ra), true)?;
                    if isolation != 0.0 {
                        let off =
                            bridged_forward(b, coupled, (&calls[0], &calls[1]), (&rv, &ra), false)?;
                        let push = |p: &Tensor, q: &Tensor| -> Result<Tensor> {
                            p.add(&p.sub(q)?.affine(isolation, 0.0)?)
                        };
                        (push(&on.0, &off.0)?, push(&on.1, &off.1)?)
                    } else {
                        on
                    }
                }
                None => (
                    towers[0].model.forward(&calls[0], &rv)?,
                    towers[1].model.forward(&calls[1], &ra)?,
                ),
            };
            for (t, pred) in towers.iter_mut().zip([pv, pa]) {
                let out = if t.cfg != 1.0 {
                    let parts = pred.split(0, &[1, 1])?;
                    let (c, u) = (&parts[0], &parts[1]);
                    u.add(&c.sub(u)?.affine(t.cfg, 0.0)?)?
                } else {
                    pred
                };
                let step = &t.sched.steps()[i];
                let due = (i + 1).is_multiple_of(preview_every.max(1)) || i + 1 == n;
                if let (Some(map), "video", true) = (&preview_map, t.name, due) {
                    // The video's x₀ estimate at this step, from the sample and the guided
                    // prediction.
                    let x0 =
                        t.x.affine(step.denoised_x, 0.0)?
                            .add(&out.affine(step.denoised_output, 0.0)?)?;
                    ctx.preview(i as u64 + 1, n as u64, &map.png(&x0)?);
                }
                let fresh = if step.noise != 0.0 {
                    let stream = samplers::step_noise_stream(i);
                    let shape = t.x.shape().to_vec();
                    Some(ditflow_plugin::ops::randn_stream(
                        &shape, t.seed, stream, device,
                    )?)
                } else {
                    None
                };
                t.x = apply_step(step, i, &t.x, &out, fresh.as_ref(), &mut t.history)
                    .map_err(|e| Error(format!("the {} step {i}: {}", t.name, e.0)))?;
            }
            ctx.progress(i as u64 + 1, n as u64);
        }
        if let Some(c) = &context {
            towers[0].x = c.hold(&towers[0].x, (1.0, 0.0))?;
        }
        let video = towers[0].x.with_kind(Kind::Latent)?;
        let audio = towers[1].x.with_kind(Kind::Latent)?;
        ctx.set_output("video_latent", video)?;
        ctx.set_output("audio_latent", audio)
    }
}
