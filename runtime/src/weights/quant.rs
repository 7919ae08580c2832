//! ggml's block formats, dequantised to f32 exactly as ggml (and the `gguf` package's
//! `dequantize`) computes them: each product and sum rounded to f32 in the same order, so the
//! values match bit for bit.
//!
//! | format | block | bytes | value                                                     |
//! |--------|-------|-------|-----------------------------------------------------------|
//! | Q8_0   | 32    | 34    | d · q, q an i8                                           |
//! | Q4_0   | 32    | 18    | d · (q − 8), q 4 bits                                    |
//! | Q4_1   | 32    | 20    | d · q + m                                                |
//! | Q5_0   | 32    | 22    | d · (q − 16), q 5 bits (the 5th in a 32-bit mask)        |
//! | Q5_1   | 32    | 24    | d · q + m                                                |
//! | Q4_K   | 256   | 144   | (d · sc) · q − (dmin · m), 6-bit sc, m per 32 values     |
//! | Q5_K   | 256   | 176   | as Q4_K with a 5th bit per value                         |
//! | Q6_K   | 256   | 210   | (d · sc) · (q − 32), q 6 bits, an i8 sc per 16 values    |
//!
//! d, m and dmin are f16. Within a 32-value block of the 4-bit formats, byte j holds value j in
//! its low nibble and value j + 16 in its high one.

use crate::tensor::DType;
use half::f16;

/// A block format: values per block and bytes per block. The discriminants are the CUDA
/// decoders' `BF_*` codes (`kernels/cuda/kernels.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockFormat {
    Q8_0 = 0,
    Q4_0 = 1,
    Q4_1 = 2,
    Q5_0 = 3,
    Q5_1 = 4,
    Q4K = 5,
    Q5K = 6,
    Q6K = 7,
}

impl BlockFormat {
    /// The format of a block-quantized dtype.
    pub fn of(dtype: DType) -> Option<BlockFormat> {
        Some(match dtype {
            DType::Q8_0 => BlockFormat::Q8_0,
            DType::Q4_0 => BlockFormat::Q4_0,
            DType::Q4_1 => BlockFormat::Q4_1,
            DType::Q5_0 => BlockFormat::Q5_0,
            DType::Q5_1 => BlockFormat::Q5_1,
            DType::Q4K => BlockFormat::Q4K,
            DType::Q5K => BlockFormat::Q5K,
            DType::Q6K => BlockFormat::Q6K,
            _ => return None,
        })
    }

    /// The tensor dtype that stores this format.
    pub fn dtype(self) -> DType {
        match self {
            BlockFormat::Q8_0 => DType::Q8_0,
            BlockFormat::Q4_0 => DType::Q4_0,
            BlockFormat::Q4_1 => DType::Q4_1,
            BlockFormat::Q5_0 => DType::Q5_0,
            BlockFormat::Q5_1 => DType::Q5_1,
            BlockFormat::Q4K => DType::Q4K,
            BlockFormat::Q5K => DType::Q5K,
            BlockFormat::Q6K => DType::Q6K,
        }
    }

    /// ggml's type id (`GGMLQuantizationType`) → the format.
    pub fn from_ggml(id: u32) -> Option<BlockFormat> {
        Some(match id {
            2 => BlockFormat::Q4_0,
            3 => BlockFormat::Q4_1,
            6 => BlockFormat::Q5_0,
            7 => BlockFormat::Q5_1,
            8 => BlockFormat::Q8_0,
            12 => BlockFormat::Q4K,
            13 => BlockFormat::Q5K,
            14 => BlockFormat::Q6K,
            _ => return None,
        })
    }

