//! N-d convolution (1, 2 or 3 spatial axes) on the CPU: im2col in column chunks, then the GEMM
//! with the bias fused into its store. A 1×1 convolution with unit stride and no padding skips
//! im2col. Output positions are processed in chunks, so the column buffer stays small however
//! large the image.

use super::gemm::{sgemm, Bias, Epilogue, MatRef};

/// The geometry of a convolution over `nd` spatial axes.
#[derive(Clone, Debug)]
pub struct ConvGeom {
    pub n: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub groups: usize,
    pub input: Vec<usize>,
    pub kernel: Vec<usize>,
    pub stride: Vec<usize>,
    pub padding: Vec<usize>,
    pub dilation: Vec<usize>,
}

impl ConvGeom {
    /// Output spatial sizes, or `None` when the kernel does not fit.
    pub fn output(&self) -> Option<Vec<usize>> {
        (0..self.input.len())
            .map(|a| {
                let span = self.dilation[a] * (self.kernel[a].checked_sub(1)?) + 1;
                let padded = self.input[a] + 2 * self.padding[a];
                padded.checked_sub(span).map(|s| s / self.stride[a] + 1)
            })
            .collect()
    }
}

/// Output positions per im2col chunk.
const CHUNK: usize = 4096;

/// `out[n, c_out, out...] = conv(x[n, c_in, in...], w[c_out, c_in/groups, k...]) + bias`.
pub fn conv(g: &ConvGeom, x: &[f32], w: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    let Some(osz) = g.output() else { return };
    let l_out: usize = osz.iter().product();
    let l_in: usize = g.input.iter().product();
    let kprod: usize = g.kernel.iter().product();
    let cg_in = g.c_in / g.groups;
    let cg_out = g.c_out / g.groups;
    let rows = cg_in * kprod;
    let pointwise =
        kprod == 1 && g.stride.iter().all(|&s| s == 1) && g.padding.iter().all(|&p| p == 0);
    let mut cols = if pointwise {
        Vec::new()
    } else {
        vec![0f32; rows * CHUNK.min(l_out)]
    };
    for b in 0..g.n {
        for grp in 0..g.groups {
            let xg = &x[(b * g.c_in + grp * cg_in) * l_in..][..cg_in * l_in];
            let wg = &w[grp * cg_out * rows..][..cg_out * rows];
            let og = &mut out[(b * g.c_out + grp * cg_out) * l_out..][..cg_out * l_out];
            let bias_g = bias.map(|bs| &bs[grp * cg_out..(grp + 1) * cg_out]);
            let ep = Epilogue {
                bias: bias_g.map_or(Bias::None, Bias::PerRow),
                ..Default::default()
            };
            if pointwise {
                // SAFETY: shapes as checked by the dispatcher.
                unsafe {
                    sgemm(
                        cg_out,
                        l_out,
                        cg_in,
                        MatRef::row_major(wg, cg_in, false),
                        MatRef::row_major(xg, l_out, false),
                        og.as_mut_ptr(),
                        l_out,
                        ep,
                        true,
                    );
                }
                continue;
            }
            for l0 in (0..l_out).step_by(CHUNK) {
                let lc = CHUNK.min(l_out - l0);
                im2col(g, &osz, xg, cg_in, l0, lc, &mut cols);
                // SAFETY: `cols` holds rows × lc (row stride lc); `og` has ldc = l_out.
                unsafe {
                    sgemm(
                        cg_out,
                        lc,
                        rows,
                        MatRef::row_major(wg, rows, false),
                        MatRef::row_major(&cols, lc, false),
                        og.as_mut_ptr().add(l0),
                        l_out,
                        ep,
                        true,
                    );
                }
            }
        }
    }
}

