//! Euler sampling of a rectified-flow / flow-matching model (SD3, Flux, ...): diffusers'
//! `FlowMatchEulerDiscreteScheduler` (`schedulers/scheduling_flow_match_euler_discrete.py`),
//! deterministic.
//!
//! The sample at noise level σ is `x = (1 − σ)·x₀ + σ·ε`, the model predicts the velocity
//! `v = ε − x₀`, timesteps are `σ · num_train_timesteps`, and one step is
//! `x_next = x + (σ_next − σ)·v`, with a final σ of 0.
//!
//! Sigmas: the pipelines pass `linspace(1, 1/N, N)` (Flux, [`SigmaSource::Pipeline`]); SD3 passes
//! none and the scheduler spaces them itself ([`SigmaSource::SchedulerDefault`]). They are then
//! shifted, statically (`σ' = s·σ / (1 + (s − 1)·σ)`) or, with `use_dynamic_shifting`, by
//! `mu` (exponential: `σ' = e^μ / (e^μ + (1/σ − 1))`; linear: `μ / (μ + (1/σ − 1))`); Flux's `mu`
//! comes from the image's sequence length ([`calculate_shift`]). diffusers does that shifting on
//! float32 NumPy arrays when the sigmas are given, so it is done in float32 here too (each
//! operation rounded to float32), and the sigmas match bit for bit.

use super::schedule::{self, SigmaSource};
use super::{fail, value, Result, Scheduler, Step};
use std::str::FromStr;

/// The form of the dynamic shift (diffusers' `time_shift_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeShiftType {
    /// `"exponential"`: `e^μ / (e^μ + (1/σ − 1))`.
    #[default]
    Exponential,
    /// `"linear"`: `μ / (μ + (1/σ − 1))`.
    Linear,
}

impl FromStr for TimeShiftType {
    type Err = super::SamplerError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "exponential" => Self::Exponential,
            "linear" => Self::Linear,
            _ => fail!("unknown time_shift_type {s:?}; expected exponential or linear"),
        })
    }
}

/// The fields of a `FlowMatchEulerDiscreteScheduler` config, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowMatchEulerDiscreteConfig {
    /// Training timesteps (1000).
    pub num_train_timesteps: usize,
    /// The static shift (1.0).
    pub shift: f64,
    /// Shift by `mu` given at set-up instead (false).
    pub use_dynamic_shifting: bool,
    /// `mu` at `base_image_seq_len` (0.5).
    pub base_shift: Option<f64>,
    /// `mu` at `max_image_seq_len` (1.15).
    pub max_shift: Option<f64>,
    /// (256).
    pub base_image_seq_len: usize,
    /// (4096).
    pub max_image_seq_len: usize,
    /// Inverted sigmas (not supported: must be false).
    pub invert_sigmas: bool,
    /// Stretch the shifted sigmas so the last one is this (none).
    pub shift_terminal: Option<f64>,
    /// Karras sigmas (not supported: must be false).
    pub use_karras_sigmas: bool,
    /// Exponential sigmas (not supported: must be false).
    pub use_exponential_sigmas: bool,
    /// Beta-distribution sigmas (not supported: must be false).
    pub use_beta_sigmas: bool,
    /// The dynamic shift's form (`exponential`).
    pub time_shift_type: TimeShiftType,
    /// Stochastic sampling (not supported: must be false).
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchEulerDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: Some(0.5),
            max_shift: Some(1.15),
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            time_shift_type: TimeShiftType::Exponential,
            stochastic_sampling: false,
        }
    }
}

