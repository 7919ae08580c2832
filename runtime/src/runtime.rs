//! The embedding API's nouns: [`Runtime`] (node types from plugins), [`Graph`] (a parsed
//! document), [`Session`] (runs graphs and keeps their cached outputs between runs).
//!
//! ```no_run
//! use ditflow::{Graph, Runtime, Session, RunOptions};
//! let runtime = Runtime::with_plugins(&[]);
//! let graph = Graph::from_file("graphs/noise.yaml".as_ref()).unwrap();
//! let session = Session::new(runtime.into());
//! let report = session.run(&graph, &[], &RunOptions::default()).unwrap();
//! assert!(report.ok());
//! ```

use crate::exec::cache::{Cache, CacheStats};
use crate::exec::plan::Plan;
use crate::exec::scheduler::{run_plan, RunOptions, RunReport};
use crate::graph::diag::{Diagnostic, Diagnostics};
use crate::graph::ir::{GraphIr, Loc};
use crate::graph::lua::{parse_lua_graph, LuaLimits};
use crate::graph::lua_node::with_lua_nodes;
use crate::graph::validate::{validate, ArgValue};
use crate::graph::yaml::parse_graph;
use crate::plugin::{
    libraries_in, load_plugin, load_plugin_as, search_path, LoadedLibrary, PluginError,
};
use crate::registry::{DuplicateNodeType, NodeType, PluginInfo, Registry};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

/// Node types gathered from plugins (and from Rust), and the problems met loading them.
///
/// A runtime may change while it is used: [`Runtime::reload_plugin`] swaps in a rebuilt plugin
/// library. Validation takes a snapshot of the node types ([`Runtime::registry`]), so a run in
/// progress keeps the types it started with.
#[derive(Default)]
pub struct Runtime {
    inner: RwLock<RuntimeState>,
    /// Bumped on every change of the node types.
    generation: AtomicU64,
}

#[derive(Default)]
struct RuntimeState {
    registry: Arc<Registry>,
    problems: Vec<String>,
    plugins: Vec<PluginRecord>,
    /// The library each plugin's node types come from, by plugin name.
    libraries: std::collections::HashMap<String, Weak<LoadedLibrary>>,
    /// Libraries replaced by a reload, until everything they made is dropped.
    retired: Vec<(PathBuf, Weak<LoadedLibrary>)>,
}

/// A loaded plugin.
#[derive(Debug, Clone)]
pub struct PluginRecord {
    pub name: String,
    pub version: String,
    /// The library file it was loaded from.
    pub path: PathBuf,
    /// The build stamp of that file when it was loaded.
    pub build: u64,
}

/// What [`Runtime::reload_plugin`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginReload {
    pub name: String,
    /// The node types the new build registered.
    pub node_types: Vec<String>,
}

/// Where reloaded libraries are copied before loading: a fresh path per load, so the new build
/// is mapped beside the old one instead of being confused with it.
fn reload_copy_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::env::temp_dir()
        .join(format!("ditflow-plugins-{}", std::process::id()))
        .join(format!("{n}-{name}"))
}

