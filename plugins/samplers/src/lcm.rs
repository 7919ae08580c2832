//! Latent consistency models' multistep sampling (Luo et al., "Latent Consistency Models",
//! 2023): diffusers' `LCMScheduler` (`schedulers/scheduling_lcm.py`).
//!
//! The timesteps are `n` of the distillation schedule's `original_inference_steps` (every
//! `num_train_timesteps / original_inference_steps`-th training timestep, counted from the
//! top), evenly picked. At timestep t, with ᾱ the training `alphas_cumprod` and `t'` the next
//! timestep,
//!
//! ```text
//! x̂₀ = prediction of x₀;   c_skip = σ_d²/((10t)² + σ_d²),  c_out = 10t/√((10t)² + σ_d²),  σ_d = 0.5
//! denoised = c_out·x̂₀ + c_skip·x;   x_next = √ᾱ_t'·denoised + √(1 − ᾱ_t')·ε   (denoised at the last step)
//! ```
//!
//! with fresh noise ε at every step but the last (10 is `timestep_scaling`). `clip_sample`
//! clamps x̂₀. The step's denoised estimate (for previews and guidance) is x̂₀.

use super::schedule::{self, BetaSchedule};
use super::{fail, value, PredictionType, Result, Scheduler, Step};

/// The fields of an `LCMScheduler` config, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct LcmConfig {
    /// Training timesteps (1000).
    pub num_train_timesteps: usize,
    /// First beta (0.00085).
    pub beta_start: f64,
    /// Last beta (0.012).
    pub beta_end: f64,
    /// Beta schedule (`scaled_linear`).
    pub beta_schedule: BetaSchedule,
    /// Betas given directly, replacing the schedule (none).
    pub trained_betas: Option<Vec<f64>>,
    /// The distillation schedule's length (50).
    pub original_inference_steps: usize,
    /// Clamp x̂₀ to `±clip_sample_range` (false).
    pub clip_sample: bool,
    /// See [`LcmConfig::clip_sample`] (1.0).
    pub clip_sample_range: f64,
    /// ᾱ past the last timestep is 1 (`true`) or ᾱ at timestep 0: unused, since the last step
    /// returns its denoised sample (as in diffusers).
    pub set_alpha_to_one: bool,
    /// What the model predicts (`epsilon`).
    pub prediction_type: PredictionType,
    /// Dynamic thresholding (not supported: must be false).
    pub thresholding: bool,
    /// The timestep's factor in the boundary condition (10).
    pub timestep_scaling: f64,
    /// Zero-terminal-SNR rescaling (not supported: must be false).
    pub rescale_betas_zero_snr: bool,
}

impl Default for LcmConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            original_inference_steps: 50,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            timestep_scaling: 10.0,
            rescale_betas_zero_snr: false,
        }
    }
}

