//! Flux as a protocol model: `FluxModel` describes itself (the image and text streams, the double-
//! and single-stream stacks) and runs a forward from diffusers' named inputs, on packed latents
//! or on the VAE's `[B, C, H, W]` latents, which it packs 2×2 with FluxPipeline's image ids (so
//! `Sample` drives it like any latent model); `LoadFlux` reads a diffusers folder. Every linear layer takes linear deltas (LoRA); both stacks take block
//! residuals and range overrides on the joint text-then-image sequence (so a residual for the
//! image tokens starts at the text length); attention sites are not offered yet.

use crate::flux::{self, Flux};
use crate::single_file;
use ditflow_plugin::files::{input_path, model_fingerprint};
use ditflow_plugin::linear_delta::LinearDeltaCache;
use ditflow_plugin::model::{
    Call, Denoiser, DenoiserInfo, Hooks, Inputs, LinearInfo, Prediction, StackInfo, StreamInfo,
};
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::path::Path;

/// A loaded `FluxTransformer2DModel`, with its linear-delta sites and the deltas of its last
/// patch set.
pub struct FluxModel {
    pub flux: Flux,
    linears: Vec<LinearInfo>,
    deltas: LinearDeltaCache,
}

impl Object for FluxModel {
    const TAG: &'static str = "ditflow-flux.model";
}

impl Denoiser for FluxModel {
    fn describe(&self) -> DenoiserInfo {
        let m = &self.flux;
        let stack = |name: &str, n: usize, streams: &[&str], sites: u32| StackInfo {
            name: name.into(),
            streams: streams.iter().map(|s| s.to_string()).collect(),
            n_blocks: n,
            sites,
        };
        use ditflow_plugin::abi::{DF_SITE_ATTN, DF_SITE_POST_BLOCK};
        let mut conditioning = vec![
            "encoder_hidden_states",
            "pooled_projections",
            "img_ids",
            "txt_ids",
        ];
        if m.guidance_embedder.is_some() {
            conditioning.push("guidance");
        }
        if m.fill_fold().is_some() {
            conditioning.extend(FILL_PARTS);
        }
        DenoiserInfo {
            prediction: Prediction::Flow,
            // Sample's latents are the VAE's [B, C, H, W]; the forward packs them 2×2.
            latent_layout: "BCHW".into(),
            latent_channels: match m.fill_fold() {
                Some(_) => m.out_channels,
                None => m.in_channels,
            } / (PACK * PACK),
            patch_size: PACK,
            streams: vec![
                StreamInfo {
                    name: "image".into(),
                    width: m.dim,
                },
                StreamInfo {
                    name: "text".into(),
                    width: m.dim,
                },
            ],
            stacks: vec![
                // The double blocks' joint attention takes extra branches (IP-Adapters).
                stack(
                    "transformer_blocks",
                    m.double.len(),
                    &["image", "text"],
                    DF_SITE_POST_BLOCK | DF_SITE_ATTN,
                ),
                stack(
                    "single_transformer_blocks",
                    m.single.len(),
                    &["joint"],
                    DF_SITE_POST_BLOCK,
                ),
            ],
            linears: self.linears.clone(),
            capabilities: ditflow_plugin::abi::DF_CAP_LINEAR_DELTA
                | ditflow_plugin::abi::DF_CAP_LINEAR_MERGE
                | ditflow_plugin::abi::DF_CAP_BLOCK_RESIDUAL
                | ditflow_plugin::abi::DF_CAP_RANGE_OVERRIDE
                | ditflow_plugin::abi::DF_CAP_ATTENTION_EXTRA,
            conditioning: conditioning.into_iter().map(String::from).collect(),
        }
    }

