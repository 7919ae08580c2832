//! diffusers' `WanTransformer3DModel` (Wan2.1 text-to-video): the latent video `[B, C, F, H, W]`
//! cut into `(pt, ph, pw)` patches by the patch embedding (a strided Conv3d, computed as a
//! linear layer over the flattened patches); the timestep's sinusoids through an MLP, projected
//! to six adaLN chunks per block (added to each block's `scale_shift_table`); the text through a
//! GELU-tanh projection; blocks of self-attention (q/k RMS norms over all heads, RoPE with the
//! head dimension split three ways over frame, row and column), cross-attention to the text
//! (after an affine LayerNorm) and a GELU-tanh feed-forward; the output LayerNorm modulated by
//! the time embedding, the projection and unpatchify.

use ditflow_nn::{chunks, timestep_sinusoids, Config, Linear, TimestepEmbedding, Weights};
use ditflow_plugin::attention::{AttentionKind, AttentionSite};
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::model::{BlockPart, Hooks, LinearInfo};
use ditflow_plugin::{Device, Error, Kind, Result, Tensor};

/// LayerNorm's eps everywhere in the model (the config's `eps`, 1e-6 in every release).
const NORM_EPS: f32 = 1e-6;

/// One attention: q, k, v, out, and the RMS norms of q and k over the whole width.
pub struct WanAttention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub out: Linear,
    pub norm_q: Option<Tensor>,
    pub norm_k: Option<Tensor>,
}

impl WanAttention {
    fn load(w: &Weights, p: &str, dim: usize, qk_norm: bool) -> Result<WanAttention> {
        let norm = |n: &str| -> Result<Option<Tensor>> {
            qk_norm
                .then(|| w.get(&format!("{p}.{n}.weight"), &[dim]))
                .transpose()
        };
        Ok(WanAttention {
            q: w.linear(&format!("{p}.to_q"), dim, dim, true)?,
            k: w.linear(&format!("{p}.to_k"), dim, dim, true)?,
            v: w.linear(&format!("{p}.to_v"), dim, dim, true)?,
            out: w.linear(&format!("{p}.to_out.0"), dim, dim, true)?,
            norm_q: norm("norm_q")?,
            norm_k: norm("norm_k")?,
        })
    }

    /// Attention of `x` `[B, L, D]` to `context` (itself when `None`), with RoPE when given;
    /// with attention patches at `at`'s site, their edits, masks and extra branches run.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        heads: usize,
        rope: Option<&(Tensor, Tensor)>,
        dl: &LinearDeltas,
        eps: f32,
        at: (&Hooks, AttentionSite),
    ) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let normed = |t: Tensor, w: &Option<Tensor>| match w {
            Some(w) => t.rms_norm(Some(w), eps),
            None => Ok(t),
        };
        let q = normed(self.q.apply(x, "none", dl)?, &self.norm_q)?;
        let k = normed(self.k.apply(ctx, "none", dl)?, &self.norm_k)?;
        let v = self.v.apply(ctx, "none", dl)?;
        // RoPE on the heads side by side, so attention reads them in place: no per-head copies.
        let rotate = |t: Tensor| -> Result<Tensor> {
            match rope {
                Some((cos, sin)) => t.rope_heads(cos, sin, true, heads),
                None => Ok(t),
            }
        };
        let (q, k) = (rotate(q)?, rotate(k)?);
        let head_dim = q.shape()[2] / heads;
        let (hooks, site) = at;
        let o = if hooks.has_attention(&site) {
            hooks.attention_qkv(&site, q, k, v, None, heads, head_dim)?
        } else {
            ditflow_plugin::ops::attention_qkv(&q, &k, &v, None, heads, head_dim)?
        };
        self.out.apply(&o, "none", dl)
    }

    fn linears(&self) -> [&Linear; 4] {
        [&self.q, &self.k, &self.v, &self.out]
    }
}

/// `WanTransformerBlock`.
pub struct WanBlock {
    /// `[6, D]`: shift, scale and gate of the self-attention, then of the feed-forward.
    pub scale_shift_table: Tensor,
    pub attn1: WanAttention,
    pub attn2: WanAttention,
    /// The cross-attention's affine LayerNorm (`cross_attn_norm`).
    pub norm2: Option<(Tensor, Tensor)>,
    pub ff_in: Linear,
    pub ff_out: Linear,
}

