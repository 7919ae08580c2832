//! CPU kernels: multithreaded (rayon) f32 loops, a packed AVX2/FMA GEMM, blockwise attention and
//! fused norm-modulate. Every kernel here works on f32 slices; the dispatcher converts f16 and
//! bf16 at its edges.

pub mod aligned;
pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod gemm;
pub mod gemv;
pub mod layout;
pub mod norm;
pub mod reduce;
pub mod simd;

/// An activation, applied elementwise or fused into a GEMM's store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    None,
    /// GELU with the exact erf.
    Gelu,
    /// GELU's tanh approximation (`approximate="tanh"`).
    GeluTanh,
    Silu,
    Relu,
}

impl Activation {
    pub fn parse(name: &str) -> Option<Activation> {
        Some(match name {
            "none" | "identity" => Activation::None,
            "gelu" => Activation::Gelu,
            "gelu_tanh" | "gelu-approximate" => Activation::GeluTanh,
            "silu" | "swish" => Activation::Silu,
            "relu" => Activation::Relu,
            _ => return None,
        })
    }
}

/// Rows per parallel task so that each task has at least `min_work` elements.
pub(crate) fn rows_per_task(rows: usize, row_len: usize, min_work: usize) -> usize {
    let by_work = min_work.div_ceil(row_len.max(1)).max(1);
    let by_threads = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
    by_work.max(by_threads).min(rows.max(1))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Deterministic random data and error measures for kernel tests.

    /// A small LCG: reproducible test data without a dependency.
    pub struct Lcg(pub u64);

    impl Lcg {
        pub fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        pub fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    /// max |got - want| / max |want| (the tensor-scale relative error).
    pub fn max_rel_err(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len(), "length");
        let scale = want.iter().fold(0f64, |m, w| m.max(w.abs())).max(1e-30);
        got.iter()
            .zip(want)
            .map(|(g, w)| {
                if g.is_nan() {
                    f64::INFINITY
                } else {
                    (*g as f64 - w).abs()
                }
            })
            .fold(0f64, f64::max)
            / scale
    }
}
