//! Element types and conversions between dtypes (f16 and bf16 through the `half` crate).

use super::DType;
use crate::weights::quant::BlockFormat;
use half::{bf16, f16};

/// A Rust type that is the element of some dtype.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => { $(impl Element for $t { const DTYPE: DType = DType::$d; })* };
}
element!(f32 => F32, f16 => F16, bf16 => BF16, i64 => I64, i32 => I32, u8 => U8);

/// Reads element `i` of little-endian `bytes` of `dtype` as f64.
fn read(dtype: DType, bytes: &[u8], i: usize) -> f64 {
    let s = dtype.size();
    let b = &bytes[i * s..(i + 1) * s];
    match dtype {
        DType::F32 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
        DType::F16 => f16::from_le_bytes(b.try_into().unwrap()).to_f64(),
        DType::BF16 => bf16::from_le_bytes(b.try_into().unwrap()).to_f64(),
        DType::I64 => i64::from_le_bytes(b.try_into().unwrap()) as f64,
        DType::I32 => i32::from_le_bytes(b.try_into().unwrap()) as f64,
        DType::U8 => b[0] as f64,
        _ => unreachable!("block formats are dequantised whole"),
    }
}

/// The elements of `bytes` (of `dtype`) as f32; a block format's whole blocks dequantised.
pub fn to_f32_vec(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    if let Some(format) = BlockFormat::of(dtype) {
        let blocks = bytes.len() / format.block_bytes();
        let mut out = vec![0f32; blocks * format.block_len()];
        format.dequantize(&bytes[..blocks * format.block_bytes()], &mut out);
        return out;
    }
    let n = bytes.len() / dtype.size();
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        _ => (0..n).map(|i| read(dtype, bytes, i) as f32).collect(),
    }
}

/// Converts `src` bytes of `from` into `dst` bytes of `to` (same element count). Floats to
/// integers truncate toward zero and saturate; floats to u8 saturate to 0..=255. A block
/// format is dequantised first; `to` must be dense (the caller checks: nothing quantises).
pub fn convert(from: DType, src: &[u8], to: DType, dst: &mut [u8]) {
    if from.is_quantized() && from != to {
        let values: Vec<u8> = to_f32_vec(from, src)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        return convert(DType::F32, &values, to, dst);
    }
    let n = src.len() / from.size();
    debug_assert_eq!(dst.len(), n * to.size());
    if from == to {
        dst.copy_from_slice(src);
        return;
    }
    let s = to.size();
    for i in 0..n {
        let out = &mut dst[i * s..(i + 1) * s];
        let v = read(from, src, i);
        match to {
            DType::F32 => {
                // f16/bf16 -> f32 is exact; from f32 this is a plain copy.
                let x = if from == DType::F32 {
                    f32::from_le_bytes(src[i * 4..i * 4 + 4].try_into().unwrap())
                } else {
                    v as f32
                };
                out.copy_from_slice(&x.to_le_bytes())
            }
            DType::F16 => out.copy_from_slice(&f16::from_f64(v).to_le_bytes()),
            DType::BF16 => out.copy_from_slice(&bf16::from_f64(v).to_le_bytes()),
            DType::I64 => out.copy_from_slice(&(v as i64).to_le_bytes()),
            DType::I32 => out.copy_from_slice(&(v as i32).to_le_bytes()),
            DType::U8 => out[0] = v as u8,
            _ => unreachable!("the caller never converts to a block format"),
        }
    }
}

/// f32 values into bytes of `to`.
pub fn from_f32(values: &[f32], to: DType) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * to.size()];
    let src: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    convert(DType::F32, &src, to, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_half_types() {
        let v = [1.0f32, -2.5, 0.333, 65504.0];
        for dt in [DType::F16, DType::BF16] {
            let back = to_f32_vec(dt, &from_f32(&v, dt));
            for (a, b) in v.iter().zip(&back) {
                // Relative error of one rounding: 2^-11 for f16, 2^-8 for bf16.
                assert!(((a - b) / a).abs() < 4e-3, "{dt:?}: {a} vs {b}");
            }
        }
        let ints = to_f32_vec(DType::I32, &from_f32(&[3.9, -3.9, 7.0], DType::I32));
        assert_eq!(ints, vec![3.0, -3.0, 7.0]);
        assert_eq!(from_f32(&[300.0, -4.0], DType::U8), vec![255, 0]);
    }
}
