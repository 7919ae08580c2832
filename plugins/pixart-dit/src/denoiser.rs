//! The PixArt and DiT denoisers as protocol models: `DiffusionModel` describes itself (stack,
//! sites, linear layers, capabilities), projects PixArt's captions once per sampling run, runs the
//! patches' linear deltas, and `LoadDiffusionModel` reads a diffusers folder into it.

use crate::dit::DiT;
use crate::pixart::{self, PixArt};
use ditflow_plugin::files::{input_path, model_fingerprint};
use ditflow_plugin::linear_delta::{LinearDeltaCache, LinearDeltas};
use ditflow_plugin::model::{
    Call, Denoiser, DenoiserInfo, Hooks, Inputs, LinearInfo, Prediction, StackInfo, StepState,
    StreamInfo,
};
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A loaded denoiser, speaking the model protocol ([`Denoiser`]).
pub struct DiffusionModel {
    pub arch: Arch,
    /// PixArt's captions projected into every block's keys and values, kept for one sampling
    /// run: `(run id, encoder_hidden_states id, mask id)`.
    captions: Mutex<Option<(CaptionKey, Arc<pixart::CaptionCache>)>>,
    /// The linear layers patches may put deltas on.
    linears: Vec<LinearInfo>,
    /// The deltas of the last patch set (LoRA), rebuilt when the set changes.
    deltas: LinearDeltaCache,
}

/// `(run id, encoder_hidden_states id, mask id, linear-delta key)`.
type CaptionKey = (u64, usize, usize, u64);

/// The architectures `LoadDiffusionModel` reads.
pub enum Arch {
    PixArt(Box<PixArt>),
    DiT(Box<DiT>),
}

impl Object for DiffusionModel {
    const TAG: &'static str = "ditflow.diffusion_model";
}

impl Denoiser for DiffusionModel {
    fn describe(&self) -> DenoiserInfo {
        use ditflow_plugin::abi::*;
        let mut caps = DF_CAP_BLOCK_RESIDUAL
            | DF_CAP_RANGE_OVERRIDE
            | DF_CAP_ATTENTION_EDIT
            | DF_CAP_ATTENTION_MASK
            | DF_CAP_ATTENTION_EXTRA;
        if matches!(self.arch, Arch::PixArt(_)) {
            caps |= DF_CAP_LINEAR_DELTA | DF_CAP_LINEAR_MERGE | DF_CAP_BLOCK_STEPPING;
        }
        let stack = |n: usize| StackInfo {
            name: "transformer_blocks".into(),
            streams: vec!["image".into()],
            n_blocks: n,
            sites: DF_SITE_ATTN | DF_SITE_POST_BLOCK,
        };
        let (dim, channels, patch, blocks, conditioning) = match &self.arch {
            Arch::PixArt(m) => {
                let mut c = vec!["encoder_hidden_states", "encoder_attention_mask"];
                if m.adaln.size_embedders.is_some() {
                    c.extend(["resolution", "aspect_ratio"]);
                }
                (m.dim, m.in_channels, m.patch, m.blocks.len(), c)
            }
            Arch::DiT(m) => (
                m.dim,
                m.in_channels,
                m.patch,
                m.blocks.len(),
                vec!["class_labels"],
            ),
        };
        DenoiserInfo {
            prediction: Prediction::Unknown,
            latent_layout: "BCHW".into(),
            latent_channels: channels,
            patch_size: patch,
            streams: vec![StreamInfo {
                name: "image".into(),
                width: dim,
            }],
            stacks: vec![stack(blocks)],
            linears: self.linears.clone(),
            capabilities: caps,
            conditioning: conditioning.into_iter().map(String::from).collect(),
        }
    }

    fn forward(&self, call: &Call, inputs: &Inputs, hooks: &Hooks) -> Result<Tensor> {
        match &self.arch {
            Arch::PixArt(m) => {
                let dl = self.deltas.get(hooks, &self.linears, m.device)?;
                let a = self.pixart_args(m, call, inputs, &dl)?;
                m.forward(&a.inputs(), hooks, &dl)
            }
            Arch::DiT(m) => {
                let x = inputs.require("hidden_states")?.to_device(m.device)?;
                let t = timesteps(call, inputs, x.shape().first().copied().unwrap_or(0))?;
                let labels: Vec<i64> = inputs
                    .require("class_labels")?
                    .to_f32_vec()?
                    .iter()
                    .map(|&c| c as i64)
                    .collect();
                m.forward(&x, &t, &labels, hooks)
            }
        }
    }

