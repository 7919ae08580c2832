//! Hot reload: watch a graph's files (the document and the Lua modules it requires) and plugin
//! libraries, and re-run in place on every change.
//!
//! - A changed graph is loaded and validated again. If it is invalid, the last good graph stays
//!   and the problems are reported ([`Event::GraphInvalid`]); if it is valid, it is swapped in
//!   and re-run through the same [`Session`], so only nodes whose input signature changed
//!   execute and loaded models stay loaded.
//! - A library added to a plugin folder is loaded, and the graph runs again.
//! - A changed plugin library is loaded beside the old one ([`Runtime::reload_plugin`]), then
//!   the graph re-runs with the new node types; a broken build keeps the old one
//!   ([`Event::PluginRefused`]).
//!
//! Everything is reported as [`Event`]s to the run's subscribers, so `ditflow watch --events
//! jsonl` prints the same stream as `ditflow run --events jsonl`, plus the reload events.
//!
//! [`Runtime::reload_plugin`]: crate::Runtime::reload_plugin

use crate::exec::events::Event;
use crate::exec::plan::Plan;
use crate::exec::scheduler::RunOptions;
use crate::graph::lua::LuaLimits;
use crate::graph::validate::ArgValue;
use crate::plugin::{build_stamp, is_library_file, PluginError};
use crate::runtime::{Graph, Session};
use notify_debouncer_mini::notify::RecursiveMode;
use notify_debouncer_mini::{new_debouncer, DebounceEventResult};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

/// How a watch behaves.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Changes closer together than this are taken as one.
    pub debounce: Duration,
    /// Folders whose plugin libraries are reloaded when they change.
    pub plugin_dirs: Vec<PathBuf>,
    /// The sandbox for Lua graphs.
    pub lua: LuaLimits,
    /// Set to end the watch.
    pub stop: Arc<AtomicBool>,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            debounce: Duration::from_millis(20),
            plugin_dirs: Vec::new(),
            lua: LuaLimits::default(),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// `path` made absolute with its folder resolved, so paths from the watcher compare equal.
fn canonical(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => dir.canonicalize().unwrap_or(dir.to_path_buf()).join(name),
        _ => abs,
    }
}

/// A hash of a file's contents (0 when it cannot be read): the watcher also reports reads, and
/// editors touch files without changing them, so only a new content counts as a change.
fn content_stamp(path: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    match std::fs::read(path) {
        Ok(bytes) => bytes.hash(&mut h),
        Err(_) => return 0,
    }
    h.finish()
}

fn stamps(files: &[PathBuf]) -> HashMap<PathBuf, u64> {
    files
        .iter()
        .map(|f| (f.clone(), content_stamp(f)))
        .collect()
}

fn emit(run: &RunOptions, e: Event) {
    for s in &run.subscribers {
        s(&e);
    }
}

/// Loads and validates the graph at `path`; returns its plan and the files to watch, or `None`
/// when the graph is invalid (the problems were reported).
fn load(
    session: &Session,
    path: &Path,
    args: &[(String, ArgValue)],
    run: &RunOptions,
    lua: &LuaLimits,
) -> Option<(Plan, Vec<PathBuf>)> {
    let invalid = |errors: Vec<String>| {
        emit(
            run,
            Event::GraphInvalid {
                graph: path.display().to_string(),
                errors,
            },
        );
        None
    };
    let graph = match Graph::from_file_with(path, lua) {
        Ok(g) => g,
        Err(e) => return invalid(e.diagnostics().0.iter().map(|d| d.to_string()).collect()),
    };
    let plan = match graph.plan(session.runtime(), args) {
        Ok(p) => p,
        Err(d) => return invalid(d.0.iter().map(|d| d.to_string()).collect()),
    };
    let files: Vec<PathBuf> = graph.files().iter().map(|f| canonical(f)).collect();
    emit(
        run,
        Event::GraphLoaded {
            graph: path.display().to_string(),
            files: files.iter().map(|f| f.display().to_string()).collect(),
        },
    );
    Some((plan, files))
}

