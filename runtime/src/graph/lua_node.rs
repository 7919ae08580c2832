//! Lua nodes: node types declared inside a graph (`lua_nodes:` in YAML, `lua_node(...)` in a Lua
//! graph) whose body is a Lua chunk, for glue logic — prompt templates, schedules, arithmetic on
//! scalars, strings and lists.
//!
//! The body runs in a fresh sandbox ([`sandboxed_lua`]) on every execution. Its inputs are
//! globals named after the ports (and the table `...`); it returns a table of outputs by name,
//! or the value itself when the node has one output. A Lua graph may give the body as a function
//! of the script (`fn = function(inputs) ... end`): its source becomes a chunk that calls it
//! with the inputs table. Port types are `Int`, `Float`, `Bool`,
//! `String` and `List<...>` of those. A Lua node is deterministic and cacheable, and its code is
//! part of its cache key, so editing the body re-runs it.

use super::diag::Diagnostic;
use super::ir::{GraphIr, LuaNodeDecl};
use super::lua::{error_parts, sandboxed_lua, LuaLimits};
use crate::exec::context::ExecContext;
use crate::registry::{NodeImpl, NodeType, PluginInfo, PortSpec, Registry};
use crate::types::PortType;
use crate::value::Value;
use mlua::{Lua, Value as LuaValue};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// The body of one Lua node type.
struct LuaNodeImpl {
    /// How the code is named in messages (`graph.yaml:12 (lua node Template)`).
    chunk: String,
    code: String,
    inputs: Vec<(String, PortType)>,
    outputs: Vec<(String, PortType)>,
    limits: LuaLimits,
}

fn scalar_allowed(t: &PortType) -> bool {
    match t {
        PortType::Int | PortType::Float | PortType::Bool | PortType::String => true,
        PortType::List(inner) => scalar_allowed(inner),
        _ => false,
    }
}

fn to_lua(lua: &Lua, v: &Value) -> mlua::Result<LuaValue> {
    Ok(match v {
        Value::Bool(b) => LuaValue::Boolean(*b),
        Value::Int(i) => LuaValue::Integer(*i),
        Value::Float(f) => LuaValue::Number(*f),
        Value::String(s) => LuaValue::String(lua.create_string(s.as_str())?),
        Value::List(items) => {
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, to_lua(lua, item)?)?;
            }
            LuaValue::Table(t)
        }
        other => {
            return Err(mlua::Error::runtime(format!(
                "a {} cannot be passed to Lua",
                other.type_name()
            )))
        }
    })
}

