//! SD3 as a protocol model: `Sd3Model` describes itself (the image and text streams, the joint
//! stack) and runs a forward from diffusers' named inputs (with `skip_layers`); `LoadSD3` reads a
//! diffusers folder. Every linear layer takes linear deltas (LoRA); the joint stack takes block
//! residuals and range overrides on the image-then-text sequence (an image residual starts at
//! token 0) and structured attention masks at each block's joint attention site, over the same
//! image-then-text sequence (`SceneCaptions`' joint form).

use crate::sd3::{self, Sd3};
use crate::single_file;
use ditflow_plugin::files::{input_path, model_fingerprint};
use ditflow_plugin::linear_delta::LinearDeltaCache;
use ditflow_plugin::model::{
    Call, Denoiser, DenoiserInfo, Hooks, Inputs, LinearInfo, Prediction, StackInfo, StreamInfo,
};
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::path::Path;

/// A loaded `SD3Transformer2DModel`, with its linear-delta sites and the deltas of its last
/// patch set.
pub struct Sd3Model {
    pub sd3: Sd3,
    linears: Vec<LinearInfo>,
    deltas: LinearDeltaCache,
}

impl Object for Sd3Model {
    const TAG: &'static str = "ditflow-sd3.model";
}

/// The conditioning a 33-channel inpainting model reads, in the order its input joins them.
const INPAINT_PARTS: [&str; 2] = [
    ditflow_plugin::conditioning::INPAINT_MASK,
    ditflow_plugin::conditioning::MASKED_IMAGE_LATENTS,
];

impl Denoiser for Sd3Model {
    fn describe(&self) -> DenoiserInfo {
        let m = &self.sd3;
        DenoiserInfo {
            prediction: Prediction::Flow,
            latent_layout: "BCHW".into(),
            latent_channels: if m.inpaints() {
                m.out_channels
            } else {
                m.in_channels
            },
            patch_size: m.patch,
            streams: ["image", "text"]
                .iter()
                .map(|n| StreamInfo {
                    name: n.to_string(),
                    width: m.dim,
                })
                .collect(),
            stacks: vec![StackInfo {
                name: "transformer_blocks".into(),
                streams: vec!["image".into(), "text".into()],
                n_blocks: m.blocks.len(),
                sites: ditflow_plugin::abi::DF_SITE_POST_BLOCK | ditflow_plugin::abi::DF_SITE_ATTN,
            }],
            linears: self.linears.clone(),
            capabilities: ditflow_plugin::abi::DF_CAP_LINEAR_DELTA
                | ditflow_plugin::abi::DF_CAP_LINEAR_MERGE
                | ditflow_plugin::abi::DF_CAP_BLOCK_RESIDUAL
                | ditflow_plugin::abi::DF_CAP_RANGE_OVERRIDE
                | ditflow_plugin::abi::DF_CAP_ATTENTION_MASK,
            conditioning: ["encoder_hidden_states", "pooled_projections", "skip_layers"]
                .iter()
                .chain(if m.inpaints() {
                    &INPAINT_PARTS[..]
                } else {
                    &[]
                })
                .map(|s| s.to_string())
                .collect(),
        }
    }

    fn forward(&self, call: &Call, inputs: &Inputs, hooks: &Hooks) -> Result<Tensor> {
        let dl = self.deltas.get(hooks, &self.linears, self.sd3.device)?;
        let x = inputs.require("hidden_states")?;
        // An inpainting model's input: the latent, the mask and the masked image's latent.
        let joined;
        let x = if self.sd3.inpaints() {
            let [mask, masked] = INPAINT_PARTS.map(|n| inputs.require(n));
            joined = ditflow_plugin::ops::concat(&[x, mask?, masked?], 1)?;
            &joined
        } else {
            x
        };
        let batch = x.shape().first().copied().unwrap_or(0);
        let t = match inputs.get("timestep") {
            Some(t) => t.to_f32_vec()?,
            None => vec![call.timestep as f32; batch],
        };
        let skip: Vec<usize> = match inputs.get("skip_layers") {
            Some(s) => s
                .to_f32_vec()?
                .iter()
                .map(|&v| {
                    if v < 0.0 || v.fract() != 0.0 {
                        Err(Error(format!("skip_layers: {v} is not a block index")))
                    } else {
                        Ok(v as usize)
                    }
                })
                .collect::<Result<_>>()?,
            None => Vec::new(),
        };
        self.sd3.forward(
            &sd3::Inputs {
                hidden_states: x,
                encoder_hidden_states: inputs.require("encoder_hidden_states")?,
                pooled_projections: inputs.require("pooled_projections")?,
                timestep: &t,
                skip_layers: &skip,
            },
            hooks,
            &dl,
        )
    }
}

impl Sd3Model {
    /// From a diffusers folder, or from one `.safetensors` file in Stability AI's (or
    /// ComfyUI's) layout.
    pub fn load(path: &Path, device: Device, ctx: &Context) -> Result<Sd3Model> {
        let (cfg, w) = ditflow_nn::open_model(ctx, path, device, |tensors| {
            if !single_file::is_sai(&tensors) {
                let what = "an SD3 checkpoint in Stability AI's layout (no joint_blocks keys)";
                return Err(ditflow_nn::not_a(path, what, &tensors));
            }
            let tensors = single_file::to_diffusers(path, tensors)?;
            let json = single_file::config(path, &tensors)?;
            Ok((tensors, json))
        })?;
        match cfg.class_name() {
            Some("SD3Transformer2DModel") => {}
            other => bail!(
                "{}: class \"{}\" is not an SD3Transformer2DModel",
                cfg.path.display(),
                other.unwrap_or("")
            ),
        }
        let sd3 = Sd3::load(&cfg, &w, device)?;
        // Stability AI's names too (fused qkv over the parts it holds), for LoRAs in SAI's,
        // kohya's and ComfyUI's layouts.
        let dual: Vec<bool> = sd3.blocks.iter().map(|b| b.attn2.is_some()).collect();
        let sai = single_file::sai_linears(sd3.blocks.len(), &dual);
        Ok(Sd3Model {
            linears: ditflow_plugin::linear_delta::fused_aliases(sd3.linears(), &sai)?,
            sd3,
            deltas: LinearDeltaCache::holding_parts(),
        })
    }
}

/// `LoadSD3`: a diffusers `SD3Transformer2DModel` folder as a denoiser.
#[derive(Default)]
pub struct LoadSD3;

impl Node for LoadSD3 {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadSD3")
            .category("loaders")
            .doc(
                "Loads SD3 or SD3.5 (q/k RMS norms, MMDiT-X dual attention): a diffusers \
                 SD3Transformer2DModel folder (config.json plus safetensors, sharded or not), or \
                 one .safetensors file in Stability AI's layout (sd3.5_*.safetensors, also with \
                 ComfyUI's model.diffusion_model. prefix), its config inferred from the shapes \
                 (or a config.json beside it). Its \
                 forward reads diffusers' names: hidden_states, encoder_hidden_states, \
                 pooled_projections, timestep in [0, 1000] and optionally skip_layers.",
            )
            .input(
                Port::new("path", "String").doc(
                    "The model folder or file; a relative path is taken from the graph's folder.",
                ),
            )
            .output(Port::new("model", "Model<Denoiser>").doc("The denoiser."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = input_path(ctx, "path")?;
        let model = Sd3Model::load(&dir, ctx.device(), ctx)?;
        let value = ctx.make_denoiser(model)?;
        ctx.set_output("model", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        model_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}
