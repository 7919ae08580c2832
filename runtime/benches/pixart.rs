//! PixArt forward benchmark, driven by `tools/bench_pixart.py` (which makes the model and inputs
//! and times diffusers beside it): loads a model folder with `LoadDiffusionModel` once, then times
//! the `Forward` node over repeated runs of a session (the loaded model stays cached) and prints
//! the fastest as JSON, with the process's resident and peak resident bytes, and its resident
//! bytes before the model was loaded.
//!
//! `cargo bench -p ditflow --bench pixart -- PLUGINS_DIR MODEL_DIR INPUTS.safetensors [REPS]
//! [LOADER] [OUTPUT]` (LOADER: the node that loads MODEL_DIR, `LoadDiffusionModel` by default;
//! `tools/bench_mmdit.py` passes `LoadFlux` and `LoadSD3`; OUTPUT: where to keep the forward's
//! outputs, as safetensors). `--max-memory=SIZE` caps the resident mapped weights (the bytes read
//! back are printed as `streamed_bytes`). `--device=cuda[:N]` runs it on a GPU (each timed run
//! includes reading the inputs, uploading them and writing the outputs), with
//! `--gpu-activations=bf16|f16` and `--tensor-cores` as the CLI takes them.

use ditflow::{Graph, RunOptions, Runtime, Session};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// A byte count from `/proc/self/status` (`VmRSS:` now, `VmHWM:` the peak); 0 where there is
/// none.
fn proc_status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    // `--max-memory=SIZE`: the memory cap on the model's mapped weights.
    if let Some(size) =
        std::env::args().find_map(|a| a.strip_prefix("--max-memory=").map(String::from))
    {
        let bytes = ditflow::weights::residency::parse_bytes(&size).expect("--max-memory");
        ditflow::weights::residency::set_cap(Some(bytes));
    }
    let flag = |name: &str| {
        std::env::args().find_map(|a| a.strip_prefix(&format!("--{name}=")).map(String::from))
    };
    let device = match flag("device").as_deref() {
        None | Some("cpu") => ditflow::tensor::Device::Cpu,
        Some(d) => {
            let n = d
                .strip_prefix("cuda")
                .map(|n| n.trim_start_matches(':'))
                .and_then(|n| {
                    if n.is_empty() {
                        Some(0)
                    } else {
                        n.parse().ok()
                    }
                })
                .expect("--device=cpu, cuda or cuda:N");
            if let Err(why) = ditflow::kernels::cuda_available(n) {
                eprintln!("no CUDA device {n}: {why}");
                std::process::exit(2);
            }
            ditflow::tensor::Device::Cuda(n)
        }
    };
    if let Some(t) = flag("gpu-activations") {
        let dt = ditflow::kernels::parse_gpu_activations(&t).expect("--gpu-activations");
        ditflow::kernels::set_gpu_activations(dt).expect("--gpu-activations");
    }
    if std::env::args().any(|a| a == "--tensor-cores") {
        ditflow::kernels::set_tensor_cores(true);
    }
    let [plugins, model, inputs, rest @ ..] = &args[..] else {
        eprintln!("usage: pixart PLUGINS_DIR MODEL_DIR INPUTS.safetensors [REPS]");
        std::process::exit(2);
    };
    let reps: usize = rest.first().and_then(|r| r.parse().ok()).unwrap_or(10);
    let loader = rest.get(1).map_or("LoadDiffusionModel", String::as_str);
    let rt = Runtime::with_plugins(&[PathBuf::from(plugins)]);
    let session = Session::new(Arc::new(rt));
    // What the process holds before the model: the rise above it is the model's cost.
    let baseline = proc_status_bytes("VmRSS:");
    let out = std::env::temp_dir().join(format!("ditflow-bench-pixart-{}", std::process::id()));
    let yaml = format!(
        "version: 1\nnodes:\n  m: {{type: {loader}, inputs: {{path: {model:?}}}}}\n  f: {{type: Forward, inputs: {{model: m.model, inputs: {inputs:?}, outputs: out.safetensors}}}}\noutputs:\n  path: f.path\n"
    );
    let g = Graph::from_yaml(&yaml, "bench.yaml", Path::new(".")).expect("graph");
    let opts = RunOptions {
        out_dir: out.clone(),
        workers: 1,
        device,
        ..RunOptions::default()
    };
    let t0 = Instant::now();
    let first = session.run(&g, &[], &opts).expect("valid graph");
    assert!(first.ok(), "{:?}", first.failed);
    let load_and_first = t0.elapsed().as_secs_f64();
    // The op profile (DITFLOW_PROFILE) covers the timed forwards only, not the load.
    ditflow::tensor::op_call::profile::reset();
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        let r = session.run(&g, &[], &opts).expect("valid graph");
        assert!(r.ok(), "{:?}", r.failed);
        best = best.min(t.elapsed().as_secs_f64());
    }
    let (rss, peak) = (proc_status_bytes("VmRSS:"), proc_status_bytes("VmHWM:"));
    println!("{{\"bench\":\"pixart_forward\",\"seconds\":{best:.5},\"load_and_first_s\":{load_and_first:.3},\"resident_bytes\":{rss},\"peak_resident_bytes\":{peak},\"baseline_resident_bytes\":{baseline},\"streamed_bytes\":{}}}", ditflow::weights::residency::streamed_bytes());
    if ditflow::tensor::op_call::profile::enabled() {
        eprintln!("per forward, over {reps}:");
        for (op, n, secs) in ditflow::tensor::op_call::profile::report() {
            let per = reps.max(1) as f64;
            eprintln!(
                "{op:>16} {:>6} calls {:>9.2} ms",
                n as f64 / per,
                secs * 1e3 / per
            );
        }
    }
    if let Some(keep) = rest.get(2) {
        std::fs::copy(out.join("out.safetensors"), keep).expect("the forward's output");
    }
    let _ = std::fs::remove_dir_all(out);
}
