//! The layers every model family is made of: `Linear` (the linear-delta site: LoRA runs through
//! [`Linear::apply`] at no cost when unpatched), `Attention` with its fused projections,
//! `FeedForward`, `Conv2d`, `GroupNorm`, and the adaLN and mask helpers.

use crate::weights::Weights;
use ditflow_plugin::attention::AttentionSite;
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::model::Hooks;
use ditflow_plugin::{DType, Error, Result, Tensor};

/// `torch.nn.Linear`, named by its weight's key (the linear-delta site).
pub struct Linear {
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// `x·Wᵀ + b`, then `activation` (fused).
    pub fn forward(&self, x: &Tensor, activation: &str) -> Result<Tensor> {
        x.linear(&self.weight, self.bias.as_ref(), activation)
    }

    /// This layer as a linear-delta site of a model's description.
    pub fn info(&self) -> ditflow_plugin::model::LinearInfo {
        let s = self.weight.shape();
        ditflow_plugin::model::LinearInfo {
            name: self.name.clone(),
            out_features: s[0],
            in_features: s.get(1).copied().unwrap_or(0),
            fused_into: None,
        }
    }

    /// [`Linear::forward`] with the patches' deltas on this layer (none: the same call).
    pub fn apply(&self, x: &Tensor, activation: &str, d: &LinearDeltas) -> Result<Tensor> {
        d.linear(&self.name, x, &self.weight, self.bias.as_ref(), activation)
    }
}

/// diffusers' `Attention` with the default processor: q/k/v projections (fused into one GEMM
/// at load: q·k·v for self-attention, k·v for cross-attention), heads, an optional additive mask,
/// and `to_out.0`. The heads are read straight out of the fused projection.
pub struct Attention {
    /// Self-attention: `[3D, D]` (q, k, v stacked). Cross-attention: `to_q` `[D, D]`.
    pub to_q_or_qkv: Linear,
    /// Cross-attention only: `[2D, context]` (k, v stacked).
    pub to_kv: Option<Linear>,
    pub to_out: Linear,
    pub heads: usize,
    pub dim: usize,
}

/// Stacks linears along their output axis into one named `name`.
fn stack(name: String, parts: &[&Linear]) -> Result<Linear> {
    let ws: Vec<&Tensor> = parts.iter().map(|l| &l.weight).collect();
    let bias = if parts.iter().all(|l| l.bias.is_some()) {
        let bs: Vec<&Tensor> = parts.iter().filter_map(|l| l.bias.as_ref()).collect();
        Some(ditflow_plugin::ops::concat(&bs, 0)?)
    } else {
        None
    };
    Ok(Linear {
        name,
        weight: ditflow_plugin::ops::concat(&ws, 0)?,
        bias,
    })
}

impl Attention {
    /// `cross`: the keys and values come from a context (`forward` must be given one).
    pub fn load(
        w: &Weights,
        prefix: &str,
        dim: usize,
        context_dim: usize,
        heads: usize,
        bias: bool,
        cross: bool,
    ) -> Result<Attention> {
        let q = w.linear(&format!("{prefix}.to_q"), dim, dim, bias)?;
        let k = w.linear(&format!("{prefix}.to_k"), context_dim, dim, bias)?;
        let v = w.linear(&format!("{prefix}.to_v"), context_dim, dim, bias)?;
        if heads == 0 || !dim.is_multiple_of(heads) {
            return Err(Error(format!(
                "{}: {prefix}: {dim} channels do not split into {heads} heads",
                w.dir.display()
            )));
        }
        if !cross && context_dim != dim {
            return Err(Error(format!(
                "{}: {prefix}: self-attention with a context width {context_dim}",
                w.dir.display()
            )));
        }
        Ok(Attention {
            to_q_or_qkv: if cross {
                q
            } else {
                stack(format!("{prefix}.to_qkv"), &[&q, &k, &v])?
            },
            to_kv: if cross {
                Some(stack(format!("{prefix}.to_kv"), &[&k, &v])?)
            } else {
                None
            },
            to_out: w.linear(&format!("{prefix}.to_out.0"), dim, dim, true)?,
            heads,
            dim,
        })
    }

