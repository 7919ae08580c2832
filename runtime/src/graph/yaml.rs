//! The YAML front-end: a version-1 graph document becomes [`GraphIr`], every element located.
//!
//! Parsing uses serde-saphyr (panic-free, located errors) under a strict budget against alias
//! bombs, huge scalars and deep nesting, plus a size cap checked before parsing. The document is
//! first read into a located generic tree ([`Node`]) and then walked by hand, so every problem —
//! an unknown key (with a suggestion), a wrong shape, a bad name — is reported with its own
//! location, and all of them at once.

use super::diag::{did_you_mean, Diagnostic, Diagnostics};
use super::ir::{
    Const, GraphInputDecl, GraphIr, InputBinding, InputExpr, Loc, LuaNodeDecl, NodeDecl, OutputDecl,
};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;
use std::path::Path;

/// Graph documents larger than this are refused before parsing.
pub const MAX_DOCUMENT_BYTES: usize = 4 << 20;

/// The deepest nesting a graph document may use.
const MAX_DEPTH: usize = 32;

/// A located YAML value.
#[derive(Debug, Clone)]
struct Node {
    value: Yaml,
    loc: Loc,
}

#[derive(Debug, Clone)]
enum Yaml {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Yaml {
    fn kind(&self) -> &'static str {
        match self {
            Yaml::Null => "null",
            Yaml::Bool(_) => "a boolean",
            Yaml::Int(_) | Yaml::Float(_) => "a number",
            Yaml::Str(_) => "a string",
            Yaml::Seq(_) => "a list",
            Yaml::Map(_) => "a mapping",
        }
    }
}

fn loc_of(l: &serde_saphyr::Location) -> Loc {
    Loc::new(
        l.line().min(u32::MAX as u64) as u32,
        l.column().min(u32::MAX as u64) as u32,
    )
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Spanned::<Yaml>::deserialize(d)?;
        Ok(Node {
            loc: loc_of(&s.referenced),
            value: s.value,
        })
    }
}

impl<'de> Deserialize<'de> for Yaml {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(YamlVisitor)
    }
}

struct YamlVisitor;