/// The inputs of a forward, by diffusers' names.
pub struct Inputs<'a> {
    /// `[B, C, F, H, W]`.
    pub hidden_states: &'a Tensor,
    /// One per row.
    pub timestep: &'a [f32],
    /// `[B, L, text_dim]`.
    pub encoder_hidden_states: &'a Tensor,
}

/// What one forward's blocks and head read, kept between block ranges when stepped.
pub struct Step {
    pub rope: (Tensor, Tensor),
    /// `[B, 6, D]`.
    pub proj: Tensor,
    pub context: Tensor,
    /// `[B, D]`: the time embedding before its projection (what bridges modulate by).
    pub temb: Tensor,
    pub grid: [usize; 3],
    pub batch: usize,
}

pub struct Wan {
    pub dim: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    /// `(pt, ph, pw)`.
    pub patch: [usize; 3],
    pub text_dim: usize,
    pub freq_dim: usize,
    pub eps: f32,
    /// Positions per axis must stay below this (`rope_max_seq_len`).
    pub rope_max: usize,
    /// The RoPE split of the head dimension: frames, rows, columns.
    pub axes: [usize; 3],
    pub patch_embedding: Linear,
    pub time_embedder: TimestepEmbedding,
    pub time_proj: Linear,
    pub text_1: Linear,
    pub text_2: Linear,
    pub blocks: Vec<WanBlock>,
    /// `[2, D]`: the output's shift and scale.
    pub scale_shift_table: Tensor,
    pub proj_out: Linear,
    pub device: Device,
}

