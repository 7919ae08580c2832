//! diffusers' `StableAudioDiTModel`: the latent audio `[B, C, L]` through a 1×1 convolution with
//! a residual and an input projection into tokens; one global token first (the projected
//! global conditioning plus the timestep's Gaussian Fourier features through an MLP); blocks of
//! self-attention (RoPE on the first half of each head's channels, pairs split in halves),
//! grouped-query cross-attention to the projected text (key/value heads repeated), and a SwiGLU
//! feed-forward, each after an affine LayerNorm; the output projection, the global token
//! dropped, and a 1×1 convolution with a residual.
//!
//! The RoPE table is `StableAudioPipeline`'s: `get_1d_rotary_pos_embed(head_dim / 2, L + 1)`
//! in float32 (angles `pos · 1/10000^(2j/dim)` rounded as float32 products), or the tables
//! given as inputs.

use ditflow_nn::{rotary_tables_f32, split_heads, Config, Linear, Weights};
use ditflow_plugin::attention::{AttentionKind, AttentionSite};
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::model::{BlockPart, Hooks, LinearInfo};
use ditflow_plugin::{Device, Error, Kind, Result, Tensor};

/// LayerNorm's eps (the blocks' `norm_eps`).
const NORM_EPS: f32 = 1e-5;

/// An attention without biases: q, k, v, out.
pub struct AudioAttention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub out: Linear,
}

impl AudioAttention {
    fn load(w: &Weights, p: &str, dim: usize, context: usize, kv_dim: usize) -> Result<Self> {
        Ok(AudioAttention {
            q: w.linear(&format!("{p}.to_q"), dim, dim, false)?,
            k: w.linear(&format!("{p}.to_k"), context, kv_dim, false)?,
            v: w.linear(&format!("{p}.to_v"), context, kv_dim, false)?,
            out: w.linear(&format!("{p}.to_out.0"), dim, dim, false)?,
        })
    }

    fn linears(&self) -> [&Linear; 4] {
        [&self.q, &self.k, &self.v, &self.out]
    }
}

/// `StableAudioDiTBlock`.
pub struct AudioBlock {
    pub norm1: (Tensor, Tensor),
    pub attn1: AudioAttention,
    pub norm2: (Tensor, Tensor),
    pub attn2: AudioAttention,
    pub norm3: (Tensor, Tensor),
    /// SwiGLU: `[D → 2·inner]` (value, then gate), then `[inner → D]`.
    pub ff_in: Linear,
    pub ff_out: Linear,
    pub ff_inner: usize,
}

/// The inputs of a forward, by diffusers' names.
pub struct Inputs<'a> {
    /// `[B, C, L]`.
    pub hidden_states: &'a Tensor,
    /// One per row.
    pub timestep: &'a [f32],
    /// `[B, S, cross_attention_input_dim]`.
    pub encoder_hidden_states: &'a Tensor,
    /// `[B, 1, global_states_input_dim]`.
    pub global_hidden_states: &'a Tensor,
    /// The pipeline's `(cos, sin)`, each `[L + 1, head_dim / 2]`, when given.
    pub rotary: Option<(&'a Tensor, &'a Tensor)>,
}

/// What one forward's blocks and head read, kept between block ranges when stepped.
pub struct Step {
    pub rope: (Tensor, Tensor),
    pub context: Tensor,
    /// `[B, D]`: the timestep's embedding (what bridges modulate by).
    pub time: Tensor,
    /// Audio tokens (the global one not counted).
    pub len: usize,
}

pub struct StableAudioDit {
    pub dim: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub cross_dim: usize,
    pub cross_input_dim: usize,
    pub global_input_dim: usize,
    /// The Gaussian Fourier projection's frequencies, `[time_proj_dim / 2]`.
    pub time_freqs: Vec<f32>,
    pub timestep_1: Linear,
    pub timestep_2: Linear,
    pub global_1: Linear,
    pub global_2: Linear,
    pub cross_1: Linear,
    pub cross_2: Linear,
    /// The 1×1 convolutions as linears over channels.
    pub preprocess: Linear,
    pub proj_in: Linear,
    pub blocks: Vec<AudioBlock>,
    pub proj_out: Linear,
    pub postprocess: Linear,
    pub device: Device,
}

