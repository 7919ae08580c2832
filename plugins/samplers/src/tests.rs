//! Parity tests against diffusers: the fixtures in `tests/fixtures/samplers/` (made by
//! `tools/make_sampler_fixtures.py`) hold diffusers' timesteps, sigmas and whole trajectories for
//! a stand-in model; each is rebuilt here from its metadata and compared.
//!
//! Tolerances:
//! - timesteps and sigmas of the tables (float32 in diffusers): relative 1e-6, i.e. a few float32
//!   ulps; most match exactly.
//! - trajectories: every element of every step within 1e-5 relative, |ours − theirs| ≤ 1e-5 ·
//!   max(|theirs|, 1e-2 · max|step|) (the floor keeps elements that pass near zero from asking
//!   for absolute precision finer than float32 rounding of the step's larger values, which
//!   diffusers' float32 coefficients and casts cause). Measured: at most 6.4e-7, except
//!   `ddim_defaults_clip` at 8.1e-6, on an element of 0.004 in a step of size 0.49; there
//!   diffusers' own run with float64 `alphas_cumprod` differs from its float32 run by the same
//!   8.1e-6 (checked in Python), so it is diffusers' float32 rounding, amplified by DDIM's
//!   division by √ᾱ_t at high noise.

use super::*;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;

const TRAJECTORY_RTOL: f64 = 1e-5;
const TABLE_RTOL: f64 = 1e-6;

fn fixture_dir() -> String {
    format!(
        "{}/../../tests/fixtures/samplers",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn read(name: &str) -> Vec<u8> {
    let path = format!("{}/{name}.safetensors", fixture_dir());
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

fn metadata(bytes: &[u8]) -> HashMap<String, String> {
    let (_, meta) = SafeTensors::read_metadata(bytes).expect("a safetensors header");
    meta.metadata().clone().unwrap_or_default()
}

fn floats(st: &SafeTensors, name: &str) -> Vec<f64> {
    let view = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("tensor {name}: {e}"));
    let data = view.data();
    match view.dtype() {
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes"))))
            .collect(),
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64)
            .collect(),
        other => panic!("tensor {name}: unexpected dtype {other:?}"),
    }
}

/// The stand-in model of the fixtures.
fn stand_in_model(x: &[f64], t: f64) -> Vec<f64> {
    x.iter()
        .map(|&v| 0.3 * v * (t / 300.0).cos() + 0.1 * (v + t / 500.0).sin())
        .collect()
}

/// Builds the scheduler a fixture describes: `meta` keys under `prefix` ("scheduler",
/// "config.KEY", "mu", "sigmas_source").
fn build(meta: &HashMap<String, String>, prefix: &str, steps: usize) -> Box<dyn Scheduler> {
    try_build(meta, prefix, steps).unwrap_or_else(|e| panic!("{prefix} with {steps} steps: {e}"))
}

/// [`build`], returning the scheduler's own error.
fn try_build(
    meta: &HashMap<String, String>,
    prefix: &str,
    steps: usize,
) -> Result<Box<dyn Scheduler>> {
    let get = |k: &str| meta.get(&format!("{prefix}{k}")).map(String::as_str);
    let class = get("scheduler").expect("a scheduler class");
    let config_prefix = format!("{prefix}config.");
    let fields: Vec<(&str, &str)> = meta
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(&config_prefix)?, v.as_str())))
        .collect();
    let mu = get("mu").map(|m| m.parse::<f64>().expect("mu is a number"));
    // Every field of the fixture must be one the config knows.
    macro_rules! config {
        ($t:ty) => {{
            let mut c = <$t>::default();
            for (k, v) in &fields {
                assert_eq!(c.set(k, v), Ok(true), "{class}: field {k} = {v}");
            }
            c
        }};
    }
    match class {
        "DDIMScheduler" => {
            Ddim::new(config!(DdimConfig), steps).map(|s| Box::new(s) as Box<dyn Scheduler>)
        }
        "DDIMInverseScheduler" => {
            DdimInverse::new(config!(DdimConfig), steps).map(|s| Box::new(s) as Box<dyn Scheduler>)
        }
        "EulerDiscreteScheduler" => match get("custom_sigmas") {
            // The Python list diffusers was given, "[14.6, 9.0, ...]".
            Some(list) => {
                let sigmas: Vec<f64> = list
                    .trim_matches(|c| c == '[' || c == ']')
                    .split(',')
                    .map(|v| v.trim().parse().expect("a sigma"))
                    .collect();
                EulerDiscrete::with_sigmas(config!(EulerDiscreteConfig), steps, &sigmas)
            }
            None => EulerDiscrete::new(config!(EulerDiscreteConfig), steps),
        }
        .map(|s| Box::new(s) as Box<dyn Scheduler>),
        "EulerAncestralDiscreteScheduler" => {
            EulerAncestralDiscrete::new(config!(EulerDiscreteConfig), steps)
                .map(|s| Box::new(s) as Box<dyn Scheduler>)
        }
        "HeunDiscreteScheduler" => HeunDiscrete::new(config!(HeunDiscreteConfig), steps)
            .map(|s| Box::new(s) as Box<dyn Scheduler>),
        "FlowMatchHeunDiscreteScheduler" => {
            HeunDiscrete::flow_match(config!(FlowMatchEulerDiscreteConfig), steps)
                .map(|s| Box::new(s) as Box<dyn Scheduler>)
        }
        "LCMScheduler" => {
            Lcm::new(config!(LcmConfig), steps).map(|s| Box::new(s) as Box<dyn Scheduler>)
        }
        "DPMSolverMultistepScheduler" => {
            DpmSolverMultistep::new(config!(DpmSolverMultistepConfig), steps, mu)
                .map(|s| Box::new(s) as Box<dyn Scheduler>)
        }
        "FlowMatchEulerDiscreteScheduler" => {
            let sigmas = match get("sigmas_source") {
                Some("pipeline") => SigmaSource::Pipeline,
                Some("scheduler_default") => SigmaSource::SchedulerDefault,
                other => panic!("unknown sigmas_source {other:?}"),
            };
            FlowMatchEulerDiscrete::new(config!(FlowMatchEulerDiscreteConfig), steps, sigmas, mu)
                .map(|s| Box::new(s) as Box<dyn Scheduler>)
        }
        "UniPCMultistepScheduler" => {
            UniPc::new(config!(UniPcConfig), steps, mu).map(|s| Box::new(s) as Box<dyn Scheduler>)
        }
        other => panic!("unknown scheduler {other}"),
    }
}

