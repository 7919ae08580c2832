//! `PixArtTransformer2DModel` (diffusers), PixArt-α and PixArt-Σ: patch embedding with 2-D sincos
//! positions, adaLN-single timestep conditioning (plus PixArt-α's resolution and aspect-ratio
//! embeddings), caption projection, and blocks of self-attention, cross-attention and a GELU MLP,
//! each modulated by the shared timestep embedding and a per-block `scale_shift_table`.

use ditflow_nn::{chunks, mask_bias, patch_grid, patchify, timestep_sinusoids, unpatchify};
use ditflow_nn::{
    Attention, Config, FeedForward, Linear, PosEmbedCache, TimestepEmbedding, Weights,
};
use ditflow_plugin::attention::{AttentionKind, AttentionSite};
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::model::Hooks;
use ditflow_plugin::model::LinearInfo;
use ditflow_plugin::{bail, Device, Error, Result, Tensor};
use std::sync::Arc;

/// One `BasicTransformerBlock` with `norm_type = "ada_norm_single"`.
pub struct Block {
    pub attn1: Attention,
    pub attn2: Attention,
    pub ff: FeedForward,
    /// `[1, 6, D]`: shift, scale and gate for attention and for the MLP.
    pub scale_shift_table: Tensor,
}

/// `PixArtAlphaCombinedTimestepSizeEmbeddings` inside `AdaLayerNormSingle`.
pub struct AdaLnSingle {
    pub timestep_embedder: TimestepEmbedding,
    /// PixArt-α's `(resolution_embedder, aspect_ratio_embedder)`.
    pub size_embedders: Option<(TimestepEmbedding, TimestepEmbedding)>,
    pub linear: Linear,
}

/// The model's inputs for one forward.
pub struct Inputs<'a> {
    /// `[B, C, H, W]` latents.
    pub hidden_states: &'a Tensor,
    /// `[B, L, caption_channels]` text embeddings.
    pub encoder_hidden_states: &'a Tensor,
    /// One timestep per batch entry.
    pub timestep: &'a [f32],
    /// `[B, L]`, 1 keeps a text token and 0 drops it.
    pub encoder_attention_mask: Option<&'a Tensor>,
    /// PixArt-α only: `[B, 2]` image height and width, and `[B, 1]` aspect ratio.
    pub resolution: Option<&'a [f32]>,
    pub aspect_ratio: Option<&'a [f32]>,
    /// The captions' cross-attention keys and values from [`PixArt::encode_caption`] for these
    /// `encoder_hidden_states`, when a sampler computed them once for all its steps.
    pub caption: Option<Arc<CaptionCache>>,
}

/// What the blocks and the head read, made once per forward by [`PixArt::prepare`].
pub struct Step {
    /// `[B, 6, D]`: the timestep's modulation for every block.
    pub t6: Tensor,
    /// `[B, D]`: the timestep embedding (the head's modulation).
    pub cond: Tensor,
    pub caption: Arc<CaptionCache>,
    /// The patch grid.
    pub h: usize,
    pub w: usize,
}

/// Every block's linear layers by diffusers name: q, k and v are aliases into the fused
/// projections this implementation loads them as (`attn1.to_qkv`, `attn2.to_kv`).
pub fn linear_layers(blocks: usize, dim: usize, cross: bool) -> Vec<LinearInfo> {
    let mut out = Vec::new();
    let layer = |name: String, o: usize, i: usize, fused: Option<(String, usize)>| LinearInfo {
        name,
        out_features: o,
        in_features: i,
        fused_into: fused,
    };
    for b in 0..blocks {
        let p = format!("transformer_blocks.{b}");
        let qkv = format!("{p}.attn1.to_qkv");
        out.push(layer(qkv.clone(), 3 * dim, dim, None));
        for (j, n) in ["to_q", "to_k", "to_v"].iter().enumerate() {
            out.push(layer(
                format!("{p}.attn1.{n}"),
                dim,
                dim,
                Some((qkv.clone(), j * dim)),
            ));
        }
        out.push(layer(format!("{p}.attn1.to_out.0"), dim, dim, None));
        if cross {
            out.push(layer(format!("{p}.attn2.to_q"), dim, dim, None));
            let kv = format!("{p}.attn2.to_kv");
            out.push(layer(kv.clone(), 2 * dim, dim, None));
            for (j, n) in ["to_k", "to_v"].iter().enumerate() {
                out.push(layer(
                    format!("{p}.attn2.{n}"),
                    dim,
                    dim,
                    Some((kv.clone(), j * dim)),
                ));
            }
            out.push(layer(format!("{p}.attn2.to_out.0"), dim, dim, None));
        }
        out.push(layer(format!("{p}.ff.net.0.proj"), 4 * dim, dim, None));
        out.push(layer(format!("{p}.ff.net.2"), dim, 4 * dim, None));
    }
    out
}

