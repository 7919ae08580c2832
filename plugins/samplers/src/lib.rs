//! `ditflow-samplers`: the schedulers' maths, in plain Rust, shared by the sampling nodes of every
//! plugin (steps apply to f64 vectors or, through the SDK, to tensors): nine diffusers schedulers,
//! each reduced to per-model-call scalar coefficients that a sampling node applies with tensor ops.
//!
//! | diffusers class                  | here                                       |
//! |----------------------------------|--------------------------------------------|
//! | `DDIMScheduler` (eta = 0)        | [`ddim::Ddim`]                             |
//! | `EulerDiscreteScheduler`         | [`euler::EulerDiscrete`]                   |
//! | `EulerAncestralDiscreteScheduler`| [`euler::EulerAncestralDiscrete`]          |
//! | `HeunDiscreteScheduler`          | [`heun::HeunDiscrete`]                     |
//! | `DPMSolverMultistepScheduler`    | [`dpmpp_2m::DpmSolverMultistep`] (ODE, SDE)|
//! | `LCMScheduler`                   | [`lcm::Lcm`]                               |
//! | `FlowMatchEulerDiscreteScheduler`| [`flow_match::FlowMatchEulerDiscrete`]     |
//! | `FlowMatchHeunDiscreteScheduler` | [`heun::HeunDiscrete::flow_match`]         |
//! | `UniPCMultistepScheduler`        | [`unipc::UniPc`]                           |
//! | `DDIMInverseScheduler`           | [`ddim::DdimInverse`]                      |
//! | RF-Solver (not in diffusers)     | [`rf_solver::RfSolver`], and its inversion |
//!
//! [`guidance`] combines each step's conditional and unconditional predictions (CFG, APG, CFG
//! rescale, a guidance interval) as diffusers' guiders do; [`preview`] renders a step's x₀
//! estimate for a preview event.
//!
//! Every scheduler is built from its config (the fields of diffusers' `scheduler_config.json`,
//! with diffusers' defaults) and the number of inference steps, and then is a fixed list of
//! [`Step`]s. Each step says at which `timestep` to call the model, how to scale the model's
//! input, and how to get the next sample as a linear combination:
//!
//! ```text
//! input     = input_scale · x                       (the model is called as model(input, timestep))
//! denoised  = denoised_x · x + denoised_output · out   (then clamped to ±denoised_clamp if set)
//! x_used    = x, or with a corrector: last · x_last + Σ (k, c) in its terms: c · denoised[k]
//! x_next    = x_coeff · x_used + output_coeff · out + Σ (k, c) in denoised_terms: c · denoised[k]
//!             + noise · ε                           (ε: fresh unit noise, for stochastic steps)
//! ```
//!
//! where `out` is the model's output for this step, `denoised[k]` is the denoised estimate (the
//! x₀ prediction) of the step `k` steps back (`denoised[0]` is this step's, `denoised[1]` the
//! previous step's), and `x_last` is the previous step's `x_used` (a predictor-corrector such as
//! UniPC corrects the sample the model saw before predicting from it). [`apply_step`] is that
//! rule, for any [`Combine`] sample type, with a [`History`]; [`Scheduler::history_len`] says how
//! many previous estimates it keeps. The sampling loop is the one of diffusers' pipelines:
//! `x = noise · init_noise_sigma`, then one model call and one update per step; [`run`] is that
//! loop on plain `f64` vectors.
//!
//! A step is one model call. Methods with two calls per step (Heun) are two steps, the second
//! correcting from the sample the first started at (`x_last`), as diffusers interleaves them.
//! Stochastic methods (ancestral, SDE, LCM) add fresh noise at a step (`noise`); the sampling
//! nodes draw it from the counter-based RNG as stream `step + 1` of the seed
//! ([`step_noise_stream`]), so a seed gives the same trajectory on every device.
//!
//! Precision: the schedule tables are computed the way diffusers computes them, including the
//! places where diffusers stores them in float32 (betas, `alphas_cumprod`, sigmas, float
//! timesteps), so timesteps and sigmas match diffusers' to the last float32 bit or within one
//! float32 ulp (PyTorch's float32 `sqrt` on the CPU is not always correctly rounded, so a training
//! sigma can differ by one ulp); every coefficient is then computed in f64 from those values.
//! diffusers computes its coefficients from float32 scalars and casts the sample to float32 inside
//! `step` (Euler, DPM-Solver, flow matching), so the two trajectories differ by float32 rounding:
//! about 1e-7 relative to the sample's size, more for elements near zero (the parity tests allow
//! 1e-5; see `tests.rs`).

