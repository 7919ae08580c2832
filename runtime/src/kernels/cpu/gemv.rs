//! Products with a few rows of A against a weight read row by row: `C[m×n] = A[m×k]·B[k×n]`
//! for `m ≤ GEMV_ROWS`, where column j of B is stored contiguously (row j of a `[n, k]` linear
//! weight, in f32, bf16 or a block format).
//!
//! A time embedding's modulation or a pooled text projection has one row per batch item: through
//! the packed GEMM, each weight would be packed into panels for one row and multiplied on
//! micro-tiles that are mostly padding, at a fraction of memory speed. Here each weight row is
//! read once (widened or dequantised into a row buffer when it is not f32) and dotted with every
//! row of A, the columns split between threads, so the product runs at the speed memory delivers
//! the weight.
//!
//! Each dot product is summed in sixteen lanes (lane l takes the terms `p ≡ l mod 16`, with fused
//! multiply-adds in order of p), then the lanes are added in order; the AVX2 path and the portable
//! one follow that order exactly, so every machine gives the same bits, and a row's result does
//! not depend on the other rows or on the weight's storage.

use super::gemm::{BOperand, Epilogue, Out};
use super::simd;
use rayon::prelude::*;
use std::cell::RefCell;

/// The most rows of A that go through [`gemv`] rather than the packed GEMM.
pub const GEMV_ROWS: usize = 8;
/// Lanes of each dot product's partial sums.
const LANES: usize = 16;
/// Rows of A dotted with one weight row at a time.
const GROUP: usize = 4;

thread_local! {
    /// One weight row widened or dequantised to f32.
    static ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`gemv`] takes this product: few rows, and B's columns stored contiguously.
pub fn fits(m: usize, b: &BOperand) -> bool {
    m <= GEMV_ROWS
        && match b {
            BOperand::Strided(b) => b.rs == 1,
            BOperand::Bf16(b) => b.rs == 1,
            BOperand::Quant(_) => true,
            BOperand::Packed(_) => false,
        }
}

/// The product for [`fits`] operands, then the epilogue, into `out`.
///
/// # Safety
/// As for [`super::gemm::sgemm`]: `a` addresses `m×k` readable elements, `b` `k×n`, `out` `m`
/// rows of `n` writable elements that overlap neither.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemv(
    m: usize,
    n: usize,
    k: usize,
    a: super::gemm::MatRef,
    b: BOperand,
    out: &Out,
    ep: Epilogue,
    parallel: bool,
) {
    debug_assert!(fits(m, &b));
    if m == 0 || n == 0 {
        return;
    }
    // A's rows, contiguous (gathered once when A is strided).
    let contiguous = a.cs == 1;
    let gathered: Vec<f32> = if contiguous {
        Vec::new()
    } else {
        (0..m * k)
            .map(|e| {
                *a.ptr
                    .offset((e / k) as isize * a.rs + (e % k) as isize * a.cs)
            })
            .collect()
    };
    let a_row = |i: usize| -> &[f32] {
        if contiguous {
            std::slice::from_raw_parts(a.ptr.offset(i as isize * a.rs), k)
        } else {
            &gathered[i * k..(i + 1) * k]
        }
    };
    let rows: Vec<&[f32]> = (0..m).map(a_row).collect();
    // Columns `j0..j1` of every row of C.
    let columns = |(j0, j1): (usize, usize)| {
        ROW.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < k {
                buf.resize(k, 0.0);
            }
            let mut sums = [0f32; GEMV_ROWS];
            for j in j0..j1 {
                let w: &[f32] = match b {
                    BOperand::Strided(b) => {
                        std::slice::from_raw_parts(b.ptr.offset(j as isize * b.cs), k)
                    }
                    BOperand::Bf16(b) => {
                        let src = std::slice::from_raw_parts(b.ptr.offset(j as isize * b.cs), k);
                        for (d, &bits) in buf.iter_mut().zip(src) {
                            *d = super::gemm::bf16_to_f32(bits);
                        }
                        &buf[..k]
                    }
                    BOperand::Quant(b) => {
                        let src =
                            std::slice::from_raw_parts(b.ptr.add(j * b.row_bytes), b.row_bytes);
                        b.format.dequantize(src, &mut buf[..k]);
                        &buf[..k]
                    }
                    BOperand::Packed(_) => unreachable!("a packed B is not read by rows"),
                };
                for (g, group) in rows.chunks(GROUP).enumerate() {
                    dots(group, w, &mut sums[g * GROUP..g * GROUP + group.len()]);
                }
                for (i, &s) in sums.iter().enumerate().take(m) {
                    let c = out.at(i, j);
                    *c = if ep.accumulate { *c + s } else { s };
                }
            }
            for i in 0..m {
                out.for_stretches(i, j0, j1, |j, row| super::gemm::finish_row(row, i, j, ep));
            }
        })
    };
    // Column blocks of at least 64, about four per thread.
    let threads = if parallel && m * n * k >= 1 << 18 {
        rayon::current_num_threads()
    } else {
        1
    };
    let block = n.div_ceil(4 * threads).max(64);
    let blocks: Vec<(usize, usize)> = (0..n)
        .step_by(block)
        .map(|j0| (j0, (j0 + block).min(n)))
        .collect();
    if threads > 1 {
        blocks.into_par_iter().for_each(columns);
    } else {
        blocks.into_iter().for_each(columns);
    }
}

