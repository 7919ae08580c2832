//! Data movement on the CPU: permute, concat, slice, 2-D upsampling, embedding lookup and rotary
//! position embeddings (RoPE) with their frequency tables.

use super::rows_per_task;
use rayon::prelude::*;

/// Row-major strides of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// `out` = `x` (shape `shape`) with axes reordered by `perm` (out axis i = in axis perm[i]).
pub fn permute<T: Copy + Send + Sync>(x: &[T], shape: &[usize], perm: &[usize], out: &mut [T]) {
    let rank = shape.len();
    if out.is_empty() || rank == 0 {
        out.copy_from_slice(x);
        return;
    }
    let in_strides = strides(shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let src_strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let inner = out_shape[rank - 1];
    let inner_stride = src_strides[rank - 1];
    let rows = out.len() / inner;
    let chunk = rows_per_task(rows, inner, 32 * 1024);
    out.par_chunks_mut(chunk * inner)
        .enumerate()
        .for_each(|(c, oc)| {
            for (ri, orow) in oc.chunks_exact_mut(inner).enumerate() {
                let mut r = c * chunk + ri;
                let mut off = 0;
                for ax in (0..rank - 1).rev() {
                    off += (r % out_shape[ax]) * src_strides[ax];
                    r /= out_shape[ax];
                }
                if inner_stride == 1 {
                    orow.copy_from_slice(&x[off..off + inner]);
                } else {
                    for (j, o) in orow.iter_mut().enumerate() {
                        *o = x[off + j * inner_stride];
                    }
                }
            }
        });
}

/// Concatenates byte blocks: each part is `[outer, part_len]`, the output `[outer, Σ part_len]`.
pub fn concat(parts: &[&[u8]], part_lens: &[usize], outer: usize, out: &mut [u8]) {
    let total: usize = part_lens.iter().sum();
    for o in 0..outer {
        let mut at = o * total;
        for (p, &len) in parts.iter().zip(part_lens) {
            out[at..at + len].copy_from_slice(&p[o * len..(o + 1) * len]);
            at += len;
        }
    }
}

/// Slices `[outer, dim, inner]` (in elements of `elem` bytes) along the middle axis:
/// `start, start+step, ...` for `count` items.
#[allow(clippy::too_many_arguments)]
pub fn slice(
    x: &[u8],
    elem: usize,
    outer: usize,
    dim: usize,
    inner: usize,
    start: usize,
    step: usize,
    count: usize,
    out: &mut [u8],
) {
    let row = inner * elem;
    for o in 0..outer {
        for i in 0..count {
            let src = (o * dim + start + i * step) * row;
            let dst = (o * count + i) * row;
            out[dst..dst + row].copy_from_slice(&x[src..src + row]);
        }
    }
}

/// How a 2-D upsample picks source pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upsample {
    /// PyTorch's `nearest`: `src = floor(dst · in / out)`.
    Nearest,
    /// PyTorch's `bilinear`, with or without `align_corners`.
    Bilinear { align_corners: bool },
}

/// Resizes `[planes, h, w]` to `[planes, ho, wo]`.
#[allow(clippy::too_many_arguments)]
pub fn upsample2d(
    x: &[f32],
    planes: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    mode: Upsample,
    out: &mut [f32],
) {
    if planes * ho * wo == 0 {
        return;
    }
    let coord = |dst: usize, inn: usize, outn: usize, align: bool| -> f32 {
        if align {
            if outn > 1 {
                dst as f32 * (inn - 1) as f32 / (outn - 1) as f32
            } else {
                0.0
            }
        } else {
            ((dst as f32 + 0.5) * inn as f32 / outn as f32 - 0.5).max(0.0)
        }
    };
    out.par_chunks_mut(ho * wo).enumerate().for_each(|(p, o)| {
        let src = &x[p * h * w..(p + 1) * h * w];
        for yo in 0..ho {
            for xo in 0..wo {
                o[yo * wo + xo] = match mode {
                    Upsample::Nearest => {
                        let ys = ((yo * h) / ho).min(h - 1);
                        let xs = ((xo * w) / wo).min(w - 1);
                        src[ys * w + xs]
                    }
                    Upsample::Bilinear { align_corners } => {
                        let fy = coord(yo, h, ho, align_corners);
                        let fx = coord(xo, w, wo, align_corners);
                        let (y0, x0) = ((fy as usize).min(h - 1), (fx as usize).min(w - 1));
                        let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
                        let (ly, lx) = (fy - y0 as f32, fx - x0 as f32);
                        let top = src[y0 * w + x0] * (1.0 - lx) + src[y0 * w + x1] * lx;
                        let bot = src[y1 * w + x0] * (1.0 - lx) + src[y1 * w + x1] * lx;
                        top * (1.0 - ly) + bot * ly
                    }
                };
            }
        }
    });
}

