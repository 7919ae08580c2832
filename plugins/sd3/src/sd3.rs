//! diffusers' `SD3Transformer2DModel`: latents patchified with the centre crop of a sincos table
//! of `pos_embed_max_size`, timestep and pooled-text conditioning, MMDiT joint blocks (each
//! stream its own adaLN-Zero modulation, projections and MLP; one attention over the image-then-
//! text sequence, with RMS-normed q and k on SD3.5), SD3.5's dual attention (a second, image-only
//! attention with its own modulation, MMDiT-X), a last block whose text stream is only read
//! (`context_pre_only`), and a continuously modulated output layer.

use ditflow_nn::{
    attend_heads, chunks, patch_grid, patchify, timestep_sinusoids, unpatchify, Config,
    ContinuousOutput, FeedForward, HeadProjections, Linear, TimestepEmbedding, Weights,
};
use ditflow_plugin::attention::{AttentionKind, AttentionSite};
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::model::{Hooks, LinearInfo};
use ditflow_plugin::{Device, Error, Result, Tensor};

/// The text stream of a joint block: its modulation (adaLN-Zero, 6 chunks; in the last block,
/// `context_pre_only`, an AdaLayerNormContinuous of 2), and, unless only read, its attention
/// output projection and MLP.
pub struct Context {
    pub norm1: Linear,
    pub out: Option<(Linear, FeedForward)>,
}

/// `JointTransformerBlock`.
pub struct JointBlock {
    /// adaLN-Zero: 6 chunks, or 9 with dual attention (SD35AdaLayerNormZeroX).
    pub norm1: Linear,
    pub image: HeadProjections,
    pub text: HeadProjections,
    pub to_out: Linear,
    pub context: Context,
    /// MMDiT-X: the second, image-only attention and its output projection.
    pub attn2: Option<(HeadProjections, Linear)>,
    pub ff: FeedForward,
}

pub struct Sd3 {
    pub dim: usize,
    pub heads: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub patch: usize,
    pub joint_dim: usize,
    pub pooled_dim: usize,
    pub pos_max: usize,
    pub proj_w: Tensor,
    pub proj_b: Tensor,
    /// `[1, max·max, D]`.
    pub pos_embed: Tensor,
    pub timestep_embedder: TimestepEmbedding,
    pub text_embedder: (Linear, Linear),
    pub context_embedder: Linear,
    pub blocks: Vec<JointBlock>,
    /// The output layer; a ControlNet's trunk has none.
    pub head: Option<ContinuousOutput>,
    pub device: Device,
}

/// The embedded inputs of one forward: image and text tokens, `silu(temb)` and the patch grid.
pub struct Embedded {
    pub img: Tensor,
    pub txt: Tensor,
    pub silu: Tensor,
    pub h: usize,
    pub w: usize,
}

/// The model's inputs for one forward (diffusers' argument names).
pub struct Inputs<'a> {
    /// `[B, C, H, W]` latents.
    pub hidden_states: &'a Tensor,
    /// `[B, L, joint_attention_dim]`.
    pub encoder_hidden_states: &'a Tensor,
    /// `[B, pooled_projection_dim]`.
    pub pooled_projections: &'a Tensor,
    /// One per row, in `[0, 1000]`.
    pub timestep: &'a [f32],
    /// Blocks not run (SD3.5's skip-layer guidance).
    pub skip_layers: &'a [usize],
}

impl Sd3 {
    pub fn load(cfg: &Config, w: &Weights, device: Device) -> Result<Sd3> {
        Sd3::load_trunk(cfg, w, device, false)
    }