/// Max relative error of `ours` against `theirs`, NaNs equal to NaNs.
fn rel_err(ours: &[f64], theirs: &[f64]) -> f64 {
    assert_eq!(ours.len(), theirs.len(), "lengths differ");
    ours.iter()
        .zip(theirs)
        .map(|(&a, &b)| {
            if a.is_nan() && b.is_nan() || a == b {
                0.0
            } else {
                (a - b).abs() / b.abs()
            }
        })
        .fold(0.0, f64::max)
}

const TRAJECTORIES: &[&str] = &[
    "ddim_leading_epsilon",
    "ddim_trailing_v",
    "ddim_defaults_clip",
    "ddim_linspace_sample_clip",
    "euler_leading_epsilon",
    "euler_linspace_epsilon",
    "euler_karras_v",
    "euler_continuous_v_sigma_min",
    "dpmpp_2m_10",
    "dpmpp_2m_20",
    "dpmpp_2m_karras_10",
    "dpmpp_2m_karras_20_v",
    "dpmpp_2m_heun_sigma_min",
    "dpmpp_3m_karras_12",
    "dpmpp_2m_flow_shift3",
    "dpmpp_2m_flow_dynamic",
    "flow_static_shift3",
    "flow_dynamic_1024",
    "flow_sd3_default_shift3",
    "unipc_bh2_flow_shift5",
    "unipc_bh2_flow_dynamic",
    "unipc_bh1_sigma_min_epsilon",
    "unipc_3_karras_v",
    "unipc_trailing_disable_corrector",
    "unipc_3_leading_sample",
    "euler_ancestral_epsilon",
    "euler_ancestral_leading_v",
    "dpmpp_2m_sde_karras",
    "dpmpp_2m_sde_heun_v",
    "dpmpp_3m_sde_karras",
    "heun_epsilon",
    "heun_karras_v",
    "heun_trailing_sample_clip",
    "flow_heun_shift3",
    "lcm_4",
    "lcm_6_v_clip",
    "dpmpp_2m_from_3",
    "dpmpp_3m_sde_from_2",
    "unipc_bh2_flow_from_4",
    "unipc_3_from_2",
    "euler_beta_v",
    "dpmpp_2m_exponential",
    "euler_custom_sigmas_epsilon",
    "euler_custom_sigmas_v_end",
    "ddim_inverse_leading_epsilon",
    "ddim_inverse_trailing_v",
];