    /// Attention of `x` `[B, Lq, D]` over `context` (or itself) with an additive `mask`
    /// broadcasting to `[B, H, Lq, Lk]`.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        mask: Option<&Tensor>,
        deltas: &LinearDeltas,
    ) -> Result<Tensor> {
        self.forward_at(x, context, mask, deltas, None)
    }

    /// [`Attention::forward`] at an attention site, running the patches' attention hooks there
    /// (edits, masks, extra branches); with none it is the same fused call.
    pub fn forward_at(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        mask: Option<&Tensor>,
        deltas: &LinearDeltas,
        at: Option<(&Hooks, AttentionSite)>,
    ) -> Result<Tensor> {
        match context {
            None if self.to_kv.is_none() => {
                let d = self.dim;
                // An edit reads q, k and v as tensors of their own: one product writes them
                // separately (no copies), unless a linear delta sits on the fused projection.
                if let Some((hooks, site)) = at {
                    if deltas.is_empty() && hooks.has_attention_edit(&site) {
                        let f = &self.to_q_or_qkv;
                        let qkv = x.linear_split(&f.weight, f.bias.as_ref(), "none", 3)?;
                        let [q, k, v]: [Tensor; 3] = qkv
                            .try_into()
                            .map_err(|_| Error::new("linear_split gave no q, k and v"))?;
                        let o = hooks.attention_qkv(
                            &site,
                            q,
                            k,
                            v,
                            mask,
                            self.heads,
                            d / self.heads,
                        )?;
                        return self.to_out.apply(&o, "none", deltas);
                    }
                }
                let qkv = self.to_q_or_qkv.apply(x, "none", deltas)?;
                let o = self.attend(&qkv, &qkv, [0, d, 2 * d], mask, at)?;
                self.to_out.apply(&o, "none", deltas)
            }
            Some(ctx) if self.to_kv.is_some() => {
                self.forward_kv_at(x, &self.context_kv(ctx, deltas)?, mask, deltas, at)
            }
            _ => Err(Error::new(
                "an attention layer was called with the wrong kind of context",
            )),
        }
    }

    /// The heads' attention from fused projections, through the site's hooks when it has any.
    fn attend(
        &self,
        q_src: &Tensor,
        kv_src: &Tensor,
        offsets: [usize; 3],
        mask: Option<&Tensor>,
        at: Option<(&Hooks, AttentionSite)>,
    ) -> Result<Tensor> {
        let head_dim = self.dim / self.heads;
        match at {
            Some((hooks, site)) if hooks.has_attention(&site) => {
                hooks.attention(&site, q_src, kv_src, offsets, mask, self.heads, head_dim)
            }
            _ => ditflow_plugin::ops::attention_fused(
                q_src, kv_src, mask, self.heads, head_dim, offsets, None,
            ),
        }
    }

    /// Cross-attention's keys and values of a context, `[B, Lk, 2D]`: constant over sampling
    /// steps, so a sampler computes them once.
    pub fn context_kv(&self, context: &Tensor, deltas: &LinearDeltas) -> Result<Tensor> {
        let to_kv = self
            .to_kv
            .as_ref()
            .ok_or_else(|| Error::new("self-attention has no context"))?;
        to_kv.apply(context, "none", deltas)
    }

    /// Cross-attention of `x` over keys and values from [`Attention::context_kv`].
    pub fn forward_kv(
        &self,
        x: &Tensor,
        kv: &Tensor,
        mask: Option<&Tensor>,
        deltas: &LinearDeltas,
    ) -> Result<Tensor> {
        self.forward_kv_at(x, kv, mask, deltas, None)
    }

    /// [`Attention::forward_kv`] at an attention site.
    pub fn forward_kv_at(
        &self,
        x: &Tensor,
        kv: &Tensor,
        mask: Option<&Tensor>,
        deltas: &LinearDeltas,
        at: Option<(&Hooks, AttentionSite)>,
    ) -> Result<Tensor> {
        let d = self.dim;
        let q = self.to_q_or_qkv.apply(x, "none", deltas)?;
        let o = self.attend(&q, kv, [0, 0, d], mask, at)?;
        self.to_out.apply(&o, "none", deltas)
    }
}

/// diffusers' `FeedForward` with a GELU input projection (`ff.net.0.proj`, `ff.net.2`).
pub struct FeedForward {
    pub proj_in: Linear,
    pub proj_out: Linear,
    pub activation: &'static str,
}

