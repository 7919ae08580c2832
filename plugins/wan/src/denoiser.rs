//! Wan as a protocol model: `WanModel` describes itself (one video stream, the `blocks` stack)
//! and runs a forward from diffusers' named inputs (`hidden_states` `[B, C, F, H, W]`,
//! `timestep`, `encoder_hidden_states`); `LoadWan` reads a diffusers folder. Every linear layer
//! takes linear deltas; the blocks take block residuals and range overrides, and their self- and
//! cross-attention sites take attention edits, structured masks and extra branches.

use crate::single_file;
use crate::wan::{self, Wan};
use ditflow_plugin::files::{input_path, model_fingerprint};
use ditflow_plugin::linear_delta::LinearDeltaCache;
use ditflow_plugin::model::{
    BlockPart, Call, Denoiser, DenoiserInfo, Hooks, Inputs, LinearInfo, Prediction, StackInfo,
    StepState, StreamInfo,
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
                sites: ditflow_plugin::abi::DF_SITE_POST_BLOCK | ditflow_plugin::abi::DF_SITE_ATTN,
            }],
            linears: self.linears.clone(),
            capabilities: ditflow_plugin::abi::DF_CAP_LINEAR_DELTA
                | ditflow_plugin::abi::DF_CAP_LINEAR_MERGE
                | ditflow_plugin::abi::DF_CAP_BLOCK_RESIDUAL
                | ditflow_plugin::abi::DF_CAP_RANGE_OVERRIDE
                | ditflow_plugin::abi::DF_CAP_BLOCK_STEPPING
                | ditflow_plugin::abi::DF_CAP_BLOCK_PARTS
                | ditflow_plugin::abi::DF_CAP_ATTENTION_EDIT
                | ditflow_plugin::abi::DF_CAP_ATTENTION_MASK
                | ditflow_plugin::abi::DF_CAP_ATTENTION_EXTRA,
            conditioning: vec!["encoder_hidden_states".into()],
        }
    }

    fn forward(&self, call: &Call, inputs: &Inputs, hooks: &Hooks) -> Result<Tensor> {
        let dl = self.deltas.get(hooks, &self.linears, self.wan.device)?;
        let t = timesteps(call, inputs)?;
        self.wan.forward(&wan_inputs(inputs, &t)?, hooks, &dl)
    }

    fn prepare(&self, call: &Call, inputs: &Inputs, hooks: &Hooks) -> Result<StepState> {
        let dl = self.deltas.get(hooks, &self.linears, self.wan.device)?;
        let t = timesteps(call, inputs)?;
        let (hidden, step) = self.wan.prepare(&wan_inputs(inputs, &t)?, &dl)?;
        let embedding = Some(step.temb.clone());
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
            bail!("Wan has one block stack (0), not {stack}");
        }
        let s = state.inner.as_object::<Stepped>()?;
        let hidden = self
            .wan
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
            bail!("Wan has one block stack (0), not {stack}");
        }
        let s = state.inner.as_object::<Stepped>()?;
        let hidden =
            self.wan
                .block_part(&s.step, block, part, state.hidden.clone(), hooks, &s.deltas)?;
        Ok(StepState { hidden, ..state })
    }

    fn finish(&self, _call: &Call, state: StepState, _hooks: &Hooks) -> Result<Tensor> {
        let s = state.inner.as_object::<Stepped>()?;
        self.wan.finish(&s.step, state.hidden.clone(), &s.deltas)
    }
}

/// One timestep per row: the `timestep` input (one value for all rows, or one per row), or the
/// call's.
fn timesteps(call: &Call, inputs: &Inputs) -> Result<Vec<f32>> {
    let batch = inputs
        .require("hidden_states")?
        .shape()
        .first()
        .copied()
        .unwrap_or(0);
    Ok(match inputs.get("timestep") {
        Some(t) => {
            let t = t.to_f32_vec()?;
            if t.len() == 1 {
                vec![t[0]; batch]
            } else {
                t
            }
        }
        None => vec![call.timestep as f32; batch],
    })
}

fn wan_inputs<'a>(inputs: &'a Inputs, t: &'a [f32]) -> Result<wan::Inputs<'a>> {
    Ok(wan::Inputs {
        hidden_states: inputs.require("hidden_states")?,
        timestep: t,
        encoder_hidden_states: inputs.require("encoder_hidden_states")?,
    })
}

/// A stepped Wan's own state: what its blocks and head read, and the call's linear deltas.
struct Stepped {
    step: wan::Step,
    deltas: std::sync::Arc<ditflow_plugin::linear_delta::LinearDeltas>,
}

impl Object for Stepped {
    const TAG: &'static str = "ditflow-wan.step";
}

impl WanModel {
    /// From a diffusers folder, or from one file (`.safetensors` or `.gguf`) in Wan's original
    /// layout or in diffusers' own names.
    pub fn load(path: &Path, device: Device, ctx: &Context) -> Result<WanModel> {
        let (cfg, w) = ditflow_nn::open_model(ctx, path, device, |tensors| {
            let tensors = if single_file::is_original(&tensors) {
                single_file::to_diffusers(tensors)
            } else if tensors.contains_key("patch_embedding.weight")
                && tensors.keys().any(|k| k.starts_with("condition_embedder."))
            {
                tensors
            } else {
                let what = "a Wan checkpoint (no patch_embedding and blocks keys)";
                return Err(ditflow_nn::not_a(path, what, &tensors));
            };
            let json = single_file::config(path, &tensors)?;
            Ok((tensors, json))
        })?;
        match cfg.class_name() {
            Some("WanTransformer3DModel") => {}
            other => bail!(
                "{}: class \"{}\" is not a WanTransformer3DModel",
                cfg.path.display(),
                other.unwrap_or("")
            ),
        }
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
                 folder (config.json plus safetensors, sharded or not), or one file (.safetensors \
                 or a city96 .gguf) in Wan's original layout, with config.json beside it or the \
                 config inferred from the shapes. Its forward reads \
                 diffusers' names: hidden_states [B, C, frames, H, W], timestep in [0, 1000] and \
                 encoder_hidden_states (UMT5's tokens). Image-conditioned (I2V) checkpoints are \
                 refused for now.",
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
        let model = WanModel::load(&dir, ctx.device(), ctx)?;
        let value = ctx.make_denoiser(model)?;
        ctx.set_output("model", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        model_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}
