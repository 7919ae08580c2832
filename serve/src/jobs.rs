//! What a client submits: a graph (YAML, Lua, or the JSON form of the same document) with its
//! inputs and a priority, checked before it is queued so a bad one gets a 400 with located
//! errors, never a failed job.

use crate::store::Source;
use ditflow::{ArgValue, Diagnostics, Graph, GraphError, LuaLimits, Runtime};
use serde::Deserialize;
use std::path::Path;

/// The body of `POST /jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    /// The graph document's text.
    pub graph: String,
    /// `yaml` (the default), `lua` or `json`.
    #[serde(default)]
    pub format: Option<String>,
    /// Graph inputs by name: strings, numbers or booleans, read by the input's type as
    /// `--set NAME=VALUE` reads them.
    #[serde(default)]
    pub args: serde_json::Map<String, serde_json::Value>,
    /// Higher runs first; the default is 0.
    #[serde(default)]
    pub priority: i64,
    /// A client's own id for the job: submitting it again returns the job already queued.
    #[serde(default)]
    pub id: Option<String>,
}

/// Why a submission is refused, for a 400.
#[derive(Debug)]
pub struct Refusal {
    pub message: String,
    /// Located problems: `{file, line, col, node, message}`.
    pub errors: Vec<serde_json::Value>,
}

impl Refusal {
    fn plain(message: impl Into<String>) -> Refusal {
        Refusal {
            message: message.into(),
            errors: Vec::new(),
        }
    }

    fn located(message: &str, d: &Diagnostics) -> Refusal {
        Refusal {
            message: message.to_string(),
            errors: d
                .0
                .iter()
                .map(|d| {
                    serde_json::json!({
                        "file": d.file,
                        "line": d.loc.line,
                        "col": d.loc.col,
                        "node": d.node,
                        "message": d.message,
                    })
                })
                .collect(),
        }
    }
}

/// The graph of `source`, parsed with relative paths resolved against `base_dir`.
pub fn parse(source: &Source, base_dir: &Path) -> Result<Graph, GraphError> {
    let name = format!("job.{}", source.format);
    match source.format.as_str() {
        "lua" => Graph::from_lua(&source.graph, &name, base_dir, &LuaLimits::default()),
        // The JSON form is the YAML document written as JSON, which YAML reads as it is.
        _ => Graph::from_yaml(&source.graph, &name, base_dir),
    }
}

/// The graph inputs of `source`.
pub fn args(source: &Source) -> Vec<(String, ArgValue)> {
    source
        .args
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), ArgValue::Text(text))
        })
        .collect()
}

/// Checks a submission against the runtime's node types; its source to queue.
pub fn check(sub: &Submission, runtime: &Runtime, base_dir: &Path) -> Result<Source, Refusal> {
    let format = sub.format.as_deref().unwrap_or("yaml").to_ascii_lowercase();
    if !matches!(format.as_str(), "yaml" | "lua" | "json") {
        return Err(Refusal::plain(format!(
            "format '{format}': expected yaml, lua or json"
        )));
    }
    if let Some(id) = &sub.id {
        if id.is_empty()
            || id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Refusal::plain(
                "id: 1 to 64 letters, digits, '-' or '_'".to_string(),
            ));
        }
    }
    for (k, v) in &sub.args {
        if v.is_object() || v.is_array() || v.is_null() {
            return Err(Refusal::plain(format!(
                "args.{k}: expected a string, number or boolean"
            )));
        }
    }
    let source = Source {
        graph: sub.graph.clone(),
        format,
        args: serde_json::Value::Object(sub.args.clone()),
    };
    validate(&source, runtime, base_dir)?;
    Ok(source)
}

/// Parses `source` and checks it against the runtime's node types with its inputs.
pub fn validate(source: &Source, runtime: &Runtime, base_dir: &Path) -> Result<(), Refusal> {
    let graph = parse(source, base_dir)
        .map_err(|e| Refusal::located("the graph does not parse", &e.diagnostics()))?;
    graph
        .plan(runtime, &args(source))
        .map(|_| ())
        .map_err(|d| Refusal::located("the graph is not valid", &d))
}
