//! Scaled-dot-product attention on the CPU, computed blockwise with an online softmax
//! (FlashAttention's recurrence, Dao et al. 2022): no L×L score matrix is ever held, only one
//! `bq × BK` block per task (bq at most `BQ_MAX` rows, evened out over the queries).
//!
//! K and V are packed once per (batch, head) into the GEMM's panel layout; each task then owns a
//! block of queries, runs the GEMM micro-kernel for `S = (Q·scale)·Kᵀ` and `O += P·V`, and keeps
//! the running row max and sum. Tasks are (batch, head, query block), spread over rayon.

use super::gemm::{pack_b, tile_half_kernel, tile_kernel, tile_pair_kernel, tile_rows, MatRef, NR};
use super::simd;
use rayon::prelude::*;
use std::cell::RefCell;

/// The most query rows per task (a multiple of every tile's rows); blocks are evened out below
/// it.
const BQ_MAX: usize = 96;
/// Keys per block (a multiple of NR).
const BK: usize = 256;

/// Sizes: q `[B,H,Lq,D]`, k `[B,H,Lk,D]`, v `[B,H,Lk,Dv]`, out `[B,H,Lq,Dv]`.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub b: usize,
    pub h: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
}

/// Where element (batch b, head h, row l, channel c) of an attention operand is:
/// `offset + b·batch + h·head + l·row + c`. Contiguous `[B, H, L, D]` is
/// [`Layout::contiguous`]; a `[B, L, C]` projection holding the heads side by side from column
/// `offset` is `{offset, batch: L·C, head: D, row: C}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub offset: usize,
    pub batch: usize,
    pub head: usize,
    pub row: usize,
}

impl Layout {
    pub fn contiguous(heads: usize, rows: usize, width: usize) -> Layout {
        Layout {
            offset: 0,
            batch: heads * rows * width,
            head: rows * width,
            row: width,
        }
    }

    /// The last element's index plus one, for `dims` of this operand (0 when empty).
    pub fn extent(&self, b: usize, h: usize, l: usize, d: usize) -> usize {
        if b * h * l * d == 0 {
            return 0;
        }
        self.offset + (b - 1) * self.batch + (h - 1) * self.head + (l - 1) * self.row + d
    }
}

/// An additive f32 mask, broadcast by zero strides: element (b, h, q, k) is at
/// `b*sb + h*sh + q*sq + k`.
#[derive(Clone, Copy)]
pub struct MaskRef<'a> {
    pub data: &'a [f32],
    pub sb: usize,
    pub sh: usize,
    pub sq: usize,
}

#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint query rows.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// Attention over contiguous `[B, H, L, D]` f32 data; a fully masked query row gives zeros.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<MaskRef>,
    scale: f32,
    dims: AttnDims,
    out: &mut [f32],
) {
    let layouts = [
        Layout::contiguous(dims.h, dims.lq, dims.d),
        Layout::contiguous(dims.h, dims.lk, dims.d),
        Layout::contiguous(dims.h, dims.lk, dims.dv),
        Layout::contiguous(dims.h, dims.lq, dims.dv),
    ];
    attention_strided(q, k, v, layouts, mask, scale, dims, out)
}

