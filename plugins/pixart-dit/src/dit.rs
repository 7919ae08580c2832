//! `DiTTransformer2DModel` (diffusers), class-conditional DiT (Peebles & Xie, 2023): patch
//! embedding with 2-D sincos positions, and blocks of self-attention and a GELU MLP under adaLN-Zero
//! modulation from the timestep and class-label embedding.

use ditflow_nn::{chunks, patch_grid, patchify, timestep_sinusoids, unpatchify};
use ditflow_nn::{
    Attention, Config, FeedForward, Linear, PosEmbedCache, TimestepEmbedding, Weights,
};
use ditflow_plugin::attention::{AttentionKind, AttentionSite};
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::model::Hooks;
use ditflow_plugin::{Device, Error, Kind, Result, Tensor};

/// `CombinedTimestepLabelEmbeddings` inside a block's `AdaLayerNormZero`.
pub struct TimestepLabelEmbedding {
    pub timestep_embedder: TimestepEmbedding,
    /// `[num_classes + 1, D]`: the last row is the null class used for guidance.
    pub class_table: Tensor,
}

/// One `BasicTransformerBlock` with `norm_type = "ada_norm_zero"`.
pub struct Block {
    pub emb: TimestepLabelEmbedding,
    /// `norm1.linear`: the six modulation vectors.
    pub norm1_linear: Linear,
    pub attn1: Attention,
    pub ff: FeedForward,
}

pub struct DiT {
    pub dim: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub patch: usize,
    pub base_size: usize,
    pub num_classes: usize,
    pub norm_eps: f32,
    pub proj_w: Tensor,
    pub proj_b: Tensor,
    pub blocks: Vec<Block>,
    pub proj_out_1: Linear,
    pub proj_out_2: Linear,
    pub device: Device,
    /// The position embedding of the last latent size.
    pub pos_embed: PosEmbedCache,
}

