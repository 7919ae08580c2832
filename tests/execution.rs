//! Execution end to end through the embedding API with real plugin libraries: partial re-runs from
//! the cache, concurrent branches, failure isolation, cancellation, and Model objects.

mod common;

use ditflow::{ArgValue, Event, Graph, RunOptions, RunReport, Runtime, Session, Value};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

fn runtime() -> Arc<Runtime> {
    let rt = Runtime::new();
    for lib in common::STD_PLUGINS.iter().chain(&["ditflow_testkit"]) {
        rt.load_plugin_file(&common::plugin_lib(lib))
            .expect("plugin loads");
    }
    assert!(rt.problems().is_empty(), "{:?}", rt.problems());
    Arc::new(rt)
}

fn graph(yaml: &str) -> Graph {
    Graph::from_yaml(yaml, "test.yaml", Path::new(".")).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs and records every event.
fn run_recorded(
    session: &Session,
    g: &Graph,
    args: &[(String, ArgValue)],
    workers: usize,
) -> (RunReport, Vec<Event>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let opts = RunOptions {
        workers,
        out_dir: common::temp_dir("exec-out"),
        subscribers: vec![Arc::new(move |e: &Event| {
            sink.lock().unwrap().push(e.clone())
        })],
        ..RunOptions::default()
    };
    let report = session
        .run(g, args, &opts)
        .unwrap_or_else(|d| panic!("{d}"));
    let events = events.lock().unwrap().clone();
    (report, events)
}

fn names(v: &[Arc<str>]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

const CHAINS: &str = "
version: 1
inputs:
  x: {type: Int, default: 1}
nodes:
  a: {type: Add1, inputs: {x: $x}}
  b: {type: Add1, inputs: {x: a.y}}
  c: {type: Add1, inputs: {x: b.y}}
  d: {type: Add1, inputs: {x: 10}}
  e: {type: Add1, inputs: {x: d.y}}
  f: {type: IntMath, inputs: {a: c.y, b: e.y, op: add}}
outputs:
  f: f.result
";

#[test]
fn rerun_after_one_change_executes_exactly_the_changed_node_and_its_descendants() {
    let session = Session::new(runtime());
    let g = graph(CHAINS);
    let (r1, _) = run_recorded(&session, &g, &[], 2);
    assert!(r1.ok(), "{:?}", r1.failed);
    assert_eq!(names(&r1.executed), set(&["a", "b", "c", "d", "e", "f"]));
    assert_eq!(**r1.output("f").unwrap(), Value::Int(4 + 12));

    // A graph input changed: a and everything downstream of it re-run; d and e come from the cache.
    let (r2, events) = run_recorded(&session, &g, &[("x".into(), ArgValue::Text("5".into()))], 2);
    assert_eq!(names(&r2.executed), set(&["a", "b", "c", "f"]));
    assert_eq!(names(&r2.cached), set(&["d", "e"]));
    let cached_events: BTreeSet<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::NodeCached { node } => Some(node.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(cached_events, set(&["d", "e"]));
    assert_eq!(**r2.output("f").unwrap(), Value::Int(8 + 12));

    // A constant in the document changed (as after an edit): d and its descendants re-run.
    let edited = graph(&CHAINS.replace("{x: 10}", "{x: 20}"));
    let (r3, _) = run_recorded(
        &session,
        &edited,
        &[("x".into(), ArgValue::Text("5".into()))],
        2,
    );
    assert_eq!(names(&r3.executed), set(&["d", "e", "f"]));
    assert_eq!(names(&r3.cached), set(&["a", "b", "c"]));

    // Nothing changed: everything is cached.
    let (r4, _) = run_recorded(
        &session,
        &edited,
        &[("x".into(), ArgValue::Text("5".into()))],
        2,
    );
    assert!(r4.executed.is_empty(), "{:?}", r4.executed);
    assert_eq!(r4.cached.len(), 6);
}

#[test]
fn nondeterministic_nodes_rerun_and_invalidate_their_descendants() {
    let session = Session::new(runtime());
    let g = graph(
        "version: 1\nnodes:\n  n: {type: Counter}\n  m: {type: Add1, inputs: {x: n.count}}\n  k: {type: Add1, inputs: {x: 1}}\n",
    );
    let (r1, _) = run_recorded(&session, &g, &[], 2);
    let (r2, _) = run_recorded(&session, &g, &[], 2);
    assert!(r1.ok() && r2.ok());
    assert_eq!(names(&r2.executed), set(&["n", "m"]));
    assert_eq!(names(&r2.cached), set(&["k"]));
}

#[test]
fn independent_branches_overlap_with_two_workers() {
    let session = Session::new(runtime());
    let g = graph(
        "version: 1\nnodes:\n  left: {type: Sleep, inputs: {ms: 300, tag: l}}\n  right: {type: Sleep, inputs: {ms: 300, tag: r}}\n",
    );
    let (report, events) = run_recorded(&session, &g, &[], 2);
    assert!(report.ok());
    // Both branches started before either finished: they ran at the same time.
    let first_finish = events
        .iter()
        .position(|e| matches!(e, Event::NodeFinished { .. }))
        .unwrap();
    let starts = events[..first_finish]
        .iter()
        .filter(|e| matches!(e, Event::NodeStarted { .. }))
        .count();
    assert_eq!(starts, 2, "{events:?}");
    // With one worker they cannot overlap.
    let session = Session::new(runtime());
    let (_, events) = run_recorded(&session, &g, &[], 1);
    let first_finish = events
        .iter()
        .position(|e| matches!(e, Event::NodeFinished { .. }))
        .unwrap();
    let starts = events[..first_finish]
        .iter()
        .filter(|e| matches!(e, Event::NodeStarted { .. }))
        .count();
    assert_eq!(starts, 1, "{events:?}");
}

#[test]
fn results_do_not_depend_on_concurrency() {
    let yaml = "
version: 1
nodes:
  n1: {type: RandomNoise, inputs: {seed: 3, width: 17, height: 9, channels: 3}}
  n2: {type: RandomNoise, inputs: {seed: 4, width: 17, height: 9, channels: 3}}
  t1: {type: LatentToTensor, inputs: {latent: n1.noise}}
  t2: {type: LatentToTensor, inputs: {latent: n2.noise}}
  s1: {type: TensorStats, inputs: {tensor: t1.tensor}}
  s2: {type: TensorStats, inputs: {tensor: t2.tensor}}
  sum: {type: Math, inputs: {a: s1.mean, b: s2.std, op: add}}
outputs:
  noise: n1.noise
  sum: sum.result
";
    let g = graph(yaml);
    let reports: Vec<RunReport> = [1, 2, 4]
        .iter()
        .map(|&w| run_recorded(&Session::new(runtime()), &g, &[], w).0)
        .collect();
    for r in &reports[1..] {
        assert_eq!(r.output("noise"), reports[0].output("noise"));
        assert_eq!(r.output("sum"), reports[0].output("sum"));
    }
}

#[test]
fn a_panicking_node_fails_alone_and_the_rest_finishes() {
    let session = Session::new(runtime());
    let g = graph(
        "version: 1\nnodes:\n  bad: {type: Panic, inputs: {message: kaboom}}\n  after: {type: Add1, inputs: {x: bad.out}}\n  err: {type: Fail, inputs: {message: nope}}\n  ok1: {type: Add1, inputs: {x: 1}}\n  ok2: {type: Add1, inputs: {x: ok1.y}}\noutputs:\n  good: ok2.y\n",
    );
    let (report, events) = run_recorded(&session, &g, &[], 2);
    assert!(!report.ok());
    let failed: Vec<(String, String)> = report
        .failed
        .iter()
        .map(|f| (f.node.to_string(), f.error.clone()))
        .collect();
    assert_eq!(failed.len(), 2, "{failed:?}");
    let bad = failed.iter().find(|(n, _)| n == "bad").expect("bad failed");
    assert!(
        bad.1.contains("panicked") && bad.1.contains("kaboom"),
        "{bad:?}"
    );
    let err = failed.iter().find(|(n, _)| n == "err").expect("err failed");
    assert_eq!(err.1, "nope");
    assert_eq!(names(&report.skipped), set(&["after"]));
    assert_eq!(**report.output("good").unwrap(), Value::Int(3));
    assert!(events.iter().any(|e| matches!(e, Event::NodeFailed { node, error } if &**node == "bad" && error.contains("kaboom"))));
    // The runtime is still fine: the same session runs again.
    let (again, _) = run_recorded(&session, &g, &[], 2);
    assert_eq!(**again.output("good").unwrap(), Value::Int(3));
}

#[test]
fn cancellation_stops_the_run_cleanly() {
    let session = Session::new(runtime());
    let g = graph("version: 1\nnodes:\n  slow: {type: Sleep, inputs: {ms: 20000}}\n  next: {type: Add1, inputs: {x: slow.out}}\n");
    let opts = RunOptions {
        workers: 2,
        out_dir: common::temp_dir("cancel"),
        ..RunOptions::default()
    };
    let cancel = opts.cancel.clone();
    let mut opts = opts;
    opts.subscribers.push(Arc::new(move |e: &Event| {
        if matches!(e, Event::NodeStarted { .. }) {
            cancel.store(true, Ordering::SeqCst);
        }
    }));
    let t0 = std::time::Instant::now();
    let report = session.run(&g, &[], &opts).unwrap();
    assert!(report.cancelled);
    assert!(!report.ok());
    assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
    assert!(report.failed[0].error.contains("cancelled"));
    assert_eq!(names(&report.skipped), set(&["next"]));
    // Not a speed test: a 20 s node that ignored cancellation would take 20 s.
    assert!(t0.elapsed().as_secs() < 10);
}

#[test]
fn models_are_plugin_objects_passed_between_nodes() {
    let session = Session::new(runtime());
    let g = graph(
        "version: 1\nnodes:\n  m: {type: MakeModel, inputs: {scale: 3.0}}\n  y: {type: ApplyModel, inputs: {model: m.model, x: 2.5}}\noutputs:\n  y: y.y\n",
    );
    let (report, _) = run_recorded(&session, &g, &[], 2);
    assert!(report.ok(), "{:?}", report.failed);
    assert_eq!(**report.output("y").unwrap(), Value::Float(7.5));
    // The model is cached; dropping the session drops it through the plugin's drop function.
    assert!(session.cache_stats().entries >= 2);
    drop(session);
}

#[test]
fn sessions_are_shared_across_threads() {
    let session = Arc::new(Session::new(runtime()));
    let g = Arc::new(graph(CHAINS));
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let (session, g) = (session.clone(), g.clone());
            std::thread::spawn(move || {
                let args = vec![("x".to_string(), ArgValue::Value(Value::Int(i)))];
                let r = session
                    .run(
                        &g,
                        &args,
                        &RunOptions {
                            workers: 2,
                            ..RunOptions::default()
                        },
                    )
                    .unwrap();
                r.output("f").map(|v| (**v).clone())
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), Some(Value::Int(i as i64 + 3 + 12)));
    }
}

#[test]
fn linked_values_are_checked_against_port_ranges_at_run_time() {
    let session = Session::new(runtime());
    let g = graph(
        "version: 1\nnodes:\n  w: {type: Int, inputs: {value: 0}}\n  n: {type: RandomNoise, inputs: {width: w.value}}\n",
    );
    let (report, _) = run_recorded(&session, &g, &[], 2);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(&*report.failed[0].node, "n");
    assert!(
        report.failed[0].error.contains("out of range"),
        "{}",
        report.failed[0].error
    );
}

#[test]
fn two_runtimes_in_one_process_are_independent() {
    let dir = common::temp_dir("two-runtimes");
    let lib =
        common::build_c_plugin_with("tests/plugins/c/versioned_plugin.c", &dir, &["-DFACTOR=2"]);
    let a = Arc::new(Runtime::new());
    for lib in common::std_plugins() {
        a.load_plugin_file(&lib).unwrap();
    }
    a.load_plugin_file(&lib).unwrap();
    let b = Arc::new(Runtime::new());
    b.load_plugin_file(&lib).unwrap();
    // A rebuilt plugin reloaded into one runtime leaves the other on its build.
    let rebuilt_dir = dir.join("v3");
    std::fs::create_dir_all(&rebuilt_dir).unwrap();
    let rebuilt = common::build_c_plugin_with(
        "tests/plugins/c/versioned_plugin.c",
        &rebuilt_dir,
        &["-DFACTOR=3"],
    );
    a.reload_plugin(&rebuilt).unwrap();
    let g = graph(
        "version: 1\nnodes:\n  v: {type: CVersioned, inputs: {x: 2.0}}\noutputs:\n  y: v.y\n",
    );
    let run = |rt: &Arc<Runtime>| {
        let (rt, g) = (rt.clone(), g.clone());
        std::thread::spawn(move || {
            let session = Session::new(rt);
            let report = session.run(&g, &[], &RunOptions::default()).unwrap();
            match &**report.output("y").unwrap() {
                Value::Float(f) => *f,
                other => panic!("{other:?}"),
            }
        })
    };
    let (ya, yb) = (run(&a), run(&b));
    assert_eq!(ya.join().unwrap(), 6.0);
    assert_eq!(yb.join().unwrap(), 4.0);
    // Node types are per runtime.
    assert!(a.registry().get("FormatString").is_some());
    assert!(b.registry().get("FormatString").is_none());
    assert_eq!(b.registry().len(), 1);
}
