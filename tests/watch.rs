//! Hot reload through the embedding API: an invalid edit keeps the old graph, a valid edit
//! re-runs exactly the changed nodes, a Lua module edit is seen, and a plugin rebuilt during the
//! session is picked up, its old build released.

mod common;

use ditflow::{
    watch_graph, ArgValue, Event, Graph, RunOptions, Runtime, Session, Value, WatchOptions,
};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Watching {
    events: Receiver<Event>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join()
                .expect("the watch thread")
                .expect("the watch ends cleanly");
        }
    }
}

fn start(session: Arc<Session>, graph: &Path, plugin_dirs: Vec<PathBuf>, out: PathBuf) -> Watching {
    let (tx, rx) = channel();
    let tx = std::sync::Mutex::new(tx);
    let run = RunOptions {
        out_dir: out,
        subscribers: vec![Arc::new(move |e: &Event| {
            let _ = tx.lock().unwrap().send(e.clone());
        })],
        ..RunOptions::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let opts = WatchOptions {
        plugin_dirs,
        stop: stop.clone(),
        ..WatchOptions::default()
    };
    let graph = graph.to_path_buf();
    let thread = std::thread::spawn(move || watch_graph(&session, &graph, &[], &run, &opts));
    Watching {
        events: rx,
        stop,
        thread: Some(thread),
    }
}

/// What one reaction to a change looked like.
#[derive(Debug, Default)]
struct Reaction {
    executed: BTreeSet<String>,
    cached: BTreeSet<String>,
    invalid: Vec<String>,
    reloaded: Vec<String>,
    loaded: Vec<String>,
    refused: Vec<String>,
}

/// Events up to the next finished run, invalid graph or refused plugin build.
fn next_reaction(w: &Watching) -> Reaction {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut r = Reaction::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = w
            .events
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no reaction within 30 s; so far {r:?}"));
        eprintln!("event {e:?}");
        match e {
            Event::NodeStarted { node, .. } => {
                r.executed.insert(node.to_string());
            }
            Event::NodeCached { node } => {
                r.cached.insert(node.to_string());
            }
            Event::PluginReloaded { plugin, .. } => r.reloaded.push(plugin),
            Event::PluginLoaded { plugin, .. } => r.loaded.push(plugin),
            // A refused build leaves everything as it was: nothing re-runs.
            Event::PluginRefused { error, .. } => {
                r.refused.push(error);
                return r;
            }
            Event::GraphInvalid { errors, .. } => {
                r.invalid = errors;
                return r;
            }
            Event::RunFinished { .. } => return r,
            _ => {}
        }
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Writes a file the way editors do: a new file renamed over the old.
fn save(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

const GRAPH: &str = "version: 1
nodes:
  noise: {type: RandomNoise, inputs: {seed: 1, width: 8, height: 8}}
  image: {type: NoiseToImage, inputs: {latent: noise.noise, scale: 0.2}}
  as_tensor: {type: LatentToTensor, inputs: {latent: noise.noise}}
  stats: {type: TensorStats, inputs: {tensor: as_tensor.tensor}}
outputs:
  mean: stats.mean
";

fn nodes_runtime() -> Arc<Runtime> {
    let rt = Runtime::new();
    for lib in common::std_plugins() {
        rt.load_plugin_file(&lib).expect("nodes plugin");
    }
    Arc::new(rt)
}

#[test]
fn invalid_edits_keep_the_old_graph_and_valid_edits_rerun_exactly_the_changed_nodes() {
    let dir = common::temp_dir("watch-yaml");
    let graph = dir.join("g.yaml");
    std::fs::write(&graph, GRAPH).unwrap();
    let session = Arc::new(Session::new(nodes_runtime()));
    let w = start(session.clone(), &graph, vec![], dir.join("out"));
    let first = next_reaction(&w);
    assert_eq!(
        first.executed,
        set(&["noise", "image", "as_tensor", "stats"])
    );

    // A broken edit: reported with its location, nothing runs, the old graph stays.
    save(&graph, &GRAPH.replace("scale: 0.2}}", "scale: 0.2}"));
    let bad = next_reaction(&w);
    assert!(bad.executed.is_empty(), "{bad:?}");
    assert!(
        bad.invalid
            .iter()
            .any(|e| e.starts_with(&format!("{}:", graph.display()))),
        "{bad:?}"
    );
    // A type error found by validation, not the parser.
    save(
        &graph,
        &GRAPH.replace("type: NoiseToImage", "type: NoiseToImg"),
    );
    let bad = next_reaction(&w);
    assert!(
        bad.invalid
            .iter()
            .any(|e| e.contains(":4:") && e.contains("NoiseToImg")),
        "{bad:?}"
    );

    // A valid edit of one constant: only that node runs again; the rest come from the cache.
    save(&graph, &GRAPH.replace("scale: 0.2", "scale: 0.5"));
    let good = next_reaction(&w);
    assert!(good.invalid.is_empty(), "{good:?}");
    assert_eq!(good.executed, set(&["image"]));
    assert_eq!(good.cached, set(&["noise", "as_tensor", "stats"]));
    // Changing the seed re-runs the whole chain below it.
    save(
        &graph,
        &GRAPH
            .replace("scale: 0.2", "scale: 0.5")
            .replace("seed: 1", "seed: 2"),
    );
    let all = next_reaction(&w);
    assert_eq!(all.executed, set(&["noise", "image", "as_tensor", "stats"]));
}

#[test]
fn a_lua_module_edit_reruns_the_graph_that_requires_it() {
    let dir = common::temp_dir("watch-lua");
    std::fs::create_dir_all(dir.join("lib")).unwrap();
    let module = dir.join("lib/params.lua");
    std::fs::write(&module, "return {scale = 0.2}\n").unwrap();
    let graph = dir.join("g.lua");
    std::fs::write(
        &graph,
        "local p = require('lib.params')\nlocal n = node('noise', 'RandomNoise', {seed = 1, width = 8, height = 8})\nlocal i = node('image', 'NoiseToImage', {latent = n.noise, scale = p.scale})\noutput('image', i.image)\n",
    )
    .unwrap();
    let session = Arc::new(Session::new(nodes_runtime()));
    let w = start(session, &graph, vec![], dir.join("out"));
    assert_eq!(next_reaction(&w).executed, set(&["noise", "image"]));
    save(&module, "return {scale = 0.7}\n");
    let r = next_reaction(&w);
    assert_eq!(r.executed, set(&["image"]));
    assert_eq!(r.cached, set(&["noise"]));
}

#[test]
fn a_plugin_rebuilt_during_the_session_is_picked_up_and_the_old_build_released() {
    let dir = common::temp_dir("watch-plugin");
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let lib = common::build_c_plugin_with(
        "tests/plugins/c/versioned_plugin.c",
        &plugins,
        &["-DFACTOR=2"],
    );
    let graph = dir.join("g.yaml");
    std::fs::write(
        &graph,
        "version: 1\nnodes:\n  v: {type: CVersioned, inputs: {x: 1.5}}\n  s: {type: FormatString, inputs: {template: \"{a}\", a: v.y}}\noutputs:\n  y: v.y\n",
    )
    .unwrap();
    let rt = Runtime::new();
    for lib in common::std_plugins() {
        rt.load_plugin_file(&lib).unwrap();
    }
    rt.load_plugin_file(&lib).unwrap();
    let rt = Arc::new(rt);
    let session = Arc::new(Session::new(rt.clone()));
    let y = |session: &Session| {
        let g = Graph::from_file(&graph).unwrap();
        let report = session
            .run(&g, &[] as &[(String, ArgValue)], &RunOptions::default())
            .unwrap();
        match &**report.output("y").unwrap() {
            Value::Float(f) => *f,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(y(&session), 3.0);
    let w = start(
        session.clone(),
        &graph,
        vec![plugins.clone()],
        dir.join("out"),
    );
    let first = next_reaction(&w);
    assert!(first.executed.is_empty(), "all cached: {first:?}");

    // A broken build replaces the library: refused with the reason, the old build stays in use.
    let broken = dir.join("broken.so");
    std::fs::write(&broken, b"not a library").unwrap();
    std::fs::rename(&broken, &lib).unwrap();
    let r = next_reaction(&w);
    assert_eq!(r.refused.len(), 1, "{r:?}");
    assert!(r.refused[0].contains(&lib.display().to_string()), "{r:?}");
    assert!(r.executed.is_empty(), "{r:?}");
    assert_eq!(y(&session), 3.0);

    // Rebuild with another factor, replacing the library file the way a build does.
    let build = dir.join("build");
    std::fs::create_dir_all(&build).unwrap();
    let new = common::build_c_plugin_with(
        "tests/plugins/c/versioned_plugin.c",
        &build,
        &["-DFACTOR=3"],
    );
    std::fs::rename(&new, &lib).unwrap();
    let r = next_reaction(&w);
    assert_eq!(r.reloaded, vec!["c-versioned".to_string()]);
    assert_eq!(r.executed, set(&["v", "s"]), "{r:?}");
    drop(w);
    assert_eq!(y(&session), 4.5);
    // Nothing holds the old build any more: its outputs left the cache with the reload.
    assert!(
        rt.retained_libraries().is_empty(),
        "{:?}",
        rt.retained_libraries()
    );
    // The plugin declares DF_PLUGIN_UNLOADABLE, so the old build is unmapped, not just released:
    // the file it was loaded from (replaced by the rebuild) is no longer mapped.
    #[cfg(target_os = "linux")]
    {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let old = format!("{} (deleted)", lib.display());
        assert!(
            !maps.lines().any(|l| l.ends_with(&old)),
            "{old} is still mapped"
        );
    }
}

#[test]
fn a_plugin_added_to_the_folder_is_loaded_and_the_waiting_graph_runs() {
    let dir = common::temp_dir("watch-new-plugin");
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let graph = dir.join("g.yaml");
    std::fs::write(
        &graph,
        "version: 1\nnodes:\n  g: {type: CGreet, inputs: {name: reload}}\noutputs:\n  text: g.text\n",
    )
    .unwrap();
    let session = Arc::new(Session::new(nodes_runtime()));
    let w = start(session, &graph, vec![plugins.clone()], dir.join("out"));
    // No plugin has CGreet yet: the graph is invalid, and the watch waits.
    let first = next_reaction(&w);
    assert!(
        first.invalid.iter().any(|e| e.contains("CGreet")),
        "{first:?}"
    );
    // A file that is not a plugin is ignored; then the plugin arrives (built elsewhere, moved in).
    std::fs::write(plugins.join("libnotes.so"), b"not a library").unwrap();
    let build = dir.join("build");
    std::fs::create_dir_all(&build).unwrap();
    let lib = common::build_c_plugin("plugins/examples/c/hello_plugin.c", &build);
    std::fs::rename(&lib, plugins.join(lib.file_name().unwrap())).unwrap();
    let mut r = next_reaction(&w);
    while r.loaded.is_empty() && !r.refused.is_empty() {
        // The junk file is reported as refused (it is not a loadable library); go on.
        r = next_reaction(&w);
    }
    assert_eq!(r.loaded, vec!["c-hello".to_string()], "{r:?}");
    assert_eq!(r.executed, set(&["g"]));
}
