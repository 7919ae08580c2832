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
use crate::graph::validate::{validate, ArgValue};
use crate::graph::yaml::parse_graph;
use crate::plugin::{libraries_in, load_plugin, search_path, PluginError};
use crate::registry::{DuplicateNodeType, NodeType, Registry};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Node types gathered from plugins (and from Rust), and the problems met loading them.
#[derive(Default)]
pub struct Runtime {
    registry: Registry,
    problems: Vec<String>,
    /// Loaded plugins: name, version, library path.
    plugins: Vec<(String, String, PathBuf)>,
}

impl Runtime {
    /// A runtime with no node types.
    pub fn new() -> Runtime {
        Runtime::default()
    }

    /// A runtime with every plugin found in `dirs`, then `DITFLOW_PLUGIN_PATH`, then the
    /// executable's folder. Refused libraries are listed in [`Runtime::problems`].
    pub fn with_plugins(dirs: &[PathBuf]) -> Runtime {
        let mut rt = Runtime::new();
        for dir in search_path(dirs) {
            rt.load_plugin_dir(&dir);
        }
        rt
    }

    /// Loads every plugin library in `dir`. Libraries that are not ditflow plugins are skipped.
    pub fn load_plugin_dir(&mut self, dir: &Path) {
        for lib in libraries_in(dir) {
            match self.load_plugin_file(&lib) {
                Ok(_) => {}
                Err(PluginError::NotAPlugin { path }) => {
                    tracing::debug!("skipping {path}: not a ditflow plugin")
                }
                Err(e) => self.problems.push(e.to_string()),
            }
        }
    }

    /// Loads one plugin library; returns how many node types it added. A plugin whose name is
    /// already loaded is skipped (with a note in [`Runtime::problems`] if its version differs).
    pub fn load_plugin_file(&mut self, path: &Path) -> Result<usize, PluginError> {
        let loaded = load_plugin(path)?;
        if let Some((_, version, first)) = self
            .plugins
            .iter()
            .find(|(name, _, _)| *name == loaded.info.name)
        {
            // The same build found twice on the search path is not a problem; another version is.
            if *version == loaded.info.version {
                tracing::debug!(
                    "{}: plugin '{}' already loaded from {}",
                    path.display(),
                    loaded.info.name,
                    first.display()
                );
            } else {
                self.problems.push(format!(
                    "{}: plugin '{}' {} is already loaded as version {} from {}; ignoring this copy",
                    path.display(),
                    loaded.info.name,
                    loaded.info.version,
                    version,
                    first.display()
                ));
            }
            return Ok(0);
        }
        self.plugins.push((
            loaded.info.name.clone(),
            loaded.info.version.clone(),
            path.to_path_buf(),
        ));
        for w in loaded.warnings {
            self.problems.push(format!("{}: {w}", path.display()));
        }
        let mut added = 0;
        for ty in loaded.node_types {
            match self.registry.insert(ty) {
                Ok(()) => added += 1,
                Err(e) => self.problems.push(e.to_string()),
            }
        }
        Ok(added)
    }

    /// Registers a node type implemented in Rust by the host application.
    pub fn register(&mut self, ty: NodeType) -> Result<(), DuplicateNodeType> {
        self.registry.insert(ty)
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Messages about refused plugins and node types.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    /// Loaded plugins: name, version and library path.
    pub fn plugins(&self) -> &[(String, String, PathBuf)] {
        &self.plugins
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
        validate(&self.ir, runtime.registry(), args)
    }
}

/// Runs graphs against one runtime and keeps their outputs cached between runs, so a re-run
/// executes only what changed. Sessions are thread-safe: several runs may go at once.
pub struct Session {
    runtime: Arc<Runtime>,
    cache: Mutex<Cache>,
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

    /// Runs an already validated plan.
    pub fn run_plan(&self, plan: &Plan, opts: &RunOptions) -> RunReport {
        run_plan(plan, opts, &self.cache)
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).stats()
    }

    pub fn clear_cache(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear()
    }
}
