//! Executor benchmarks (`cargo bench -p ditflow --bench executor`): the per-node overhead of a
//! 1,000-node graph of trivial plugin nodes, and the speed-up of two equal independent branches on
//! two workers. Prints numbers; asserts nothing.

#[path = "../../tests/common/mod.rs"]
mod common;

use ditflow::{Graph, RunOptions, Runtime, Session};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

fn runtime() -> Arc<Runtime> {
    let rt = Runtime::new();
    for lib in common::STD_PLUGINS.iter().chain(&["ditflow_testkit"]) {
        rt.load_plugin_file(&common::plugin_lib(lib))
            .expect("plugin loads");
    }
    Arc::new(rt)
}

/// `n` trivial nodes: 10 chains of n/10 `Add1` nodes each.
fn wide_chains(n: usize) -> String {
    let mut y = String::from("version: 1\nnodes:\n");
    let chains = 10;
    for c in 0..chains {
        for i in 0..n / chains {
            if i == 0 {
                y.push_str(&format!("  c{c}_0: {{type: Add1, inputs: {{x: {c}}}}}\n"));
            } else {
                y.push_str(&format!(
                    "  c{c}_{i}: {{type: Add1, inputs: {{x: c{c}_{}.y}}}}\n",
                    i - 1
                ));
            }
        }
    }
    y
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rt = runtime();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let n = 1000;
    let g = Graph::from_yaml(&wide_chains(n), "bench.yaml", Path::new(".")).unwrap();
    let plan = g.plan(&rt, &[]).unwrap();
    let opts = RunOptions {
        workers,
        ..RunOptions::default()
    };

    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for _ in 0..7 {
        let session = Session::new(rt.clone());
        let t = Instant::now();
        let r = session.run_plan(&plan, &opts);
        cold.push(t.elapsed().as_secs_f64());
        assert!(r.ok() && r.executed.len() == n);
        let t = Instant::now();
        let r = session.run_plan(&plan, &opts);
        warm.push(t.elapsed().as_secs_f64());
        assert!(r.ok() && r.cached.len() == n);
    }
    let t_parse = Instant::now();
    let _ = Graph::from_yaml(&wide_chains(n), "bench.yaml", Path::new("."))
        .unwrap()
        .plan(&rt, &[])
        .unwrap();
    let parse_ms = t_parse.elapsed().as_secs_f64() * 1e3;
    let (c, w) = (median(cold), median(warm));
    println!("executor overhead: {n} trivial plugin nodes, {workers} workers (median of 7)");
    println!(
        "  executed: {:8.2} ms total, {:6.2} us per node (target < 50 us)",
        c * 1e3,
        c * 1e6 / n as f64
    );
    println!(
        "  cached:   {:8.2} ms total, {:6.2} us per node",
        w * 1e3,
        w * 1e6 / n as f64
    );
    println!("  parse + validate: {parse_ms:.2} ms");

    // Two independent branches of equal CPU cost.
    let ms = 400;
    let two = Graph::from_yaml(
        &format!("version: 1\nnodes:\n  a: {{type: Spin, inputs: {{ms: {ms}, tag: a}}}}\n  b: {{type: Spin, inputs: {{ms: {ms}, tag: b}}}}\n"),
        "two.yaml",
        Path::new("."),
    )
    .unwrap();
    let plan = two.plan(&rt, &[]).unwrap();
    let time = |w: usize| {
        let t = Instant::now();
        let r = Session::new(rt.clone()).run_plan(
            &plan,
            &RunOptions {
                workers: w,
                ..RunOptions::default()
            },
        );
        assert!(r.ok());
        t.elapsed().as_secs_f64()
    };
    let serial = median((0..3).map(|_| time(1)).collect());
    let parallel = median((0..3).map(|_| time(2)).collect());
    println!("independent branches: two {ms} ms CPU-bound nodes");
    println!(
        "  1 worker: {:.0} ms, 2 workers: {:.0} ms, ratio {:.2} (target < 0.7)",
        serial * 1e3,
        parallel * 1e3,
        parallel / serial
    );
}
