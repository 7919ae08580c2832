//! Attention over explicit heads, for the models that normalise or rotate q and k per head before
//! attending (MMDiT: SD3, Flux): q/k/v projections with optional per-head RMS norms, the heads'
//! layout `[B, H, L, Dh]`, and attention back to `[B, L, H·Dh]` with optional RoPE tables.

use crate::layers::Linear;
use crate::weights::Weights;
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::{Result, Tensor};

/// One attention's projections of a stream, with the RMS norms of q and k (diffusers'
/// `norm_q`/`norm_k`, or `norm_added_q`/`norm_added_k` for the added stream) when it has them.
pub struct HeadProjections {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub norm_q: Option<Tensor>,
    pub norm_k: Option<Tensor>,
    pub eps: f32,
}

impl HeadProjections {
    /// Loads `{prefix}.{names[0..3]}` (q, k, v linears of `dim` → `dim`, with biases) and, when
    /// `norms`, `{prefix}.{names[3..5]}.weight` of `head_dim`.
    pub fn load(
        w: &Weights,
        prefix: &str,
        names: [&str; 5],
        dim: usize,
        head_dim: usize,
        norms: bool,
        eps: f32,
    ) -> Result<HeadProjections> {
        let norm = |n: &str| -> Result<Option<Tensor>> {
            norms
                .then(|| w.get(&format!("{prefix}.{n}.weight"), &[head_dim]))
                .transpose()
        };
        Ok(HeadProjections {
            q: w.linear(&format!("{prefix}.{}", names[0]), dim, dim, true)?,
            k: w.linear(&format!("{prefix}.{}", names[1]), dim, dim, true)?,
            v: w.linear(&format!("{prefix}.{}", names[2]), dim, dim, true)?,
            norm_q: norm(names[3])?,
            norm_k: norm(names[4])?,
            eps,
        })
    }

    /// `(q, k, v)` of `x` `[B, L, D]` as `heads` heads `[B, H, L, Dh]`, q and k normed.
    pub fn heads(
        &self,
        x: &Tensor,
        heads: usize,
        d: &LinearDeltas,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let norm = |t: Tensor, w: &Option<Tensor>| -> Result<Tensor> {
            match w {
                Some(w) => t.rms_norm(Some(w), self.eps),
                None => Ok(t),
            }
        };
        let q = norm(
            split_heads(&self.q.apply(x, "none", d)?, heads)?,
            &self.norm_q,
        )?;
        let k = norm(
            split_heads(&self.k.apply(x, "none", d)?, heads)?,
            &self.norm_k,
        )?;
        let v = split_heads(&self.v.apply(x, "none", d)?, heads)?;
        Ok((q, k, v))
    }
}

/// `[B, L, H·Dh]` → `[B, H, L, Dh]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let s = x.shape().to_vec();
    x.reshape(&[s[0] as i64, s[1] as i64, heads as i64, -1])?
        .permute(&[0, 2, 1, 3])
}

/// Attention of heads `[B, H, L, Dh]`, q and k rotated by `rope` (interleaved pairs) when given,
/// back to `[B, L, H·Dh]`.
pub fn attend_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: Option<&(Tensor, Tensor)>,
) -> Result<Tensor> {
    let (q, k) = match rope {
        Some((cos, sin)) => (q.rope(cos, sin, true)?, k.rope(cos, sin, true)?),
        None => (q.clone(), k.clone()),
    };
    let o = ditflow_plugin::ops::attention(&q, &k, v, None, None)?;
    let s = o.shape().to_vec();
    o.permute(&[0, 2, 1, 3])?
        .reshape(&[s[0] as i64, s[2] as i64, (s[1] * s[3]) as i64])
}
