//! Stable Audio as a protocol model: `StableAudioModel` describes itself (one audio stream, the
//! `transformer_blocks` stack, v-prediction) and runs a forward from diffusers' named inputs
//! (`hidden_states` `[B, C, L]`, `timestep`, `encoder_hidden_states`, `global_hidden_states`,
//! and optionally the pipeline's rotary tables `rotary_embedding_cos` and
//! `rotary_embedding_sin`); `LoadStableAudio` reads a diffusers folder.

use crate::dit::{self, StableAudioDit};
use ditflow_nn::{Config, Weights};
use ditflow_plugin::files::{input_path, model_fingerprint};
use ditflow_plugin::linear_delta::LinearDeltaCache;
use ditflow_plugin::model::{
    Call, Denoiser, DenoiserInfo, Hooks, Inputs, LinearInfo, Prediction, StackInfo, StreamInfo,
};
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::path::Path;

/// A loaded `StableAudioDiTModel`.
pub struct StableAudioModel {
    pub dit: StableAudioDit,
    linears: Vec<LinearInfo>,
    deltas: LinearDeltaCache,
}

impl Object for StableAudioModel {
    const TAG: &'static str = "ditflow-stable-audio.model";
}

impl Denoiser for StableAudioModel {
    fn describe(&self) -> DenoiserInfo {
        let m = &self.dit;
        DenoiserInfo {
            prediction: Prediction::V,
            latent_layout: "BCL".into(),
            latent_channels: m.in_channels,
            patch_size: 1,
            streams: vec![StreamInfo {
                name: "audio".into(),
                width: m.dim,
            }],
            stacks: vec![StackInfo {
                name: "transformer_blocks".into(),
                streams: vec!["audio".into()],
                n_blocks: m.blocks.len(),
                sites: ditflow_plugin::abi::DF_SITE_POST_BLOCK,
            }],
            linears: self.linears.clone(),
            capabilities: ditflow_plugin::abi::DF_CAP_LINEAR_DELTA
                | ditflow_plugin::abi::DF_CAP_LINEAR_MERGE
                | ditflow_plugin::abi::DF_CAP_BLOCK_RESIDUAL
                | ditflow_plugin::abi::DF_CAP_RANGE_OVERRIDE,
            conditioning: vec![
                "encoder_hidden_states".into(),
                "global_hidden_states".into(),
            ],
        }
    }

    fn forward(&self, call: &Call, inputs: &Inputs, hooks: &Hooks) -> Result<Tensor> {
        let dl = self.deltas.get(hooks, &self.linears, self.dit.device)?;
        let x = inputs.require("hidden_states")?;
        let t = match inputs.get("timestep") {
            Some(t) => t.to_f32_vec()?,
            None => vec![call.timestep as f32],
        };
        let rotary = match (
            inputs.get("rotary_embedding_cos"),
            inputs.get("rotary_embedding_sin"),
        ) {
            (Some(c), Some(s)) => Some((c, s)),
            (None, None) => None,
            _ => bail!("give both rotary_embedding_cos and rotary_embedding_sin, or neither"),
        };
        self.dit.forward(
            &dit::Inputs {
                hidden_states: x,
                timestep: &t,
                encoder_hidden_states: inputs.require("encoder_hidden_states")?,
                global_hidden_states: inputs.require("global_hidden_states")?,
                rotary,
            },
            hooks,
            &dl,
        )
    }
}

impl StableAudioModel {
    pub fn load(path: &Path, device: Device, ctx: &Context) -> Result<StableAudioModel> {
        let cfg = Config::read(path)?;
        match cfg.class_name() {
            Some("StableAudioDiTModel") => {}
            other => bail!(
                "{}: class \"{}\" is not a StableAudioDiTModel",
                cfg.path.display(),
                other.unwrap_or("")
            ),
        }
        let w = Weights::load(ctx, path, device)?;
        let dit = StableAudioDit::load(&cfg, &w, device)?;
        Ok(StableAudioModel {
            linears: dit.linears(),
            dit,
            deltas: LinearDeltaCache::default(),
        })
    }
}

/// `LoadStableAudio`: a diffusers `StableAudioDiTModel` folder as a denoiser.
#[derive(Default)]
pub struct LoadStableAudio;

impl Node for LoadStableAudio {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadStableAudio")
            .category("loaders")
            .doc(
                "Loads Stable Audio's transformer: a diffusers StableAudioDiTModel folder. Its \
                 forward reads diffusers' names: hidden_states [B, C, L], timestep, \
                 encoder_hidden_states, global_hidden_states [B, 1, width], and optionally \
                 rotary_embedding_cos/rotary_embedding_sin (the pipeline's tables, [L + 1, \
                 head_dim / 2]); without them the tables are computed as StableAudioPipeline \
                 computes them. Its VAE, encoders and scheduler are not there yet.",
            )
            .input(
                Port::new("path", "String")
                    .doc("The model folder; a relative path is taken from the graph's folder."),
            )
            .output(Port::new("model", "Model<Denoiser>").doc("The denoiser."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = input_path(ctx, "path")?;
        let model = StableAudioModel::load(&dir, ctx.device(), ctx)?;
        let value = ctx.make_denoiser(model)?;
        ctx.set_output("model", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        model_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}