/// Runs the graph at `path`, then re-runs it on every change of its files or of a loaded plugin
/// library in `opts.plugin_dirs`, until `opts.stop` is set. Errors only when the file watcher
/// cannot start; everything else is reported as events.
pub fn watch_graph(
    session: &Session,
    path: &Path,
    args: &[(String, ArgValue)],
    run: &RunOptions,
    opts: &WatchOptions,
) -> Result<(), String> {
    let path = canonical(path);
    let (tx, rx) = channel::<DebounceEventResult>();
    let mut debouncer =
        new_debouncer(opts.debounce, tx).map_err(|e| format!("cannot watch files: {e}"))?;
    let mut watched: BTreeSet<PathBuf> = BTreeSet::new();
    let mut watch_dir = |dir: &Path, watched: &mut BTreeSet<PathBuf>| {
        if watched.insert(dir.to_path_buf()) {
            if let Err(e) = debouncer.watcher().watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!("cannot watch {}: {e}", dir.display());
            }
        }
    };
    // Folders, not files: editors often save by writing a new file and renaming it over.
    let plugin_dirs: Vec<PathBuf> = opts
        .plugin_dirs
        .iter()
        .filter_map(|d| d.canonicalize().ok())
        .collect();
    for dir in &plugin_dirs {
        watch_dir(dir, &mut watched);
    }
    let mut files = vec![path.clone()];
    let mut seen = HashMap::new();
    let mut refused: HashMap<PathBuf, u64> = HashMap::new();
    let mut pending = load(session, &path, args, run, &opts.lua);
    loop {
        // Watch the (new) graph's files before running it, so no edit made during the run is
        // missed; then run.
        if let Some((plan, new_files)) = pending.take() {
            files = new_files;
            for f in &files {
                if let Some(dir) = f.parent() {
                    watch_dir(dir, &mut watched);
                }
                seen.entry(f.clone()).or_insert_with(|| content_stamp(f));
            }
            session.run_plan(&plan, run);
        }
        if seen.is_empty() {
            seen = stamps(&files);
            if let Some(dir) = path.parent() {
                watch_dir(dir, &mut watched);
            }
        }
        if opts.stop.load(Ordering::SeqCst) {
            break;
        }
        let batch = match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Ok(events)) => events,
            Ok(Err(e)) => {
                tracing::warn!("file watcher: {e}");
                continue;
            }
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let changed: BTreeSet<PathBuf> = batch.iter().map(|e| canonical(&e.path)).collect();
        let mut rerun = false;
        for c in changed.iter().filter(|c| files.contains(c)) {
            let stamp = content_stamp(c);
            if seen.get(c) != Some(&stamp) {
                seen.insert(c.clone(), stamp);
                rerun = true;
            }
        }
        rerun |= plugin_changes(session, &changed, &plugin_dirs, &mut refused, run);
        if rerun {
            pending = load(session, &path, args, run, &opts.lua);
        }
    }
    Ok(())
}

/// Reloads rebuilt plugin libraries and loads libraries added to a plugin folder, among the
/// `changed` files, reporting each as an event; returns whether the node types changed.
/// `refused` remembers builds that failed to load, so that reading one (which the watcher
/// reports too) does not trigger another attempt.
fn plugin_changes(
    session: &Session,
    changed: &BTreeSet<PathBuf>,
    plugin_dirs: &[PathBuf],
    refused: &mut HashMap<PathBuf, u64>,
    run: &RunOptions,
) -> bool {
    let runtime = session.runtime();
    let loaded: Vec<(PathBuf, u64)> = runtime
        .plugins()
        .iter()
        .map(|p| (canonical(&p.path), p.build))
        .collect();
    let mut changed_types = false;
    for lib in changed.iter().filter(|c| is_library_file(c) && c.is_file()) {
        let stamp = build_stamp(lib);
        if refused.get(lib) == Some(&stamp) {
            continue;
        }
        let known = loaded.iter().find(|(path, _)| path == lib);
        let outcome = match known {
            // The same build as loaded: nothing to do.
            Some((_, build)) if *build == stamp => continue,
            Some(_) => runtime.reload_plugin(lib).map(|r| Event::PluginReloaded {
                plugin: r.name,
                path: lib.display().to_string(),
                node_types: r.node_types,
            }),
            // A new library in a plugin folder (the graph may have been waiting for it).
            None if lib
                .parent()
                .is_some_and(|d| plugin_dirs.iter().any(|p| p == d)) =>
            {
                runtime.load_plugin_file(lib).map(|_| {
                    let plugin = runtime
                        .plugins()
                        .into_iter()
                        .find(|p| canonical(&p.path) == *lib)
                        .map(|p| p.name)
                        .unwrap_or_default();
                    let node_types = runtime
                        .registry()
                        .iter()
                        .filter(|t| t.plugin.name == plugin)
                        .map(|t| t.name.clone())
                        .collect();
                    Event::PluginLoaded {
                        plugin,
                        path: lib.display().to_string(),
                        node_types,
                    }
                })
            }
            None => continue,
        };
        match outcome {
            Ok(event) => {
                emit(run, event);
                changed_types = true;
            }
            Err(e) => {
                refused.insert(lib.clone(), stamp);
                // Other libraries may share a plugin folder: only a loaded plugin's file must be
                // a plugin.
                if known.is_some() || !matches!(e, PluginError::NotAPlugin { .. }) {
                    emit(
                        run,
                        Event::PluginRefused {
                            path: lib.display().to_string(),
                            error: e.to_string(),
                        },
                    );
                }
            }
        }
    }
    changed_types
}