    /// ggml's name for it.
    pub fn name(self) -> &'static str {
        match self {
            BlockFormat::Q8_0 => "Q8_0",
            BlockFormat::Q4_0 => "Q4_0",
            BlockFormat::Q4_1 => "Q4_1",
            BlockFormat::Q5_0 => "Q5_0",
            BlockFormat::Q5_1 => "Q5_1",
            BlockFormat::Q4K => "Q4_K",
            BlockFormat::Q5K => "Q5_K",
            BlockFormat::Q6K => "Q6_K",
        }
    }

    /// Values per block (the dtype's [`DType::block`]).
    pub fn block_len(self) -> usize {
        self.dtype().block().0
    }

    /// Bytes per block (the dtype's [`DType::block`]).
    pub fn block_bytes(self) -> usize {
        self.dtype().block().1
    }

    /// Dequantises whole blocks: `out.len()` values from `out.len() / block_len` blocks of
    /// `data`. The caller checks the lengths (`data` must hold exactly those blocks).
    pub fn dequantize(self, data: &[u8], out: &mut [f32]) {
        let (n, b) = (self.block_len(), self.block_bytes());
        debug_assert_eq!(data.len() / b * n, out.len());
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::cpu::simd::has_avx2() {
            // SAFETY: the CPU has AVX2; the loops stay inside whole blocks of both slices.
            return unsafe { dequantize_avx2(self, data, out) };
        }
        for (block, values) in data.chunks_exact(b).zip(out.chunks_exact_mut(n)) {
            match self {
                BlockFormat::Q8_0 => q8_0(block, values),
                BlockFormat::Q4_0 => q4(block, values, false),
                BlockFormat::Q4_1 => q4(block, values, true),
                BlockFormat::Q5_0 => q5(block, values, false),
                BlockFormat::Q5_1 => q5(block, values, true),
                BlockFormat::Q4K => qk(block, values, false),
                BlockFormat::Q5K => qk(block, values, true),
                BlockFormat::Q6K => q6_k(block, values),
            }
        }
    }
}

/// Every format eight values at a time: each value widened to f32 exactly, then scaled with
/// the same products and sums (in the same order, no fused multiply-adds) as the scalar
/// loops, so the bits are theirs.
///
/// # Safety
/// The CPU must have AVX2; `data` holds whole blocks of `format` and `out` their values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dequantize_avx2(format: BlockFormat, data: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    // Macros rather than closures, so the intrinsics are compiled with this function's AVX2.
    // Eight bytes from `p` as i32 lanes (zero-extended).
    macro_rules! bytes8 {
        ($p:expr) => {
            _mm256_cvtepu8_epi32(_mm_loadl_epi64($p as *const __m128i))
        };
    }
    // The four bits of each lane from bit `shift`.
    macro_rules! nibble {
        ($v:expr, $shift:expr) => {
            _mm256_and_si256(
                _mm256_srlv_epi32($v, _mm256_set1_epi32($shift)),
                _mm256_set1_epi32(0x0F),
            )
        };
    }
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let (n, b) = (format.block_len(), format.block_bytes());
    for (block, values) in data.chunks_exact(b).zip(out.chunks_exact_mut(n)) {
        let blk = block.as_ptr();
        let dst = values.as_mut_ptr();
        match format {
            BlockFormat::Q8_0 => {
                let d = _mm256_set1_ps(half_at(block, 0));
                for g in 0..4 {
                    let q =
                        _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(2 + 8 * g) as *const __m128i));
                    _mm256_storeu_ps(dst.add(8 * g), _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
                }
            }
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                let min = format == BlockFormat::Q4_1;
                let (d, m, qs) = if min {
                    (
                        _mm256_set1_ps(half_at(block, 0)),
                        _mm256_set1_ps(half_at(block, 2)),
                        blk.add(4),
                    )
                } else {
                    (
                        _mm256_set1_ps(half_at(block, 0)),
                        _mm256_setzero_ps(),
                        blk.add(2),
                    )
                };
                for g in 0..4 {
                    // Values 8g.. : the low nibbles of bytes 8g.. for g < 2, else the high ones.
                    let q = nibble!(bytes8!(qs.add(8 * (g % 2))), 4 * (g / 2) as i32);
                    let v = if min {
                        _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(q)), m)
                    } else {
                        let q = _mm256_sub_epi32(q, _mm256_set1_epi32(8));
                        _mm256_mul_ps(d, _mm256_cvtepi32_ps(q))
                    };
                    _mm256_storeu_ps(dst.add(8 * g), v);
                }
            }
            BlockFormat::Q5_0 | BlockFormat::Q5_1 => {
                let min = format == BlockFormat::Q5_1;
                let at = if min { 4 } else { 2 };
                let (d, m) = (
                    _mm256_set1_ps(half_at(block, 0)),
                    if min {
                        _mm256_set1_ps(half_at(block, 2))
                    } else {
                        _mm256_setzero_ps()
                    },
                );
                let qh =
                    u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]]);
                let qs = blk.add(at + 4);
                for g in 0..4 {
                    let low = nibble!(bytes8!(qs.add(8 * (g % 2))), 4 * (g / 2) as i32);
                    let shifts = _mm256_add_epi32(lanes, _mm256_set1_epi32(8 * g as i32));
                    let bit = _mm256_and_si256(
                        _mm256_srlv_epi32(_mm256_set1_epi32(qh as i32), shifts),
                        _mm256_set1_epi32(1),
                    );
                    let q = _mm256_or_si256(low, _mm256_slli_epi32::<4>(bit));
                    let v = if min {
                        _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(q)), m)
                    } else {
                        let q = _mm256_sub_epi32(q, _mm256_set1_epi32(16));
                        _mm256_mul_ps(d, _mm256_cvtepi32_ps(q))
                    };
                    _mm256_storeu_ps(dst.add(8 * g), v);
                }
            }
            BlockFormat::Q4K | BlockFormat::Q5K => {
                let high = format == BlockFormat::Q5K;
                let (d, dmin) = (half_at(block, 0), half_at(block, 2));
                let (qh, qs) = if high {
                    (blk.add(16), blk.add(48))
                } else {
                    (blk, blk.add(16))
                };
                for s in 0..8 {
                    let (scale, m) = scale_min(&block[4..16], s);
                    let ds = _mm256_set1_ps(d * f32::from(scale));
                    let dm = _mm256_set1_ps(dmin * f32::from(m));
                    let chunk = qs.add((s / 2) * 32);
                    for g in 0..4 {
                        let mut q = nibble!(bytes8!(chunk.add(8 * g)), 4 * (s % 2) as i32);
                        if high {
                            let bit = _mm256_and_si256(
                                _mm256_srlv_epi32(
                                    bytes8!(qh.add(8 * g)),
                                    _mm256_set1_epi32(s as i32),
                                ),
                                _mm256_set1_epi32(1),
                            );
                            q = _mm256_or_si256(q, _mm256_slli_epi32::<4>(bit));
                        }
                        let v = _mm256_sub_ps(_mm256_mul_ps(ds, _mm256_cvtepi32_ps(q)), dm);
                        _mm256_storeu_ps(dst.add(s * 32 + 8 * g), v);
                    }
                }
            }
            BlockFormat::Q6K => {
                let d = half_at(block, 208);
                for g in 0..32 {
                    let e = 8 * g;
                    let (h, within) = (e / 128, e % 128);
                    let low = nibble!(
                        bytes8!(blk.add(h * 64 + within % 64)),
                        4 * (within / 64) as i32
                    );
                    let hi = _mm256_and_si256(
                        _mm256_srlv_epi32(
                            bytes8!(blk.add(128 + h * 32 + within % 32)),
                            _mm256_set1_epi32(2 * (within / 32) as i32),
                        ),
                        _mm256_set1_epi32(3),
                    );
                    let q = _mm256_sub_epi32(
                        _mm256_or_si256(low, _mm256_slli_epi32::<4>(hi)),
                        _mm256_set1_epi32(32),
                    );
                    let ds = _mm256_set1_ps(d * f32::from(block[192 + e / 16] as i8));
                    _mm256_storeu_ps(dst.add(e), _mm256_mul_ps(ds, _mm256_cvtepi32_ps(q)));
                }
            }
        }
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn q8_0(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = f32::from(q as i8) * d;
    }
}

