//! `T5EncoderModel` (transformers): token embeddings, pre-norm blocks of unscaled self-attention
//! with T5's bucketed relative position bias (computed by the first block, shared by all) and a
//! ReLU or gated-GELU MLP, and a final RMS norm. The text encoder of PixArt. `UMT5EncoderModel`
//! (Wan's text encoder) is the same with a relative position bias of each block's own.

use ditflow_nn::{Config, Linear, Weights};
use ditflow_plugin::{DType, Device, Error, Kind, Result, Tensor};

pub struct Block {
    pub norm_attn: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub norm_ff: Tensor,
    /// `wi` (ReLU) or `(wi_0, wi_1)` (gated GELU).
    pub wi: Linear,
    pub wi_gate: Option<Linear>,
    pub wo: Linear,
}

pub struct T5Encoder {
    pub embed: Tensor,
    /// `[num_buckets, heads]`: one for all blocks (T5), or one per block (UMT5).
    pub relative_bias: Vec<Tensor>,
    pub blocks: Vec<Block>,
    pub final_norm: Tensor,
    pub heads: usize,
    pub num_buckets: usize,
    pub max_distance: usize,
    pub eps: f32,
    pub activation: &'static str,
    pub d_model: usize,
    pub device: Device,
}

/// transformers' `_relative_position_bucket` for an encoder (bidirectional).
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let n = relative.abs();
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let large = max_exact
            + (((n as f32 / max_exact as f32).ln() / (max_distance as f32 / max_exact as f32).ln())
                * (half - max_exact) as f32) as i64;
        bucket += large.min(half - 1);
    }
    bucket as usize
}

