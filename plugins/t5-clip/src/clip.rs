//! `CLIPTextModel` and `CLIPTextModelWithProjection` (transformers): token and position
//! embeddings, pre-norm causal self-attention blocks with a QuickGELU or GELU MLP, a final layer
//! norm, the pooled output at each sequence's first end-of-text token, the penultimate layer's
//! hidden state, and (with projection) the projected text embedding.

use ditflow_nn::{Config, Linear, Weights};
use ditflow_plugin::{DType, Device, Error, Kind, Result, Tensor};

/// One pre-norm encoder layer (`CLIPEncoderLayer`), shared by the text and vision towers.
pub struct Layer {
    pub norm1: (Tensor, Tensor),
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub out: Linear,
    pub norm2: (Tensor, Tensor),
    pub fc1: Linear,
    pub fc2: Linear,
}

/// A `LayerNorm(d)` at `p` (`p.weight`, `p.bias`).
pub fn layer_norm(w: &Weights, p: &str, d: usize) -> Result<(Tensor, Tensor)> {
    Ok((
        w.get(&format!("{p}.weight"), &[d])?,
        w.get(&format!("{p}.bias"), &[d])?,
    ))
}

/// CLIP's MLP activation by its config name.
pub fn activation(cfg: &Config) -> Result<&'static str> {
    match cfg.str_or("hidden_act", "quick_gelu")? {
        "quick_gelu" => Ok("quick_gelu"),
        "gelu" => Ok("gelu"),
        other => Err(Error(format!(
            "{}: hidden_act \"{other}\" is not supported",
            cfg.path.display()
        ))),
    }
}

impl Layer {
    /// The layer at `p` (`….layers.N`) of width `d` with an MLP of `ff`.
    pub fn load(w: &Weights, p: &str, d: usize, ff: usize) -> Result<Layer> {
        Ok(Layer {
            norm1: layer_norm(w, &format!("{p}.layer_norm1"), d)?,
            q: w.linear(&format!("{p}.self_attn.q_proj"), d, d, true)?,
            k: w.linear(&format!("{p}.self_attn.k_proj"), d, d, true)?,
            v: w.linear(&format!("{p}.self_attn.v_proj"), d, d, true)?,
            out: w.linear(&format!("{p}.self_attn.out_proj"), d, d, true)?,
            norm2: layer_norm(w, &format!("{p}.layer_norm2"), d)?,
            fc1: w.linear(&format!("{p}.mlp.fc1"), d, ff, true)?,
            fc2: w.linear(&format!("{p}.mlp.fc2"), ff, d, true)?,
        })
    }

    /// `x` `[B, L, D]` through the layer, attention under the additive `bias` when given.
    pub fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        heads: usize,
        eps: f32,
        act: &str,
    ) -> Result<Tensor> {
        let s = x.shape().to_vec();
        let (b, l) = (s[0] as i64, s[1] as i64);
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape(&[b, l, heads as i64, -1])?.permute(&[0, 2, 1, 3])
        };
        let n = x.layer_norm(Some(&self.norm1.0), Some(&self.norm1.1), None, None, eps)?;
        let (q, k, v) = (
            split(self.q.forward(&n, "none")?)?,
            split(self.k.forward(&n, "none")?)?,
            split(self.v.forward(&n, "none")?)?,
        );
        let a = ditflow_plugin::ops::attention(&q, &k, &v, bias, None)?;
        let a = a.permute(&[0, 2, 1, 3])?.reshape(&[b, l, -1])?;
        let x = x.add(&self.out.forward(&a, "none")?)?;
        let n = x.layer_norm(Some(&self.norm2.0), Some(&self.norm2.1), None, None, eps)?;
        let h = self.fc1.forward(&n, "none")?;
        let h = match act {
            // x · sigmoid(1.702 x)
            "quick_gelu" => h.mul(&h.affine(1.702, 0.0)?.unary("sigmoid")?)?,
            _ => h.unary("gelu")?,
        };
        x.add(&self.fc2.forward(&h, "none")?)
    }
}

pub struct ClipText {
    pub token_embedding: Tensor,
    pub position_embedding: Tensor,
    pub layers: Vec<Layer>,
    pub final_norm: (Tensor, Tensor),
    pub text_projection: Option<Linear>,
    pub heads: usize,
    pub eps: f32,
    pub activation: &'static str,
    pub eos_token_id: i64,
    pub max_positions: usize,
    pub device: Device,
}

/// The outputs of one forward.
pub struct ClipOutput {
    /// `[B, L, D]`.
    pub last_hidden_state: Tensor,
    /// `[B, D]`: the final-norm state at each sequence's end-of-text token.
    pub pooler_output: Tensor,
    /// `[B, P]`, with a projection only.
    pub text_embeds: Option<Tensor>,
    /// `[B, L, D]`: the input of the last layer, transformers' `hidden_states[-2]` (what SD3 and
    /// SDXL condition on).
    pub penultimate_hidden_state: Tensor,
}

