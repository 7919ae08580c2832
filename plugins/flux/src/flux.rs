//! diffusers' `FluxTransformer2DModel`: packed latent tokens and text tokens embedded, a
//! timestep (plus guidance) and pooled-text conditioning, double-stream blocks (each stream its
//! own adaLN-Zero modulation, projections and MLP, one joint attention with RMS-normed q and k
//! and 3-axis RoPE over the text-then-image sequence), single-stream blocks over the joined
//! sequence (attention and MLP in parallel), and a continuously modulated output layer.

use ditflow_nn::{
    attend_heads, chunks, timestep_sinusoids, Config, ContinuousOutput, FeedForward,
    HeadProjections, Linear, TimestepEmbedding, Weights,
};
use ditflow_plugin::attention::{AttentionKind, AttentionSite};
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::model::{Hooks, LinearInfo};
use ditflow_plugin::{Device, Error, Result, Tensor};

/// `FluxTransformerBlock`: the double-stream block.
pub struct DoubleBlock {
    pub norm1: Linear,
    pub norm1_context: Linear,
    pub image: HeadProjections,
    pub text: HeadProjections,
    pub to_out: Linear,
    pub to_add_out: Linear,
    pub ff: FeedForward,
    pub ff_context: FeedForward,
}

/// `FluxSingleTransformerBlock`.
pub struct SingleBlock {
    pub norm: Linear,
    pub attn: HeadProjections,
    pub proj_mlp: Linear,
    pub proj_out: Linear,
}

pub struct Flux {
    pub dim: usize,
    pub heads: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub joint_dim: usize,
    pub pooled_dim: usize,
    pub axes: Vec<usize>,
    pub x_embedder: Linear,
    pub context_embedder: Linear,
    pub timestep_embedder: TimestepEmbedding,
    pub guidance_embedder: Option<TimestepEmbedding>,
    pub text_embedder: (Linear, Linear),
    pub double: Vec<DoubleBlock>,
    pub single: Vec<SingleBlock>,
    /// The output layer; a ControlNet's trunk has none.
    pub head: Option<ContinuousOutput>,
    pub device: Device,
}

/// What every block of one forward reads.
pub struct Run<'a> {
    /// `silu(temb)`, the modulations' input.
    pub silu: &'a Tensor,
    pub rope: &'a (Tensor, Tensor),
    pub dl: &'a LinearDeltas,
    /// Text and image token counts.
    pub lt: usize,
    pub li: usize,
}

/// The embedded inputs of one forward: image and text tokens and `silu` of the conditioning
/// embedding.
pub struct Embedded {
    pub img: Tensor,
    pub txt: Tensor,
    pub silu: Tensor,
}

/// The model's inputs for one forward (diffusers' argument names).
pub struct Inputs<'a> {
    /// `[B, L_img, in_channels]` packed latents.
    pub hidden_states: &'a Tensor,
    /// `[B, L_txt, joint_attention_dim]`.
    pub encoder_hidden_states: &'a Tensor,
    /// `[B, pooled_projection_dim]`.
    pub pooled_projections: &'a Tensor,
    /// One per row, in `[0, 1]` (the model multiplies by 1000).
    pub timestep: &'a [f32],
    /// `[L_img, 3]` and `[L_txt, 3]` position ids.
    pub img_ids: &'a Tensor,
    pub txt_ids: &'a Tensor,
    /// One per row (dev only).
    pub guidance: Option<&'a [f32]>,
}

impl Flux {
    pub fn load(cfg: &Config, w: &Weights, device: Device) -> Result<Flux> {
        Flux::load_trunk(cfg, w, device, false)
    }

