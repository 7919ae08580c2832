//! SD3 ControlNet as a patch: diffusers' `SD3ControlNetModel` (the transformer's trunk, every
//! block updating both streams, the hint latent added through its own patch embedding, a zero-
//! initialised linear per block) run on each call's inputs, its residuals added after the base
//! model's blocks as `SD3Transformer2DModel` does (`interval_control`; not after the last,
//! `context_pre_only` block). `LoadSD3ControlNet` reads the model; `ApplySD3ControlNet` encodes
//! the hint image with the VAE as `StableDiffusion3ControlNetPipeline` does and patches any SD3
//! denoiser with it, with a strength and the pipeline's start/end rule. Several stack: their
//! residuals add up, as `SD3MultiControlNetModel` sums them.

use crate::sd3::{Inputs, Sd3};
use ditflow_nn::controlnet::{
    file_label, hint_latent, kept, patch_digest, residual_index_sd3, stacks_summary,
};
use ditflow_nn::{patchify, Config, Linear, Weights};
use ditflow_plugin::files::{input_path, model_fingerprint};
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::model::{Call, DenoiserInfo, PatchHooks, PatchSpec};
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A loaded `SD3ControlNetModel`.
pub struct Sd3ControlNet {
    pub trunk: Sd3,
    /// `controlnet_blocks`: one `dim → dim` linear per block.
    pub out: Vec<Linear>,
    /// `pos_embed_input.proj`: the hint latent's patch embedding (no positions).
    pub input_w: Tensor,
    pub input_b: Tensor,
    /// The hint's channels (`in_channels + extra_conditioning_channels`).
    pub hint_channels: usize,
    /// InstantX's rule: zero pooled projections, and no VAE shift on the hint.
    pub force_zeros_for_pooled_projection: bool,
    pub path: PathBuf,
}

impl Object for Sd3ControlNet {
    const TAG: &'static str = "ditflow-sd3.controlnet";
}

impl Sd3ControlNet {
    pub fn load(path: &Path, device: Device, ctx: &Context) -> Result<Sd3ControlNet> {
        let cfg = Config::read(path)?;
        let bad = |what: String| Error(format!("{}: {what}", cfg.path.display()));
        if cfg.class_name() != Some("SD3ControlNetModel") {
            return Err(bad(format!(
                "class \"{}\" is not an SD3ControlNetModel",
                cfg.class_name().unwrap_or("")
            )));
        }
        let flag =
            |k: &str, default: bool| cfg.json.get(k).and_then(|v| v.as_bool()).unwrap_or(default);
        if !flag("use_pos_embed", true)
            || cfg
                .json
                .get("joint_attention_dim")
                .is_some_and(|v| v.is_null())
        {
            return Err(bad(
                "SD3.5 Large's ControlNets (no position embedding, no text stream) are not supported yet"
                    .into(),
            ));
        }
        if let Some(t) = cfg.json.get("pos_embed_type").and_then(|v| v.as_str()) {
            if t != "sincos" {
                return Err(bad(format!("pos_embed_type \"{t}\" is not supported")));
            }
        }
        let w = Weights::load(ctx, path, device)?;
        let trunk = Sd3::load_trunk(&cfg, &w, device, true)?;
        let dim = trunk.dim;
        let out = (0..trunk.blocks.len())
            .map(|i| w.linear(&format!("controlnet_blocks.{i}"), dim, dim, true))
            .collect::<Result<Vec<_>>>()?;
        let hint_channels = trunk.in_channels + cfg.usize_or("extra_conditioning_channels", 0)?;
        let p = trunk.patch;
        Ok(Sd3ControlNet {
            input_w: w.get("pos_embed_input.proj.weight", &[dim, hint_channels, p, p])?,
            input_b: w.get("pos_embed_input.proj.bias", &[dim])?,
            trunk,
            out,
            hint_channels,
            force_zeros_for_pooled_projection: flag("force_zeros_for_pooled_projection", true),
            path: path.to_path_buf(),
        })
    }