impl Runtime {
    /// A runtime with no node types.
    pub fn new() -> Runtime {
        Runtime::default()
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, RuntimeState> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, RuntimeState> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A runtime with every plugin found in `dirs`, then `DITFLOW_PLUGIN_PATH`, then the
    /// executable's folder. Refused libraries are listed in [`Runtime::problems`].
    pub fn with_plugins(dirs: &[PathBuf]) -> Runtime {
        let rt = Runtime::new();
        for dir in search_path(dirs) {
            rt.load_plugin_dir(&dir);
        }
        rt
    }

    /// Loads every plugin library in `dir`. Libraries that are not ditflow plugins are skipped.
    pub fn load_plugin_dir(&self, dir: &Path) {
        for lib in libraries_in(dir) {
            match self.load_plugin_file(&lib) {
                Ok(_) => {}
                Err(PluginError::NotAPlugin { path }) => {
                    tracing::debug!("skipping {path}: not a ditflow plugin")
                }
                Err(e) => self.state_mut().problems.push(e.to_string()),
            }
        }
    }

    /// Loads one plugin library; returns how many node types it added. A plugin whose name is
    /// already loaded is skipped (with a note in [`Runtime::problems`] if its version differs).
    pub fn load_plugin_file(&self, path: &Path) -> Result<usize, PluginError> {
        let loaded = load_plugin(path)?;
        let mut st = self.state_mut();
        if let Some(first) = st.plugins.iter().find(|p| p.name == loaded.info.name) {
            // The same build found twice on the search path is not a problem; another version is.
            if first.version == loaded.info.version {
                tracing::debug!(
                    "{}: plugin '{}' already loaded from {}",
                    path.display(),
                    loaded.info.name,
                    first.path.display()
                );
            } else {
                let msg = format!(
                    "{}: plugin '{}' {} is already loaded as version {} from {}; ignoring this copy",
                    path.display(),
                    loaded.info.name,
                    loaded.info.version,
                    first.version,
                    first.path.display()
                );
                st.problems.push(msg);
            }
            return Ok(0);
        }
        st.libraries
            .insert(loaded.info.name.clone(), Arc::downgrade(&loaded.library));
        st.plugins.push(PluginRecord {
            name: loaded.info.name.clone(),
            version: loaded.info.version.clone(),
            path: path.to_path_buf(),
            build: loaded.info.build,
        });
        for w in loaded.warnings {
            st.problems.push(format!("{}: {w}", path.display()));
        }
        let mut registry = (*st.registry).clone();
        let mut added = 0;
        for ty in loaded.node_types {
            match registry.insert(ty) {
                Ok(()) => added += 1,
                Err(e) => st.problems.push(e.to_string()),
            }
        }
        st.registry = Arc::new(registry);
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(added)
    }

    /// Loads a new build of an already loaded plugin library and swaps its node types in. The
    /// file is copied to a fresh path first and loaded from there, beside the old build; runs
    /// validated from now on use the new node types, runs in progress finish with the old ones,
    /// and the old library is released once nothing it made is left ([`Runtime::retained_libraries`]).
    /// A build that fails to load leaves the old one in place and returns the error.
    pub fn reload_plugin(&self, path: &Path) -> Result<PluginReload, PluginError> {
        let copy = reload_copy_path(path);
        let copied = copy
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::copy(path, &copy).map(|_| ()));
        if let Err(e) = copied {
            return Err(PluginError::Load {
                path: path.display().to_string(),
                reason: format!("cannot copy it to {}: {e}", copy.display()),
            });
        }
        let loaded = load_plugin_as(&copy, path);
        // The mapping stays when the file goes: remove the copy at once.
        let _ = std::fs::remove_file(&copy);
        let loaded = loaded?;
        let mut st = self.state_mut();
        let name = loaded.info.name.clone();
        let mut registry = (*st.registry).clone();
        registry.remove_plugin(&name);
        let mut node_types = Vec::new();
        for ty in loaded.node_types {
            let ty_name = ty.name.clone();
            match registry.insert(ty) {
                Ok(()) => node_types.push(ty_name),
                Err(e) => st.problems.push(e.to_string()),
            }
        }
        st.registry = Arc::new(registry);
        let record = PluginRecord {
            name: name.clone(),
            version: loaded.info.version.clone(),
            path: path.to_path_buf(),
            build: loaded.info.build,
        };
        match st.plugins.iter_mut().find(|p| p.name == name) {
            Some(p) => *p = record,
            None => st.plugins.push(record),
        }
        if let Some(old) = st
            .libraries
            .insert(name.clone(), Arc::downgrade(&loaded.library))
        {
            st.retired.push((path.to_path_buf(), old));
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(PluginReload { name, node_types })
    }

    /// Registers a node type implemented in Rust by the host application.
    pub fn register(&self, ty: NodeType) -> Result<(), DuplicateNodeType> {
        let mut st = self.state_mut();
        let mut registry = (*st.registry).clone();
        registry.insert(ty)?;
        st.registry = Arc::new(registry);
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// A snapshot of the node types.
    pub fn registry(&self) -> Arc<Registry> {
        self.state().registry.clone()
    }

    /// Counts changes of the node types (loads and reloads).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Whether node types of `plugin` are those of the plugin's current build.
    pub fn is_current(&self, plugin: &PluginInfo) -> bool {
        plugin.path.is_none()
            || self
                .state()
                .plugins
                .iter()
                .any(|p| p.name == plugin.name && p.build == plugin.build)
    }

    /// Messages about refused plugins and node types.
    pub fn problems(&self) -> Vec<String> {
        self.state().problems.clone()
    }

    /// Loaded plugins.
    pub fn plugins(&self) -> Vec<PluginRecord> {
        self.state().plugins.clone()
    }

    /// Replaced plugin libraries still held by something they made (a value in a cache, a run in
    /// progress). Each is released when the last of those is dropped.
    pub fn retained_libraries(&self) -> Vec<PathBuf> {
        let mut st = self.state_mut();
        st.retired.retain(|(_, lib)| lib.strong_count() > 0);
        st.retired.iter().map(|(p, _)| p.clone()).collect()
    }
}

/// Why a graph could not be loaded or validated.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("{path}: cannot read graph: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Diagnostics),
}

impl GraphError {
    /// The problems as diagnostics (an I/O error becomes one at 1:1).
    pub fn diagnostics(&self) -> Diagnostics {
        match self {
            GraphError::Io { path, source } => Diagnostics(vec![Diagnostic::new(
                path,
                Loc::START,
                format!("cannot read graph: {source}"),
            )]),
            GraphError::Invalid(d) => d.clone(),
        }
    }
}

/// A parsed graph document, not yet validated against node types.
#[derive(Debug, Clone)]
pub struct Graph {
    ir: GraphIr,
}

impl Graph {
    /// Reads a graph file: a Lua script (`.lua`, run in the default sandbox) or a YAML document.
    pub fn from_file(path: &Path) -> Result<Graph, GraphError> {
        Graph::from_file_with(path, &LuaLimits::default())
    }