/// Fills `cols[(c·kprod + k), j]` for output positions `l0..l0+lc` (row stride `lc`).
fn im2col(
    g: &ConvGeom,
    osz: &[usize],
    x: &[f32],
    c_in: usize,
    l0: usize,
    lc: usize,
    cols: &mut [f32],
) {
    let nd = g.input.len();
    let kprod: usize = g.kernel.iter().product();
    let l_in: usize = g.input.iter().product();
    let mut opos = vec![0usize; nd];
    let mut kpos = vec![0usize; nd];
    for j in 0..lc {
        let mut r = l0 + j;
        for a in (0..nd).rev() {
            opos[a] = r % osz[a];
            r /= osz[a];
        }
        for k in 0..kprod {
            let mut r = k;
            for a in (0..nd).rev() {
                kpos[a] = r % g.kernel[a];
                r /= g.kernel[a];
            }
            // The input offset, or None when the tap falls in the padding.
            let mut off = 0usize;
            let mut inside = true;
            for a in 0..nd {
                let p = (opos[a] * g.stride[a] + kpos[a] * g.dilation[a]) as isize
                    - g.padding[a] as isize;
                if p < 0 || p as usize >= g.input[a] {
                    inside = false;
                    break;
                }
                off = off * g.input[a] + p as usize;
            }
            for c in 0..c_in {
                cols[(c * kprod + k) * lc + j] = if inside { x[c * l_in + off] } else { 0.0 };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::testing::{max_rel_err, Lcg};

    /// Direct f64 convolution.
    fn reference(g: &ConvGeom, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f64> {
        let osz = g.output().unwrap();
        let nd = osz.len();
        let l_out: usize = osz.iter().product();
        let l_in: usize = g.input.iter().product();
        let kprod: usize = g.kernel.iter().product();
        let (cgi, cgo) = (g.c_in / g.groups, g.c_out / g.groups);
        let mut out = vec![0f64; g.n * g.c_out * l_out];
        for b in 0..g.n {
            for o in 0..g.c_out {
                let grp = o / cgo;
                for l in 0..l_out {
                    let mut s = bias[o] as f64;
                    let mut op = vec![0; nd];
                    let mut r = l;
                    for a in (0..nd).rev() {
                        op[a] = r % osz[a];
                        r /= osz[a];
                    }
                    for ci in 0..cgi {
                        for k in 0..kprod {
                            let mut kp = vec![0; nd];
                            let mut r = k;
                            for a in (0..nd).rev() {
                                kp[a] = r % g.kernel[a];
                                r /= g.kernel[a];
                            }
                            let mut off = 0;
                            let mut ok = true;
                            for a in 0..nd {
                                let p = (op[a] * g.stride[a] + kp[a] * g.dilation[a]) as isize
                                    - g.padding[a] as isize;
                                if p < 0 || p as usize >= g.input[a] {
                                    ok = false;
                                }
                                off = off * g.input[a] + p.max(0) as usize;
                            }
                            if ok {
                                let xv = x[(b * g.c_in + grp * cgi + ci) * l_in + off] as f64;
                                s += xv * w[(o * cgi + ci) * kprod + k] as f64;
                            }
                        }
                    }
                    out[(b * g.c_out + o) * l_out + l] = s;
                }
            }
        }
        out
    }

    #[test]
    fn conv_1d_2d_3d_match_direct_f64() {
        // Tolerance: 1e-5 relative to the largest output element.
        let mut rng = Lcg(8);
        let cases = [
            (vec![11], vec![3], vec![2], vec![1], vec![1], 2, 4, 1),
            (
                vec![9, 7],
                vec![3, 3],
                vec![1, 1],
                vec![1, 1],
                vec![1, 1],
                3,
                5,
                1,
            ),
            (
                vec![8, 8],
                vec![2, 2],
                vec![2, 2],
                vec![0, 0],
                vec![1, 1],
                4,
                6,
                2,
            ),
            (
                vec![6, 5],
                vec![1, 1],
                vec![1, 1],
                vec![0, 0],
                vec![1, 1],
                3,
                7,
                1,
            ),
            (
                vec![5, 6, 7],
                vec![3, 2, 3],
                vec![1, 2, 1],
                vec![1, 0, 1],
                vec![1, 1, 2],
                2,
                3,
                1,
            ),
        ];
        for (input, kernel, stride, padding, dilation, c_in, c_out, groups) in cases {
            let g = ConvGeom {
                n: 2,
                c_in,
                c_out,
                groups,
                input,
                kernel,
                stride,
                padding,
                dilation,
            };
            let l_in: usize = g.input.iter().product();
            let kprod: usize = g.kernel.iter().product();
            let x = rng.vec(2 * c_in * l_in);
            let w = rng.vec(c_out * c_in / groups * kprod);
            let bias = rng.vec(c_out);
            let l_out: usize = g.output().unwrap().iter().product();
            let mut out = vec![0f32; 2 * c_out * l_out];
            conv(&g, &x, &w, Some(&bias), &mut out);
            let want = reference(&g, &x, &w, &bias);
            assert!(max_rel_err(&out, &want) < 1e-5, "{g:?}");
        }
    }
}