pub mod config;
pub mod ddim;
pub mod dpmpp_2m;
pub mod euler;
pub mod flow_match;
pub mod guidance;
pub mod heun;
pub mod lcm;
pub mod preview;
pub mod rf_solver;
pub mod schedule;
pub mod unipc;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;

pub use config::{
    build_inversion, build_scheduler, quote_python_constants, scheduler_fields, scheduler_for,
    ModelPrediction, Sampler, CLASSES, CUSTOM_SIGMA_CLASSES, INVERSIONS, SAMPLERS,
};
pub use ddim::{Ddim, DdimConfig, DdimInverse};
pub use dpmpp_2m::{DpmSolverMultistep, DpmSolverMultistepConfig, SolverType};
pub use euler::{EulerAncestralDiscrete, EulerDiscrete, EulerDiscreteConfig, TimestepType};
pub use flow_match::{
    calculate_shift, FlowMatchEulerDiscrete, FlowMatchEulerDiscreteConfig, TimeShiftType,
};
pub use heun::{HeunDiscrete, HeunDiscreteConfig};
pub use lcm::{Lcm, LcmConfig};
pub use rf_solver::{Direction, FlowEulerInversion, RfSolver};
pub use schedule::{BetaSchedule, SigmaSource};
pub use unipc::{UniPc, UniPcConfig, UniPcSolverType};

/// An error from building a scheduler or running one: an unsupported option, a bad value, a
/// step count diffusers refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamplerError(pub String);

impl fmt::Display for SamplerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SamplerError {}

/// The result type of this module.
pub type Result<T> = std::result::Result<T, SamplerError>;

/// Returns early with a [`SamplerError`] made from a format string.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::SamplerError(format!($($arg)*)))
    };
}
pub(crate) use fail;

/// One sampler step as scalars (see the module docs for how they combine).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The timestep the model is called with at this step.
    pub timestep: f64,
    /// The noise level at this step, as the model's per-call context reports it: σ for flow
    /// matching and Euler, and the equivalent `√((1 − ᾱ)/ᾱ)` for DDIM and DPM-Solver.
    pub sigma: f64,
    /// The model is called with `input_scale · x` (diffusers' `scale_model_input`).
    pub input_scale: f64,
    /// `denoised = denoised_x · x + denoised_output · out`: this step's x₀ estimate.
    pub denoised_x: f64,
    /// See [`Step::denoised_x`].
    pub denoised_output: f64,
    /// When set, the denoised estimate is clamped to `[-c, c]` (DDIM's `clip_sample`).
    pub denoised_clamp: Option<f64>,
    /// `x_next = x_coeff · x + output_coeff · out + Σ c · denoised[k]`.
    pub x_coeff: f64,
    /// See [`Step::x_coeff`].
    pub output_coeff: f64,
    /// `(k, c)` pairs: `c` times the denoised estimate of `k` steps back (`0` = this step).
    pub denoised_terms: Vec<(usize, f64)>,
    /// A corrector replacing `x` in the update (UniPC, Heun's second call), or none.
    pub corrector: Option<Corrector>,
    /// The factor of fresh unit noise added to `x_next` (0 for a deterministic step).
    pub noise: f64,
}

/// A corrected sample, `last · x_last + Σ (k, c) c · denoised[k]`, where `x_last` is the sample
/// the previous step's update started from.
#[derive(Debug, Clone, PartialEq)]
pub struct Corrector {
    pub last: f64,
    pub denoised_terms: Vec<(usize, f64)>,
}

impl Step {
    /// Whether the update uses any denoised estimate (this step's or an earlier one).
    pub fn uses_denoised(&self) -> bool {
        !self.denoised_terms.is_empty() || self.corrector.is_some()
    }
}