    /// Reads a graph file; a Lua script runs under `limits`.
    pub fn from_file_with(path: &Path, limits: &LuaLimits) -> Result<Graph, GraphError> {
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| GraphError::Io {
            path: shown.clone(),
            source,
        })?;
        if meta.len() > crate::graph::yaml::MAX_DOCUMENT_BYTES as u64 {
            let msg = format!(
                "graph document is {:.1} MB; the limit is {} MB",
                meta.len() as f64 / 1e6,
                crate::graph::yaml::MAX_DOCUMENT_BYTES >> 20
            );
            return Err(GraphError::Invalid(Diagnostics(vec![Diagnostic::new(
                &shown,
                Loc::START,
                msg,
            )])));
        }
        let text = std::fs::read_to_string(path).map_err(|source| GraphError::Io {
            path: shown.clone(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut ir = if path.extension().is_some_and(|e| e == "lua") {
            parse_lua_graph(&text, &shown, &base, Some(path), limits)
        } else {
            parse_graph(&text, &shown, &base)
        }
        .map_err(GraphError::Invalid)?;
        if ir.watch_files.is_empty() {
            ir.watch_files.push(path.to_path_buf());
        }
        Ok(Graph { ir })
    }

    /// Runs a Lua graph script given as text; `name` is used in messages and `base_dir` resolves
    /// relative paths and `require`d modules.
    pub fn from_lua(
        text: &str,
        name: &str,
        base_dir: &Path,
        limits: &LuaLimits,
    ) -> Result<Graph, GraphError> {
        parse_lua_graph(text, name, base_dir, None, limits)
            .map(|ir| Graph { ir })
            .map_err(GraphError::Invalid)
    }

    /// The files the graph was read from (the document and the modules it required), to watch.
    pub fn files(&self) -> &[PathBuf] {
        &self.ir.watch_files
    }

    /// Parses YAML text; `name` is used in messages and `base_dir` resolves relative paths.
    pub fn from_yaml(text: &str, name: &str, base_dir: &Path) -> Result<Graph, GraphError> {
        parse_graph(text, name, base_dir)
            .map(|ir| Graph { ir })
            .map_err(GraphError::Invalid)
    }

    /// A graph from IR built by another front-end.
    pub fn from_ir(ir: GraphIr) -> Graph {
        Graph { ir }
    }

    pub fn ir(&self) -> &GraphIr {
        &self.ir
    }

    /// Validates against `runtime`'s node types with graph-input values from `args`.
    pub fn plan(
        &self,
        runtime: &Runtime,
        args: &[(String, ArgValue)],
    ) -> Result<Plan, Diagnostics> {
        let registry = runtime.registry();
        if self.ir.lua_nodes.is_empty() {
            return validate(&self.ir, &registry, args);
        }
        let with_lua = with_lua_nodes(&self.ir, &registry, &LuaLimits::default())
            .map_err(|d| Diagnostics(d).sorted())?;
        validate(&self.ir, &with_lua, args)
    }
}

/// Runs graphs against one runtime and keeps their outputs cached between runs, so a re-run
/// executes only what changed. Sessions are thread-safe: several runs may go at once.
pub struct Session {
    runtime: Arc<Runtime>,
    cache: Mutex<Cache>,
    /// The runtime generation the cache was last checked against.
    seen_generation: AtomicU64,
    /// The most bytes of model weights kept loaded between runs (0: no limit of its own).
    model_limit: AtomicUsize,
}

/// Default cache capacity: 2 GiB.
pub const DEFAULT_CACHE_BYTES: usize = 2 << 30;

impl Session {
    pub fn new(runtime: Arc<Runtime>) -> Session {
        Session::with_cache_bytes(runtime, DEFAULT_CACHE_BYTES)
    }

    pub fn with_cache_bytes(runtime: Arc<Runtime>, bytes: usize) -> Session {
        Session {
            runtime,
            cache: Mutex::new(Cache::new(bytes)),
            seen_generation: AtomicU64::new(0),
            model_limit: AtomicUsize::new(0),
        }
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Validates and runs `graph`.
    pub fn run(
        &self,
        graph: &Graph,
        args: &[(String, ArgValue)],
        opts: &RunOptions,
    ) -> Result<RunReport, Diagnostics> {
        let plan = graph.plan(&self.runtime, args)?;
        Ok(self.run_plan(&plan, opts))
    }

    /// Keeps at most `bytes` of model weights loaded between runs (`None`: as many as the
    /// memory cap allows), letting the least recently used models go past it: a server that
    /// holds one large model at a time, say.
    pub fn keep_model_bytes(&self, bytes: Option<usize>) {
        self.model_limit
            .store(bytes.unwrap_or(0), Ordering::Relaxed);
    }

    /// Runs an already validated plan.
    /// Cached models are held to the memory cap ([`crate::weights::residency::cap`]) as it
    /// stands when the run starts, and to [`Session::keep_model_bytes`].
    pub fn run_plan(&self, plan: &Plan, opts: &RunOptions) -> RunReport {
        self.drop_stale_outputs();
        let own = Some(self.model_limit.load(Ordering::Relaxed)).filter(|&b| b > 0);
        let cap = match (crate::weights::residency::cap(), own) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_model_cap(cap);
        run_plan(plan, opts, &self.cache)
    }

    /// After a plugin reload, drops the cached outputs its old build made, so they are computed
    /// again by the new build and the old library can be released.
    fn drop_stale_outputs(&self) {
        let generation = self.runtime.generation();
        if self.seen_generation.swap(generation, Ordering::SeqCst) != generation {
            let dropped = self
                .cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove_from(|origin| !self.runtime.is_current(origin));
            if dropped > 0 {
                tracing::debug!("dropped {dropped} cached outputs of reloaded plugins");
            }
        }
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).stats()
    }

    pub fn clear_cache(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear()
    }
}