impl LcmConfig {
    /// Sets the field named `key` (diffusers' name) from its text form. Returns `Ok(false)` for
    /// a key this config does not have, and an error for a bad value. `steps_offset`,
    /// `timestep_spacing` and the thresholding bounds are accepted and unused, as in diffusers.
    pub fn set(&mut self, key: &str, v: &str) -> Result<bool> {
        match key {
            "num_train_timesteps" => self.num_train_timesteps = value::count(key, v)?,
            "beta_start" => self.beta_start = value::float(key, v)?,
            "beta_end" => self.beta_end = value::float(key, v)?,
            "beta_schedule" => self.beta_schedule = value::parsed(v)?,
            "trained_betas" => self.trained_betas = value::opt_floats(key, v)?,
            "original_inference_steps" => self.original_inference_steps = value::count(key, v)?,
            "clip_sample" => self.clip_sample = value::boolean(key, v)?,
            "clip_sample_range" => self.clip_sample_range = value::float(key, v)?,
            "set_alpha_to_one" => self.set_alpha_to_one = value::boolean(key, v)?,
            "prediction_type" => self.prediction_type = value::parsed(v)?,
            "thresholding" => self.thresholding = value::boolean(key, v)?,
            "timestep_scaling" => self.timestep_scaling = value::float(key, v)?,
            "rescale_betas_zero_snr" => self.rescale_betas_zero_snr = value::boolean(key, v)?,
            "steps_offset"
            | "timestep_spacing"
            | "dynamic_thresholding_ratio"
            | "sample_max_value" => {}
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// A config from `(key, value)` text pairs over the defaults; unknown keys are ignored.
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self> {
        super::config_from_fields(fields, Self::set)
    }
}

/// `LCMScheduler` set up for a number of inference steps.
#[derive(Debug, Clone)]
pub struct Lcm {
    steps: Vec<Step>,
}

impl Lcm {
    /// Builds the scheduler for `num_inference_steps` steps (diffusers' `__init__` then
    /// `set_timesteps(num_inference_steps)`).
    pub fn new(config: LcmConfig, num_inference_steps: usize) -> Result<Self> {
        const CLASS: &str = "LCMScheduler";
        let c = &config;
        if c.thresholding || c.rescale_betas_zero_snr {
            fail!("{CLASS}: thresholding and rescale_betas_zero_snr are not supported");
        }
        if c.prediction_type == PredictionType::FlowPrediction {
            fail!("{CLASS}: prediction_type must be epsilon, sample or v_prediction");
        }
        let alphas_cumprod = schedule::alphas_cumprod(
            c.num_train_timesteps,
            c.beta_start,
            c.beta_end,
            c.beta_schedule,
            c.trained_betas.as_deref(),
        )?;
        let n_train = alphas_cumprod.len();
        let n = num_inference_steps;
        schedule::check_steps(n)?;
        let original = c.original_inference_steps;
        if original == 0 || original > n_train {
            fail!(
                "{CLASS}: original_inference_steps must be in 1..={n_train} (num_train_timesteps), \
                 got {original}"
            );
        }
        if n > original {
            fail!(
                "{CLASS}: {n} inference steps is more than original_inference_steps ({original}); \
                 the schedule is a subset of the distillation schedule"
            );
        }
        let k = n_train / original;
        // The distillation schedule, from the top: t = j·k − 1 for j = original..1.
        let origin: Vec<usize> = (1..=original).rev().map(|j| j * k - 1).collect();
        let timesteps: Vec<usize> = (0..n)
            .map(|i| origin[(i as f64 * origin.len() as f64 / n as f64).floor() as usize])
            .collect();
        let steps = timesteps
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let alpha = f64::from(alphas_cumprod[t]);
                let last = i + 1 == n;
                // The last step returns `denoised` (its ᾱ_t' is never used).
                let alpha_prev = timesteps
                    .get(i + 1)
                    .map_or(1.0, |&p| f64::from(alphas_cumprod[p]));
                let (sa, sb) = (alpha.sqrt(), (1.0 - alpha).sqrt());
                let (dx, d_o) = match c.prediction_type {
                    PredictionType::Epsilon => (1.0 / sa, -sb / sa),
                    PredictionType::VPrediction => (sa, -sb),
                    PredictionType::Sample | PredictionType::FlowPrediction => (0.0, 1.0),
                };
                let scaled = t as f64 * c.timestep_scaling;
                let sd2 = 0.25;
                let c_skip = sd2 / (scaled * scaled + sd2);
                let c_out = scaled / (scaled * scaled + sd2).sqrt();
                let (keep, noise) = if last {
                    (1.0, 0.0)
                } else {
                    (alpha_prev.sqrt(), (1.0 - alpha_prev).sqrt())
                };
                Step {
                    timestep: t as f64,
                    sigma: ((1.0 - alpha) / alpha).sqrt(),
                    input_scale: 1.0,
                    denoised_x: dx,
                    denoised_output: d_o,
                    denoised_clamp: c.clip_sample.then_some(c.clip_sample_range),
                    x_coeff: keep * c_skip,
                    output_coeff: 0.0,
                    denoised_terms: vec![(0, keep * c_out)],
                    corrector: None,
                    noise,
                }
            })
            .collect::<Vec<_>>();
        super::check_finite(CLASS, 1.0, &steps)?;
        Ok(Self { steps })
    }
}

impl Scheduler for Lcm {
    fn class_name(&self) -> &'static str {
        "LCMScheduler"
    }

    fn steps(&self) -> &[Step] {
        &self.steps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_are_picked_from_the_distillation_schedule() {
        let s = Lcm::new(LcmConfig::default(), 4).expect("a scheduler");
        assert_eq!(s.timesteps(), vec![999.0, 759.0, 499.0, 259.0]);
        assert!(s.steps()[..3].iter().all(|s| s.noise > 0.0));
        assert_eq!(s.steps()[3].noise, 0.0);
    }

    #[test]
    fn bad_step_counts_are_errors() {
        assert!(Lcm::new(LcmConfig::default(), 0).is_err());
        assert!(Lcm::new(LcmConfig::default(), 51).is_err());
        let c = LcmConfig {
            original_inference_steps: 2000,
            ..LcmConfig::default()
        };
        assert!(Lcm::new(c, 4).is_err());
    }
}