/// `sums[r] = rows[r]·w` for up to [`GROUP`] rows, in the lane order of the module's doc.
fn dots(rows: &[&[f32]], w: &[f32], sums: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA; every row has w.len() elements.
        return unsafe { dots_avx2(rows, w, sums) };
    }
    dots_portable(rows, w, sums)
}

/// [`dots`] without SIMD.
fn dots_portable(rows: &[&[f32]], w: &[f32], sums: &mut [f32]) {
    for (row, s) in rows.iter().zip(sums.iter_mut()) {
        let mut lanes = [0f32; LANES];
        for (p, (&x, &y)) in row.iter().zip(w).enumerate() {
            lanes[p % LANES] = x.mul_add(y, lanes[p % LANES]);
        }
        *s = lanes.iter().fold(0.0, |t, &l| t + l);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(rows: &[&[f32]], w: &[f32], sums: &mut [f32]) {
    use std::arch::x86_64::*;
    let k = w.len();
    let whole = k / LANES * LANES;
    let mut acc = [[_mm256_setzero_ps(); 2]; GROUP];
    let n = rows.len();
    let mut p = 0;
    while p < whole {
        let w0 = _mm256_loadu_ps(w.as_ptr().add(p));
        let w1 = _mm256_loadu_ps(w.as_ptr().add(p + 8));
        for r in 0..n {
            let x = rows[r].as_ptr().add(p);
            acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x), w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(8)), w1, acc[r][1]);
        }
        p += LANES;
    }
    for r in 0..n {
        let mut lanes = [0f32; LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][0]);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[r][1]);
        for q in whole..k {
            lanes[q % LANES] = rows[r][q].mul_add(w[q], lanes[q % LANES]);
        }
        sums[r] = lanes.iter().fold(0.0, |t, &l| t + l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::gemm::{sgemm_with, Bias, MatRef, MatRefBf16, MatRefQuant};
    use crate::kernels::cpu::testing::{max_rel_err, Lcg};
    use crate::kernels::cpu::Activation;
    use crate::weights::quant::BlockFormat;

    /// `x·wᵀ` (w `[n, k]`) through the GEMM entry point, with `ep`.
    fn product(m: usize, n: usize, k: usize, x: &[f32], b: BOperand, ep: Epilogue) -> Vec<f32> {
        assert!(fits(m, &b));
        let mut c = vec![1f32; m * n];
        // SAFETY: x is m×k, b addresses k×n, c is m×n.
        unsafe {
            sgemm_with(
                m,
                n,
                k,
                MatRef::row_major(x, k, false),
                b,
                c.as_mut_ptr(),
                n,
                ep,
                true,
            )
        };
        c
    }

    #[test]
    fn few_rows_give_the_float64_product_with_bias_activation_and_accumulation() {
        let mut rng = Lcg(7);
        for (m, n, k) in [
            (1, 1, 1),
            (1, 70, 15),
            (3, 129, 37),
            (5, 64, 256),
            (8, 300, 1000),
        ] {
            let x = rng.vec(m * k);
            let w = rng.vec(n * k);
            let bias = rng.vec(n);
            let b = BOperand::Strided(MatRef::row_major(&w, k, true));
            let dot = |i: usize, j: usize| -> f64 {
                (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum()
            };
            // Overwrite, then bias and SiLU, then accumulate onto the 1s the output starts as.
            let plain = product(m, n, k, &x, b, Epilogue::default());
            let want: Vec<f64> = (0..m * n).map(|e| dot(e / n, e % n)).collect();
            let err = max_rel_err(&plain, &want);
            assert!(
                err < 1e-6,
                "{m}x{n}x{k}: relative error {err:e} (tolerance 1e-6)"
            );
            let ep = Epilogue {
                bias: Bias::PerColumn(&bias),
                act: Activation::Silu,
                accumulate: false,
            };
            let silu = product(m, n, k, &x, b, ep);
            let want: Vec<f64> = (0..m * n)
                .map(|e| {
                    let v = dot(e / n, e % n) + bias[e % n] as f64;
                    v / (1.0 + (-v).exp())
                })
                .collect();
            let err = max_rel_err(&silu, &want);
            assert!(
                err < 1e-5,
                "{m}x{n}x{k} with SiLU: relative error {err:e} (tolerance 1e-5)"
            );
            let ep = Epilogue {
                accumulate: true,
                ..Default::default()
            };
            let acc = product(m, n, k, &x, b, ep);
            let want: Vec<f64> = (0..m * n).map(|e| 1.0 + dot(e / n, e % n)).collect();
            let err = max_rel_err(&acc, &want);
            assert!(
                err < 1e-6,
                "{m}x{n}x{k} accumulated: relative error {err:e} (tolerance 1e-6)"
            );
        }
    }

    #[test]
    fn the_simd_path_gives_the_portable_bits_and_rows_do_not_depend_on_each_other() {
        let mut rng = Lcg(11);
        for k in [1, 16, 17, 100, 1536] {
            let w = rng.vec(k);
            let x: Vec<Vec<f32>> = (0..GROUP).map(|_| rng.vec(k)).collect();
            let rows: Vec<&[f32]> = x.iter().map(|r| r.as_slice()).collect();
            let (mut simd_sums, mut portable) = ([0f32; GROUP], [0f32; GROUP]);
            dots(&rows, &w, &mut simd_sums);
            dots_portable(&rows, &w, &mut portable);
            assert_eq!(
                simd_sums.map(f32::to_bits),
                portable.map(f32::to_bits),
                "k = {k}"
            );
            let mut alone = [0f32; 1];
            dots(&rows[2..3], &w, &mut alone);
            assert_eq!(
                alone[0].to_bits(),
                simd_sums[2].to_bits(),
                "k = {k}: row 2 alone"
            );
        }
    }

    #[test]
    fn bf16_and_quantized_weights_give_the_bits_of_their_f32_values() {
        let mut rng = Lcg(5);
        let (m, n, k) = (3, 40, 64);
        let x = rng.vec(m * k);
        // bf16: the f32 product of the widened values, bit for bit.
        let bits: Vec<u16> = rng
            .vec(n * k)
            .iter()
            .map(|v| (v.to_bits() >> 16) as u16)
            .collect();
        let wide: Vec<f32> = bits
            .iter()
            .map(|&b| f32::from_bits((b as u32) << 16))
            .collect();
        let f32_product = product(
            m,
            n,
            k,
            &x,
            BOperand::Strided(MatRef::row_major(&wide, k, true)),
            Epilogue::default(),
        );
        let bf16_product = product(
            m,
            n,
            k,
            &x,
            BOperand::Bf16(MatRefBf16::row_major(&bits, k, true)),
            Epilogue::default(),
        );
        assert_eq!(f32_product, bf16_product);
        // Q8_0: blocks of a scale (f16) and 32 signed bytes; the product of the dequantised values.
        let format = BlockFormat::Q8_0;
        let row_bytes = k / format.block_len() * format.block_bytes();
        let bytes: Vec<u8> = (0..n * row_bytes)
            .map(|e| {
                if e % 34 == 1 {
                    0x3c
                } else if e % 34 == 0 {
                    0
                } else {
                    (e * 37 % 251) as u8
                }
            })
            .collect();
        let mut values = vec![0f32; n * k];
        format.dequantize(&bytes, &mut values);
        let want = product(
            m,
            n,
            k,
            &x,
            BOperand::Strided(MatRef::row_major(&values, k, true)),
            Epilogue::default(),
        );
        let quant = BOperand::Quant(MatRefQuant {
            ptr: bytes.as_ptr(),
            row_bytes,
            format,
        });
        assert_eq!(want, product(m, n, k, &x, quant, Epilogue::default()));
    }
}