    fn forward(&self, call: &Call, inputs: &Inputs, hooks: &Hooks) -> Result<Tensor> {
        let dl = self.deltas.get(hooks, &self.linears, self.flux.device)?;
        let x = inputs.require("hidden_states")?;
        let batch = x.shape().first().copied().unwrap_or(0);
        // Spatial latents [B, C, H, W] are packed here, with FluxPipeline's image ids; packed
        // ones [B, L, C·4] come with their `img_ids`.
        let spatial = (x.shape().len() == 4).then(|| (x.shape()[2] / PACK, x.shape()[3] / PACK));
        let packed;
        let image_ids;
        let (x, img_ids) = match spatial {
            Some((h, w)) => {
                packed = match self.flux.fill_fold() {
                    Some(f) => fill_tokens(x, inputs, f)?,
                    None => ditflow_nn::pack_latents(x, PACK)?,
                };
                image_ids = match inputs.get("img_ids") {
                    Some(ids) => ids.clone(),
                    None => latent_image_ids(h, w)?,
                };
                (&packed, &image_ids)
            }
            None => (x, inputs.require("img_ids")?),
        };
        let text = inputs.require("encoder_hidden_states")?;
        let zeros;
        let txt_ids = match inputs.get("txt_ids") {
            Some(ids) => ids,
            None => {
                let lt = text.shape().get(1).copied().unwrap_or(0);
                zeros = Tensor::zeros(Kind::Tensor, DType::F32, &[lt, 3])?;
                &zeros
            }
        };
        // A per-row `timestep` input (a lone forward) or the call's sigma, which is Flux's
        // timestep in [0, 1].
        let t = match inputs.get("timestep") {
            Some(t) => t.to_f32_vec()?,
            None => vec![call.sigma as f32; batch],
        };
        // One guidance value for the batch (as FluxPipeline expands it) or one per row.
        let guidance = match inputs.get("guidance").map(Tensor::to_f32_vec).transpose()? {
            Some(g) if g.len() == 1 => Some(vec![g[0]; batch]),
            g => g,
        };
        let out = self.flux.forward(
            &flux::Inputs {
                hidden_states: x,
                encoder_hidden_states: text,
                pooled_projections: inputs.require("pooled_projections")?,
                timestep: &t,
                img_ids,
                txt_ids,
                guidance: guidance.as_deref(),
            },
            hooks,
            &dl,
        )?;
        match spatial {
            Some((h, w)) => ditflow_nn::unpack_latents(&out, h, w, PACK),
            None => Ok(out),
        }
    }
}

/// Flux's latent packing: 2×2 latent pixels per token.
const PACK: usize = 2;

/// The conditioning Flux Fill reads: the masked image's latent and the mask at the image's size.
const FILL_PARTS: [&str; 2] = [
    ditflow_plugin::conditioning::MASKED_IMAGE_LATENTS,
    ditflow_plugin::conditioning::INPAINT_MASK_PIXELS,
];

/// Flux Fill's input tokens for latents `x` `[B, C, h, w]`, as FluxFillPipeline joins them: the
/// latent, the masked image's latent and the mask folded `f`×`f` pixels per latent pixel into
/// `f²` channels, each packed 2×2, then concatenated on channels.
fn fill_tokens(x: &Tensor, inputs: &Inputs, f: usize) -> Result<Tensor> {
    let [masked, mask] = FILL_PARTS.map(|n| inputs.require(n));
    let (masked, mask) = (masked?, mask?);
    let xs = x.shape();
    let (b, h, w) = (xs[0], xs[2], xs[3]);
    if masked.shape() != xs {
        bail!(
            "Flux Fill: masked_image_latents must be {xs:?} like the latent, got {:?}",
            masked.shape()
        );
    }
    if mask.shape() != [b, 1, h * f, w * f] {
        bail!(
            "Flux Fill: the mask must be [{b}, 1, {}, {}], the image's size ({f}× the latent's \
             {h}x{w}), got {:?}",
            h * f,
            w * f,
            mask.shape()
        );
    }
    let (bi, hi, wi, fi) = (b as i64, h as i64, w as i64, f as i64);
    let folded = mask
        .cast(x.dtype())?
        .reshape(&[bi, hi, fi, wi, fi])?
        .permute(&[0, 2, 4, 1, 3])?
        .reshape(&[bi, fi * fi, hi, wi])?;
    let parts = [x, masked, &folded].map(|t| ditflow_nn::pack_latents(t, PACK));
    let [a, m, k] = parts;
    ditflow_plugin::ops::concat(&[&a?, &m?, &k?], 2)
}