#[test]
fn trajectories_match_diffusers() {
    let mut report = Vec::new();
    for name in TRAJECTORIES {
        let bytes = read(name);
        let meta = metadata(&bytes);
        let st = SafeTensors::deserialize(&bytes).expect("a safetensors file");
        let steps: usize = meta["steps"].parse().expect("steps");
        let s = build(&meta, "", steps);

        // Started part-way: the timesteps from there, and the run from the given sample.
        let start: usize = meta.get("start").map_or(0, |v| v.parse().expect("start"));
        let ts = floats(&st, "timesteps");
        let t_err = rel_err(&s.timesteps()[start * s.order()..], &ts);
        assert!(t_err <= TABLE_RTOL, "{name}: timesteps differ by {t_err:e}");
        let init: f64 = meta["init_noise_sigma"].parse().expect("init_noise_sigma");
        let i_err = rel_err(&[s.init_noise_sigma()], &[init]);
        assert!(
            i_err <= TABLE_RTOL,
            "{name}: init_noise_sigma {} vs {init}",
            s.init_noise_sigma()
        );
        if let Ok(theirs) = st.tensor("sigmas").map(|_| floats(&st, "sigmas")) {
            let ours = s.sigmas().expect("sigmas");
            let e = rel_err(&ours, &theirs);
            assert!(e <= TABLE_RTOL, "{name}: sigmas differ by {e:e}");
        }

        let noise = floats(&st, "noise");
        let n = noise.len();
        // A stochastic scheduler's fresh noise, one row per model call (ditflow's Philox
        // streams, replayed in PyTorch by the fixture script).
        let fresh = st
            .tensor("step_noise")
            .map(|_| floats(&st, "step_noise"))
            .ok();
        let step_noise = |i: usize| match &fresh {
            Some(f) => f[i * n..(i + 1) * n].to_vec(),
            None => panic!("{name}: step {i} adds noise, and the fixture has none"),
        };
        let theirs = floats(&st, "trajectory");
        let ours = if start > 0 {
            let from = start * s.order();
            run_from(s.as_ref(), from, noise.clone(), stand_in_model, step_noise)
        } else {
            run(s.as_ref(), noise.clone(), stand_in_model, step_noise)
        }
        .expect("a trajectory");
        // One sample per model call, plus the start (Heun makes two calls per step).
        assert_eq!(ours.len(), theirs.len() / n, "{name}");
        let mut worst = 0.0f64;
        for (i, x) in ours.iter().enumerate() {
            let want = &theirs[i * n..(i + 1) * n];
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (j, (&a, &b)) in x.iter().zip(want).enumerate() {
                let err = (a - b).abs() / b.abs().max(1e-2 * scale);
                worst = worst.max(err);
                assert!(
                    err <= TRAJECTORY_RTOL,
                    "{name}: step {i} element {j}: ours {a} vs diffusers {b} (rel. error {err:e})"
                );
            }
        }
        report.push(format!("{name}: max rel. error {worst:.2e}"));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn timestep_and_sigma_tables_match_diffusers() {
    let bytes = read("tables");
    let meta = metadata(&bytes);
    let st = SafeTensors::deserialize(&bytes).expect("a safetensors file");
    let cases = meta["cases"].clone();
    let mut report = Vec::new();
    for case in cases.split(',') {
        let prefix = format!("{case}.");
        let counts = floats(&st, &format!("{case}.steps"));
        let lengths = floats(&st, &format!("{case}.lengths"));
        let ts = floats(&st, &format!("{case}.timesteps"));
        let sig = st
            .tensor(&format!("{case}.sigmas"))
            .ok()
            .map(|_| floats(&st, &format!("{case}.sigmas")));
        let (mut t_at, mut s_at) = (0usize, 0usize);
        // (bit-exact, total) timesteps, then sigmas.
        let (mut t_exact, mut s_exact) = ((0usize, 0usize), (0usize, 0usize));
        for (&count, &len) in counts.iter().zip(&lengths) {
            let (count, len) = (count as usize, len as usize);
            let theirs = &ts[t_at..t_at + len];
            t_at += len;
            let their_sigmas = sig.as_ref().map(|sig| &sig[s_at..s_at + len + 1]);
            s_at += len + 1;
            let nan = theirs
                .iter()
                .chain(their_sigmas.unwrap_or(&[]))
                .any(|v| v.is_nan());
            if nan {
                // diffusers makes NaNs here (e.g. a stretched single sigma, 0/0); we refuse.
                let r = try_build(&meta, &prefix, count);
                assert!(
                    r.is_err(),
                    "{case} with {count} steps: NaNs in diffusers, no error"
                );
                report.push(format!(
                    "{case} with {count} steps: NaNs in diffusers, an error here"
                ));
                continue;
            }
            let s = build(&meta, &prefix, count);
            let ours = s.timesteps();
            assert_eq!(
                ours.len(),
                len,
                "{case} with {count} steps: number of timesteps"
            );
            let e = rel_err(&ours, theirs);
            assert!(
                e <= TABLE_RTOL,
                "{case} with {count} steps: timesteps {ours:?} vs {theirs:?}"
            );
            t_exact.0 += ours.iter().zip(theirs).filter(|(a, b)| a == b).count();
            t_exact.1 += len;
            if let Some(theirs) = their_sigmas {
                let ours = s.sigmas().expect("sigmas");
                let e = rel_err(&ours, theirs);
                assert!(
                    e <= TABLE_RTOL,
                    "{case} with {count} steps: sigmas {ours:?} vs {theirs:?}"
                );
                s_exact.0 += ours.iter().zip(theirs).filter(|(a, b)| a == b).count();
                s_exact.1 += len + 1;
            }
        }
        report.push(format!(
            "{case}: bit-exact timesteps {}/{}, sigmas {}/{}",
            t_exact.0, t_exact.1, s_exact.0, s_exact.1
        ));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn run_rejects_a_model_output_of_the_wrong_size() {
    let s = Ddim::new(DdimConfig::default(), 3).expect("a scheduler");
    let r = run(&s, vec![0.5; 4], |_, _| vec![0.0; 3], |_| Vec::new());
    assert!(r.is_err());
    // A step reading an estimate the history does not hold (the first step reads one back).
    let mut step = s.steps()[0].clone();
    step.denoised_terms.push((1, 1.0));
    let mut history = History::new(&s);
    assert!(
        apply_step(&step, 0, &vec![1.0], &vec![1.0], None, &mut history).is_err(),
        "missing denoised estimate"
    );
    // A stochastic step without its noise, and with noise of the wrong size.
    let s = EulerAncestralDiscrete::new(EulerDiscreteConfig::default(), 3).expect("a scheduler");
    let mut history = History::new(&s);
    let step = &s.steps()[0];
    assert!(apply_step(step, 0, &vec![1.0], &vec![1.0], None, &mut history).is_err());
    let r = run(&s, vec![0.5; 4], |x, _| x.to_vec(), |_| vec![0.0; 3]);
    assert!(r.is_err(), "step noise of the wrong size");
}

/// Odd configs and step counts give a scheduler or an error, never a panic, and a built
/// scheduler runs.
#[test]
fn odd_inputs_never_panic() {
    let counts = [1, 2, 3, 14, 15, 16, 999, 1000, 1001, 5000, usize::MAX];
    let model = |x: &[f64], t: f64| stand_in_model(x, t);
    let mut built = 0;
    let mut check = |s: Result<Box<dyn Scheduler>>| {
        if let Ok(s) = s {
            built += 1;
            if s.num_steps() <= 1001 {
                let _ = run(s.as_ref(), vec![0.5, -1.0], model, |_| vec![0.1, -0.1]);
            }
            let _ = (s.timesteps(), s.sigmas(), s.model_input_scale(usize::MAX));
        }
    };
    let spacings = ["linspace", "leading", "trailing"];
    let odd_floats = ["0", "-1", "1e300", "NaN", "inf", "-inf"];
    for &n in &counts {
        for spacing in spacings {
            for offset in ["0", "1", "-5", "1000"] {
                let f = [("timestep_spacing", spacing), ("steps_offset", offset)];
                check(
                    DdimConfig::from_fields(f)
                        .and_then(|c| Ddim::new(c, n))
                        .map(boxed),
                );
                for karras in ["false", "true"] {
                    let f = [f[0], f[1], ("use_karras_sigmas", karras)];
                    check(
                        EulerDiscreteConfig::from_fields(f)
                            .and_then(|c| EulerDiscrete::new(c, n))
                            .map(boxed),
                    );
                    for flow in ["false", "true"] {
                        let f = [f[0], f[1], f[2], ("use_flow_sigmas", flow)];
                        check(
                            DpmSolverMultistepConfig::from_fields(f)
                                .and_then(|c| DpmSolverMultistep::new(c, n, None))
                                .map(boxed),
                        );
                    }
                    // The other classes, through the by-name builder (SDE DPM++ with a
                    // third order too).
                    let text: Vec<(String, String)> = f
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    for class in [
                        "EulerAncestralDiscreteScheduler",
                        "HeunDiscreteScheduler",
                        "LCMScheduler",
                        "DPMSolverMultistepScheduler",
                    ] {
                        let mut fields = text.clone();
                        if class.starts_with("DPM") {
                            fields.push(("algorithm_type".into(), "\"sde-dpmsolver++\"".into()));
                            fields.push(("solver_order".into(), "3".into()));
                        }
                        check(build_scheduler(
                            class,
                            &fields,
                            n,
                            256,
                            SigmaSource::Pipeline,
                        ));
                    }
                }
            }
        }
        for key in ["beta_start", "beta_end", "num_train_timesteps"] {
            for v in odd_floats.iter().chain(&["2", "1"]) {
                let f = [(key, *v)];
                check(
                    DdimConfig::from_fields(f)
                        .and_then(|c| Ddim::new(c, n))
                        .map(boxed),
                );
                check(
                    EulerDiscreteConfig::from_fields(f)
                        .and_then(|c| EulerDiscrete::new(c, n))
                        .map(boxed),
                );
                check(
                    DpmSolverMultistepConfig::from_fields(f)
                        .and_then(|c| DpmSolverMultistep::new(c, n, None))
                        .map(boxed),
                );
            }
        }
        for key in ["shift", "shift_terminal", "num_train_timesteps"] {
            for v in odd_floats {
                for (dynamic, mu) in [
                    ("false", None),
                    ("true", Some(f64::NAN)),
                    ("true", Some(0.7)),
                ] {
                    let f = [(key, v), ("use_dynamic_shifting", dynamic)];
                    for src in [SigmaSource::Pipeline, SigmaSource::SchedulerDefault] {
                        check(
                            FlowMatchEulerDiscreteConfig::from_fields(f)
                                .and_then(|c| FlowMatchEulerDiscrete::new(c, n, src, mu))
                                .map(boxed),
                        );
                    }
                    check(
                        FlowMatchEulerDiscreteConfig::from_fields(f)
                            .and_then(|c| HeunDiscrete::flow_match(c, n))
                            .map(boxed),
                    );
                }
            }
        }
    }
    assert!(built > 100, "only {built} schedulers built");
}

fn boxed<S: Scheduler + 'static>(s: S) -> Box<dyn Scheduler> {
    Box::new(s)
}

#[test]
fn noising_gives_each_scheduler_s_own_sample_at_a_step() {
    // A variance-preserving step's sigma is √((1 − ᾱ)/ᾱ): its noising must be √ᾱ·x₀ + √(1 − ᾱ)·ε,
    // so a² + b² = 1 with a = 1/√(1 + σ²) (float64, to 1e-12).
    let s = Ddim::new(DdimConfig::default(), 5).expect("a scheduler");
    assert_eq!(s.noising(), Noising::Preserving);
    for step in s.steps() {
        let (a, b) = s.noising().coefficients(step.sigma);
        let alpha_bar = 1.0 / (1.0 + step.sigma * step.sigma);
        assert!((a * a - alpha_bar).abs() < 1e-12 && (a * a + b * b - 1.0).abs() < 1e-12);
    }
    // Flow matching: x = (1 − σ)·x₀ + σ·ε, and a flow prediction's x₀ estimate x − σ·v recovers
    // x₀ from it exactly (v = ε − x₀).
    let f = FlowMatchEulerDiscrete::new(
        FlowMatchEulerDiscreteConfig::default(),
        4,
        SigmaSource::Pipeline,
        None,
    )
    .unwrap();
    assert_eq!(f.noising(), Noising::Flow);
    let (x0, eps) = (0.3, -1.7);
    for step in f.steps() {
        let (a, b) = f.noising().coefficients(step.sigma);
        let x = a * x0 + b * eps;
        let denoised = step.denoised_x * x + step.denoised_output * (eps - x0);
        assert!((denoised - x0).abs() < 1e-12, "sigma {}", step.sigma);
    }
    // Euler's k-diffusion form: x = x₀ + σ·ε.
    let e = EulerDiscrete::new(EulerDiscreteConfig::default(), 4).unwrap();
    assert_eq!(e.noising().coefficients(2.0), (1.0, 2.0));
}

/// The guidance setting a guidance fixture's metadata describes.
fn guidance_config(meta: &HashMap<String, String>) -> crate::guidance::GuidanceConfig {
    use crate::guidance::{GuidanceConfig, Method};
    let f = |k: &str| -> f64 { meta[k].parse().unwrap_or_else(|_| panic!("{k}")) };
    let method = match meta["method"].as_str() {
        "cfg" => Method::Cfg,
        _ => Method::Apg {
            eta: f("eta"),
            norm_threshold: f("norm_threshold"),
            momentum: meta.get("momentum").map(|m| m.parse().expect("momentum")),
        },
    };
    GuidanceConfig {
        scale: f("scale"),
        method,
        rescale: f("rescale"),
        start: f("start"),
        stop: f("stop"),
    }
}

#[test]
fn guidance_matches_diffusers_guiders() {
    // diffusers' ClassifierFreeGuidance (with guidance_rescale and an interval) and
    // AdaptiveProjectedGuidance (momentum, norm cap, eta; and with rescale), step by step on
    // float64 predictions of two rows (tools/make_guidance_fixtures.py). Both compute in
    // float64: tolerance 1e-12 relative to the largest value. Outside the interval the
    // unconditional prediction is not given, as the sampling node skips it there.
    for name in ["cfg_rescale", "apg", "apg_plain"] {
        let bytes = read(&format!("guidance_{name}"));
        let meta = metadata(&bytes);
        let st = SafeTensors::deserialize(&bytes).expect("safetensors");
        let config = guidance_config(&meta);
        config.validate().expect("a valid setting");
        let steps: usize = meta["steps"].parse().expect("steps");
        let mut g = crate::guidance::Guidance::new(config);
        let mut guided = 0;
        for i in 0..steps {
            let cond = floats(&st, &format!("cond.{i}"));
            let uncond = floats(&st, &format!("uncond.{i}"));
            let want = floats(&st, &format!("pred.{i}"));
            let active = config.active(i, steps);
            guided += active as usize;
            let got = g
                .combine(i, steps, &cond, active.then_some(uncond.as_slice()), 2)
                .expect("combined");
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let err = got
                .iter()
                .zip(&want)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= 1e-12 * scale, "{name} step {i}: {err:e} of {scale}");
        }
        if name == "cfg_rescale" {
            assert_eq!(
                guided, 3,
                "the interval [0.2, 0.8) of 6 steps guides steps 1, 2, 3"
            );
        }
    }
}

#[test]
fn apg_and_rescale_follow_their_formulas_in_float64() {
    // APG's projection and CFG rescale written out independently in float64 on one row:
    // d = c − u, d∥ = (d·ĉ)ĉ, pred = u + s·(d − d∥ + eta·d∥); rescale mixes pred·σ(c)/σ(pred)
    // with pred by φ (σ: the unbiased standard deviation). Tolerance 1e-13 relative.
    use crate::guidance::{Guidance, GuidanceConfig, Method};
    let c: Vec<f64> = (0..12).map(|i| (i as f64 * 0.7).sin()).collect();
    let u: Vec<f64> = (0..12).map(|i| (i as f64 * 0.3).cos() * 0.5).collect();
    let (s, eta, phi) = (3.5, 0.25, 0.6);
    let d: Vec<f64> = c.iter().zip(&u).map(|(a, b)| a - b).collect();
    let cn = c.iter().map(|x| x * x).sum::<f64>().sqrt();
    let dot = d.iter().zip(&c).map(|(a, b)| a * b).sum::<f64>() / cn;
    let pred: Vec<f64> = (0..12)
        .map(|i| {
            let par = dot * c[i] / cn;
            u[i] + s * (d[i] - par + eta * par)
        })
        .collect();
    let sd = |v: &[f64]| {
        let m = v.iter().sum::<f64>() / 12.0;
        (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / 11.0).sqrt()
    };
    let ratio = sd(&c) / sd(&pred);
    let want: Vec<f64> = pred
        .iter()
        .map(|p| phi * p * ratio + (1.0 - phi) * p)
        .collect();
    let mut g = Guidance::new(GuidanceConfig {
        scale: s,
        method: Method::Apg {
            eta,
            norm_threshold: 0.0,
            momentum: None,
        },
        rescale: phi,
        start: 0.0,
        stop: 1.0,
    });
    let got = g.combine(0, 1, &c, Some(&u), 1).unwrap();
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-13 * b.abs().max(1.0), "{a} vs {b}");
    }
    // A constant guided row is left as it is, not divided by its zero spread.
    let mut flat = Guidance::new(GuidanceConfig {
        rescale: 0.5,
        ..GuidanceConfig::cfg(2.0)
    });
    let got = flat.combine(0, 1, &[1.0; 4], Some(&[1.0; 4]), 1).unwrap();
    assert_eq!(got, [1.0; 4]);
    // Settings out of range are refused, naming the setting.
    let mut bad = GuidanceConfig::cfg(4.0);
    bad.rescale = 1.5;
    assert!(bad.validate().unwrap_err().0.contains("guidance_rescale"));
    let mut bad = GuidanceConfig::cfg(4.0);
    (bad.start, bad.stop) = (0.8, 0.2);
    assert!(bad.validate().unwrap_err().0.contains("after"));
}