/// Gathers rows of `table` (`[vocab, d]`, `elem`-byte elements) by index. Returns the first
/// out-of-range index as an error.
pub fn embedding(
    table: &[u8],
    vocab: usize,
    row_bytes: usize,
    ids: &[i64],
    out: &mut [u8],
) -> Result<(), i64> {
    for (i, &id) in ids.iter().enumerate() {
        if id < 0 || id as usize >= vocab {
            return Err(id);
        }
        let s = id as usize * row_bytes;
        out[i * row_bytes..(i + 1) * row_bytes].copy_from_slice(&table[s..s + row_bytes]);
    }
    Ok(())
}

/// The RoPE angle tables for positions `[l, axes]`: axis `a` with `dims[a]` (even) channels has
/// frequencies `theta^(-2j/dims[a])`; the tables are `[l, Σ dims / 2]`, axes side by side (Flux's
/// `EmbedND`). Computed in f64.
pub fn rope_tables(
    positions: &[f64],
    l: usize,
    dims: &[usize],
    theta: f64,
) -> (Vec<f32>, Vec<f32>) {
    let half: usize = dims.iter().map(|d| d / 2).sum();
    let mut cos = Vec::with_capacity(l * half);
    let mut sin = Vec::with_capacity(l * half);
    for p in 0..l {
        for (a, &d) in dims.iter().enumerate() {
            let pos = positions[p * dims.len() + a];
            for j in 0..d / 2 {
                let angle = pos * theta.powf(-(2.0 * j as f64) / d as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    (cos, sin)
}

/// Rotates `x` `[rows = outer·l, heads·d]` by the tables `[l, r/2]` (`r <= d`, the rotated
/// prefix of each of a row's `heads` stretches of `d`: heads side by side, as a projection
/// writes them, all at the row's position). `interleaved`: pairs are (2i, 2i+1) (Flux, GPT-J);
/// otherwise (i, i + r/2) (GPT-NeoX).
#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &[f32],
    l: usize,
    (heads, d): (usize, usize),
    cos: &[f32],
    sin: &[f32],
    r: usize,
    interleaved: bool,
    out: &mut [f32],
) {
    let half = r / 2;
    let heads = heads.max(1);
    let stretches = x.len() / d.max(1);
    if stretches == 0 {
        return;
    }
    let chunk = rows_per_task(stretches, d, 32 * 1024);
    out.par_chunks_mut(chunk * d)
        .enumerate()
        .for_each(|(c, oc)| {
            for (ri, o) in oc.chunks_exact_mut(d).enumerate() {
                let stretch = c * chunk + ri;
                let pos = stretch / heads % l;
                let xr = &x[stretch * d..(stretch + 1) * d];
                let (cr, sr) = (
                    &cos[pos * half..(pos + 1) * half],
                    &sin[pos * half..(pos + 1) * half],
                );
                for i in 0..half {
                    let (a, b) = if interleaved {
                        (2 * i, 2 * i + 1)
                    } else {
                        (i, i + half)
                    };
                    o[a] = xr[a] * cr[i] - xr[b] * sr[i];
                    o[b] = xr[b] * cr[i] + xr[a] * sr[i];
                }
                o[r..].copy_from_slice(&xr[r..]);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::testing::{max_rel_err, Lcg};

    #[test]
    fn permute_matches_index_arithmetic() {
        let shape = [2, 3, 4, 5];
        let x: Vec<f32> = (0..120).map(|i| i as f32).collect();
        let perm = [0, 2, 1, 3];
        let mut out = vec![0f32; 120];
        permute(&x, &shape, &perm, &mut out);
        // out[a][c][b][d] = x[a][b][c][d]
        assert_eq!(out[((4 + 2) * 3 + 1) * 5 + 3], x[((3 + 1) * 4 + 2) * 5 + 3]);
        let perm = [3, 1, 0, 2];
        permute(&x, &shape, &perm, &mut out);
        // out shape [5,3,2,4]: out[d][b][a][c] = x[a][b][c][d]
        assert_eq!(
            out[((4 * 3 + 2) * 2 + 1) * 4 + 3],
            x[((3 + 2) * 4 + 3) * 5 + 4]
        );
    }

    #[test]
    fn bilinear_matches_pytorch_formula_and_nearest_repeats() {
        let x: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0]; // 2x2
        let mut out = vec![0f32; 16];
        upsample2d(&x, 1, 2, 2, 4, 4, Upsample::Nearest, &mut out);
        assert_eq!(&out[..4], &[1.0, 1.0, 2.0, 2.0]);
        upsample2d(
            &x,
            1,
            2,
            2,
            4,
            4,
            Upsample::Bilinear {
                align_corners: false,
            },
            &mut out,
        );
        // torch.nn.functional.interpolate(x, (4,4), mode="bilinear") first row
        assert_eq!(&out[..4], &[1.0, 1.25, 1.75, 2.0]);
        upsample2d(
            &x,
            1,
            2,
            2,
            3,
            3,
            Upsample::Bilinear {
                align_corners: true,
            },
            &mut out[..9],
        );
        assert_eq!(&out[..9], &[1.0, 1.5, 2.0, 2.0, 2.5, 3.0, 3.0, 3.5, 4.0]);
    }

    #[test]
    fn rope_matches_complex_rotation() {
        // Tolerance: 1e-6 relative (one rotation in f32 of f64 tables).
        let mut rng = Lcg(4);
        let (l, d, r) = (7, 12, 8);
        let pos: Vec<f64> = (0..l * 2).map(|i| (i % 5) as f64).collect();
        let (cos, sin) = rope_tables(&pos, l, &[4, 4], 10000.0);
        let x = rng.vec(2 * l * d);
        for interleaved in [true, false] {
            let mut out = vec![0f32; x.len()];
            rope(&x, l, (1, d), &cos, &sin, r, interleaved, &mut out);
            let mut want = vec![0f64; x.len()];
            for row in 0..2 * l {
                let p = row % l;
                for j in 0..r / 2 {
                    let (axis, jj, dd) = if j < 2 { (0, j, 4) } else { (1, j - 2, 4) };
                    let ang = pos[p * 2 + axis] * 10000f64.powf(-(2.0 * jj as f64) / dd as f64);
                    let (a, b) = if interleaved {
                        (2 * j, 2 * j + 1)
                    } else {
                        (j, j + r / 2)
                    };
                    let (xa, xb) = (x[row * d + a] as f64, x[row * d + b] as f64);
                    want[row * d + a] = xa * ang.cos() - xb * ang.sin();
                    want[row * d + b] = xb * ang.cos() + xa * ang.sin();
                }
                for j in r..d {
                    want[row * d + j] = x[row * d + j] as f64;
                }
            }
            assert!(max_rel_err(&out, &want) < 1e-6, "interleaved={interleaved}");
        }
    }

    #[test]
    fn rope_over_heads_side_by_side_gives_the_bits_of_each_head_rotated_alone() {
        let mut rng = Lcg(9);
        let (b, l, heads, d, r) = (2, 5, 3, 8, 6);
        let pos: Vec<f64> = (0..l).map(|i| i as f64 * 1.5).collect();
        let (cos, sin) = rope_tables(&pos, l, &[r], 10000.0);
        let x = rng.vec(b * l * heads * d);
        let mut fused = vec![0f32; x.len()];
        rope(&x, l, (heads, d), &cos, &sin, r, false, &mut fused);
        // Each head as its own [B, L, d] rows.
        for h in 0..heads {
            let take = |v: &[f32]| -> Vec<f32> {
                (0..b * l)
                    .flat_map(|row| v[(row * heads + h) * d..][..d].to_vec())
                    .collect()
            };
            let alone_in = take(&x);
            let mut alone = vec![0f32; alone_in.len()];
            rope(&alone_in, l, (1, d), &cos, &sin, r, false, &mut alone);
            assert_eq!(take(&fused), alone, "head {h}");
        }
    }
}