/// Q4_0 (`d · (q − 8)`) or, with `min`, Q4_1 (`d · q + m`).
fn q4(b: &[u8], out: &mut [f32], min: bool) {
    let d = half_at(b, 0);
    let (m, qs) = if min {
        (half_at(b, 2), &b[4..20])
    } else {
        (0.0, &b[2..18])
    };
    for j in 0..16 {
        let (lo, hi) = (qs[j] & 0x0F, qs[j] >> 4);
        if min {
            out[j] = d * f32::from(lo) + m;
            out[j + 16] = d * f32::from(hi) + m;
        } else {
            out[j] = d * f32::from(lo as i8 - 8);
            out[j + 16] = d * f32::from(hi as i8 - 8);
        }
    }
}

/// Q5_0 (`d · (q − 16)`) or, with `min`, Q5_1 (`d · q + m`).
fn q5(b: &[u8], out: &mut [f32], min: bool) {
    let d = half_at(b, 0);
    let (m, at) = if min { (half_at(b, 2), 4) } else { (0.0, 2) };
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let qs = &b[at + 4..at + 20];
    for (i, o) in out.iter_mut().enumerate() {
        let low = (qs[i % 16] >> (4 * (i / 16))) & 0x0F;
        let q = low | ((((qh >> i) & 1) as u8) << 4);
        *o = if min {
            d * f32::from(q) + m
        } else {
            d * f32::from(q as i8 - 16)
        };
    }
}

/// The 6-bit scale and minimum of sub-block `s` (0..8) of a Q4_K/Q5_K block's 12 scale bytes.
fn scale_min(sc: &[u8], s: usize) -> (u8, u8) {
    if s < 4 {
        (sc[s] & 0x3F, sc[s + 4] & 0x3F)
    } else {
        let k = s - 4;
        (
            (sc[k + 8] & 0x0F) | ((sc[k] >> 2) & 0x30),
            (sc[k + 8] >> 4) | ((sc[k + 4] >> 2) & 0x30),
        )
    }
}

