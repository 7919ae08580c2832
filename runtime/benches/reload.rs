//! Hot-reload latency (`cargo bench -p ditflow --bench reload`): the time from saving an edit of
//! a watched YAML graph to the first `node_started` of the re-run, over repeated edits of
//! `graphs/noise.yaml` (each edit changes the seed, so the whole graph re-runs). Target: p50
//! under 100 ms. Prints numbers; asserts nothing.

#[path = "../../tests/common/mod.rs"]
mod common;

use ditflow::{watch_graph, Event, RunOptions, Runtime, Session, WatchOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn main() {
    let edits: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(40);
    let rt = Runtime::new();
    for lib in common::std_plugins() {
        rt.load_plugin_file(&lib).expect("nodes plugin");
    }
    let session = Arc::new(Session::new(Arc::new(rt)));
    let dir = common::temp_dir("bench-reload");
    let graph = dir.join("noise.yaml");
    let text = std::fs::read_to_string(common::repo().join("graphs/noise.yaml")).unwrap();
    std::fs::write(&graph, &text).unwrap();

    let (tx, rx) = channel::<(Instant, Event)>();
    let tx = Mutex::new(tx);
    let run = RunOptions {
        out_dir: dir.join("out"),
        subscribers: vec![Arc::new(move |e: &Event| {
            let _ = tx.lock().unwrap().send((Instant::now(), e.clone()));
        })],
        ..RunOptions::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let opts = WatchOptions {
        stop: stop.clone(),
        ..WatchOptions::default()
    };
    let watcher = {
        let (session, graph) = (session.clone(), graph.clone());
        std::thread::spawn(move || watch_graph(&session, &graph, &[], &run, &opts))
    };
    let wait_finished = || loop {
        let (_, e) = rx.recv_timeout(Duration::from_secs(30)).expect("a run");
        if matches!(e, Event::RunFinished { .. }) {
            break;
        }
    };
    wait_finished();
    let mut latencies = Vec::with_capacity(edits);
    for i in 0..edits {
        let edited = text.replace(
            "default: 0, doc: \"noise seed",
            &format!("default: {}, doc: \"noise seed", i + 1),
        );
        assert_ne!(edited, text, "the edit must change the graph");
        // Save as editors do: write a new file and rename it over the old one.
        let tmp = dir.join("noise.yaml.tmp~");
        std::fs::write(&tmp, edited).unwrap();
        let saved = Instant::now();
        std::fs::rename(&tmp, &graph).unwrap();
        let started = loop {
            let (at, e) = rx.recv_timeout(Duration::from_secs(30)).expect("a re-run");
            if matches!(e, Event::NodeStarted { .. }) {
                break at;
            }
        };
        latencies.push(started.duration_since(saved).as_secs_f64() * 1e3);
        wait_finished();
        // Let the debounce window close so edits do not merge.
        std::thread::sleep(Duration::from_millis(60));
    }
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap().unwrap();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    println!(
        "Hot reload of a YAML edit ({edits} edits of graphs/noise.yaml, debounce {} ms): save -> first node_started",
        WatchOptions::default().debounce.as_millis()
    );
    println!(
        "  p50 {:.1} ms   p90 {:.1} ms   max {:.1} ms   (target: p50 < 100 ms)",
        pct(0.5),
        pct(0.9),
        pct(1.0)
    );
}
