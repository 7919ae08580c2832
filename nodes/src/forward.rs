//! `Forward`: one forward of any protocol model (a denoiser, a text encoder or an autoencoder,
//! from any plugin) on tensors from a safetensors file, writing the outputs to another, so anyone
//! can check a model against a reference.

use crate::tensor_io::tensor_view;
use ditflow_plugin::files::{input_path, output_path};
use ditflow_plugin::prelude::*;
use std::collections::HashMap;

/// `Forward`: one model forward from a safetensors file of inputs to a file of outputs.
#[derive(Default)]
pub struct Forward;

impl Node for Forward {
    fn schema() -> NodeSchema {
        NodeSchema::new("Forward")
            .category("testing")
            .doc(
                "Runs one forward of a loaded model. Inputs are read from a safetensors file, \
                 named `in.ARG` after the diffusers/transformers forward arguments (for PixArt: \
                 hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, and for \
                 PixArt-α resolution and aspect_ratio; for DiT: hidden_states, timestep, \
                 class_labels; for a VAE: image and/or latent, tile_size, tile_overlap; for a \
                 text encoder: input_ids and attention_mask). Outputs \
                 are written as `out.NAME` (f32) to another file, for \
                 comparing with a reference implementation.",
            )
            .input(Port::new("model", "Model").doc("A model from a Load... node."))
            .input(
                Port::new("inputs", "String")
                    .doc("The safetensors file of inputs (relative to the graph's folder)."),
            )
            .input(
                Port::new("outputs", "String")
                    .doc("Where to write the outputs (relative to the output folder)."),
            )
            .output(Port::new("path", "String").doc("The absolute path of the written file."))
            .side_effects()
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("model")?;
        let in_path = input_path(ctx, "inputs")?;
        let all = ctx.load_weights(&in_path.to_string_lossy(), Device::Cpu)?;
        let inputs: HashMap<String, Tensor> = all
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix("in.").map(|n| (n.to_string(), v)))
            .collect();
        // Every interface's generic forward, whichever plugin made the model.
        let named: Vec<(&str, &Tensor)> = inputs.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let outputs = ditflow_plugin::model::forward_named(&model, &named)
            .map_err(|e| Error(format!("input 'model': {e}")))?;
        let host: Vec<(String, Tensor)> = outputs
            .into_iter()
            .map(|(k, v)| {
                Ok((
                    format!("out.{k}"),
                    v.cast(DType::F32)?.to_device(Device::Cpu)?,
                ))
            })
            .collect::<Result<_>>()?;
        let views = host
            .iter()
            .map(|(k, t)| Ok((k.clone(), tensor_view(k, t.dtype(), t.shape(), t.bytes())?)))
            .collect::<Result<Vec<_>>>()?;
        let out = output_path(ctx, "outputs")?;
        safetensors::serialize_to_file(views, None, &out)
            .map_err(|e| Error(format!("cannot write {}: {e}", out.display())))?;
        ctx.set_output("path", ditflow_plugin::files::absolute(&out))
    }
}
