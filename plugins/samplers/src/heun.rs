//! Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn): diffusers'
//! `HeunDiscreteScheduler` on the Euler family's sigmas and `FlowMatchHeunDiscreteScheduler` on
//! flow-matching sigmas, with `s_churn = 0`, so deterministic.
//!
//! A step from σᵢ to σᵢ₊₁ calls the model twice, and diffusers runs it as two `step` calls on an
//! interleaved timestep list `[t₀, t₁, t₁, t₂, t₂, …, tₙ₋₁]` (2n − 1 model calls; the last step,
//! to σ = 0, is Euler's). Here each call is one [`Step`]:
//!
//! ```text
//! predictor (at σᵢ, on xᵢ):      d₁ = (xᵢ − x̂₀⁽¹⁾)/σᵢ;        x_mid = xᵢ + d₁·Δ,   Δ = σᵢ₊₁ − σᵢ
//! corrector (at σᵢ₊₁, on x_mid): d₂ = (x_mid − x̂₀⁽²⁾)/σᵢ₊₁;   xᵢ₊₁ = xᵢ + (d₁ + d₂)/2·Δ
//! ```
//!
//! The corrector starts from `xᵢ`, the sample the predictor started from (the step's
//! [`Corrector`] `x_last`), and reads the predictor's x̂₀ from the history; with x_mid written
//! out through xᵢ and x̂₀⁽¹⁾, the update is linear in xᵢ, x̂₀⁽¹⁾ and x̂₀⁽²⁾. Both calls go
//! through x̂₀, so `clip_sample` clamps it as diffusers does.

use super::euler::{sigma_schedule, EulerDiscreteConfig, SigmaSchedule};
use super::flow_match::{FlowMatchEulerDiscrete, FlowMatchEulerDiscreteConfig};
use super::schedule::SigmaSource;
use super::{fail, value, Corrector, PredictionType, Result, Scheduler, Step};

/// The fields of a `HeunDiscreteScheduler` config, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct HeunDiscreteConfig {
    /// The schedule's fields, shared with Euler (`beta_start` 0.00085, `beta_end` 0.012 here).
    pub schedule: EulerDiscreteConfig,
    /// Clamp x̂₀ to `±clip_sample_range` (false).
    pub clip_sample: bool,
    /// See [`HeunDiscreteConfig::clip_sample`] (1.0).
    pub clip_sample_range: f64,
}

impl Default for HeunDiscreteConfig {
    fn default() -> Self {
        Self {
            schedule: EulerDiscreteConfig {
                beta_start: 0.00085,
                beta_end: 0.012,
                ..EulerDiscreteConfig::default()
            },
            clip_sample: false,
            clip_sample_range: 1.0,
        }
    }
}

