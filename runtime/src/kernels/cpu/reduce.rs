//! Reductions on the CPU over the middle axis of `[outer, dim, inner]`, accumulated in f64.

use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    Mean,
    Max,
    Min,
}

impl Reduce {
    pub fn parse(name: &str) -> Option<Reduce> {
        Some(match name {
            "sum" => Reduce::Sum,
            "mean" => Reduce::Mean,
            "max" => Reduce::Max,
            "min" => Reduce::Min,
            _ => return None,
        })
    }
}

/// `out[o, i] = reduce_j x[o, j, i]` (`out` holds `outer × inner` values).
pub fn reduce(op: Reduce, x: &[f32], dim: usize, inner: usize, out: &mut [f32]) {
    if inner == 0 {
        return;
    }
    out.par_chunks_mut(inner).enumerate().for_each(|(o, orow)| {
        for (i, ov) in orow.iter_mut().enumerate() {
            let at = |j: usize| x[(o * dim + j) * inner + i] as f64;
            *ov = match op {
                Reduce::Sum => (0..dim).map(at).sum::<f64>() as f32,
                Reduce::Mean => ((0..dim).map(at).sum::<f64>() / dim as f64) as f32,
                Reduce::Max => (0..dim).map(at).fold(f64::NEG_INFINITY, f64::max) as f32,
                Reduce::Min => (0..dim).map(at).fold(f64::INFINITY, f64::min) as f32,
            };
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduces_the_middle_axis() {
        let x: Vec<f32> = (0..24).map(|i| i as f32).collect(); // [2, 3, 4]
        let mut out = vec![0f32; 8];
        reduce(Reduce::Sum, &x, 3, 4, &mut out);
        assert_eq!(out[0], 0.0 + 4.0 + 8.0);
        assert_eq!(out[5], 13.0 + 17.0 + 21.0);
        reduce(Reduce::Max, &x, 3, 4, &mut out);
        assert_eq!(out[7], 23.0);
        reduce(Reduce::Mean, &x, 3, 4, &mut out);
        assert_eq!(out[1], 5.0);
    }
}