    /// The transformer, or with `controlnet` an `SD3ControlNetModel`'s trunk: every block
    /// updates its text stream (none is `context_pre_only`) and there is no output layer.
    pub fn load_trunk(cfg: &Config, w: &Weights, device: Device, controlnet: bool) -> Result<Sd3> {
        let bad = |what: String| Error(format!("{}: {what}", cfg.path.display()));
        let patch = cfg.usize_or("patch_size", 2)?;
        let in_channels = cfg.usize_or("in_channels", 16)?;
        let out_channels = cfg.opt_usize("out_channels")?.unwrap_or(in_channels);
        let head_dim = cfg.usize_or("attention_head_dim", 64)?;
        let heads = cfg.usize_or("num_attention_heads", 18)?;
        let dim = heads * head_dim;
        let joint_dim = cfg.usize_or("joint_attention_dim", 4096)?;
        let caption_dim = cfg.usize_or("caption_projection_dim", 1152)?;
        if caption_dim != dim {
            return Err(bad(format!(
                "caption_projection_dim {caption_dim} different from the hidden size {dim}"
            )));
        }
        let pooled_dim = cfg.usize_or("pooled_projection_dim", 2048)?;
        let pos_max = cfg
            .opt_usize("pos_embed_max_size")?
            .ok_or_else(|| bad("a model without pos_embed_max_size".into()))?;
        let qk = match cfg.json.get("qk_norm").and_then(|v| v.as_str()) {
            None => false,
            Some("rms_norm") => true,
            Some(other) => return Err(bad(format!("qk_norm \"{other}\" is not supported"))),
        };
        let dual: Vec<usize> = cfg
            .json
            .get("dual_attention_layers")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64().map(|v| v as usize))
                    .collect()
            })
            .unwrap_or_default();
        let layers = cfg.usize_or("num_layers", 18)?;
        let proj =
            |p: &str, names: [&str; 5]| HeadProjections::load(w, p, names, dim, head_dim, qk, 1e-6);
        let tte = "time_text_embed";
        let blocks = (0..layers)
            .map(|i| {
                let p = format!("transformer_blocks.{i}");
                let is_dual = dual.contains(&i);
                let last = i + 1 == layers && !controlnet;
                Ok(JointBlock {
                    norm1: w.linear(
                        &format!("{p}.norm1.linear"),
                        dim,
                        if is_dual { 9 } else { 6 } * dim,
                        true,
                    )?,
                    image: proj(
                        &format!("{p}.attn"),
                        ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                    )?,
                    text: proj(
                        &format!("{p}.attn"),
                        [
                            "add_q_proj",
                            "add_k_proj",
                            "add_v_proj",
                            "norm_added_q",
                            "norm_added_k",
                        ],
                    )?,
                    to_out: w.linear(&format!("{p}.attn.to_out.0"), dim, dim, true)?,
                    context: Context {
                        norm1: w.linear(
                            &format!("{p}.norm1_context.linear"),
                            dim,
                            if last { 2 } else { 6 } * dim,
                            true,
                        )?,
                        out: if last {
                            None
                        } else {
                            Some((
                                w.linear(&format!("{p}.attn.to_add_out"), dim, dim, true)?,
                                FeedForward::load(
                                    w,
                                    &format!("{p}.ff_context"),
                                    dim,
                                    4,
                                    "gelu-approximate",
                                )?,
                            ))
                        },
                    },
                    attn2: if is_dual {
                        Some((
                            proj(
                                &format!("{p}.attn2"),
                                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                            )?,
                            w.linear(&format!("{p}.attn2.to_out.0"), dim, dim, true)?,
                        ))
                    } else {
                        None
                    },
                    ff: FeedForward::load(w, &format!("{p}.ff"), dim, 4, "gelu-approximate")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Sd3 {
            dim,
            heads,
            in_channels,
            out_channels,
            patch,
            joint_dim,
            pooled_dim,
            pos_max,
            proj_w: w.get("pos_embed.proj.weight", &[dim, in_channels, patch, patch])?,
            proj_b: w.get("pos_embed.proj.bias", &[dim])?,
            pos_embed: w.get("pos_embed.pos_embed", &[1, pos_max * pos_max, dim])?,
            timestep_embedder: TimestepEmbedding::load(
                w,
                &format!("{tte}.timestep_embedder"),
                256,
                dim,
            )?,
            text_embedder: (
                w.linear(
                    &format!("{tte}.text_embedder.linear_1"),
                    pooled_dim,
                    dim,
                    true,
                )?,
                w.linear(&format!("{tte}.text_embedder.linear_2"), dim, dim, true)?,
            ),
            context_embedder: w.linear("context_embedder", joint_dim, dim, true)?,
            blocks,
            head: if controlnet {
                None
            } else {
                Some(ContinuousOutput::load(
                    w,
                    dim,
                    patch * patch * out_channels,
                )?)
            },
            device,
        })
    }

    /// The centre `h × w` of the position table, `[1, h·w, D]` (`PatchEmbed.cropped_pos_embed`).
    fn cropped_pos_embed(&self, h: usize, w: usize) -> Result<Tensor> {
        let m = self.pos_max;
        if h > m || w > m {
            return Err(Error(format!(
                "SD3: a latent of {h}×{w} patches is larger than pos_embed_max_size {m}"
            )));
        }
        let (top, left) = ((m - h) / 2, (m - w) / 2);
        self.pos_embed
            .reshape(&[m as i64, m as i64, self.dim as i64])?
            .slice(0, top as i64, (top + h) as i64, 1)?
            .slice(1, left as i64, (left + w) as i64, 1)?
            .reshape(&[1, (h * w) as i64, self.dim as i64])
    }

    /// Every linear layer by diffusers name (the linear-delta sites).
    pub fn linears(&self) -> Vec<LinearInfo> {
        let mut v: Vec<&Linear> = vec![
            &self.timestep_embedder.linear_1,
            &self.timestep_embedder.linear_2,
            &self.text_embedder.0,
            &self.text_embedder.1,
            &self.context_embedder,
        ];
        for b in &self.blocks {
            v.push(&b.norm1);
            for p in [&b.image, &b.text] {
                v.extend([&p.q, &p.k, &p.v]);
            }
            v.extend([&b.to_out, &b.context.norm1]);
            if let Some((out, ff)) = &b.context.out {
                v.extend([out, &ff.proj_in, &ff.proj_out]);
            }
            if let Some((p, out)) = &b.attn2 {
                v.extend([&p.q, &p.k, &p.v, out]);
            }
            v.extend([&b.ff.proj_in, &b.ff.proj_out]);
        }
        if let Some(head) = &self.head {
            v.extend([&head.norm_out, &head.proj_out]);
        }
        v.into_iter().map(Linear::info).collect()
    }

    /// A joint block on the image and text streams (the text comes back unchanged from the last,
    /// `context_pre_only` block); with `site` (the hooks and the block's index), the patches'
    /// attention hooks run at its joint attention site, on the sequence image then text.
    pub fn joint_block(
        &self,
        blk: &JointBlock,
        silu: &Tensor,
        dl: &LinearDeltas,
        mut img: Tensor,
        mut txt: Tensor,
        site: Option<(&Hooks, usize)>,
    ) -> Result<(Tensor, Tensor)> {
        let (d, heads) = (self.dim, self.heads);
        let (li, lt) = (img.shape()[1], txt.shape()[1]);
        let n_chunks = if blk.attn2.is_some() { 9 } else { 6 };
        let m = chunks(&blk.norm1.apply(silu, "none", dl)?, n_chunks, d)?;
        let n = img.layer_norm(None, None, Some(&m[0]), Some(&m[1]), 1e-6)?;
        // MMDiT-X: the second attention reads the block's input modulated by chunks 6 and 7.
        let n_dual = match blk.attn2 {
            Some(_) => Some(img.layer_norm(None, None, Some(&m[6]), Some(&m[7]), 1e-6)?),
            None => None,
        };
        let ctx_norm = &blk.context.norm1;
        let (nc, c) = match &blk.context.out {
            Some(_) => {
                let c = chunks(&ctx_norm.apply(silu, "none", dl)?, 6, d)?;
                (
                    txt.layer_norm(None, None, Some(&c[0]), Some(&c[1]), 1e-6)?,
                    Some(c),
                )
            }
            // AdaLayerNormContinuous: scale first, then shift.
            None => {
                let c = chunks(&ctx_norm.apply(silu, "none", dl)?, 2, d)?;
                (
                    txt.layer_norm(None, None, Some(&c[1]), Some(&c[0]), 1e-6)?,
                    None,
                )
            }
        };
        let (q, k, v) = blk.image.heads(&n, heads, dl)?;
        let (cq, ck, cv) = blk.text.heads(&nc, heads, dl)?;
        // Image first, then text (JointAttnProcessor2_0).
        let cat = |a: &Tensor, b: &Tensor| ditflow_plugin::ops::concat(&[a, b], 2);
        let (q, k, v) = (cat(&q, &cq)?, cat(&k, &ck)?, cat(&v, &cv)?);
        let hooked = site.map(|(hooks, block)| {
            let site = AttentionSite {
                stack: 0,
                block,
                kind: AttentionKind::Joint,
            };
            (hooks, site)
        });
        let o = match hooked {
            Some((hooks, site)) if hooks.has_attention(&site) => {
                // The hooks read q, k and v as [B, L, H·D].
                let flat = |t: &Tensor| -> Result<Tensor> {
                    let s = t.shape().to_vec();
                    t.permute(&[0, 2, 1, 3])?.reshape(&[
                        s[0] as i64,
                        s[2] as i64,
                        (s[1] * s[3]) as i64,
                    ])
                };
                let head_dim = q.shape()[3];
                hooks.attention_qkv(
                    &site,
                    flat(&q)?,
                    flat(&k)?,
                    flat(&v)?,
                    None,
                    heads,
                    head_dim,
                )?
            }
            _ => attend_heads(&q, &k, &v, None)?,
        };
        let parts = o.split(1, &[li, lt])?;
        img = img.gated_residual(&blk.to_out.apply(&parts[0], "none", dl)?, &m[2])?;
        if let (Some((attn2, out2)), Some(nx)) = (&blk.attn2, &n_dual) {
            let (q2, k2, v2) = attn2.heads(nx, heads, dl)?;
            let o2 = attend_heads(&q2, &k2, &v2, None)?;
            img = img.gated_residual(&out2.apply(&o2, "none", dl)?, &m[8])?;
        }
        let n2 = img.layer_norm(None, None, Some(&m[3]), Some(&m[4]), 1e-6)?;
        img = img.gated_residual(&blk.ff.forward(&n2, dl)?, &m[5])?;
        if let (Some((to_add_out, ff)), Some(c)) = (&blk.context.out, c) {
            txt = txt.gated_residual(&to_add_out.apply(&parts[1], "none", dl)?, &c[2])?;
            let nc2 = txt.layer_norm(None, None, Some(&c[3]), Some(&c[4]), 1e-6)?;
            txt = txt.gated_residual(&ff.forward(&nc2, dl)?, &c[5])?;
        }
        Ok((img, txt))
    }

    /// Whether this is an inpainting model (StableDiffusion3InpaintPipeline's 33 channels):
    /// its input is the latent, a 1-channel mask and the masked image's latent.
    pub fn inpaints(&self) -> bool {
        self.in_channels == 2 * self.out_channels + 1
    }

    /// The inputs checked and embedded: patch tokens with their cropped positions, the context
    /// tokens, and `silu` of the timestep-plus-pooled-text embedding.
    pub fn embed(&self, inp: &Inputs, dl: &LinearDeltas) -> Result<Embedded> {
        let x = inp.hidden_states.to_device(self.device)?;
        let (b, h, w) = patch_grid("SD3", &x, self.in_channels, self.patch)?;
        let es = inp.encoder_hidden_states.shape();
        if es.len() != 3 || es[0] != b || es[2] != self.joint_dim {
            return Err(Error(format!(
                "SD3: encoder_hidden_states must be [{b}, L, {}], got {es:?}",
                self.joint_dim
            )));
        }
        if inp.pooled_projections.shape() != [b, self.pooled_dim] {
            return Err(Error(format!(
                "SD3: pooled_projections must be [{b}, {}], got {:?}",
                self.pooled_dim,
                inp.pooled_projections.shape()
            )));
        }
        if inp.timestep.len() != b {
            return Err(Error(format!(
                "SD3: {} timesteps for a batch of {b}",
                inp.timestep.len()
            )));
        }
        if let Some(&bad) = inp.skip_layers.iter().find(|&&i| i >= self.blocks.len()) {
            return Err(Error(format!(
                "SD3: skip_layers names block {bad} of {}",
                self.blocks.len()
            )));
        }
        let img = patchify(&x, &self.proj_w, &self.proj_b, self.patch)?
            .add(&self.cropped_pos_embed(h, w)?)?;
        let t = timestep_sinusoids(inp.timestep, 256, true, 0.0, self.device)?;
        let pooled = inp.pooled_projections.to_device(self.device)?;
        let temb = self
            .timestep_embedder
            .forward(&t, dl)?
            .add(&self.text_embedder.1.apply(
                &self.text_embedder.0.apply(&pooled, "silu", dl)?,
                "none",
                dl,
            )?)?;
        let silu = temb.unary("silu")?;
        let txt = self.context_embedder.apply(
            &inp.encoder_hidden_states.to_device(self.device)?,
            "none",
            dl,
        )?;
        Ok(Embedded {
            img,
            txt,
            silu,
            h,
            w,
        })
    }

    /// The prediction `[B, out_channels, H, W]`, with the patches' linear deltas `dl` and the
    /// other hooks at their sites.
    pub fn forward(&self, inp: &Inputs, hooks: &Hooks, dl: &LinearDeltas) -> Result<Tensor> {
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| Error::new("SD3: a ControlNet trunk has no output layer"))?;
        let Embedded {
            mut img,
            mut txt,
            silu,
            h,
            w,
        } = self.embed(inp, dl)?;
        let li = img.shape()[1];
        let lt = txt.shape()[1];
        let img = if hooks.is_empty() {
            for (i, blk) in self.blocks.iter().enumerate() {
                if !inp.skip_layers.contains(&i) {
                    (img, txt) = self.joint_block(blk, &silu, dl, img, txt, None)?;
                }
            }
            img
        } else {
            // With patches the blocks run through the hooks on the joint sequence (image then
            // text, as the joint attention orders it): an image residual starts at token 0.
            let joint = ditflow_plugin::ops::concat(&[&img, &txt], 1)?;
            let joint = hooks.run_stack(0, self.blocks.len(), joint, &mut |i, h| {
                if inp.skip_layers.contains(&i) {
                    return Ok(h);
                }
                let parts = h.split(1, &[li, lt])?;
                let (x, t) = self.joint_block(
                    &self.blocks[i],
                    &silu,
                    dl,
                    parts[0].clone(),
                    parts[1].clone(),
                    Some((hooks, i)),
                )?;
                ditflow_plugin::ops::concat(&[&x, &t], 1)
            })?;
            joint.split(1, &[li, lt])?.remove(0)
        };
        let out = head.forward(&img, &silu, dl)?;
        unpatchify(&out, h, w, self.patch, self.out_channels)
    }
}
