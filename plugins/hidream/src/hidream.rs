//! diffusers' `HiDreamImageTransformer2DModel`: latents patchified into tokens (features in
//! `(dy, dx, c)` order) and embedded by a linear layer; the timestep plus the pooled text as the
//! conditioning; the T5 tokens and one Llama layer's tokens per block, each through its own
//! caption projection; double-stream blocks (each stream its own adaLN modulation, q/k RMS
//! norms across the heads, output projection and feed-forward, one joint attention over the
//! image-then-text sequence with 3-axis RoPE), then single-stream blocks over the joined
//! sequence, each block seeing the text so far plus its own Llama layer's tokens, which it then
//! drops; the image feed-forwards are sparse mixtures of experts.

use crate::moe::{ImageFf, Moe, SwiGlu};
use ditflow_nn::{
    chunks, patch_grid, split_heads, timestep_sinusoids, unpatchify, Config, Linear,
    TimestepEmbedding, Weights,
};
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::model::{Hooks, LinearInfo};
use ditflow_plugin::{Device, Error, Result, Tensor};

/// The q/k/v projections of one stream, with RMS norms over the whole width (`HiDreamAttention`
/// normalises before splitting the heads).
pub struct Projections {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub q_norm: Tensor,
    pub k_norm: Tensor,
    pub out: Linear,
}

impl Projections {
    fn load(w: &Weights, p: &str, suffix: &str, dim: usize) -> Result<Projections> {
        Ok(Projections {
            q: w.linear(&format!("{p}.to_q{suffix}"), dim, dim, true)?,
            k: w.linear(&format!("{p}.to_k{suffix}"), dim, dim, true)?,
            v: w.linear(&format!("{p}.to_v{suffix}"), dim, dim, true)?,
            q_norm: w.get(&format!("{p}.q_rms_norm{suffix}.weight"), &[dim])?,
            k_norm: w.get(&format!("{p}.k_rms_norm{suffix}.weight"), &[dim])?,
            out: w.linear(&format!("{p}.to_out{suffix}"), dim, dim, true)?,
        })
    }

    /// Heads `[B, H, L, Dh]` of q, k and v; `key_mask` `[1, L, 1]` zeroes padded tokens' keys.
    fn heads(
        &self,
        x: &Tensor,
        heads: usize,
        dl: &LinearDeltas,
        key_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let q = self
            .q
            .apply(x, "none", dl)?
            .rms_norm(Some(&self.q_norm), 1e-5)?;
        let mut k = self
            .k
            .apply(x, "none", dl)?
            .rms_norm(Some(&self.k_norm), 1e-5)?;
        if let Some(m) = key_mask {
            k = k.mul(m)?;
        }
        let v = self.v.apply(x, "none", dl)?;
        Ok((
            split_heads(&q, heads)?,
            split_heads(&k, heads)?,
            split_heads(&v, heads)?,
        ))
    }

    fn linears(&self) -> [&Linear; 4] {
        [&self.q, &self.k, &self.v, &self.out]
    }
}

/// `HiDreamImageTransformerBlock`.
pub struct DoubleBlock {
    /// 12 chunks: shift, scale, gate of attention and MLP, image then text.
    pub modulation: Linear,
    pub image: Projections,
    pub text: Projections,
    pub ff_i: ImageFf,
    pub ff_t: SwiGlu,
}

/// `HiDreamImageSingleTransformerBlock`.
pub struct SingleBlock {
    /// 6 chunks.
    pub modulation: Linear,
    pub attn: Projections,
    pub ff_i: ImageFf,
}

/// What every block of one forward reads.
struct Run<'a> {
    /// `silu(temb)`, the modulations' input.
    silu: &'a Tensor,
    rope: &'a (Tensor, Tensor),
    dl: &'a LinearDeltas,
    /// `[1, L, 1]` key masks over the image and the joint sequence (non-square latents).
    image_mask: Option<&'a Tensor>,
    joint_mask: Option<&'a Tensor>,
}

pub struct HiDream {
    pub dim: usize,
    pub heads: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub patch: usize,
    /// Image tokens a non-square latent is padded to (`max_resolution` over the patch area).
    pub max_seq: usize,
    pub axes: Vec<usize>,
    pub text_emb_dim: usize,
    /// T5's and Llama's widths.
    pub caption_channels: (usize, usize),
    /// The Llama layer each block reads, in block order (double, then single).
    pub llama_layers: Vec<usize>,
    pub x_embedder: Linear,
    pub t_embedder: TimestepEmbedding,
    pub p_embedder: TimestepEmbedding,
    /// One per block (Llama), then T5's.
    pub caption_projection: Vec<Linear>,
    pub double: Vec<DoubleBlock>,
    pub single: Vec<SingleBlock>,
    pub final_modulation: Linear,
    pub final_linear: Linear,
    pub device: Device,
}

