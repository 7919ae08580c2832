//! DPM-Solver++ multistep (Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
//! Probabilistic Models"), "DPM++ 2M" at the default order 2: diffusers'
//! `DPMSolverMultistepScheduler` (`schedulers/scheduling_dpmsolver_multistep.py`) with
//! `algorithm_type = "dpmsolver++"`, or its stochastic form `"sde-dpmsolver++"` ("DPM++ 2M
//! SDE").
//!
//! With α_t, σ_t the signal and noise scales at a sigma (`α = 1/√(σ²+1)`, `σ_t = σ·α`; with
//! `use_flow_sigmas`, `α = 1 − σ`, `σ_t = σ`), `λ = ln α − ln σ_t`, `h = λ_t − λ_s0`, and `m_k` the
//! x₀ predictions of this step (`m0`) and earlier ones, the updates are
//!
//! ```text
//! 1st order:  x_t = (σ_t/σ_s0)·x − α_t(e^−h − 1)·m0
//! 2nd order:  x_t = (σ_t/σ_s0)·x − α_t(e^−h − 1)·D0 − ½·α_t(e^−h − 1)·D1            (midpoint)
//!                                 − α_t(e^−h − 1)·D0 + α_t((e^−h − 1)/h + 1)·D1       (heun)
//!             D0 = m0,  D1 = (m0 − m1)/r0,  r0 = (λ_s0 − λ_s1)/h
//! 3rd order:  as diffusers' `multistep_dpm_solver_third_order_update`
//! ```
//!
//! The SDE form replaces `σ_t/σ_s0` by `σ_t/σ_s0·e^−h` and `e^−h` by `e^−2h` in the D0 and D1
//! terms (its D2 term is diffusers' own), and adds fresh noise `σ_t·√(1 − e^−2h)·ε` at every
//! step.
//!
//! Order selection follows diffusers' `step` exactly: the first step is first order; the last
//! step is first order when `euler_at_final`, or `lower_order_final` with fewer than 15 steps, or
//! `final_sigmas_type = "zero"`; with `lower_order_final` and fewer than 15 steps the one before
//! it is at most second order; the order otherwise grows by one per step up to `solver_order`.

use super::schedule::{self, point, BetaSchedule, Point};
use super::{
    fail, value, FinalSigmasType, PredictionType, Result, Scheduler, Step, TimestepSpacing,
};
use std::str::FromStr;

/// The second-order formula (diffusers' `solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SolverType {
    /// `"midpoint"` (also diffusers' aliases `logrho`, `bh1`, `bh2`).
    #[default]
    Midpoint,
    /// `"heun"`.
    Heun,
}

impl FromStr for SolverType {
    type Err = super::SamplerError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "midpoint" | "logrho" | "bh1" | "bh2" => Self::Midpoint,
            "heun" => Self::Heun,
            _ => fail!("unknown solver_type {s:?}; expected midpoint or heun"),
        })
    }
}

/// The fields of a `DPMSolverMultistepScheduler` config, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct DpmSolverMultistepConfig {
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
    /// Solver order, 1 to 3 (2).
    pub solver_order: usize,
    /// What the model predicts (`epsilon`).
    pub prediction_type: PredictionType,
    /// Dynamic thresholding (not supported: must be false).
    pub thresholding: bool,
    /// The algorithm (`"dpmsolver++"`, the only one supported; `"deis"` is read as it, as diffusers
    /// does).
    pub algorithm_type: String,
    /// Second-order formula (`midpoint`).
    pub solver_type: SolverType,
    /// Lower the order of the last steps when there are fewer than 15 (true).
    pub lower_order_final: bool,
    /// Make the last step first order (false).
    pub euler_at_final: bool,
    /// Karras sigmas (false).
    pub use_karras_sigmas: bool,
    /// Exponential sigmas: evenly spaced in log σ (false).
    pub use_exponential_sigmas: bool,
    /// Beta-distribution sigmas (Beta(0.6, 0.6) quantiles; false).
    pub use_beta_sigmas: bool,
    /// Lu lambdas (not supported: must be false).
    pub use_lu_lambdas: bool,
    /// Flow-matching sigmas, shifted by `flow_shift` (false).
    pub use_flow_sigmas: bool,
    /// The flow sigmas' shift (1.0); `exp(mu)` when `mu` is given with dynamic shifting.
    pub flow_shift: f64,
    /// The sigma after the last step (`zero`).
    pub final_sigmas_type: FinalSigmasType,
    /// Timesteps whose λ is below this are not used (−∞).
    pub lambda_min_clipped: f64,
    /// Learned variance (not supported: must be none).
    pub variance_type: Option<String>,
    /// Timestep spacing (`linspace`).
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps (0).
    pub steps_offset: i64,
    /// Zero-terminal-SNR rescaling (not supported: must be false).
    pub rescale_betas_zero_snr: bool,
    /// Whether `mu` may set the flow shift (false).
    pub use_dynamic_shifting: bool,
    /// The dynamic shift's form (`"exponential"`, the only one diffusers has here).
    pub time_shift_type: String,
}

