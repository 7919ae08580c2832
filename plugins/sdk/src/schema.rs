//! Node schemas as Rust plugins declare them: a builder over ports, flags and documentation, turned
//! into `DfNodeDesc` by the export glue.

use crate::abi;

/// One port of a node type.
#[derive(Debug, Clone)]
pub struct Port {
    pub(crate) name: String,
    pub(crate) type_expr: String,
    pub(crate) doc: String,
    pub(crate) default_json: Option<String>,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) choices: Vec<String>,
    pub(crate) optional: bool,
}

impl Port {
    /// A port named `name` of type `type_expr` (`Int`, `Float`, `Tensor<f32, 4>`, `List<Int>`...).
    pub fn new(name: &str, type_expr: &str) -> Self {
        Port {
            name: name.to_string(),
            type_expr: type_expr.to_string(),
            doc: String::new(),
            default_json: None,
            min: f64::NAN,
            max: f64::NAN,
            choices: Vec::new(),
            optional: false,
        }
    }

    /// One-line documentation.
    pub fn doc(mut self, doc: &str) -> Self {
        self.doc = doc.to_string();
        self
    }

    /// A default, making the input optional in graphs.
    pub fn default(mut self, value: impl DefaultJson) -> Self {
        self.default_json = Some(value.to_json());
        self
    }

    /// An inclusive numeric range.
    pub fn range(mut self, min: f64, max: f64) -> Self {
        self.min = min;
        self.max = max;
        self
    }

    /// A lower bound only.
    pub fn min(mut self, min: f64) -> Self {
        self.min = min;
        self
    }

    /// The allowed values of a String input.
    pub fn choices(mut self, choices: &[&str]) -> Self {
        self.choices = choices.iter().map(|c| c.to_string()).collect();
        self
    }

    /// An input that may stay unconnected without a default.
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }
}

/// A value that can be written as a port default.
pub trait DefaultJson {
    fn to_json(&self) -> String;
}

impl DefaultJson for i64 {
    fn to_json(&self) -> String {
        self.to_string()
    }
}

impl DefaultJson for i32 {
    fn to_json(&self) -> String {
        self.to_string()
    }
}

impl DefaultJson for f64 {
    fn to_json(&self) -> String {
        if self.is_finite() && self.fract() == 0.0 {
            format!("{self:.1}")
        } else {
            format!("{self}")
        }
    }
}

impl DefaultJson for bool {
    fn to_json(&self) -> String {
        self.to_string()
    }
}

impl DefaultJson for &str {
    fn to_json(&self) -> String {
        let mut out = String::with_capacity(self.len() + 2);
        out.push('"');
        for c in self.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }
}

/// The full declaration of a node type.
#[derive(Debug, Clone)]
pub struct NodeSchema {
    pub(crate) type_name: String,
    pub(crate) category: String,
    pub(crate) version: Option<String>,
    pub(crate) doc: String,
    pub(crate) inputs: Vec<Port>,
    pub(crate) outputs: Vec<Port>,
    pub(crate) flags: u32,
}

impl NodeSchema {
    /// A deterministic, cacheable node type named `type_name`.
    pub fn new(type_name: &str) -> Self {
        NodeSchema {
            type_name: type_name.to_string(),
            category: String::new(),
            version: None,
            doc: String::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            flags: abi::DF_NODE_DETERMINISTIC | abi::DF_NODE_CACHEABLE,
        }
    }

    pub fn category(mut self, category: &str) -> Self {
        self.category = category.to_string();
        self
    }

    /// The node type's own version (defaults to the plugin's).
    pub fn version(mut self, version: &str) -> Self {
        self.version = Some(version.to_string());
        self
    }

    pub fn doc(mut self, doc: &str) -> Self {
        self.doc = doc.to_string();
        self
    }

    pub fn input(mut self, port: Port) -> Self {
        self.inputs.push(port);
        self
    }

    pub fn output(mut self, port: Port) -> Self {
        self.outputs.push(port);
        self
    }

    /// The node gives different outputs for the same inputs; it is never cached.
    pub fn nondeterministic(mut self) -> Self {
        self.flags &= !(abi::DF_NODE_DETERMINISTIC | abi::DF_NODE_CACHEABLE);
        self
    }

    /// The node writes files or acts outside its outputs; it runs on every run.
    pub fn side_effects(mut self) -> Self {
        self.flags |= abi::DF_NODE_SIDE_EFFECTS;
        self.flags &= !abi::DF_NODE_CACHEABLE;
        self
    }

    /// Deterministic but not worth caching (cheap, or huge outputs).
    pub fn uncached(mut self) -> Self {
        self.flags &= !abi::DF_NODE_CACHEABLE;
        self
    }
}