impl<'de> Visitor<'de> for YamlVisitor {
    type Value = Yaml;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a YAML value")
    }
    fn visit_unit<E>(self) -> Result<Yaml, E> {
        Ok(Yaml::Null)
    }
    fn visit_none<E>(self) -> Result<Yaml, E> {
        Ok(Yaml::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Yaml, D::Error> {
        Yaml::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Yaml, E> {
        Ok(Yaml::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Yaml, E> {
        Ok(Yaml::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Yaml, E> {
        i64::try_from(v)
            .map(Yaml::Int)
            .map_err(|_| E::custom(format!("integer {v} is too large")))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Yaml, E> {
        i64::try_from(v)
            .map(Yaml::Int)
            .map_err(|_| E::custom(format!("integer {v} is too large")))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Yaml, E> {
        i64::try_from(v)
            .map(Yaml::Int)
            .map_err(|_| E::custom(format!("integer {v} is too large")))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Yaml, E> {
        Ok(Yaml::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Yaml, E> {
        Ok(Yaml::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Yaml, E> {
        Ok(Yaml::Str(v))
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Yaml, E> {
        Err(E::custom("binary values are not supported"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Yaml, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Yaml::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Yaml, A::Error> {
        let mut entries = Vec::new();
        while let Some((k, v)) = map.next_entry::<Node, Node>()? {
            entries.push((k, v));
        }
        Ok(Yaml::Map(entries))
    }
}

fn options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    budget.max_aliases = 1_000;
    budget.max_anchors = 1_000;
    budget.max_events = 200_000;
    budget.max_nodes = 100_000;
    budget.max_total_scalar_bytes = 1 << 20;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    // YAML 1.2 core schema: only `true`/`false` are booleans (`y`, `on`, `no` stay strings).
    options.strict_booleans = true;
    options.with_snippet = false;
    options
}

/// A parser or budget error as one line a user can act on: no locations (the diagnostic has its
/// own), no library option names.
fn parser_message(e: &serde_saphyr::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("").trim();
    if let Some(rest) = first.strip_prefix("budget breached: ") {
        let kind: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        return match kind.as_str() {
            "Depth" => format!("nesting is too deep: graph documents allow {MAX_DEPTH} levels"),
            "ScalarBytes" | "InputBytes" => {
                "the document's text is too large for a graph".to_string()
            }
            "Aliases"
            | "Anchors"
            | "AliasAnchorRatio"
            | "RecordedAnchorEvents"
            | "RecordedAnchorBytes" => {
                "too many aliases or anchors: the document expands too much (an alias bomb?)"
                    .to_string()
            }
            "Nodes" | "Events" | "Documents" | "MergeKeys" => {
                "the document expands to too many values for a graph (an alias bomb?)".to_string()
            }
            _ => format!("the document exceeds a parser limit ({kind})"),
        };
    }
    if first.contains("recursion limit") {
        return format!("nesting is too deep: graph documents allow {MAX_DEPTH} levels");
    }
    if let Some(rest) = first.strip_prefix("duplicate mapping key: ") {
        let key = rest
            .split(", set DuplicateKeyPolicy")
            .next()
            .unwrap_or(rest)
            .trim();
        return format!("duplicate key '{key}'");
    }
    let stripped = match first.find(" at line ") {
        Some(i) => &first[..i],
        None => first,
    };
    if stripped.is_empty() {
        "invalid YAML".to_string()
    } else {
        stripped.to_string()
    }
}

/// Walks the generic tree, collecting diagnostics.
struct Reader<'a> {
    file: &'a str,
    diags: Vec<Diagnostic>,
}

/// `[A-Za-z_][A-Za-z0-9_]*`: node ids, port names and graph-input names.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Splits `node.port` when both halves are identifiers.
pub fn split_link(s: &str) -> Option<(&str, &str)> {
    let (node, port) = s.split_once('.')?;
    (is_identifier(node) && is_identifier(port)).then_some((node, port))
}

impl<'a> Reader<'a> {
    fn error(&mut self, loc: Loc, msg: impl Into<String>) {
        self.diags.push(Diagnostic::new(self.file, loc, msg));
    }

    fn node_error(&mut self, loc: Loc, node: &str, msg: impl Into<String>) {
        self.diags
            .push(Diagnostic::at_node(self.file, loc, node, msg));
    }

    /// The entries of a mapping whose keys are strings; other shapes are reported.
    fn map<'n>(&mut self, n: &'n Node, what: &str) -> Vec<(&'n str, Loc, &'n Node)> {
        let Yaml::Map(entries) = &n.value else {
            if !matches!(n.value, Yaml::Null) {
                self.error(
                    n.loc,
                    format!("{what} must be a mapping, found {}", n.value.kind()),
                );
            }
            return Vec::new();
        };
        let mut out: Vec<(&str, Loc, &Node)> = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            match &k.value {
                Yaml::Str(s) => {
                    if let Some((_, first, _)) = out.iter().find(|(name, _, _)| name == s) {
                        let first = *first;
                        self.error(
                            k.loc,
                            format!(
                                "duplicate key '{s}' in {what} (first at line {})",
                                first.line
                            ),
                        );
                    } else {
                        out.push((s.as_str(), k.loc, v));
                    }
                }
                other => self.error(
                    k.loc,
                    format!("keys in {what} must be strings, found {}", other.kind()),
                ),
            }
        }
        out
    }

    fn check_keys(
        &mut self,
        entries: &[(&str, Loc, &Node)],
        allowed: &[&str],
        what: &str,
        node: Option<&str>,
    ) {
        for (key, loc, _) in entries {
            if !allowed.contains(key) {
                let msg = format!(
                    "unknown key '{key}' in {what}{}; expected one of: {}",
                    did_you_mean(key, allowed.iter().copied()),
                    allowed.join(", ")
                );
                match node {
                    Some(id) => self.node_error(*loc, id, msg),
                    None => self.error(*loc, msg),
                }
            }
        }
    }

    fn string(&mut self, n: &Node, what: &str) -> Option<String> {
        match &n.value {
            Yaml::Str(s) => Some(s.clone()),
            other => {
                self.error(
                    n.loc,
                    format!("{what} must be a string, found {}", other.kind()),
                );
                None
            }
        }
    }

    fn constant(&mut self, n: &Node) -> Option<Const> {
        Some(match &n.value {
            Yaml::Null => Const::Null,
            Yaml::Bool(b) => Const::Bool(*b),
            Yaml::Int(i) => Const::Int(*i),
            Yaml::Float(f) => Const::Float(*f),
            Yaml::Str(s) => Const::String(s.clone()),
            Yaml::Seq(items) => Const::List(
                items
                    .iter()
                    .map(|i| self.constant(i))
                    .collect::<Option<_>>()?,
            ),
            Yaml::Map(_) => {
                self.error(n.loc, "a mapping is not a valid constant here");
                return None;
            }
        })
    }

    /// An input's right-hand side: `node.port`, `$name`, `{value: ...}` or a constant.
    fn input_expr(&mut self, node_id: &str, n: &Node) -> Option<InputExpr> {
        match &n.value {
            Yaml::Str(s) if s.starts_with("$$") => {
                Some(InputExpr::Const(Const::String(s[1..].to_string())))
            }
            Yaml::Str(s) if s.starts_with('$') => {
                let name = &s[1..];
                if is_identifier(name) {
                    Some(InputExpr::GraphInput(name.to_string()))
                } else {
                    self.node_error(n.loc, node_id, format!("'{s}' is not a valid graph input reference (write $name, or $$ for a literal $)"));
                    None
                }
            }
            Yaml::Str(s) => Some(match split_link(s) {
                Some((node, port)) => InputExpr::Link {
                    node: node.to_string(),
                    port: port.to_string(),
                },
                None => InputExpr::Const(Const::String(s.clone())),
            }),
            Yaml::Map(_) => {
                let entries = self.map(n, "an input value");
                match entries.as_slice() {
                    [("value", _, v)] => self.constant(v).map(InputExpr::Const),
                    _ => {
                        self.node_error(
                            n.loc,
                            node_id,
                            "a mapping is not a valid input value; write `{value: ...}` for a constant",
                        );
                        None
                    }
                }
            }
            _ => self.constant(n).map(InputExpr::Const),
        }
    }

    fn graph_inputs(&mut self, n: &Node, ir: &mut GraphIr) {
        for (name, loc, decl) in self.map(n, "'inputs'") {
            if !is_identifier(name) {
                self.error(
                    loc,
                    format!("graph input name '{name}' is not an identifier"),
                );
                continue;
            }
            let entries = self.map(decl, &format!("graph input '{name}'"));
            self.check_keys(
                &entries,
                &["type", "default", "doc"],
                &format!("graph input '{name}'"),
                None,
            );
            let mut input = GraphInputDecl {
                name: name.to_string(),
                loc,
                type_expr: String::new(),
                type_loc: decl.loc,
                default: None,
                doc: None,
            };
            for (key, _, v) in &entries {
                match *key {
                    "type" => {
                        input.type_expr = self.string(v, "a type").unwrap_or_default();
                        input.type_loc = v.loc;
                    }
                    "default" => input.default = self.constant(v).map(|c| (c, v.loc)),
                    "doc" => input.doc = self.string(v, "'doc'"),
                    _ => {}
                }
            }
            if input.type_expr.is_empty() && !entries.iter().any(|(k, _, _)| *k == "type") {
                self.error(decl.loc, format!("graph input '{name}' needs a 'type'"));
            }
            ir.inputs.push(input);
        }
    }

    fn nodes(&mut self, n: &Node, ir: &mut GraphIr) {
        for (id, loc, decl) in self.map(n, "'nodes'") {
            if !is_identifier(id) {
                self.error(
                    loc,
                    format!("node id '{id}' is not an identifier (letters, digits and _)"),
                );
                continue;
            }
            let entries = self.map(decl, &format!("node '{id}'"));
            self.check_keys(&entries, &["type", "inputs", "doc"], "a node", Some(id));
            let mut node = NodeDecl {
                id: id.to_string(),
                loc,
                type_name: String::new(),
                type_loc: loc,
                inputs: Vec::new(),
            };
            let mut has_type = false;
            for (key, _, v) in &entries {
                match *key {
                    "type" => {
                        has_type = true;
                        node.type_name = self.string(v, "a node type").unwrap_or_default();
                        node.type_loc = v.loc;
                    }
                    "inputs" => {
                        for (port, ploc, value) in
                            self.map(v, &format!("the inputs of node '{id}'"))
                        {
                            if let Some(expr) = self.input_expr(id, value) {
                                node.inputs.push(InputBinding {
                                    port: port.to_string(),
                                    loc: ploc,
                                    value: expr,
                                    value_loc: value.loc,
                                });
                            }
                        }
                    }
                    _ => {}
                }
            }
            if !has_type && matches!(decl.value, Yaml::Map(_)) {
                self.node_error(loc, id, "missing 'type'");
            }
            ir.nodes.push(node);
        }
    }

    /// `lua_nodes: {Name: {doc, inputs: {port: Type}, outputs: {port: Type}, code}}`.
    fn lua_nodes(&mut self, n: &Node, ir: &mut GraphIr) {
        for (name, loc, decl) in self.map(n, "'lua_nodes'") {
            if !is_identifier(name) {
                self.error(loc, format!("Lua node name '{name}' is not an identifier"));
                continue;
            }
            let entries = self.map(decl, &format!("Lua node '{name}'"));
            self.check_keys(
                &entries,
                &["doc", "inputs", "outputs", "code"],
                &format!("Lua node '{name}'"),
                None,
            );
            let mut node = LuaNodeDecl {
                name: name.to_string(),
                loc,
                doc: String::new(),
                inputs: Vec::new(),
                outputs: Vec::new(),
                code: String::new(),
                code_loc: loc,
            };
            let mut has_code = false;
            for (key, _, v) in &entries {
                match *key {
                    "doc" => node.doc = self.string(v, "'doc'").unwrap_or_default(),
                    "code" => {
                        has_code = true;
                        node.code = self.string(v, "'code'").unwrap_or_default();
                        node.code_loc = v.loc;
                    }
                    "inputs" | "outputs" => {
                        let what = format!("the {key} of Lua node '{name}'");
                        let mut ports = Vec::new();
                        for (port, ploc, ty) in self.map(v, &what) {
                            if !is_identifier(port) {
                                self.error(
                                    ploc,
                                    format!("port name '{port}' is not an identifier"),
                                );
                            } else if let Some(ty) = self.string(ty, "a port type") {
                                ports.push((port.to_string(), ty));
                            }
                        }
                        if *key == "inputs" {
                            node.inputs = ports;
                        } else {
                            node.outputs = ports;
                        }
                    }
                    _ => {}
                }
            }
            if !has_code && matches!(decl.value, Yaml::Map(_)) {
                self.error(loc, format!("Lua node '{name}' needs 'code'"));
            }
            ir.lua_nodes.push(node);
        }
    }

    fn outputs(&mut self, n: &Node, ir: &mut GraphIr) {
        for (name, loc, v) in self.map(n, "'outputs'") {
            let Some(text) = self.string(v, &format!("output '{name}'")) else {
                continue;
            };
            match split_link(&text) {
                Some((node, port)) => ir.outputs.push(OutputDecl {
                    name: name.to_string(),
                    loc,
                    node: node.to_string(),
                    port: port.to_string(),
                    value_loc: v.loc,
                }),
                None => self.error(
                    v.loc,
                    format!("output '{name}' must be a link written node.port, found '{text}'"),
                ),
            }
        }
    }
}

/// Parses a version-1 YAML graph. `source` names it in messages; `base_dir` is where its relative
/// paths resolve.
pub fn parse_graph(text: &str, source: &str, base_dir: &Path) -> Result<GraphIr, Diagnostics> {
    let fail = |loc: Loc, msg: String| Diagnostics(vec![Diagnostic::new(source, loc, msg)]);
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(fail(
            Loc::START,
            format!(
                "graph document is {:.1} MB; the limit is {} MB",
                text.len() as f64 / 1e6,
                MAX_DOCUMENT_BYTES >> 20
            ),
        ));
    }
    let root: Node = match serde_saphyr::from_str_with_options(text, options()) {
        Ok(root) => root,
        Err(e) => {
            let loc = e
                .location()
                .map(|l| loc_of(&l))
                .filter(|l| l.line > 0)
                .unwrap_or(Loc::START);
            return Err(fail(loc, parser_message(&e)));
        }
    };
    let mut r = Reader {
        file: source,
        diags: Vec::new(),
    };
    let mut ir = GraphIr {
        source: source.to_string(),
        base_dir: base_dir.to_path_buf(),
        ..GraphIr::default()
    };
    if !matches!(root.value, Yaml::Map(_)) {
        return Err(fail(
            root.loc,
            format!(
                "a graph document must be a mapping, found {}",
                root.value.kind()
            ),
        ));
    }
    let top = r.map(&root, "the document");
    r.check_keys(
        &top,
        &[
            "version",
            "description",
            "inputs",
            "nodes",
            "outputs",
            "lua_nodes",
        ],
        "the document",
        None,
    );
    let mut version_seen = false;
    let mut nodes_seen = false;
    for (key, _, v) in &top {
        match *key {
            "version" => {
                version_seen = true;
                match v.value {
                    Yaml::Int(1) => {}
                    Yaml::Int(other) => r.error(
                        v.loc,
                        format!("unsupported graph version {other}; this ditflow reads version 1"),
                    ),
                    _ => r.error(
                        v.loc,
                        format!("'version' must be the number 1, found {}", v.value.kind()),
                    ),
                }
            }
            "description" => {
                r.string(v, "'description'");
            }
            "inputs" => r.graph_inputs(v, &mut ir),
            "nodes" => {
                nodes_seen = true;
                r.nodes(v, &mut ir);
            }
            "outputs" => r.outputs(v, &mut ir),
            "lua_nodes" => r.lua_nodes(v, &mut ir),
            _ => {}
        }
    }
    if !version_seen {
        r.error(root.loc, "missing 'version: 1'");
    }
    if !nodes_seen {
        r.error(root.loc, "missing 'nodes'");
    }
    if r.diags.is_empty() {
        Ok(ir)
    } else {
        Err(Diagnostics(r.diags).sorted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GraphIr, Diagnostics> {
        parse_graph(text, "g.yaml", Path::new("."))
    }

    #[test]
    fn parses_the_design_example() {
        let ir = parse(
            "version: 1\ninputs:\n  prompt: {type: String, default: \"a red circle\"}\nnodes:\n  te: {type: LoadTextEncoder, inputs: {path: models/te}}\n  pos: {type: TextEncode, inputs: {encoder: te.encoder, text: $prompt}}\noutputs:\n  cond: pos.cond\n",
        )
        .unwrap();
        assert_eq!(ir.inputs[0].name, "prompt");
        assert_eq!(ir.nodes.len(), 2);
        assert_eq!(ir.nodes[1].loc, Loc::new(6, 3));
        assert_eq!(
            ir.nodes[1].inputs[0].value,
            InputExpr::Link {
                node: "te".into(),
                port: "encoder".into()
            }
        );
        assert_eq!(
            ir.nodes[1].inputs[1].value,
            InputExpr::GraphInput("prompt".into())
        );
        assert_eq!(
            ir.nodes[0].inputs[0].value,
            InputExpr::Const(Const::String("models/te".into()))
        );
        assert_eq!(ir.outputs[0].node, "pos");
    }

    #[test]
    fn every_problem_is_reported_with_its_location() {
        let d = parse("version: 1\nnodez: {}\nnodes:\n  a: {typ: X}\n").unwrap_err();
        let lines: Vec<String> = d.0.iter().map(|d| d.to_string()).collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines[0].starts_with("g.yaml:2:1: error: unknown key 'nodez'"),
            "{lines:?}"
        );
        assert!(lines[0].contains("did you mean 'nodes'"));
        assert!(
            lines[1].starts_with("g.yaml:4:3: error: node 'a': missing 'type'"),
            "{lines:?}"
        );
        assert!(
            lines[2].starts_with("g.yaml:4:7: error: node 'a': unknown key 'typ'"),
            "{lines:?}"
        );
    }

    #[test]
    fn syntax_errors_and_limits() {
        let d = parse("version: 1\nnodes: {a: [}\n").unwrap_err();
        assert_eq!(d.0.len(), 1);
        assert!(d.0[0].loc.line >= 2, "{d}");
        let deep = format!(
            "version: 1\nnodes: {}{}\n",
            "[".repeat(5000),
            "]".repeat(5000)
        );
        assert!(parse(&deep).is_err());
        let dup = parse("version: 1\nnodes: {}\nnodes: {}\n").unwrap_err();
        assert!(dup.to_string().contains("duplicate"), "{dup}");
    }

    #[test]
    fn dollar_escapes_and_explicit_constants() {
        let ir = parse("version: 1\nnodes:\n  a: {type: T, inputs: {x: $$5, y: {value: a.b}}}\n")
            .unwrap();
        assert_eq!(
            ir.nodes[0].inputs[0].value,
            InputExpr::Const(Const::String("$5".into()))
        );
        assert_eq!(
            ir.nodes[0].inputs[1].value,
            InputExpr::Const(Const::String("a.b".into()))
        );
    }
}
