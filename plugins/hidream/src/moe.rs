//! HiDream's feed-forwards: the SwiGLU MLP (`w2(silu(w1 x) · w3 x)`, its width rounded as
//! diffusers rounds it) and the sparse mixture of experts over it (`MOEFeedForwardSwiGLU`): a
//! softmax gate, the top-k experts per token weighted by their gate scores as they are (no
//! renormalisation), plus a shared expert for every token. Each expert runs once on the tokens
//! routed to it (gathered rows), and its weighted output is scatter-added back.

use ditflow_nn::{Linear, Weights};
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::{DType, Error, Kind, Result, Tensor};

/// `HiDreamImageFeedForwardSwiGLU`.
pub struct SwiGlu {
    pub w1: Linear,
    pub w2: Linear,
    pub w3: Linear,
}

/// diffusers' width for a SwiGLU of nominal `hidden`: two thirds, rounded up to 256.
pub fn swiglu_width(hidden: usize) -> usize {
    let h = 2 * hidden / 3;
    256 * h.div_ceil(256)
}

impl SwiGlu {
    pub fn load(w: &Weights, prefix: &str, dim: usize, hidden: usize) -> Result<SwiGlu> {
        let h = swiglu_width(hidden);
        Ok(SwiGlu {
            w1: w.linear(&format!("{prefix}.w1"), dim, h, false)?,
            w2: w.linear(&format!("{prefix}.w2"), h, dim, false)?,
            w3: w.linear(&format!("{prefix}.w3"), dim, h, false)?,
        })
    }

    pub fn forward(&self, x: &Tensor, dl: &LinearDeltas) -> Result<Tensor> {
        let a = self.w1.apply(x, "silu", dl)?;
        self.w2
            .apply(&a.mul(&self.w3.apply(x, "none", dl)?)?, "none", dl)
    }

    pub fn linears(&self) -> [&Linear; 3] {
        [&self.w1, &self.w2, &self.w3]
    }
}

/// `MOEFeedForwardSwiGLU`.
pub struct Moe {
    /// `[experts, dim]`, no bias.
    pub gate: Tensor,
    pub experts: Vec<SwiGlu>,
    pub shared: SwiGlu,
    pub top_k: usize,
}

impl Moe {
    pub fn load(w: &Weights, prefix: &str, dim: usize, n: usize, top_k: usize) -> Result<Moe> {
        if top_k == 0 || top_k > n {
            return Err(Error(format!("{prefix}: {top_k} activated experts of {n}")));
        }
        Ok(Moe {
            gate: w.get(&format!("{prefix}.gate.weight"), &[n, dim])?,
            experts: (0..n)
                .map(|e| SwiGlu::load(w, &format!("{prefix}.experts.{e}"), dim, 4 * dim))
                .collect::<Result<_>>()?,
            shared: SwiGlu::load(w, &format!("{prefix}.shared_experts"), dim, 2 * dim)?,
            top_k,
        })
    }

    /// `x` `[B, L, D]`.
    pub fn forward(&self, x: &Tensor, dl: &LinearDeltas) -> Result<Tensor> {
        let s = x.shape().to_vec();
        let d = s[2];
        let flat = x.reshape(&[-1, d as i64])?;
        let tokens = flat.shape()[0];
        let scores = flat.linear(&self.gate, None, "none")?.softmax(-1)?;
        let (weights, idx) = scores.topk(self.top_k)?;
        let idx = idx.cast(DType::F32)?.to_f32_vec()?;
        let weights = weights.to_f32_vec()?;
        // Tokens (and their gate weights) per expert.
        let mut routes: Vec<(Vec<i64>, Vec<f32>)> =
            vec![(Vec::new(), Vec::new()); self.experts.len()];
        for (slot, (&e, &w)) in idx.iter().zip(&weights).enumerate() {
            let e = e as usize;
            let r = routes
                .get_mut(e)
                .ok_or_else(|| Error(format!("the gate chose expert {e}")))?;
            r.0.push((slot / self.top_k) as i64);
            r.1.push(w);
        }
        let device = x.device();
        let mut out = Tensor::zeros(Kind::Tensor, DType::F32, &[tokens, d])?.to_device(device)?;
        for (expert, (rows, ws)) in self.experts.iter().zip(&routes) {
            if rows.is_empty() {
                continue;
            }
            let ids = Tensor::from_bytes(
                Kind::Tensor,
                DType::I64,
                &[rows.len()],
                &rows
                    .iter()
                    .flat_map(|r| r.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )?
            .to_device(device)?;
            let picked = flat.embedding(&ids)?;
            let w = Tensor::from_f32(Kind::Tensor, &[rows.len(), 1], ws)?.to_device(device)?;
            let y = expert.forward(&picked, dl)?.mul(&w)?;
            out = out.index_add(&ids, &y)?;
        }
        out.reshape(&s.iter().map(|&v| v as i64).collect::<Vec<_>>())?
            .add(&self.shared.forward(x, dl)?)
    }

    pub fn linears(&self) -> Vec<&Linear> {
        self.experts
            .iter()
            .chain([&self.shared])
            .flat_map(SwiGlu::linears)
            .collect()
    }
}

/// A block's image feed-forward: the MoE, or a plain SwiGLU when the model has no experts.
pub enum ImageFf {
    Moe(Moe),
    Dense(SwiGlu),
}

impl ImageFf {
    pub fn forward(&self, x: &Tensor, dl: &LinearDeltas) -> Result<Tensor> {
        match self {
            ImageFf::Moe(m) => m.forward(x, dl),
            ImageFf::Dense(f) => f.forward(x, dl),
        }
    }

    pub fn linears(&self) -> Vec<&Linear> {
        match self {
            ImageFf::Moe(m) => m.linears(),
            ImageFf::Dense(f) => f.linears().to_vec(),
        }
    }
}
