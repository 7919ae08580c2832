//! Embeddings: diffusers' timestep MLP and sinusoids, and the 2-D sincos position table (cached for
//! the last grid size, since sampling calls a model many times at one size).

use crate::layers::Linear;
use crate::weights::Weights;
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::{Device, Error, Kind, Result, Tensor};

/// diffusers' `TimestepEmbedding` (linear_1, SiLU, linear_2).
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn load(w: &Weights, prefix: &str, input: usize, dim: usize) -> Result<TimestepEmbedding> {
        Ok(TimestepEmbedding {
            linear_1: w.linear(&format!("{prefix}.linear_1"), input, dim, true)?,
            linear_2: w.linear(&format!("{prefix}.linear_2"), dim, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor, d: &LinearDeltas) -> Result<Tensor> {
        self.linear_2
            .apply(&self.linear_1.apply(x, "silu", d)?, "none", d)
    }
}

/// diffusers' `get_timestep_embedding`: `[N, dim]` sinusoids of `t`, with `flip_sin_to_cos`
/// putting cosines first. The arguments are rounded to f32 as PyTorch computes them, then sin and
/// cos are taken exactly.
pub fn timestep_sinusoids(
    t: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f32,
    device: Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|j| ((-(10000f32.ln()) * j as f32) / (half as f32 - downscale_freq_shift)).exp())
        .collect();
    let mut out = Vec::with_capacity(t.len() * dim);
    for &tv in t {
        let args: Vec<f64> = freqs.iter().map(|&f| (tv * f) as f64).collect();
        let (sin, cos): (Vec<f32>, Vec<f32>) = args
            .iter()
            .map(|a| (a.sin() as f32, a.cos() as f32))
            .unzip();
        if flip_sin_to_cos {
            out.extend(&cos);
            out.extend(&sin);
        } else {
            out.extend(&sin);
            out.extend(&cos);
        }
        out.resize(out.len() + dim % 2, 0.0);
    }
    Tensor::from_f32(Kind::Tensor, &[t.len(), dim], &out)?.to_device(device)
}

/// diffusers' `get_2d_sincos_pos_embed` for an `h × w` grid of patches: `[1, h·w, dim]`, token
/// `i·w + j` holding `[sin, cos](x_j·ω), [sin, cos](y_i·ω)`, with positions scaled by
/// `base_size / size / interpolation_scale` as diffusers does.
pub fn sincos_pos_embed_2d(
    dim: usize,
    h: usize,
    w: usize,
    base_size: usize,
    interpolation_scale: f64,
    device: Device,
) -> Result<Tensor> {
    if !dim.is_multiple_of(4) {
        return Err(Error(format!(
            "the hidden size {dim} must be a multiple of 4 for 2-D position embeddings"
        )));
    }
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    // PyTorch: arange(n, f32) / (n / base_size) / interpolation_scale, in f32.
    let coords = |n: usize| -> Vec<f64> {
        let step = (n as f64 / base_size as f64) as f32;
        (0..n)
            .map(|i| ((i as f32 / step) / interpolation_scale as f32) as f64)
            .collect()
    };
    let (xs, ys) = (coords(w), coords(h));
    let mut out = Vec::with_capacity(h * w * dim);
    for y in &ys {
        for x in &xs {
            for pos in [x, y] {
                out.extend(omega.iter().map(|o| (pos * o).sin() as f32));
                out.extend(omega.iter().map(|o| (pos * o).cos() as f32));
            }
        }
    }
    Tensor::from_f32(Kind::Tensor, &[1, h * w, dim], &out)?.to_device(device)
}

/// The 2-D position embedding of the last grid a model saw: sampling calls a model many times at
/// one size, so the sincos table is made once, not at every step.
#[derive(Default)]
pub struct PosEmbedCache(std::sync::Mutex<Option<((usize, usize), Tensor)>>);

impl PosEmbedCache {
    /// [`sincos_pos_embed_2d`] for an `h × w` grid, from the cache when the grid is the last one.
    pub fn get(
        &self,
        dim: usize,
        h: usize,
        w: usize,
        base_size: usize,
        interpolation_scale: f64,
        device: Device,
    ) -> Result<Tensor> {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((size, t)) = last.as_ref() {
            if *size == (h, w) {
                return Ok(t.clone());
            }
        }
        let t = sincos_pos_embed_2d(dim, h, w, base_size, interpolation_scale, device)?;
        *last = Some(((h, w), t.clone()));
        Ok(t)
    }
}

/// diffusers' `get_1d_rotary_pos_embed(dim, n, use_real=True)` with its default float32
/// frequencies, as PyTorch computes it: the per-pair `(cos, sin)` tables `[n, dim / 2]` for the
/// positions `0..n` (angles `pos · 1/10000^(2j/dim)` as float32 products), on `device`. The
/// rope op applies them to interleaved pairs or split halves alike.
pub fn rotary_tables_f32(dim: usize, n: usize, device: Device) -> Result<(Tensor, Tensor)> {
    let positions: Vec<f32> = (0..n).map(|p| p as f32).collect();
    rotary_tables_at_f32(dim, &positions, device)
}

/// [`rotary_tables_f32`] at arbitrary (float32) positions, as `get_1d_rotary_pos_embed` computes
/// them for a float position tensor: `[positions.len(), dim / 2]`.
pub fn rotary_tables_at_f32(
    dim: usize,
    positions: &[f32],
    device: Device,
) -> Result<(Tensor, Tensor)> {
    let half = dim / 2;
    let n = positions.len();
    let freqs: Vec<f32> = (0..half)
        .map(|j| 1.0f32 / 10000f32.powf((2 * j) as f32 / dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in positions {
        for f in &freqs {
            let angle = f64::from(p * f);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok((
        Tensor::from_f32(Kind::Tensor, &[n, half], &cos)?.to_device(device)?,
        Tensor::from_f32(Kind::Tensor, &[n, half], &sin)?.to_device(device)?,
    ))
}