    /// The transformer, or with `controlnet` a `FluxControlNetModel`'s trunk (no output layer).
    pub fn load_trunk(cfg: &Config, w: &Weights, device: Device, controlnet: bool) -> Result<Flux> {
        let bad = |what: String| Error(format!("{}: {what}", cfg.path.display()));
        // A ControlNet's patch size only says how its hint block's output is packed.
        let patch = cfg.usize_or("patch_size", 1)?;
        if patch != 1 && !controlnet {
            return Err(bad(format!(
                "patch_size {patch} is not supported (Flux uses 1)"
            )));
        }
        let in_channels = cfg.usize_or("in_channels", 64)?;
        let out_channels = cfg.opt_usize("out_channels")?.unwrap_or(in_channels);
        let head_dim = cfg.usize_or("attention_head_dim", 128)?;
        let heads = cfg.usize_or("num_attention_heads", 24)?;
        let dim = heads * head_dim;
        let joint_dim = cfg.usize_or("joint_attention_dim", 4096)?;
        let pooled_dim = cfg.usize_or("pooled_projection_dim", 768)?;
        let axes: Vec<usize> = match cfg.json.get("axes_dims_rope") {
            Some(serde) => serde
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_u64().map(|v| v as usize))
                        .collect()
                })
                .unwrap_or_default(),
            None => vec![16, 56, 56],
        };
        if axes.iter().sum::<usize>() != head_dim || axes.iter().any(|a| a % 2 != 0) {
            return Err(bad(format!(
                "axes_dims_rope {axes:?} must be even and sum to attention_head_dim {head_dim}"
            )));
        }
        let guidance = cfg.bool_or("guidance_embeds", false)?;
        let tte = "time_text_embed";
        let double = (0..cfg.usize_or("num_layers", 19)?)
            .map(|i| {
                let p = format!("transformer_blocks.{i}");
                Ok(DoubleBlock {
                    norm1: w.linear(&format!("{p}.norm1.linear"), dim, 6 * dim, true)?,
                    norm1_context: w.linear(
                        &format!("{p}.norm1_context.linear"),
                        dim,
                        6 * dim,
                        true,
                    )?,
                    image: HeadProjections::load(
                        w,
                        &format!("{p}.attn"),
                        ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                        dim,
                        head_dim,
                        true,
                        1e-6,
                    )?,
                    text: HeadProjections::load(
                        w,
                        &format!("{p}.attn"),
                        [
                            "add_q_proj",
                            "add_k_proj",
                            "add_v_proj",
                            "norm_added_q",
                            "norm_added_k",
                        ],
                        dim,
                        head_dim,
                        true,
                        1e-6,
                    )?,
                    to_out: w.linear(&format!("{p}.attn.to_out.0"), dim, dim, true)?,
                    to_add_out: w.linear(&format!("{p}.attn.to_add_out"), dim, dim, true)?,
                    ff: FeedForward::load(w, &format!("{p}.ff"), dim, 4, "gelu-approximate")?,
                    ff_context: FeedForward::load(
                        w,
                        &format!("{p}.ff_context"),
                        dim,
                        4,
                        "gelu-approximate",
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let single = (0..cfg.usize_or("num_single_layers", 38)?)
            .map(|i| {
                let p = format!("single_transformer_blocks.{i}");
                Ok(SingleBlock {
                    norm: w.linear(&format!("{p}.norm.linear"), dim, 3 * dim, true)?,
                    attn: HeadProjections::load(
                        w,
                        &format!("{p}.attn"),
                        ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                        dim,
                        head_dim,
                        true,
                        1e-6,
                    )?,
                    proj_mlp: w.linear(&format!("{p}.proj_mlp"), dim, 4 * dim, true)?,
                    proj_out: w.linear(&format!("{p}.proj_out"), 5 * dim, dim, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Flux {
            dim,
            heads,
            in_channels,
            out_channels,
            joint_dim,
            pooled_dim,
            axes,
            x_embedder: w.linear("x_embedder", in_channels, dim, true)?,
            context_embedder: w.linear("context_embedder", joint_dim, dim, true)?,
            timestep_embedder: TimestepEmbedding::load(
                w,
                &format!("{tte}.timestep_embedder"),
                256,
                dim,
            )?,
            guidance_embedder: if guidance {
                Some(TimestepEmbedding::load(
                    w,
                    &format!("{tte}.guidance_embedder"),
                    256,
                    dim,
                )?)
            } else {
                None
            },
            text_embedder: (
                w.linear(
                    &format!("{tte}.text_embedder.linear_1"),
                    pooled_dim,
                    dim,
                    true,
                )?,
                w.linear(&format!("{tte}.text_embedder.linear_2"), dim, dim, true)?,
            ),
            double,
            single,
            head: if controlnet {
                None
            } else {
                Some(ContinuousOutput::load(w, dim, out_channels)?)
            },
            device,
        })
    }

    /// Every linear layer by diffusers name (the linear-delta sites).
    pub fn linears(&self) -> Vec<LinearInfo> {
        let mut v: Vec<&Linear> = vec![&self.x_embedder, &self.context_embedder];
        v.extend([
            &self.timestep_embedder.linear_1,
            &self.timestep_embedder.linear_2,
        ]);
        if let Some(g) = &self.guidance_embedder {
            v.extend([&g.linear_1, &g.linear_2]);
        }
        v.extend([&self.text_embedder.0, &self.text_embedder.1]);
        for b in &self.double {
            v.extend([&b.norm1, &b.norm1_context]);
            for p in [&b.image, &b.text] {
                v.extend([&p.q, &p.k, &p.v]);
            }
            v.extend([&b.to_out, &b.to_add_out]);
            for f in [&b.ff, &b.ff_context] {
                v.extend([&f.proj_in, &f.proj_out]);
            }
        }
        for b in &self.single {
            v.extend([
                &b.norm,
                &b.attn.q,
                &b.attn.k,
                &b.attn.v,
                &b.proj_mlp,
                &b.proj_out,
            ]);
        }
        if let Some(head) = &self.head {
            v.extend([&head.norm_out, &head.proj_out]);
        }
        v.into_iter().map(Linear::info).collect()
    }

    /// A double-stream block on the text and image streams; with `site`, the hooks' extra
    /// attention branches there (from the image queries after their norm, before RoPE) are
    /// added to the image stream after the feed-forward, ungated, as diffusers' Flux blocks add
    /// an IP-Adapter's output.
    pub fn double_block(
        &self,
        blk: &DoubleBlock,
        r: &Run,
        txt: Tensor,
        img: Tensor,
        site: Option<(&Hooks, usize)>,
    ) -> Result<(Tensor, Tensor)> {
        let (d, h, dl) = (self.dim, self.heads, r.dl);
        let m = chunks(&blk.norm1.apply(r.silu, "none", dl)?, 6, d)?;
        let c = chunks(&blk.norm1_context.apply(r.silu, "none", dl)?, 6, d)?;
        let n = img.layer_norm(None, None, Some(&m[0]), Some(&m[1]), 1e-6)?;
        let nc = txt.layer_norm(None, None, Some(&c[0]), Some(&c[1]), 1e-6)?;
        let (q, k, v) = blk.image.heads(&n, h, dl)?;
        let (cq, ck, cv) = blk.text.heads(&nc, h, dl)?;
        let cat = |a: &Tensor, b: &Tensor| ditflow_plugin::ops::concat(&[a, b], 2);
        let o = attend_heads(&cat(&cq, &q)?, &cat(&ck, &k)?, &cat(&cv, &v)?, Some(r.rope))?;
        let parts = o.split(1, &[r.lt, r.li])?;
        let mut img = img.gated_residual(&blk.to_out.apply(&parts[1], "none", dl)?, &m[2])?;
        let n2 = img.layer_norm(None, None, Some(&m[3]), Some(&m[4]), 1e-6)?;
        img = img.gated_residual(&blk.ff.forward(&n2, dl)?, &m[5])?;
        if let Some((hooks, block)) = site {
            let site = AttentionSite {
                stack: 0,
                block,
                kind: AttentionKind::Joint,
            };
            let extra = hooks.attention_extras(&site, || {
                let s = q.shape().to_vec();
                q.permute(&[0, 2, 1, 3])?
                    .reshape(&[s[0] as i64, s[2] as i64, (s[1] * s[3]) as i64])
            })?;
            if let Some(extra) = extra {
                img = img.add(&extra)?;
            }
        }
        let mut txt = txt.gated_residual(&blk.to_add_out.apply(&parts[0], "none", dl)?, &c[2])?;
        let nc2 = txt.layer_norm(None, None, Some(&c[3]), Some(&c[4]), 1e-6)?;
        txt = txt.gated_residual(&blk.ff_context.forward(&nc2, dl)?, &c[5])?;
        Ok((txt, img))
    }

    /// A single-stream block on the joint sequence.
    pub fn single_block(&self, blk: &SingleBlock, r: &Run, joint: Tensor) -> Result<Tensor> {
        let (d, h, dl) = (self.dim, self.heads, r.dl);
        let m = chunks(&blk.norm.apply(r.silu, "none", dl)?, 3, d)?;
        let n = joint.layer_norm(None, None, Some(&m[0]), Some(&m[1]), 1e-6)?;
        let mlp = blk.proj_mlp.apply(&n, "gelu_tanh", dl)?;
        let (q, k, v) = blk.attn.heads(&n, h, dl)?;
        let o = attend_heads(&q, &k, &v, Some(r.rope))?;
        let both = ditflow_plugin::ops::concat(&[&o, &mlp], 2)?;
        joint.gated_residual(&blk.proj_out.apply(&both, "none", dl)?, &m[2])
    }

    /// Flux Fill (FluxFillPipeline's inpainting model): `Some(f)` when the input channels
    /// hold, beside the packed latent, the masked image's packed latent and the mask folded
    /// `f`×`f` pixels per latent pixel into channels, then packed (`in = 2·out + 4·f²`; 384 for
    /// FLUX.1-Fill with the VAE's 8).
    pub fn fill_fold(&self) -> Option<usize> {
        let extra = self.in_channels.checked_sub(2 * self.out_channels)?;
        if extra == 0 || !extra.is_multiple_of(4) {
            return None;
        }
        let f = (((extra / 4) as f64).sqrt().round()) as usize;
        (f * f == extra / 4).then_some(f)
    }

    /// The inputs checked and embedded (the position ids are checked here and turned into
    /// RoPE tables by [`Flux::rope`]).
    pub fn embed(&self, inp: &Inputs, dl: &LinearDeltas) -> Result<Embedded> {
        let x = inp.hidden_states;
        let xs = x.shape();
        if xs.len() != 3 || xs[2] != self.in_channels {
            return Err(Error(format!(
                "Flux: hidden_states must be [B, L, {}] packed latents, got {xs:?}",
                self.in_channels
            )));
        }
        let (b, li) = (xs[0], xs[1]);
        let es = inp.encoder_hidden_states.shape();
        if es.len() != 3 || es[0] != b || es[2] != self.joint_dim {
            return Err(Error(format!(
                "Flux: encoder_hidden_states must be [{b}, L, {}], got {es:?}",
                self.joint_dim
            )));
        }
        let lt = es[1];
        if inp.pooled_projections.shape() != [b, self.pooled_dim] {
            return Err(Error(format!(
                "Flux: pooled_projections must be [{b}, {}], got {:?}",
                self.pooled_dim,
                inp.pooled_projections.shape()
            )));
        }
        if inp.img_ids.shape() != [li, 3] || inp.txt_ids.shape() != [lt, 3] {
            return Err(Error(format!(
                "Flux: img_ids must be [{li}, 3] and txt_ids [{lt}, 3], got {:?} and {:?}",
                inp.img_ids.shape(),
                inp.txt_ids.shape()
            )));
        }
        if inp.timestep.len() != b {
            return Err(Error(format!(
                "Flux: {} timesteps for a batch of {b}",
                inp.timestep.len()
            )));
        }
        // Conditioning: timestep (and guidance), plus the pooled text.
        let thousand = |v: &[f32]| -> Vec<f32> { v.iter().map(|t| t * 1000.0).collect() };
        let sinus = |v: &[f32]| timestep_sinusoids(&thousand(v), 256, true, 0.0, self.device);
        let mut temb = self.timestep_embedder.forward(&sinus(inp.timestep)?, dl)?;
        match (&self.guidance_embedder, inp.guidance) {
            (Some(g), Some(gv)) if gv.len() == b => {
                temb = temb.add(&g.forward(&sinus(gv)?, dl)?)?
            }
            (Some(_), _) => {
                return Err(Error(format!(
                    "Flux dev needs one guidance value per row ({b})"
                )))
            }
            (None, _) => {}
        }
        let pooled = inp.pooled_projections.to_device(self.device)?;
        let text = self.text_embedder.1.apply(
            &self.text_embedder.0.apply(&pooled, "silu", dl)?,
            "none",
            dl,
        )?;
        let temb = temb.add(&text)?;
        let silu = temb.unary("silu")?;
        let img = self
            .x_embedder
            .apply(&x.to_device(self.device)?, "none", dl)?;
        let txt = self.context_embedder.apply(
            &inp.encoder_hidden_states.to_device(self.device)?,
            "none",
            dl,
        )?;
        Ok(Embedded { img, txt, silu })
    }

    /// The RoPE tables of the text-then-image positions (as FluxPosEmbed joins them).
    pub fn rope(&self, txt_ids: &Tensor, img_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let ids = ditflow_plugin::ops::concat(&[txt_ids, img_ids], 0)?.to_device(self.device)?;
        ditflow_plugin::ops::rope_tables(&ids, &self.axes, 10000.0)
    }

    /// The prediction `[B, L_img, out_channels]`, with the patches' linear deltas `dl` and
    /// the other hooks at their sites.
    pub fn forward(&self, inp: &Inputs, hooks: &Hooks, dl: &LinearDeltas) -> Result<Tensor> {
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| Error::new("Flux: a ControlNet trunk has no output layer"))?;
        let Embedded {
            mut img,
            mut txt,
            silu,
        } = self.embed(inp, dl)?;
        let (lt, li) = (txt.shape()[1], img.shape()[1]);
        let rope = self.rope(inp.txt_ids, inp.img_ids)?;
        let run = Run {
            silu: &silu,
            rope: &rope,
            dl,
            lt,
            li,
        };
        let joint = if hooks.is_empty() {
            for blk in &self.double {
                (txt, img) = self.double_block(blk, &run, txt, img, None)?;
            }
            let mut joint = ditflow_plugin::ops::concat(&[&txt, &img], 1)?;
            for blk in &self.single {
                joint = self.single_block(blk, &run, joint)?;
            }
            joint
        } else {
            // With patches the blocks run through the hooks on the joint sequence (text then
            // image, as the single blocks hold it): block residuals land at their token
            // offsets, and range overrides see one hidden state.
            let joint = ditflow_plugin::ops::concat(&[&txt, &img], 1)?;
            let joint = hooks.run_stack(0, self.double.len(), joint, &mut |i, h| {
                let parts = h.split(1, &[lt, li])?;
                let (t, x) = self.double_block(
                    &self.double[i],
                    &run,
                    parts[0].clone(),
                    parts[1].clone(),
                    Some((hooks, i)),
                )?;
                ditflow_plugin::ops::concat(&[&t, &x], 1)
            })?;
            hooks.run_stack(1, self.single.len(), joint, &mut |i, h| {
                self.single_block(&self.single[i], &run, h)
            })?
        };
        let img = joint.split(1, &[lt, li])?.remove(1);
        head.forward(&img, &silu, dl)
    }
}
