//! Vectorised element functions over f32 slices: exp, GELU (erf and tanh forms), SiLU.
//!
//! AVX2+FMA versions are picked at run time; the portable versions give the same results within
//! the stated error. `exp` uses Cephes' range reduction and degree-5 polynomial (relative error
//! about 2e-7); erf uses Abramowitz & Stegun 7.1.26 (absolute error 1.5e-7).

use super::Activation;

/// The widest vector instruction set the CPU kernels use: found once at run time, and capped by
/// the `DITFLOW_SIMD` environment variable (`avx2` or `portable`), so each path can be measured
/// and tested on one machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Portable,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512F (with AVX2 and FMA).
    Avx512,
}

/// The instruction set in use (checked once).
pub fn isa() -> Isa {
    use std::sync::OnceLock;
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = match std::env::var("DITFLOW_SIMD").as_deref() {
            Ok("portable") => Isa::Portable,
            Ok("avx2") => Isa::Avx2,
            _ => Isa::Avx512,
        };
        detected().min(cap)
    })
}

#[cfg(target_arch = "x86_64")]
fn detected() -> Isa {
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
    {
        Isa::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Isa::Avx2
    } else {
        Isa::Portable
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detected() -> Isa {
    Isa::Portable
}

/// True when the kernels may use AVX2 and FMA.
pub fn has_avx2() -> bool {
    isa() >= Isa::Avx2
}

/// True when the kernels may use AVX-512F.
pub fn has_avx512() -> bool {
    isa() >= Isa::Avx512
}

const EXP_HI: f32 = 88.376_26;
const EXP_LO: f32 = -87.336_55;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const C1: f32 = 0.693_359_4;
const C2: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// Scalar twin of the vector exp (same reduction and polynomial).
#[inline]
pub fn exp_scalar(x: f32) -> f32 {
    let x = x.clamp(EXP_LO, EXP_HI);
    let fx = (x * LOG2E + 0.5).floor();
    let r = x - fx * C1 - fx * C2;
    let mut y = P[0];
    for &p in &P[1..] {
        y = y * r + p;
    }
    let y = y * r * r + r + 1.0;
    y * f32::from_bits(((fx as i32 + 127) as u32) << 23)
}

/// erf by Abramowitz & Stegun 7.1.26.
#[inline]
pub fn erf_scalar(x: f32) -> f32 {
    let s = x.signum();
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    s * (1.0 - poly * exp_scalar((-a * a).max(-30.0)))
}

#[inline]
fn act_scalar(act: Activation, x: f32) -> f32 {
    match act {
        Activation::None => x,
        Activation::Gelu => 0.5 * x * (1.0 + erf_scalar(x * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::GeluTanh => {
            // tanh(u) = 1 - 2 / (exp(2u) + 1); past |u| = 10 that is ±1 in f32 already, and the
            // clamp keeps exp's result clear of subnormals (each a slow microcode assist).
            let u = (0.797_884_6 * (x + 0.044_715 * x * x * x)).clamp(-10.0, 10.0);
            0.5 * x * (2.0 - 2.0 / (exp_scalar(2.0 * u) + 1.0))
        }
        // exp(-x) below e^-30 leaves 1 + exp(-x) = 1 in f32: the clamp only avoids subnormals.
        Activation::Silu => x / (1.0 + exp_scalar((-x).max(-30.0))),
        Activation::Relu => x.max(0.0),
    }
}

/// Applies `act` in place.
pub fn activate(act: Activation, xs: &mut [f32]) {
    if act == Activation::None {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { avx2::activate(act, xs) };
        return;
    }
    for x in xs {
        *x = act_scalar(act, *x);
    }
}

/// `xs[i] = exp(xs[i] - shift)` in place; returns the sum of the results.
pub fn exp_shifted_sum(xs: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::exp_shifted_sum(xs, shift) };
    }
    let mut sum = 0.0;
    for x in xs {
        *x = exp_scalar(*x - shift);
        sum += *x;
    }
    sum
}

/// The largest element (−∞ for an empty slice).
pub fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    lanes.iter().fold(m, |m, &v| m.max(v))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(EXP_LO)),
            _mm256_set1_ps(EXP_HI),
        );
        let fx = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(LOG2E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(C1), x);
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(C2), r);
        let mut y = _mm256_set1_ps(P[0]);
        for &p in &P[1..] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(p));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(y, _mm256_castsi256_ps(e))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn erf(x: __m256) -> __m256 {
        let sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0));
        let a = _mm256_andnot_ps(_mm256_set1_ps(-0.0), x);
        let one = _mm256_set1_ps(1.0);
        let t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.327_591_1), a, one));
        let mut p = _mm256_set1_ps(1.061_405_4);
        for c in [-1.453_152_1f32, 1.421_413_7, -0.284_496_74, 0.254_829_6] {
            p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(c));
        }
        p = _mm256_mul_ps(p, t);
        // erf is 1 in f32 past a² = 30 either way; the clamp keeps exp clear of subnormals.
        let e = exp(_mm256_max_ps(
            _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)),
            _mm256_set1_ps(-30.0),
        ));
        let r = _mm256_fnmadd_ps(p, e, one);
        _mm256_or_ps(r, sign)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn act(act: Activation, x: __m256) -> __m256 {
        let half = _mm256_set1_ps(0.5);
        let one = _mm256_set1_ps(1.0);
        match act {
            Activation::None => x,
            Activation::Gelu => {
                let e = erf(_mm256_mul_ps(
                    x,
                    _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
                ));
                _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, e))
            }
            Activation::GeluTanh => {
                let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
                let u = _mm256_mul_ps(
                    _mm256_set1_ps(0.797_884_6),
                    _mm256_fmadd_ps(_mm256_set1_ps(0.044_715), x3, x),
                );
                // As in `act_scalar`: no subnormals out of exp.
                let u = _mm256_min_ps(
                    _mm256_max_ps(u, _mm256_set1_ps(-10.0)),
                    _mm256_set1_ps(10.0),
                );
                let e = exp(_mm256_add_ps(u, u));
                let two = _mm256_set1_ps(2.0);
                let th = _mm256_sub_ps(two, _mm256_div_ps(two, _mm256_add_ps(e, one)));
                _mm256_mul_ps(_mm256_mul_ps(half, x), th)
            }
            Activation::Silu => {
                let e = exp(_mm256_max_ps(
                    _mm256_sub_ps(_mm256_setzero_ps(), x),
                    _mm256_set1_ps(-30.0),
                ));
                _mm256_div_ps(x, _mm256_add_ps(one, e))
            }
            Activation::Relu => _mm256_max_ps(x, _mm256_setzero_ps()),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn activate(a: Activation, xs: &mut [f32]) {
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            let v = _mm256_loadu_ps(c.as_ptr());
            _mm256_storeu_ps(c.as_mut_ptr(), act(a, v));
        }
        for x in chunks.into_remainder() {
            *x = act_scalar(a, *x);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted_sum(xs: &mut [f32], shift: f32) -> f32 {
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            let v = exp(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), s));
            _mm256_storeu_ps(c.as_mut_ptr(), v);
            acc = _mm256_add_ps(acc, v);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut sum: f32 = lanes.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp_scalar(*x - shift);
            sum += *x;
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf64(x: f64) -> f64 {
        // Maclaurin series, converges well for |x| < 3.
        let mut sum = 0.0;
        let mut term = x;
        for n in 0..200 {
            sum += term / (2 * n + 1) as f64;
            term *= -x * x / (n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn exp_and_activations_match_f64() {
        let xs: Vec<f32> = (-700..=700).map(|i| i as f32 * 0.0123).collect();
        let mut e = xs.clone();
        let sum = exp_shifted_sum(&mut e, 0.0);
        let mut ref_sum = 0.0f64;
        for (x, y) in xs.iter().zip(&e) {
            let r = (*x as f64).exp();
            ref_sum += r;
            assert!(((*y as f64 - r) / r).abs() < 1e-6, "exp({x}) = {y} vs {r}");
        }
        assert!(((sum as f64 - ref_sum) / ref_sum).abs() < 1e-5);
        // Tolerance: absolute 2e-6 on values of order 1..4 (erf's 1.5e-7 error times |x|); the
        // f64 erf series is exact enough for |x| <= 4.2.
        let xs: Vec<f32> = (-700..=700).map(|i| i as f32 * 0.006).collect();
        for (act, f) in [
            (
                Activation::Gelu,
                (|x: f64| 0.5 * x * (1.0 + erf64(x / 2f64.sqrt()))) as fn(f64) -> f64,
            ),
            (Activation::GeluTanh, |x: f64| {
                0.5 * x * (1.0 + (0.797_884_560_802_865_4 * (x + 0.044715 * x * x * x)).tanh())
            }),
            (Activation::Silu, |x: f64| x / (1.0 + (-x).exp())),
            (Activation::Relu, |x: f64| x.max(0.0)),
        ] {
            let mut y = xs.clone();
            activate(act, &mut y);
            for (x, y) in xs.iter().zip(&y) {
                let r = f(*x as f64);
                assert!((*y as f64 - r).abs() < 2e-6, "{act:?}({x}) = {y} vs {r}");
            }
        }
        assert_eq!(max(&xs), 700.0 * 0.006);
    }
}
