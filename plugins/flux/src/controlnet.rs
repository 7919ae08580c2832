//! Flux ControlNet as a patch: diffusers' `FluxControlNetModel` (the transformer's trunk with
//! its own depths, the packed hint added through `controlnet_x_embedder`, a zero-initialised
//! linear per block; in union mode a control-mode embedding prepended to the text) run on each
//! call's inputs, its residuals added after the base model's double and single blocks as
//! `FluxTransformer2DModel` does: every `interval_control` blocks (rounded up), or, for XLabs'
//! ControlNets (those with an input hint block), repeated over the double blocks
//! (`controlnet_blocks_repeat`). `LoadFluxControlNet` reads the model; `ApplyFluxControlNet`
//! makes the hint as `FluxControlNetPipeline` does (the VAE's latent, or for XLabs' the image
//! through the hint block) and patches any Flux denoiser with it (two patches, one per block
//! stack, sharing the residuals). Several stack: their residuals add up.

use crate::denoiser::latent_image_ids;
use crate::flux::{Flux, Inputs, Run};
use ditflow_nn::controlnet::{
    file_label, hint_latent, kept, patch_digest, residual_index_flux, residual_index_repeat,
    stacks_summary,
};
use ditflow_nn::{Config, Conv2d, Linear, Weights};
use ditflow_plugin::encoder_api::image_to_signed_nchw;
use ditflow_plugin::files::{fnv1a, input_path, model_fingerprint};
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::model::{Call, DenoiserInfo, PatchHooks, PatchSpec};
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A loaded `FluxControlNetModel`.
pub struct FluxControlNet {
    pub trunk: Flux,
    /// `controlnet_blocks` and `controlnet_single_blocks`.
    pub double_out: Vec<Linear>,
    pub single_out: Vec<Linear>,
    /// `controlnet_x_embedder`: the packed hint's embedding.
    pub hint_embedder: Linear,
    /// Union mode: `controlnet_mode_embedder.weight`, `[num_mode, D]`.
    pub modes: Option<Tensor>,
    /// XLabs' ControlNets: `input_hint_block`, which makes the hint from the image itself.
    pub hint_block: Option<HintBlock>,
    /// The hint's patch size when it is packed into tokens: the config's `patch_size` after a
    /// hint block, 2 for a VAE latent (packed as FluxPipeline packs latents).
    pub hint_patch: usize,
    pub path: PathBuf,
}

/// diffusers' `ControlNetConditioningEmbedding` with `block_out_channels` (16, 16, 16, 16), as
/// `FluxControlNetModel` builds it: a 3×3 convolution in, three pairs of a 3×3 convolution and
/// a stride-2 one, a 3×3 convolution out, SiLU after each but the last (8× smaller).
pub struct HintBlock {
    convs: Vec<Conv2d>,
}

impl HintBlock {
    const WIDTH: usize = 16;

    fn load(w: &Weights, channels: usize) -> Result<HintBlock> {
        let c = HintBlock::WIDTH;
        let mut convs = vec![Conv2d::load(w, "input_hint_block.conv_in", 3, c, 3, 1, 1)?];
        for i in 0..6 {
            let prefix = format!("input_hint_block.blocks.{i}");
            convs.push(Conv2d::load(w, &prefix, c, c, 3, 1 + i % 2, 1)?);
        }
        convs.push(Conv2d::load(
            w,
            "input_hint_block.conv_out",
            c,
            channels,
            3,
            1,
            1,
        )?);
        Ok(HintBlock { convs })
    }

    /// `[B, 3, H, W]` in [-1, 1] → `[B, channels, H/8, W/8]`.
    pub fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let last = self.convs.len() - 1;
        let mut x = image.clone();
        for (i, conv) in self.convs.iter().enumerate() {
            x = conv.forward(&x)?;
            if i < last {
                x = x.unary("silu")?;
            }
        }
        Ok(x)
    }
}

impl Object for FluxControlNet {
    const TAG: &'static str = "ditflow-flux.controlnet";
}

/// One call's residuals: per double block and per single block, `[B, L_img, D]`.
type Residuals = (Vec<Tensor>, Vec<Tensor>);

