//! The `ditflow` command line end to end: the bundled example, JSONL events, exit codes, node
//! listings, validation, Graphviz output and `watch`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn ditflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ditflow"))
        .args(args)
        .arg("--plugins")
        .arg(common::plugin_dir())
        .current_dir(common::repo())
        .output()
        .expect("run ditflow")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_bundled_example_writes_a_png() {
    let out = common::temp_dir("cli-example");
    let o = ditflow(&[
        "run",
        "graphs/noise.yaml",
        "--set",
        "seed=7",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    let stdout = text(&o.stdout);
    assert!(stdout.contains("caption = seed 7: mean"), "{stdout}");
    let png = out.join("noise.png");
    let bytes = std::fs::read(&png).expect("noise.png written");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // Same seed, same image: the noise is counter-based.
    let out2 = common::temp_dir("cli-example-2");
    let o = ditflow(&[
        "run",
        "graphs/noise.yaml",
        "--set",
        "seed=7",
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(std::fs::read(out2.join("noise.png")).unwrap(), bytes);
}

#[test]
fn events_are_json_lines() {
    let out = common::temp_dir("cli-events");
    let o = ditflow(&[
        "run",
        "graphs/noise.yaml",
        "--events",
        "jsonl",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    let lines: Vec<serde_json::Value> = text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert_eq!(lines.first().unwrap()["event"], "run_started");
    assert_eq!(lines.last().unwrap()["event"], "run_finished");
    let finished: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["event"] == "node_finished")
        .collect();
    assert_eq!(finished.len(), 6);
    for f in finished {
        assert!(f["node"].is_string() && f["ms"].is_number(), "{f}");
    }
    assert!(lines
        .iter()
        .any(|l| l["event"] == "node_started" && l["node"] == "save"));
    assert!(lines
        .iter()
        .any(|l| l["event"] == "node_progress" && l["node"] == "image"));
}

#[test]
fn a_failed_run_exits_1_and_names_the_node_and_cause() {
    let dir = common::temp_dir("cli-fail");
    let g = dir.join("fail.yaml");
    std::fs::write(
        &g,
        "version: 1\nnodes:\n  boom: {type: Panic, inputs: {message: out of cheese}}\n  fine: {type: Add1, inputs: {x: 1}}\noutputs:\n  fine: fine.y\n",
    )
    .unwrap();
    let o = ditflow(&["run", g.to_str().unwrap(), "--out", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let stderr = text(&o.stderr);
    assert!(
        stderr.contains("node 'boom' (Panic) failed: panicked: out of cheese"),
        "{stderr}"
    );
    assert!(text(&o.stdout).contains("fine = 2"));
}

#[test]
fn validate_accepts_good_graphs_and_exit_2_on_bad_usage() {
    let o = ditflow(&["validate", "graphs/noise.yaml"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = ditflow(&["validate", "graphs/does-not-exist.yaml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).starts_with("graphs/does-not-exist.yaml:1:1: error: cannot read graph"));
    let o = Command::new(env!("CARGO_BIN_EXE_ditflow"))
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = ditflow(&["run", "graphs/noise.yaml", "--set", "novalue"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn nodes_lists_schemas_for_people_and_as_json() {
    let o = ditflow(&["nodes"]);
    assert_eq!(o.status.code(), Some(0));
    let listing = text(&o.stdout);
    assert!(
        listing.contains("RandomNoise (") && listing.contains("[ditflow-nodes]"),
        "{listing}"
    );
    let o = ditflow(&["nodes", "--json"]);
    assert_eq!(o.status.code(), Some(0));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let nodes = doc["nodes"].as_array().unwrap();
    let noise = nodes
        .iter()
        .find(|n| n["type"] == "RandomNoise")
        .expect("RandomNoise");
    let width = noise["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "width")
        .unwrap();
    assert_eq!(width["type"], "Int");
    assert_eq!(width["min"], 1.0);
    assert!(width["doc"].as_str().is_some_and(|d| !d.is_empty()));
    assert_eq!(noise["outputs"][0]["type"], "Latent");
}

#[test]
fn dot_draws_the_graph() {
    let o = Command::new(env!("CARGO_BIN_EXE_ditflow"))
        .args(["dot", "graphs/noise.yaml"])
        .current_dir(common::repo())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let dot = text(&o.stdout);
    assert!(
        dot.starts_with("digraph ditflow {") && dot.contains("\"noise\" -> \"image\""),
        "{dot}"
    );
    assert!(Path::new(&common::repo().join("graphs/noise.yaml")).exists());
}

#[test]
fn watch_prints_run_events_and_reruns_on_edits() {
    use std::io::{BufRead, BufReader};
    let dir = common::temp_dir("cli-watch");
    let graph = dir.join("g.yaml");
    let yaml = "version: 1\nnodes:\n  noise: {type: RandomNoise, inputs: {seed: 1, width: 8, height: 8}}\n  image: {type: NoiseToImage, inputs: {latent: noise.noise, scale: 0.2}}\n";
    std::fs::write(&graph, yaml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ditflow"))
        .args([
            "watch",
            graph.to_str().unwrap(),
            "--events",
            "jsonl",
            "--plugins",
        ])
        .arg(common::plugin_dir())
        .arg("--out")
        .arg(dir.join("out"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start ditflow watch");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Lines up to the next `run_finished` (or `graph_invalid`).
    let until_done = || {
        let mut lines = Vec::new();
        loop {
            let line = rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no event in 30 s after {lines:?}"));
            let v: serde_json::Value = serde_json::from_str(&line).expect("each line is JSON");
            let event = v["event"].as_str().unwrap().to_string();
            lines.push(v);
            if event == "run_finished" || event == "graph_invalid" {
                return lines;
            }
        }
    };
    let events = |lines: &[serde_json::Value]| -> Vec<String> {
        lines
            .iter()
            .map(|v| {
                format!(
                    "{} {}",
                    v["event"].as_str().unwrap(),
                    v["node"].as_str().unwrap_or("")
                )
                .trim()
                .to_string()
            })
            .collect()
    };
    let first = events(&until_done());
    assert_eq!(first[0], "graph_loaded");
    assert!(
        first.contains(&"node_started noise".to_string()),
        "{first:?}"
    );
    // Saved as editors do (a new file renamed over), so no half-written file is seen.
    let save = |text: String| {
        let tmp = dir.join("g.yaml.tmp~");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &graph).unwrap();
    };
    save(yaml.replace("scale: 0.2}}", "scale: 0.2}"));
    let bad = until_done();
    assert_eq!(bad[0]["event"], "graph_invalid");
    assert!(
        bad[0]["errors"][0].as_str().unwrap().contains("g.yaml:"),
        "{bad:?}"
    );
    save(yaml.replace("scale: 0.2", "scale: 0.4"));
    let second = events(&until_done());
    assert!(
        second.contains(&"node_cached noise".to_string()),
        "{second:?}"
    );
    assert!(
        second.contains(&"node_started image".to_string()),
        "{second:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn ops_lists_the_tensor_core_paths_and_run_takes_the_flag() {
    let o = Command::new(env!("CARGO_BIN_EXE_ditflow"))
        .arg("ops")
        .env_remove("DITFLOW_TENSOR_CORES")
        .output()
        .expect("run ditflow ops");
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    let stdout = text(&o.stdout);
    assert!(
        stdout.contains(
            "tensor-core paths on CUDA (with --tensor-cores or DITFLOW_TENSOR_CORES=1; now off)"
        ),
        "{stdout}"
    );
    for op in ["attention", "linear", "matmul"] {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(op)
                && (l.contains("cuBLAS") || l.contains("mma.sync"))),
            "no tensor-core line for {op}: {stdout}"
        );
    }
    // On the CPU the flag changes nothing: the bundled example's caption is the same.
    let out = common::temp_dir("cli-tensor-cores");
    let o = ditflow(&[
        "run",
        "graphs/noise.yaml",
        "--set",
        "seed=7",
        "--tensor-cores",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    assert!(text(&o.stdout).contains("caption = seed 7: mean"));
    // --max-vram takes a size (no effect on the CPU), and says why a bad one is refused.
    let o = ditflow(&[
        "run",
        "graphs/noise.yaml",
        "--max-vram",
        "8G",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    let o = ditflow(&["run", "graphs/noise.yaml", "--max-vram", "8X"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("--max-vram") && text(&o.stderr).contains("unknown unit"),
        "{}",
        text(&o.stderr)
    );
    // --gpu-activations: listed by `ops`, no effect on the CPU, a bad type named.
    assert!(
        stdout.contains("bf16/f16 activations on CUDA (with --gpu-activations")
            && stdout.contains("gated_residual"),
        "{stdout}"
    );
    let o = ditflow(&[
        "run",
        "graphs/noise.yaml",
        "--set",
        "seed=7",
        "--gpu-activations",
        "bf16",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    assert!(text(&o.stdout).contains("caption = seed 7: mean"));
    let o = ditflow(&["run", "graphs/noise.yaml", "--gpu-activations", "f8"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("--gpu-activations") && text(&o.stderr).contains("'f8'"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn device_flag_without_a_gpu_falls_back_or_fails_cleanly() {
    if ditflow::kernels::cuda_available(0).is_ok() {
        eprintln!("skipped: a GPU is present");
        return;
    }
    let graph = common::repo().join("graphs/noise.yaml");
    let run = |device: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ditflow"))
            .args(["validate", graph.to_str().unwrap(), "--device", device])
            .env("DITFLOW_PLUGIN_PATH", common::plugin_dir())
            .output()
            .expect("run ditflow")
    };
    let auto = run("auto");
    let err = String::from_utf8_lossy(&auto.stderr);
    assert!(auto.status.success(), "{err}");
    assert!(err.contains("using the CPU"), "{err}");
    let cuda = run("cuda:0");
    let err = String::from_utf8_lossy(&cuda.stderr);
    assert_eq!(cuda.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot use cuda:0"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