fn layer_norm(w: &Weights, p: &str, dim: usize) -> Result<(Tensor, Tensor)> {
    Ok((
        w.get(&format!("{p}.weight"), &[dim])?,
        w.get(&format!("{p}.bias"), &[dim])?,
    ))
}

/// A 1×1 `Conv1d` without bias, `[c, c, 1]`, as a linear layer over channels.
fn pointwise(w: &Weights, name: &str, c: usize) -> Result<Linear> {
    Ok(Linear {
        name: name.into(),
        weight: w
            .get(&format!("{name}.weight"), &[c, c, 1])?
            .reshape(&[c as i64, c as i64])?,
        bias: None,
    })
}

impl StableAudioDit {
    pub fn load(cfg: &Config, w: &Weights, device: Device) -> Result<StableAudioDit> {
        let bad = |what: String| Error(format!("{}: {what}", cfg.path.display()));
        let head_dim = cfg.usize_or("attention_head_dim", 64)?;
        let heads = cfg.usize_or("num_attention_heads", 24)?;
        let kv_heads = cfg.usize_or("num_key_value_attention_heads", 12)?;
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(bad(format!(
                "{heads} query heads cannot share {kv_heads} key/value heads"
            )));
        }
        if head_dim % 4 != 0 {
            return Err(bad(format!(
                "attention_head_dim {head_dim}: RoPE rotates half of it in pairs"
            )));
        }
        let dim = heads * head_dim;
        let in_channels = cfg.usize_or("in_channels", 64)?;
        let out_channels = cfg.usize_or("out_channels", 64)?;
        if out_channels != in_channels {
            return Err(bad(format!(
                "out_channels {out_channels} differs from in_channels {in_channels}"
            )));
        }
        let cross_dim = cfg.usize_or("cross_attention_dim", 768)?;
        let time_proj_dim = cfg.usize_or("time_proj_dim", 256)?;
        let global_input_dim = cfg.usize_or("global_states_input_dim", 1536)?;
        let cross_input_dim = cfg.usize_or("cross_attention_input_dim", 768)?;
        let layers = cfg.usize_or("num_layers", 24)?;
        let kv_dim = kv_heads * head_dim;
        let ff_inner = 4 * dim;
        let blocks = (0..layers)
            .map(|i| {
                let p = format!("transformer_blocks.{i}");
                Ok(AudioBlock {
                    norm1: layer_norm(w, &format!("{p}.norm1"), dim)?,
                    attn1: AudioAttention::load(w, &format!("{p}.attn1"), dim, dim, dim)?,
                    norm2: layer_norm(w, &format!("{p}.norm2"), dim)?,
                    attn2: AudioAttention::load(w, &format!("{p}.attn2"), dim, cross_dim, kv_dim)?,
                    norm3: layer_norm(w, &format!("{p}.norm3"), dim)?,
                    ff_in: w.linear(&format!("{p}.ff.net.0.proj"), dim, 2 * ff_inner, true)?,
                    ff_out: w.linear(&format!("{p}.ff.net.2"), ff_inner, dim, true)?,
                    ff_inner,
                })
            })
            .collect::<Result<_>>()?;
        Ok(StableAudioDit {
            dim,
            heads,
            kv_heads,
            head_dim,
            in_channels,
            out_channels,
            cross_dim,
            cross_input_dim,
            global_input_dim,
            time_freqs: w
                .get("time_proj.weight", &[time_proj_dim / 2])?
                .to_f32_vec()?,
            timestep_1: w.linear("timestep_proj.0", time_proj_dim, dim, true)?,
            timestep_2: w.linear("timestep_proj.2", dim, dim, true)?,
            global_1: w.linear("global_proj.0", global_input_dim, dim, false)?,
            global_2: w.linear("global_proj.2", dim, dim, false)?,
            cross_1: w.linear("cross_attention_proj.0", cross_input_dim, cross_dim, false)?,
            cross_2: w.linear("cross_attention_proj.2", cross_dim, cross_dim, false)?,
            preprocess: pointwise(w, "preprocess_conv", in_channels)?,
            proj_in: w.linear("proj_in", in_channels, dim, false)?,
            blocks,
            proj_out: w.linear("proj_out", dim, out_channels, false)?,
            postprocess: pointwise(w, "postprocess_conv", out_channels)?,
            device,
        })
    }

    /// Every linear layer (the 1×1 convolutions too), for linear deltas.
    pub fn linears(&self) -> Vec<LinearInfo> {
        let mut v: Vec<&Linear> = vec![
            &self.timestep_1,
            &self.timestep_2,
            &self.global_1,
            &self.global_2,
            &self.cross_1,
            &self.cross_2,
            &self.preprocess,
            &self.proj_in,
        ];
        for b in &self.blocks {
            v.extend(b.attn1.linears());
            v.extend(b.attn2.linears());
            v.extend([&b.ff_in, &b.ff_out]);
        }
        v.extend([&self.proj_out, &self.postprocess]);
        v.into_iter().map(Linear::info).collect()
    }

    /// `StableAudioGaussianFourierProjection` (flip_sin_to_cos, no log) of `t`: `[B, 2·half]`,
    /// cosines first, from float32 angles `(2π·t)·w` as PyTorch rounds them.
    fn time_features(&self, t: &[f32]) -> Result<Tensor> {
        let half = self.time_freqs.len();
        let two_pi = (2.0 * std::f64::consts::PI) as f32;
        let mut v = Vec::with_capacity(t.len() * 2 * half);
        for &ti in t {
            let base = two_pi * ti;
            let angles: Vec<f64> = self
                .time_freqs
                .iter()
                .map(|w| f64::from(base * w))
                .collect();
            v.extend(angles.iter().map(|a| a.cos() as f32));
            v.extend(angles.iter().map(|a| a.sin() as f32));
        }
        Tensor::from_f32(Kind::Tensor, &[t.len(), 2 * half], &v)?.to_device(self.device)
    }

    /// The prediction `[B, C, L]`, with linear deltas `dl` and the hooks on the
    /// `transformer_blocks` stack (over the global token and the audio tokens): `prepare`, the
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

    /// The tokens (the global token first) before the first block, and what the blocks and
    /// the head read.
    pub fn prepare(&self, inp: &Inputs, dl: &LinearDeltas) -> Result<(Tensor, Step)> {
        let x = inp.hidden_states.to_device(self.device)?;
        let s = x.shape().to_vec();
        if s.len() != 3 || s[1] != self.in_channels || s[2] == 0 {
            return Err(Error(format!(
                "Stable Audio: hidden_states must be [B, {}, L], got {s:?}",
                self.in_channels
            )));
        }
        let (b, l) = (s[0], s[2]);
        let check = |what: &str, t: &Tensor, width: usize, len: Option<usize>| -> Result<()> {
            let ts = t.shape();
            if ts.len() != 3 || ts[0] != b || ts[2] != width || len.is_some_and(|n| ts[1] != n) {
                return Err(Error(format!(
                    "Stable Audio: {what} must be [{b}, {}, {width}], got {ts:?}",
                    len.map_or("S".to_string(), |n| n.to_string())
                )));
            }
            Ok(())
        };
        check(
            "encoder_hidden_states",
            inp.encoder_hidden_states,
            self.cross_input_dim,
            None,
        )?;
        check(
            "global_hidden_states",
            inp.global_hidden_states,
            self.global_input_dim,
            Some(1),
        )?;
        let t: Vec<f32> = match inp.timestep.len() {
            1 => vec![inp.timestep[0]; b],
            n if n == b => inp.timestep.to_vec(),
            n => {
                return Err(Error(format!(
                    "Stable Audio: {n} timesteps for a batch of {b}"
                )))
            }
        };
        let rot = self.head_dim / 2;
        let (cos, sin) = match inp.rotary {
            Some((c, s)) => {
                for t in [c, s] {
                    if t.shape() != [l + 1, rot] {
                        return Err(Error(format!(
                            "Stable Audio: the rotary tables must be [{}, {rot}] (L + 1 tokens), \
                             got {:?}",
                            l + 1,
                            t.shape()
                        )));
                    }
                }
                // The pipeline's tables repeat each half: the pairs' values are the first half.
                let half = |t: &Tensor| -> Result<Tensor> {
                    t.to_device(self.device)?.slice(1, 0, (rot / 2) as i64, 1)
                };
                (half(c)?, half(s)?)
            }
            None => rotary_tables_f32(rot, l + 1, self.device)?,
        };
        let context = self.cross_2.apply(
            &self.cross_1.apply(
                &inp.encoder_hidden_states.to_device(self.device)?,
                "silu",
                dl,
            )?,
            "none",
            dl,
        )?;
        let global = self.global_2.apply(
            &self.global_1.apply(
                &inp.global_hidden_states.to_device(self.device)?,
                "silu",
                dl,
            )?,
            "none",
            dl,
        )?;
        let time = self.timestep_2.apply(
            &self
                .timestep_1
                .apply(&self.time_features(&t)?, "silu", dl)?,
            "none",
            dl,
        )?;
        let global = global.add(&time.reshape(&[b as i64, 1, self.dim as i64])?)?;
        // [B, C, L] → [B, L, C]; the 1×1 convolution with its residual, then proj_in.
        let tokens = x.permute(&[0, 2, 1])?;
        let tokens = self.preprocess.apply(&tokens, "none", dl)?.add(&tokens)?;
        let h = self.proj_in.apply(&tokens, "none", dl)?;
        let h = ditflow_plugin::ops::concat(&[&global, &h], 1)?;
        Ok((
            h,
            Step {
                rope: (cos, sin),
                context,
                time,
                len: l,
            },
        ))
    }

    /// Blocks `from..=to` on tokens `h`, with the hooks of the `transformer_blocks` stack.
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
            let h = self.first_half(i, h, &step.rope, dl, hooks)?;
            self.second_half(i, h, &step.context, dl, hooks)
        })
    }

    /// Half `part` of block `i` on tokens `h`, with the hooks of the `transformer_blocks` stack.
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
            &mut |i, h| self.first_half(i, h, &step.rope, dl, hooks),
            &mut |i, h| self.second_half(i, h, &step.context, dl, hooks),
        )
    }

    /// The head: the output projection, the global token dropped, the 1×1 convolution with
    /// its residual, back to `[B, C, L]`.
    pub fn finish(&self, step: &Step, h: Tensor, dl: &LinearDeltas) -> Result<Tensor> {
        let out = self.proj_out.apply(&h, "none", dl)?;
        let out = out.slice(1, 1, (step.len + 1) as i64, 1)?;
        let out = self.postprocess.apply(&out, "none", dl)?.add(&out)?;
        out.permute(&[0, 2, 1])
    }

    /// Block `i` up to its cross-attention's input: the self-attention and its residual.
    fn first_half(
        &self,
        i: usize,
        h: Tensor,
        rope: &(Tensor, Tensor),
        dl: &LinearDeltas,
        hooks: &Hooks,
    ) -> Result<Tensor> {
        let blk = &self.blocks[i];
        let x = norm(&h, &blk.norm1)?;
        let site = site(i, AttentionKind::SelfAttention);
        let a = self.attend(
            &blk.attn1,
            &x,
            &x,
            self.heads,
            Some(rope),
            dl,
            (hooks, site),
        )?;
        a.add(&h)
    }

    /// The rest of block `i`: the cross-attention and the gated feed-forward, each with its
    /// residual.
    fn second_half(
        &self,
        i: usize,
        h: Tensor,
        context: &Tensor,
        dl: &LinearDeltas,
        hooks: &Hooks,
    ) -> Result<Tensor> {
        let blk = &self.blocks[i];
        let x = norm(&h, &blk.norm2)?;
        let site = site(i, AttentionKind::Cross);
        let a = self.attend(
            &blk.attn2,
            &x,
            context,
            self.kv_heads,
            None,
            dl,
            (hooks, site),
        )?;
        let h = a.add(&h)?;
        let x = norm(&h, &blk.norm3)?;
        let proj = blk.ff_in.apply(&x, "none", dl)?;
        let parts = proj.split(2, &[blk.ff_inner, blk.ff_inner])?;
        let gated = parts[0].mul(&parts[1].unary("silu")?)?;
        let f = blk.ff_out.apply(&gated, "none", dl)?;
        f.add(&h)
    }

    /// Attention of `x` to `context` with `kv_heads` key/value heads (repeated to the query
    /// heads, each shared by consecutive ones) and RoPE on q and k when given; the patches'
    /// extra branches at `at`'s site are added before the output projection.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        attn: &AudioAttention,
        x: &Tensor,
        context: &Tensor,
        kv_heads: usize,
        rope: Option<&(Tensor, Tensor)>,
        dl: &LinearDeltas,
        at: (&Hooks, AttentionSite),
    ) -> Result<Tensor> {
        let q_flat = attn.q.apply(x, "none", dl)?;
        let q = split_heads(&q_flat, self.heads)?;
        let k = split_heads(&attn.k.apply(context, "none", dl)?, kv_heads)?;
        let v = split_heads(&attn.v.apply(context, "none", dl)?, kv_heads)?;
        let (k, v) = if kv_heads == self.heads {
            (k, v)
        } else {
            (
                self.repeat_heads(&k, kv_heads)?,
                self.repeat_heads(&v, kv_heads)?,
            )
        };
        let (q, k) = match rope {
            Some((cos, sin)) => (q.rope(cos, sin, false)?, k.rope(cos, sin, false)?),
            None => (q, k),
        };
        let o = ditflow_plugin::ops::attention(&q, &k, &v, None, None)?;
        let s = o.shape().to_vec();
        let o =
            o.permute(&[0, 2, 1, 3])?
                .reshape(&[s[0] as i64, s[2] as i64, (s[1] * s[3]) as i64])?;
        let (hooks, site) = at;
        let o = match hooks.attention_extras(&site, || Ok(q_flat))? {
            Some(extra) => o.add(&extra)?,
            None => o,
        };
        attn.out.apply(&o, "none", dl)
    }

    /// `torch.repeat_interleave(x, heads / kv, dim=1)` of `[B, kv, L, Dh]`.
    fn repeat_heads(&self, x: &Tensor, kv: usize) -> Result<Tensor> {
        let s = x.shape().to_vec();
        let n = self.heads / kv;
        let one = x.reshape(&[s[0] as i64, kv as i64, 1, s[2] as i64, s[3] as i64])?;
        ditflow_plugin::ops::concat(&vec![&one; n], 2)?.reshape(&[
            s[0] as i64,
            self.heads as i64,
            s[2] as i64,
            s[3] as i64,
        ])
    }
}

/// A LayerNorm with its affine weights, at the model's epsilon.
fn norm(x: &Tensor, (w, b): &(Tensor, Tensor)) -> Result<Tensor> {
    x.layer_norm(Some(w), Some(b), None, None, NORM_EPS)
}

/// The attention site of `kind` in block `block` of the `transformer_blocks` stack.
fn site(block: usize, kind: AttentionKind) -> AttentionSite {
    AttentionSite {
        stack: 0,
        block,
        kind,
    }
}
