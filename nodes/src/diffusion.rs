//! Diffusion-model nodes: `LoadDiffusionModel` reads a diffusers model folder into a Model value
//! (the class comes from `config.json`), and `Forward` runs one forward of any loaded model on
//! tensors from a safetensors file, writing the outputs to another, so anyone can check a model
//! against a reference.

use crate::files::{file_fingerprint, fnv1a, input_path, output_path};
use crate::models::{dit::DiT, pixart, pixart::PixArt, vae::AutoencoderKL, Config, Weights};
use crate::tensor_io::tensor_view;
use ditflow_plugin::linear_delta::LinearDeltaCache;
use ditflow_plugin::model::{
    Call, Denoiser, DenoiserInfo, Hooks, Inputs, LinearInfo, Prediction, StackInfo, StreamInfo,
};
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::collections::HashMap;
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
        let mut caps = DF_CAP_BLOCK_RESIDUAL | DF_CAP_RANGE_OVERRIDE;
        if matches!(self.arch, Arch::PixArt(_)) {
            caps |= DF_CAP_LINEAR_DELTA | DF_CAP_LINEAR_MERGE;
        }
        let stack = |n: usize| StackInfo {
            name: "transformer_blocks".into(),
            streams: vec!["image".into()],
            n_blocks: n,
            sites: DF_SITE_POST_BLOCK,
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
        let floats = |t: &Tensor| -> Result<Vec<f32>> {
            t.cast(DType::F32)?
                .to_device(Device::Cpu)?
                .as_f32()
                .map(<[f32]>::to_vec)
        };
        let x = inputs.require("hidden_states")?;
        let batch = x.shape().first().copied().unwrap_or(0);
        // A per-row `timestep` input (a lone forward) or the call's.
        let t = match inputs.get("timestep") {
            Some(t) => floats(t)?,
            None => vec![call.timestep as f32; batch],
        };
        match &self.arch {
            Arch::PixArt(m) => {
                let device = m.device;
                let dl = self.deltas.get(hooks, &self.linears, device)?;
                let x = x.to_device(device)?;
                let enc = inputs.require("encoder_hidden_states")?;
                let mask = inputs.get("encoder_attention_mask");
                let (res, ar) = (
                    inputs.get("resolution").map(floats).transpose()?,
                    inputs.get("aspect_ratio").map(floats).transpose()?,
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
                            let c = Arc::new(m.encode_caption(&enc_d, mask_d.as_ref(), &dl)?);
                            *slot = Some((key, c.clone()));
                            Some(c)
                        }
                    }
                } else {
                    None
                };
                m.forward(
                    &pixart::Inputs {
                        hidden_states: &x,
                        encoder_hidden_states: &enc_d,
                        timestep: &t,
                        encoder_attention_mask: mask_d.as_ref(),
                        resolution: res.as_deref(),
                        aspect_ratio: ar.as_deref(),
                        caption: caption.as_deref(),
                    },
                    hooks,
                    &dl,
                )
            }
            Arch::DiT(m) => {
                let x = x.to_device(m.device)?;
                let labels: Vec<i64> = floats(inputs.require("class_labels")?)?
                    .iter()
                    .map(|&c| c as i64)
                    .collect();
                m.forward(&x, &t, &labels, hooks)
            }
        }
    }
}

/// The classes `LoadDiffusionModel` understands.
pub const DIFFUSION_CLASSES: &[&str] = &["PixArtTransformer2DModel", "DiTTransformer2DModel"];

