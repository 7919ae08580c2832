//! The tables the schedulers share: the training noise schedule (betas, `alphas_cumprod`,
//! sigmas) computed as diffusers computes it, and ports of the few NumPy and PyTorch routines
//! whose exact rounding decides the timesteps (`linspace`, `arange`, `interp`, `round`) plus
//! diffusers' `_sigma_to_t` and Karras sigmas.
//!
//! diffusers builds the training schedule in float32 with PyTorch: `torch.linspace` (which
//! computes `start + step·i` with one fused multiply-add on the CPU), `1 - betas`, and
//! `torch.cumprod` (which accumulates in double and rounds each output to float32). The
//! functions here do the same, so the tables match bit for bit.

use super::{fail, Result, SamplerError};
use std::str::FromStr;

/// Where a schedule's sigmas come from.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum SigmaSource {
    /// The pipelines' default: `linspace(1, 1/N, N)` for the flow schedulers, as the Flux-style
    /// pipelines pass them; the scheduler's own spacing for the others.
    #[default]
    Pipeline,
    /// None passed (the SD3 pipeline): the flow scheduler spaces the timesteps evenly between its
    /// own training schedule's ends.
    SchedulerDefault,
    /// These sigmas (`set_timesteps(sigmas=...)`): for the flow schedulers the unshifted sigmas,
    /// one per step; for `EulerDiscreteScheduler` its σ, one per step and optionally the final
    /// one (else `final_sigmas_type`'s).
    Custom(Vec<f64>),
}

/// The training beta schedule (diffusers' `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BetaSchedule {
    /// `"linear"`: betas evenly from `beta_start` to `beta_end`.
    #[default]
    Linear,
    /// `"scaled_linear"`: square roots of the betas evenly spaced (Stable Diffusion).
    ScaledLinear,
    /// `"squaredcos_cap_v2"`: the cosine schedule of Nichol & Dhariwal, betas capped at 0.999.
    SquaredcosCapV2,
}

impl FromStr for BetaSchedule {
    type Err = SamplerError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "linear" => Self::Linear,
            "scaled_linear" => Self::ScaledLinear,
            "squaredcos_cap_v2" => Self::SquaredcosCapV2,
            _ => fail!(
                "unknown beta_schedule {s:?}; expected linear, scaled_linear or squaredcos_cap_v2"
            ),
        })
    }
}

/// The largest number of training timesteps accepted (far above any real model's 1000; it only
/// bounds the tables' memory).
pub const MAX_TRAIN_TIMESTEPS: usize = 1 << 20;

/// The largest number of inference steps accepted (it bounds the steps' memory).
pub const MAX_STEPS: usize = 1 << 16;

/// `torch.linspace(start, end, steps, dtype=torch.float32)` as PyTorch's CPU kernel computes it:
/// the first half as `start + step·i`, the second half as `end − step·(steps−1−i)`, each with one
/// fused multiply-add in float32.
pub fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// The betas of diffusers' `betas_for_alpha_bar` with the cosine transform ("squaredcos_cap_v2"):
/// computed in f64, stored in float32.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
        c * c
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// The training schedule's `alphas_cumprod`, in float32 as diffusers stores it.
///
/// `trained_betas`, when given, replaces the schedule (diffusers' `trained_betas`); it must have
/// `num_train_timesteps` values.
pub fn alphas_cumprod(
    num_train_timesteps: usize,
    beta_start: f64,
    beta_end: f64,
    beta_schedule: BetaSchedule,
    trained_betas: Option<&[f64]>,
) -> Result<Vec<f32>> {
    let betas: Vec<f32> = match trained_betas {
        Some(b) => {
            check_train_timesteps(b.len())?;
            if b.len() != num_train_timesteps {
                fail!(
                    "trained_betas has {} values but num_train_timesteps is {num_train_timesteps}",
                    b.len()
                );
            }
            b.iter().map(|&b| b as f32).collect()
        }
        None => {
            check_train_timesteps(num_train_timesteps)?;
            if !beta_start.is_finite() || !beta_end.is_finite() {
                fail!("beta_start and beta_end must be finite (got {beta_start}, {beta_end})");
            }
            match beta_schedule {
                BetaSchedule::Linear => {
                    torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
                }
                BetaSchedule::ScaledLinear => {
                    if beta_start < 0.0 || beta_end < 0.0 {
                        fail!("scaled_linear needs beta_start, beta_end >= 0");
                    }
                    torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                BetaSchedule::SquaredcosCapV2 => cosine_betas(num_train_timesteps),
            }
        }
    };
    if let Some(b) = betas.iter().find(|b| !(0.0..1.0).contains(*b)) {
        fail!("every beta must be in [0, 1); got {b}");
    }
    let mut acc = 1.0f64;
    let cumprod: Vec<f32> = betas
        .iter()
        .map(|&b| {
            acc *= f64::from(1.0f32 - b);
            acc as f32
        })
        .collect();
    if cumprod.iter().any(|&a| a <= 0.0) {
        fail!("the betas make alphas_cumprod underflow to 0; the schedule is unusable");
    }
    Ok(cumprod)
}

/// Checks `num_train_timesteps` is usable.
pub fn check_train_timesteps(n: usize) -> Result<()> {
    if n == 0 || n > MAX_TRAIN_TIMESTEPS {
        fail!("num_train_timesteps must be in 1..={MAX_TRAIN_TIMESTEPS}, got {n}");
    }
    Ok(())
}

/// Checks the number of inference steps is at least 1.
pub fn check_steps(n: usize) -> Result<()> {
    if n == 0 {
        fail!("the number of inference steps must be at least 1");
    }
    if n > MAX_STEPS {
        fail!("{n} inference steps is more than this library accepts ({MAX_STEPS})");
    }
    Ok(())
}

/// The training sigmas `((1 − ᾱ) / ᾱ)^½`, computed in float32 as diffusers does.
pub fn sigmas_f32(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0f32 - a) / a).sqrt())
        .collect()
}