impl T5Encoder {
    /// A `T5EncoderModel`, or with `per_block_bias` a `UMT5EncoderModel`.
    pub fn load(
        cfg: &Config,
        w: &Weights,
        device: Device,
        per_block_bias: bool,
    ) -> Result<T5Encoder> {
        let d_model = cfg.usize_or("d_model", 512)?;
        let d_kv = cfg.usize_or("d_kv", 64)?;
        let d_ff = cfg.usize_or("d_ff", 2048)?;
        let heads = cfg.usize_or("num_heads", 8)?;
        let layers = cfg.usize_or("num_layers", 6)?;
        let vocab = cfg.usize_or("vocab_size", 32128)?;
        let num_buckets = cfg.usize_or("relative_attention_num_buckets", 32)?;
        let max_distance = cfg.usize_or("relative_attention_max_distance", 128)?;
        let proj = cfg.str_or("feed_forward_proj", "relu")?;
        let (gated, activation) = match proj {
            "relu" => (false, "relu"),
            "gated-gelu" => (true, "gelu_tanh"),
            "gelu" => (false, "gelu"),
            other => {
                return Err(Error(format!(
                    "{}: feed_forward_proj \"{other}\" is not supported",
                    cfg.path.display()
                )))
            }
        };
        if num_buckets < 4 || max_distance < num_buckets / 4 {
            return Err(Error(format!(
                "{}: relative attention buckets {num_buckets} / distance {max_distance}",
                cfg.path.display()
            )));
        }
        let inner = heads * d_kv;
        let embed_key = if w.has("encoder.embed_tokens.weight") {
            "encoder.embed_tokens.weight"
        } else {
            "shared.weight"
        };
        let blocks = (0..layers)
            .map(|i| {
                let p = format!("encoder.block.{i}.layer");
                let ff = format!("{p}.1.DenseReluDense");
                Ok(Block {
                    norm_attn: w.get(&format!("{p}.0.layer_norm.weight"), &[d_model])?,
                    q: w.linear(&format!("{p}.0.SelfAttention.q"), d_model, inner, false)?,
                    k: w.linear(&format!("{p}.0.SelfAttention.k"), d_model, inner, false)?,
                    v: w.linear(&format!("{p}.0.SelfAttention.v"), d_model, inner, false)?,
                    o: w.linear(&format!("{p}.0.SelfAttention.o"), inner, d_model, false)?,
                    norm_ff: w.get(&format!("{p}.1.layer_norm.weight"), &[d_model])?,
                    wi: w.linear(
                        &format!("{ff}.{}", if gated { "wi_0" } else { "wi" }),
                        d_model,
                        d_ff,
                        false,
                    )?,
                    wi_gate: if gated {
                        Some(w.linear(&format!("{ff}.wi_1"), d_model, d_ff, false)?)
                    } else {
                        None
                    },
                    wo: w.linear(&format!("{ff}.wo"), d_ff, d_model, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(T5Encoder {
            embed: w.get(embed_key, &[vocab, d_model])?,
            relative_bias: (0..if per_block_bias { layers } else { 1 })
                .map(|i| {
                    w.get(
                        &format!(
                            "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"
                        ),
                        &[num_buckets, heads],
                    )
                })
                .collect::<Result<_>>()?,
            blocks,
            final_norm: w.get("encoder.final_layer_norm.weight", &[d_model])?,
            heads,
            num_buckets,
            max_distance,
            eps: cfg.f64_or("layer_norm_epsilon", 1e-6)? as f32,
            activation,
            d_model,
            device,
        })
    }

    /// `[1, heads, L, L]` position biases, one per table.
    fn position_biases(&self, l: usize) -> Result<Vec<Tensor>> {
        let buckets: Vec<i64> = (0..l)
            .flat_map(|q| (0..l).map(move |k| (q, k)))
            .map(|(q, k)| {
                relative_position_bucket(k as i64 - q as i64, self.num_buckets, self.max_distance)
                    as i64
            })
            .collect();
        let ids = Tensor::from_bytes(
            Kind::Tensor,
            DType::I64,
            &[l, l],
            &buckets
                .iter()
                .flat_map(|b| b.to_le_bytes())
                .collect::<Vec<u8>>(),
        )?;
        let ids = ids.to_device(self.device)?;
        // [L, L, H] -> [1, H, L, L]
        self.relative_bias
            .iter()
            .map(|table| {
                table.embedding(&ids)?.permute(&[2, 0, 1])?.reshape(&[
                    1,
                    self.heads as i64,
                    l as i64,
                    l as i64,
                ])
            })
            .collect()
    }

    /// The last hidden state `[B, L, d_model]` for token ids `[B, L]` and an optional mask
    /// (1 keep, 0 padding).
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let s = ids.shape().to_vec();
        if s.len() != 2 {
            return Err(Error(format!(
                "T5: input_ids must be [batch, tokens], got {s:?}"
            )));
        }
        let (b, l) = (s[0] as i64, s[1]);
        let mut biases = self.position_biases(l)?;
        if let Some(m) = mask {
            if m.shape() != s.as_slice() {
                return Err(Error(format!(
                    "T5: attention_mask {:?} must match input_ids {s:?}",
                    m.shape()
                )));
            }
            // Dropped keys get -1e30 (transformers uses the dtype's minimum).
            let drop = m
                .cast(DType::F32)?
                .affine(1e30, -1e30)?
                .reshape(&[b, 1, 1, l as i64])?;
            for bias in &mut biases {
                *bias = bias.add(&drop)?;
            }
        }
        let mut x = self.embed.embedding(&ids.to_device(self.device)?)?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape(&[b, l as i64, self.heads as i64, -1])?
                .permute(&[0, 2, 1, 3])
        };
        for (i, blk) in self.blocks.iter().enumerate() {
            let bias = &biases[i.min(biases.len() - 1)];
            let n = x.rms_norm(Some(&blk.norm_attn), self.eps)?;
            let (q, k, v) = (
                split(blk.q.forward(&n, "none")?)?,
                split(blk.k.forward(&n, "none")?)?,
                split(blk.v.forward(&n, "none")?)?,
            );
            let a = ditflow_plugin::ops::attention(&q, &k, &v, Some(bias), Some(1.0))?;
            let a = a.permute(&[0, 2, 1, 3])?.reshape(&[b, l as i64, -1])?;
            x = x.add(&blk.o.forward(&a, "none")?)?;
            let n = x.rms_norm(Some(&blk.norm_ff), self.eps)?;
            let h = blk.wi.forward(&n, self.activation)?;
            let h = match &blk.wi_gate {
                Some(g) => h.mul(&g.forward(&n, "none")?)?,
                None => h,
            };
            x = x.add(&blk.wo.forward(&h, "none")?)?;
        }
        x.rms_norm(Some(&self.final_norm), self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_transformers() {
        // transformers' _relative_position_bucket(relative, bidirectional=True, 32, 128) for
        // relative = -200, -20, -3, 0, 3, 20, 200.
        let got: Vec<usize> = [-200, -20, -3, 0, 3, 20, 200]
            .iter()
            .map(|&r| relative_position_bucket(r, 32, 128))
            .collect();
        assert_eq!(got, vec![15, 10, 3, 0, 19, 26, 31]);
    }
}