impl FluxControlNet {
    pub fn load(path: &Path, device: Device, ctx: &Context) -> Result<FluxControlNet> {
        let cfg = Config::read(path)?;
        let bad = |what: String| Error(format!("{}: {what}", cfg.path.display()));
        if cfg.class_name() != Some("FluxControlNetModel") {
            return Err(bad(format!(
                "class \"{}\" is not a FluxControlNetModel",
                cfg.class_name().unwrap_or("")
            )));
        }
        let w = Weights::load(ctx, path, device)?;
        let trunk = Flux::load_trunk(&cfg, &w, device, true)?;
        let dim = trunk.dim;
        let (hint_block, hint_patch) = match cfg.opt_usize("conditioning_embedding_channels")? {
            Some(channels) => {
                let patch = cfg.opt_usize("patch_size")?.unwrap_or(1).max(1);
                if channels * patch * patch != trunk.in_channels {
                    return Err(bad(format!(
                        "the input hint block makes {channels} channels, which packed in \
                         {patch}x{patch} patches do not give the {} channels of \
                         controlnet_x_embedder",
                        trunk.in_channels
                    )));
                }
                (Some(HintBlock::load(&w, channels)?), patch)
            }
            None => (None, 2),
        };
        let outs = |prefix: &str, n: usize| -> Result<Vec<Linear>> {
            (0..n)
                .map(|i| w.linear(&format!("{prefix}.{i}"), dim, dim, true))
                .collect()
        };
        let modes = match cfg.opt_usize("num_mode")? {
            Some(n) => Some(w.get("controlnet_mode_embedder.weight", &[n, dim])?),
            None => None,
        };
        Ok(FluxControlNet {
            double_out: outs("controlnet_blocks", trunk.double.len())?,
            single_out: outs("controlnet_single_blocks", trunk.single.len())?,
            hint_embedder: w.linear("controlnet_x_embedder", trunk.in_channels, dim, true)?,
            modes,
            hint_block,
            hint_patch,
            trunk,
            path: path.to_path_buf(),
        })
    }

    /// The residuals (unscaled) for packed latents `inp.hidden_states` and the packed hint
    /// `[B, L_img, C·4]`, with control mode `mode` in union mode.
    pub fn forward(&self, inp: &Inputs, hint: &Tensor, mode: Option<usize>) -> Result<Residuals> {
        let t = &self.trunk;
        let dl = LinearDeltas::none();
        let e = t.embed(inp, dl)?;
        let img = e.img.add(&self.hint_embedder.apply(
            &hint.to_device(t.device)?,
            "none",
            dl,
        )?)?;
        let (mut txt, txt_ids) = match (&self.modes, mode) {
            (Some(table), Some(m)) => {
                let n = table.shape()[0];
                if m >= n {
                    bail!("control mode {m} is not one of this union ControlNet's {n} modes");
                }
                // The mode's embedding first, at the first text token's position.
                let b = e.txt.shape()[0];
                let emb =
                    table
                        .slice(0, m as i64, m as i64 + 1, 1)?
                        .reshape(&[1, 1, t.dim as i64])?;
                let emb = ditflow_plugin::ops::concat(&vec![&emb; b], 0)?;
                let ids = ditflow_plugin::ops::concat(
                    &[&inp.txt_ids.slice(0, 0, 1, 1)?, inp.txt_ids],
                    0,
                )?;
                (ditflow_plugin::ops::concat(&[&emb, &e.txt], 1)?, ids)
            }
            (Some(_), None) => bail!("a union ControlNet needs a control mode"),
            (None, _) => (e.txt, inp.txt_ids.clone()),
        };
        let rope = t.rope(&txt_ids, inp.img_ids)?;
        let (lt, li) = (txt.shape()[1], img.shape()[1]);
        let run = Run {
            silu: &e.silu,
            rope: &rope,
            dl,
            lt,
            li,
        };
        let mut img = img;
        let mut double = Vec::with_capacity(self.double_out.len());
        for (blk, proj) in t.double.iter().zip(&self.double_out) {
            (txt, img) = t.double_block(blk, &run, txt, img, None)?;
            double.push(proj.apply(&img, "none", dl)?);
        }
        let mut joint = ditflow_plugin::ops::concat(&[&txt, &img], 1)?;
        let mut single = Vec::with_capacity(self.single_out.len());
        for (blk, proj) in t.single.iter().zip(&self.single_out) {
            joint = t.single_block(blk, &run, joint)?;
            let img = joint.split(1, &[lt, li])?.remove(1);
            single.push(proj.apply(&img, "none", dl)?);
        }
        Ok((double, single))
    }