    fn prepare(&self, call: &Call, inputs: &Inputs, hooks: &Hooks) -> Result<StepState> {
        let m = self.stepping()?;
        let dl = self.deltas.get(hooks, &self.linears, m.device)?;
        let a = self.pixart_args(m, call, inputs, &dl)?;
        let (hidden, step) = m.prepare(&a.inputs(), &dl)?;
        Ok(StepState {
            hidden,
            inner: Value::object(Stepped { step, deltas: dl })?,
            embedding: None,
        })
    }

    fn run_blocks(
        &self,
        _call: &Call,
        state: StepState,
        stack: usize,
        from: usize,
        to: usize,
        hooks: &Hooks,
    ) -> Result<StepState> {
        let m = self.stepping()?;
        if stack != 0 {
            bail!("PixArt has one block stack (0), not {stack}");
        }
        let s = state.inner.as_object::<Stepped>()?;
        let hidden = m.blocks(&s.step, from, to, state.hidden.clone(), hooks, &s.deltas)?;
        Ok(StepState {
            hidden,
            inner: state.inner.clone(),
            embedding: None,
        })
    }

    fn finish(&self, _call: &Call, state: StepState, _hooks: &Hooks) -> Result<Tensor> {
        let m = self.stepping()?;
        let s = state.inner.as_object::<Stepped>()?;
        m.finish(&s.step, state.hidden.clone(), &s.deltas)
    }
}

/// A stepped PixArt's own state: what its blocks and head read, and the call's linear deltas.
struct Stepped {
    step: pixart::Step,
    deltas: Arc<LinearDeltas>,
}

impl Object for Stepped {
    const TAG: &'static str = "ditflow-pixart-dit.step";
}

/// A per-row `timestep` input (a lone forward), or the call's for every row.
fn timesteps(call: &Call, inputs: &Inputs, batch: usize) -> Result<Vec<f32>> {
    Ok(match inputs.get("timestep") {
        Some(t) => t.to_f32_vec()?,
        None => vec![call.timestep as f32; batch],
    })
}

/// PixArt's inputs for one call, on its device.
struct PixArtArgs {
    x: Tensor,
    enc: Tensor,
    mask: Option<Tensor>,
    t: Vec<f32>,
    res: Option<Vec<f32>>,
    ar: Option<Vec<f32>>,
    caption: Option<Arc<pixart::CaptionCache>>,
}

impl PixArtArgs {
    fn inputs(&self) -> pixart::Inputs<'_> {
        pixart::Inputs {
            hidden_states: &self.x,
            encoder_hidden_states: &self.enc,
            timestep: &self.t,
            encoder_attention_mask: self.mask.as_ref(),
            resolution: self.res.as_deref(),
            aspect_ratio: self.ar.as_deref(),
            caption: self.caption.clone(),
        }
    }
}

impl DiffusionModel {
    /// The PixArt a stepped call runs, or an error: DiT does not step.
    fn stepping(&self) -> Result<&PixArt> {
        match &self.arch {
            Arch::PixArt(m) => Ok(m),
            Arch::DiT(_) => bail!("DiT does not step block by block"),
        }
    }

