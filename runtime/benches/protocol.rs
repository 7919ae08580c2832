//! Model-protocol overhead (`tools/bench_protocol_overhead.sh`, or
//! `cargo bench -p ditflow --bench protocol -- [BASELINE_PLUGIN]`): sampling the demo PixArt (20
//! steps, CFG 4) through the protocol unpatched and with a do-nothing hook at every site (a block
//! residual after each block, a range override over the stack, lifecycle hooks), against the
//! standard library built from the commit before the protocol (BASELINE_PLUGIN), in the same
//! process and in alternating rounds. Prints the medians and the ratios; asserts nothing.

#[path = "../../tests/common/mod.rs"]
mod common;

use ditflow::{Graph, RunOptions, Runtime, Session};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

fn graph(patch: bool, seed: u64) -> String {
    let demo = common::repo().join("models/demo");
    let d = |p: &str| demo.join(p).to_string_lossy().into_owned();
    let (patch, model) = if patch {
        (
            "  p: {type: NoOpHooks, inputs: {model: dm.model}}\n",
            "p.model",
        )
    } else {
        ("", "dm.model")
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
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
    time(&current, &graph(true, 999));
    if let Some(b) = &baseline {
        time(b, &graph(false, 999));
    }
    let rounds = 15;
    let (mut base, mut plain, mut hooked) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        // A new seed each round keeps Sample out of the node cache.
        let seed = r as u64;
        if let Some(b) = &baseline {
            base.push(time(b, &graph(false, seed)));
        }
        plain.push(time(&current, &graph(false, seed)));
        hooked.push(time(&current, &graph(true, seed)));
    }
    println!("demo PixArt, 20 steps, CFG 4: median of {rounds} alternating rounds");
    let (p, h) = (median(plain), median(hooked));
    if !base.is_empty() {
        let b = median(base);
        println!(
            "  before the protocol (baseline plugin): {:8.1} ms",
            b * 1e3
        );
        println!(
            "  through the protocol, unpatched:        {:8.1} ms  ({:+.2}%, target < +1%)",
            p * 1e3,
            (p / b - 1.0) * 100.0
        );
        println!(
            "  no-op hooks at every site:              {:8.1} ms  ({:+.2}%, target < +3%)",
            h * 1e3,
            (h / b - 1.0) * 100.0
        );
    } else {
        println!("  through the protocol, unpatched: {:8.1} ms", p * 1e3);
        println!(
            "  no-op hooks at every site:       {:8.1} ms  ({:+.2}% over unpatched)",
            h * 1e3,
            (h / p - 1.0) * 100.0
        );
        println!("  (pass the pre-protocol plugin as an argument to compare with it)");
    }
}
