//! Wan as a protocol model: `WanModel` describes itself (one video stream, the `blocks` stack)
//! and runs a forward from diffusers' named inputs (`hidden_states` `[B, C, F, H, W]`,
//! `timestep`, `encoder_hidden_states`); `LoadWan` reads a diffusers folder. Every linear layer
//! takes linear deltas; the blocks take block residuals and range overrides.

use crate::wan::{self, Wan};
use ditflow_nn::{Config, Weights};
use ditflow_plugin::files::{input_path, model_fingerprint};
use ditflow_plugin::linear_delta::LinearDeltaCache;
use ditflow_plugin::model::{
    Call, Denoiser, DenoiserInfo, Hooks, Inputs, LinearInfo, Prediction, StackInfo, StreamInfo,
};
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::path::Path;

/// A loaded `WanTransformer3DModel`.
pub struct WanModel {
    pub wan: Wan,
    linears: Vec<LinearInfo>,
    deltas: LinearDeltaCache,
}

impl Object for WanModel {
    const TAG: &'static str = "ditflow-wan.model";
}

impl Denoiser for WanModel {
    fn describe(&self) -> DenoiserInfo {
        let m = &self.wan;
        DenoiserInfo {
            prediction: Prediction::Flow,
            latent_layout: "BCFHW".into(),
            latent_channels: m.in_channels,
            patch_size: m.patch[1],
            streams: vec![StreamInfo {
                name: "video".into(),
                width: m.dim,
            }],
            stacks: vec![StackInfo {
                name: "blocks".into(),
                streams: vec!["video".into()],
                n_blocks: m.blocks.len(),
                sites: ditflow_plugin::abi::DF_SITE_POST_BLOCK,
            }],
            linears: self.linears.clone(),
            capabilities: ditflow_plugin::abi::DF_CAP_LINEAR_DELTA
                | ditflow_plugin::abi::DF_CAP_LINEAR_MERGE
                | ditflow_plugin::abi::DF_CAP_BLOCK_RESIDUAL
                | ditflow_plugin::abi::DF_CAP_RANGE_OVERRIDE,
            conditioning: vec!["encoder_hidden_states".into()],
        }
    }

    fn forward(&self, call: &Call, inputs: &Inputs, hooks: &Hooks) -> Result<Tensor> {
        let dl = self.deltas.get(hooks, &self.linears, self.wan.device)?;
        let x = inputs.require("hidden_states")?;
        let batch = x.shape().first().copied().unwrap_or(0);
        let t = match inputs.get("timestep") {
            Some(t) => {
                let t = t.to_f32_vec()?;
                if t.len() == 1 {
                    vec![t[0]; batch]
                } else {
                    t
                }
            }
            None => vec![call.timestep as f32; batch],
        };
        self.wan.forward(
            &wan::Inputs {
                hidden_states: x,
                timestep: &t,
                encoder_hidden_states: inputs.require("encoder_hidden_states")?,
            },
            hooks,
            &dl,
        )
    }
}

impl WanModel {
    pub fn load(path: &Path, device: Device, ctx: &Context) -> Result<WanModel> {
        let cfg = Config::read(path)?;
        match cfg.class_name() {
            Some("WanTransformer3DModel") => {}
            other => bail!(
                "{}: class \"{}\" is not a WanTransformer3DModel",
                cfg.path.display(),
                other.unwrap_or("")
            ),
        }
        let w = Weights::load(ctx, path, device)?;
        let wan = Wan::load(&cfg, &w, device)?;
        Ok(WanModel {
            linears: wan.linears(),
            wan,
            deltas: LinearDeltaCache::default(),
        })
    }
}

/// `LoadWan`: a diffusers `WanTransformer3DModel` folder as a denoiser.
#[derive(Default)]
pub struct LoadWan;

impl Node for LoadWan {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadWan")
            .category("loaders")
            .doc(
                "Loads a Wan2.1 text-to-video transformer: a diffusers WanTransformer3DModel \
                 folder (config.json plus safetensors, sharded or not). Its forward reads \
                 diffusers' names: hidden_states [B, C, frames, H, W], timestep in [0, 1000] and \
                 encoder_hidden_states (UMT5's tokens). Image-conditioned (I2V) checkpoints are \
                 refused for now.",
            )
            .input(
                Port::new("path", "String")
                    .doc("The model folder; a relative path is taken from the graph's folder."),
            )
            .output(Port::new("model", "Model<Denoiser>").doc("The denoiser."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = input_path(ctx, "path")?;
        let model = WanModel::load(&dir, ctx.device(), ctx)?;
        let value = ctx.make_denoiser(model)?;
        ctx.set_output("model", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        model_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}
