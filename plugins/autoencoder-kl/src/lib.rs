//! `ditflow-autoencoder-kl`: diffusers' `AutoencoderKL` as a plugin. `LoadVAE` reads a model
//! folder, or the VAE inside a single-file checkpoint ([`single_file`]), into a
//! `Model<Autoencoder>` that any plugin runs through the autoencoder interface: `image` to `mean`
//! and `logvar`, `latent` to `decoded` (and with `tile_size`, the tiled decode).

#![forbid(unsafe_code)]

pub mod single_file;
pub mod vae;

use ditflow_nn::{Config, Weights};
use ditflow_plugin::encoder_api::sorted;
use ditflow_plugin::export_plugin;
use ditflow_plugin::files::{file_fingerprint, input_path, model_fingerprint};
use ditflow_plugin::model::Inputs;
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::collections::HashMap;
use std::path::Path;
use vae::AutoencoderKL;

/// A loaded `AutoencoderKL`.
pub struct Vae(pub AutoencoderKL);

impl Object for Vae {
    const TAG: &'static str = "ditflow.vae";
}

impl Vae {
    /// From a diffusers folder, or from a single file (the VAE inside an all-in-one
    /// checkpoint, or a VAE file, in the original or diffusers' layout) with `config` (a
    /// diffusers config.json) or its shapes' config.
    pub fn load(dir: &Path, config: Option<&Path>, device: Device, ctx: &Context) -> Result<Vae> {
        if dir.is_file() {
            let all = ditflow_nn::read_tensors(ctx, dir, device)?;
            let (vae, family) = single_file::vae_tensors(dir, all)?;
            let vae = if single_file::is_ldm(&vae) {
                single_file::to_diffusers(vae)?
            } else {
                vae
            };
            let cfg = match config {
                Some(c) => Config::read(c)?,
                None => Config {
                    path: dir.to_path_buf(),
                    json: single_file::infer_config(dir, &vae, family)?,
                },
            };
            let w = Weights::from_tensors(dir, vae);
            return Ok(Vae(AutoencoderKL::load(&cfg, &w, device)?));
        }
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
    /// `tile_overlap`, default 0.25) also `tiled` (alone with `tiled_only`).
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
            // `tiled_only` skips the whole decode (tiling exists to avoid it).
            if !inputs.contains_key("tiled_only") {
                out.insert("decoded".to_string(), self.0.decode(&z)?);
            }
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

/// `LoadVAE`: a diffusers `AutoencoderKL` folder as a VAE value.
#[derive(Default)]
pub struct LoadVAE;

impl Node for LoadVAE {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadVAE")
            .category("loaders")
            .doc(
                "Loads a diffusers AutoencoderKL folder (config.json plus safetensors), or the \
                 VAE of a single .safetensors file: an all-in-one checkpoint (Stability AI's or \
                 ComfyUI's first_stage_model. in the original layout) or a VAE file, in the \
                 original or diffusers' layout. The scaling and shift factors come from the \
                 config: the folder's, the config input's, or for a file without one its \
                 shapes' with the factors of the family its other keys belong to (SD3, Flux or \
                 SD). Cached until a file changes.",
            )
            .input(
                Port::new("path", "String").doc(
                    "The VAE folder or a .safetensors file; a relative path is taken from the graph's folder.",
                ),
            )
            .input(Port::new("config", "String").default("").doc(
                "For a single file: a diffusers VAE config.json to use instead of the inferred one.",
            ))
            .output(Port::new("vae", "Model<Autoencoder>").doc("The autoencoder."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = input_path(ctx, "path")?;
        let config: String = ctx.input("config")?;
        let config = (!config.is_empty())
            .then(|| ctx.input_path(&config))
            .transpose()?;
        let vae = Vae::load(&dir, config.as_deref(), ctx.device(), ctx)?;
        let value = ctx.make_autoencoder(vae)?;
        ctx.set_output("vae", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        let mut f = model_fingerprint(&input_path(ctx, "path")?)?;
        let config: String = ctx.input("config")?;
        if !config.is_empty() {
            f ^= file_fingerprint("cannot read", &ctx.input_path(&config)?)?.rotate_left(1);
        }
        Ok(Some(f))
    }
}

export_plugin!(
    name: "ditflow-autoencoder-kl",
    version: env!("CARGO_PKG_VERSION"),
    nodes: [LoadVAE]
);