    /// The residual of each block `[B, L_img, D]` (unscaled) for latents `x` `[B, C, H, W]`,
    /// the hint latent `hint` `[B, C', H, W]` and the text conditioning.
    pub fn forward(
        &self,
        x: &Tensor,
        hint: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_projections: &Tensor,
        timestep: &[f32],
    ) -> Result<Vec<Tensor>> {
        let t = &self.trunk;
        let dl = LinearDeltas::none();
        let zeros;
        let pooled = if self.force_zeros_for_pooled_projection {
            zeros = Tensor::zeros(Kind::Tensor, DType::F32, pooled_projections.shape())?
                .to_device(t.device)?;
            &zeros
        } else {
            pooled_projections
        };
        let e = t.embed(
            &Inputs {
                hidden_states: x,
                encoder_hidden_states,
                pooled_projections: pooled,
                timestep,
                skip_layers: &[],
            },
            dl,
        )?;
        let hint = hint.to_device(t.device)?;
        let mut img = e
            .img
            .add(&patchify(&hint, &self.input_w, &self.input_b, t.patch)?)?;
        let mut txt = e.txt;
        let mut out = Vec::with_capacity(self.out.len());
        for (blk, proj) in t.blocks.iter().zip(&self.out) {
            (img, txt) = t.joint_block(blk, &e.silu, dl, img, txt, None)?;
            out.push(proj.apply(&img, "none", dl)?);
        }
        Ok(out)
    }

    /// Bytes of its weights (the patch's extra network).
    pub fn bytes(&self) -> u64 {
        let linears: u64 = self
            .trunk
            .linears()
            .iter()
            .chain(self.out.iter().map(|l| l.info()).collect::<Vec<_>>().iter())
            .map(|l| ((l.out_features + 1) * l.in_features * 4) as u64)
            .sum();
        linears
            + (self.input_w.numel() + self.trunk.proj_w.numel() + self.trunk.pos_embed.numel())
                as u64
                * 4
    }
}

/// The patch: the ControlNet, its hint latent, its window, and the residuals of the current
/// call (computed from the call's inputs).
struct ControlNetPatch {
    controlnet: Value,
    /// `[1, C', h, w]`.
    hint: Tensor,
    start: f64,
    end: f64,
    base_blocks: usize,
    residuals: Mutex<Option<Vec<Tensor>>>,
}

impl ControlNetPatch {
    fn net(&self) -> Result<&Sd3ControlNet> {
        self.controlnet.as_object::<Sd3ControlNet>()
    }
}

impl PatchHooks for ControlNetPatch {
    fn call_inputs(&self, call: &Call, inputs: &ditflow_plugin::model::Inputs) -> Result<()> {
        let mut slot = self.residuals.lock().unwrap_or_else(|p| p.into_inner());
        *slot = None;
        if !kept(call, self.start, self.end) {
            return Ok(());
        }
        let net = self.net()?;
        let x = inputs.require("hidden_states")?;
        let rows = x.shape().first().copied().unwrap_or(0);
        if x.shape()[2..] != self.hint.shape()[2..] {
            bail!(
                "the hint latent is {:?} but the model's latent is {:?}: give a hint image of the \
                 picture's size",
                self.hint.shape(),
                x.shape()
            );
        }
        let hint = ditflow_plugin::ops::concat(&vec![&self.hint; rows], 0)?;
        let t = match inputs.get("timestep") {
            Some(t) => t.to_f32_vec()?,
            None => vec![call.timestep as f32; rows],
        };
        *slot = Some(net.forward(
            x,
            &hint,
            inputs.require("encoder_hidden_states")?,
            inputs.require("pooled_projections")?,
            &t,
        )?);
        Ok(())
    }

    fn block_residual(
        &self,
        _call: &Call,
        stack: usize,
        block: usize,
        _hidden: &Tensor,
    ) -> Result<Option<(Tensor, usize)>> {
        // Not after the last block: its text stream is context_pre_only.
        if stack != 0 || block + 1 >= self.base_blocks {
            return Ok(None);
        }
        let slot = self.residuals.lock().unwrap_or_else(|p| p.into_inner());
        Ok(slot.as_ref().map(|res| {
            let i = residual_index_sd3(block, self.base_blocks, res.len());
            // SD3's joint sequence is image then text: the residual starts at token 0.
            (res[i].clone(), 0)
        }))
    }

    fn memory_estimate(&self, _info: &DenoiserInfo) -> u64 {
        self.net().map_or(0, Sd3ControlNet::bytes)
    }
}

/// `LoadSD3ControlNet`: a diffusers `SD3ControlNetModel` folder.
#[derive(Default)]
pub struct LoadSD3ControlNet;

