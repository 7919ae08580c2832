//! Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, Algorithm 2
//! without churn): diffusers' `EulerDiscreteScheduler` (`schedulers/scheduling_euler_discrete.py`)
//! with `s_churn = 0`, so deterministic.
//!
//! The sample lives at noise level σ (`x = x₀ + σ·ε`), the model sees `x / √(σ² + 1)`, and one
//! step is
//!
//! ```text
//! x̂₀ = prediction of x₀;   d = (x − x̂₀) / σ;   x_next = x + d · (σ_next − σ)
//! ```
//!
//! Sigmas come from the training schedule at the spaced timesteps (linear interpolation), or
//! are Karras, exponential or beta-distribution sigmas between the same ends
//! (`use_karras_sigmas`, `use_exponential_sigmas`, `use_beta_sigmas`), and end with 0
//! (`final_sigmas_type = "zero"`) or the smallest training sigma (`"sigma_min"`).
//!
//! diffusers finds the first step by looking the first timestep up in the list, and takes the
//! second match when it occurs twice; here sampling always starts at the first step (the same
//! whenever the first timestep is unique, which is every usual schedule).
//!
//! [`EulerAncestralDiscrete`] is diffusers' `EulerAncestralDiscreteScheduler` on the same
//! schedule (without Karras sigmas, which that class does not have): each step goes down to
//! `σ_down` and adds fresh noise of scale `σ_up`,
//!
//! ```text
//! σ_up = √(σ_next²·(σ² − σ_next²)/σ²);   σ_down = √(σ_next² − σ_up²)
//! x_next = x + d·(σ_down − σ) + σ_up·ε
//! ```

use super::schedule::{self, BetaSchedule};
use super::{
    fail, value, FinalSigmasType, PredictionType, Result, Scheduler, Step, TimestepSpacing,
};
use std::str::FromStr;

/// What the model's timestep input is (diffusers' `timestep_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestepType {
    /// `"discrete"`: training timesteps (fractional ones with Karras sigmas).
    #[default]
    Discrete,
    /// `"continuous"`: with `v_prediction`, the model gets `0.25 · ln σ` (EDM's c_noise).
    Continuous,
}

impl FromStr for TimestepType {
    type Err = super::SamplerError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "discrete" => Self::Discrete,
            "continuous" => Self::Continuous,
            _ => fail!("unknown timestep_type {s:?}; expected discrete or continuous"),
        })
    }
}

/// The fields of an `EulerDiscreteScheduler` config, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct EulerDiscreteConfig {
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
    /// What the model predicts (`epsilon`; `flow_prediction` is refused).
    pub prediction_type: PredictionType,
    /// How sigmas are interpolated (`"linear"`; `"log_linear"` is not supported).
    pub interpolation_type: String,
    /// Karras sigmas (false).
    pub use_karras_sigmas: bool,
    /// Exponential sigmas: evenly spaced in log σ (false).
    pub use_exponential_sigmas: bool,
    /// Beta-distribution sigmas (Beta(0.6, 0.6) quantiles; false).
    pub use_beta_sigmas: bool,
    /// Lower end of the Karras, exponential or beta sigmas (default: the schedule's last sigma).
    pub sigma_min: Option<f64>,
    /// Upper end of those sigmas (default: the schedule's first sigma).
    pub sigma_max: Option<f64>,
    /// Timestep spacing (`linspace`).
    pub timestep_spacing: TimestepSpacing,
    /// The model's timestep input (`discrete`).
    pub timestep_type: TimestepType,
    /// Added to `leading` timesteps (0).
    pub steps_offset: i64,
    /// Zero-terminal-SNR rescaling (not supported: must be false).
    pub rescale_betas_zero_snr: bool,
    /// The sigma after the last step (`zero`).
    pub final_sigmas_type: FinalSigmasType,
}

impl Default for EulerDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            interpolation_type: "linear".into(),
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            timestep_spacing: TimestepSpacing::Linspace,
            timestep_type: TimestepType::Discrete,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            final_sigmas_type: FinalSigmasType::Zero,
        }
    }
}