impl FeedForward {
    pub fn load(
        w: &Weights,
        prefix: &str,
        dim: usize,
        mult: usize,
        activation_fn: &str,
    ) -> Result<FeedForward> {
        let activation = match activation_fn {
            "gelu-approximate" => "gelu_tanh",
            "gelu" => "gelu",
            other => {
                return Err(Error(format!(
                    "{}: activation_fn \"{other}\" is not supported",
                    w.dir.display()
                )))
            }
        };
        Ok(FeedForward {
            proj_in: w.linear(&format!("{prefix}.net.0.proj"), dim, dim * mult, true)?,
            proj_out: w.linear(&format!("{prefix}.net.2"), dim * mult, dim, true)?,
            activation,
        })
    }

    pub fn forward(&self, x: &Tensor, d: &LinearDeltas) -> Result<Tensor> {
        self.proj_out
            .apply(&self.proj_in.apply(x, self.activation, d)?, "none", d)
    }
}

/// Splits `[B, n·D]` (or `[B, n, D]`) into `n` tensors `[B, 1, D]`: diffusers' `chunk(n)` of an
/// adaLN modulation, shaped to broadcast over tokens.
pub fn chunks(x: &Tensor, n: usize, d: usize) -> Result<Vec<Tensor>> {
    let b = x.shape()[0] as i64;
    x.reshape(&[b, n as i64, d as i64])?.split(1, &vec![1; n])
}

/// A padding mask `[B, L]` of 1 (keep) and 0 (drop) as diffusers' additive bias
/// `(1 - mask)·-10000`, shaped `[B, 1, 1, L]`.
pub fn mask_bias(mask: &Tensor) -> Result<Tensor> {
    let s = mask.shape().to_vec();
    if s.len() != 2 {
        return Err(Error(format!(
            "an attention mask must be [batch, tokens], got {s:?}"
        )));
    }
    mask.cast(DType::F32)?
        .affine(10000.0, -10000.0)?
        .reshape(&[s[0] as i64, 1, 1, s[1] as i64])
}

/// `torch.nn.Conv2d` with square kernels, symmetric padding and an optional stride.
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    /// Loads `prefix.weight` `[out, in, k, k]` (and `prefix.bias`).
    pub fn load(
        w: &Weights,
        prefix: &str,
        input: usize,
        output: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Conv2d> {
        Ok(Conv2d {
            weight: w.get(&format!("{prefix}.weight"), &[output, input, k, k])?,
            bias: Some(w.get(&format!("{prefix}.bias"), &[output])?),
            stride,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv(
            &self.weight,
            self.bias.as_ref(),
            &[self.stride],
            &[self.padding],
            1,
        )
    }
}

/// `torch.nn.GroupNorm` with its affine, and an activation fused after it.
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f32,
}

impl GroupNorm {
    pub fn load(
        w: &Weights,
        prefix: &str,
        channels: usize,
        groups: usize,
        eps: f32,
    ) -> Result<GroupNorm> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(Error(format!(
                "{}: {prefix}: {channels} channels do not split into {groups} groups",
                w.dir.display()
            )));
        }
        Ok(GroupNorm {
            weight: w.get(&format!("{prefix}.weight"), &[channels])?,
            bias: w.get(&format!("{prefix}.bias"), &[channels])?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor, activation: &str) -> Result<Tensor> {
        x.group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            activation,
        )
    }
}

/// MMDiT's output layer (SD3, Flux): diffusers' `AdaLayerNormContinuous` (`norm_out.linear`
/// gives scale, then shift, from `silu(temb)`; no affine norm, eps 1e-6) followed by the output
/// projection (`proj_out`).
pub struct ContinuousOutput {
    pub norm_out: Linear,
    pub proj_out: Linear,
}

impl ContinuousOutput {
    /// `norm_out.linear` (`dim → 2·dim`) and `proj_out` (`dim → out`).
    pub fn load(w: &Weights, dim: usize, out: usize) -> Result<ContinuousOutput> {
        Ok(ContinuousOutput {
            norm_out: w.linear("norm_out.linear", dim, 2 * dim, true)?,
            proj_out: w.linear("proj_out", dim, out, true)?,
        })
    }

    /// `proj_out(norm(x)·(1 + scale) + shift)` for tokens `x` `[B, L, dim]`.
    pub fn forward(&self, x: &Tensor, silu: &Tensor, d: &LinearDeltas) -> Result<Tensor> {
        let dim = x.shape().last().copied().unwrap_or(0);
        let m = chunks(&self.norm_out.apply(silu, "none", d)?, 2, dim)?;
        let out = x.layer_norm(None, None, Some(&m[1]), Some(&m[0]), 1e-6)?;
        self.proj_out.apply(&out, "none", d)
    }
}