impl DiT {
    pub fn load(cfg: &Config, w: &Weights, device: Device) -> Result<DiT> {
        let unsupported =
            |what: &str| Error(format!("{}: {what} is not supported", cfg.path.display()));
        if cfg.str_or("norm_type", "ada_norm_zero")? != "ada_norm_zero" {
            return Err(unsupported("norm_type other than \"ada_norm_zero\""));
        }
        if cfg.bool_or("norm_elementwise_affine", false)? {
            return Err(unsupported("norm_elementwise_affine = true"));
        }
        let heads = cfg.usize_or("num_attention_heads", 16)?;
        let dim = heads * cfg.usize_or("attention_head_dim", 72)?;
        let in_channels = cfg.usize_or("in_channels", 4)?;
        let out_channels = cfg.opt_usize("out_channels")?.unwrap_or(in_channels);
        let layers = cfg.usize_or("num_layers", 28)?;
        let sample_size = cfg.usize_or("sample_size", 32)?;
        let patch = cfg.usize_or("patch_size", 2)?;
        let num_classes = cfg.usize_or("num_embeds_ada_norm", 1000)?;
        let bias = cfg.bool_or("attention_bias", true)?;
        let activation = cfg.str_or("activation_fn", "gelu-approximate")?;
        if patch == 0 || heads == 0 {
            return Err(unsupported("patch_size 0 or no heads"));
        }
        let blocks = (0..layers)
            .map(|i| {
                let p = format!("transformer_blocks.{i}");
                let e = format!("{p}.norm1.emb");
                Ok(Block {
                    emb: TimestepLabelEmbedding {
                        timestep_embedder: TimestepEmbedding::load(
                            w,
                            &format!("{e}.timestep_embedder"),
                            256,
                            dim,
                        )?,
                        class_table: w.get(
                            &format!("{e}.class_embedder.embedding_table.weight"),
                            &[num_classes + 1, dim],
                        )?,
                    },
                    norm1_linear: w.linear(&format!("{p}.norm1.linear"), dim, 6 * dim, true)?,
                    attn1: Attention::load(w, &format!("{p}.attn1"), dim, dim, heads, bias, false)?,
                    ff: FeedForward::load(w, &format!("{p}.ff"), dim, 4, activation)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if blocks.is_empty() {
            return Err(unsupported("a model without layers"));
        }
        Ok(DiT {
            dim,
            in_channels,
            out_channels,
            patch,
            base_size: sample_size / patch,
            num_classes,
            norm_eps: cfg.f64_or("norm_eps", 1e-5)? as f32,
            proj_w: w.get("pos_embed.proj.weight", &[dim, in_channels, patch, patch])?,
            proj_b: w.get("pos_embed.proj.bias", &[dim])?,
            blocks,
            proj_out_1: w.linear("proj_out_1", dim, 2 * dim, true)?,
            proj_out_2: w.linear("proj_out_2", dim, patch * patch * out_channels, true)?,
            device,
            pos_embed: PosEmbedCache::default(),
        })
    }

    /// The denoiser's output `[B, out_channels, H, W]` for latents `[B, C, H, W]`, one timestep
    /// and one class label per batch entry (`num_classes` is the null class).
    pub fn forward(
        &self,
        x: &Tensor,
        timestep: &[f32],
        class_labels: &[i64],
        hooks: &Hooks,
    ) -> Result<Tensor> {
        let (b, h, w) = patch_grid("DiT", x, self.in_channels, self.patch)?;
        if timestep.len() != b || class_labels.len() != b {
            return Err(Error(format!(
                "DiT: {} timesteps and {} labels for a batch of {b}",
                timestep.len(),
                class_labels.len()
            )));
        }
        if let Some(bad) = class_labels
            .iter()
            .find(|&&c| c < 0 || c as usize > self.num_classes)
        {
            return Err(Error(format!(
                "DiT: class label {bad} is outside 0..={} ({} is the null class)",
                self.num_classes, self.num_classes
            )));
        }
        let d = self.dim;
        let pos = self
            .pos_embed
            .get(d, h, w, self.base_size, 1.0, self.device)?;
        let hidden = patchify(x, &self.proj_w, &self.proj_b, self.patch)?.add(&pos)?;
        let t = timestep_sinusoids(timestep, 256, true, 1.0, self.device)?;
        let labels = Tensor::from_bytes(
            Kind::Tensor,
            ditflow_plugin::DType::I64,
            &[b],
            &class_labels
                .iter()
                .flat_map(|c| c.to_le_bytes())
                .collect::<Vec<u8>>(),
        )?
        .to_device(self.device)?;
        let conditioning = |e: &TimestepLabelEmbedding| -> Result<Tensor> {
            e.timestep_embedder
                .forward(&t, LinearDeltas::none())?
                .add(&e.class_table.embedding(&labels)?)
        };
        let hidden = hooks.run_stack(0, self.blocks.len(), hidden, &mut |i, mut hidden| {
            let block = &self.blocks[i];
            let emb = block
                .norm1_linear
                .forward(&conditioning(&block.emb)?.unary("silu")?, "none")?;
            let m = chunks(&emb, 6, d)?;
            let (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) =
                (&m[0], &m[1], &m[2], &m[3], &m[4], &m[5]);
            let n = hidden.layer_norm(None, None, Some(shift_msa), Some(scale_msa), 1e-6)?;
            hidden = hidden.gated_residual(
                &block.attn1.forward_at(
                    &n,
                    None,
                    None,
                    LinearDeltas::none(),
                    Some((
                        hooks,
                        AttentionSite {
                            stack: 0,
                            block: i,
                            kind: AttentionKind::SelfAttention,
                        },
                    )),
                )?,
                gate_msa,
            )?;
            let n =
                hidden.layer_norm(None, None, Some(shift_mlp), Some(scale_mlp), self.norm_eps)?;
            hidden.gated_residual(&block.ff.forward(&n, LinearDeltas::none())?, gate_mlp)
        })?;
        let cond = conditioning(&self.blocks[0].emb)?;
        let m = chunks(
            &self.proj_out_1.forward(&cond.unary("silu")?, "none")?,
            2,
            d,
        )?;
        let out = hidden.layer_norm(None, None, Some(&m[0]), Some(&m[1]), 1e-6)?;
        let out = self.proj_out_2.forward(&out, "none")?;
        unpatchify(&out, h, w, self.patch, self.out_channels)
    }
}