    /// Bytes of its weights (the patch's extra network).
    pub fn bytes(&self) -> u64 {
        let mut infos = self.trunk.linears();
        infos.extend(
            self.double_out
                .iter()
                .chain(&self.single_out)
                .chain([&self.hint_embedder])
                .map(Linear::info),
        );
        let convs = self.hint_block.as_ref().map_or(0, |h| {
            h.convs
                .iter()
                .map(|c| c.weight.numel() + c.bias.as_ref().map_or(0, Tensor::numel))
                .sum::<usize>() as u64
                * 4
        });
        infos
            .iter()
            .map(|l| ((l.out_features + 1) * l.in_features * 4) as u64)
            .sum::<u64>()
            + self.modes.as_ref().map_or(0, |m| m.numel() as u64 * 4)
            + convs
    }
}

/// What the two patches (double and single stack) of one ControlNet share.
struct Shared {
    controlnet: Value,
    /// The hint packed into tokens, `[1, L_img, C·p²]`.
    hint: Tensor,
    /// Its shape before packing, `[1, C, h, w]`, for messages.
    hint_shape: Vec<usize>,
    /// XLabs' rule: the double blocks' residuals repeat (`controlnet_blocks_repeat`).
    repeat: bool,
    mode: Option<usize>,
    start: f64,
    end: f64,
    /// The base model's double and single block counts.
    base: (usize, usize),
    residuals: Mutex<Option<Residuals>>,
}

/// One stack's patch; the double-stack one runs the ControlNet on the call's inputs.
struct ControlNetPatch {
    shared: Arc<Shared>,
    stack: usize,
}

impl ControlNetPatch {
    fn net(&self) -> Result<&FluxControlNet> {
        self.shared.controlnet.as_object::<FluxControlNet>()
    }
}

impl PatchHooks for ControlNetPatch {
    fn call_inputs(&self, call: &Call, inputs: &ditflow_plugin::model::Inputs) -> Result<()> {
        let s = &self.shared;
        let mut slot = s.residuals.lock().unwrap_or_else(|p| p.into_inner());
        *slot = None;
        if !kept(call, s.start, s.end) {
            return Ok(());
        }
        let net = self.net()?;
        let x = inputs.require("hidden_states")?;
        let rows = x.shape().first().copied().unwrap_or(0);
        let hint = ditflow_plugin::ops::concat(&vec![&s.hint; rows], 0)?;
        let (x, img_ids) = if x.shape().len() == 4 {
            let ids = latent_image_ids(x.shape()[2] / 2, x.shape()[3] / 2)?;
            (ditflow_nn::pack_latents(x, 2)?, ids)
        } else {
            (x.clone(), inputs.require("img_ids")?.clone())
        };
        if x.shape().get(1) != hint.shape().get(1) {
            bail!(
                "the hint ({:?}, {} tokens) does not fit the model's latent ({:?}, {} tokens): \
                 give a hint image of the picture's size",
                s.hint_shape,
                hint.shape()[1],
                inputs.require("hidden_states")?.shape(),
                x.shape().get(1).copied().unwrap_or(0)
            );
        }
        let text = inputs.require("encoder_hidden_states")?;
        let txt_ids = match inputs.get("txt_ids") {
            Some(ids) => ids.clone(),
            None => Tensor::zeros(Kind::Tensor, DType::F32, &[text.shape()[1], 3])?,
        };
        let t = match inputs.get("timestep") {
            Some(t) => t.to_f32_vec()?,
            None => vec![call.sigma as f32; rows],
        };
        let guidance = match (&net.trunk.guidance_embedder, inputs.get("guidance")) {
            (None, _) => None,
            (Some(_), Some(g)) => {
                let g = g.to_f32_vec()?;
                Some(if g.len() == 1 { vec![g[0]; rows] } else { g })
            }
            (Some(_), None) => bail!(
                "the ControlNet has a guidance embedding but the model's call gives no guidance"
            ),
        };
        *slot = Some(net.forward(
            &Inputs {
                hidden_states: &x,
                encoder_hidden_states: text,
                pooled_projections: inputs.require("pooled_projections")?,
                timestep: &t,
                img_ids: &img_ids,
                txt_ids: &txt_ids,
                guidance: guidance.as_deref(),
            },
            &hint,
            s.mode,
        )?);
        Ok(())
    }