/// `np.log` of a float32 array (float32 results).
pub fn log_f32(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| (f64::from(v).ln()) as f32).collect()
}

/// `np.round`: halves to even.
pub fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.linspace(start, stop, num)` in f64: `start + i·step`, the last value exactly `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut y: Vec<f64> = (0..num)
        .map(|i| {
            if step == 0.0 {
                i as f64 / div * delta + start
            } else {
                i as f64 * step + start
            }
        })
        .collect();
    if let Some(last) = y.last_mut() {
        *last = stop;
    }
    y
}

/// `np.arange(start, stop, step)` for floats: `ceil((stop − start) / step)` values, the second one
/// `start + step` and the others `start + i·((start + step) − start)`, as NumPy fills them.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Result<Vec<f64>> {
    if step == 0.0 || !step.is_finite() {
        fail!("arange: the step must be finite and non-zero, got {step}");
    }
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Ok(Vec::new());
    }
    if len > MAX_TRAIN_TIMESTEPS as f64 {
        fail!("arange: {len} values is too many");
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    Ok((0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect())
}

/// `np.interp(x, np.arange(len(fp)), fp)`: linear interpolation in a float32 table at integer
/// abscissae, computed in f64 as NumPy does; clamped to the ends.
pub fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let Some(&last) = fp.last() else {
        return f64::NAN;
    };
    let n = fp.len();
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= (n - 1) as f64 {
        return f64::from(last);
    }
    let j = x.floor() as usize;
    let xj = j as f64;
    let (y0, y1) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    if x == xj {
        return y0;
    }
    let slope = (y1 - y0) / 1.0;
    slope * (x - xj) + y0
}