/// Refuses a schedule with a non-finite timestep or coefficient (a sigma of 0 where a step
/// divides by it, shifted sigmas that are 0/0, ...): diffusers would run it and produce NaNs.
pub(crate) fn check_finite(class: &str, init_noise_sigma: f64, steps: &[Step]) -> Result<()> {
    if !init_noise_sigma.is_finite() {
        fail!("{class}: the schedule's init_noise_sigma is not finite ({init_noise_sigma})");
    }
    for (i, s) in steps.iter().enumerate() {
        let values = [
            s.timestep,
            s.input_scale,
            s.denoised_x,
            s.denoised_output,
            s.x_coeff,
            s.output_coeff,
            s.noise,
        ];
        let terms = s.denoised_terms.iter().map(|&(_, c)| c);
        let corrector = s
            .corrector
            .iter()
            .flat_map(|c| std::iter::once(c.last).chain(c.denoised_terms.iter().map(|&(_, v)| v)));
        if !values
            .into_iter()
            .chain(terms)
            .chain(corrector)
            .all(f64::is_finite)
        {
            fail!(
                "{class}: step {i} of the schedule is not finite (timestep {}); the config and \
                 step count give a degenerate schedule",
                s.timestep
            );
        }
    }
    Ok(())
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        fail!("the {what} has {got} elements but the sample has {want}");
    }
    Ok(())
}

/// What every scheduler offers once built for a number of inference steps.
/// How a clean sample `x₀` and unit noise `ε` make the sample at noise level `σ` (a step's
/// [`Step::sigma`]), for holding known parts of a latent at each step's level (frames given as
/// context, masked regions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Noising {
    /// Flow matching: `(1 − σ)·x₀ + σ·ε`.
    Flow,
    /// Variance exploding (Euler on a VP model's sigmas, k-diffusion style): `x₀ + σ·ε`.
    Exploding,
    /// Variance preserving (DDIM, DPM-Solver, UniPC without flow sigmas):
    /// `(x₀ + σ·ε) / √(1 + σ²)`, i.e. `√ᾱ·x₀ + √(1 − ᾱ)·ε`.
    Preserving,
}

impl Noising {
    /// `(a, b)` with the sample `a·x₀ + b·ε` at `sigma`.
    pub fn coefficients(self, sigma: f64) -> (f64, f64) {
        match self {
            Noising::Flow => (1.0 - sigma, sigma),
            Noising::Exploding => (1.0, sigma),
            Noising::Preserving => {
                let n = (1.0 + sigma * sigma).sqrt();
                (1.0 / n, sigma / n)
            }
        }
    }
}

pub trait Scheduler {
    /// The diffusers class this scheduler reproduces (e.g. `"DDIMScheduler"`).
    fn class_name(&self) -> &'static str;

    /// The steps, in sampling order.
    fn steps(&self) -> &[Step];

    /// The factor the initial noise is multiplied by (diffusers' `init_noise_sigma`).
    fn init_noise_sigma(&self) -> f64;

    /// How a clean sample and noise make this scheduler's sample at a step's `sigma`.
    fn noising(&self) -> Noising {
        Noising::Preserving
    }

    /// How many previous denoised estimates a step may refer to (0 for one-step methods). A
    /// caller keeps the denoised estimates of that many previous steps (from every step, whether
    /// or not that step's own update used its estimate).
    fn history_len(&self) -> usize {
        0
    }

    /// The sigmas (noise levels) of the schedulers that have them (float32 values, as diffusers
    /// keeps them): one per step, then the final one. `None` for DDIM.
    fn sigmas(&self) -> Option<Vec<f64>> {
        None
    }

    /// The number of steps (the number of model calls).
    fn num_steps(&self) -> usize {
        self.steps().len()
    }

    /// Model calls per inference step (diffusers' `order`: 2 for Heun, else 1).
    fn order(&self) -> usize {
        1
    }

    /// The steps when sampling starts at step `start` (image-to-image), index for index with
    /// [`Scheduler::steps`]: the same steps, except that a multistep solver restarts its order
    /// count at `start`, as diffusers' does once its begin index is set there.
    fn steps_from(&self, _start: usize) -> std::borrow::Cow<'_, [Step]> {
        self.steps().into()
    }

    /// The timesteps the model is called with, one per step.
    fn timesteps(&self) -> Vec<f64> {
        self.steps().iter().map(|s| s.timestep).collect()
    }

    /// The factor the model input is multiplied by at `step` (1.0 except for Euler; 1.0 for a
    /// step past the end).
    fn model_input_scale(&self, step: usize) -> f64 {
        self.steps().get(step).map_or(1.0, |s| s.input_scale)
    }
}

/// A config from `(key, value)` text pairs over its defaults, applying each with `set`; keys
/// `set` does not know (`Ok(false)`) are ignored, as diffusers ignores them.
pub(crate) fn config_from_fields<'a, C: Default>(
    fields: impl IntoIterator<Item = (&'a str, &'a str)>,
    set: impl Fn(&mut C, &str, &str) -> Result<bool>,
) -> Result<C> {
    let mut c = C::default();
    for (k, v) in fields {
        set(&mut c, k, v)?;
    }
    Ok(c)
}