impl EulerDiscreteConfig {
    /// Sets the field named `key` (diffusers' name) from its text form. Returns `Ok(false)` for
    /// a key this config does not have, and an error for a bad value.
    pub fn set(&mut self, key: &str, v: &str) -> Result<bool> {
        match key {
            "num_train_timesteps" => self.num_train_timesteps = value::count(key, v)?,
            "beta_start" => self.beta_start = value::float(key, v)?,
            "beta_end" => self.beta_end = value::float(key, v)?,
            "beta_schedule" => self.beta_schedule = value::parsed(v)?,
            "trained_betas" => self.trained_betas = value::opt_floats(key, v)?,
            "prediction_type" => self.prediction_type = value::parsed(v)?,
            "interpolation_type" => self.interpolation_type = value::text(v),
            "use_karras_sigmas" => self.use_karras_sigmas = value::opt_bool(key, v)?,
            "use_exponential_sigmas" => self.use_exponential_sigmas = value::opt_bool(key, v)?,
            "use_beta_sigmas" => self.use_beta_sigmas = value::opt_bool(key, v)?,
            "sigma_min" => self.sigma_min = value::opt_float(key, v)?,
            "sigma_max" => self.sigma_max = value::opt_float(key, v)?,
            "timestep_spacing" => self.timestep_spacing = value::parsed(v)?,
            "timestep_type" => self.timestep_type = value::parsed(v)?,
            "steps_offset" => self.steps_offset = value::int(key, v)?,
            "rescale_betas_zero_snr" => self.rescale_betas_zero_snr = value::boolean(key, v)?,
            "final_sigmas_type" => self.final_sigmas_type = value::parsed(v)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// A config from `(key, value)` text pairs over the defaults; unknown keys are ignored.
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self> {
        super::config_from_fields(fields, Self::set)
    }
}

/// `EulerDiscreteScheduler` set up for a number of inference steps.
#[derive(Debug, Clone)]
pub struct EulerDiscrete {
    config: EulerDiscreteConfig,
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    steps: Vec<Step>,
}

impl EulerDiscrete {
    /// Builds the scheduler for `num_inference_steps` steps (diffusers' `__init__` then
    /// `set_timesteps`).
    pub fn new(config: EulerDiscreteConfig, num_inference_steps: usize) -> Result<Self> {
        Self::check(&config)?;
        let schedule = sigma_schedule(&config, num_inference_steps)?;
        Self::on_schedule(config, schedule)
    }

    /// Builds the scheduler on the given sigmas (diffusers' `set_timesteps(sigmas=...)`): one per
    /// step, each > 0 and smaller than the one before, then optionally the final one (0
    /// usually); without it the end is `final_sigmas_type`'s. The timesteps are the training
    /// schedule's at those sigmas.
    pub fn with_sigmas(
        config: EulerDiscreteConfig,
        num_inference_steps: usize,
        sigmas: &[f64],
    ) -> Result<Self> {
        Self::check(&config)?;
        let schedule = custom_sigma_schedule(&config, num_inference_steps, sigmas)?;
        Self::on_schedule(config, schedule)
    }

    /// The settings this scheduler does not support, refused.
    fn check(config: &EulerDiscreteConfig) -> Result<()> {
        if config.interpolation_type != "linear" {
            fail!(
                "EulerDiscreteScheduler: interpolation_type {:?} is not supported (only linear)",
                config.interpolation_type
            );
        }
        if config.rescale_betas_zero_snr {
            fail!("EulerDiscreteScheduler: rescale_betas_zero_snr is not supported");
        }
        if config.prediction_type == PredictionType::FlowPrediction {
            fail!(
                "EulerDiscreteScheduler: prediction_type must be epsilon, v_prediction or sample"
            );
        }
        Ok(())
    }

    fn on_schedule(config: EulerDiscreteConfig, schedule: SigmaSchedule) -> Result<Self> {
        let SigmaSchedule {
            timesteps,
            sigmas,
            init_noise_sigma,
        } = schedule;
        let steps: Vec<Step> = timesteps
            .iter()
            .zip(sigmas.windows(2))
            .map(|(&t, w)| step(config.prediction_type, t, f64::from(w[0]), f64::from(w[1])))
            .collect();
        super::check_finite("EulerDiscreteScheduler", init_noise_sigma, &steps)?;
        Ok(Self {
            config,
            sigmas,
            init_noise_sigma,
            steps,
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &EulerDiscreteConfig {
        &self.config
    }
}

/// The timesteps, the sigmas (one per step, then the final one, float32 as diffusers keeps
/// them) and `init_noise_sigma` of the Euler family's schedule, which Euler, Euler ancestral
/// and Heun share.
pub(crate) struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f64,
}

/// The training schedule's sigmas (float32) and their logarithms.
fn training_sigmas(config: &EulerDiscreteConfig) -> Result<(Vec<f32>, Vec<f32>)> {
    let alphas_cumprod = schedule::alphas_cumprod(
        config.num_train_timesteps,
        config.beta_start,
        config.beta_end,
        config.beta_schedule,
        config.trained_betas.as_deref(),
    )?;
    let table = schedule::sigmas_f32(&alphas_cumprod);
    let log_sigmas = schedule::log_f32(&table);
    Ok((table, log_sigmas))
}

/// [`SigmaSchedule`] of `config` for `n` inference steps (diffusers' `set_timesteps`).
pub(crate) fn sigma_schedule(config: &EulerDiscreteConfig, n: usize) -> Result<SigmaSchedule> {
    let (table, log_sigmas) = training_sigmas(config)?;
    let n_train = table.len();

    // Timesteps are float32 in diffusers.
    let mut timesteps: Vec<f64> = schedule::spaced_timesteps(
        config.timestep_spacing,
        n_train,
        n,
        config.steps_offset,
        false,
    )?
    .into_iter()
    .map(|t| f64::from(t as f32))
    .collect();
    let mut sigmas: Vec<f64> = timesteps
        .iter()
        .map(|&t| schedule::np_interp(t, &table))
        .collect();
    let spacings = [
        config.use_karras_sigmas,
        config.use_exponential_sigmas,
        config.use_beta_sigmas,
    ];
    if spacings.iter().filter(|&&on| on).count() > 1 {
        fail!(
            "only one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas can be set"
        );
    }
    if spacings.contains(&true) {
        let (Some(&first), Some(&last)) = (sigmas.first(), sigmas.last()) else {
            fail!("no timesteps");
        };
        let sigma_min = config.sigma_min.unwrap_or(last);
        let sigma_max = config.sigma_max.unwrap_or(first);
        sigmas = if config.use_karras_sigmas {
            schedule::karras_sigmas(sigma_min, sigma_max, n)
        } else if config.use_exponential_sigmas {
            schedule::exponential_sigmas(sigma_min, sigma_max, n)
        } else {
            schedule::beta_sigmas(sigma_min, sigma_max, n)
        };
        timesteps = sigmas
            .iter()
            .map(|&s| f64::from(schedule::sigma_to_t(s, &log_sigmas) as f32))
            .collect();
    }
    let last = match config.final_sigmas_type {
        FinalSigmasType::Zero => 0.0f32,
        FinalSigmasType::SigmaMin => table[0],
    };
    let sigmas: Vec<f32> = sigmas
        .iter()
        .map(|&s| s as f32)
        .chain(std::iter::once(last))
        .collect();
    finish_schedule(config, timesteps, sigmas)
}

/// [`SigmaSchedule`] on given sigmas for `n` steps (`set_timesteps(sigmas=...)`): `n` of them,
/// then the end from `final_sigmas_type`, or `n + 1` with the end given.
fn custom_sigma_schedule(
    config: &EulerDiscreteConfig,
    n: usize,
    given: &[f64],
) -> Result<SigmaSchedule> {
    schedule::check_steps(n)?;
    let (table, log_sigmas) = training_sigmas(config)?;
    let end = match given.len() {
        l if l == n => None,
        l if l == n + 1 => Some(given[n]),
        l => fail!(
            "EulerDiscreteScheduler: {l} sigmas given for {n} steps: give one per step, and \
             optionally the final one"
        ),
    };
    let steps = &given[..n];
    if let Some(s) = steps.iter().find(|s| !s.is_finite() || **s <= 0.0) {
        fail!("EulerDiscreteScheduler: each step's sigma must be finite and > 0, got {s}");
    }
    if let Some(w) = steps.windows(2).find(|w| w[1] >= w[0]) {
        fail!(
            "EulerDiscreteScheduler: the sigmas must decrease, but {} is followed by {}",
            w[0],
            w[1]
        );
    }
    let last = match end {
        Some(e) if !e.is_finite() || e < 0.0 || e >= steps[n - 1] => fail!(
            "EulerDiscreteScheduler: the final sigma must be ≥ 0 and below the last step's {}, \
             got {e}",
            steps[n - 1]
        ),
        Some(e) => e as f32,
        None => match config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0f32,
            FinalSigmasType::SigmaMin => table[0],
        },
    };
    let sigmas: Vec<f32> = steps
        .iter()
        .map(|&s| s as f32)
        .chain(std::iter::once(last))
        .collect();
    let timesteps = sigmas[..n]
        .iter()
        .map(|&s| f64::from(schedule::sigma_to_t(f64::from(s), &log_sigmas) as f32))
        .collect();
    finish_schedule(config, timesteps, sigmas)
}

/// The continuous timesteps of v-prediction's EDM set-up, and `init_noise_sigma`.
fn finish_schedule(
    config: &EulerDiscreteConfig,
    mut timesteps: Vec<f64>,
    sigmas: Vec<f32>,
) -> Result<SigmaSchedule> {
    if config.timestep_type == TimestepType::Continuous
        && config.prediction_type == PredictionType::VPrediction
    {
        timesteps = sigmas[..sigmas.len() - 1]
            .iter()
            .map(|&s| f64::from(0.25f32 * s.ln()))
            .collect();
    }

    let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let init_noise_sigma = match config.timestep_spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
        TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
    };
    Ok(SigmaSchedule {
        timesteps,
        sigmas,
        init_noise_sigma: f64::from(init_noise_sigma),
    })
}

/// One Euler step from σ to σ_next.
fn step(prediction: PredictionType, timestep: f64, sigma: f64, sigma_next: f64) -> Step {
    let dt = sigma_next - sigma;
    let c = (sigma * sigma + 1.0).sqrt();
    // x̂₀ = dx·x + do·out; d = (x − x̂₀)/σ = gx·x + go·out (simplified so σ is not divided by
    // where it cancels).
    let ((dx, d_o), (gx, go)) = match prediction {
        PredictionType::Epsilon => ((1.0, -sigma), (0.0, 1.0)),
        PredictionType::VPrediction => ((1.0 / (c * c), -sigma / c), (sigma / (c * c), 1.0 / c)),
        // Flow prediction is ruled out in `new`.
        PredictionType::Sample | PredictionType::FlowPrediction => {
            ((0.0, 1.0), (1.0 / sigma, -1.0 / sigma))
        }
    };
    Step {
        timestep,
        sigma,
        input_scale: 1.0 / c,
        denoised_x: dx,
        denoised_output: d_o,
        denoised_clamp: None,
        x_coeff: 1.0 + gx * dt,
        output_coeff: go * dt,
        denoised_terms: Vec::new(),
        corrector: None,
        noise: 0.0,
    }
}

impl Scheduler for EulerDiscrete {
    fn class_name(&self) -> &'static str {
        "EulerDiscreteScheduler"
    }

    fn steps(&self) -> &[Step] {
        &self.steps
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.sigmas.iter().map(|&s| f64::from(s)).collect())
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn noising(&self) -> crate::Noising {
        crate::Noising::Exploding
    }
}

/// `EulerAncestralDiscreteScheduler` set up for a number of inference steps. Its config holds the
/// fields of [`EulerDiscreteConfig`] that the ancestral class has (the others keep their
/// defaults; Karras sigmas, a continuous timestep and `final_sigmas_type` do not apply).
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscrete {
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    steps: Vec<Step>,
}

impl EulerAncestralDiscrete {
    /// Builds the scheduler for `num_inference_steps` steps.
    pub fn new(config: EulerDiscreteConfig, num_inference_steps: usize) -> Result<Self> {
        const CLASS: &str = "EulerAncestralDiscreteScheduler";
        if config.rescale_betas_zero_snr {
            fail!("{CLASS}: rescale_betas_zero_snr is not supported");
        }
        if !matches!(
            config.prediction_type,
            PredictionType::Epsilon | PredictionType::VPrediction
        ) {
            fail!("{CLASS}: prediction_type must be epsilon or v_prediction");
        }
        let config = EulerDiscreteConfig {
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            interpolation_type: "linear".into(),
            timestep_type: TimestepType::Discrete,
            final_sigmas_type: FinalSigmasType::Zero,
            ..config
        };
        let SigmaSchedule {
            timesteps,
            sigmas,
            init_noise_sigma,
        } = sigma_schedule(&config, num_inference_steps)?;
        let steps: Vec<Step> = timesteps
            .iter()
            .zip(sigmas.windows(2))
            .map(|(&t, w)| {
                let (from, to) = (f64::from(w[0]), f64::from(w[1]));
                let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
                let down = (to * to - up * up).sqrt();
                Step {
                    noise: up,
                    ..step(config.prediction_type, t, from, down)
                }
            })
            .collect();
        super::check_finite(CLASS, init_noise_sigma, &steps)?;
        Ok(Self {
            sigmas,
            init_noise_sigma,
            steps,
        })
    }
}

impl Scheduler for EulerAncestralDiscrete {
    fn class_name(&self) -> &'static str {
        "EulerAncestralDiscreteScheduler"
    }