impl Wan {
    pub fn load(cfg: &Config, w: &Weights, device: Device) -> Result<Wan> {
        let bad = |what: String| Error(format!("{}: {what}", cfg.path.display()));
        let patch: Vec<usize> = match cfg.json.get("patch_size") {
            Some(v) => v
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_u64().map(|x| x as usize))
                        .collect()
                })
                .unwrap_or_default(),
            None => vec![1, 2, 2],
        };
        let [pt, ph, pw] = patch[..] else {
            return Err(bad("patch_size must be three sizes, (t, h, w)".into()));
        };
        if pt * ph * pw == 0 {
            return Err(bad("patch_size has a zero".into()));
        }
        for unsupported in ["image_dim", "added_kv_proj_dim", "pos_embed_seq_len"] {
            if cfg.json.get(unsupported).is_some_and(|v| !v.is_null()) {
                return Err(bad(format!(
                    "{unsupported} is set: image-conditioned Wan (I2V) is not supported yet"
                )));
            }
        }
        let heads = cfg.usize_or("num_attention_heads", 40)?;
        let head_dim = cfg.usize_or("attention_head_dim", 128)?;
        let dim = heads * head_dim;
        let in_channels = cfg.usize_or("in_channels", 16)?;
        let out_channels = cfg.opt_usize("out_channels")?.unwrap_or(in_channels);
        let text_dim = cfg.usize_or("text_dim", 4096)?;
        let freq_dim = cfg.usize_or("freq_dim", 256)?;
        let ffn_dim = cfg.usize_or("ffn_dim", 13824)?;
        let layers = cfg.usize_or("num_layers", 40)?;
        let cross_attn_norm = cfg.bool_or("cross_attn_norm", true)?;
        let qk_norm = match cfg.json.get("qk_norm") {
            None => true,
            Some(v) if v.is_null() => false,
            Some(v) if v.as_str() == Some("rms_norm_across_heads") => true,
            Some(v) => return Err(bad(format!("qk_norm {v} is not supported"))),
        };
        let eps = cfg.f64_or("eps", 1e-6)? as f32;
        let rope_max = cfg.usize_or("rope_max_seq_len", 1024)?;
        if head_dim < 6 || head_dim % 2 != 0 {
            return Err(bad(format!(
                "attention_head_dim {head_dim} cannot be split for 3-axis RoPE"
            )));
        }
        let hw = 2 * (head_dim / 6);
        let axes = [head_dim - 2 * hw, hw, hw];
        let patch_in = in_channels * pt * ph * pw;
        let conv = w.get("patch_embedding.weight", &[dim, in_channels, pt, ph, pw])?;
        let patch_embedding = Linear {
            name: "patch_embedding".into(),
            weight: conv.reshape(&[dim as i64, patch_in as i64])?,
            bias: Some(w.get("patch_embedding.bias", &[dim])?),
        };
        let blocks = (0..layers)
            .map(|i| {
                let p = format!("blocks.{i}");
                Ok(WanBlock {
                    scale_shift_table: w
                        .get(&format!("{p}.scale_shift_table"), &[1, 6, dim])?
                        .reshape(&[6, dim as i64])?,
                    attn1: WanAttention::load(w, &format!("{p}.attn1"), dim, qk_norm)?,
                    attn2: WanAttention::load(w, &format!("{p}.attn2"), dim, qk_norm)?,
                    norm2: if cross_attn_norm {
                        Some((
                            w.get(&format!("{p}.norm2.weight"), &[dim])?,
                            w.get(&format!("{p}.norm2.bias"), &[dim])?,
                        ))
                    } else {
                        None
                    },
                    ff_in: w.linear(&format!("{p}.ffn.net.0.proj"), dim, ffn_dim, true)?,
                    ff_out: w.linear(&format!("{p}.ffn.net.2"), ffn_dim, dim, true)?,
                })
            })
            .collect::<Result<_>>()?;
        let ce = "condition_embedder";
        Ok(Wan {
            dim,
            heads,
            head_dim,
            in_channels,
            out_channels,
            patch: [pt, ph, pw],
            text_dim,
            freq_dim,
            eps,
            rope_max,
            axes,
            patch_embedding,
            time_embedder: TimestepEmbedding::load(
                w,
                &format!("{ce}.time_embedder"),
                freq_dim,
                dim,
            )?,
            time_proj: w.linear(&format!("{ce}.time_proj"), dim, 6 * dim, true)?,
            text_1: w.linear(&format!("{ce}.text_embedder.linear_1"), text_dim, dim, true)?,
            text_2: w.linear(&format!("{ce}.text_embedder.linear_2"), dim, dim, true)?,
            blocks,
            scale_shift_table: w
                .get("scale_shift_table", &[1, 2, dim])?
                .reshape(&[2, dim as i64])?,
            proj_out: w.linear("proj_out", dim, out_channels * pt * ph * pw, true)?,
            device,
        })
    }

    /// Every linear layer, for linear deltas (LoRA); the patch embedding is a convolution and
    /// is not one.
    pub fn linears(&self) -> Vec<LinearInfo> {
        let mut v: Vec<&Linear> = vec![
            &self.time_embedder.linear_1,
            &self.time_embedder.linear_2,
            &self.time_proj,
            &self.text_1,
            &self.text_2,
        ];
        for b in &self.blocks {
            v.extend(b.attn1.linears());
            v.extend(b.attn2.linears());
            v.extend([&b.ff_in, &b.ff_out]);
        }
        v.push(&self.proj_out);
        v.into_iter().map(Linear::info).collect()
    }

    /// `(tokens [B, L, C·pt·ph·pw], (F', H', W'))` of a latent video `[B, C, F, H, W]`, each
    /// patch's features in the Conv3d weight's `(c, t, h, w)` order.
    fn patchify(&self, x: &Tensor) -> Result<(Tensor, [usize; 3])> {
        let s = x.shape().to_vec();
        let [pt, ph, pw] = self.patch;
        if s.len() != 5
            || s[1] != self.in_channels
            || !s[2].is_multiple_of(pt)
            || !s[3].is_multiple_of(ph)
            || !s[4].is_multiple_of(pw)
            || s[2] == 0
            || s[3] == 0
            || s[4] == 0
        {
            return Err(Error(format!(
                "Wan: hidden_states must be [B, {}, F, H, W] with F, H, W multiples of the patch \
                 ({pt}, {ph}, {pw}), got {s:?}",
                self.in_channels
            )));
        }
        let grid = [s[2] / pt, s[3] / ph, s[4] / pw];
        if let Some(&big) = grid.iter().find(|&&n| n > self.rope_max) {
            return Err(Error(format!(
                "Wan: {big} patches along an axis exceed rope_max_seq_len {}",
                self.rope_max
            )));
        }
        let i = |v: usize| v as i64;
        let t = x
            .reshape(&[
                i(s[0]),
                i(s[1]),
                i(grid[0]),
                i(pt),
                i(grid[1]),
                i(ph),
                i(grid[2]),
                i(pw),
            ])?
            .permute(&[0, 2, 4, 6, 1, 3, 5, 7])?
            .reshape(&[
                i(s[0]),
                i(grid[0] * grid[1] * grid[2]),
                i(s[1] * pt * ph * pw),
            ])?;
        Ok((t, grid))
    }

    /// The RoPE tables of a `(F', H', W')` grid: positions (frame, row, column) per token.
    fn rope(&self, grid: [usize; 3]) -> Result<(Tensor, Tensor)> {
        let [f, h, w] = grid;
        let ids: Vec<f32> = (0..f)
            .flat_map(|a| {
                (0..h).flat_map(move |b| (0..w).flat_map(move |c| [a as f32, b as f32, c as f32]))
            })
            .collect();
        let ids = Tensor::from_f32(Kind::Tensor, &[f * h * w, 3], &ids)?.to_device(self.device)?;
        ditflow_plugin::ops::rope_tables(&ids, &self.axes, 10000.0)
    }

    /// The prediction `[B, out_channels, F, H, W]`, with the patches' linear deltas `dl` and
    /// the other hooks (block residuals, range overrides) on the `blocks` stack: `prepare`, the
    /// blocks, `finish`, as block stepping runs them.
    pub fn forward(&self, inp: &Inputs, hooks: &Hooks, dl: &LinearDeltas) -> Result<Tensor> {
        let (h, step) = self.prepare(inp, dl)?;
        let n = self.blocks.len();
        let h = if n == 0 {
            h
        } else {
            self.blocks(&step, 0, n - 1, h, hooks, dl)?
        };
        self.finish(&step, h, dl)
    }

    /// The tokens before the first block, and what the blocks and the head read.
    pub fn prepare(&self, inp: &Inputs, dl: &LinearDeltas) -> Result<(Tensor, Step)> {
        let x = inp.hidden_states.to_device(self.device)?;
        let (tokens, grid) = self.patchify(&x)?;
        let b = tokens.shape()[0];
        let text = inp.encoder_hidden_states.to_device(self.device)?;
        if text.shape().len() != 3 || text.shape()[0] != b || text.shape()[2] != self.text_dim {
            return Err(Error(format!(
                "Wan: encoder_hidden_states must be [{b}, L, {}], got {:?}",
                self.text_dim,
                text.shape()
            )));
        }
        if inp.timestep.len() != b {
            return Err(Error(format!(
                "Wan: {} timesteps for a batch of {b}",
                inp.timestep.len()
            )));
        }
        let rope = self.rope(grid)?;
        let h = self.patch_embedding.apply(&tokens, "none", dl)?;
        let t = timestep_sinusoids(inp.timestep, self.freq_dim, true, 0.0, self.device)?;
        let temb = self.time_embedder.forward(&t, dl)?;
        // [B, 6·D]: each block adds its own table.
        let proj = self.time_proj.apply(&temb.unary("silu")?, "none", dl)?;
        let proj = proj.reshape(&[b as i64, 6, self.dim as i64])?;
        let context = self
            .text_2
            .apply(&self.text_1.apply(&text, "gelu_tanh", dl)?, "none", dl)?;
        Ok((
            h,
            Step {
                rope,
                proj,
                context,
                temb,
                grid,
                batch: b,
            },
        ))
    }

    /// Blocks `from..=to` on tokens `h`, with the hooks of the `blocks` stack.
    pub fn blocks(
        &self,
        step: &Step,
        from: usize,
        to: usize,
        h: Tensor,
        hooks: &Hooks,
        dl: &LinearDeltas,
    ) -> Result<Tensor> {
        hooks.run_blocks(0, self.blocks.len(), from, to, h, &mut |i, h| {
            self.block(i, h, &step.proj, &step.context, &step.rope, dl, hooks)
        })
    }

    /// The head: the output modulation (the table plus the time embedding itself), the
    /// projection and unpatchify.
    pub fn finish(&self, step: &Step, h: Tensor, dl: &LinearDeltas) -> Result<Tensor> {
        let b = step.batch;
        let out_mod = self
            .scale_shift_table
            .reshape(&[1, 2, self.dim as i64])?
            .add(&step.temb.reshape(&[b as i64, 1, self.dim as i64])?)?;
        let m = chunks(&out_mod, 2, self.dim)?;
        let h = h.layer_norm(None, None, Some(&m[0]), Some(&m[1]), NORM_EPS)?;
        let out = self.proj_out.apply(&h, "none", dl)?;
        self.unpatchify(&out, b, step.grid)
    }

    /// Half `part` of block `i` on tokens `h`, with the hooks of the `blocks` stack.
    pub fn block_part(
        &self,
        step: &Step,
        i: usize,
        part: BlockPart,
        h: Tensor,
        hooks: &Hooks,
        dl: &LinearDeltas,
    ) -> Result<Tensor> {
        hooks.run_block_part(
            0,
            self.blocks.len(),
            i,
            part,
            h,
            &mut |i, h| {
                let m = self.modulation(i, &step.proj)?;
                self.first_half(i, h, &m, &step.rope, dl, hooks)
            },
            &mut |i, h| {
                let m = self.modulation(i, &step.proj)?;
                self.second_half(i, h, &m, &step.context, dl, hooks)
            },
        )
    }

    /// Block `i` on tokens `h` `[B, L, D]`, with the time projection `proj` `[B, 6, D]` and the
    /// hooks' attention patches at its self- and cross-attention sites.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        i: usize,
        h: Tensor,
        proj: &Tensor,
        context: &Tensor,
        rope: &(Tensor, Tensor),
        dl: &LinearDeltas,
        hooks: &Hooks,
    ) -> Result<Tensor> {
        let m = self.modulation(i, proj)?;
        let h = self.first_half(i, h, &m, rope, dl, hooks)?;
        self.second_half(i, h, &m, context, dl, hooks)
    }

    /// Block `i`'s modulation: the table plus the time projection, six `[B, 1, D]` chunks.
    fn modulation(&self, i: usize, proj: &Tensor) -> Result<Vec<Tensor>> {
        chunks(
            &self.blocks[i]
                .scale_shift_table
                .reshape(&[1, 6, self.dim as i64])?
                .add(proj)?,
            6,
            self.dim,
        )
    }

    /// Block `i` up to its cross-attention's input: the self-attention modulated by `m` (the
    /// block's [`Wan::modulation`]) and its gated residual.
    fn first_half(
        &self,
        i: usize,
        h: Tensor,
        m: &[Tensor],
        rope: &(Tensor, Tensor),
        dl: &LinearDeltas,
        hooks: &Hooks,
    ) -> Result<Tensor> {
        let (shift, scale, gate) = (&m[0], &m[1], &m[2]);
        let x = h.layer_norm(None, None, Some(shift), Some(scale), NORM_EPS)?;
        let a = self.blocks[i].attn1.forward(
            &x,
            None,
            self.heads,
            Some(rope),
            dl,
            self.eps,
            (hooks, self.site(i, AttentionKind::SelfAttention)),
        )?;
        h.gated_residual(&a, gate)
    }

    /// The rest of block `i`: the cross-attention (after its norm) and the feed-forward
    /// modulated by `m`.
    fn second_half(
        &self,
        i: usize,
        h: Tensor,
        m: &[Tensor],
        context: &Tensor,
        dl: &LinearDeltas,
        hooks: &Hooks,
    ) -> Result<Tensor> {
        let blk = &self.blocks[i];
        let (c_shift, c_scale, c_gate) = (&m[3], &m[4], &m[5]);
        let x = match &blk.norm2 {
            Some((w, b)) => h.layer_norm(Some(w), Some(b), None, None, NORM_EPS)?,
            None => h.clone(),
        };
        let a = blk.attn2.forward(
            &x,
            Some(context),
            self.heads,
            None,
            dl,
            self.eps,
            (hooks, self.site(i, AttentionKind::Cross)),
        )?;
        let h = h.add(&a)?;
        let x = h.layer_norm(None, None, Some(c_shift), Some(c_scale), NORM_EPS)?;
        let f = blk
            .ff_out
            .apply(&blk.ff_in.apply(&x, "gelu_tanh", dl)?, "none", dl)?;
        h.gated_residual(&f, c_gate)
    }

    fn site(&self, block: usize, kind: AttentionKind) -> AttentionSite {
        AttentionSite {
            stack: 0,
            block,
            kind,
        }
    }

    /// `[B, L, pt·ph·pw·C]` → `[B, C, F, H, W]` (diffusers' reshape, permute and flattens).
    fn unpatchify(&self, x: &Tensor, b: usize, grid: [usize; 3]) -> Result<Tensor> {
        let [pt, ph, pw] = self.patch;
        let [f, h, w] = grid;
        let c = self.out_channels;
        let i = |v: usize| v as i64;
        x.reshape(&[i(b), i(f), i(h), i(w), i(pt), i(ph), i(pw), i(c)])?
            .permute(&[0, 7, 1, 4, 2, 5, 3, 6])?
            .reshape(&[i(b), i(c), i(f * pt), i(h * ph), i(w * pw)])
    }
}
