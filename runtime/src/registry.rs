//! The node registry: every node type the runtime knows, with its schema (ports, types, defaults,
//! ranges, docs, flags) and its implementation, gathered from plugins or registered from Rust.

use crate::exec::context::ExecContext;
use crate::types::PortType;
use crate::value::Value;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Where a node type comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    /// The library file, or `None` for node types registered from Rust.
    pub path: Option<PathBuf>,
    /// Which build of the library ([`crate::plugin::build_stamp`]); 0 for Rust node types.
    pub build: u64,
}

/// One input or output port.
#[derive(Debug, Clone)]
pub struct PortSpec {
    pub name: String,
    pub ty: PortType,
    pub doc: String,
    /// The value used when the input is not bound.
    pub default: Option<Value>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub choices: Vec<String>,
    /// May stay unbound without a default.
    pub optional: bool,
}

impl PortSpec {
    pub fn new(name: &str, ty: PortType) -> PortSpec {
        PortSpec {
            name: name.to_string(),
            ty,
            doc: String::new(),
            default: None,
            min: None,
            max: None,
            choices: Vec::new(),
            optional: false,
        }
    }

    pub fn with_default(mut self, v: Value) -> PortSpec {
        self.default = Some(v);
        self
    }

    /// Whether a graph must bind this input.
    pub fn required(&self) -> bool {
        self.default.is_none() && !self.optional
    }

    /// Checks a resolved constant against the port's range and choices.
    pub fn check_value(&self, value: &Value) -> Result<(), String> {
        let number = match value {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        };
        if let Some(x) = number {
            let below = self.min.is_some_and(|m| x < m);
            let above = self.max.is_some_and(|m| x > m);
            if below || above || x.is_nan() {
                let range = match (self.min, self.max) {
                    (Some(a), Some(b)) => format!("[{a}, {b}]"),
                    (Some(a), None) => format!("at least {a}"),
                    (None, Some(b)) => format!("at most {b}"),
                    (None, None) => "a number".to_string(),
                };
                return Err(format!(
                    "{value} is out of range: '{}' must be {range}",
                    self.name
                ));
            }
        }
        if !self.choices.is_empty() {
            if let Value::String(s) = value {
                if !self.choices.iter().any(|c| c == s.as_str()) {
                    let hint = crate::graph::diag::did_you_mean(
                        s.as_str(),
                        self.choices.iter().map(String::as_str),
                    );
                    return Err(format!(
                        "\"{}\" is not one of the choices for '{}': {}{hint}",
                        s.as_str(),
                        self.name,
                        self.choices.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }

    fn to_json(&self) -> serde_json::Value {
        let mut m = json!({"name": self.name, "type": self.ty.to_string(), "doc": self.doc});
        let o = m.as_object_mut().expect("object");
        o.insert("required".into(), json!(self.required()));
        if let Some(d) = &self.default {
            o.insert("default".into(), d.to_json());
        }
        if let Some(v) = self.min {
            o.insert("min".into(), json!(v));
        }
        if let Some(v) = self.max {
            o.insert("max".into(), json!(v));
        }
        if !self.choices.is_empty() {
            o.insert("choices".into(), json!(self.choices));
        }
        m
    }
}

/// What runs a node. Plugin node types implement it over the C ABI; hosts may implement it in
/// Rust directly.
pub trait NodeImpl: Send + Sync {
    /// Runs the node: read `ctx`'s inputs, set its outputs. The error is the node's failure.
    fn execute(&self, ctx: &mut ExecContext) -> Result<(), String>;

    /// A fingerprint over the resolved inputs, mixed into the cache key.
    fn fingerprint(&self, _ctx: &mut ExecContext) -> Result<Option<u64>, String> {
        Ok(None)
    }
}

/// A node type: schema plus implementation.
pub struct NodeType {
    pub name: String,
    pub category: String,
    pub version: String,
    pub doc: String,
    pub inputs: Vec<PortSpec>,
    pub outputs: Vec<PortSpec>,
    /// Same inputs, same outputs.
    pub deterministic: bool,
    /// Outputs may be reused from the cache.
    pub cacheable: bool,
    /// Writes files or acts outside its outputs: runs every time.
    pub side_effects: bool,
    pub plugin: Arc<PluginInfo>,
    pub imp: Arc<dyn NodeImpl>,
}

impl NodeType {
    pub fn input_index(&self, name: &str) -> Option<usize> {
        self.inputs.iter().position(|p| p.name == name)
    }

    pub fn output_index(&self, name: &str) -> Option<usize> {
        self.outputs.iter().position(|p| p.name == name)
    }

    /// The full schema as JSON, as `ditflow nodes --json` prints it.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "type": self.name,
            "category": self.category,
            "version": self.version,
            "doc": self.doc,
            "deterministic": self.deterministic,
            "cacheable": self.cacheable,
            "side_effects": self.side_effects,
            "plugin": {"name": self.plugin.name, "version": self.plugin.version,
                       "path": self.plugin.path.as_ref().map(|p| p.display().to_string())},
            "inputs": self.inputs.iter().map(PortSpec::to_json).collect::<Vec<_>>(),
            "outputs": self.outputs.iter().map(PortSpec::to_json).collect::<Vec<_>>(),
        })
    }
}

impl std::fmt::Debug for NodeType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NodeType({} from {} {})",
            self.name, self.plugin.name, self.plugin.version
        )
    }
}

/// A second registration of a type name.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "node type '{name}' is declared by both {first} and {second}; keeping the one from {first}"
)]
pub struct DuplicateNodeType {
    pub name: String,
    pub first: String,
    pub second: String,
}

fn describe_plugin(p: &PluginInfo) -> String {
    match &p.path {
        Some(path) => format!("plugin '{}' {} ({})", p.name, p.version, path.display()),
        None => format!("'{}' {}", p.name, p.version),
    }
}

/// All known node types, by name.
#[derive(Default, Clone)]
pub struct Registry {
    types: BTreeMap<String, Arc<NodeType>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds a node type; a name already taken is refused, naming both sources.
    pub fn insert(&mut self, ty: NodeType) -> Result<(), DuplicateNodeType> {
        if let Some(existing) = self.types.get(&ty.name) {
            return Err(DuplicateNodeType {
                name: ty.name.clone(),
                first: describe_plugin(&existing.plugin),
                second: describe_plugin(&ty.plugin),
            });
        }
        self.types.insert(ty.name.clone(), Arc::new(ty));
        Ok(())
    }

    /// Removes every node type of the plugin named `plugin` (for reloads).
    pub fn remove_plugin(&mut self, plugin: &str) {
        self.types.retain(|_, t| t.plugin.name != plugin);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<NodeType>> {
        self.types.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<NodeType>> {
        self.types.values()
    }

    pub fn len(&self) -> usize {
        self.types.len()
    }

    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }
}
