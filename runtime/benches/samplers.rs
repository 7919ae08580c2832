//! Sampler benchmark (`cargo bench -p ditflow --bench samplers`) on the bundled demo model (a
//! flow-matching PixArt, CFG 4, one prompt and seed):
//! - quality per step: each flow sampler at 4, 8 and 20 steps (Euler also at 16 and 40), the
//!   PSNR of its decoded image against flow-matching Euler at 100 steps, with the model
//!   evaluations it made (Heun and RF-Solver call the model twice per step, so compare rows at
//!   equal evaluations);
//! - inversion: the demo's own latent inverted and sampled back under the same prompt, PSNR of
//!   the decoded result against the decoded original, for RF-Solver and Euler (DDIM inversion
//!   needs an ε or v model, which the demo is not);
//! - previews: the sampling time with a preview at every step, and every 5 steps, against none
//!   (alone: `-- previews`).
//!
//! Prints numbers; asserts nothing.

#[path = "../../tests/common/mod.rs"]
mod common;

use ditflow::{Graph, RunOptions, Runtime, Session, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const PROMPT: &str = "a large red circle in the center on a blue background";

/// The demo pipeline as a graph, with `sample_extra` the Sample node's other inputs (sampler,
/// steps, seed, ...) and `tail` more nodes.
fn graph(sample_extra: &str, tail: &str) -> String {
    let m = common::repo().join("models/demo");
    let p = |s: &str| m.join(s).to_string_lossy().into_owned();
    format!(
        r#"version: 1
nodes:
  te: {{type: LoadTextEncoder, inputs: {{path: {te:?}}}}}
  dit: {{type: LoadDiffusionModel, inputs: {{path: {dit:?}}}}}
  vae: {{type: LoadVAE, inputs: {{path: {vae:?}}}}}
  pos: {{type: TextEncode, inputs: {{encoder: te.encoder, text: {PROMPT:?}}}}}
  neg: {{type: TextEncode, inputs: {{encoder: te.encoder, text: ""}}}}
  latent: {{type: EmptyLatent, inputs: {{width: 64, height: 64, channels: 4, downscale: 4}}}}
  sample: {{type: Sample, inputs: {{model: dit.model, positive: pos.conditioning, negative: neg.conditioning, latent: latent.latent, scheduler_config: {sched:?}, cfg: 4.0, {sample_extra}}}}}
  decode: {{type: VAEDecode, inputs: {{vae: vae.vae, latent: sample.latent}}}}
{tail}outputs:
  pixels: decode.image
  latent: sample.latent
"#,
        te = p("text_encoder"),
        dit = p("transformer"),
        vae = p("vae"),
        sched = p("scheduler/scheduler_config.json"),
    )
}

fn run(session: &Session, yaml: &str) -> (ditflow::RunReport, f64) {
    let g = Graph::from_yaml(yaml, "bench.yaml", Path::new(".")).expect("graph");
    let t = Instant::now();
    let r = session
        .run(
            &g,
            &[],
            &RunOptions {
                workers: 1,
                out_dir: std::env::temp_dir(),
                ..RunOptions::default()
            },
        )
        .expect("valid graph");
    assert!(r.ok(), "{:?}", r.failed);
    (r, t.elapsed().as_secs_f64())
}

fn pixels(r: &ditflow::RunReport) -> Vec<f32> {
    match &**r.output("pixels").expect("pixels") {
        Value::Tensor(_, t) => t.to_f32_vec().unwrap(),
        other => panic!("expected a tensor, got {other:?}"),
    }
}

fn main() {
    let rt = Runtime::new();
    for lib in common::std_plugins() {
        rt.load_plugin_file(&lib).expect("nodes plugin loads");
    }
    let session = Session::new(Arc::new(rt));
    // `-- previews`: the preview cost alone.
    if std::env::args().any(|a| a == "previews") {
        previews(&session);
        return;
    }
    // Warm the model cache, then the reference.
    let (reference, _) = run(
        &session,
        &graph("sampler: flow_euler, steps: 100, seed: 0", ""),
    );
    let reference = pixels(&reference);
    // A converged one too: Euler's own 100-step error favours Euler against the first.
    let (converged, _) = run(
        &session,
        &graph("sampler: rf_solver, steps: 200, seed: 0", ""),
    );
    let converged = pixels(&converged);

    println!("quality per step on the demo (PSNR in dB against flow_euler at 100 steps, and");
    println!("against rf_solver at 200 steps, which has converged):");
    println!(
        "{:>12} {:>6} {:>6} {:>10} {:>10}",
        "sampler", "steps", "calls", "vs euler", "converged"
    );
    for sampler in ["flow_euler", "flow_heun", "rf_solver", "unipc"] {
        // Euler also at the other samplers' model evaluations (8, 16, 40 calls).
        let counts: &[usize] = if sampler == "flow_euler" {
            &[4, 8, 16, 20, 40]
        } else {
            &[4, 8, 20]
        };
        for &steps in counts {
            let calls = match sampler {
                "flow_heun" => 2 * steps - 1,
                "rf_solver" => 2 * steps,
                _ => steps,
            };
            let yaml = graph(&format!("sampler: {sampler}, steps: {steps}, seed: 0"), "");
            let (r, _) = run(&session, &yaml);
            let img = pixels(&r);
            let (p, q) = (
                common::psnr(&img, &reference),
                common::psnr(&img, &converged),
            );
            println!("{sampler:>12} {steps:>6} {calls:>6} {p:>10.2} {q:>10.2}");
            println!(
                "{{\"bench\":\"sampler_quality\",\"sampler\":\"{sampler}\",\"steps\":{steps},\"calls\":{calls},\"psnr_db\":{p:.3},\"psnr_converged_db\":{q:.3}}}"
            );
        }
    }

    println!("inversion on the demo (its own latent inverted and sampled back, same prompt):");
    for (sampler, steps) in [
        ("rf_solver", 10),
        ("flow_euler", 20),
        ("rf_solver", 25),
        ("flow_euler", 50),
    ] {
        let tail = format!(
            "  inv: {{type: Invert, inputs: {{model: dit.model, positive: pos.conditioning, latent: sample.latent, sampler: {sampler}, scheduler_config: {s:?}, steps: {steps}}}}}\n  again: {{type: Sample, inputs: {{model: dit.model, positive: pos.conditioning, latent: sample.latent, noise: inv.latent, sampler: {sampler}, scheduler_config: {s:?}, steps: {steps}, cfg: 1.0}}}}\n  redecode: {{type: VAEDecode, inputs: {{vae: vae.vae, latent: again.latent}}}}\n",
            s = common::repo()
                .join("models/demo/scheduler/scheduler_config.json")
                .to_string_lossy(),
        );
        let yaml = graph("sampler: flow_euler, steps: 20, seed: 0", &tail)
            .replace("outputs:\n", "outputs:\n  again: redecode.image\n");
        let (r, _) = run(&session, &yaml);
        let again = match &**r.output("again").expect("again") {
            Value::Tensor(_, t) => t.to_f32_vec().unwrap(),
            _ => unreachable!(),
        };
        let p = common::psnr(&again, &pixels(&r));
        let calls = if sampler == "rf_solver" {
            4 * steps
        } else {
            2 * steps
        };
        println!("{sampler:>12} {steps:>3} steps ({calls} model calls for both ways): {p:.2} dB");
        println!(
            "{{\"bench\":\"inversion\",\"sampler\":\"{sampler}\",\"steps\":{steps},\"psnr_db\":{p:.3}}}"
        );
    }
    println!("  ddim: not applicable (the demo predicts a flow velocity)");

    previews(&session);
}

/// Previews: one at every step and one every 5 steps (the bundled graphs' setting) against
/// none: 15 rounds of the three, in an order rotated each round; the median of each round's
/// ratio to the run without (this machine's run-to-run noise is several percent, so single
/// runs or best-of-N compare badly).
fn previews(session: &Session) {
    let map = common::repo().join("models/demo/vae/latent_rgb.json");
    let rounds = 15;
    let mut times = vec![[0.0f64; 3]; rounds];
    // A new seed each round, so no run is answered from the session's cache.
    for (r, row) in times.iter_mut().enumerate() {
        for k in 0..3 {
            let slot = (r + k) % 3;
            let every = [0, 1, 5][slot];
            let preview = if every == 0 {
                String::new()
            } else {
                format!(
                    ", preview_every: {every}, preview_map: {:?}",
                    map.to_string_lossy()
                )
            };
            let seed = r + 1;
            let yaml = graph(
                &format!("sampler: flow_euler, steps: 20, seed: {seed}{preview}"),
                "",
            );
            row[slot] = run(session, &yaml).1;
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let t_without = median(times.iter().map(|t| t[0]).collect());
    let ratio = |slot: usize| median(times.iter().map(|t| t[slot] / t[0]).collect());
    let (r1, r5) = (ratio(1), ratio(2));
    let (t_every1, t_every5) = (t_without * r1, t_without * r5);
    let pct = |r: f64| (r - 1.0) * 100.0;
    println!(
        "previews: 20 steps {:.1} ms without (median), with one per step {:+.2}%, with one every 5 steps {:+.2}% (medians of the paired ratios)",
        t_without * 1e3,
        pct(r1),
        pct(r5)
    );
    println!(
        "{{\"bench\":\"preview_overhead\",\"without_s\":{t_without:.4},\"every_step_s\":{t_every1:.4},\"every_5_steps_s\":{t_every5:.4}}}"
    );
}