impl FlowMatchEulerDiscreteConfig {
    /// Sets the field named `key` (diffusers' name) from its text form. Returns `Ok(false)` for
    /// a key this config does not have, and an error for a bad value.
    pub fn set(&mut self, key: &str, v: &str) -> Result<bool> {
        match key {
            "num_train_timesteps" => self.num_train_timesteps = value::count(key, v)?,
            "shift" => self.shift = value::float(key, v)?,
            "use_dynamic_shifting" => self.use_dynamic_shifting = value::boolean(key, v)?,
            "base_shift" => self.base_shift = value::opt_float(key, v)?,
            "max_shift" => self.max_shift = value::opt_float(key, v)?,
            "base_image_seq_len" => self.base_image_seq_len = value::count(key, v)?,
            "max_image_seq_len" => self.max_image_seq_len = value::count(key, v)?,
            "invert_sigmas" => self.invert_sigmas = value::boolean(key, v)?,
            "shift_terminal" => self.shift_terminal = value::opt_float(key, v)?,
            "use_karras_sigmas" => self.use_karras_sigmas = value::boolean(key, v)?,
            "use_exponential_sigmas" => self.use_exponential_sigmas = value::boolean(key, v)?,
            "use_beta_sigmas" => self.use_beta_sigmas = value::boolean(key, v)?,
            "time_shift_type" => self.time_shift_type = value::parsed(v)?,
            "stochastic_sampling" => self.stochastic_sampling = value::boolean(key, v)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// A config from `(key, value)` text pairs over the defaults; unknown keys are ignored.
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self> {
        super::config_from_fields(fields, Self::set)
    }

    /// Flux's `mu` for an image of `image_seq_len` latent tokens, from this config's
    /// `base/max_image_seq_len` and `base/max_shift` (0.5 and 1.15 when unset, as the Flux
    /// pipeline reads them).
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        calculate_shift(
            image_seq_len,
            self.base_image_seq_len,
            self.max_image_seq_len,
            self.base_shift.unwrap_or(0.5),
            self.max_shift.unwrap_or(1.15),
        )
    }
}

/// Flux's `calculate_shift`: `mu` linear in the image sequence length, `base_shift` at
/// `base_seq_len` and `max_shift` at `max_seq_len` (Flux: 256, 4096, 0.5, 1.15).
pub fn calculate_shift(
    image_seq_len: usize,
    base_seq_len: usize,
    max_seq_len: usize,
    base_shift: f64,
    max_shift: f64,
) -> f64 {
    let m = (max_shift - base_shift) / (max_seq_len as f64 - base_seq_len as f64);
    let b = base_shift - m * base_seq_len as f64;
    image_seq_len as f64 * m + b
}

/// `FlowMatchEulerDiscreteScheduler` set up for a number of inference steps.
#[derive(Debug, Clone)]
pub struct FlowMatchEulerDiscrete {
    config: FlowMatchEulerDiscreteConfig,
    sigmas: Vec<f32>,
    steps: Vec<Step>,
}

/// Rounds to float32 (float32 arithmetic done in f64, one rounding per operation, is exactly
/// float32 arithmetic for +, −, ×, ÷).
fn f32r(x: f64) -> f64 {
    f64::from(x as f32)
}

fn f64r(x: f64) -> f64 {
    x
}

impl FlowMatchEulerDiscrete {
    /// Builds the scheduler for `num_inference_steps` steps (diffusers' `__init__` then
    /// `set_timesteps(num_inference_steps, sigmas=..., mu=mu)`). `mu` is needed with
    /// `use_dynamic_shifting` (see [`FlowMatchEulerDiscreteConfig::mu`]) and ignored without.
    pub fn new(
        config: FlowMatchEulerDiscreteConfig,
        num_inference_steps: usize,
        sigmas: SigmaSource,
        mu: Option<f64>,
    ) -> Result<Self> {
        let c = &config;
        if c.invert_sigmas {
            fail!("FlowMatchEulerDiscreteScheduler: invert_sigmas is not supported");
        }
        if c.use_karras_sigmas || c.use_exponential_sigmas || c.use_beta_sigmas {
            fail!("FlowMatchEulerDiscreteScheduler: Karras, exponential and beta sigmas are not supported");
        }
        if c.stochastic_sampling {
            fail!("FlowMatchEulerDiscreteScheduler: stochastic_sampling is not supported");
        }
        if !c.shift.is_finite() || c.shift <= 0.0 {
            fail!(
                "FlowMatchEulerDiscreteScheduler: shift must be > 0, got {}",
                c.shift
            );
        }
        if c.shift_terminal.is_some_and(|s| !s.is_finite() || s >= 1.0) {
            fail!("FlowMatchEulerDiscreteScheduler: shift_terminal must be finite and < 1");
        }
        schedule::check_train_timesteps(c.num_train_timesteps)?;
        schedule::check_steps(num_inference_steps)?;
        let mu = match (c.use_dynamic_shifting, mu) {
            (true, None) => {
                fail!("FlowMatchEulerDiscreteScheduler: mu must be given when use_dynamic_shifting is set")
            }
            (true, Some(mu)) if !mu.is_finite() => {
                fail!("FlowMatchEulerDiscreteScheduler: mu must be finite, got {mu}")
            }
            (_, mu) => mu.unwrap_or(0.0),
        };
        let n_train = c.num_train_timesteps as f64;
        let shift = |s: f64, q: fn(f64) -> f64| -> f64 {
            if c.use_dynamic_shifting {
                let m = match c.time_shift_type {
                    TimeShiftType::Exponential => q(mu.exp()),
                    TimeShiftType::Linear => q(mu),
                };
                q(m / q(m + q(q(1.0 / s) - 1.0)))
            } else {
                q(q(q(c.shift) * s) / q(1.0 + q(q(c.shift - 1.0) * s)))
            }
        };
        // (unshifted sigmas, the rounding of the arithmetic that shifts them)
        let (raw, q): (Vec<f64>, fn(f64) -> f64) = match sigmas {
            SigmaSource::Pipeline => (
                schedule::np_linspace(1.0, 1.0 / num_inference_steps as f64, num_inference_steps)
                    .into_iter()
                    .map(f32r)
                    .collect(),
                f32r,
            ),
            SigmaSource::Custom(s) => {
                if s.len() != num_inference_steps {
                    fail!(
                        "FlowMatchEulerDiscreteScheduler: {} sigmas given for {num_inference_steps} steps",
                        s.len()
                    );
                }
                (s.into_iter().map(f32r).collect(), f32r)
            }
            SigmaSource::SchedulerDefault => {
                // The training schedule's ends, as `__init__` computes them in float32: the
                // sigmas t/N for t = N..1, statically shifted unless the shift is dynamic.
                let init = |s: f64| {
                    if c.use_dynamic_shifting {
                        s
                    } else {
                        let k = f32r(c.shift);
                        f32r(f32r(k * s) / f32r(1.0 + f32r(f32r(c.shift - 1.0) * s)))
                    }
                };
                let sigma_max = init(1.0);
                let sigma_min = init(f32r(1.0 / n_train));
                let t = schedule::np_linspace(
                    sigma_max * n_train,
                    sigma_min * n_train,
                    num_inference_steps,
                );
                (t.into_iter().map(|t| t / n_train).collect(), f64r)
            }
        };
        let mut shifted: Vec<f64> = raw.iter().map(|&s| shift(s, q)).collect();
        if let Some(terminal) = c.shift_terminal {
            if terminal != 0.0 {
                let Some(&last) = shifted.last() else {
                    fail!("FlowMatchEulerDiscreteScheduler: no sigmas");
                };
                let scale = q(q(1.0 - last) / q(1.0 - terminal));
                shifted = shifted
                    .iter()
                    .map(|&s| q(1.0 - q(q(1.0 - s) / scale)))
                    .collect();
            }
        }
        let sigmas: Vec<f32> = shifted
            .iter()
            .map(|&s| s as f32)
            .chain(std::iter::once(0.0f32))
            .collect();
        let steps: Vec<Step> = sigmas
            .windows(2)
            .map(|w| {
                let (s, s_next) = (f64::from(w[0]), f64::from(w[1]));
                Step {
                    timestep: f64::from(w[0] * c.num_train_timesteps as f32),
                    sigma: s,
                    input_scale: 1.0,
                    denoised_x: 1.0,
                    denoised_output: -s,
                    denoised_clamp: None,
                    x_coeff: 1.0,
                    output_coeff: s_next - s,
                    denoised_terms: Vec::new(),
                    corrector: None,
                    noise: 0.0,
                }
            })
            .collect();
        super::check_finite("FlowMatchEulerDiscreteScheduler", 1.0, &steps)?;
        Ok(Self {
            config,
            sigmas,
            steps,
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &FlowMatchEulerDiscreteConfig {
        &self.config
    }
}

impl Scheduler for FlowMatchEulerDiscrete {
    fn class_name(&self) -> &'static str {
        "FlowMatchEulerDiscreteScheduler"
    }

    fn steps(&self) -> &[Step] {
        &self.steps
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.sigmas.iter().map(|&s| f64::from(s)).collect())
    }

    /// Flow-matching pipelines start from unscaled noise.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn noising(&self) -> crate::Noising {
        crate::Noising::Flow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flux_mu_at_the_ends() {
        let c = FlowMatchEulerDiscreteConfig::default();
        assert!((c.mu(256) - 0.5).abs() < 1e-12);
        assert!((c.mu(4096) - 1.15).abs() < 1e-12);
    }

    #[test]
    fn shift_one_keeps_the_linspace() {
        let s = FlowMatchEulerDiscrete::new(Default::default(), 4, SigmaSource::Pipeline, None);
        let s = s.ok().and_then(|s| s.sigmas()).unwrap_or_default();
        assert_eq!(s, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
    }

    #[test]
    fn bad_set_ups_are_errors() {
        let dynamic = FlowMatchEulerDiscreteConfig {
            use_dynamic_shifting: true,
            ..Default::default()
        };
        assert!(FlowMatchEulerDiscrete::new(dynamic, 4, SigmaSource::Pipeline, None).is_err());
        let c = FlowMatchEulerDiscreteConfig::default();
        assert!(FlowMatchEulerDiscrete::new(c.clone(), 0, SigmaSource::Pipeline, None).is_err());
        let custom = SigmaSource::Custom(vec![1.0, 0.5]);
        assert!(FlowMatchEulerDiscrete::new(c.clone(), 3, custom, None).is_err());
        let bad = FlowMatchEulerDiscreteConfig {
            shift: 0.0,
            ..c.clone()
        };
        assert!(FlowMatchEulerDiscrete::new(bad, 4, SigmaSource::Pipeline, None).is_err());
        for k in ["invert_sigmas", "use_karras_sigmas", "stochastic_sampling"] {
            let mut c = c.clone();
            assert_eq!(c.set(k, "true"), Ok(true));
            assert!(FlowMatchEulerDiscrete::new(c, 4, SigmaSource::Pipeline, None).is_err());
        }
    }
}