/// The arithmetic a step needs from a sample: scaling, adding and clamping, so that plain
/// vectors ([`run`]) and tensors (the sampling node) apply steps by one rule.
pub trait Combine: Sized + Clone {
    /// The error of the sample's operations.
    type Error;
    /// A schedule's error (a missing estimate) as the sample's error.
    fn sampler_error(e: SamplerError) -> Self::Error;
    fn scaled(&self, c: f64) -> std::result::Result<Self, Self::Error>;
    fn plus(&self, other: &Self) -> std::result::Result<Self, Self::Error>;
    fn clamped(&self, c: f64) -> std::result::Result<Self, Self::Error>;
}

impl Combine for Vec<f64> {
    type Error = SamplerError;
    fn sampler_error(e: SamplerError) -> SamplerError {
        e
    }
    fn scaled(&self, c: f64) -> Result<Self> {
        Ok(self.iter().map(|v| v * c).collect())
    }
    fn plus(&self, other: &Self) -> Result<Self> {
        check_len("term", other.len(), self.len())?;
        Ok(self.iter().zip(other).map(|(a, b)| a + b).collect())
    }
    fn clamped(&self, c: f64) -> Result<Self> {
        Ok(self.iter().map(|v| v.clamp(-c, c)).collect())
    }
}

/// Tensors as samples, for the sampling nodes: a scheduler's error becomes the node's.
impl Combine for ditflow_plugin::Tensor {
    type Error = ditflow_plugin::Error;
    fn sampler_error(e: SamplerError) -> ditflow_plugin::Error {
        ditflow_plugin::Error(e.0)
    }
    fn scaled(&self, c: f64) -> ditflow_plugin::Result<Self> {
        self.affine(c, 0.0)
    }
    fn plus(&self, other: &Self) -> ditflow_plugin::Result<Self> {
        self.add(other)
    }
    fn clamped(&self, c: f64) -> ditflow_plugin::Result<Self> {
        self.clamp(-c as f32, c as f32)
    }
}

/// What a trajectory keeps between steps: the latest denoised estimates (most recent first) and
/// the sample the last update started from.
pub struct History<T> {
    denoised: VecDeque<T>,
    last: Option<T>,
    keep: usize,
}

impl<T> History<T> {
    /// A fresh history for `scheduler`.
    pub fn new<S: Scheduler + ?Sized>(scheduler: &S) -> History<T> {
        History {
            denoised: VecDeque::new(),
            last: None,
            keep: scheduler.history_len(),
        }
    }

    fn estimate(&self, k: usize, step: usize) -> Result<&T> {
        match self.denoised.get(k) {
            Some(d) => Ok(d),
            None => fail!(
                "step {step} needs the denoised estimate of {k} step(s) back, but only {} are kept",
                self.denoised.len()
            ),
        }
    }
}

/// The first model call of image-to-image with strength `denoise` over `steps` inference steps,
/// as diffusers' img2img pipelines cut the schedule (`get_timesteps`): `t_start·order` with
/// `t_start = ⌊steps − min(steps·denoise, steps)⌋`.
pub fn img2img_start(steps: usize, denoise: f64, order: usize) -> usize {
    let n = steps as f64;
    let kept = (n * denoise).min(n);
    ((n - kept).max(0.0) as usize) * order
}

/// Whether sampling can start at step `start` with an empty history: no step of
/// [`Scheduler::steps_from`] from there reads an estimate from before `start`.
pub fn can_start_at<S: Scheduler + ?Sized>(scheduler: &S, start: usize) -> bool {
    scheduler
        .steps_from(start)
        .iter()
        .enumerate()
        .skip(start)
        .all(|(i, s)| {
            let made = i - start; // estimates made since `start`, before this step's own
            let reads = |terms: &[(usize, f64)]| terms.iter().all(|&(k, _)| k <= made);
            reads(&s.denoised_terms)
                && s.corrector
                    .as_ref()
                    .is_none_or(|c| i == start || reads(&c.denoised_terms))
        })
}

/// The RNG stream of the fresh noise of step `index` (stream 0 is the starting noise).
pub fn step_noise_stream(index: usize) -> u64 {
    index as u64 + 1
}