#[test]
fn image_to_image_starts_where_diffusers_cuts_the_schedule() {
    // diffusers' get_timesteps: t_start = int(max(n − min(n·strength, n), 0)), times the order.
    assert_eq!(img2img_start(4, 0.6, 1), 1);
    assert_eq!(img2img_start(5, 0.55, 1), 2);
    assert_eq!(img2img_start(10, 1.0, 1), 0);
    assert_eq!(img2img_start(10, 0.0, 1), 10);
    assert_eq!(img2img_start(6, 0.5, 2), 6);
    // One-step methods and Heun's pairs start anywhere; a multistep solver restarts its order
    // count there (its first step from the start is first order), as diffusers does.
    let euler = EulerDiscrete::new(EulerDiscreteConfig::default(), 10).expect("euler");
    let heun = HeunDiscrete::new(HeunDiscreteConfig::default(), 10).expect("heun");
    let dpm = DpmSolverMultistep::new(DpmSolverMultistepConfig::default(), 10, None).expect("dpm");
    assert!((0..10).all(|i| can_start_at(&euler, i)));
    assert!((0..10).all(|i| can_start_at(&heun, 2 * i)));
    assert!((0..10).all(|i| can_start_at(&dpm, i)));
    assert_eq!(
        dpm.steps()[3].denoised_terms.len(),
        2,
        "second order from the start"
    );
    assert_eq!(
        dpm.steps_from(3)[3].denoised_terms.len(),
        1,
        "first order from step 3"
    );
}