    fn block_residual(
        &self,
        _call: &Call,
        stack: usize,
        block: usize,
        hidden: &Tensor,
    ) -> Result<Option<(Tensor, usize)>> {
        if stack != self.stack {
            return Ok(None);
        }
        let s = &self.shared;
        let slot = s.residuals.lock().unwrap_or_else(|p| p.into_inner());
        let Some((double, single)) = slot.as_ref() else {
            return Ok(None);
        };
        let (res, n_base) = if stack == 0 {
            (double, s.base.0)
        } else {
            (single, s.base.1)
        };
        if res.is_empty() {
            return Ok(None);
        }
        let index = if s.repeat && stack == 0 {
            residual_index_repeat(block, res.len())
        } else {
            residual_index_flux(block, n_base, res.len())
        };
        let r = &res[index];
        // The joint sequence is text then image: the residual starts after the text.
        let text = hidden.shape()[1].saturating_sub(r.shape()[1]);
        Ok(Some((r.clone(), text)))
    }

    fn memory_estimate(&self, _info: &DenoiserInfo) -> u64 {
        if self.stack == 0 {
            self.net().map_or(0, FluxControlNet::bytes)
        } else {
            0
        }
    }
}

/// `LoadFluxControlNet`: a diffusers `FluxControlNetModel` folder.
#[derive(Default)]
pub struct LoadFluxControlNet;

