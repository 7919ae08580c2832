//! RF-Solver (Wang et al., "Taming Rectified Flow for Inversion and Editing", 2024): a
//! second-order solver of the rectified-flow ODE `dx/dσ = v(x, σ)` for flow models, and its
//! inversion (the same steps up the noise levels, from a clean sample to its noise), which makes
//! inversion-based editing work: invert an image under its prompt, then sample from the result
//! under an edited prompt.
//!
//! A step from σᵢ to σᵢ₊₁ (Δ = σᵢ₊₁ − σᵢ) is the paper's second-order Taylor update, with the
//! velocity's derivative taken from a half step:
//!
//! ```text
//! vᵢ = v(xᵢ, σᵢ);   x_mid = xᵢ + Δ/2·vᵢ;   v_mid = v(x_mid, σᵢ + Δ/2);   v' = (v_mid − vᵢ)/(Δ/2)
//! xᵢ₊₁ = xᵢ + Δ·vᵢ + ½Δ²·v'   ( = xᵢ + Δ·v_mid )
//! ```
//!
//! so two model calls: the first lands on x_mid, the second starts again from xᵢ (its
//! [`Corrector`]'s `x_last`). The sigmas are flow matching's (`FlowMatchEulerDiscreteScheduler`'s
//! for the same config, shift and step count); inversion walks them backwards from 0. The model
//! is called at timestep `σ · num_train_timesteps`. [`FlowEulerInversion`] is plain Euler up the
//! same sigmas, the first-order baseline.

use super::flow_match::{FlowMatchEulerDiscrete, FlowMatchEulerDiscreteConfig};
use super::schedule::SigmaSource;
use super::{Corrector, Result, Scheduler, Step};

/// Which way a flow solver walks the sigmas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From noise (σ₀) down to the clean sample (σ = 0).
    Sample,
    /// From the clean sample (σ = 0) up to the noise (σ₀).
    Invert,
}

/// The flow sigmas a solver walks, in its direction (one more than the steps).
fn walked_sigmas(
    config: FlowMatchEulerDiscreteConfig,
    steps: usize,
    sigmas: SigmaSource,
    mu: Option<f64>,
    direction: Direction,
) -> Result<(Vec<f64>, f64)> {
    let n_train = config.num_train_timesteps as f64;
    let euler = FlowMatchEulerDiscrete::new(config, steps, sigmas, mu)?;
    let mut s = euler.sigmas().unwrap_or_default();
    if direction == Direction::Invert {
        s.reverse();
    }
    Ok((s, n_train))
}

/// A flow step's common part: the model called at σ (timestep σ·N), x̂₀ = x − σ·v.
fn flow_call(sigma: f64, n_train: f64) -> Step {
    Step {
        timestep: sigma * n_train,
        sigma,
        input_scale: 1.0,
        denoised_x: 1.0,
        denoised_output: -sigma,
        denoised_clamp: None,
        x_coeff: 1.0,
        output_coeff: 0.0,
        denoised_terms: Vec::new(),
        corrector: None,
        noise: 0.0,
    }
}

/// RF-Solver over flow-matching sigmas, sampling or inverting.
#[derive(Debug, Clone)]
pub struct RfSolver {
    sigmas: Vec<f64>,
    steps: Vec<Step>,
    direction: Direction,
}

impl RfSolver {
    /// RF-Solver for `steps` steps (2·steps model calls) over the sigmas that
    /// `FlowMatchEulerDiscreteScheduler` would use for `config`, `sigmas` and `mu`.
    pub fn new(
        config: FlowMatchEulerDiscreteConfig,
        steps: usize,
        sigmas: SigmaSource,
        mu: Option<f64>,
        direction: Direction,
    ) -> Result<Self> {
        let (sigmas, n_train) = walked_sigmas(config, steps, sigmas, mu, direction)?;
        let mut calls = Vec::with_capacity(2 * steps);
        for w in sigmas.windows(2) {
            let (s, dt) = (w[0], w[1] - w[0]);
            calls.push(Step {
                output_coeff: 0.5 * dt,
                ..flow_call(s, n_train)
            });
            calls.push(Step {
                output_coeff: dt,
                corrector: Some(Corrector {
                    last: 1.0,
                    denoised_terms: Vec::new(),
                }),
                ..flow_call(s + 0.5 * dt, n_train)
            });
        }
        super::check_finite("RF-Solver", 1.0, &calls)?;
        Ok(Self {
            sigmas,
            steps: calls,
            direction,
        })
    }
}

impl Scheduler for RfSolver {
    fn class_name(&self) -> &'static str {
        match self.direction {
            Direction::Sample => "RFSolver",
            Direction::Invert => "RFSolverInversion",
        }
    }

    fn steps(&self) -> &[Step] {
        &self.steps
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.sigmas.clone())
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn noising(&self) -> crate::Noising {
        crate::Noising::Flow
    }

    fn history_len(&self) -> usize {
        // Keeps the sample each pair started from.
        1
    }

    fn order(&self) -> usize {
        2
    }
}