/// Every block's cross-attention keys and values for one batch of captions, and the mask bias.
pub struct CaptionCache {
    pub kv: Vec<Tensor>,
    pub mask: Option<Tensor>,
}

pub struct PixArt {
    pub heads: usize,
    pub dim: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub patch: usize,
    pub base_size: usize,
    pub interpolation_scale: f64,
    pub caption_channels: usize,
    pub norm_eps: f32,
    pub proj_w: Tensor,
    pub proj_b: Tensor,
    pub adaln: AdaLnSingle,
    pub caption_projection: (Linear, Linear),
    pub blocks: Vec<Block>,
    /// `[1, 2, D]`.
    pub scale_shift_table: Tensor,
    pub proj_out: Linear,
    pub device: Device,
    /// The position embedding of the last latent size.
    pub pos_embed: PosEmbedCache,
}

impl PixArt {
    pub fn load(cfg: &Config, w: &Weights, device: Device) -> Result<PixArt> {
        let unsupported =
            |what: String| Error(format!("{}: {what} is not supported", cfg.path.display()));
        if cfg.str_or("norm_type", "ada_norm_single")? != "ada_norm_single" {
            return Err(unsupported(
                "norm_type other than \"ada_norm_single\"".into(),
            ));
        }
        if cfg.bool_or("norm_elementwise_affine", false)? {
            return Err(unsupported("norm_elementwise_affine = true".into()));
        }
        let heads = cfg.usize_or("num_attention_heads", 16)?;
        let head_dim = cfg.usize_or("attention_head_dim", 72)?;
        let dim = heads * head_dim;
        let in_channels = cfg.usize_or("in_channels", 4)?;
        let out_channels = cfg.opt_usize("out_channels")?.unwrap_or(in_channels);
        let layers = cfg.usize_or("num_layers", 28)?;
        let sample_size = cfg.usize_or("sample_size", 128)?;
        let patch = cfg.usize_or("patch_size", 2)?;
        let cross_dim = cfg.usize_or("cross_attention_dim", 1152)?;
        if cross_dim != dim {
            return Err(unsupported(format!(
                "cross_attention_dim {cross_dim} different from the hidden size {dim}"
            )));
        }
        let caption_channels = cfg
            .opt_usize("caption_channels")?
            .ok_or_else(|| unsupported("a model without caption_channels".into()))?;
        let bias = cfg.bool_or("attention_bias", true)?;
        let activation = cfg.str_or("activation_fn", "gelu-approximate")?;
        let interpolation_scale = match cfg.json.get("interpolation_scale").and_then(|v| v.as_f64())
        {
            Some(s) => s,
            None => (sample_size / 64).max(1) as f64,
        };
        let additional = match cfg
            .json
            .get("use_additional_conditions")
            .and_then(|v| v.as_bool())
        {
            Some(b) => b,
            None => sample_size == 128,
        };
        if patch == 0 || heads == 0 || dim % 3 != 0 && additional {
            return Err(unsupported(format!(
                "patch_size {patch} with {heads} heads of {head_dim}"
            )));
        }
        let emb = "adaln_single.emb";
        let adaln = AdaLnSingle {
            timestep_embedder: TimestepEmbedding::load(
                w,
                &format!("{emb}.timestep_embedder"),
                256,
                dim,
            )?,
            size_embedders: if additional {
                Some((
                    TimestepEmbedding::load(
                        w,
                        &format!("{emb}.resolution_embedder"),
                        256,
                        dim / 3,
                    )?,
                    TimestepEmbedding::load(
                        w,
                        &format!("{emb}.aspect_ratio_embedder"),
                        256,
                        dim / 3,
                    )?,
                ))
            } else {
                None
            },
            linear: w.linear("adaln_single.linear", dim, 6 * dim, true)?,
        };
        let blocks = (0..layers)
            .map(|i| {
                let p = format!("transformer_blocks.{i}");
                Ok(Block {
                    attn1: Attention::load(w, &format!("{p}.attn1"), dim, dim, heads, bias, false)?,
                    attn2: Attention::load(w, &format!("{p}.attn2"), dim, dim, heads, bias, true)?,
                    ff: FeedForward::load(w, &format!("{p}.ff"), dim, 4, activation)?,
                    scale_shift_table: w
                        .get(&format!("{p}.scale_shift_table"), &[6, dim])?
                        .reshape(&[1, 6, dim as i64])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PixArt {
            heads,
            dim,
            in_channels,
            out_channels,
            patch,
            base_size: sample_size / patch,
            interpolation_scale,
            caption_channels,
            norm_eps: cfg.f64_or("norm_eps", 1e-6)? as f32,
            proj_w: w.get("pos_embed.proj.weight", &[dim, in_channels, patch, patch])?,
            proj_b: w.get("pos_embed.proj.bias", &[dim])?,
            adaln,
            caption_projection: (
                w.linear("caption_projection.linear_1", caption_channels, dim, true)?,
                w.linear("caption_projection.linear_2", dim, dim, true)?,
            ),
            blocks,
            scale_shift_table: w
                .get("scale_shift_table", &[2, dim])?
                .reshape(&[1, 2, dim as i64])?,
            proj_out: w.linear("proj_out", dim, patch * patch * out_channels, true)?,
            device,
            pos_embed: PosEmbedCache::default(),
        })
    }

    /// The captions `[B, L, caption_channels]` (with their `[B, L]` mask) projected and turned
    /// into every block's cross-attention keys and values.
    pub fn encode_caption(
        &self,
        encoder_hidden_states: &Tensor,
        mask: Option<&Tensor>,
        d: &LinearDeltas,
    ) -> Result<CaptionCache> {
        let caption = self
            .caption_projection
            .0
            .apply(encoder_hidden_states, "gelu_tanh", d)?;
        let caption = self.caption_projection.1.apply(&caption, "none", d)?;
        Ok(CaptionCache {
            kv: self
                .blocks
                .iter()
                .map(|b| b.attn2.context_kv(&caption, d))
                .collect::<Result<_>>()?,
            mask: mask.map(mask_bias).transpose()?,
        })
    }

    /// Every linear layer by diffusers name, the blocks' and the embeddings' and output's.
    pub fn linears(&self) -> Vec<LinearInfo> {
        let d = self.dim;
        let mut out = linear_layers(self.blocks.len(), d, true);
        let mut plain = |l: &Linear| {
            let s = l.weight.shape();
            out.push(LinearInfo {
                name: l.name.clone(),
                out_features: s[0],
                in_features: s[1],
                fused_into: None,
            })
        };
        let t = &self.adaln.timestep_embedder;
        plain(&t.linear_1);
        plain(&t.linear_2);
        if let Some((r, a)) = &self.adaln.size_embedders {
            for l in [&r.linear_1, &r.linear_2, &a.linear_1, &a.linear_2] {
                plain(l);
            }
        }
        plain(&self.adaln.linear);
        plain(&self.caption_projection.0);
        plain(&self.caption_projection.1);
        plain(&self.proj_out);
        out
    }

    /// The denoiser's output `[B, out_channels, H, W]`, with the patches' linear deltas `dl`
    /// and the other hooks at their sites: [`PixArt::prepare`], every block, [`PixArt::finish`].
    pub fn forward(&self, inp: &Inputs, hooks: &Hooks, dl: &LinearDeltas) -> Result<Tensor> {
        let (hidden, step) = self.prepare(inp, dl)?;
        let hidden = hooks.run_stack(0, self.blocks.len(), hidden, &mut |i, h| {
            self.block(&step, i, h, hooks, dl)
        })?;
        self.finish(&step, hidden, dl)
    }

    /// Blocks `from..=to` on `hidden` (block stepping), with the hooks at their sites.
    pub fn blocks(
        &self,
        step: &Step,
        from: usize,
        to: usize,
        hidden: Tensor,
        hooks: &Hooks,
        dl: &LinearDeltas,
    ) -> Result<Tensor> {
        hooks.run_blocks(0, self.blocks.len(), from, to, hidden, &mut |i, h| {
            self.block(step, i, h, hooks, dl)
        })
    }

    /// The patch tokens with positions `[B, N, D]`, and what every block and the head read.
    pub fn prepare(&self, inp: &Inputs, dl: &LinearDeltas) -> Result<(Tensor, Step)> {
        let x = inp.hidden_states;
        let (b, h, w) = patch_grid("PixArt", x, self.in_channels, self.patch)?;
        let e = inp.encoder_hidden_states.shape();
        if e.len() != 3 || e[0] != b || e[2] != self.caption_channels {
            return Err(Error(format!(
                "PixArt: encoder_hidden_states must be [{b}, L, {}], got {e:?}",
                self.caption_channels
            )));
        }
        if inp.timestep.len() != b {
            return Err(Error(format!(
                "PixArt: {} timesteps for a batch of {b}",
                inp.timestep.len()
            )));
        }
        let d = self.dim;
        // Patches plus positions.
        let pos = self.pos_embed.get(
            d,
            h,
            w,
            self.base_size,
            self.interpolation_scale,
            self.device,
        )?;
        let hidden = patchify(x, &self.proj_w, &self.proj_b, self.patch)?.add(&pos)?;
        // adaLN-single.
        let t = timestep_sinusoids(inp.timestep, 256, true, 0.0, self.device)?;
        let mut cond = self.adaln.timestep_embedder.forward(&t, dl)?;
        if let Some((res_emb, ar_emb)) = &self.adaln.size_embedders {
            let (Some(res), Some(ar)) = (inp.resolution, inp.aspect_ratio) else {
                return Err(Error(
                    "PixArt-α needs resolution and aspect_ratio inputs".into(),
                ));
            };
            if res.len() != 2 * b || ar.len() != b {
                return Err(Error(format!(
                    "PixArt: resolution must be [{b}, 2] and aspect_ratio [{b}, 1]"
                )));
            }
            let r = res_emb
                .forward(&timestep_sinusoids(res, 256, true, 0.0, self.device)?, dl)?
                .reshape(&[b as i64, -1])?;
            let a = ar_emb
                .forward(&timestep_sinusoids(ar, 256, true, 0.0, self.device)?, dl)?
                .reshape(&[b as i64, -1])?;
            cond = cond.add(&ditflow_plugin::ops::concat(&[&r, &a], 1)?)?;
        }
        let t6 = self.adaln.linear.apply(&cond.unary("silu")?, "none", dl)?;
        let t6 = t6.reshape(&[b as i64, 6, d as i64])?;
        // Captions: projected, then each block's keys and values (unless given).
        let caption = match &inp.caption {
            Some(c) => c.clone(),
            None => Arc::new(self.encode_caption(
                inp.encoder_hidden_states,
                inp.encoder_attention_mask,
                dl,
            )?),
        };
        if caption.kv.len() != self.blocks.len()
            || caption.kv.first().is_some_and(|kv| kv.shape()[0] != b)
        {
            bail!("PixArt: the caption cache does not match this model and batch");
        }
        Ok((
            hidden,
            Step {
                t6,
                cond,
                caption,
                h,
                w,
            },
        ))
    }

    /// Block `i` on `hidden`.
    fn block(
        &self,
        step: &Step,
        i: usize,
        mut hidden: Tensor,
        hooks: &Hooks,
        dl: &LinearDeltas,
    ) -> Result<Tensor> {
        let d = self.dim;
        let (t6, caption) = (&step.t6, &step.caption);
        let (block, kv) = (&self.blocks[i], &caption.kv[i]);
        let m = chunks(&block.scale_shift_table.add(t6)?, 6, d)?;
        let (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) =
            (&m[0], &m[1], &m[2], &m[3], &m[4], &m[5]);
        let n = hidden.layer_norm(None, None, Some(shift_msa), Some(scale_msa), self.norm_eps)?;
        let site = |kind| AttentionSite {
            stack: 0,
            block: i,
            kind,
        };
        let a1 = block.attn1.forward_at(
            &n,
            None,
            None,
            dl,
            Some((hooks, site(AttentionKind::SelfAttention))),
        )?;
        hidden = hidden.gated_residual(&a1, gate_msa)?;
        hidden = hidden.add(&block.attn2.forward_kv_at(
            &hidden,
            kv,
            caption.mask.as_ref(),
            dl,
            Some((hooks, site(AttentionKind::Cross))),
        )?)?;
        let n = hidden.layer_norm(None, None, Some(shift_mlp), Some(scale_mlp), self.norm_eps)?;
        hidden.gated_residual(&block.ff.forward(&n, dl)?, gate_mlp)
    }

    /// The head: final modulated norm, projection and unpatchify, `[B, out_channels, H, W]`.
    pub fn finish(&self, step: &Step, hidden: Tensor, dl: &LinearDeltas) -> Result<Tensor> {
        let (d, b) = (self.dim, hidden.shape()[0]);
        let (cond, h, w) = (&step.cond, step.h, step.w);
        let m = chunks(
            &self
                .scale_shift_table
                .add(&cond.reshape(&[b as i64, 1, d as i64])?)?,
            2,
            d,
        )?;
        let out = hidden.layer_norm(None, None, Some(&m[0]), Some(&m[1]), 1e-6)?;
        let out = self.proj_out.apply(&out, "none", dl)?;
        unpatchify(&out, h, w, self.patch, self.out_channels)
    }
}
