//! The memory cap on weights (`--max-memory`, `ditflow::weights::residency`): a model whose
//! mapped weights are twice the cap runs bit for bit as uncapped, reading released weights back
//! from its file (reported in `weights_streamed` events), and a cap below one weight's size is an
//! error naming the node; a session lets go of its least recently used models once their weights
//! pass the cap. A test binary of its own: the cap holds for the whole process, so its tests take
//! turns ([`CAP`]).

mod common;

use ditflow::weights::residency;
use ditflow::{Event, Graph, RunOptions, Runtime, Session};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Held by each test while it sets the process-wide cap.
static CAP: Mutex<()> = Mutex::new(());

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
    let model = common::repo().join("tests/fixtures/gguf/wan/wan-tiny-F32.gguf");
    forward_model(session, &model, out)
}

/// [`forward`] with the model file `model`.
fn forward_model(
    session: &Session,
    model: &Path,
    out: &str,
) -> (ditflow::RunReport, Vec<Event>, std::path::PathBuf) {
    let root = common::repo().join("tests/fixtures");
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
    let _cap = CAP.lock().unwrap_or_else(|p| p.into_inner());
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
fn a_session_lets_go_of_its_least_recently_used_model_once_the_models_pass_the_cap() {
    let _cap = CAP.lock().unwrap_or_else(|p| p.into_inner());
    // Two copies of the tiny Wan in folders of their own: two models of one size.
    let src = common::repo().join("tests/fixtures/gguf/wan");
    let copies: Vec<_> = ["a", "b"]
        .iter()
        .map(|name| {
            let dir = common::temp_dir(&format!("memory-cap-model-{name}"));
            for f in ["wan-tiny-F32.gguf", "config.json"] {
                std::fs::copy(src.join(f), dir.join(f)).unwrap();
            }
            dir.join("wan-tiny-F32.gguf")
        })
        .collect();
    let size = std::fs::metadata(&copies[0]).unwrap().len() as usize;
    let run = |s: &Session, i: usize| {
        let (report, _, _) = forward_model(s, &copies[i], &format!("model{i}.safetensors"));
        assert!(report.ok(), "{:?}", report.failed);
        s.cache_stats()
    };

    // No cap: the session keeps both.
    let s = session();
    run(&s, 0);
    let stats = run(&s, 1);
    assert_eq!((stats.models, stats.models_evicted), (2, 0), "{stats:?}");
    assert!(
        stats.model_bytes > size && stats.model_bytes <= 2 * size,
        "two models' weights charged: {stats:?} for files of {size} bytes"
    );

    // A cap of one and a half models: loading the second lets the first go, and using the
    // first again lets the second go; every run still completes.
    residency::set_cap(Some(size * 3 / 2));
    let s = session();
    assert_eq!(run(&s, 0).models, 1);
    let stats = run(&s, 1);
    assert_eq!((stats.models, stats.models_evicted), (1, 1), "{stats:?}");
    let stats = run(&s, 0);
    residency::set_cap(None);
    assert_eq!((stats.models, stats.models_evicted), (1, 2), "{stats:?}");
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

#[test]
fn under_the_cap_weights_joined_at_load_stay_mapped_with_the_same_bytes() {
    use ditflow::tensor::ops::concat;
    use ditflow::weights::{LoadOptions, Weights};
    let _cap = CAP.lock().unwrap_or_else(|p| p.into_inner());
    let path = common::repo().join("tests/fixtures/parity/pixart_alpha");
    let w = Weights::open(&path, LoadOptions::default()).unwrap();
    // A fused q·k·v, as the attention loaders make it.
    let name = |p: &str| format!("transformer_blocks.0.attn1.to_{p}.weight");
    let (q, k, v) = (
        w.get(&name("q"), None).unwrap(),
        w.get(&name("k"), None).unwrap(),
        w.get(&name("v"), None).unwrap(),
    );
    assert!(q.is_mapped() && k.is_mapped() && v.is_mapped());
    let in_memory = concat(&[q, k, v], 0).unwrap();
    residency::set_cap(Some(1 << 30));
    let joined = concat(&[q, k, v], 0);
    residency::set_cap(None);
    let joined = joined.unwrap();
    assert!(
        !in_memory.is_mapped(),
        "without a cap the join is in memory"
    );
    assert!(
        joined.is_mapped(),
        "under the cap the join is mapped from a file"
    );
    assert_eq!(joined.shape(), in_memory.shape());
    assert_eq!(joined.cpu_bytes().unwrap(), in_memory.cpu_bytes().unwrap());
}
