//! DDIM (Song et al., "Denoising Diffusion Implicit Models"), deterministic (`eta = 0`): diffusers'
//! `DDIMScheduler` (`schedulers/scheduling_ddim.py`).
//!
//! With ᾱ_t the training `alphas_cumprod` at timestep `t` and `t' = t − num_train_timesteps /
//! steps` (integer division, as diffusers does for every spacing), one step is
//!
//! ```text
//! x̂₀ = prediction of x₀ from x and the model output;   ε̂ = prediction of the noise
//! x_next = √ᾱ_t' · x̂₀ + √(1 − ᾱ_t') · ε̂                (ᾱ_t' = final_alpha_cumprod when t' < 0)
//! ```
//!
//! `clip_sample` clamps x̂₀ to `±clip_sample_range` (as [`Step::denoised_clamp`]); the noise
//! estimate is the unclipped one (diffusers' `use_clipped_model_output = False`).

use super::schedule::{self, BetaSchedule};
use super::{fail, value, PredictionType, Result, Scheduler, Step, TimestepSpacing};

/// The fields of a `DDIMScheduler` config, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct DdimConfig {
    /// Training timesteps (1000).
    pub num_train_timesteps: usize,
    /// First beta (0.0001).
    pub beta_start: f64,
    /// Last beta (0.02).
    pub beta_end: f64,
    /// Beta schedule (`linear`).
    pub beta_schedule: BetaSchedule,
    /// Betas given directly, replacing the schedule (none).
    pub trained_betas: Option<Vec<f64>>,
    /// Clamp the x₀ estimate to `±clip_sample_range` (`true` in diffusers' defaults; the Stable
    /// Diffusion configs set it to `false`).
    pub clip_sample: bool,
    /// The clamp's bound (1.0).
    pub clip_sample_range: f64,
    /// The final step's "previous" ᾱ is 1 (`true`) or ᾱ at timestep 0 (`false`).
    pub set_alpha_to_one: bool,
    /// Added to `leading` timesteps (0).
    pub steps_offset: i64,
    /// What the model predicts (`epsilon`).
    pub prediction_type: PredictionType,
    /// Dynamic thresholding (not supported: must be `false`).
    pub thresholding: bool,
    /// Timestep spacing (`leading`).
    pub timestep_spacing: TimestepSpacing,
    /// Zero-terminal-SNR rescaling (not supported: must be `false`).
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DdimConfig {
    /// Sets the field named `key` (diffusers' name) from its text form (`scheduler_config.json`
    /// value or the like). Returns `Ok(false)` for a key this config does not have (diffusers
    /// ignores those too), and an error for a bad value.
    pub fn set(&mut self, key: &str, v: &str) -> Result<bool> {
        match key {
            "num_train_timesteps" => self.num_train_timesteps = value::count(key, v)?,
            "beta_start" => self.beta_start = value::float(key, v)?,
            "beta_end" => self.beta_end = value::float(key, v)?,
            "beta_schedule" => self.beta_schedule = value::parsed(v)?,
            "trained_betas" => self.trained_betas = value::opt_floats(key, v)?,
            "clip_sample" => self.clip_sample = value::boolean(key, v)?,
            "clip_sample_range" => self.clip_sample_range = value::float(key, v)?,
            "set_alpha_to_one" => self.set_alpha_to_one = value::boolean(key, v)?,
            "steps_offset" => self.steps_offset = value::int(key, v)?,
            "prediction_type" => self.prediction_type = value::parsed(v)?,
            "thresholding" => self.thresholding = value::boolean(key, v)?,
            "timestep_spacing" => self.timestep_spacing = value::parsed(v)?,
            "rescale_betas_zero_snr" => self.rescale_betas_zero_snr = value::boolean(key, v)?,
            // Only used with thresholding.
            "dynamic_thresholding_ratio" | "sample_max_value" => {}
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// A config from `(key, value)` text pairs over the defaults; unknown keys are ignored.
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self> {
        super::config_from_fields(fields, Self::set)
    }

    /// The training `alphas_cumprod` (float32) for `class` run for `steps` steps, once the
    /// options this module does not support and the step count are checked.
    fn checked_alphas(&self, class: &str, steps: usize) -> Result<Vec<f32>> {
        if self.thresholding {
            fail!("{class}: thresholding is not supported");
        }
        if self.rescale_betas_zero_snr {
            fail!("{class}: rescale_betas_zero_snr is not supported");
        }
        if self.prediction_type == PredictionType::FlowPrediction {
            fail!("{class}: prediction_type must be epsilon, sample or v_prediction");
        }
        if self.clip_sample && (self.clip_sample_range.is_nan() || self.clip_sample_range < 0.0) {
            fail!("{class}: clip_sample_range must be >= 0");
        }
        let alphas_cumprod = schedule::alphas_cumprod(
            self.num_train_timesteps,
            self.beta_start,
            self.beta_end,
            self.beta_schedule,
            self.trained_betas.as_deref(),
        )?;
        let n_train = alphas_cumprod.len();
        schedule::check_steps(steps)?;
        if steps > n_train {
            fail!("{class}: {steps} inference steps is more than num_train_timesteps ({n_train})");
        }
        Ok(alphas_cumprod)
    }
}

/// `DDIMScheduler` set up for a number of inference steps.
#[derive(Debug, Clone)]
pub struct Ddim {
    config: DdimConfig,
    alphas_cumprod: Vec<f32>,
    steps: Vec<Step>,
}

impl Ddim {
    /// Builds the scheduler for `num_inference_steps` steps (diffusers' `__init__` then
    /// `set_timesteps`).
    pub fn new(config: DdimConfig, num_inference_steps: usize) -> Result<Self> {
        let alphas_cumprod = config.checked_alphas("DDIMScheduler", num_inference_steps)?;
        let n_train = alphas_cumprod.len();
        let timesteps = schedule::spaced_timesteps(
            config.timestep_spacing,
            n_train,
            num_inference_steps,
            config.steps_offset,
            true,
        )?;
        let final_alpha = if config.set_alpha_to_one {
            1.0
        } else {
            f64::from(alphas_cumprod[0])
        };
        let jump = (n_train / num_inference_steps) as i64;
        let mut steps = Vec::with_capacity(timesteps.len());
        for &t in &timesteps {
            let index = |t: i64| usize::try_from(t).ok().filter(|&i| i < n_train);
            let t = t as i64;
            let Some(ti) = index(t) else {
                fail!(
                    "DDIMScheduler: timestep {t} is outside the training schedule (0..{n_train}); \
                     check steps_offset and the number of steps"
                );
            };
            let prev = t - jump;
            let alpha_prev = match index(prev) {
                Some(p) => f64::from(alphas_cumprod[p]),
                None if prev < 0 => final_alpha,
                None => fail!("DDIMScheduler: previous timestep {prev} is outside the schedule"),
            };
            steps.push(step(
                &config,
                t as f64,
                f64::from(alphas_cumprod[ti]),
                alpha_prev,
            ));
        }
        super::check_finite("DDIMScheduler", 1.0, &steps)?;
        Ok(Self {
            config,
            alphas_cumprod,
            steps,
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    /// The training `alphas_cumprod` (float32, as diffusers stores it).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }
}

/// One DDIM step from ᾱ_t and ᾱ_t'.
fn step(config: &DdimConfig, timestep: f64, alpha_t: f64, alpha_prev: f64) -> Step {
    let (sa, sb) = (alpha_t.sqrt(), (1.0 - alpha_t).sqrt());
    // x̂₀ = dx·x + do·out and ε̂ = ex·x + eo·out.
    let ((dx, d_o), (ex, eo)) = match config.prediction_type {
        PredictionType::Epsilon => ((1.0 / sa, -sb / sa), (0.0, 1.0)),
        PredictionType::Sample => ((0.0, 1.0), (1.0 / sb, -sa / sb)),
        // Ruled out in `new`.
        PredictionType::VPrediction | PredictionType::FlowPrediction => ((sa, -sb), (sb, sa)),
    };
    let direction = (1.0 - alpha_prev).sqrt();
    Step {
        timestep,
        sigma: ((1.0 - alpha_t) / alpha_t).sqrt(),
        input_scale: 1.0,
        denoised_x: dx,
        denoised_output: d_o,
        denoised_clamp: config.clip_sample.then_some(config.clip_sample_range),
        x_coeff: direction * ex,
        output_coeff: direction * eo,
        denoised_terms: vec![(0, alpha_prev.sqrt())],
        corrector: None,
        noise: 0.0,
    }
}

impl Scheduler for Ddim {
    fn class_name(&self) -> &'static str {
        "DDIMScheduler"
    }

    fn steps(&self) -> &[Step] {
        &self.steps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
}

/// DDIM inversion: diffusers' `DDIMInverseScheduler`, the deterministic DDIM update run from the
/// clean sample up the noise levels (its config is [`DdimConfig`]'s fields; `leading` or
/// `trailing` spacing). The timesteps ascend; at timestep t the model is called at t and the
/// sample moves from ᾱ at `t − num_train_timesteps / steps` (ᾱ = 1 below 0 with
/// `set_alpha_to_one`, else ᾱ₀) to ᾱ at t, as diffusers steps it.
#[derive(Debug, Clone)]
pub struct DdimInverse {
    steps: Vec<Step>,
}

impl DdimInverse {
    /// Builds the inversion for `num_inference_steps` steps.
    pub fn new(config: DdimConfig, num_inference_steps: usize) -> Result<Self> {
        const CLASS: &str = "DDIMInverseScheduler";
        if config.timestep_spacing == TimestepSpacing::Linspace {
            fail!("{CLASS}: timestep_spacing must be leading or trailing");
        }
        let alphas_cumprod = config.checked_alphas(CLASS, num_inference_steps)?;
        let n_train = alphas_cumprod.len();
        let mut timesteps = schedule::spaced_timesteps(
            config.timestep_spacing,
            n_train,
            num_inference_steps,
            config.steps_offset,
            true,
        )?;
        timesteps.reverse();
        let initial = if config.set_alpha_to_one {
            1.0
        } else {
            f64::from(alphas_cumprod[0])
        };
        let jump = (n_train / num_inference_steps) as i64;
        let at = |t: i64| usize::try_from(t).ok().filter(|&i| i < n_train);
        let mut steps = Vec::with_capacity(timesteps.len());
        for &t in &timesteps {
            let t = t as i64;
            let Some(target) = at(t) else {
                fail!(
                    "{CLASS}: timestep {t} is outside the training schedule (0..{n_train}); check \
                     steps_offset and the number of steps"
                );
            };
            let from = (t - jump).min(n_train as i64 - 1);
            let alpha_from = match at(from) {
                Some(i) => f64::from(alphas_cumprod[i]),
                None => initial,
            };
            steps.push(step(
                &config,
                t as f64,
                alpha_from,
                f64::from(alphas_cumprod[target]),
            ));
        }
        super::check_finite(CLASS, 1.0, &steps)?;
        Ok(Self { steps })
    }
}

impl Scheduler for DdimInverse {
    fn class_name(&self) -> &'static str {
        "DDIMInverseScheduler"
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

    fn sd() -> DdimConfig {
        DdimConfig {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            clip_sample: false,
            set_alpha_to_one: false,
            steps_offset: 1,
            ..DdimConfig::default()
        }
    }

    #[test]
    fn leading_timesteps_are_multiples_plus_offset() {
        let s = Ddim::new(sd(), 10)
            .map(|s| s.timesteps())
            .unwrap_or_default();
        let want: Vec<f64> = (0..10).rev().map(|i| (i * 100 + 1) as f64).collect();
        assert_eq!(s, want);
    }

    #[test]
    fn bad_step_counts_are_errors() {
        assert!(Ddim::new(sd(), 0).is_err());
        let e = Ddim::new(sd(), 1001).err().map(|e| e.0).unwrap_or_default();
        assert!(e.contains("more than num_train_timesteps"), "{e}");
        // Leading with steps_offset 1 and 1000 steps reaches timestep 1000: diffusers fails with
        // an IndexError, here it is an error.
        assert!(Ddim::new(sd(), 1000).is_err());
    }

    #[test]
    fn unsupported_options_are_errors() {
        let mut c = sd();
        assert!(c.set("thresholding", "true").is_ok());
        assert!(Ddim::new(c, 10).is_err());
        let mut c = sd();
        assert!(c.set("rescale_betas_zero_snr", "true").is_ok());
        assert!(Ddim::new(c, 10).is_err());
        assert!(sd().set("prediction_type", "\"velocity\"").is_err());
        assert_eq!(sd().set("_class_name", "DDIMScheduler"), Ok(false));
    }
}