/// Euler's method up the flow sigmas, from a clean sample to its noise: `xᵢ₊₁ = xᵢ + Δ·v(xᵢ, σᵢ)`.
#[derive(Debug, Clone)]
pub struct FlowEulerInversion {
    sigmas: Vec<f64>,
    steps: Vec<Step>,
}

impl FlowEulerInversion {
    /// The inversion for `steps` steps over `FlowMatchEulerDiscreteScheduler`'s sigmas.
    pub fn new(
        config: FlowMatchEulerDiscreteConfig,
        steps: usize,
        sigmas: SigmaSource,
        mu: Option<f64>,
    ) -> Result<Self> {
        let (sigmas, n_train) = walked_sigmas(config, steps, sigmas, mu, Direction::Invert)?;
        let calls: Vec<Step> = sigmas
            .windows(2)
            .map(|w| Step {
                output_coeff: w[1] - w[0],
                ..flow_call(w[0], n_train)
            })
            .collect();
        super::check_finite("flow Euler inversion", 1.0, &calls)?;
        Ok(Self {
            sigmas,
            steps: calls,
        })
    }
}

impl Scheduler for FlowEulerInversion {
    fn class_name(&self) -> &'static str {
        "FlowMatchEulerInversion"
    }

    fn steps(&self) -> &[Step] {
        &self.steps
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.sigmas.clone())
    }

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
    use crate::run;

    /// A smooth stand-in velocity field.
    fn velocity(x: &[f64], t: f64) -> Vec<f64> {
        x.iter()
            .enumerate()
            .map(|(i, &v)| 0.4 * v * (t / 700.0).cos() - 0.2 * (v + i as f64 + t / 400.0).sin())
            .collect()
    }

    /// RF-Solver as the paper's code writes its loop, in f64 (timesteps in [0, 1]; the model
    /// gets t·1000).
    fn reference(x: &[f64], ts: &[f64]) -> Vec<f64> {
        let mut img = x.to_vec();
        for w in ts.windows(2) {
            let (t_curr, t_prev) = (w[0], w[1]);
            let pred = velocity(&img, t_curr * 1000.0);
            let mid: Vec<f64> = img
                .iter()
                .zip(&pred)
                .map(|(a, p)| a + (t_prev - t_curr) / 2.0 * p)
                .collect();
            let pred_mid = velocity(&mid, (t_curr + (t_prev - t_curr) / 2.0) * 1000.0);
            for ((a, p), pm) in img.iter_mut().zip(&pred).zip(&pred_mid) {
                let first_order = (pm - p) / ((t_prev - t_curr) / 2.0);
                *a += (t_prev - t_curr) * p + 0.5 * (t_prev - t_curr).powi(2) * first_order;
            }
        }
        img
    }

    #[test]
    fn sampling_and_inversion_follow_the_papers_update() {
        // Tolerance 1e-12 relative: the same arithmetic regrouped, in f64.
        let config = FlowMatchEulerDiscreteConfig {
            shift: 3.0,
            ..FlowMatchEulerDiscreteConfig::default()
        };
        let x = vec![0.7, -1.2, 0.05, 2.0];
        for direction in [Direction::Sample, Direction::Invert] {
            let s = RfSolver::new(config.clone(), 6, SigmaSource::Pipeline, None, direction)
                .expect("a solver");
            assert_eq!(s.num_steps(), 12);
            let sigmas = s.sigmas().expect("sigmas");
            let ours = run(&s, x.clone(), velocity, |_| Vec::new()).expect("a trajectory");
            let want = reference(&x, &sigmas);
            let last = ours.last().expect("samples");
            for (a, b) in last.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                    "{direction:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn inversion_walks_the_sampling_sigmas_backwards() {
        let c = FlowMatchEulerDiscreteConfig::default();
        let up = RfSolver::new(c.clone(), 4, SigmaSource::Pipeline, None, Direction::Invert)
            .expect("a solver");
        let down = RfSolver::new(c.clone(), 4, SigmaSource::Pipeline, None, Direction::Sample)
            .expect("a solver");
        let mut s = down.sigmas().expect("sigmas");
        s.reverse();
        assert_eq!(up.sigmas(), Some(s));
        assert_eq!(up.steps()[0].sigma, 0.0);
        let e = FlowEulerInversion::new(c, 4, SigmaSource::Pipeline, None).expect("euler");
        assert_eq!(e.num_steps(), 4);
        assert!(RfSolver::new(
            FlowMatchEulerDiscreteConfig::default(),
            0,
            SigmaSource::Pipeline,
            None,
            Direction::Sample
        )
        .is_err());
    }
}
