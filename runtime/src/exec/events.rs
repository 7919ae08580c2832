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
    /// A picture of the node's work so far (a sampler's x₀ estimate every few steps): a PNG,
    /// base64-encoded, at `step` of `total`.
    NodePreview {
        node: Arc<str>,
        step: u64,
        total: u64,
        png: String,
    },
    /// Weights read back from their files under the memory cap (`--max-memory`) since the
    /// node's last report: `step` the progress step they were read for (none: the node's work
    /// outside its steps).
    WeightsStreamed {
        node: Arc<str>,
        step: Option<u64>,
        bytes: u64,
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
            | Event::WeightsStreamed { node, .. }
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

/// Standard base64 (RFC 4648, with padding) of `bytes`: how a preview's PNG travels in JSON.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod base64_tests {
    #[test]
    fn base64_matches_rfc_4648_test_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(super::base64(plain.as_bytes()), encoded);
        }
    }
}
