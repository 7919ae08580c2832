//! HiDream as a protocol model: `HiDreamModel` describes itself (the image and text streams, the
//! double- and single-stream stacks) and runs a forward from diffusers' named inputs
//! (`hidden_states`, `timesteps`, `encoder_hidden_states_t5`, `encoder_hidden_states_llama3`,
//! `pooled_embeds`); `LoadHiDream` reads a diffusers folder. Every linear layer (the experts'
//! too) takes linear deltas; both stacks take block residuals and range overrides.
//!
//! Not yet: its Llama-3.1 text encoder and the pipeline (HiDreamImagePipeline negates the
//! model's output to get the flow velocity), so `Sample` cannot drive it yet; non-square latents
//! (diffusers pads them to `max_resolution` with a token mask).

use crate::hidream::{self, HiDream};
use ditflow_nn::{Config, Weights};
use ditflow_plugin::files::{input_path, model_fingerprint};
use ditflow_plugin::linear_delta::LinearDeltaCache;
use ditflow_plugin::model::{
    Call, Denoiser, DenoiserInfo, Hooks, Inputs, LinearInfo, Prediction, StackInfo, StreamInfo,
};
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::path::Path;

/// A loaded `HiDreamImageTransformer2DModel`.
pub struct HiDreamModel {
    pub hidream: HiDream,
    linears: Vec<LinearInfo>,
    deltas: LinearDeltaCache,
}

impl Object for HiDreamModel {
    const TAG: &'static str = "ditflow-hidream.model";
}

impl Denoiser for HiDreamModel {
    fn describe(&self) -> DenoiserInfo {
        let m = &self.hidream;
        let stack = |name: &str, n: usize, streams: &[&str]| StackInfo {
            name: name.into(),
            streams: streams.iter().map(|s| s.to_string()).collect(),
            n_blocks: n,
            sites: ditflow_plugin::abi::DF_SITE_POST_BLOCK,
        };
        DenoiserInfo {
            prediction: Prediction::Flow,
            latent_layout: "BCHW".into(),
            latent_channels: m.in_channels,
            patch_size: m.patch,
            streams: ["image", "text"]
                .iter()
                .map(|n| StreamInfo {
                    name: n.to_string(),
                    width: m.dim,
                })
                .collect(),
            stacks: vec![
                stack("double_stream_blocks", m.double.len(), &["image", "text"]),
                stack("single_stream_blocks", m.single.len(), &["joint"]),
            ],
            linears: self.linears.clone(),
            capabilities: ditflow_plugin::abi::DF_CAP_LINEAR_DELTA
                | ditflow_plugin::abi::DF_CAP_LINEAR_MERGE
                | ditflow_plugin::abi::DF_CAP_BLOCK_RESIDUAL
                | ditflow_plugin::abi::DF_CAP_RANGE_OVERRIDE,
            conditioning: [
                "encoder_hidden_states_t5",
                "encoder_hidden_states_llama3",
                "pooled_embeds",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        }
    }

    fn forward(&self, call: &Call, inputs: &Inputs, hooks: &Hooks) -> Result<Tensor> {
        let dl = self.deltas.get(hooks, &self.linears, self.hidream.device)?;
        let x = inputs.require("hidden_states")?;
        let batch = x.shape().first().copied().unwrap_or(0);
        let t = match inputs.get("timesteps") {
            Some(t) => t.to_f32_vec()?,
            None => vec![call.timestep as f32; batch],
        };
        self.hidream.forward(
            &hidream::Inputs {
                hidden_states: x,
                timesteps: &t,
                encoder_hidden_states_t5: inputs.require("encoder_hidden_states_t5")?,
                encoder_hidden_states_llama3: inputs.require("encoder_hidden_states_llama3")?,
                pooled_embeds: inputs.require("pooled_embeds")?,
            },
            hooks,
            &dl,
        )
    }
}

impl HiDreamModel {
    pub fn load(path: &Path, device: Device, ctx: &Context) -> Result<HiDreamModel> {
        let cfg = Config::read(path)?;
        match cfg.class_name() {
            Some("HiDreamImageTransformer2DModel") => {}
            other => bail!(
                "{}: class \"{}\" is not a HiDreamImageTransformer2DModel",
                cfg.path.display(),
                other.unwrap_or("")
            ),
        }
        let w = Weights::load(ctx, path, device)?;
        let hidream = HiDream::load(&cfg, &w, device)?;
        Ok(HiDreamModel {
            linears: hidream.linears(),
            hidream,
            deltas: LinearDeltaCache::default(),
        })
    }
}

/// `LoadHiDream`: a diffusers `HiDreamImageTransformer2DModel` folder as a denoiser.
#[derive(Default)]
pub struct LoadHiDream;

impl Node for LoadHiDream {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadHiDream")
            .category("loaders")
            .doc(
                "Loads HiDream-I1: a diffusers HiDreamImageTransformer2DModel folder (config.json \
                 plus safetensors, sharded or not). Its forward reads diffusers' names: \
                 hidden_states (square latents), timesteps in [0, 1000], \
                 encoder_hidden_states_t5, encoder_hidden_states_llama3 (every Llama layer's \
                 hidden states, [layers, B, L, 4096]) and pooled_embeds. Its Llama text encoder \
                 and pipeline are not there yet.",
            )
            .input(
                Port::new("path", "String")
                    .doc("The model folder; a relative path is taken from the graph's folder."),
            )
            .output(Port::new("model", "Model<Denoiser>").doc("The denoiser."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = input_path(ctx, "path")?;
        let model = HiDreamModel::load(&dir, ctx.device(), ctx)?;
        let value = ctx.make_denoiser(model)?;
        ctx.set_output("model", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        model_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}