/// diffusers' `_sigma_to_t`: the (fractional) training timestep of `sigma`, by linear
/// interpolation of `log σ` in the float32 table `log_sigmas` (ascending with the timestep).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // diffusers takes the argmax of the cumulative count of `log_sigma - log_sigmas >= 0`: the
    // last index where it holds, or 0 when it holds nowhere; then at most n-2. The table is
    // sorted (sigmas grow with the timestep), so the indices where it holds are a prefix.
    let count = log_sigmas.partition_point(|&ls| log_sigma - f64::from(ls) >= 0.0);
    let low = count.saturating_sub(1).min(n - 2);
    let high = low + 1;
    let (lo, hi) = (f64::from(log_sigmas[low]), f64::from(log_sigmas[high]));
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// Karras et al. (2022) sigmas: `n` values from `sigma_max` down to `sigma_min`, evenly spaced
/// in `σ^(1/ρ)` with ρ = 7 (diffusers' `_convert_to_karras`).
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// Exponential sigmas: `n` values from `sigma_max` down to `sigma_min`, evenly spaced in log σ
/// (diffusers' `_convert_to_exponential`).
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// Beta sigmas ("Beta Sampling is All You Need", Lee et al. 2024; diffusers' `_convert_to_beta`
/// with α = β = 0.6): `sigma_min + ppf(1 − u)·(sigma_max − sigma_min)` for `n` values of `u`
/// evenly in [0, 1], `ppf` the inverse CDF of the Beta(α, β) distribution (scipy's
/// `beta.ppf`).
pub fn beta_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    const ALPHA: f64 = 0.6;
    const BETA: f64 = 0.6;
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|u| sigma_min + beta_ppf(1.0 - u, ALPHA, BETA) * (sigma_max - sigma_min))
        .collect()
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, nine terms: about 1e-15 relative).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1 − x) = π / sin(πx).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + G + 0.5;
    let sum = C[1..]
        .iter()
        .enumerate()
        .fold(C[0], |acc, (i, c)| acc + c / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// The regularized incomplete beta function I_x(a, b), by its continued fraction (modified
/// Lentz), on the side of the symmetry where it converges fast.
fn incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - incomplete_beta(1.0 - x, b, a);
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp() / a;
    let tiny = 1e-300;
    let (mut c, mut d) = (1.0f64, 1.0 - (a + b) * x / (a + 1.0));
    d = if d.abs() < tiny { tiny } else { d };
    d = 1.0 / d;
    let mut f = d;
    for m in 1..500 {
        let m = m as f64;
        for numerator in [
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
        ] {
            d = 1.0 + numerator * d;
            d = if d.abs() < tiny { tiny } else { d };
            c = 1.0 + numerator / c;
            c = if c.abs() < tiny { tiny } else { c };
            d = 1.0 / d;
            f *= c * d;
        }
        if (c * d - 1.0).abs() < 1e-16 {
            break;
        }
    }
    front * f
}

/// The inverse CDF of Beta(a, b) at `q` in [0, 1], by bisection on [`incomplete_beta`] to the
/// last bits of f64.
fn beta_ppf(q: f64, a: f64, b: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if incomplete_beta(mid, a, b) < q {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The discrete timesteps of `DDIMScheduler` and `EulerDiscreteScheduler` for `steps` inference
/// steps, as f64 (before each scheduler's own cast). `linspace` values are not rounded here.
pub fn spaced_timesteps(
    spacing: super::TimestepSpacing,
    num_train_timesteps: usize,
    steps: usize,
    steps_offset: i64,
    round_linspace: bool,
) -> Result<Vec<f64>> {
    use super::TimestepSpacing as S;
    check_steps(steps)?;
    let n_train = num_train_timesteps as f64;
    Ok(match spacing {
        S::Linspace => {
            let t = np_linspace(0.0, n_train - 1.0, steps);
            let t = t.into_iter().rev();
            if round_linspace {
                t.map(round_half_even).collect()
            } else {
                t.collect()
            }
        }
        S::Leading => {
            let ratio = num_train_timesteps / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio) as f64 + steps_offset as f64)
                .collect()
        }
        S::Trailing => {
            let ratio = n_train / steps as f64;
            np_arange(n_train, 0.0, -ratio)?
                .into_iter()
                .map(|t| round_half_even(t) - 1.0)
                .collect()
        }
    })
}

/// The discrete timesteps of the multistep solvers (`DPMSolverMultistepScheduler`,
/// `UniPCMultistepScheduler`) for `steps` inference steps, over training timesteps
/// `0..last_timestep` (fewer than `num_train_timesteps` when DPM-Solver clips λ): `linspace`
/// over `steps + 1` points with the last dropped, `leading` multiples of
/// `last_timestep / (steps + 1)`, `trailing` counted back from `last_timestep`.
pub fn multistep_timesteps(
    spacing: super::TimestepSpacing,
    last_timestep: usize,
    num_train_timesteps: usize,
    steps: usize,
    steps_offset: i64,
) -> Result<Vec<f64>> {
    use super::TimestepSpacing as S;
    Ok(match spacing {
        S::Linspace => np_linspace(0.0, last_timestep as f64 - 1.0, steps + 1)
            .into_iter()
            .rev()
            .take(steps)
            .map(round_half_even)
            .collect(),
        S::Leading => {
            let ratio = last_timestep / (steps + 1);
            (1..=steps)
                .rev()
                .map(|i| (i * ratio) as f64 + steps_offset as f64)
                .collect()
        }
        S::Trailing => {
            let ratio = num_train_timesteps as f64 / steps as f64;
            np_arange(last_timestep as f64, 0.0, -ratio)?
                .into_iter()
                .map(|t| round_half_even(t) - 1.0)
                .collect()
        }
    })
}

