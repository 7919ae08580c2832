//! The graph IR: what a front-end (YAML now, Lua later) produces and validation consumes. Every
//! element keeps its source location so errors can point at it.

use std::path::PathBuf;

/// A 1-based line and column in a graph source; `0:0` when unknown. `file` indexes the graph's
/// source files ([`GraphIr::file_name`]): 0 is the document itself, others are files it pulled in
/// (Lua modules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub struct Loc {
    pub file: u32,
    pub line: u32,
    pub col: u32,
}

impl Loc {
    pub const START: Loc = Loc {
        file: 0,
        line: 1,
        col: 1,
    };

    pub fn new(line: u32, col: u32) -> Loc {
        Loc { file: 0, line, col }
    }

    /// A location in source file `file` of the graph.
    pub fn in_file(file: u32, line: u32, col: u32) -> Loc {
        Loc { file, line, col }
    }
}

/// A constant written in the graph.
#[derive(Debug, Clone, PartialEq)]
pub enum Const {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    List(Vec<Const>),
}

impl Const {
    /// A constant from JSON (port defaults are written as JSON). Objects become `Null`.
    pub fn from_json(v: &serde_json::Value) -> Const {
        match v {
            serde_json::Value::Null | serde_json::Value::Object(_) => Const::Null,
            serde_json::Value::Bool(b) => Const::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Const::Int(i),
                None => Const::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Const::String(s.clone()),
            serde_json::Value::Array(items) => {
                Const::List(items.iter().map(Const::from_json).collect())
            }
        }
    }

    /// How the constant reads in messages: `string "abc"`, `integer 3`...
    pub fn describe(&self) -> String {
        match self {
            Const::Null => "null".into(),
            Const::Bool(b) => format!("boolean {b}"),
            Const::Int(i) => format!("integer {i}"),
            Const::Float(f) => format!("number {f}"),
            Const::String(s) if s.chars().count() > 40 => {
                format!("string \"{}...\"", s.chars().take(40).collect::<String>())
            }
            Const::String(s) => format!("string {s:?}"),
            Const::List(items) => format!("list of {} items", items.len()),
        }
    }
}

/// The right-hand side of a node input.
#[derive(Debug, Clone, PartialEq)]
pub enum InputExpr {
    /// `node.port`. When `node` names no node and the port takes a String, validation reads the
    /// text as a constant instead (`out.png` is a file name, not a link).
    Link {
        node: String,
        port: String,
    },
    /// `$name`.
    GraphInput(String),
    Const(Const),
}

/// `port: expr` inside a node's `inputs`.
#[derive(Debug, Clone)]
pub struct InputBinding {
    pub port: String,
    /// Where the port name is written.
    pub loc: Loc,
    pub value: InputExpr,
    /// Where the value is written.
    pub value_loc: Loc,
}

/// One node of the graph.
#[derive(Debug, Clone)]
pub struct NodeDecl {
    pub id: String,
    pub loc: Loc,
    pub type_name: String,
    pub type_loc: Loc,
    pub inputs: Vec<InputBinding>,
}

/// A graph parameter (`inputs:` at the top level).
#[derive(Debug, Clone)]
pub struct GraphInputDecl {
    pub name: String,
    pub loc: Loc,
    pub type_expr: String,
    pub type_loc: Loc,
    pub default: Option<(Const, Loc)>,
    pub doc: Option<String>,
}

/// A graph result (`outputs:`): always a link.
#[derive(Debug, Clone)]
pub struct OutputDecl {
    pub name: String,
    pub loc: Loc,
    pub node: String,
    pub port: String,
    pub value_loc: Loc,
}

/// A node type declared by the graph, with a Lua body (`lua_nodes:` in YAML).
#[derive(Debug, Clone)]
pub struct LuaNodeDecl {
    pub name: String,
    pub loc: Loc,
    pub doc: String,
    /// Ports in declaration order: name and type expression.
    pub inputs: Vec<(String, String)>,
    pub outputs: Vec<(String, String)>,
    pub code: String,
    /// Where the code is written.
    pub code_loc: Loc,
}

/// A whole graph document.
#[derive(Debug, Clone, Default)]
pub struct GraphIr {
    /// How the source is named in messages (a path, or `<string>`).
    pub source: String,
    /// The folder relative input paths resolve against.
    pub base_dir: PathBuf,
    /// Further source files the document read (Lua modules), as shown in messages; a [`Loc`]
    /// with `file: i` points into `extra_files[i - 1]`.
    pub extra_files: Vec<String>,
    /// Every file the graph was built from, the document first, for watching (empty for a graph
    /// built from a string).
    pub watch_files: Vec<PathBuf>,
    pub inputs: Vec<GraphInputDecl>,
    pub nodes: Vec<NodeDecl>,
    pub outputs: Vec<OutputDecl>,
    /// Node types the graph declares itself, with Lua bodies.
    pub lua_nodes: Vec<LuaNodeDecl>,
}

impl GraphIr {
    /// How the source file a location points into is named in messages.
    pub fn file_name(&self, loc: Loc) -> &str {
        match loc.file {
            0 => &self.source,
            i => self
                .extra_files
                .get(i as usize - 1)
                .map_or(&self.source, String::as_str),
        }
    }
}
