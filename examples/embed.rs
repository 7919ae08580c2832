//! Embedding ditflow in a Rust application: load the node plugins, load a graph, run it with
//! typed inputs from two threads at once, watch its events, read typed outputs, and cancel.
//!
//!     cargo run --release --example embed
//!
//! (after `cargo build --release`, which puts the node plugin next to the executables).

use ditflow::{ArgValue, Event, Graph, RunOptions, Runtime, Session, Value};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    // Node types from the plugins in target/<profile> (where `cargo build` puts the node
    // library; examples live one folder below), then DITFLOW_PLUGIN_PATH.
    let exe = std::env::current_exe()?;
    let build_dir = exe.parent().and_then(Path::parent).map(Path::to_path_buf);
    let runtime = Arc::new(Runtime::with_plugins(
        &build_dir.into_iter().collect::<Vec<_>>(),
    ));
    for problem in runtime.problems() {
        eprintln!("warning: {problem}");
    }
    let graphs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs");
    let graph = Graph::from_file(&graphs.join("noise.lua"))?;
    // One session keeps node outputs cached between runs; runs may share it from any thread.
    let session = Arc::new(Session::new(runtime));

    let started = Arc::new(AtomicUsize::new(0));
    let counter = started.clone();
    let options = RunOptions {
        out_dir: std::env::temp_dir().join("ditflow-embed"),
        subscribers: vec![Arc::new(move |e: &Event| {
            if let Event::NodeStarted { .. } = e {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        })],
        ..RunOptions::default()
    };

    // Two runs at once, with typed inputs.
    let runs: Vec<_> = [1i64, 2]
        .into_iter()
        .map(|seed| {
            let (session, graph, options) = (session.clone(), graph.clone(), options.clone());
            std::thread::spawn(move || {
                let args = [("seed".to_string(), ArgValue::Value(Value::Int(seed)))];
                session.run(&graph, &args, &options)
            })
        })
        .collect();
    for run in runs {
        let report = run.join().expect("the run thread")?;
        // Typed outputs.
        if let Some(Value::String(caption)) = report.output("caption").map(|v| &**v) {
            println!("{}", caption.as_str());
        }
    }
    println!("{} nodes started", started.load(Ordering::Relaxed));

    // A run cancelled up front stops before any node.
    let cancelled = RunOptions { ..options.clone() };
    cancelled.cancel.store(true, Ordering::SeqCst);
    let report = session.run(&graph, &[], &cancelled)?;
    println!("cancelled run: cancelled = {}", report.cancelled);
    Ok(())
}