impl Node for LoadFluxControlNet {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadFluxControlNet")
            .category("loaders")
            .doc(
                "Loads a diffusers FluxControlNetModel folder (InstantX's and Shakker Labs' \
                 ControlNets, union ones too). Cached until a file in the folder changes.",
            )
            .input(
                Port::new("path", "String").doc(
                    "The ControlNet folder; relative paths are taken from the graph's folder.",
                ),
            )
            .output(
                Port::new("controlnet", "Model").doc("The ControlNet, for ApplyFluxControlNet."),
            )
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = input_path(ctx, "path")?;
        let net = FluxControlNet::load(&dir, ctx.device(), ctx)?;
        let value = ctx.make_object(net)?;
        ctx.set_output("controlnet", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        model_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}

/// `ApplyFluxControlNet`: model → model with a ControlNet's residuals.
#[derive(Default)]
pub struct ApplyFluxControlNet;

impl Node for ApplyFluxControlNet {
    fn schema() -> NodeSchema {
        NodeSchema::new("ApplyFluxControlNet")
            .category("patches")
            .doc(
                "Patches a Flux denoiser with a ControlNet, as FluxControlNetPipeline runs it: \
                 the hint image is encoded with the VAE (its mean, shifted and scaled) and \
                 packed, or, for XLabs' ControlNets, scaled to [-1, 1] and passed through the \
                 ControlNet's input hint block; the ControlNet runs on each step's latents and \
                 prompt (with the control mode of a union ControlNet), and its residuals, times \
                 strength, are added after the model's double and single blocks (XLabs': \
                 repeated over the double blocks). It is active at step i of n \
                 unless i/n < start or (i+1)/n > end. Several stack (their residuals add up). A \
                 feature cache that skips blocks is refused with it. The hint image must have \
                 the picture's size. With true CFG (cfg > 1) each row's ControlNet sees its own \
                 prompt, where the pipeline reuses the positive prompt's residuals.",
            )
            .input(Port::new("model", "Model<Denoiser>").doc("A Flux denoiser (LoadFlux, possibly patched)."))
            .input(Port::new("controlnet", "Model").doc("From LoadFluxControlNet."))
            .input(Port::new("vae", "Model<Autoencoder>").optional().doc("The VAE that encodes the hint image (not used by XLabs' ControlNets, which have their own hint block)."))
            .input(Port::new("image", "Image").doc("The hint image [height, width, 3] in [0, 1]."))
            .input(Port::new("mode", "Int").default(-1i64).range(-1.0, 64.0).doc("A union ControlNet's control mode (e.g. 0 canny, 1 tile, 2 depth, ...); -1 for a plain ControlNet."))
            .input(Port::new("strength", "Float").default(1.0).range(-10.0, 10.0).doc("controlnet_conditioning_scale."))
            .input(Port::new("start", "Float").default(0.0).range(0.0, 1.0).doc("control_guidance_start."))
            .input(Port::new("end", "Float").default(1.0).range(0.0, 1.0).doc("control_guidance_end."))
            .output(Port::new("model", "Model<Denoiser>").doc("The model with the ControlNet."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("model")?;
        let controlnet: Value = ctx.input("controlnet")?;
        let vae: Option<Value> = ctx.input_opt("vae")?;
        let image: Tensor = ctx.input("image")?;
        let mode = usize::try_from(ctx.input::<i64>("mode")?).ok();
        let strength: f64 = ctx.input("strength")?;
        let (start, end): (f64, f64) = (ctx.input("start")?, ctx.input("end")?);
        let net = controlnet.as_object::<FluxControlNet>().map_err(|e| {
            Error(format!(
                "input 'controlnet': {e} (load it with LoadFluxControlNet)"
            ))
        })?;
        let file = net.path.display();
        match (&net.modes, mode) {
            (Some(t), None) => bail!(
                "{file}: a union ControlNet needs a control mode (0..{})",
                t.shape()[0]
            ),
            (None, Some(m)) => {
                bail!("{file}: control mode {m} given to a ControlNet without modes")
            }
            _ => {}
        }
        let info = model
            .as_denoiser()
            .map_err(|e| Error(format!("input 'model': {e}")))?
            .info()
            .clone();
        let base = match info.stacks.as_slice() {
            [d, s] if d.name == "transformer_blocks" && s.name == "single_transformer_blocks" => {
                (d.n_blocks, s.n_blocks)
            }
            _ => bail!(
                "{file}: a Flux ControlNet needs a Flux model (double and single blocks); this \
                 model has {}",
                stacks_summary(&info)
            ),
        };
        let width = info.streams.first().map_or(0, |s| s.width);
        let (nd, ns) = (net.double_out.len(), net.single_out.len());
        if width != net.trunk.dim || nd > base.0 || ns > base.1 || nd + ns == 0 {
            bail!(
                "{file}: the ControlNet has {nd} double and {ns} single blocks of width {}, \
                 which do not fit the model's {} and {} blocks of width {width}",
                net.trunk.dim,
                base.0,
                base.1
            );
        }
        let hint = match (&net.hint_block, &vae) {
            (Some(block), _) => {
                let pixels = image_to_signed_nchw(&image)
                    .map_err(|e| Error(format!("the hint image: {e}")))?
                    .to_device(net.trunk.device)?;
                block
                    .forward(&pixels)
                    .map_err(|e| Error(format!("{file}: the input hint block: {e}")))?
            }
            (None, Some(vae)) => {
                hint_latent(vae, &image, true).map_err(|e| Error(format!("the hint image: {e}")))?
            }
            (None, None) => {
                bail!("{file}: this ControlNet takes its hint as a VAE latent: connect input 'vae'")
            }
        };
        let hint_shape = hint.shape().to_vec();
        if hint_shape[1] * net.hint_patch * net.hint_patch != net.trunk.in_channels {
            bail!(
                "{file}: the hint latent has {} channels; the ControlNet takes {} packed ({} per \
                 latent channel)",
                hint_shape[1],
                net.trunk.in_channels,
                net.hint_patch * net.hint_patch
            );
        }
        let hint = ditflow_nn::pack_latents(&hint, net.hint_patch)
            .map_err(|e| Error(format!("{file}: the hint: {e}")))?;
        let name = file_label(&net.path);
        let mode_setting = mode.map_or(-1.0, |m| m as f64);
        let digest = patch_digest(&hint, &net.path, &[start, end, strength, mode_setting])?;
        let shared = Arc::new(Shared {
            controlnet: controlnet.clone(),
            hint,
            hint_shape,
            repeat: net.hint_block.is_some(),
            mode,
            start,
            end,
            base,
            residuals: Mutex::new(None),
        });
        let mut model = model;
        for (stack, what, n) in [(0, "double", nd), (1, "single", ns)] {
            if n == 0 && stack == 1 {
                continue;
            }
            let mut spec = PatchSpec::new(&format!("FluxControlNet({name}, {what} blocks)"));
            spec.flags = ditflow_plugin::abi::DF_PATCH_NEEDS_FRESH;
            spec.strength = strength;
            spec.stack = Some(stack);
            spec.block_residual = true;
            // The double-stack patch computes both stacks' residuals.
            spec.call_inputs = stack == 0;
            spec.memory_estimate = stack == 0;
            spec.required_capabilities = ditflow_plugin::abi::DF_CAP_BLOCK_RESIDUAL;
            spec.digest = fnv1a(digest, &[stack as u8]) | 1;
            let patch = ControlNetPatch {
                shared: shared.clone(),
                stack,
            };
            model = ctx.patch_model(&model, &spec, patch)?;
        }
        ctx.set_output("model", model)
    }
}