/// FluxPipeline's `_prepare_latent_image_ids`: `[h·w, 3]` with (0, row, column) per token.
pub fn latent_image_ids(h: usize, w: usize) -> Result<Tensor> {
    let ids: Vec<f32> = (0..h)
        .flat_map(|r| (0..w).flat_map(move |c| [0.0, r as f32, c as f32]))
        .collect();
    Tensor::from_f32(Kind::Tensor, &[h * w, 3], &ids)
}

impl FluxModel {
    /// From a diffusers folder, or from one `.safetensors` file in the BFL (or ComfyUI) layout
    /// or in diffusers' own key layout.
    pub fn load(path: &Path, device: Device, ctx: &Context) -> Result<FluxModel> {
        let (cfg, w) = ditflow_nn::open_model(ctx, path, device, |tensors| {
            let tensors = if single_file::is_bfl(&tensors) {
                single_file::to_diffusers(path, tensors)?
            } else if tensors
                .keys()
                .any(|k| k.starts_with("single_transformer_blocks."))
            {
                tensors
            } else {
                let what = "a Flux checkpoint (no double_blocks or transformer_blocks keys)";
                return Err(ditflow_nn::not_a(path, what, &tensors));
            };
            let json = single_file::config(path, &tensors)?;
            Ok((tensors, json))
        })?;
        match cfg.class_name() {
            Some("FluxTransformer2DModel") => {}
            other => bail!(
                "{}: class \"{}\" is not a FluxTransformer2DModel",
                cfg.path.display(),
                other.unwrap_or("")
            ),
        }
        let flux = Flux::load(&cfg, &w, device)?;
        // BFL's names too (fused qkv and linear1 over the parts it holds), for LoRAs in BFL's,
        // kohya's and ComfyUI's layouts.
        let bfl = single_file::bfl_linears(
            flux.double.len(),
            flux.single.len(),
            flux.guidance_embedder.is_some(),
        );
        Ok(FluxModel {
            linears: ditflow_plugin::linear_delta::fused_aliases(flux.linears(), &bfl)?,
            flux,
            deltas: LinearDeltaCache::holding_parts(),
        })
    }
}

/// `LoadFlux`: a diffusers `FluxTransformer2DModel` folder as a denoiser.
#[derive(Default)]
pub struct LoadFlux;

impl Node for LoadFlux {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadFlux")
            .category("loaders")
            .doc(
                "Loads Flux.1 dev (with its guidance embedding) or schnell: a diffusers \
                 FluxTransformer2DModel folder (config.json plus safetensors, sharded or not), or \
                 one .safetensors file in Black Forest Labs' layout (flux1-dev.safetensors, \
                 also with ComfyUI's model.diffusion_model. prefix) or diffusers' layout, its \
                 config inferred from the shapes (or a config.json beside it). Its \
                 forward reads diffusers' names: hidden_states (packed latents with their \
                 img_ids, or [B, 16, H, W] latents packed inside), encoder_hidden_states, \
                 pooled_projections, timestep in [0, 1], txt_ids (zeros when absent) and, for \
                 dev, guidance. FLUX.1-Fill (in_channels 2·out + 4·f², 384) inpaints by itself: \
                 it also reads masked_image_latents and the mask at the image's size, which \
                 Sample gives it from its mask and masked_latent inputs.",
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
        let model = FluxModel::load(&dir, ctx.device(), ctx)?;
        let value = ctx.make_denoiser(model)?;
        ctx.set_output("model", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        model_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}
