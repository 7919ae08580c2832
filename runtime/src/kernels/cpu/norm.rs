//! Normalisations on the CPU: layer norm with the adaLN modulation fused in, RMS norm, group norm
//! (with an optional fused activation, as VAEs use it) and softmax.
//!
//! Each row's statistics take two passes over the row (mean, then the centred variance), in f32
//! with eight partial sums, which keeps 1e-5 relative accuracy for rows of thousands.

use super::{rows_per_task, simd, Activation};
use rayon::prelude::*;

/// Per-row-group modulation: `y = norm(x)·(1 + scale) + shift`, where rows come in `groups`
/// contiguous groups (a batch's tokens) and each group has its own `D` values.
#[derive(Clone, Copy)]
pub struct Modulation<'a> {
    pub shift: Option<&'a [f32]>,
    pub scale: Option<&'a [f32]>,
    pub groups: usize,
}

#[inline]
fn sum8(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[inline]
fn centred_sq_sum8(xs: &[f32], mean: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            let d = v - mean;
            *l += d * d;
        }
    }
    lanes.iter().sum::<f32>()
        + chunks
            .remainder()
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum::<f32>()
}

/// Layer norm over rows of `d`, with optional affine weight/bias and modulation.
pub fn layer_norm(
    x: &[f32],
    d: usize,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    modulation: Option<Modulation>,
    eps: f32,
    out: &mut [f32],
) {
    let rows = x.len() / d.max(1);
    if rows == 0 || d == 0 {
        return;
    }
    let per_group = modulation.map_or(rows, |m| rows / m.groups.max(1));
    let chunk = rows_per_task(rows, d, 16 * 1024);
    out.par_chunks_mut(chunk * d)
        .enumerate()
        .for_each(|(ci, oc)| {
            for (ri, orow) in oc.chunks_exact_mut(d).enumerate() {
                let r = ci * chunk + ri;
                let xrow = &x[r * d..(r + 1) * d];
                let mean = sum8(xrow) / d as f32;
                let var = centred_sq_sum8(xrow, mean) / d as f32;
                let inv = 1.0 / (var + eps).sqrt();
                for (o, v) in orow.iter_mut().zip(xrow) {
                    *o = (v - mean) * inv;
                }
                if let Some(w) = weight {
                    orow.iter_mut().zip(w).for_each(|(o, w)| *o *= w);
                }
                if let Some(b) = bias {
                    orow.iter_mut().zip(b).for_each(|(o, b)| *o += b);
                }
                if let Some(m) = modulation {
                    let g = r / per_group.max(1);
                    if let Some(sc) = m.scale {
                        let sc = &sc[g * d..(g + 1) * d];
                        orow.iter_mut().zip(sc).for_each(|(o, s)| *o += *o * s);
                    }
                    if let Some(sh) = m.shift {
                        let sh = &sh[g * d..(g + 1) * d];
                        orow.iter_mut().zip(sh).for_each(|(o, s)| *o += s);
                    }
                }
            }
        });
}

/// RMS norm over rows of `d`: `x / sqrt(mean(x²) + eps) · weight`.
pub fn rms_norm(x: &[f32], d: usize, weight: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    if d == 0 {
        return;
    }
    let rows = x.len() / d;
    let chunk = rows_per_task(rows, d, 16 * 1024);
    out.par_chunks_mut(chunk * d)
        .enumerate()
        .for_each(|(ci, oc)| {
            for (ri, orow) in oc.chunks_exact_mut(d).enumerate() {
                let r = ci * chunk + ri;
                let xrow = &x[r * d..(r + 1) * d];
                let ms = centred_sq_sum8(xrow, 0.0) / d as f32;
                let inv = 1.0 / (ms + eps).sqrt();
                match weight {
                    Some(w) => orow
                        .iter_mut()
                        .zip(xrow.iter().zip(w))
                        .for_each(|(o, (v, w))| *o = v * inv * w),
                    None => orow.iter_mut().zip(xrow).for_each(|(o, v)| *o = v * inv),
                }
            }
        });
}

/// Group norm of `x` `[N, C, S]` (S = the spatial size) over `groups` channel groups, then the
/// per-channel affine and an activation.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f32],
    n: usize,
    c: usize,
    s: usize,
    groups: usize,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f32,
    act: Activation,
    out: &mut [f32],
) {
    let cg = c / groups;
    let len = cg * s;
    if len == 0 || n == 0 {
        return;
    }
    out.par_chunks_mut(len).enumerate().for_each(|(i, o)| {
        let (_, g) = (i / groups, i % groups);
        let xs = &x[i * len..(i + 1) * len];
        let mean = sum8(xs) / len as f32;
        let var = centred_sq_sum8(xs, mean) / len as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ch in 0..cg {
            let cidx = g * cg + ch;
            let w = weight.map_or(1.0, |w| w[cidx]);
            let b = bias.map_or(0.0, |b| b[cidx]);
            let (a, bb) = (inv * w, b - mean * inv * w);
            let orow = &mut o[ch * s..(ch + 1) * s];
            for (ov, xv) in orow.iter_mut().zip(&xs[ch * s..(ch + 1) * s]) {
                *ov = xv * a + bb;
            }
            simd::activate(act, orow);
        }
    });
}

