//! The memory cap on weights (`--max-memory`, `ditflow::weights::residency`): a model whose
//! mapped weights are twice the cap runs bit for bit as uncapped, reading released weights back
//! from its file (reported in `weights_streamed` events), and a cap below one weight's size is an
//! error naming the node. A test binary of its own: the cap holds for the whole process.

mod common;

use ditflow::weights::residency;
use ditflow::{Event, Graph, RunOptions, Runtime, Session};
use std::path::Path;
use std::sync::{Arc, Mutex};

fn session() -> Session {
    let rt = Runtime::new();
    for lib in common::std_plugins() {
        rt.load_plugin_file(&lib).expect("nodes plugin loads");
    }
    Session::new(Arc::new(rt))
}

/// The tiny Wan as a GGUF in Wan's original names (its weights stay mapped: LoadWan only renames
/// them) through `Forward`, writing `out`; the run's report and events.
fn forward(session: &Session, out: &str) -> (ditflow::RunReport, Vec<Event>, std::path::PathBuf) {
    let root = common::repo().join("tests/fixtures");
    let model = root.join("gguf/wan/wan-tiny-F32.gguf");
    let io = root.join("parity/wan/io.safetensors");
    let out_dir = common::temp_dir("memory-cap");
    let yaml = format!(
        "version: 1\nnodes:\n  m: {{type: LoadWan, inputs: {{path: {:?}}}}}\n  f: {{type: Forward, inputs: {{model: m.model, inputs: {:?}, outputs: {out}}}}}\noutputs:\n  path: f.path\n",
        model.to_string_lossy(),
        io.to_string_lossy(),
    );
    let g = Graph::from_yaml(&yaml, "cap.yaml", Path::new(".")).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let mut opts = RunOptions {
        out_dir: out_dir.clone(),
        ..RunOptions::default()
    };
    opts.subscribers.push(Arc::new(move |e: &Event| {
        sink.lock().unwrap().push(e.clone())
    }));
    let report = session.run(&g, &[], &opts).unwrap();
    let events = events.lock().unwrap().clone();
    (report, events, out_dir.join(out))
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn a_model_twice_the_cap_runs_bit_for_bit_and_a_cap_below_one_weight_is_an_error() {
    let file = common::repo().join("tests/fixtures/gguf/wan/wan-tiny-F32.gguf");
    let size = std::fs::metadata(&file).unwrap().len() as usize;
    // Uncapped: the reference output.
    let (report, _, path) = forward(&session(), "uncapped.safetensors");
    assert!(report.ok(), "{:?}", report.failed);
    let want = bytes(&path);

    // Capped at half the file: two forwards of one loaded model (the second reads back what
    // the first released), both bit for bit as uncapped, the bytes read back reported.
    residency::set_cap(Some(size / 2));
    let s = session();
    let before = residency::streamed_bytes();
    let (first, _, path) = forward(&s, "capped1.safetensors");
    assert!(first.ok(), "{:?}", first.failed);
    assert_eq!(bytes(&path), want, "the first capped forward");
    let (second, events, path) = forward(&s, "capped2.safetensors");
    assert!(second.ok(), "{:?}", second.failed);
    assert_eq!(bytes(&path), want, "the second capped forward");
    let streamed = residency::streamed_bytes() - before;
    assert!(
        streamed > 0,
        "nothing was read back under a cap of half the weights"
    );
    let reported: u64 = events
        .iter()
        .filter_map(|e| match e {
            Event::WeightsStreamed { node, bytes, .. } if &**node == "f" => Some(*bytes),
            _ => None,
        })
        .sum();
    assert!(reported > 0, "no weights_streamed event: {events:?}");
    eprintln!(
        "cap {} KiB of a {} KiB file: {} KiB read back over two forwards ({reported} bytes \
         reported by the second)",
        (size / 2) >> 10,
        size >> 10,
        streamed >> 10
    );

    // A cap smaller than one weight: the forward fails, naming the node and the cap.
    residency::set_cap(Some(1024));
    let (report, _, _) = forward(&session(), "too_small.safetensors");
    residency::set_cap(None);
    let err = format!("{:?}", report.failed);
    assert!(
        err.contains("\"f\"") && err.contains("memory cap") && err.contains("--max-memory"),
        "{err}"
    );
}

#[test]
fn sizes_parse_with_units_and_bad_ones_say_why() {
    assert_eq!(residency::parse_bytes("8G"), Ok(8 << 30));
    assert_eq!(residency::parse_bytes("512MiB"), Ok(512 << 20));
    assert_eq!(residency::parse_bytes("1.5k"), Ok(1536));
    assert_eq!(residency::parse_bytes("1000"), Ok(1000));
    for bad in ["", "G", "8X", "-1G", "0"] {
        let e = residency::parse_bytes(bad).unwrap_err();
        assert!(e.contains(bad), "{bad}: {e}");
    }
}