    /// PixArt's named inputs on its device, with the captions projected once per sampling run.
    fn pixart_args(
        &self,
        m: &PixArt,
        call: &Call,
        inputs: &Inputs,
        dl: &LinearDeltas,
    ) -> Result<PixArtArgs> {
        let device = m.device;
        let x = inputs.require("hidden_states")?;
        let t = timesteps(call, inputs, x.shape().first().copied().unwrap_or(0))?;
        let x = x.to_device(device)?;
        let enc = inputs.require("encoder_hidden_states")?;
        let mask = inputs.get("encoder_attention_mask");
        let (res, ar) = (
            inputs
                .get("resolution")
                .map(Tensor::to_f32_vec)
                .transpose()?,
            inputs
                .get("aspect_ratio")
                .map(Tensor::to_f32_vec)
                .transpose()?,
        );
        let enc_d = enc.to_device(device)?;
        let mask_d = mask.map(|t| t.to_device(device)).transpose()?;
        // Within one sampling run the captions do not change: project them once.
        let caption = if call.run_id != 0 {
            let key = (
                call.run_id,
                enc.as_value().id(),
                mask.map_or(0, |m| m.as_value().id()),
                dl.key(),
            );
            let mut slot = self.captions.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_ref() {
                Some((k, c)) if *k == key => Some(c.clone()),
                _ => {
                    let c = Arc::new(m.encode_caption(&enc_d, mask_d.as_ref(), dl)?);
                    *slot = Some((key, c.clone()));
                    Some(c)
                }
            }
        } else {
            None
        };
        Ok(PixArtArgs {
            x,
            enc: enc_d,
            mask: mask_d,
            t,
            res,
            ar,
            caption,
        })
    }
}

/// The classes `LoadDiffusionModel` understands.
pub const DIFFUSION_CLASSES: &[&str] = &["PixArtTransformer2DModel", "DiTTransformer2DModel"];

impl DiffusionModel {
    /// From a diffusers folder, or from one file (`.safetensors`, or a `.gguf` whose tensors
    /// may be block-quantized) in diffusers' names with the folder's `config.json` beside it.
    pub fn load(path: &Path, device: Device, ctx: &Context) -> Result<DiffusionModel> {
        let (cfg, w) = ditflow_nn::open_model(ctx, path, device, |tensors| {
            if !tensors.keys().any(|k| k.starts_with("transformer_blocks.")) {
                let what =
                    "a PixArt or DiT checkpoint in diffusers' names (no transformer_blocks keys)";
                return Err(ditflow_nn::not_a(path, what, &tensors));
            }
            let json = ditflow_nn::config_beside(path)?.ok_or_else(|| {
                Error(format!(
                    "{}: a single-file PixArt or DiT checkpoint needs its diffusers config.json \
                     beside it (none in {})",
                    path.display(),
                    path.parent().unwrap_or(Path::new(".")).display()
                ))
            })?;
            Ok((tensors, json))
        })?;
        let class = cfg.class_name().unwrap_or("");
        if !DIFFUSION_CLASSES.contains(&class) {
            bail!(
                "{}: class \"{class}\" is not a supported diffusion model (supported: {})",
                cfg.path.display(),
                DIFFUSION_CLASSES.join(", ")
            );
        }
        let arch = match class {
            "PixArtTransformer2DModel" => Arch::PixArt(Box::new(PixArt::load(&cfg, &w, device)?)),
            _ => Arch::DiT(Box::new(DiT::load(&cfg, &w, device)?)),
        };
        let linears = match &arch {
            Arch::PixArt(m) => m.linears(),
            Arch::DiT(_) => Vec::new(),
        };
        Ok(DiffusionModel {
            arch,
            captions: Mutex::new(None),
            linears,
            deltas: LinearDeltaCache::default(),
        })
    }
}

/// `LoadDiffusionModel`: a diffusers denoiser folder as a Model value.
#[derive(Default)]
pub struct LoadDiffusionModel;

impl Node for LoadDiffusionModel {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadDiffusionModel")
            .category("loaders")
            .doc(
                "Loads a diffusers model folder (config.json plus safetensors, sharded or not) \
                 holding a PixArtTransformer2DModel (PixArt-α or -Σ) or a DiTTransformer2DModel, \
                 or one file of it in diffusers' names (.safetensors, or a .gguf with \
                 block-quantized weights such as Q8_0, read as stored) with the folder's \
                 config.json beside it. Weights are memory-mapped onto the run's device. The \
                 model stays cached until a file in the folder (or the file) changes.",
            )
            .input(
                Port::new("path", "String").doc(
                    "The model folder or file; a relative path is taken from the graph's folder.",
                ),
            )
            .output(Port::new("model", "Model<Denoiser>").doc("The denoiser."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let path = input_path(ctx, "path")?;
        let model = DiffusionModel::load(&path, ctx.device(), ctx)?;
        let value = ctx.make_denoiser(model)?;
        ctx.set_output("model", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        model_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}
