//! UniPC (Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
//! Diffusion Models"): diffusers' `UniPCMultistepScheduler`
//! (`schedulers/scheduling_unipc_multistep.py`) with `predict_x0`, the B(h) variants `bh1`
//! (B(h) = −h) and `bh2` (B(h) = e^−h − 1), and flow sigmas (Wan's default).
//!
//! With α_t, σ_t the signal and noise scales at a sigma, `λ = ln α_t − ln σ_t`, `h = λ_t − λ_s0`
//! and `m_k` the x₀ estimates of this step (`m0`) and earlier ones, step i is
//!
//! ```text
//! corrector (i > 0):  x_c = (σ_t/σ_s0)·x_last − α_t·(e^−h − 1)·m0
//!                             − α_t·B(h)·(Σ_k ρc_k·D1_k + ρc_last·(m_t − m0))
//!                     (t, s0 = steps i and i−1; m0 the previous estimate, m_t this step's;
//!                      x_last the sample the previous predictor started from)
//! predictor:          x_next = (σ_t/σ_s0)·x_c − α_t·(e^−h − 1)·m0 − α_t·B(h)·Σ_k ρp_k·D1_k
//!                     (t, s0 = steps i+1 and i)
//! D1_k = (m_k − m0)/r_k,  r_k = (λ_sk − λ_s0)/h
//! ```
//!
//! and the ρ solve diffusers' small linear systems (`ρp = [½]` at order 2, `ρc = [½]` at
//! order 1). Orders follow diffusers' `step`: warm-up from 1, `lower_order_final` lowering the
//! last steps, and the corrector at the order of the previous predictor, skipped after the
//! steps in `disable_corrector`.
//!
//! One difference: with `bh1` and a final sigma of zero, diffusers multiplies B(h) = −∞ by 0 on
//! the last step and returns NaN; here the last step gives its limit, the x₀ estimate.

use super::schedule::{self, point, BetaSchedule, Point};
use super::{
    fail, value, Corrector, FinalSigmasType, PredictionType, Result, Scheduler, Step,
    TimeShiftType, TimestepSpacing,
};
use std::str::FromStr;

/// The B(h) of UniPC's update (diffusers' `solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UniPcSolverType {
    /// `"bh1"`: B(h) = −h (for few steps, unconditional sampling).
    Bh1,
    /// `"bh2"`: B(h) = e^−h − 1 (also diffusers' aliases `midpoint`, `heun`, `logrho`).
    #[default]
    Bh2,
}

impl FromStr for UniPcSolverType {
    type Err = super::SamplerError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "bh1" => Self::Bh1,
            "bh2" | "midpoint" | "heun" | "logrho" => Self::Bh2,
            _ => fail!("unknown solver_type {s:?}; expected bh1 or bh2"),
        })
    }
}

/// The fields of a `UniPCMultistepScheduler` config, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct UniPcConfig {
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
    /// Work on x₀ estimates (true; false, the noise form, is not supported).
    pub predict_x0: bool,
    /// B(h) (`bh2`).
    pub solver_type: UniPcSolverType,
    /// Lower the order of the last steps (true).
    pub lower_order_final: bool,
    /// Steps after which no corrector runs (none).
    pub disable_corrector: Vec<usize>,
    /// Karras sigmas (false).
    pub use_karras_sigmas: bool,
    /// Exponential sigmas (not supported: must be false).
    pub use_exponential_sigmas: bool,
    /// Beta-distribution sigmas (not supported: must be false).
    pub use_beta_sigmas: bool,
    /// Flow-matching sigmas (false).
    pub use_flow_sigmas: bool,
    /// The flow sigmas' shift (1.0).
    pub flow_shift: f64,
    /// Timestep spacing (`linspace`).
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps (0).
    pub steps_offset: i64,
    /// The sigma after the last step (`zero`).
    pub final_sigmas_type: FinalSigmasType,
    /// Zero-terminal-SNR rescaling (not supported: must be false).
    pub rescale_betas_zero_snr: bool,
    /// Flow sigmas shifted by `mu` instead of `flow_shift` (false).
    pub use_dynamic_shifting: bool,
    /// The dynamic shift's form (`exponential`).
    pub time_shift_type: TimeShiftType,
    /// Stretch flow sigmas so the last is this (none).
    pub shift_terminal: Option<f64>,
}