/// The model's inputs for one forward (diffusers' argument names).
pub struct Inputs<'a> {
    /// `[B, C, H, W]` latents (square).
    pub hidden_states: &'a Tensor,
    /// One per row, in `[0, 1000]`.
    pub timesteps: &'a [f32],
    /// `[B, L_t5, caption_channels[0]]`.
    pub encoder_hidden_states_t5: &'a Tensor,
    /// `[layers, B, L_llama, caption_channels[1]]`: every Llama layer's hidden states.
    pub encoder_hidden_states_llama3: &'a Tensor,
    /// `[B, text_emb_dim]`.
    pub pooled_embeds: &'a Tensor,
}

impl HiDream {
    pub fn load(cfg: &Config, w: &Weights, device: Device) -> Result<HiDream> {
        let bad = |what: String| Error(format!("{}: {what}", cfg.path.display()));
        let patch = cfg.usize_or("patch_size", 2)?;
        let in_channels = cfg.usize_or("in_channels", 64)?;
        let out_channels = cfg.opt_usize("out_channels")?.unwrap_or(in_channels);
        let head_dim = cfg.usize_or("attention_head_dim", 128)?;
        let heads = cfg.usize_or("num_attention_heads", 20)?;
        let dim = heads * head_dim;
        let ints = |key: &str| -> Vec<usize> {
            cfg.json
                .get(key)
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_u64().map(|v| v as usize))
                        .collect()
                })
                .unwrap_or_default()
        };
        let axes = ints("axes_dims_rope");
        if axes.len() != 3
            || axes.iter().sum::<usize>() != head_dim
            || axes.iter().any(|a| a % 2 != 0)
        {
            return Err(bad(format!(
                "axes_dims_rope {axes:?} must be three even sizes summing to attention_head_dim \
                 {head_dim} (rotary tables narrower than the heads are not supported)"
            )));
        }
        let caption = ints("caption_channels");
        let [t5_width, llama_width] = caption[..] else {
            return Err(bad(format!(
                "caption_channels {caption:?} must be [T5 width, Llama width]"
            )));
        };
        let n_double = cfg.usize_or("num_layers", 16)?;
        let n_single = cfg.usize_or("num_single_layers", 32)?;
        let llama_layers = ints("llama_layers");
        if llama_layers.len() != n_double + n_single {
            return Err(bad(format!(
                "llama_layers names {} layers for {} blocks",
                llama_layers.len(),
                n_double + n_single
            )));
        }
        let text_emb_dim = cfg.usize_or("text_emb_dim", 2048)?;
        let experts = cfg.usize_or("num_routed_experts", 4)?;
        let top_k = cfg.usize_or("num_activated_experts", 2)?;
        let image_ff = |p: &str| -> Result<ImageFf> {
            Ok(if experts > 0 {
                ImageFf::Moe(Moe::load(w, p, dim, experts, top_k)?)
            } else {
                ImageFf::Dense(SwiGlu::load(w, p, dim, 4 * dim)?)
            })
        };
        let double = (0..n_double)
            .map(|i| {
                let p = format!("double_stream_blocks.{i}.block");
                Ok(DoubleBlock {
                    modulation: w.linear(
                        &format!("{p}.adaLN_modulation.1"),
                        dim,
                        12 * dim,
                        true,
                    )?,
                    image: Projections::load(w, &format!("{p}.attn1"), "", dim)?,
                    text: Projections::load(w, &format!("{p}.attn1"), "_t", dim)?,
                    ff_i: image_ff(&format!("{p}.ff_i"))?,
                    ff_t: SwiGlu::load(w, &format!("{p}.ff_t"), dim, 4 * dim)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let single = (0..n_single)
            .map(|i| {
                let p = format!("single_stream_blocks.{i}.block");
                Ok(SingleBlock {
                    modulation: w.linear(&format!("{p}.adaLN_modulation.1"), dim, 6 * dim, true)?,
                    attn: Projections::load(w, &format!("{p}.attn1"), "", dim)?,
                    ff_i: image_ff(&format!("{p}.ff_i"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let n_blocks = n_double + n_single;
        let caption_projection = (0..=n_blocks)
            .map(|i| {
                let width = if i == n_blocks { t5_width } else { llama_width };
                w.linear(&format!("caption_projection.{i}.linear"), width, dim, false)
            })
            .collect::<Result<Vec<_>>>()?;
        let pe = in_channels * patch * patch;
        let res = ints("max_resolution");
        let max_seq = match res[..] {
            [] => 128 * 128 / (patch * patch),
            [h, w] => h * w / (patch * patch),
            _ => {
                return Err(bad(format!(
                    "max_resolution {res:?} must be [height, width]"
                )))
            }
        };
        Ok(HiDream {
            dim,
            heads,
            in_channels,
            out_channels,
            patch,
            max_seq,
            axes,
            text_emb_dim,
            caption_channels: (t5_width, llama_width),
            llama_layers,
            x_embedder: w.linear("x_embedder.proj", pe, dim, true)?,
            t_embedder: TimestepEmbedding::load(w, "t_embedder.timestep_embedder", 256, dim)?,
            p_embedder: TimestepEmbedding::load(
                w,
                "p_embedder.pooled_embedder",
                text_emb_dim,
                dim,
            )?,
            caption_projection,
            double,
            single,
            final_modulation: w.linear("final_layer.adaLN_modulation.1", dim, 2 * dim, true)?,
            final_linear: w.linear(
                "final_layer.linear",
                dim,
                patch * patch * out_channels,
                true,
            )?,
            device,
        })
    }

    /// Every linear layer by diffusers name (the linear-delta sites).
    pub fn linears(&self) -> Vec<LinearInfo> {
        let mut v: Vec<&Linear> = vec![
            &self.x_embedder,
            &self.t_embedder.linear_1,
            &self.t_embedder.linear_2,
            &self.p_embedder.linear_1,
            &self.p_embedder.linear_2,
        ];
        v.extend(&self.caption_projection);
        for b in &self.double {
            v.push(&b.modulation);
            v.extend(b.image.linears());
            v.extend(b.text.linears());
            v.extend(b.ff_i.linears());
            v.extend(b.ff_t.linears());
        }
        for b in &self.single {
            v.push(&b.modulation);
            v.extend(b.attn.linears());
            v.extend(b.ff_i.linears());
        }
        v.extend([&self.final_modulation, &self.final_linear]);
        v.into_iter().map(Linear::info).collect()
    }

    /// A double-stream block: the image tokens and the block's text (`txt`: the running text
    /// then this block's Llama tokens).
    fn double_block(
        &self,
        blk: &DoubleBlock,
        r: &Run,
        img: Tensor,
        txt: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (silu, rope, dl) = (r.silu, r.rope, r.dl);
        let (d, h) = (self.dim, self.heads);
        let (li, lt) = (img.shape()[1], txt.shape()[1]);
        let m = chunks(&blk.modulation.apply(silu, "none", dl)?, 12, d)?;
        let n = img.layer_norm(None, None, Some(&m[0]), Some(&m[1]), 1e-6)?;
        let nt = txt.layer_norm(None, None, Some(&m[6]), Some(&m[7]), 1e-6)?;
        let (q, k, v) = blk.image.heads(&n, h, dl, r.image_mask)?;
        let (qt, kt, vt) = blk.text.heads(&nt, h, dl, None)?;
        let cat = |a: &Tensor, b: &Tensor| ditflow_plugin::ops::concat(&[a, b], 2);
        let o =
            ditflow_nn::attend_heads(&cat(&q, &qt)?, &cat(&k, &kt)?, &cat(&v, &vt)?, Some(rope))?;
        let parts = o.split(1, &[li, lt])?;
        let img = img.gated_residual(&blk.image.out.apply(&parts[0], "none", dl)?, &m[2])?;
        let txt = txt.gated_residual(&blk.text.out.apply(&parts[1], "none", dl)?, &m[8])?;
        let n = img.layer_norm(None, None, Some(&m[3]), Some(&m[4]), 1e-6)?;
        let nt = txt.layer_norm(None, None, Some(&m[9]), Some(&m[10]), 1e-6)?;
        let img = img.gated_residual(&blk.ff_i.forward(&n, dl)?, &m[5])?;
        let txt = txt.gated_residual(&blk.ff_t.forward(&nt, dl)?, &m[11])?;
        Ok((img, txt))
    }

    /// A single-stream block on the joint sequence (image, text so far, this block's Llama
    /// tokens).
    fn single_block(&self, blk: &SingleBlock, r: &Run, x: Tensor) -> Result<Tensor> {
        let (silu, rope, dl) = (r.silu, r.rope, r.dl);
        let (d, h) = (self.dim, self.heads);
        let m = chunks(&blk.modulation.apply(silu, "none", dl)?, 6, d)?;
        let n = x.layer_norm(None, None, Some(&m[0]), Some(&m[1]), 1e-6)?;
        let (q, k, v) = blk.attn.heads(&n, h, dl, r.joint_mask)?;
        let o = ditflow_nn::attend_heads(&q, &k, &v, Some(rope))?;
        let x = x.gated_residual(&blk.attn.out.apply(&o, "none", dl)?, &m[2])?;
        let n = x.layer_norm(None, None, Some(&m[3]), Some(&m[4]), 1e-6)?;
        x.gated_residual(&blk.ff_i.forward(&n, dl)?, &m[5])
    }

    /// Patch tokens `[B, L, p·p·C]` of latents, features in `(dy, dx, c)` order: `h·w` of
    /// them for a square latent; otherwise padded with zero patches to `max_seq`, as diffusers
    /// pads them (the padding's keys are then masked out).
    fn patchify(&self, x: &Tensor) -> Result<(Tensor, usize, usize)> {
        let (b, h, w) = patch_grid("HiDream", x, self.in_channels, self.patch)?;
        let (c, p) = (self.in_channels as i64, self.patch as i64);
        let t = x
            .reshape(&[b as i64, c, h as i64, p, w as i64, p])?
            .permute(&[0, 2, 4, 3, 5, 1])?
            .reshape(&[b as i64, (h * w) as i64, p * p * c])?;
        if h == w {
            return Ok((t, h, w));
        }
        if h * w > self.max_seq {
            return Err(Error(format!(
                "HiDream: a latent of {h}×{w} patches is larger than max_resolution's {} tokens",
                self.max_seq
            )));
        }
        let pad = Tensor::zeros(
            ditflow_plugin::Kind::Tensor,
            ditflow_plugin::DType::F32,
            &[b, self.max_seq - h * w, (p * p * c) as usize],
        )?
        .to_device(x.device())?;
        Ok((ditflow_plugin::ops::concat(&[&t, &pad], 1)?, h, w))
    }

    /// The prediction `[B, out_channels, H, W]`, with the patches' linear deltas `dl` and the
    /// block residuals and range overrides of `hooks` (stack 0 on the image-then-running-text
    /// sequence, stack 1 on the joint sequence).
    pub fn forward(&self, inp: &Inputs, hooks: &Hooks, dl: &LinearDeltas) -> Result<Tensor> {
        let x = inp.hidden_states.to_device(self.device)?;
        let (tokens, h, w) = self.patchify(&x)?;
        let b = tokens.shape()[0];
        let check = |what: &str, t: &Tensor, want: &[Option<usize>]| -> Result<()> {
            let s = t.shape();
            if s.len() != want.len() || s.iter().zip(want).any(|(a, b)| b.is_some_and(|b| b != *a))
            {
                let want: Vec<String> = want
                    .iter()
                    .map(|v| v.map_or("L".to_string(), |v| v.to_string()))
                    .collect();
                return Err(Error(format!(
                    "HiDream: {what} must be [{}], got {s:?}",
                    want.join(", ")
                )));
            }
            Ok(())
        };
        let (t5w, llw) = self.caption_channels;
        check(
            "encoder_hidden_states_t5",
            inp.encoder_hidden_states_t5,
            &[Some(b), None, Some(t5w)],
        )?;
        check(
            "encoder_hidden_states_llama3",
            inp.encoder_hidden_states_llama3,
            &[None, Some(b), None, Some(llw)],
        )?;
        check(
            "pooled_embeds",
            inp.pooled_embeds,
            &[Some(b), Some(self.text_emb_dim)],
        )?;
        if inp.timesteps.len() != b {
            return Err(Error(format!(
                "HiDream: {} timesteps for a batch of {b}",
                inp.timesteps.len()
            )));
        }
        let n_llama = inp.encoder_hidden_states_llama3.shape()[0];
        if let Some(&bad) = self.llama_layers.iter().find(|&&l| l >= n_llama) {
            return Err(Error(format!(
                "HiDream: llama_layers names layer {bad}, but encoder_hidden_states_llama3 holds {n_llama}"
            )));
        }
        let img = self.x_embedder.apply(&tokens, "none", dl)?;
        let li = img.shape()[1];
        let real = h * w;
        let t = timestep_sinusoids(inp.timesteps, 256, true, 0.0, self.device)?;
        let temb = self.t_embedder.forward(&t, dl)?.add(
            &self
                .p_embedder
                .forward(&inp.pooled_embeds.to_device(self.device)?, dl)?,
        )?;
        let silu = temb.unary("silu")?;
        // Each block's Llama tokens, projected; then T5's.
        let llama = inp.encoder_hidden_states_llama3.to_device(self.device)?;
        let per_block: Vec<Tensor> = self
            .llama_layers
            .iter()
            .zip(&self.caption_projection)
            .map(|(&l, proj)| {
                let s = llama.shape();
                let layer = llama.slice(0, l as i64, l as i64 + 1, 1)?.reshape(&[
                    s[1] as i64,
                    s[2] as i64,
                    s[3] as i64,
                ])?;
                proj.apply(&layer, "none", dl)
            })
            .collect::<Result<_>>()?;
        let t5 = self.caption_projection[per_block.len()].apply(
            &inp.encoder_hidden_states_t5.to_device(self.device)?,
            "none",
            dl,
        )?;
        let last_llama = per_block
            .last()
            .ok_or_else(|| Error::new("HiDream: no blocks"))?;
        // The running text: T5's tokens and the last block's Llama tokens.
        let text = ditflow_plugin::ops::concat(&[&t5, last_llama], 1)?;
        let (lt, ll) = (text.shape()[1], last_llama.shape()[1]);
        // Positions: the image grid (0, row, column), zeros for padding, then zeros for every
        // text token.
        let ids: Vec<f32> = (0..h)
            .flat_map(|r| (0..w).flat_map(move |c| [0.0, r as f32, c as f32]))
            .chain(std::iter::repeat_n(0.0, 3 * (li - real + lt + ll)))
            .collect();
        let ids = Tensor::from_f32(ditflow_plugin::Kind::Tensor, &[li + lt + ll, 3], &ids)?
            .to_device(self.device)?;
        let rope = ditflow_plugin::ops::rope_tables(&ids, &self.axes, 10000.0)?;
        // Padded image tokens' keys are zeroed: over the image in the double blocks, over the
        // joint sequence (text all kept) in the single ones.
        let mask = |n: usize| -> Result<Tensor> {
            let m: Vec<f32> = (0..n).map(|i| (i < real || i >= li) as u8 as f32).collect();
            Tensor::from_f32(ditflow_plugin::Kind::Tensor, &[1, n, 1], &m)?.to_device(self.device)
        };
        let (image_mask, joint_mask) = if li > real {
            (Some(mask(li)?), Some(mask(li + lt + ll)?))
        } else {
            (None, None)
        };
        let run = Run {
            silu: &silu,
            rope: &rope,
            dl,
            image_mask: image_mask.as_ref(),
            joint_mask: joint_mask.as_ref(),
        };
        let nd = self.double.len();
        let joint = ditflow_plugin::ops::concat(&[&img, &text], 1)?;
        let joint = hooks.run_stack(0, nd, joint, &mut |i, hs| {
            let parts = hs.split(1, &[li, lt])?;
            let txt = ditflow_plugin::ops::concat(&[&parts[1], &per_block[i]], 1)?;
            let (img, txt) = self.double_block(&self.double[i], &run, parts[0].clone(), txt)?;
            let txt = txt.slice(1, 0, lt as i64, 1)?;
            ditflow_plugin::ops::concat(&[&img, &txt], 1)
        })?;
        let joint = hooks.run_stack(1, self.single.len(), joint, &mut |i, hs| {
            let x = ditflow_plugin::ops::concat(&[&hs, &per_block[nd + i]], 1)?;
            self.single_block(&self.single[i], &run, x)?
                .slice(1, 0, (li + lt) as i64, 1)
        })?;
        let img = joint.slice(1, 0, real as i64, 1)?;
        let m = chunks(
            &self.final_modulation.apply(&silu, "none", dl)?,
            2,
            self.dim,
        )?;
        let out = img.layer_norm(None, None, Some(&m[0]), Some(&m[1]), 1e-6)?;
        let out = self.final_linear.apply(&out, "none", dl)?;
        unpatchify(&out, h, w, self.patch, self.out_channels)
    }
}