impl ClipText {
    pub fn load(
        cfg: &Config,
        w: &Weights,
        device: Device,
        with_projection: bool,
    ) -> Result<ClipText> {
        let d = cfg.usize_or("hidden_size", 512)?;
        let ff = cfg.usize_or("intermediate_size", 2048)?;
        let heads = cfg.usize_or("num_attention_heads", 8)?;
        let layers = cfg.usize_or("num_hidden_layers", 12)?;
        let vocab = cfg.usize_or("vocab_size", 49408)?;
        let positions = cfg.usize_or("max_position_embeddings", 77)?;
        let activation = activation(cfg)?;
        if heads == 0 || d % heads != 0 {
            return Err(Error(format!(
                "{}: hidden_size {d} does not split into {heads} heads",
                cfg.path.display()
            )));
        }
        // Hub checkpoints prefix the keys with `text_model.`; newer transformers may not.
        let tm = if w.has("text_model.embeddings.token_embedding.weight") {
            "text_model."
        } else {
            ""
        };
        let ln = |p: &str| layer_norm(w, p, d);
        let layers = (0..layers)
            .map(|i| Layer::load(w, &format!("{tm}encoder.layers.{i}"), d, ff))
            .collect::<Result<Vec<_>>>()?;
        let text_projection = if with_projection {
            let p = cfg.usize_or("projection_dim", 512)?;
            Some(w.linear("text_projection", d, p, false)?)
        } else {
            None
        };
        Ok(ClipText {
            token_embedding: w.get(
                &format!("{tm}embeddings.token_embedding.weight"),
                &[vocab, d],
            )?,
            position_embedding: w.get(
                &format!("{tm}embeddings.position_embedding.weight"),
                &[positions, d],
            )?,
            layers,
            final_norm: ln(&format!("{tm}final_layer_norm"))?,
            text_projection,
            heads,
            eps: cfg.f64_or("layer_norm_eps", 1e-5)? as f32,
            activation,
            eos_token_id: cfg
                .json
                .get("eos_token_id")
                .and_then(|v| v.as_i64())
                .unwrap_or(2),
            max_positions: positions,
            device,
        })
    }

    /// One forward for ids `[B, L]` and an optional padding mask (1 keep, 0 padding).
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<ClipOutput> {
        let s = ids.shape().to_vec();
        if s.len() != 2 || s[1] == 0 || s[1] > self.max_positions {
            return Err(Error(format!(
                "CLIP: input_ids must be [batch, 1..={} tokens], got {s:?}",
                self.max_positions
            )));
        }
        let (b, l) = (s[0], s[1]);
        let ids_host: Vec<i64> = ids
            .cast(DType::I64)?
            .to_device(Device::Cpu)?
            .bytes()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let ids_dev = ids.cast(DType::I64)?.to_device(self.device)?;
        let pos = self.position_embedding.slice(0, 0, l as i64, 1)?;
        let mut x = self.token_embedding.embedding(&ids_dev)?.add(&pos)?;
        // Causal mask, plus padded keys.
        let causal: Vec<f32> = (0..l)
            .flat_map(|q| (0..l).map(move |k| if k > q { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mut bias =
            Tensor::from_f32(Kind::Tensor, &[1, 1, l, l], &causal)?.to_device(self.device)?;
        if let Some(m) = mask {
            if m.shape() != s.as_slice() {
                return Err(Error(format!(
                    "CLIP: attention_mask {:?} must match input_ids {s:?}",
                    m.shape()
                )));
            }
            let drop = m
                .cast(DType::F32)?
                .affine(1e30, -1e30)?
                .reshape(&[b as i64, 1, 1, l as i64])?;
            bias = bias.add(&drop.to_device(self.device)?)?;
        }
        let mut penultimate = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = x.clone();
            }
            x = layer.forward(&x, Some(&bias), self.heads, self.eps, self.activation)?;
        }
        let last = x.layer_norm(
            Some(&self.final_norm.0),
            Some(&self.final_norm.1),
            None,
            None,
            self.eps,
        )?;
        // transformers: with the legacy eos id 2 the pooled token is the largest id; otherwise
        // the first end-of-text token.
        let picks: Vec<i64> = ids_host
            .chunks(l)
            .enumerate()
            .map(|(bi, row)| {
                let pos = if self.eos_token_id == 2 {
                    row.iter()
                        .enumerate()
                        .max_by_key(|(i, &v)| (v, std::cmp::Reverse(*i)))
                        .map_or(0, |(i, _)| i)
                } else {
                    row.iter()
                        .position(|&v| v == self.eos_token_id)
                        .unwrap_or(0)
                };
                (bi * l + pos) as i64
            })
            .collect();
        let idx = Tensor::from_bytes(
            Kind::Tensor,
            DType::I64,
            &[b],
            &picks
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        )?;
        let flat = last.reshape(&[(b * l) as i64, -1])?;
        let pooled = flat.embedding(&idx.to_device(self.device)?)?;
        let text_embeds = self
            .text_projection
            .as_ref()
            .map(|p| p.forward(&pooled, "none"))
            .transpose()?;
        Ok(ClipOutput {
            last_hidden_state: last,
            pooler_output: pooled,
            text_embeds,
            penultimate_hidden_state: penultimate,
        })
    }
}
