//! Run events: what subscribers (the CLI's JSONL writer and progress bars, embedding hosts) see of
//! a run as it happens.

use serde::Serialize;
use std::sync::Arc;

/// One thing that happened during a run. Serialised with an `"event"` tag, e.g.
/// `{"event":"node_finished","node":"save","ms":12.5}`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    RunStarted {
        run: u64,
        nodes: usize,
        workers: usize,
    },
    NodeStarted {
        node: Arc<str>,
        r#type: String,
    },
    NodeProgress {
        node: Arc<str>,
        step: u64,
        total: u64,
    },
    NodeCached {
        node: Arc<str>,
    },
    NodeFinished {
        node: Arc<str>,
        ms: f64,
    },
    NodeFailed {
        node: Arc<str>,
        error: String,
    },
    /// Not run because an upstream node failed or the run was cancelled.
    NodeSkipped {
        node: Arc<str>,
        reason: String,
    },
    RunFinished {
        run: u64,
        ok: bool,
        cancelled: bool,
        ms: f64,
        executed: usize,
        cached: usize,
        failed: usize,
    },
    /// Watching: the graph was (re)loaded and validated; it runs next. `files` are watched.
    GraphLoaded {
        graph: String,
        files: Vec<String>,
    },
    /// Watching: the changed graph is invalid; the last good one stays in place.
    GraphInvalid {
        graph: String,
        errors: Vec<String>,
    },
    /// Watching: a plugin library changed and its new build was loaded.
    PluginReloaded {
        plugin: String,
        path: String,
        node_types: Vec<String>,
    },
    /// Watching: a library added to a plugin folder was loaded.
    PluginLoaded {
        plugin: String,
        path: String,
        node_types: Vec<String>,
    },
    /// Watching: a changed plugin library could not be loaded; the old build stays in use.
    PluginRefused {
        path: String,
        error: String,
    },
}

impl Event {
    /// The node the event is about, if any.
    pub fn node(&self) -> Option<&str> {
        match self {
            Event::NodeStarted { node, .. }
            | Event::NodeProgress { node, .. }
            | Event::NodeCached { node }
            | Event::NodeFinished { node, .. }
            | Event::NodeFailed { node, .. }
            | Event::NodeSkipped { node, .. } => Some(node),
            _ => None,
        }
    }

    /// The event as one line of JSON.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"event\":\"error\",\"error\":\"{e}\"}}"))
    }
}

/// A subscriber; called from worker threads, so it must be quick and thread-safe.
pub type Subscriber = Arc<dyn Fn(&Event) + Send + Sync>;