/// Attention with each operand (q, k, v, out) addressed through its [`Layout`], so heads can be
/// read straight out of fused projections and written where the output projection reads them.
/// The caller checks that every layout's extent fits its slice.
#[allow(clippy::too_many_arguments)]
pub fn attention_strided(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    layouts: [Layout; 4],
    mask: Option<MaskRef>,
    scale: f32,
    dims: AttnDims,
    out: &mut [f32],
) {
    let [ql, kl, vl, ol] = layouts;
    let AttnDims {
        b,
        h,
        lq,
        lk,
        d,
        dv,
    } = dims;
    let heads = b * h;
    if heads == 0 || lq == 0 || dv == 0 {
        return;
    }
    if lk == 0 {
        for bh in 0..heads {
            let (bi, hi) = (bh / h, bh % h);
            for r in 0..lq {
                let at = ol.offset + bi * ol.batch + hi * ol.head + r * ol.row;
                out[at..at + dv].fill(0.0);
            }
        }
        return;
    }
    // Pack K (as the B operand of Q·Kᵀ: k-dim = D, columns = keys) and V (k-dim = keys,
    // columns = Dv) per head.
    let k_panels = lk.div_ceil(NR);
    let v_panels = dv.div_ceil(NR);
    let k_pack_len = k_panels * NR * d;
    let v_pack_len = v_panels * NR * lk;
    let mut packed = vec![0f32; heads * (k_pack_len + v_pack_len)];
    packed
        .par_chunks_mut(k_pack_len + v_pack_len)
        .enumerate()
        .for_each(|(bh, buf)| {
            let (kp, vp) = buf.split_at_mut(k_pack_len);
            let (bi, hi) = (bh / h, bh % h);
            let kb0 = kl.offset + bi * kl.batch + hi * kl.head;
            let vb0 = vl.offset + bi * vl.batch + hi * vl.head;
            let kt = MatRef {
                ptr: k[kb0..].as_ptr(),
                rs: 1,
                cs: kl.row as isize,
            };
            let vm = MatRef {
                ptr: v[vb0..].as_ptr(),
                rs: vl.row as isize,
                cs: 1,
            };
            // SAFETY: the caller checked the layouts' extents; the panel buffers are sized above.
            unsafe {
                for p in 0..k_panels {
                    pack_b(
                        d,
                        NR.min(lk - p * NR),
                        kt,
                        0,
                        p * NR,
                        kp.as_mut_ptr().add(p * NR * d),
                    );
                }
                for p in 0..v_panels {
                    pack_b(
                        lk,
                        NR.min(dv - p * NR),
                        vm,
                        0,
                        p * NR,
                        vp.as_mut_ptr().add(p * NR * lk),
                    );
                }
            }
        });

    let q_blocks = lq.div_ceil(BQ_MAX);
    let mr = tile_rows();
    let bq = lq.div_ceil(q_blocks).div_ceil(mr) * mr;
    let o = Out(out.as_mut_ptr());
    let packed = &packed;
    (0..heads * q_blocks).into_par_iter().for_each(|t| {
        let (bh, qb) = (t / q_blocks, t % q_blocks);
        let (bi, hi) = (bh / h, bh % h);
        let q0 = qb * bq;
        let rows = bq.min(lq - q0);
        let base = bh * (k_pack_len + v_pack_len);
        let kp = &packed[base..base + k_pack_len];
        let vp = &packed[base + k_pack_len..base + k_pack_len + v_pack_len];
        let qb0 = ql.offset + bi * ql.batch + hi * ql.head + q0 * ql.row;
        let mask_rows = mask.map(|m| (m, bi * m.sb + hi * m.sh + q0 * m.sq));
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            // Rows padded to whole tiles: padded rows stay zero and are never written out.
            let prow = rows.div_ceil(mr) * mr;
            let ow = v_panels * NR;
            grow(&mut s.q, prow * d);
            grow(&mut s.s, prow * BK);
            grow(&mut s.o, prow * ow);
            grow(&mut s.m, prow);
            grow(&mut s.l, prow);
            for r in 0..rows {
                let src = &q[qb0 + r * ql.row..][..d];
                for (dst, x) in s.q[r * d..(r + 1) * d].iter_mut().zip(src) {
                    *dst = x * scale;
                }
            }
            s.q[rows * d..prow * d].fill(0.0);
            s.o[..prow * ow].fill(0.0);
            s.m[..rows].fill(f32::NEG_INFINITY);
            s.l[..rows].fill(0.0);
            for kb in (0..lk).step_by(BK) {
                let bk = BK.min(lk - kb);
                // S = (Q·scale)·K[kb..kb+bk]ᵀ, full tiles straight into S (row stride BK), two
                // key panels at a time.
                let k_block_panels = bk.div_ceil(NR);
                for p in (0..k_block_panels).step_by(2) {
                    let bp = |p: usize| kp[(kb / NR + p) * NR * d..].as_ptr();
                    for ir in 0..prow / mr {
                        let a = s.q[ir * mr * d..].as_ptr();
                        let c0 = s.s[ir * mr * BK..].as_mut_ptr();
                        let c = |p: usize| c0.wrapping_add(p * NR);
                        // SAFETY: Q rows are `d` apart, K panels hold `d` steps, S has room for
                        // `prow` rows of BK.
                        unsafe {
                            if p + 1 < k_block_panels {
                                tile_pair_kernel(
                                    d,
                                    a,
                                    d,
                                    1,
                                    [bp(p), bp(p + 1)],
                                    [c(p), c(p + 1)],
                                    BK,
                                    false,
                                )
                            } else if bk - p * NR <= NR / 2 {
                                // At most 8 keys left: the scores past them are never read.
                                tile_half_kernel(d, a, d, 1, bp(p), c(p), BK, false)
                            } else {
                                tile_kernel(d, a, d, 1, bp(p), c(p), BK, false)
                            }
                        };
                    }
                }
                // Online softmax over the block, row by row.
                for r in 0..rows {
                    let srow = &mut s.s[r * BK..r * BK + bk];
                    if let Some((m, off)) = mask_rows {
                        let mrow = &m.data[off + r * m.sq + kb..][..bk];
                        for (x, mv) in srow.iter_mut().zip(mrow) {
                            *x += mv;
                        }
                    }
                    let m_new = s.m[r].max(simd::max(srow));
                    if m_new == f32::NEG_INFINITY {
                        srow.fill(0.0);
                        continue;
                    }
                    let alpha = simd::exp_scalar(s.m[r] - m_new);
                    let sum = simd::exp_shifted_sum(srow, m_new);
                    s.l[r] = s.l[r] * alpha + sum;
                    s.m[r] = m_new;
                    if alpha != 1.0 {
                        for x in &mut s.o[r * ow..(r + 1) * ow] {
                            *x *= alpha;
                        }
                    }
                }
                // O += P·V[kb..kb+bk], reading P in place (rows BK apart), two panels at a
                // time.
                for p in (0..v_panels).step_by(2) {
                    let bp = |p: usize| vp[p * NR * lk + kb * NR..].as_ptr();
                    for ir in 0..prow / mr {
                        let a = s.s[ir * mr * BK..].as_ptr();
                        let c0 = s.o[ir * mr * ow..].as_mut_ptr();
                        let c = |p: usize| c0.wrapping_add(p * NR);
                        // SAFETY: P rows hold `bk` values, the V panels `bk` steps from `kb`.
                        unsafe {
                            if p + 1 < v_panels {
                                tile_pair_kernel(
                                    bk,
                                    a,
                                    BK,
                                    1,
                                    [bp(p), bp(p + 1)],
                                    [c(p), c(p + 1)],
                                    ow,
                                    true,
                                )
                            } else if dv - p * NR <= NR / 2 {
                                // At most 8 channels left (a head of 72): the padding's sums
                                // are never read.
                                tile_half_kernel(bk, a, BK, 1, bp(p), c(p), ow, true)
                            } else {
                                tile_kernel(bk, a, BK, 1, bp(p), c(p), ow, true)
                            }
                        };
                    }
                }
            }
            for r in 0..rows {
                let inv = if s.l[r] > 0.0 { 1.0 / s.l[r] } else { 0.0 };
                // SAFETY: this task alone writes query rows q0..q0+rows of head bh.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        o.get()
                            .add(ol.offset + bi * ol.batch + hi * ol.head + (q0 + r) * ol.row),
                        dv,
                    )
                };
                for (d, x) in dst.iter_mut().zip(&s.o[r * ow..r * ow + dv]) {
                    *d = x * inv;
                }
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::testing::{max_rel_err, Lcg};

    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[f32]>,
        dims: AttnDims,
        scale: f64,
    ) -> Vec<f64> {
        let AttnDims {
            b,
            h,
            lq,
            lk,
            d,
            dv,
        } = dims;
        let mut out = vec![0f64; b * h * lq * dv];
        for bh in 0..b * h {
            for i in 0..lq {
                let mut s: Vec<f64> = (0..lk)
                    .map(|j| {
                        let dot: f64 = (0..d)
                            .map(|x| {
                                q[(bh * lq + i) * d + x] as f64 * k[(bh * lk + j) * d + x] as f64
                            })
                            .sum();
                        dot * scale + mask.map_or(0.0, |m| m[i * lk + j] as f64)
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0;
                for x in &mut s {
                    *x = (*x - mx).exp();
                    sum += *x;
                }
                for c in 0..dv {
                    out[(bh * lq + i) * dv + c] = (0..lk)
                        .map(|j| s[j] * v[(bh * lk + j) * dv + c] as f64)
                        .sum::<f64>()
                        / sum;
                }
            }
        }
        out
    }

    #[test]
    fn matches_f64_reference_on_random_shapes() {
        // Tolerance: 1e-4 relative to the largest output element.
        let mut rng = Lcg(21);
        for _ in 0..8 {
            let dim = |rng: &mut Lcg, max: usize| {
                1 + ((rng.next() + 1.0) * 0.5 * max as f32) as usize % max
            };
            let dims = AttnDims {
                b: dim(&mut rng, 2),
                h: dim(&mut rng, 3),
                lq: dim(&mut rng, 120),
                lk: dim(&mut rng, 300),
                d: dim(&mut rng, 70),
                dv: dim(&mut rng, 70),
            };
            let q = rng.vec(dims.b * dims.h * dims.lq * dims.d);
            let k = rng.vec(dims.b * dims.h * dims.lk * dims.d);
            let v = rng.vec(dims.b * dims.h * dims.lk * dims.dv);
            let scale = 1.0 / (dims.d as f32).sqrt();
            let mut out = vec![0f32; dims.b * dims.h * dims.lq * dims.dv];
            attention(&q, &k, &v, None, scale, dims, &mut out);
            let r = reference(&q, &k, &v, None, dims, scale as f64);
            assert!(max_rel_err(&out, &r) < 1e-4, "{dims:?}");
        }
    }

    #[test]
    fn heads_and_key_counts_that_end_in_half_a_panel_match_the_reference() {
        // PixArt's heads of 72 (the last V panel holds 8 channels) over 120 caption keys (the
        // last key panel 8 keys) and 264 image keys (a block of 256, then 8): the half-panel
        // kernels. Tolerance: 1e-4 relative to the largest output element.
        let mut rng = Lcg(5);
        for (lk, dv) in [(120, 72), (264, 72), (1, 8), (300, 40)] {
            let dims = AttnDims {
                b: 1,
                h: 2,
                lq: 50,
                lk,
                d: 72,
                dv,
            };
            let q = rng.vec(dims.h * dims.lq * dims.d);
            let k = rng.vec(dims.h * dims.lk * dims.d);
            let v = rng.vec(dims.h * dims.lk * dims.dv);
            let scale = 1.0 / (dims.d as f32).sqrt();
            let mut out = vec![0f32; dims.h * dims.lq * dims.dv];
            attention(&q, &k, &v, None, scale, dims, &mut out);
            let r = reference(&q, &k, &v, None, dims, scale as f64);
            assert!(max_rel_err(&out, &r) < 1e-4, "{dims:?}");
        }
    }

    #[test]
    fn strided_layouts_read_fused_projections() {
        // q, k, v as column blocks of one [B, L, 3·H·D] projection; out as [B, L, H·D].
        let mut rng = Lcg(31);
        let (b, h, l, d) = (2, 3, 37, 16);
        let c = 3 * h * d;
        let qkv = rng.vec(b * l * c);
        let dims = AttnDims {
            b,
            h,
            lq: l,
            lk: l,
            d,
            dv: d,
        };
        let lay = |off| Layout {
            offset: off,
            batch: l * c,
            head: d,
            row: c,
        };
        let mut fused = vec![0f32; b * l * h * d];
        let out_layout = Layout {
            offset: 0,
            batch: l * h * d,
            head: d,
            row: h * d,
        };
        attention_strided(
            &qkv,
            &qkv,
            &qkv,
            [lay(0), lay(h * d), lay(2 * h * d), out_layout],
            None,
            0.25,
            dims,
            &mut fused,
        );
        // The same through contiguous [B, H, L, D] copies.
        let split = |off: usize| -> Vec<f32> {
            let mut t = vec![0f32; b * h * l * d];
            for (i, ti) in t.iter_mut().enumerate() {
                let (di, li, hi, bi) = (i % d, (i / d) % l, (i / (d * l)) % h, i / (d * l * h));
                *ti = qkv[bi * l * c + li * c + off + hi * d + di];
            }
            t
        };
        let mut plain = vec![0f32; b * h * l * d];
        attention(
            &split(0),
            &split(h * d),
            &split(2 * h * d),
            None,
            0.25,
            dims,
            &mut plain,
        );
        for (i, p) in plain.iter().enumerate() {
            let (di, li, hi, bi) = (i % d, (i / d) % l, (i / (d * l)) % h, i / (d * l * h));
            assert_eq!(fused[bi * l * h * d + li * h * d + hi * d + di], *p);
        }
    }

    #[test]
    fn matches_f64_reference_with_and_without_mask() {
        // Tolerance: 1e-4 relative to the largest output element.
        let mut rng = Lcg(11);
        for &(b, h, lq, lk, d, dv) in &[
            (1, 1, 1, 1, 8, 8),
            (2, 3, 50, 37, 40, 24),
            (1, 2, 97, 300, 64, 64),
            (1, 1, 5, 520, 17, 33),
        ] {
            let dims = AttnDims {
                b,
                h,
                lq,
                lk,
                d,
                dv,
            };
            let q = rng.vec(b * h * lq * d);
            let k = rng.vec(b * h * lk * d);
            let v = rng.vec(b * h * lk * dv);
            let scale = 1.0 / (d as f32).sqrt();
            let mut out = vec![0f32; b * h * lq * dv];
            attention(&q, &k, &v, None, scale, dims, &mut out);
            let r = reference(&q, &k, &v, None, dims, scale as f64);
            assert!(max_rel_err(&out, &r) < 1e-4, "{dims:?}");
            // A mask shared by every head: random additive values and some -inf.
            let mask: Vec<f32> = (0..lq * lk)
                .map(|i| {
                    if i % 7 == 3 {
                        f32::NEG_INFINITY
                    } else {
                        rng.next()
                    }
                })
                .collect();
            let mref = MaskRef {
                data: &mask,
                sb: 0,
                sh: 0,
                sq: lk,
            };
            attention(&q, &k, &v, Some(mref), scale, dims, &mut out);
            let r = reference(&q, &k, &v, Some(&mask), dims, scale as f64);
            if lk > 1 {
                assert!(max_rel_err(&out, &r) < 1e-4, "masked {dims:?}");
            }
        }
    }
}