/// Q4_K or, with `high`, Q5_K: 8 sub-blocks of 32, `(d · sc) · q − (dmin · m)`.
fn qk(b: &[u8], out: &mut [f32], high: bool) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let sc = &b[4..16];
    let (qh, qs) = if high {
        (&b[16..48], &b[48..176])
    } else {
        (&b[0..0], &b[16..144])
    };
    for s in 0..8 {
        let (scale, m) = scale_min(sc, s);
        let (ds, dm) = (d * f32::from(scale), dmin * f32::from(m));
        let chunk = &qs[(s / 2) * 32..(s / 2) * 32 + 32];
        for l in 0..32 {
            let mut q = (chunk[l] >> (4 * (s % 2))) & 0x0F;
            if high {
                q |= ((qh[l] >> s) & 1) << 4;
            }
            out[s * 32 + l] = ds * f32::from(q) - dm;
        }
    }
}

/// Q6_K: 16 sub-blocks of 16 with i8 scales, `(d · sc) · (q − 32)`.
fn q6_k(b: &[u8], out: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half_at(b, 208);
    for (e, o) in out.iter_mut().enumerate() {
        let (half, within) = (e / 128, e % 128);
        let low = (ql[half * 64 + within % 64] >> (4 * (within / 64))) & 0x0F;
        let high = (qh[half * 32 + within % 32] >> (2 * (within / 32))) & 0x03;
        let q = (low | (high << 4)) as i8 - 32;
        let ds = d * f32::from(scales[e / 16] as i8);
        *o = ds * f32::from(q);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx2_path_gives_the_scalar_bits() {
        if !crate::kernels::cpu::simd::has_avx2() {
            eprintln!("skipped: this CPU has no AVX2 (or DITFLOW_SIMD caps it)");
            return;
        }
        use BlockFormat::*;
        for format in [Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4K, Q5K, Q6K] {
            let (n, b) = (format.block_len(), format.block_bytes());
            let mut data: Vec<u8> = (0..64 * b).map(|i| (i * 37 % 251) as u8).collect();
            for (i, blk) in data.chunks_exact_mut(b).enumerate() {
                // Finite f16 scales (and minimums) where each format keeps them.
                let d = f16::from_f32(0.003 * (i as f32 - 20.0)).to_le_bytes();
                let m = f16::from_f32(0.01 * (i as f32 - 30.0)).to_le_bytes();
                if format == Q6K {
                    blk[208..210].copy_from_slice(&d);
                } else {
                    blk[..2].copy_from_slice(&d);
                    if matches!(format, Q4_1 | Q5_1 | Q4K | Q5K) {
                        blk[2..4].copy_from_slice(&m);
                    }
                }
            }
            let mut fast = vec![0f32; 64 * n];
            unsafe { dequantize_avx2(format, &data, &mut fast) };
            let mut scalar = vec![0f32; 64 * n];
            for (blk, out) in data.chunks_exact(b).zip(scalar.chunks_exact_mut(n)) {
                match format {
                    Q8_0 => q8_0(blk, out),
                    Q4_0 | Q4_1 => q4(blk, out, format == Q4_1),
                    Q5_0 | Q5_1 => q5(blk, out, format == Q5_1),
                    Q4K | Q5K => qk(blk, out, format == Q5K),
                    Q6K => q6_k(blk, out),
                }
            }
            assert!(scalar.iter().all(|v| v.is_finite()), "{format:?}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&scalar), "{format:?}");
        }
    }

    #[test]
    fn q8_0_and_q4_0_by_hand() {
        // d = 0.5 (f16 0x3800): q8 values −2, 3 → −1, 1.5.
        let mut b = vec![0x00, 0x38];
        b.extend((0..32).map(|i| if i == 0 { (-2i8) as u8 } else { 3 }));
        let mut out = [0.0; 32];
        BlockFormat::Q8_0.dequantize(&b, &mut out);
        assert_eq!((out[0], out[1]), (-1.0, 1.5));
        // Q4_0: byte 0 = 0xF0: value 0 = 0 − 8, value 16 = 15 − 8.
        let mut b = vec![0x00, 0x38, 0xF0];
        b.extend([0x88; 15]);
        let mut out = [0.0; 32];
        BlockFormat::Q4_0.dequantize(&b, &mut out);
        assert_eq!((out[0], out[16], out[1]), (-4.0, 3.5, 0.0));
    }
}