impl HeunDiscreteConfig {
    /// Sets the field named `key` (diffusers' name) from its text form. Returns `Ok(false)` for
    /// a key this config does not have, and an error for a bad value.
    pub fn set(&mut self, key: &str, v: &str) -> Result<bool> {
        match key {
            "clip_sample" => self.clip_sample = value::boolean(key, v)?,
            "clip_sample_range" => self.clip_sample_range = value::float(key, v)?,
            "num_train_timesteps"
            | "beta_start"
            | "beta_end"
            | "beta_schedule"
            | "trained_betas"
            | "prediction_type"
            | "use_karras_sigmas"
            | "use_exponential_sigmas"
            | "use_beta_sigmas"
            | "timestep_spacing"
            | "steps_offset" => return self.schedule.set(key, v),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// A config from `(key, value)` text pairs over the defaults; unknown keys are ignored.
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self> {
        super::config_from_fields(fields, Self::set)
    }
}

/// A Heun sampler set up for a number of inference steps: [`HeunDiscrete::new`] or
/// [`HeunDiscrete::flow_match`].
#[derive(Debug, Clone)]
pub struct HeunDiscrete {
    class: &'static str,
    /// The interleaved sigmas, as diffusers keeps them: `[σ₀, σ₁, σ₁, …, σₙ₋₁, σₙ₋₁, 0]`.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    steps: Vec<Step>,
    flow: bool,
}

impl HeunDiscrete {
    /// `HeunDiscreteScheduler` for `num_inference_steps` steps (2n − 1 model calls).
    pub fn new(config: HeunDiscreteConfig, num_inference_steps: usize) -> Result<Self> {
        const CLASS: &str = "HeunDiscreteScheduler";
        let c = &config.schedule;
        if c.prediction_type == PredictionType::FlowPrediction {
            fail!("{CLASS}: prediction_type must be epsilon, v_prediction or sample");
        }
        let SigmaSchedule {
            timesteps,
            sigmas,
            init_noise_sigma,
        } = sigma_schedule(c, num_inference_steps)?;
        let prediction = c.prediction_type;
        let denoised = move |s: f64| {
            let k = s * s + 1.0;
            match prediction {
                PredictionType::Epsilon => (1.0, -s),
                PredictionType::VPrediction => (1.0 / k, -s / k.sqrt()),
                PredictionType::Sample | PredictionType::FlowPrediction => (0.0, 1.0),
            }
        };
        let clamp = config.clip_sample.then_some(config.clip_sample_range);
        let input_scale = |s: f64| 1.0 / (s * s + 1.0).sqrt();
        let steps = heun_steps(&timesteps, &sigmas, denoised, input_scale, clamp);
        super::check_finite(CLASS, init_noise_sigma, &steps)?;
        Ok(Self {
            class: CLASS,
            sigmas: interleaved(&sigmas),
            init_noise_sigma,
            steps,
            flow: false,
        })
    }

    /// `FlowMatchHeunDiscreteScheduler` (fields `num_train_timesteps` and `shift`) for
    /// `num_inference_steps` steps: the sigmas of `FlowMatchEulerDiscreteScheduler` built
    /// without sigmas from the pipeline (the class shifts its training ends, then the spaced
    /// sigmas again, as that one does), and a flow model's x̂₀ = x − σ·v.
    pub fn flow_match(
        config: FlowMatchEulerDiscreteConfig,
        num_inference_steps: usize,
    ) -> Result<Self> {
        const CLASS: &str = "FlowMatchHeunDiscreteScheduler";
        let config = FlowMatchEulerDiscreteConfig {
            num_train_timesteps: config.num_train_timesteps,
            shift: config.shift,
            ..FlowMatchEulerDiscreteConfig::default()
        };
        let n_train = config.num_train_timesteps as f32;
        let euler = FlowMatchEulerDiscrete::new(
            config,
            num_inference_steps,
            SigmaSource::SchedulerDefault,
            None,
        )
        .map_err(|e| super::SamplerError(e.0.replace("FlowMatchEuler", "FlowMatchHeun")))?;
        let sigmas: Vec<f32> = euler
            .sigmas()
            .unwrap_or_default()
            .iter()
            .map(|&s| s as f32)
            .collect();
        let timesteps: Vec<f64> = sigmas[..sigmas.len().saturating_sub(1)]
            .iter()
            .map(|&s| f64::from(s * n_train))
            .collect();
        let steps = heun_steps(&timesteps, &sigmas, |s| (1.0, -s), |_| 1.0, None);
        super::check_finite(CLASS, 1.0, &steps)?;
        Ok(Self {
            class: CLASS,
            sigmas: interleaved(&sigmas),
            init_noise_sigma: 1.0,
            steps,
            flow: true,
        })
    }
}

/// `[σ₀, σ₁, σ₁, …, σₙ₋₁, σₙ₋₁, σₙ]` from `[σ₀, …, σₙ]`.
fn interleaved(sigmas: &[f32]) -> Vec<f32> {
    match sigmas {
        [first, middle @ .., last] => std::iter::once(*first)
            .chain(middle.iter().flat_map(|&s| [s, s]))
            .chain(std::iter::once(*last))
            .collect(),
        _ => sigmas.to_vec(),
    }
}

/// The model calls of Heun's method over `sigmas` (one per timestep, then the final one):
/// `denoised(σ)` gives x̂₀'s coefficients `(of x, of the model output)` at σ, `input_scale(σ)`
/// the model input's factor, and `clamp` an optional clamp of x̂₀.
fn heun_steps(
    timesteps: &[f64],
    sigmas: &[f32],
    denoised: impl Fn(f64) -> (f64, f64),
    input_scale: impl Fn(f64) -> f64,
    clamp: Option<f64>,
) -> Vec<Step> {
    let mut steps = Vec::with_capacity(2 * timesteps.len());
    for (i, w) in sigmas.windows(2).enumerate().take(timesteps.len()) {
        let (s, s_next) = (f64::from(w[0]), f64::from(w[1]));
        let dt = s_next - s;
        let (dx, d_o) = denoised(s);
        // x_mid = x + dt·(x − x̂₀)/σ.
        steps.push(Step {
            timestep: timesteps[i],
            sigma: s,
            input_scale: input_scale(s),
            denoised_x: dx,
            denoised_output: d_o,
            denoised_clamp: clamp,
            x_coeff: 1.0 + dt / s,
            output_coeff: 0.0,
            denoised_terms: vec![(0, -dt / s)],
            corrector: None,
            noise: 0.0,
        });
        if s_next == 0.0 {
            continue;
        }
        // x_next = xᵢ + dt/2·d₁ + k·(x_mid − x̂₀⁽²⁾) with k = dt/(2σᵢ₊₁) and
        // x_mid = xᵢ + dt·d₁, d₁ = (xᵢ − x̂₀⁽¹⁾)/σᵢ.
        let k = dt / (2.0 * s_next);
        let d1 = (0.5 * dt + k * dt) / s; // the factor of d₁, over σᵢ
        let (dx, d_o) = denoised(s_next);
        steps.push(Step {
            timestep: timesteps.get(i + 1).copied().unwrap_or(timesteps[i]),
            sigma: s_next,
            input_scale: input_scale(s_next),
            denoised_x: dx,
            denoised_output: d_o,
            denoised_clamp: clamp,
            x_coeff: 1.0,
            output_coeff: 0.0,
            denoised_terms: vec![(0, -k)],
            corrector: Some(Corrector {
                last: 1.0 + k + d1,
                denoised_terms: vec![(1, -d1)],
            }),
            noise: 0.0,
        });
    }
    steps
}

impl Scheduler for HeunDiscrete {
    fn class_name(&self) -> &'static str {
        self.class
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
        if self.flow {
            crate::Noising::Flow
        } else {
            crate::Noising::Exploding
        }
    }

    fn history_len(&self) -> usize {
        1
    }

    fn order(&self) -> usize {
        2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_two_model_calls_but_the_last() {
        let h = HeunDiscrete::new(HeunDiscreteConfig::default(), 5).expect("a scheduler");
        assert_eq!(h.num_steps(), 9);
        let t = h.timesteps();
        assert_eq!(t[1], t[2]);
        assert_eq!(h.sigmas().map(|s| s.len()), Some(10));
        assert!(h.steps()[1].corrector.is_some() && h.steps()[8].corrector.is_none());
        let f = HeunDiscrete::flow_match(FlowMatchEulerDiscreteConfig::default(), 4)
            .expect("a scheduler");
        assert_eq!(f.num_steps(), 7);
    }

    #[test]
    fn unsupported_options_are_errors() {
        let c = HeunDiscreteConfig::from_fields([("prediction_type", "flow_prediction")]);
        assert!(
            c.is_ok_and(|c| HeunDiscrete::new(c, 10).is_err()),
            "flow prediction"
        );
        let two = [
            ("use_beta_sigmas", "true"),
            ("use_exponential_sigmas", "true"),
        ];
        let c = HeunDiscreteConfig::from_fields(two);
        assert!(
            c.is_ok_and(|c| HeunDiscrete::new(c, 10).is_err()),
            "two spacings"
        );
        assert!(HeunDiscrete::new(HeunDiscreteConfig::default(), 0).is_err());
        let c = FlowMatchEulerDiscreteConfig {
            shift: 0.0,
            ..FlowMatchEulerDiscreteConfig::default()
        };
        assert!(HeunDiscrete::flow_match(c, 10).is_err());
    }
}