impl Default for UniPcConfig {
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
            predict_x0: true,
            solver_type: UniPcSolverType::Bh2,
            lower_order_final: true,
            disable_corrector: Vec::new(),
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            final_sigmas_type: FinalSigmasType::Zero,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: TimeShiftType::Exponential,
            shift_terminal: None,
        }
    }
}

impl UniPcConfig {
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
            "predict_x0" => self.predict_x0 = value::boolean(key, v)?,
            "solver_type" => self.solver_type = value::parsed(v)?,
            "lower_order_final" => self.lower_order_final = value::boolean(key, v)?,
            "disable_corrector" => {
                self.disable_corrector = value::opt_floats(key, v)?
                    .unwrap_or_default()
                    .into_iter()
                    .map(|f| {
                        if f >= 0.0 && f.fract() == 0.0 {
                            Ok(f as usize)
                        } else {
                            fail!("{key}: expected step indices, got {f}")
                        }
                    })
                    .collect::<Result<_>>()?
            }
            "use_karras_sigmas" => self.use_karras_sigmas = value::opt_bool(key, v)?,
            "use_exponential_sigmas" => self.use_exponential_sigmas = value::opt_bool(key, v)?,
            "use_beta_sigmas" => self.use_beta_sigmas = value::opt_bool(key, v)?,
            "use_flow_sigmas" => self.use_flow_sigmas = value::opt_bool(key, v)?,
            "flow_shift" => self.flow_shift = value::float(key, v)?,
            "timestep_spacing" => self.timestep_spacing = value::parsed(v)?,
            "steps_offset" => self.steps_offset = value::int(key, v)?,
            "final_sigmas_type" => self.final_sigmas_type = value::parsed(v)?,
            "rescale_betas_zero_snr" => self.rescale_betas_zero_snr = value::boolean(key, v)?,
            "use_dynamic_shifting" => self.use_dynamic_shifting = value::boolean(key, v)?,
            "time_shift_type" => self.time_shift_type = value::parsed(v)?,
            "shift_terminal" => self.shift_terminal = value::opt_float(key, v)?,
            // Only used with thresholding, or not used by the schedule at all.
            "dynamic_thresholding_ratio"
            | "sample_max_value"
            | "sigma_min"
            | "sigma_max"
            | "solver_p" => {}
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// A config from `(key, value)` text pairs over the defaults; unknown keys are ignored.
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self> {
        super::config_from_fields(fields, Self::set)
    }
}

/// `UniPCMultistepScheduler` set up for a number of inference steps.
#[derive(Debug, Clone)]
pub struct UniPc {
    config: UniPcConfig,
    sigmas: Vec<f32>,
    steps: Vec<Step>,
}

const CLASS: &str = "UniPCMultistepScheduler";