/// Softmax over the middle axis of `[outer, dim, inner]`.
pub fn softmax(x: &[f32], outer: usize, dim: usize, inner: usize, out: &mut [f32]) {
    if dim == 0 || outer * inner == 0 {
        return;
    }
    if inner == 1 {
        let chunk = rows_per_task(outer, dim, 16 * 1024);
        out.par_chunks_mut(chunk * dim)
            .enumerate()
            .for_each(|(ci, oc)| {
                for (ri, orow) in oc.chunks_exact_mut(dim).enumerate() {
                    let r = ci * chunk + ri;
                    orow.copy_from_slice(&x[r * dim..(r + 1) * dim]);
                    softmax_row(orow);
                }
            });
        return;
    }
    out.par_chunks_mut(dim * inner)
        .enumerate()
        .for_each(|(o, oc)| {
            let xs = &x[o * dim * inner..(o + 1) * dim * inner];
            let mut row = vec![0f32; dim];
            for i in 0..inner {
                for (j, r) in row.iter_mut().enumerate() {
                    *r = xs[j * inner + i];
                }
                softmax_row(&mut row);
                for (j, r) in row.iter().enumerate() {
                    oc[j * inner + i] = *r;
                }
            }
        });
}

fn softmax_row(row: &mut [f32]) {
    let m = simd::max(row);
    if m == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let sum = simd::exp_shifted_sum(row, m);
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::testing::{max_rel_err, Lcg};

    fn ln64(x: &[f32]) -> Vec<f64> {
        let d = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / d;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d;
        x.iter()
            .map(|&v| (v as f64 - mean) / (var + 1e-6).sqrt())
            .collect()
    }

    #[test]
    fn layer_norm_with_modulation_matches_f64() {
        // Tolerance: 1e-5 relative to the largest output element.
        let mut rng = Lcg(5);
        let (b, l, d) = (3, 17, 131);
        let x: Vec<f32> = rng.vec(b * l * d).iter().map(|v| v * 4.0 + 1.5).collect();
        let (w, bi) = (rng.vec(d), rng.vec(d));
        let (shift, scale) = (rng.vec(b * d), rng.vec(b * d));
        let mut out = vec![0f32; x.len()];
        let m = Modulation {
            shift: Some(&shift),
            scale: Some(&scale),
            groups: b,
        };
        layer_norm(&x, d, Some(&w), Some(&bi), Some(m), 1e-6, &mut out);
        let mut want = Vec::new();
        for r in 0..b * l {
            let g = r / l;
            for (j, v) in ln64(&x[r * d..(r + 1) * d]).into_iter().enumerate() {
                let y = v * w[j] as f64 + bi[j] as f64;
                want.push(y * (1.0 + scale[g * d + j] as f64) + shift[g * d + j] as f64);
            }
        }
        assert!(max_rel_err(&out, &want) < 1e-5);
    }

    #[test]
    fn rms_group_norm_and_softmax_match_f64() {
        let mut rng = Lcg(9);
        let x = rng.vec(6 * 50);
        let w = rng.vec(50);
        let mut out = vec![0f32; x.len()];
        rms_norm(&x, 50, Some(&w), 1e-6, &mut out);
        let want: Vec<f64> = x
            .chunks(50)
            .flat_map(|r| {
                let ms = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 50.0;
                r.iter()
                    .zip(&w)
                    .map(move |(&v, &w)| v as f64 / (ms + 1e-6).sqrt() * w as f64)
            })
            .collect();
        assert!(max_rel_err(&out, &want) < 1e-5);

        // group norm: N=2, C=6, S=7, 3 groups, then SiLU.
        let (n, c, s, g) = (2, 6, 7, 3);
        let x = rng.vec(n * c * s);
        let (w, b) = (rng.vec(c), rng.vec(c));
        let mut out = vec![0f32; x.len()];
        group_norm(
            &x,
            n,
            c,
            s,
            g,
            Some(&w),
            Some(&b),
            1e-5,
            Activation::Silu,
            &mut out,
        );
        let mut want = vec![0f64; x.len()];
        for i in 0..n * g {
            let len = c / g * s;
            let xs = &x[i * len..(i + 1) * len];
            let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
            let var = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len as f64;
            for (j, &v) in xs.iter().enumerate() {
                let ch = (i % g) * (c / g) + j / s;
                let y = (v as f64 - mean) / (var + 1e-5).sqrt() * w[ch] as f64 + b[ch] as f64;
                want[i * len + j] = y / (1.0 + (-y).exp());
            }
        }
        assert!(max_rel_err(&out, &want) < 1e-5);

        // softmax over the middle axis of [2, 5, 3] and over the last axis.
        let x = rng.vec(30);
        for (outer, dim, inner) in [(2, 5, 3), (6, 5, 1)] {
            let mut out = vec![0f32; 30];
            softmax(&x, outer, dim, inner, &mut out);
            let mut want = vec![0f64; 30];
            for o in 0..outer {
                for i in 0..inner {
                    let idx = |j: usize| o * dim * inner + j * inner + i;
                    let sum: f64 = (0..dim).map(|j| (x[idx(j)] as f64).exp()).sum();
                    for j in 0..dim {
                        want[idx(j)] = (x[idx(j)] as f64).exp() / sum;
                    }
                }
            }
            assert!(max_rel_err(&out, &want) < 1e-5);
        }
    }
}