impl Default for DpmSolverMultistepConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            solver_order: 2,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            algorithm_type: "dpmsolver++".into(),
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: FinalSigmasType::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: "exponential".into(),
        }
    }
}

impl DpmSolverMultistepConfig {
    /// Sets the field named `key` (diffusers' name) from its text form. Returns `Ok(false)` for
    /// a key this config does not have, and an error for a bad value.
    pub fn set(&mut self, key: &str, v: &str) -> Result<bool> {
        match key {
            "num_train_timesteps" => self.num_train_timesteps = value::count(key, v)?,
            "beta_start" => self.beta_start = value::float(key, v)?,
            "beta_end" => self.beta_end = value::float(key, v)?,
            "beta_schedule" => self.beta_schedule = value::parsed(v)?,
            "trained_betas" => self.trained_betas = value::opt_floats(key, v)?,
            "solver_order" => self.solver_order = value::count(key, v)?,
            "prediction_type" => self.prediction_type = value::parsed(v)?,
            "thresholding" => self.thresholding = value::boolean(key, v)?,
            "algorithm_type" => self.algorithm_type = value::text(v),
            "solver_type" => self.solver_type = value::parsed(v)?,
            "lower_order_final" => self.lower_order_final = value::boolean(key, v)?,
            "euler_at_final" => self.euler_at_final = value::boolean(key, v)?,
            "use_karras_sigmas" => self.use_karras_sigmas = value::opt_bool(key, v)?,
            "use_exponential_sigmas" => self.use_exponential_sigmas = value::opt_bool(key, v)?,
            "use_beta_sigmas" => self.use_beta_sigmas = value::opt_bool(key, v)?,
            "use_lu_lambdas" => self.use_lu_lambdas = value::opt_bool(key, v)?,
            "use_flow_sigmas" => self.use_flow_sigmas = value::opt_bool(key, v)?,
            "flow_shift" => self.flow_shift = value::float(key, v)?,
            "final_sigmas_type" => self.final_sigmas_type = value::parsed(v)?,
            "lambda_min_clipped" => self.lambda_min_clipped = value::float(key, v)?,
            "variance_type" => {
                self.variance_type = (!value::is_null(v)).then(|| value::text(v));
            }
            "timestep_spacing" => self.timestep_spacing = value::parsed(v)?,
            "steps_offset" => self.steps_offset = value::int(key, v)?,
            "rescale_betas_zero_snr" => self.rescale_betas_zero_snr = value::boolean(key, v)?,
            "use_dynamic_shifting" => self.use_dynamic_shifting = value::boolean(key, v)?,
            "time_shift_type" => self.time_shift_type = value::text(v),
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
}

/// `DPMSolverMultistepScheduler` (DPM-Solver++) set up for a number of inference steps.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    config: DpmSolverMultistepConfig,
    sigmas: Vec<f32>,
    steps: Vec<Step>,
}

impl DpmSolverMultistep {
    /// Builds the scheduler for `num_inference_steps` steps (diffusers' `__init__` then
    /// `set_timesteps(num_inference_steps, mu=mu)`). `mu` sets `flow_shift = exp(mu)` and needs
    /// `use_dynamic_shifting`.
    pub fn new(
        config: DpmSolverMultistepConfig,
        num_inference_steps: usize,
        mu: Option<f64>,
    ) -> Result<Self> {
        let c = &config;
        if !matches!(
            c.algorithm_type.as_str(),
            "dpmsolver++" | "sde-dpmsolver++" | "deis"
        ) {
            fail!(
                "DPMSolverMultistepScheduler: algorithm_type {:?} is not supported (only \
                 dpmsolver++ and sde-dpmsolver++)",
                c.algorithm_type
            );
        }
        if !(1..=3).contains(&c.solver_order) {
            fail!(
                "DPMSolverMultistepScheduler: solver_order must be 1, 2 or 3, got {}",
                c.solver_order
            );
        }
        if c.thresholding {
            fail!("DPMSolverMultistepScheduler: thresholding is not supported");
        }
        if c.use_lu_lambdas {
            fail!("DPMSolverMultistepScheduler: Lu lambdas are not supported");
        }
        let spacings = [
            c.use_karras_sigmas,
            c.use_exponential_sigmas,
            c.use_beta_sigmas,
        ];
        if spacings.iter().filter(|&&on| on).count() > 1 {
            fail!(
                "DPMSolverMultistepScheduler: only one of use_karras_sigmas, \
                 use_exponential_sigmas and use_beta_sigmas can be set"
            );
        }
        if c.variance_type.is_some() {
            fail!("DPMSolverMultistepScheduler: learned variance_type is not supported");
        }
        if c.rescale_betas_zero_snr {
            fail!("DPMSolverMultistepScheduler: rescale_betas_zero_snr is not supported");
        }
        if c.lambda_min_clipped.is_nan() {
            fail!("DPMSolverMultistepScheduler: lambda_min_clipped is NaN");
        }
        let mut flow_shift = c.flow_shift;
        if let Some(mu) = mu {
            if !c.use_dynamic_shifting || c.time_shift_type != "exponential" {
                fail!(
                    "DPMSolverMultistepScheduler: mu needs use_dynamic_shifting with \
                     time_shift_type exponential"
                );
            }
            if !mu.is_finite() {
                fail!("DPMSolverMultistepScheduler: mu must be finite, got {mu}");
            }
            flow_shift = mu.exp();
        }
        schedule::check_steps(num_inference_steps)?;

        let alphas_cumprod = schedule::alphas_cumprod(
            c.num_train_timesteps,
            c.beta_start,
            c.beta_end,
            c.beta_schedule,
            c.trained_betas.as_deref(),
        )?;
        let n_train = alphas_cumprod.len();
        let table = schedule::sigmas_f32(&alphas_cumprod);
        let log_sigmas = schedule::log_f32(&table);

        // λ_t in float32; `searchsorted` on the flipped (ascending) λ counts those below the clip.
        let clipped = alphas_cumprod
            .iter()
            .filter(|&&a| {
                let lambda = a.sqrt().ln() - (1.0f32 - a).sqrt().ln();
                f64::from(lambda) < c.lambda_min_clipped
            })
            .count();
        let last_timestep = n_train - clipped;
        let n = num_inference_steps;
        let mut timesteps = schedule::multistep_timesteps(
            c.timestep_spacing,
            last_timestep,
            n_train,
            n,
            c.steps_offset,
        )?;

        let sigmas: Vec<f64> = if c.use_karras_sigmas {
            // diffusers flips the table: the ends are the sigmas of timesteps 0 and N−1.
            let sigma_min = f64::from(table[0]);
            let sigma_max = f64::from(table[n_train - 1]);
            let sigmas = schedule::karras_sigmas(sigma_min, sigma_max, n);
            let cosine = c.beta_schedule == BetaSchedule::SquaredcosCapV2;
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = schedule::sigma_to_t(s, &log_sigmas);
                    // Rounded (except for the cosine schedule), then cast to int64.
                    if cosine {
                        t.trunc()
                    } else {
                        schedule::round_half_even(t)
                    }
                })
                .collect();
            sigmas
        } else if c.use_exponential_sigmas || c.use_beta_sigmas {
            // The flipped table's ends, as for Karras; timesteps cast to int64 unrounded.
            let (lo, hi) = (f64::from(table[0]), f64::from(table[n_train - 1]));
            let sigmas = if c.use_exponential_sigmas {
                schedule::exponential_sigmas(lo, hi, n)
            } else {
                schedule::beta_sigmas(lo, hi, n)
            };
            timesteps = sigmas
                .iter()
                .map(|&s| schedule::sigma_to_t(s, &log_sigmas).trunc())
                .collect();
            sigmas
        } else if c.use_flow_sigmas {
            let alphas = schedule::np_linspace(1.0, 1.0 / n_train as f64, n + 1);
            let sigmas: Vec<f64> = alphas
                .iter()
                .rev()
                .take(n)
                .map(|a| {
                    let s = 1.0 - a;
                    flow_shift * s / (1.0 + (flow_shift - 1.0) * s)
                })
                .collect();
            timesteps = sigmas
                .iter()
                .map(|s| (s * n_train as f64).trunc())
                .collect();
            sigmas
        } else {
            timesteps
                .iter()
                .map(|&t| schedule::np_interp(t, &table))
                .collect()
        };
        let last = match c.final_sigmas_type {
            FinalSigmasType::Zero => 0.0f32,
            FinalSigmasType::SigmaMin => table[0],
        };
        let sigmas: Vec<f32> = sigmas
            .iter()
            .map(|&s| s as f32)
            .chain(std::iter::once(last))
            .collect();
        let steps = build_steps(c, &timesteps, &sigmas, 0);
        super::check_finite("DPMSolverMultistepScheduler", 1.0, &steps)?;
        Ok(Self {
            config,
            sigmas,
            steps,
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &DpmSolverMultistepConfig {
        &self.config
    }
}

/// The steps for `timesteps` and `sigmas`, sampling from step `start` (the order count starts
/// there, as diffusers' restarts with a begin index; steps before it are built as from 0).
fn build_steps(
    c: &DpmSolverMultistepConfig,
    timesteps: &[f64],
    sigmas: &[f32],
    start: usize,
) -> Vec<Step> {
    let n = timesteps.len();
    let flow = c.use_flow_sigmas;
    let points: Vec<Point> = sigmas.iter().map(|&s| point(flow, s)).collect();
    let few = c.lower_order_final && n < 15;
    let sde = c.algorithm_type == "sde-dpmsolver++";
    let mut steps = Vec::with_capacity(n);
    for (i, &timestep) in timesteps.iter().enumerate() {
        let (Some(&s0), Some(&t)) = (points.get(i), points.get(i + 1)) else {
            break;
        };
        let lower_order_final =
            i + 1 == n && (c.euler_at_final || few || c.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = i + 2 == n && few;
        let lower_order_nums = i.checked_sub(start).unwrap_or(i).min(c.solver_order);
        // x0 = dx·x + do·out at this step's sigma.
        let (dx, d_o) = match c.prediction_type {
            PredictionType::Epsilon => (1.0 / s0.alpha_t, -s0.sigma_t / s0.alpha_t),
            PredictionType::Sample => (0.0, 1.0),
            PredictionType::VPrediction => (s0.alpha_t, -s0.sigma_t),
            PredictionType::FlowPrediction => (1.0, -s0.sigma),
        };
        let h = t.lambda - s0.lambda;
        // e^−h − 1 (e^−2h − 1 for the SDE: its first- and second-order terms are the ODE's
        // with h doubled).
        let hh = if sde { 2.0 * h } else { h };
        let em1 = (-hh).exp() - 1.0;
        let x_coeff = if sde {
            t.sigma_t / s0.sigma_t * (-h).exp()
        } else {
            t.sigma_t / s0.sigma_t
        };
        let noise = if sde {
            t.sigma_t * (1.0 - (-2.0 * h).exp()).sqrt()
        } else {
            0.0
        };
        // Coefficients of D0, D1, D2 in x_t (after the x term).
        let terms = if c.solver_order == 1 || lower_order_nums < 1 || lower_order_final {
            vec![(0, -t.alpha_t * em1)]
        } else if c.solver_order == 2 || lower_order_nums < 2 || lower_order_second {
            let s1 = points[i - 1];
            let r0 = (s0.lambda - s1.lambda) / h;
            let c_d0 = -t.alpha_t * em1;
            let c_d1 = match c.solver_type {
                SolverType::Midpoint => -0.5 * t.alpha_t * em1,
                SolverType::Heun => t.alpha_t * (em1 / hh + 1.0),
            };
            // D1 = (m0 − m1)/r0.
            vec![(0, c_d0 + c_d1 / r0), (1, -c_d1 / r0)]
        } else {
            let (s1, s2) = (points[i - 1], points[i - 2]);
            let (h0, h1) = (s0.lambda - s1.lambda, s1.lambda - s2.lambda);
            let (r0, r1) = (h0 / h, h1 / h);
            let c_d0 = -t.alpha_t * em1;
            let c_d1 = t.alpha_t * (em1 / hh + 1.0);
            // diffusers: α_t((1 − e^−2h − 2h)/(2h)² − 0.5) for the SDE.
            let c_d2 = if sde {
                -t.alpha_t * ((em1 + hh) / (hh * hh) + 0.5)
            } else {
                -t.alpha_t * ((em1 + h) / (h * h) - 0.5)
            };
            // D1_0 = (m0 − m1)/r0, D1_1 = (m1 − m2)/r1, D1 = D1_0 + k·(D1_0 − D1_1) with
            // k = r0/(r0 + r1), D2 = (D1_0 − D1_1)/(r0 + r1).
            let k = r0 / (r0 + r1);
            let c10 = c_d1 * (1.0 + k) + c_d2 / (r0 + r1); // coefficient of D1_0
            let c11 = -c_d1 * k - c_d2 / (r0 + r1); // coefficient of D1_1
            vec![
                (0, c_d0 + c10 / r0),
                (1, -c10 / r0 + c11 / r1),
                (2, -c11 / r1),
            ]
        };
        steps.push(Step {
            timestep,
            sigma: s0.sigma,
            input_scale: 1.0,
            denoised_x: dx,
            denoised_output: d_o,
            denoised_clamp: None,
            x_coeff,
            output_coeff: 0.0,
            denoised_terms: terms,
            corrector: None,
            noise,
        });
    }
    steps
}

impl Scheduler for DpmSolverMultistep {
    fn class_name(&self) -> &'static str {
        "DPMSolverMultistepScheduler"
    }

    fn steps(&self) -> &[Step] {
        &self.steps
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.sigmas.iter().map(|&s| f64::from(s)).collect())
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn history_len(&self) -> usize {
        self.config.solver_order - 1
    }

    fn steps_from(&self, start: usize) -> std::borrow::Cow<'_, [Step]> {
        let timesteps: Vec<f64> = self.steps.iter().map(|s| s.timestep).collect();
        build_steps(&self.config, &timesteps, &self.sigmas, start).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orders(c: DpmSolverMultistepConfig, n: usize) -> Vec<usize> {
        DpmSolverMultistep::new(c, n, None)
            .map(|s| s.steps().iter().map(|s| s.denoised_terms.len()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn order_schedule_follows_diffusers() {
        let c = DpmSolverMultistepConfig::default();
        // Fewer than 15 steps: first, then second, the last one first (final sigma zero).
        assert_eq!(orders(c.clone(), 5), vec![1, 2, 2, 2, 1]);
        // 15 or more: only the zero final sigma lowers the last step.
        let mut o = vec![2; 15];
        o[0] = 1;
        o[14] = 1;
        assert_eq!(orders(c.clone(), 15), o);
        // With sigma_min and no lower_order_final, the last step stays second order.
        let c2 = DpmSolverMultistepConfig {
            final_sigmas_type: FinalSigmasType::SigmaMin,
            lower_order_final: false,
            ..c.clone()
        };
        assert_eq!(orders(c2, 4), vec![1, 2, 2, 2]);
        let c3 = DpmSolverMultistepConfig {
            solver_order: 3,
            ..c
        };
        assert_eq!(orders(c3, 6), vec![1, 2, 3, 3, 2, 1]);
    }

    #[test]
    fn unsupported_options_are_errors() {
        let bad = [
            ("algorithm_type", "sde-dpmsolver"),
            ("solver_order", "4"),
            ("thresholding", "true"),
            ("use_lu_lambdas", "true"),
            ("variance_type", "learned_range"),
            ("rescale_betas_zero_snr", "true"),
        ];
        for (k, v) in bad {
            let c = DpmSolverMultistepConfig::from_fields([(k, v)]);
            assert!(
                c.is_ok_and(|c| DpmSolverMultistep::new(c, 10, None).is_err()),
                "{k}"
            );
        }
        let c = DpmSolverMultistepConfig::default();
        assert!(DpmSolverMultistep::new(c.clone(), 0, None).is_err());
        assert!(DpmSolverMultistep::new(c, 10, Some(0.5)).is_err());
    }
}