impl UniPc {
    /// Builds the scheduler for `num_inference_steps` steps (diffusers' `__init__` then
    /// `set_timesteps(num_inference_steps, mu=mu)`); `mu` is needed exactly when
    /// `use_dynamic_shifting`.
    pub fn new(config: UniPcConfig, num_inference_steps: usize, mu: Option<f64>) -> Result<Self> {
        let c = &config;
        if !(1..=3).contains(&c.solver_order) {
            fail!(
                "{CLASS}: solver_order must be 1, 2 or 3, got {}",
                c.solver_order
            );
        }
        if c.thresholding {
            fail!("{CLASS}: thresholding is not supported");
        }
        if !c.predict_x0 {
            fail!("{CLASS}: predict_x0 = false (the noise-prediction form) is not supported");
        }
        if c.use_exponential_sigmas || c.use_beta_sigmas {
            fail!("{CLASS}: exponential and beta sigmas are not supported");
        }
        if c.rescale_betas_zero_snr {
            fail!("{CLASS}: rescale_betas_zero_snr is not supported");
        }
        if c.shift_terminal.is_some() && !c.use_flow_sigmas {
            fail!("{CLASS}: shift_terminal needs use_flow_sigmas");
        }
        match (c.use_dynamic_shifting, mu) {
            (true, None) => fail!("{CLASS}: use_dynamic_shifting needs mu"),
            (_, Some(m)) if !m.is_finite() => fail!("{CLASS}: mu must be finite, got {m}"),
            _ => {}
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
        let n = num_inference_steps;
        let mut timesteps =
            schedule::multistep_timesteps(c.timestep_spacing, n_train, n_train, n, c.steps_offset)?;
        let sigmas: Vec<f64> = if c.use_karras_sigmas {
            let sigmas =
                schedule::karras_sigmas(f64::from(table[0]), f64::from(table[n_train - 1]), n);
            if c.use_flow_sigmas {
                let flow: Vec<f64> = sigmas.iter().map(|s| s / (s + 1.0)).collect();
                timesteps = flow.iter().map(|s| (s * n_train as f64).trunc()).collect();
                flow
            } else {
                let log_sigmas = schedule::log_f32(&table);
                timesteps = sigmas
                    .iter()
                    .map(|&s| schedule::round_half_even(schedule::sigma_to_t(s, &log_sigmas)))
                    .collect();
                sigmas
            }
        } else if c.use_flow_sigmas {
            let base = schedule::np_linspace(1.0, 1.0 / n_train as f64, n + 1);
            let mut sigmas: Vec<f64> = base[..n]
                .iter()
                .map(|&s| match mu {
                    Some(mu) if c.use_dynamic_shifting => {
                        let m = match c.time_shift_type {
                            TimeShiftType::Exponential => mu.exp(),
                            TimeShiftType::Linear => mu,
                        };
                        m / (m + (1.0 / s - 1.0))
                    }
                    _ => c.flow_shift * s / (1.0 + (c.flow_shift - 1.0) * s),
                })
                .collect();
            if let Some(terminal) = c.shift_terminal {
                let last = 1.0 - sigmas[n - 1];
                let scale = last / (1.0 - terminal);
                for s in &mut sigmas {
                    *s = 1.0 - (1.0 - *s) / scale;
                }
            }
            if (sigmas[0] - 1.0).abs() < 1e-6 {
                // diffusers keeps log(α) finite at the first step.
                sigmas[0] -= 1e-6;
            }
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
            FinalSigmasType::SigmaMin if c.use_flow_sigmas || c.use_karras_sigmas => {
                sigmas[n - 1] as f32
            }
            FinalSigmasType::SigmaMin => table[0],
        };
        let sigmas: Vec<f32> = sigmas
            .iter()
            .map(|&s| s as f32)
            .chain(std::iter::once(last))
            .collect();
        let steps = build_steps(c, &timesteps, &sigmas, 0)?;
        super::check_finite(CLASS, 1.0, &steps)?;
        Ok(Self {
            config,
            sigmas,
            steps,
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &UniPcConfig {
        &self.config
    }
}

/// The pieces of one B(h) update from `s0` to `t` at `order`, with the λ of the earlier points
/// it reaches back to (`earlier[k]` for D1_(k+1)): `(h_phi_1, B_h, r_k, b)`.
fn bh_terms(
    c: &UniPcConfig,
    s0: Point,
    t: Point,
    earlier: &[f64],
    order: usize,
) -> (f64, f64, Vec<f64>, Vec<f64>) {
    let h = t.lambda - s0.lambda;
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let b_h = match c.solver_type {
        UniPcSolverType::Bh1 => hh,
        UniPcSolverType::Bh2 => hh.exp_m1(),
    };
    let rks: Vec<f64> = earlier.iter().map(|l| (l - s0.lambda) / h).collect();
    let mut b = Vec::with_capacity(order);
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial = 1.0;
    for i in 1..=order {
        b.push(h_phi_k * factorial / b_h);
        factorial *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }
    (h_phi_1, b_h, rks, b)
}

/// Solves `R·ρ = b` for `R[j][k] = r_k^j` (`r` the r_k then 1 when `with_one`), as diffusers'
/// `torch.linalg.solve` does (Gaussian elimination with partial pivoting).
fn solve_rhos(rks: &[f64], with_one: bool, b: &[f64]) -> Vec<f64> {
    let mut r: Vec<f64> = rks.to_vec();
    if with_one {
        r.push(1.0);
    }
    let n = r.len();
    let mut m: Vec<Vec<f64>> = (0..n)
        .map(|j| {
            let mut row: Vec<f64> = r.iter().map(|rk| rk.powi(j as i32)).collect();
            row.push(b[j]);
            row
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))
            .unwrap_or(col);
        m.swap(col, pivot);
        let (top, rest) = m.split_at_mut(col + 1);
        let pivot_row = &top[col];
        for row in rest.iter_mut() {
            let f = row[col] / pivot_row[col];
            for (v, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *v -= f * p;
            }
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| m[row][k] * x[k]).sum();
        x[row] = (m[row][n] - s) / m[row][row];
    }
    x
}

/// The steps for `timesteps` and `sigmas`, sampling from step `start` (the order count starts
/// there, as diffusers' restarts with a begin index; steps before it are built as from 0).
fn build_steps(
    c: &UniPcConfig,
    timesteps: &[f64],
    sigmas: &[f32],
    start: usize,
) -> Result<Vec<Step>> {
    let n = timesteps.len();
    let flow = c.use_flow_sigmas;
    let p: Vec<Point> = sigmas.iter().map(|&s| point(flow, s)).collect();
    // The predictor's order at each step (diffusers' `this_order`).
    let orders: Vec<usize> = (0..n)
        .map(|i| {
            let cap = if c.lower_order_final {
                c.solver_order.min(n - i)
            } else {
                c.solver_order
            };
            cap.min(i.checked_sub(start).unwrap_or(i).min(c.solver_order) + 1)
        })
        .collect();
    let mut steps = Vec::with_capacity(n);
    for (i, &timestep) in timesteps.iter().enumerate() {
        let (s0, t) = (p[i], p[i + 1]);
        let (dx, d_o) = match c.prediction_type {
            PredictionType::Epsilon => (1.0 / s0.alpha_t, -s0.sigma_t / s0.alpha_t),
            PredictionType::Sample => (0.0, 1.0),
            PredictionType::VPrediction => (s0.alpha_t, -s0.sigma_t),
            PredictionType::FlowPrediction => (1.0, -s0.sigma),
        };
        // The corrector, at the previous predictor's order, over the step from i−1 to i.
        let corrector = if i > 0 && !c.disable_corrector.contains(&(i - 1)) {
            let order = orders[i - 1];
            let (cs0, ct) = (p[i - 1], p[i]);
            // D1_k reaches back to step i−1−k, the estimate k+1 steps back.
            let earlier: Vec<f64> = (1..order).map(|k| p[i - 1 - k].lambda).collect();
            let (h_phi_1, b_h, rks, b) = bh_terms(c, cs0, ct, &earlier, order);
            let rhos = if order == 1 {
                vec![0.5]
            } else {
                solve_rhos(&rks, true, &b)
            };
            let g = ct.alpha_t * b_h;
            let last_rho = rhos[order - 1];
            let mut terms = vec![(0, -g * last_rho)];
            let mut c_m0 = -ct.alpha_t * h_phi_1 + g * last_rho;
            for (k, (rho, rk)) in rhos[..order - 1].iter().zip(&rks).enumerate() {
                c_m0 += g * rho / rk;
                terms.push((k + 2, -g * rho / rk));
            }
            terms.insert(1, (1, c_m0));
            Some(Corrector {
                last: ct.sigma_t / cs0.sigma_t,
                denoised_terms: terms,
            })
        } else {
            None
        };
        // The predictor from step i to i+1.
        let order = orders[i];
        let earlier: Vec<f64> = (1..order).map(|k| p[i - k].lambda).collect();
        let (h_phi_1, b_h, rks, b) = bh_terms(c, s0, t, &earlier, order);
        let rhos = match order {
            1 => Vec::new(),
            2 => vec![0.5],
            _ => solve_rhos(&rks[..order - 1], false, &b[..order - 1]),
        };
        let x_coeff = t.sigma_t / s0.sigma_t;
        let g = t.alpha_t * b_h;
        let mut c_m0 = -t.alpha_t * h_phi_1;
        let mut terms = Vec::with_capacity(order);
        for (k, (rho, rk)) in rhos.iter().zip(&rks).enumerate() {
            c_m0 += g * rho / rk;
            terms.push((k + 1, -g * rho / rk));
        }
        terms.insert(0, (0, c_m0));
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
            corrector,
            noise: 0.0,
        });
    }
    Ok(steps)
}

impl Scheduler for UniPc {
    fn class_name(&self) -> &'static str {
        CLASS
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