    fn steps(&self) -> &[Step] {
        &self.steps
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.sigmas.iter().map(|&s| f64::from(s)).collect())
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn noising(&self) -> crate::Noising {
        crate::Noising::Exploding
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigmas_end_with_zero_and_start_at_the_max() {
        let e = EulerDiscrete::new(EulerDiscreteConfig::default(), 10);
        let Ok(e) = e else {
            panic!("{e:?}");
        };
        let s = e.sigmas().unwrap_or_default();
        assert_eq!(s.len(), 11);
        assert_eq!(s[10], 0.0);
        assert_eq!(e.init_noise_sigma(), s[0]);
        assert_eq!(e.timesteps()[0], 999.0);
        assert!((e.model_input_scale(0) - 1.0 / (s[0] * s[0] + 1.0).sqrt()).abs() < 1e-15);
    }

    #[test]
    fn unsupported_options_are_errors() {
        let bad = [
            ("interpolation_type", "log_linear"),
            ("rescale_betas_zero_snr", "true"),
            ("prediction_type", "flow_prediction"),
        ];
        for (k, v) in bad {
            let c = EulerDiscreteConfig::from_fields([(k, v)]);
            assert!(c.is_ok_and(|c| EulerDiscrete::new(c, 10).is_err()), "{k}");
        }
        assert!(EulerDiscrete::new(EulerDiscreteConfig::default(), 0).is_err());
        let two = [("use_beta_sigmas", "true"), ("use_karras_sigmas", "true")];
        let c = EulerDiscreteConfig::from_fields(two);
        assert!(
            c.is_ok_and(|c| EulerDiscrete::new(c, 10).is_err()),
            "two spacings"
        );
    }

    #[test]
    fn custom_sigmas_take_the_configs_end_or_their_own() {
        let c = EulerDiscreteConfig::default;
        let given = [14.6, 5.0, 1.0];
        let ends = |e: &EulerDiscrete| e.sigmas().unwrap_or_default();
        let own = EulerDiscrete::with_sigmas(c(), 3, &[14.6, 5.0, 1.0, 0.0]).map(|e| ends(&e));
        let zero = EulerDiscrete::with_sigmas(c(), 3, &given).map(|e| ends(&e));
        assert_eq!(own, zero);
        let min = EulerDiscreteConfig {
            final_sigmas_type: FinalSigmasType::SigmaMin,
            ..c()
        };
        let table = training_sigmas(&min).map(|t| f64::from(t.0[0]));
        let last = EulerDiscrete::with_sigmas(min, 3, &given).map(|e| ends(&e)[3]);
        assert_eq!(last, table);
        // Too few or many, not decreasing, not positive, an end above the last step: errors
        // that say why.
        let bad: [(&[f64], &str); 5] = [
            (&[14.6, 5.0], "2 sigmas given for 3 steps"),
            (&[14.6, 5.0, 6.0], "must decrease"),
            (&[14.6, 5.0, 0.0], "> 0"),
            (&[14.6, 5.0, 1.0, 2.0], "final sigma"),
            (&[14.6, 5.0, f64::NAN], "finite"),
        ];
        for (list, why) in bad {
            match EulerDiscrete::with_sigmas(c(), 3, list) {
                Err(e) => assert!(e.0.contains(why), "{list:?}: {}", e.0),
                Ok(_) => panic!("{list:?} was accepted"),
            }
        }
    }
}