/// A Lua result as a value of type `ty`; `Err` says what was found instead.
fn from_lua(v: &LuaValue, ty: &PortType, depth: usize) -> Result<Value, String> {
    let found = || format!("{} {}", v.type_name(), v.to_string().unwrap_or_default());
    Ok(match (ty, v) {
        (PortType::Int, LuaValue::Integer(i)) => Value::Int(*i),
        (PortType::Int, LuaValue::Number(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => {
            Value::Int(*f as i64)
        }
        (PortType::Float, LuaValue::Number(f)) => Value::Float(*f),
        (PortType::Float, LuaValue::Integer(i)) => Value::Float(*i as f64),
        (PortType::Bool, LuaValue::Boolean(b)) => Value::Bool(*b),
        (PortType::String, LuaValue::String(s)) => Value::string(
            &s.to_str()
                .map_err(|_| "a string that is not UTF-8".to_string())?,
        ),
        (PortType::String, LuaValue::Integer(_) | LuaValue::Number(_)) => {
            Value::string(&v.to_string().unwrap_or_default())
        }
        (PortType::List(inner), LuaValue::Table(t)) if depth < 16 => {
            let mut items = Vec::with_capacity(t.raw_len());
            for i in 1..=t.raw_len() {
                let item: LuaValue = t.raw_get(i).map_err(|e| e.to_string())?;
                items
                    .push(from_lua(&item, inner, depth + 1).map_err(|e| format!("item {i}: {e}"))?);
            }
            Value::list(items)
        }
        _ => return Err(format!("expected {ty}, found {}", found())),
    })
}

impl LuaNodeImpl {
    fn run(&self, ctx: &ExecContext) -> Result<Vec<(String, Value)>, String> {
        let lua = sandboxed_lua(&self.limits).map_err(|e| format!("cannot start Lua: {e}"))?;
        let globals = lua.globals();
        let args = lua.create_table().map_err(|e| e.to_string())?;
        for (name, _) in &self.inputs {
            let Some(v) = ctx.input(name) else { continue };
            let lv = to_lua(&lua, v).map_err(|e| format!("input '{name}': {e}"))?;
            globals
                .raw_set(name.as_str(), lv.clone())
                .map_err(|e| e.to_string())?;
            args.raw_set(name.as_str(), lv).map_err(|e| e.to_string())?;
        }
        let result: LuaValue = lua
            .load(self.code.as_str())
            .set_name(format!("={}", self.chunk))
            .call(args)
            .map_err(|e| error_parts(&e).0)?;
        let mut out = Vec::with_capacity(self.outputs.len());
        match (&result, self.outputs.as_slice()) {
            // One output: the value itself, unless it is a table holding that output by name.
            (LuaValue::Table(t), [(name, _)]) if t.contains_key(name.as_str()).unwrap_or(false) => {
                out.push(self.output(name, &t.raw_get(name.as_str()).map_err(|e| e.to_string())?)?)
            }
            (_, [(name, _)]) => out.push(self.output(name, &result)?),
            (LuaValue::Table(t), _) => {
                for (name, _) in &self.outputs {
                    let v: LuaValue = t.raw_get(name.as_str()).map_err(|e| e.to_string())?;
                    out.push(self.output(name, &v)?);
                }
            }
            (other, _) => {
                return Err(format!(
                    "the code must return a table of outputs ({}), not a {}",
                    self.outputs
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    other.type_name()
                ))
            }
        }
        Ok(out)
    }

    fn output(&self, name: &str, v: &LuaValue) -> Result<(String, Value), String> {
        let ty = &self
            .outputs
            .iter()
            .find(|(n, _)| n == name)
            .expect("declared output")
            .1;
        if v.is_nil() {
            return Err(format!("the code returned no value for output '{name}'"));
        }
        from_lua(v, ty, 0)
            .map(|value| (name.to_string(), value))
            .map_err(|e| format!("output '{name}': {e}"))
    }
}

impl NodeImpl for LuaNodeImpl {
    fn execute(&self, ctx: &mut ExecContext) -> Result<(), String> {
        for (name, value) in self.run(ctx)? {
            ctx.set_output(&name, value)?;
        }
        Ok(())
    }
}

/// Parses `(name, type)` port declarations, reporting bad ones.
fn ports(
    decl: &LuaNodeDecl,
    list: &[(String, String)],
    what: &str,
    file: &str,
    diags: &mut Vec<Diagnostic>,
) -> Vec<(String, PortType)> {
    let mut out = Vec::new();
    for (name, ty) in list {
        match PortType::parse(ty) {
            Ok(t) if scalar_allowed(&t) => out.push((name.clone(), t)),
            Ok(t) => diags.push(Diagnostic::new(
                file,
                decl.loc,
                format!(
                    "Lua node '{}': {what} '{name}' is a {t}; Lua nodes take Int, Float, Bool, String and List<...> of those",
                    decl.name
                ),
            )),
            Err(e) => diags.push(Diagnostic::new(
                file,
                decl.loc,
                format!("Lua node '{}': {what} '{name}': {e}", decl.name),
            )),
        }
    }
    out
}

/// Adds the graph's Lua node types to a copy of `registry`, checking their ports and compiling
/// their code. A name already taken is an error.
pub fn with_lua_nodes(
    ir: &GraphIr,
    registry: &Registry,
    limits: &LuaLimits,
) -> Result<Registry, Vec<Diagnostic>> {
    let mut out = registry.clone();
    let mut diags = Vec::new();
    for decl in &ir.lua_nodes {
        let file = ir.file_name(decl.loc).to_string();
        if let Some(existing) = registry.get(&decl.name) {
            diags.push(Diagnostic::new(
                &file,
                decl.loc,
                format!(
                    "Lua node '{}' has the name of a node type from plugin '{}'",
                    decl.name, existing.plugin.name
                ),
            ));
            continue;
        }
        let inputs = ports(decl, &decl.inputs, "input", &file, &mut diags);
        let outputs = ports(decl, &decl.outputs, "output", &file, &mut diags);
        if decl.outputs.is_empty() {
            diags.push(Diagnostic::new(
                &file,
                decl.loc,
                format!("Lua node '{}' declares no outputs", decl.name),
            ));
        }
        let chunk = format!("{}:{} (Lua node {})", file, decl.code_loc.line, decl.name);
        // A syntax error is a graph error, found before anything runs.
        if let Ok(lua) = sandboxed_lua(limits) {
            if let Err(e) = lua
                .load(decl.code.as_str())
                .set_name(format!("={chunk}"))
                .into_function()
            {
                diags.push(Diagnostic::new(&file, decl.code_loc, error_parts(&e).0));
                continue;
            }
        }
        let mut h = std::hash::DefaultHasher::new();
        (&decl.code, &decl.inputs, &decl.outputs).hash(&mut h);
        let spec = |(n, t): &(String, PortType)| PortSpec::new(n, t.clone());
        let ty = NodeType {
            name: decl.name.clone(),
            category: "lua".into(),
            version: "1".into(),
            doc: decl.doc.clone(),
            inputs: inputs.iter().map(spec).collect(),
            outputs: outputs.iter().map(spec).collect(),
            deterministic: true,
            cacheable: true,
            side_effects: false,
            plugin: Arc::new(PluginInfo {
                name: "lua".into(),
                version: "1".into(),
                path: None,
                build: h.finish(),
            }),
            imp: Arc::new(LuaNodeImpl {
                chunk,
                code: decl.code.clone(),
                inputs,
                outputs,
                limits: limits.clone(),
            }),
        };
        if let Err(e) = out.insert(ty) {
            diags.push(Diagnostic::new(&file, decl.loc, e.to_string()));
        }
    }
    if diags.is_empty() {
        Ok(out)
    } else {
        Err(diags)
    }
}