    fn noising(&self) -> crate::Noising {
        if self.config.use_flow_sigmas {
            crate::Noising::Flow
        } else {
            crate::Noising::Preserving
        }
    }

    /// The corrector reaches one step further back than the predictor.
    fn history_len(&self) -> usize {
        self.config.solver_order
    }

    fn steps_from(&self, start: usize) -> std::borrow::Cow<'_, [Step]> {
        let timesteps: Vec<f64> = self.steps.iter().map(|s| s.timestep).collect();
        match build_steps(&self.config, &timesteps, &self.sigmas, start) {
            Ok(steps) => steps.into(),
            // Built from the same values once already.
            Err(_) => self.steps.as_slice().into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orders(c: UniPcConfig, n: usize) -> Vec<(usize, usize)> {
        UniPc::new(c, n, None)
            .unwrap()
            .steps()
            .iter()
            .map(|s| {
                (
                    s.denoised_terms.len(),
                    s.corrector.as_ref().map_or(0, |c| c.denoised_terms.len()),
                )
            })
            .collect()
    }

    #[test]
    fn orders_follow_diffusers_step() {
        // Order 2, 5 steps: predictor 1, 2, 2, 2, 1 (lower_order_final); the corrector at the
        // previous predictor's order reads one estimate more (this step's).
        let c = UniPcConfig::default();
        assert_eq!(
            orders(c.clone(), 5),
            vec![(1, 0), (2, 2), (2, 3), (2, 3), (1, 3)]
        );
        let c3 = UniPcConfig {
            solver_order: 3,
            disable_corrector: vec![0],
            ..c
        };
        assert_eq!(orders(c3, 5), vec![(1, 0), (2, 0), (3, 3), (2, 4), (1, 3)]);
    }

    #[test]
    fn the_linear_solve_matches_a_known_system() {
        // r = (2, 1): [[1, 1], [2, 1]] ρ = (3, 5) → ρ = (2, 1).
        let x = solve_rhos(&[2.0], true, &[3.0, 5.0]);
        assert!(
            (x[0] - 2.0).abs() < 1e-12 && (x[1] - 1.0).abs() < 1e-12,
            "{x:?}"
        );
    }

    #[test]
    fn unsupported_options_are_errors() {
        for (k, v) in [
            ("solver_order", "4"),
            ("thresholding", "true"),
            ("predict_x0", "false"),
            ("use_beta_sigmas", "true"),
            ("rescale_betas_zero_snr", "true"),
            ("shift_terminal", "0.1"),
        ] {
            let c = UniPcConfig::from_fields([(k, v)]).unwrap();
            assert!(UniPc::new(c, 10, None).is_err(), "{k}");
        }
        let dynamic = UniPcConfig::from_fields([("use_dynamic_shifting", "true")]).unwrap();
        assert!(UniPc::new(dynamic, 10, None).is_err());
        assert!(UniPc::new(UniPcConfig::default(), 0, None).is_err());
    }
}