/// A multistep solver's view of one sigma: the scales α_t and σ_t and λ = ln α_t − ln σ_t
/// (flow sigmas: `α = 1 − σ`, `σ_t = σ`; otherwise `α = 1/√(σ² + 1)`, `σ_t = σ·α`), from the
/// float32 sigma as diffusers keeps it.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub sigma: f64,
    pub alpha_t: f64,
    pub sigma_t: f64,
    pub lambda: f64,
}

/// The [`Point`] of `sigma`.
pub fn point(flow: bool, sigma: f32) -> Point {
    let sigma = f64::from(sigma);
    let (alpha_t, sigma_t) = if flow {
        (1.0 - sigma, sigma)
    } else {
        let a = 1.0 / (sigma * sigma + 1.0).sqrt();
        (a, sigma * a)
    };
    Point {
        sigma,
        alpha_t,
        sigma_t,
        lambda: alpha_t.ln() - sigma_t.ln(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_and_arange_follow_numpy() {
        assert_eq!(np_linspace(0.0, 1.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 1.0, 3), vec![0.0, 0.5, 1.0]);
        let a = np_arange(1000.0, 0.0, -1000.0 / 3.0).unwrap_or_default();
        assert_eq!(a.len(), 3);
        assert!(np_arange(0.0, 1.0, 0.0).is_err());
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
    }

    #[test]
    fn the_beta_distribution_s_inverse_cdf_matches_known_values() {
        // Beta(1, 1) is uniform; Beta(2, 2)'s CDF is 3x² − 2x³; Beta(0.6, 0.6) is symmetric, and
        // scipy.stats.beta.ppf(0.25, 0.6, 0.6) = 0.17568037865269498 (tolerance 1e-12).
        assert!((beta_ppf(0.3, 1.0, 1.0) - 0.3).abs() < 1e-12);
        let x = beta_ppf(0.7, 2.0, 2.0);
        assert!((3.0 * x * x - 2.0 * x * x * x - 0.7).abs() < 1e-12);
        assert!((beta_ppf(0.5, 0.6, 0.6) - 0.5).abs() < 1e-12);
        let (a, b) = (beta_ppf(0.25, 0.6, 0.6), beta_ppf(0.75, 0.6, 0.6));
        assert!((a - 0.175_680_378_652_694_98).abs() < 1e-12, "{a}");
        assert!((a + b - 1.0).abs() < 1e-12);
        assert!((incomplete_beta(a, 0.6, 0.6) - 0.25).abs() < 1e-12);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-13);
    }

    #[test]
    fn interp_is_exact_at_integers_and_clamped() {
        let fp = [1.0f32, 2.0, 4.0];
        assert_eq!(np_interp(1.0, &fp), 2.0);
        assert_eq!(np_interp(1.5, &fp), 3.0);
        assert_eq!(np_interp(-3.0, &fp), 1.0);
        assert_eq!(np_interp(9.0, &fp), 4.0);
    }

    #[test]
    fn bad_schedules_are_errors() {
        assert!(alphas_cumprod(0, 1e-4, 0.02, BetaSchedule::Linear, None).is_err());
        assert!(alphas_cumprod(10, 0.5, 1.5, BetaSchedule::Linear, None).is_err());
        assert!(alphas_cumprod(10, f64::NAN, 0.02, BetaSchedule::Linear, None).is_err());
        assert!(alphas_cumprod(10, 0.0, 0.0, BetaSchedule::Linear, Some(&[])).is_err());
        assert!(alphas_cumprod(3, 0.0, 0.0, BetaSchedule::Linear, Some(&[0.1, 0.2])).is_err());
        let ok = alphas_cumprod(2, 0.0, 0.0, BetaSchedule::Linear, Some(&[0.5, 0.5]));
        assert_eq!(ok, Ok(vec![0.5, 0.25]));
        assert!("cosine".parse::<BetaSchedule>().is_err());
    }
}