/// Step `index` from sample `x` with model output `out` (see the module docs): returns the next
/// sample and updates `history`. `noise` is the step's fresh unit noise, needed when
/// `step.noise` is not 0.
pub fn apply_step<T: Combine>(
    step: &Step,
    index: usize,
    x: &T,
    out: &T,
    noise: Option<&T>,
    history: &mut History<T>,
) -> std::result::Result<T, T::Error> {
    let terms = |base: T, terms: &[(usize, f64)], h: &History<T>| {
        terms.iter().try_fold(base, |acc, &(k, c)| {
            let d = h.estimate(k, index).map_err(T::sampler_error)?;
            acc.plus(&d.scaled(c)?)
        })
    };
    if step.uses_denoised() || history.keep > 0 {
        let mut d = x
            .scaled(step.denoised_x)?
            .plus(&out.scaled(step.denoised_output)?)?;
        if let Some(c) = step.denoised_clamp {
            d = d.clamped(c)?;
        }
        history.denoised.push_front(d);
        history.denoised.truncate(history.keep + 1);
    }
    let used = match (&step.corrector, &history.last) {
        (Some(c), Some(last)) => terms(last.scaled(c.last)?, &c.denoised_terms, history)?,
        _ => x.clone(),
    };
    let next = used
        .scaled(step.x_coeff)?
        .plus(&out.scaled(step.output_coeff)?)?;
    let next = terms(next, &step.denoised_terms, history)?;
    let next = if step.noise == 0.0 {
        next
    } else {
        let Some(noise) = noise else {
            return Err(T::sampler_error(SamplerError(format!(
                "step {index} adds noise, but no noise was given"
            ))));
        };
        next.plus(&noise.scaled(step.noise)?)?
    };
    if step.corrector.is_some() || history.keep > 0 {
        history.last = Some(used);
    }
    Ok(next)
}

/// Runs a whole trajectory on plain vectors, as diffusers' pipelines do: the start is
/// `noise · init_noise_sigma`, and each step calls `model(input_scale · x, timestep)`; a
/// stochastic step adds `step_noise(i)`. Returns every sample: the start, then the sample after
/// each step (`num_steps() + 1` vectors).
pub fn run<S, F, N>(
    scheduler: &S,
    noise: Vec<f64>,
    model: F,
    step_noise: N,
) -> Result<Vec<Vec<f64>>>
where
    S: Scheduler + ?Sized,
    F: FnMut(&[f64], f64) -> Vec<f64>,
    N: FnMut(usize) -> Vec<f64>,
{
    let sigma = scheduler.init_noise_sigma();
    let x = noise.into_iter().map(|v| v * sigma).collect();
    run_from(scheduler, 0, x, model, step_noise)
}

/// [`run`] from sample `x` at step `start` (image-to-image's cut schedule): returns the start,
/// then the sample after each step from `start` on.
pub fn run_from<S, F, N>(
    scheduler: &S,
    start: usize,
    x: Vec<f64>,
    mut model: F,
    mut step_noise: N,
) -> Result<Vec<Vec<f64>>>
where
    S: Scheduler + ?Sized,
    F: FnMut(&[f64], f64) -> Vec<f64>,
    N: FnMut(usize) -> Vec<f64>,
{
    let mut x = x;
    let mut trajectory = Vec::with_capacity(scheduler.num_steps() + 1);
    trajectory.push(x.clone());
    let mut history = History::new(scheduler);
    let steps = scheduler.steps_from(start);
    for (i, step) in steps.iter().enumerate().skip(start) {
        let input: Vec<f64> = x.iter().map(|v| v * step.input_scale).collect();
        let out = model(&input, step.timestep);
        check_len("model output", out.len(), x.len())?;
        let fresh = if step.noise == 0.0 {
            None
        } else {
            let n = step_noise(i);
            check_len("step noise", n.len(), x.len())?;
            Some(n)
        };
        x = apply_step(step, i, &x, &out, fresh.as_ref(), &mut history)?;
        trajectory.push(x.clone());
    }
    Ok(trajectory)
}

/// The prediction a model makes (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PredictionType {
    /// `"epsilon"`: the noise.
    #[default]
    Epsilon,
    /// `"v_prediction"`: the velocity `α·ε − σ·x₀`.
    VPrediction,
    /// `"sample"` (or `"original_sample"`): the clean sample x₀.
    Sample,
    /// `"flow_prediction"`: the flow-matching velocity `ε − x₀`.
    FlowPrediction,
}

impl FromStr for PredictionType {
    type Err = SamplerError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "epsilon" => Self::Epsilon,
            "v_prediction" => Self::VPrediction,
            "sample" | "original_sample" => Self::Sample,
            "flow_prediction" => Self::FlowPrediction,
            _ => fail!(
                "unknown prediction_type {s:?}; expected epsilon, v_prediction, sample or \
                 flow_prediction"
            ),
        })
    }
}

