//! Stable Audio as a protocol model: `StableAudioModel` describes itself (one audio stream, the
//! `transformer_blocks` stack, v-prediction unless loaded as another) and runs a forward from diffusers' named inputs
//! (`hidden_states` `[B, C, L]`, `timestep`, `encoder_hidden_states`, `global_hidden_states`,
//! and optionally the pipeline's rotary tables `rotary_embedding_cos` and
//! `rotary_embedding_sin`); `LoadStableAudio` reads a diffusers folder.

use crate::dit::{self, StableAudioDit};
use ditflow_nn::{Config, Weights};
use ditflow_plugin::files::{input_path, model_fingerprint};
use ditflow_plugin::linear_delta::LinearDeltaCache;
use ditflow_plugin::model::{
    BlockPart, Call, Denoiser, DenoiserInfo, Hooks, Inputs, LinearInfo, Prediction, StackInfo,
    StepState, StreamInfo,
};
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::path::Path;

/// A loaded `StableAudioDiTModel`.
pub struct StableAudioModel {
    pub dit: StableAudioDit,
    /// What the weights were trained to predict (Stable Audio's own: v).
    pub prediction: Prediction,
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
            prediction: self.prediction,
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
                sites: ditflow_plugin::abi::DF_SITE_POST_BLOCK | ditflow_plugin::abi::DF_SITE_ATTN,
            }],
            linears: self.linears.clone(),
            capabilities: ditflow_plugin::abi::DF_CAP_LINEAR_DELTA
                | ditflow_plugin::abi::DF_CAP_LINEAR_MERGE
                | ditflow_plugin::abi::DF_CAP_BLOCK_RESIDUAL
                | ditflow_plugin::abi::DF_CAP_RANGE_OVERRIDE
                | ditflow_plugin::abi::DF_CAP_BLOCK_STEPPING
                | ditflow_plugin::abi::DF_CAP_BLOCK_PARTS
                | ditflow_plugin::abi::DF_CAP_ATTENTION_EXTRA,
            conditioning: vec![
                "encoder_hidden_states".into(),
                "global_hidden_states".into(),
            ],
        }
    }

    fn forward(&self, call: &Call, inputs: &Inputs, hooks: &Hooks) -> Result<Tensor> {
        let dl = self.deltas.get(hooks, &self.linears, self.dit.device)?;
        let t = timesteps(call, inputs);
        self.dit.forward(&dit_inputs(inputs, &t)?, hooks, &dl)
    }

    fn prepare(&self, call: &Call, inputs: &Inputs, hooks: &Hooks) -> Result<StepState> {
        let dl = self.deltas.get(hooks, &self.linears, self.dit.device)?;
        let t = timesteps(call, inputs);
        let (hidden, step) = self.dit.prepare(&dit_inputs(inputs, &t)?, &dl)?;
        let embedding = Some(step.time.clone());
        Ok(StepState {
            hidden,
            inner: Value::object(Stepped { step, deltas: dl })?,
            embedding,
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
        if stack != 0 {
            bail!("Stable Audio has one block stack (0), not {stack}");
        }
        let s = state.inner.as_object::<Stepped>()?;
        let hidden = self
            .dit
            .blocks(&s.step, from, to, state.hidden.clone(), hooks, &s.deltas)?;
        Ok(StepState { hidden, ..state })
    }

    fn run_block_part(
        &self,
        _call: &Call,
        state: StepState,
        stack: usize,
        block: usize,
        part: BlockPart,
        hooks: &Hooks,
    ) -> Result<StepState> {
        if stack != 0 {
            bail!("Stable Audio has one block stack (0), not {stack}");
        }
        let s = state.inner.as_object::<Stepped>()?;
        let hidden =
            self.dit
                .block_part(&s.step, block, part, state.hidden.clone(), hooks, &s.deltas)?;
        Ok(StepState { hidden, ..state })
    }

    fn finish(&self, _call: &Call, state: StepState, _hooks: &Hooks) -> Result<Tensor> {
        let s = state.inner.as_object::<Stepped>()?;
        self.dit.finish(&s.step, state.hidden.clone(), &s.deltas)
    }
}

/// The `timestep` input, or the call's.
fn timesteps(call: &Call, inputs: &Inputs) -> Vec<f32> {
    match inputs.get("timestep").map(Tensor::to_f32_vec) {
        Some(Ok(t)) => t,
        _ => vec![call.timestep as f32],
    }
}

fn dit_inputs<'a>(inputs: &'a Inputs, t: &'a [f32]) -> Result<dit::Inputs<'a>> {
    let rotary = match (
        inputs.get("rotary_embedding_cos"),
        inputs.get("rotary_embedding_sin"),
    ) {
        (Some(c), Some(s)) => Some((c, s)),
        (None, None) => None,
        _ => bail!("give both rotary_embedding_cos and rotary_embedding_sin, or neither"),
    };
    Ok(dit::Inputs {
        hidden_states: inputs.require("hidden_states")?,
        timestep: t,
        encoder_hidden_states: inputs.require("encoder_hidden_states")?,
        global_hidden_states: inputs.require("global_hidden_states")?,
        rotary,
    })
}

/// A stepped Stable Audio's own state: what its blocks and head read, and the linear deltas.
struct Stepped {
    step: dit::Step,
    deltas: std::sync::Arc<ditflow_plugin::linear_delta::LinearDeltas>,
}

impl Object for Stepped {
    const TAG: &'static str = "ditflow-stable-audio.step";
}

impl StableAudioModel {
    pub fn load(
        path: &Path,
        prediction: Prediction,
        device: Device,
        ctx: &Context,
    ) -> Result<StableAudioModel> {
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
            prediction,
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
            .input(
                Port::new("prediction", "String")
                    .default("v")
                    .choices(&["v", "flow", "epsilon"])
                    .doc("What the model predicts: v (Stable Audio's own), or flow or epsilon for transformers trained so."),
            )
            .output(Port::new("model", "Model<Denoiser>").doc("The denoiser."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = input_path(ctx, "path")?;
        let prediction = match ctx.input::<String>("prediction")?.as_str() {
            "flow" => Prediction::Flow,
            "epsilon" => Prediction::Epsilon,
            _ => Prediction::V,
        };
        let model = StableAudioModel::load(&dir, prediction, ctx.device(), ctx)?;
        let value = ctx.make_denoiser(model)?;
        ctx.set_output("model", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        model_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}
