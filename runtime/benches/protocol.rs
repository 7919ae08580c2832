//! Model-protocol overhead (`tools/bench_protocol_overhead.sh`, or
//! `cargo bench -p ditflow --bench protocol -- [BASELINE_PLUGIN]`): sampling the demo PixArt (20
//! steps, CFG 4) through the protocol unpatched and with do-nothing hooks at every site (a block
//! residual after each block, a range override over the stack, lifecycle hooks, an attention
//! mask and extra branch at every attention site, then also an attention edit), against the
//! standard library built from the commit before the protocol (BASELINE_PLUGIN), in the same
//! process and in alternating rounds. Prints the fastest runs and the ratios; asserts nothing.

#[path = "../../tests/common/mod.rs"]
mod common;

use ditflow::{Graph, RunOptions, Runtime, Session};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// The demo graph, patched with `NoOpHooks` (with or without its attention hooks) when `patch`.
fn graph(patch: Option<bool>, seed: u64) -> String {
    let demo = common::repo().join("models/demo");
    let d = |p: &str| demo.join(p).to_string_lossy().into_owned();
    let (patch, model) = match patch {
        Some(edit) => (
            format!("  p: {{type: NoOpHooks, inputs: {{model: dm.model, attention: {edit}}}}}\n"),
            "p.model",
        ),
        None => (String::new(), "dm.model"),
    };
    format!(
        "version: 1\nnodes:\n  te: {{type: LoadTextEncoder, inputs: {{path: {te:?}}}}}\n  dm: {{type: LoadDiffusionModel, inputs: {{path: {tr:?}}}}}\n  pos: {{type: TextEncode, inputs: {{encoder: te.encoder, text: \"a red circle on a blue background\"}}}}\n  neg: {{type: TextEncode, inputs: {{encoder: te.encoder, text: \"\"}}}}\n{patch}  lat: {{type: EmptyLatent, inputs: {{width: 64, height: 64, channels: 4, downscale: 4}}}}\n  s: {{type: Sample, inputs: {{model: {model}, positive: pos.conditioning, negative: neg.conditioning, latent: lat.latent, sampler: flow_euler, steps: 20, cfg: 4.0, seed: {seed}}}}}\noutputs:\n  latent: s.latent\n",
        te = d("text_encoder"),
        tr = d("transformer"),
    )
}

fn time(session: &Session, yaml: &str) -> f64 {
    let g = Graph::from_yaml(yaml, "bench.yaml", Path::new(".")).expect("graph");
    let opts = RunOptions {
        workers: 1,
        out_dir: std::env::temp_dir(),
        ..RunOptions::default()
    };
    let t = Instant::now();
    let r = session.run(&g, &[], &opts).expect("valid graph");
    assert!(r.ok(), "{:?}", r.failed);
    t.elapsed().as_secs_f64()
}

/// The fastest run: the least disturbed by the shared machine.
fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let current = Runtime::new();
    for lib in common::STD_PLUGINS.iter().chain(&["ditflow_testkit"]) {
        current
            .load_plugin_file(&common::plugin_lib(lib))
            .expect("plugin loads");
    }
    let current = Session::new(Arc::new(current));
    let baseline = args.first().map(|path| {
        let rt = Runtime::new();
        rt.load_plugin_file(Path::new(path))
            .expect("the baseline plugin loads");
        Session::new(Arc::new(rt))
    });
    // Warm up: load every model.
    time(&current, &graph(Some(true), 999));
    if let Some(b) = &baseline {
        time(b, &graph(None, 999));
    }
    let rounds = 31;
    let (mut base, mut plain, mut block, mut every) = (vec![], vec![], vec![], vec![]);
    for r in 0..rounds {
        // A new seed each round keeps Sample out of the node cache.
        let seed = r as u64;
        if let Some(b) = &baseline {
            base.push(time(b, &graph(None, seed)));
        }
        plain.push(time(&current, &graph(None, seed)));
        block.push(time(&current, &graph(Some(false), seed)));
        every.push(time(&current, &graph(Some(true), seed)));
    }
    println!("demo PixArt, 20 steps, CFG 4: fastest of {rounds} alternating rounds");
    let reference = if base.is_empty() {
        println!("  (pass the pre-protocol plugin as an argument to compare with it)");
        best(&plain)
    } else {
        let b = best(&base);
        println!(
            "  before the protocol (baseline plugin):   {:8.1} ms",
            b * 1e3
        );
        b
    };
    let row = |name: &str, v: &[f64], target: &str| {
        let t = best(v);
        println!(
            "  {name:<40} {:8.1} ms  ({:+.2}%, target < {target})",
            t * 1e3,
            (t / reference - 1.0) * 100.0
        );
    };
    row("through the protocol, unpatched:", &plain, "+1%");
    row("no-op block, override, lifecycle hooks:", &block, "+3%");
    row("  plus attention edit, mask, extra:", &every, "+3%");
}