impl DiffusionModel {
    pub fn load(dir: &Path, device: Device, ctx: &Context) -> Result<DiffusionModel> {
        let cfg = Config::read(dir)?;
        let class = cfg.class_name().unwrap_or("");
        if !DIFFUSION_CLASSES.contains(&class) {
            bail!(
                "{}: class \"{class}\" is not a supported diffusion model (supported: {})",
                cfg.path.display(),
                DIFFUSION_CLASSES.join(", ")
            );
        }
        let w = Weights::load(ctx, dir, device)?;
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

/// A loaded `AutoencoderKL`.
pub struct Vae(pub AutoencoderKL);

impl Object for Vae {
    const TAG: &'static str = "ditflow.vae";
}

impl Vae {
    pub fn load(dir: &Path, device: Device, ctx: &Context) -> Result<Vae> {
        let cfg = Config::read(dir)?;
        match cfg.class_name() {
            Some("AutoencoderKL") => {}
            other => bail!(
                "{}: class \"{}\" is not an AutoencoderKL",
                cfg.path.display(),
                other.unwrap_or("")
            ),
        }
        let w = Weights::load(ctx, dir, device)?;
        Ok(Vae(AutoencoderKL::load(&cfg, &w, device)?))
    }

    /// `image` → `mean`, `logvar`; `latent` → `decoded`, and with `tile_size` (and
    /// `tile_overlap`, default 0.25) also `tiled`.
    pub fn forward_named(
        &self,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>> {
        let dev = self.0.device;
        let mut out = HashMap::new();
        if let Some(image) = inputs.get("image") {
            let (mean, logvar) = self.0.encode(&image.cast(DType::F32)?.to_device(dev)?)?;
            out.insert("mean".to_string(), mean);
            out.insert("logvar".to_string(), logvar);
        }
        if let Some(latent) = inputs.get("latent") {
            let z = latent.cast(DType::F32)?.to_device(dev)?;
            out.insert("decoded".to_string(), self.0.decode(&z)?);
            if let Some(tile) = inputs.get("tile_size") {
                let scalar = |t: &Tensor| -> Result<f32> {
                    t.cast(DType::F32)?
                        .to_device(Device::Cpu)?
                        .as_f32()?
                        .first()
                        .copied()
                        .ok_or_else(|| Error::new("an empty scalar input"))
                };
                let overlap = inputs
                    .get("tile_overlap")
                    .map(scalar)
                    .transpose()?
                    .unwrap_or(0.25);
                out.insert(
                    "tiled".to_string(),
                    self.0
                        .tiled_decode(&z, scalar(tile)? as usize, overlap as f64)?,
                );
            }
        }
        if out.is_empty() {
            bail!("a VAE forward needs an 'image' or a 'latent' input");
        }
        Ok(out)
    }
}

impl ditflow_plugin::encoder_api::Autoencoder for Vae {
    fn describe(&self) -> ditflow_plugin::encoder_api::AutoencoderInfo {
        ditflow_plugin::encoder_api::AutoencoderInfo {
            latent_channels: self.0.latent_channels,
            downscale: self.0.downscale,
            scaling_factor: self.0.scaling_factor,
            shift_factor: self.0.shift_factor,
        }
    }

    fn forward(&self, inputs: &Inputs) -> Result<Vec<(String, Tensor)>> {
        Ok(sorted(self.forward_named(&inputs.to_map())?))
    }
}

/// Named outputs in name order.
pub(crate) fn sorted(outputs: HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = outputs.into_iter().collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A fingerprint of a model folder: every file's path, size and modification time.
pub(crate) fn folder_fingerprint(dir: &Path) -> Result<u64> {
    if !dir.is_dir() {
        bail!("{}: no such model folder", dir.display());
    }
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    names.iter().try_fold(0xcbf2_9ce4_8422_2325u64, |h, p| {
        Ok(fnv1a(h, &file_fingerprint("cannot read", p)?.to_le_bytes()))
    })
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
                 holding a PixArtTransformer2DModel (PixArt-α or -Σ) or a DiTTransformer2DModel. \
                 Weights are memory-mapped onto the run's device. The model stays cached until a \
                 file in the folder changes.",
            )
            .input(
                Port::new("path", "String")
                    .doc("The model folder; a relative path is taken from the graph's folder."),
            )
            .output(Port::new("model", "Model<Denoiser>").doc("The denoiser."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = input_path(ctx, "path")?;
        let model = DiffusionModel::load(&dir, ctx.device(), ctx)?;
        let value = ctx.make_denoiser(model)?;
        ctx.set_output("model", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        folder_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}

/// `LoadVAE`: a diffusers `AutoencoderKL` folder as a VAE value.
#[derive(Default)]
pub struct LoadVAE;

impl Node for LoadVAE {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadVAE")
            .category("loaders")
            .doc(
                "Loads a diffusers AutoencoderKL folder (config.json plus safetensors). The \
                 scaling and shift factors come from its config. Cached until a file in the \
                 folder changes.",
            )
            .input(
                Port::new("path", "String")
                    .doc("The VAE folder; a relative path is taken from the graph's folder."),
            )
            .output(Port::new("vae", "Model<Autoencoder>").doc("The autoencoder."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = input_path(ctx, "path")?;
        let vae = Vae::load(&dir, ctx.device(), ctx)?;
        let value = ctx.make_autoencoder(vae)?;
        ctx.set_output("vae", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        folder_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}

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
        ctx.set_output("path", crate::files::absolute(&out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_fingerprint_changes_with_the_files() {
        let dir =
            std::env::temp_dir().join(format!("ditflow-nodes-folder-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        let a = folder_fingerprint(&dir).unwrap();
        std::fs::write(dir.join("w.safetensors"), "x").unwrap();
        assert_ne!(a, folder_fingerprint(&dir).unwrap());
        assert!(folder_fingerprint(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