impl Node for LoadSD3ControlNet {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadSD3ControlNet")
            .category("loaders")
            .doc(
                "Loads a diffusers SD3ControlNetModel folder (InstantX's and Stability AI's \
                 SD3/SD3.5 Medium ControlNets). Cached until a file in the folder changes.",
            )
            .input(
                Port::new("path", "String").doc(
                    "The ControlNet folder; relative paths are taken from the graph's folder.",
                ),
            )
            .output(Port::new("controlnet", "Model").doc("The ControlNet, for ApplySD3ControlNet."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = input_path(ctx, "path")?;
        let net = Sd3ControlNet::load(&dir, ctx.device(), ctx)?;
        let value = ctx.make_object(net)?;
        ctx.set_output("controlnet", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        model_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}

/// `ApplySD3ControlNet`: model → model with a ControlNet's residuals.
#[derive(Default)]
pub struct ApplySD3ControlNet;

impl Node for ApplySD3ControlNet {
    fn schema() -> NodeSchema {
        NodeSchema::new("ApplySD3ControlNet")
            .category("patches")
            .doc(
                "Patches an SD3 denoiser with a ControlNet, as StableDiffusion3ControlNetPipeline \
                 runs it: the hint image is encoded with the VAE (its mean; InstantX's \
                 ControlNets skip the VAE's shift), the ControlNet runs on each step's latents \
                 and prompt, and its residuals, times strength, are added after the model's \
                 blocks. It is active at step i of n unless i/n < start or (i+1)/n > end. \
                 Several stack (their residuals add up). A feature cache that skips blocks is \
                 refused with it. The hint image must have the picture's size (resize it first).",
            )
            .input(
                Port::new("model", "Model<Denoiser>")
                    .doc("An SD3 or SD3.5 denoiser (LoadSD3, possibly patched)."),
            )
            .input(Port::new("controlnet", "Model").doc("From LoadSD3ControlNet."))
            .input(
                Port::new("vae", "Model<Autoencoder>").doc("The VAE that encodes the hint image."),
            )
            .input(
                Port::new("image", "Image")
                    .doc("The hint image [height, width, 3] in [0, 1] (edges, depth, ...)."),
            )
            .input(
                Port::new("strength", "Float")
                    .default(1.0)
                    .range(-10.0, 10.0)
                    .doc("controlnet_conditioning_scale."),
            )
            .input(
                Port::new("start", "Float")
                    .default(0.0)
                    .range(0.0, 1.0)
                    .doc("control_guidance_start."),
            )
            .input(
                Port::new("end", "Float")
                    .default(1.0)
                    .range(0.0, 1.0)
                    .doc("control_guidance_end."),
            )
            .output(Port::new("model", "Model<Denoiser>").doc("The model with the ControlNet."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("model")?;
        let controlnet: Value = ctx.input("controlnet")?;
        let vae: Value = ctx.input("vae")?;
        let image: Tensor = ctx.input("image")?;
        let strength: f64 = ctx.input("strength")?;
        let (start, end): (f64, f64) = (ctx.input("start")?, ctx.input("end")?);
        let net = controlnet.as_object::<Sd3ControlNet>().map_err(|e| {
            Error(format!(
                "input 'controlnet': {e} (load it with LoadSD3ControlNet)"
            ))
        })?;
        let info = model
            .as_denoiser()
            .map_err(|e| Error(format!("input 'model': {e}")))?
            .info()
            .clone();
        let file = net.path.display();
        let base_blocks = match info.stacks.as_slice() {
            [s] if s.name == "transformer_blocks" => s.n_blocks,
            _ => bail!(
                "{file}: an SD3 ControlNet needs an SD3 model (one stack of joint blocks); this \
                 model has {}",
                stacks_summary(&info)
            ),
        };
        let width = info.streams.first().map_or(0, |s| s.width);
        if width != net.trunk.dim || net.out.is_empty() || net.out.len() > base_blocks {
            bail!(
                "{file}: the ControlNet has {} blocks of width {}, which do not fit the model's \
                 {base_blocks} blocks of width {width}",
                net.out.len(),
                net.trunk.dim
            );
        }
        let hint = hint_latent(&vae, &image, !net.force_zeros_for_pooled_projection)
            .map_err(|e| Error(format!("the hint image: {e}")))?;
        if hint.shape()[1] != net.hint_channels {
            bail!(
                "{file}: the hint latent has {} channels; the ControlNet takes {}",
                hint.shape()[1],
                net.hint_channels
            );
        }
        let mut spec = PatchSpec::new(&format!("SD3ControlNet({})", file_label(&net.path)));
        spec.flags = ditflow_plugin::abi::DF_PATCH_NEEDS_FRESH;
        spec.strength = strength;
        spec.stack = Some(0);
        spec.block_residual = true;
        spec.call_inputs = true;
        spec.memory_estimate = true;
        spec.required_capabilities = ditflow_plugin::abi::DF_CAP_BLOCK_RESIDUAL;
        spec.digest = patch_digest(&hint, &net.path, &[start, end, strength])? | 1;
        let patch = ControlNetPatch {
            controlnet: controlnet.clone(),
            hint,
            start,
            end,
            base_blocks,
            residuals: Mutex::new(None),
        };
        let v = ctx.patch_model(&model, &spec, patch)?;
        ctx.set_output("model", v)
    }
}