/// How inference timesteps are spread over the training timesteps (diffusers'
/// `timestep_spacing`; see Table 2 of "Common Diffusion Noise Schedules and Sample Steps are
/// Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `"linspace"`: evenly from the last training timestep to 0.
    Linspace,
    /// `"leading"`: multiples of `num_train_timesteps / steps`, plus `steps_offset`.
    Leading,
    /// `"trailing"`: counted back from the last training timestep.
    Trailing,
}

impl FromStr for TimestepSpacing {
    type Err = SamplerError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "linspace" => Self::Linspace,
            "leading" => Self::Leading,
            "trailing" => Self::Trailing,
            _ => fail!("unknown timestep_spacing {s:?}; expected linspace, leading or trailing"),
        })
    }
}

/// The sigma after the last step (diffusers' `final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FinalSigmasType {
    /// `"zero"`: the last step lands on the clean sample.
    #[default]
    Zero,
    /// `"sigma_min"`: the last step lands on the smallest training sigma.
    SigmaMin,
}

impl FromStr for FinalSigmasType {
    type Err = SamplerError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "zero" => Self::Zero,
            "sigma_min" => Self::SigmaMin,
            _ => fail!("unknown final_sigmas_type {s:?}; expected zero or sigma_min"),
        })
    }
}

/// Parsing of config values written as text (`scheduler_config.json` values, fixture metadata):
/// booleans, numbers, strings with or without JSON quotes, and `null`/`None` for an absent value.
pub(crate) mod value {
    use super::Result;
    use std::str::FromStr;

    fn unquote(v: &str) -> &str {
        let v = v.trim();
        v.strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v)
    }

    /// Whether the text stands for an absent value.
    pub fn is_null(v: &str) -> bool {
        matches!(unquote(v), "null" | "None" | "")
    }

    /// diffusers types some flags `bool | None`; `None` is false.
    pub fn opt_bool(key: &str, v: &str) -> Result<bool> {
        if is_null(v) {
            Ok(false)
        } else {
            boolean(key, v)
        }
    }

    pub fn boolean(key: &str, v: &str) -> Result<bool> {
        match unquote(v) {
            "true" | "True" => Ok(true),
            "false" | "False" => Ok(false),
            other => fail!("{key}: expected true or false, got {other:?}"),
        }
    }

    pub fn float(key: &str, v: &str) -> Result<f64> {
        let t = unquote(v);
        match t {
            "inf" | "Infinity" => return Ok(f64::INFINITY),
            "-inf" | "-Infinity" => return Ok(f64::NEG_INFINITY),
            _ => {}
        }
        match t.parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(x),
            _ => fail!("{key}: expected a number, got {t:?}"),
        }
    }

    pub fn opt_float(key: &str, v: &str) -> Result<Option<f64>> {
        if is_null(v) {
            Ok(None)
        } else {
            float(key, v).map(Some)
        }
    }

    pub fn count(key: &str, v: &str) -> Result<usize> {
        let t = unquote(v);
        match t.parse::<usize>() {
            Ok(n) => Ok(n),
            Err(_) => fail!("{key}: expected a non-negative integer, got {t:?}"),
        }
    }

    pub fn int(key: &str, v: &str) -> Result<i64> {
        let t = unquote(v);
        match t.parse::<i64>() {
            Ok(n) => Ok(n),
            Err(_) => fail!("{key}: expected an integer, got {t:?}"),
        }
    }

    pub fn text(v: &str) -> String {
        unquote(v).to_string()
    }

    pub fn parsed<T: FromStr<Err = super::SamplerError>>(v: &str) -> Result<T> {
        unquote(v).parse()
    }

    /// A list of numbers, `[a, b, ...]`, or `null`.
    pub fn opt_floats(key: &str, v: &str) -> Result<Option<Vec<f64>>> {
        if is_null(v) {
            return Ok(None);
        }
        let t = v.trim();
        let Some(inner) = t.strip_prefix('[').and_then(|t| t.strip_suffix(']')) else {
            fail!("{key}: expected a list of numbers like [0.1, 0.2], got {t:?}");
        };
        if inner.trim().is_empty() {
            return Ok(Some(Vec::new()));
        }
        inner
            .split(',')
            .map(|x| float(key, x))
            .collect::<Result<_>>()
            .map(Some)
    }
}
