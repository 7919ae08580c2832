//! The `ditflow` command line end to end: the bundled example, JSONL events, exit codes, node
//! listings, validation and Graphviz output.

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
