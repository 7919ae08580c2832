//! The Lua front-end: a `.lua` script builds a graph through a small API and yields the same
//! [`GraphIr`] as a YAML document, which then goes through the same validation.
//!
//! The script runs in a sandbox ([`LuaLimits`]): only the `string`, `table`, `math`, `utf8` and
//! `coroutine` libraries; no `io`, `os`, `debug`, `load`, `dofile` or C modules; a memory limit;
//! and an instruction budget, so an endless loop stops with an error. `require` loads `.lua`
//! modules from the graph's own folder only. The API, as globals:
//!
//! ```lua
//! description("two scenes")
//! local seed = input("seed", "Int", {default = 0, doc = "noise seed"})
//! local noise = node("noise", "RandomNoise", {seed = seed, width = 64, height = 64})
//! local image = node("image", "NoiseToImage", {latent = noise.noise, scale = 0.2})
//! output("image", image.image)
//! lua_node("Double", {inputs = "x: Int", outputs = "y: Int",
//!                     fn = function(i) return i.x * 2 end})   -- a Lua node: graph::lua_node
//! ```
//!
//! Every node, binding and output keeps the file and line of the call that made it, so
//! validation errors point into the script (or the module) that wrote it.

use super::diag::{Diagnostic, Diagnostics};
use super::ir::{
    Const, GraphInputDecl, GraphIr, InputBinding, InputExpr, Loc, LuaNodeDecl, NodeDecl, OutputDecl,
};
use super::yaml::is_identifier;
use mlua::{HookTriggers, Lua, LuaOptions, StdLib, Value as LuaValue, VmState};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Lua scripts larger than this are refused before loading.
pub const MAX_SCRIPT_BYTES: usize = 4 << 20;

/// What a Lua script may use. The defaults are the sandbox; a host may widen them on purpose.
#[derive(Debug, Clone, PartialEq)]
pub struct LuaLimits {
    /// The most memory the Lua state may allocate.
    pub memory_bytes: usize,
    /// The most Lua VM instructions one script (or one Lua node call) may run.
    pub instructions: u64,
    /// Also open `io` and `os` (still no `debug` and no C modules).
    pub allow_io_os: bool,
}

impl Default for LuaLimits {
    fn default() -> Self {
        LuaLimits {
            memory_bytes: 64 << 20,
            instructions: 200_000_000,
            allow_io_os: false,
        }
    }
}

/// How often the instruction hook runs.
const HOOK_EVERY: u32 = 10_000;

/// A fresh Lua state under `limits`: the safe libraries, a memory limit, an instruction budget,
/// and `print` writing to stderr (stdout may carry JSON events).
pub fn sandboxed_lua(limits: &LuaLimits) -> mlua::Result<Lua> {
    sandbox(limits, false).map(|(lua, _)| lua)
}

/// [`sandboxed_lua`]; with `upvalue_names`, also `debug.getupvalue` for the host's own use (the
/// script never sees the `debug` library).
fn sandbox(limits: &LuaLimits, upvalue_names: bool) -> mlua::Result<(Lua, Option<mlua::Function>)> {
    let mut libs = StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::UTF8 | StdLib::COROUTINE;
    if limits.allow_io_os {
        libs |= StdLib::IO | StdLib::OS;
    }
    let (lua, getupvalue) = if upvalue_names {
        // SAFETY: `debug` is opened only to take `getupvalue` for the host; it is removed from
        // the globals before any script runs, and without `debug` or `package` a script cannot
        // reach the registry where Lua also records it.
        let lua = unsafe { Lua::unsafe_new_with(libs | StdLib::DEBUG, LuaOptions::new()) };
        let debug: mlua::Table = lua.globals().get("debug")?;
        let f: mlua::Function = debug.get("getupvalue")?;
        lua.globals().raw_set("debug", LuaValue::Nil)?;
        (lua, Some(f))
    } else {
        (Lua::new_with(libs, LuaOptions::new())?, None)
    };
    let globals = lua.globals();
    for name in ["dofile", "loadfile", "load", "require"] {
        globals.raw_set(name, LuaValue::Nil)?;
    }
    if let Ok(string) = globals.get::<mlua::Table>("string") {
        string.raw_set("dump", LuaValue::Nil)?;
    }
    globals.raw_set(
        "print",
        lua.create_function(|_, args: mlua::Variadic<LuaValue>| {
            let parts: Vec<String> = args
                .iter()
                .map(|v| v.to_string().unwrap_or_else(|_| "?".into()))
                .collect();
            eprintln!("[lua] {}", parts.join("\t"));
            Ok(())
        })?,
    )?;
    lua.set_memory_limit(limits.memory_bytes)?;
    let budget = limits.instructions;
    let used = Arc::new(AtomicU64::new(0));
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(HOOK_EVERY),
        move |lua, _| {
            let n = used.fetch_add(HOOK_EVERY as u64, Ordering::Relaxed) + HOOK_EVERY as u64;
            if n <= budget {
                return Ok(VmState::Continue);
            }
            let msg = format!("the instruction budget of {budget} is spent (an endless loop?)");
            // From now on every instruction fails, so a script cannot swallow the error with
            // `pcall` and loop on: the error comes back at the first instruction after it.
            let again = msg.clone();
            lua.set_global_hook(HookTriggers::new().every_nth_instruction(1), move |_, _| {
                Err(mlua::Error::runtime(again.clone()))
            })?;
            Err(mlua::Error::runtime(msg))
        },
    )?;
    Ok((lua, getupvalue))
}

/// The graph being built, shared by the API functions.
struct Builder {
    ir: GraphIr,
    /// Chunk names (as Lua reports them) of the files read so far; index = `Loc::file`.
    chunks: Vec<String>,
    /// `debug.getupvalue`, kept from the script, to name what a Lua node function captures.
    getupvalue: Option<mlua::Function>,
    /// The text of each chunk, to take Lua nodes' function sources from.
    texts: std::collections::HashMap<String, String>,
    diags: Vec<Diagnostic>,
    /// Module name → its result, for `require` returning the same value twice.
    modules: Vec<(String, mlua::RegistryKey)>,
    /// Modules being loaded, to refuse cycles.
    loading: Vec<String>,
}

impl Builder {
    fn file_of_chunk(&self, chunk: &str) -> u32 {
        self.chunks.iter().position(|c| c == chunk).unwrap_or(0) as u32
    }

    fn error(&mut self, loc: Loc, node: Option<&str>, msg: impl Into<String>) {
        let file = self.ir.file_name(loc).to_string();
        self.diags.push(match node {
            Some(n) => Diagnostic::at_node(&file, loc, n, msg),
            None => Diagnostic::new(&file, loc, msg),
        });
    }
}

type Shared = Arc<Mutex<Builder>>;

fn lock(b: &Shared) -> std::sync::MutexGuard<'_, Builder> {
    b.lock().unwrap_or_else(|p| p.into_inner())
}

/// The location of the Lua code that called the running API function.
fn caller_loc(lua: &Lua, b: &Builder) -> Loc {
    let found = lua.inspect_stack(1, |d| {
        let src = d
            .source()
            .source
            .map(|s| s.into_owned())
            .unwrap_or_default();
        (src, d.current_line().unwrap_or(0))
    });
    match found {
        Some((src, line)) if line > 0 => {
            let chunk = src.strip_prefix('=').unwrap_or(&src);
            Loc::in_file(b.file_of_chunk(chunk), line as u32, 1)
        }
        _ => Loc::START,
    }
}

/// `node.port`, made by indexing a node handle.
#[derive(Clone)]
struct PortRef {
    node: String,
    port: String,
}
impl mlua::UserData for PortRef {
    fn add_methods<M: mlua::UserDataMethods<Self>>(m: &mut M) {
        m.add_meta_method(mlua::MetaMethod::ToString, |_, p, ()| {
            Ok(format!("{}.{}", p.node, p.port))
        });
    }
}

/// What `node(...)` returns: index it with a port name for a link.
#[derive(Clone)]
struct NodeRef {
    id: String,
}
impl mlua::UserData for NodeRef {
    fn add_methods<M: mlua::UserDataMethods<Self>>(m: &mut M) {
        m.add_meta_method(mlua::MetaMethod::Index, |_, n, port: String| {
            Ok(PortRef {
                node: n.id.clone(),
                port,
            })
        });
        m.add_meta_method(mlua::MetaMethod::ToString, |_, n, ()| {
            Ok(format!("node {}", n.id))
        });
    }
}

/// What `input(...)` returns: a reference to a graph input (`$name` in YAML).
#[derive(Clone)]
struct InputRef {
    name: String,
}
impl mlua::UserData for InputRef {
    fn add_methods<M: mlua::UserDataMethods<Self>>(m: &mut M) {
        m.add_meta_method(mlua::MetaMethod::ToString, |_, i, ()| {
            Ok(format!("${}", i.name))
        });
    }
}

/// A Lua value as a graph constant; `Err` says why it is not one.
fn to_const(v: &LuaValue, depth: usize) -> Result<Const, String> {
    Ok(match v {
        LuaValue::Nil => Const::Null,
        LuaValue::Boolean(b) => Const::Bool(*b),
        LuaValue::Integer(i) => Const::Int(*i),
        LuaValue::Number(f) => Const::Float(*f),
        LuaValue::String(s) => Const::String(
            s.to_str()
                .map_err(|_| "a string that is not UTF-8".to_string())?
                .to_string(),
        ),
        LuaValue::Table(t) if depth < 16 => {
            let len = t.raw_len();
            if t.clone().pairs::<LuaValue, LuaValue>().count() != len {
                return Err("a table with keys (only lists are constants)".into());
            }
            let mut items = Vec::with_capacity(len);
            for i in 1..=len {
                items.push(to_const(
                    &t.raw_get(i).map_err(|e| e.to_string())?,
                    depth + 1,
                )?);
            }
            Const::List(items)
        }
        LuaValue::Table(_) => return Err("a list nested too deeply".into()),
        LuaValue::UserData(u) if u.is::<NodeRef>() => {
            return Err("a node; link one of its outputs as node.port".into())
        }
        other => return Err(format!("a {}", other.type_name())),
    })
}

/// A Lua value bound to a node input.
fn to_input_expr(v: &LuaValue) -> Result<InputExpr, String> {
    if let LuaValue::UserData(u) = v {
        if let Ok(p) = u.borrow::<PortRef>() {
            return Ok(InputExpr::Link {
                node: p.node.clone(),
                port: p.port.clone(),
            });
        }
        if let Ok(i) = u.borrow::<InputRef>() {
            return Ok(InputExpr::GraphInput(i.name.clone()));
        }
    }
    to_const(v, 0).map(InputExpr::Const)
}

/// The body of a Lua node given as a function: its source text, cut from the script by the
/// lines Lua says it spans, made into a chunk that calls it with the inputs table; and where it
/// is. The function runs on its own at run time, so it may not use the script's local variables.
fn function_source(f: &mlua::Function, b: &Builder) -> Result<(String, Loc), String> {
    let info = f.info();
    let (Some(first), Some(last)) = (info.line_defined, info.last_line_defined) else {
        return Err("a function written in Lua is needed".into());
    };
    // Captured locals of the script (`_ENV`, the globals, is fine).
    let mut captured = Vec::new();
    if let Some(getupvalue) = &b.getupvalue {
        for i in 1..=info.num_upvalues as i64 {
            let name: Option<String> = getupvalue
                .call::<LuaValue>((f.clone(), i))
                .ok()
                .and_then(|v| v.to_string().ok());
            match name {
                Some(n) if n == "_ENV" => {}
                Some(n) => captured.push(n),
                None => captured.push("?".into()),
            }
        }
    }
    if !captured.is_empty() {
        return Err(format!(
            "the function uses local variables from outside it ({}), but it runs on its own: pass them as inputs or define them inside it",
            captured.join(", ")
        ));
    }
    let chunk = info.source.unwrap_or_default();
    let chunk = chunk.strip_prefix('=').unwrap_or(&chunk).to_string();
    let text = b
        .texts
        .get(&chunk)
        .ok_or_else(|| format!("the source of {chunk} is not known"))?;
    let lines: Vec<&str> = text.lines().collect();
    if first == 0 || last < first || last > lines.len() {
        return Err("the function's lines are not in its file".into());
    }
    let mut src = lines[first - 1..last].join("\n");
    // Cut what precedes `function` on the first line and what follows the last `end`.
    let start = src
        .find("function")
        .ok_or("no `function` keyword on the function's first line")?;
    let end = src
        .rfind("end")
        .ok_or("no `end` on the function's last line")?
        + 3;
    if end <= start {
        return Err("cannot find the function's text: write it on lines of its own".into());
    }
    src = src[start..end].to_string();
    let code = format!("return ({src})(...)");
    // The cut must give exactly one function expression.
    let probe = Lua::new_with(StdLib::NONE, LuaOptions::new()).map_err(|e| e.to_string())?;
    if probe.load(code.as_str()).into_function().is_err() {
        return Err("cannot cut the function's text from its line(s): start it on a line of its own and end it with `end` alone, or use code = [[...]]".into());
    }
    Ok((code, Loc::in_file(b.file_of_chunk(&chunk), first as u32, 1)))
}

/// Port declarations: `"a: Int, b: List<String>"` (in order), or a table `{a = "Int"}` (by name).
fn lua_ports(v: &LuaValue) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    match v {
        LuaValue::String(s) => {
            let text = s.to_str().map_err(|e| e.to_string())?.to_string();
            let mut depth = 0i32;
            let mut start = 0;
            let mut parts = Vec::new();
            for (i, c) in text.char_indices() {
                match c {
                    '<' => depth += 1,
                    '>' => depth -= 1,
                    ',' if depth == 0 => {
                        parts.push(text[start..i].to_string());
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            parts.push(text[start..].to_string());
            for part in parts.iter().filter(|p| !p.trim().is_empty()) {
                let (name, ty) = part
                    .split_once(':')
                    .ok_or_else(|| format!("'{}' is not `name: Type`", part.trim()))?;
                out.push((name.trim().to_string(), ty.trim().to_string()));
            }
        }
        LuaValue::Table(t) => {
            for pair in t.clone().pairs::<String, String>() {
                out.push(pair.map_err(|_| "ports are written {name = \"Type\"}".to_string())?);
            }
            out.sort();
        }
        other => {
            return Err(format!(
                "expected \"name: Type, ...\", found a {}",
                other.type_name()
            ))
        }
    }
    if let Some((bad, _)) = out.iter().find(|(n, _)| !is_identifier(n)) {
        return Err(format!("port name '{bad}' is not an identifier"));
    }
    Ok(out)
}

/// A Lua error's message, without Lua's traceback and mlua's prefixes, and the traceback
/// (empty when Lua gave none).
pub(crate) fn error_parts(e: &mlua::Error) -> (String, String) {
    let (message, traceback) = match e {
        mlua::Error::CallbackError { traceback, cause } => (cause.to_string(), traceback.clone()),
        mlua::Error::MemoryError(_) => (
            "the Lua memory limit is exceeded".to_string(),
            String::new(),
        ),
        other => (other.to_string(), String::new()),
    };
    let message = message
        .split("\nstack traceback:")
        .next()
        .unwrap_or_default();
    // Name the API function a bad argument went to (Lua's traceback knows it).
    let message = match (
        message.strip_prefix("bad argument "),
        traceback.find("in function '"),
    ) {
        (Some(rest), Some(at)) if !rest.contains(" to `") => {
            let name: String = traceback[at + 13..]
                .chars()
                .take_while(|c| *c != '\'')
                .collect();
            match rest.split_once(": ") {
                Some((arg, cause)) => format!("bad argument {arg} to '{name}': {cause}"),
                None => message.to_string(),
            }
        }
        _ => message.to_string(),
    };
    let message = message
        .strip_prefix("runtime error: ")
        .or_else(|| message.strip_prefix("syntax error: "))
        .unwrap_or(&message)
        .to_string();
    (message, traceback)
}

/// Turns a Lua error into a diagnostic at the innermost script location it names.
fn lua_error(e: &mlua::Error, b: &Builder) -> Diagnostic {
    let (message, traceback) = error_parts(e);
    // `chunk:line: text` in the message, else the first frame of the traceback in one of ours.
    for text in [&message, &traceback] {
        for (i, chunk) in b.chunks.iter().enumerate() {
            let pat = format!("{chunk}:");
            if let Some(pos) = text.find(&pat) {
                let rest = &text[pos + pat.len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if let Ok(line) = digits.parse::<u32>() {
                    let loc = Loc::in_file(i as u32, line, 1);
                    let msg = if std::ptr::eq(text, &message) {
                        rest[digits.len()..]
                            .trim_start_matches(':')
                            .trim()
                            .to_string()
                    } else {
                        message.clone()
                    };
                    return Diagnostic::new(b.ir.file_name(loc), loc, msg);
                }
            }
        }
    }
    Diagnostic::new(&b.ir.source, Loc::START, message)
}

/// Reads a module or script, refusing huge files.
fn read_script(path: &Path) -> Result<String, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.len() > MAX_SCRIPT_BYTES as u64 {
        return Err(format!(
            "{} is {:.1} MB; the limit is {} MB",
            path.display(),
            meta.len() as f64 / 1e6,
            MAX_SCRIPT_BYTES >> 20
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The module file for `require(name)`: `a.b` is `a/b.lua` under `base`, and must stay inside it.
fn module_path(base: &Path, name: &str) -> Result<PathBuf, String> {
    if name.is_empty() || !name.split('.').all(is_identifier) {
        return Err(format!(
            "require '{name}': a module name is identifiers joined by dots (a.b is a/b.lua in the graph's folder)"
        ));
    }
    let base = if base.as_os_str().is_empty() {
        Path::new(".")
    } else {
        base
    };
    let rel: PathBuf = name.split('.').collect::<PathBuf>().with_extension("lua");
    let path = base.join(rel);
    let root = base
        .canonicalize()
        .map_err(|e| format!("require '{name}': cannot read the graph's folder: {e}"))?;
    let real = path
        .canonicalize()
        .map_err(|_| format!("require '{name}': no module {}", path.display()))?;
    if !real.starts_with(&root) {
        return Err(format!(
            "require '{name}': {} is outside the graph's folder",
            path.display()
        ));
    }
    Ok(path)
}

fn install_api(lua: &Lua, b: &Shared) -> mlua::Result<()> {
    let g = lua.globals();

    // The description is for readers of the script; YAML keeps it only in the document too.
    g.raw_set(
        "description",
        lua.create_function(|_, _text: String| Ok(()))?,
    )?;

    let bb = b.clone();
    g.raw_set(
        "input",
        lua.create_function(
            move |lua, (name, ty, opts): (String, String, Option<mlua::Table>)| {
                let mut st = lock(&bb);
                let loc = caller_loc(lua, &st);
                if !is_identifier(&name) {
                    st.error(loc, None, format!("graph input name '{name}' is not an identifier"));
                } else if st.ir.inputs.iter().any(|i| i.name == name) {
                    st.error(loc, None, format!("graph input '{name}' is declared twice"));
                }
                let mut decl = GraphInputDecl {
                    name: name.clone(),
                    loc,
                    type_expr: ty,
                    type_loc: loc,
                    default: None,
                    doc: None,
                };
                if let Some(opts) = opts {
                    for pair in opts.pairs::<String, LuaValue>() {
                        let (key, value) = pair?;
                        match key.as_str() {
                            "default" => match to_const(&value, 0) {
                                Ok(c) => decl.default = Some((c, loc)),
                                Err(what) => st.error(
                                    loc,
                                    None,
                                    format!("the default of graph input '{name}' is {what}"),
                                ),
                            },
                            "doc" => decl.doc = value.to_string().ok(),
                            other => st.error(
                                loc,
                                None,
                                format!("graph input '{name}': unknown option '{other}' (options: default, doc)"),
                            ),
                        }
                    }
                }
                st.ir.inputs.push(decl);
                Ok(InputRef { name })
            },
        )?,
    )?;

    let bb = b.clone();
    g.raw_set(
        "node",
        lua.create_function(
            move |lua, (id, ty, inputs): (String, String, Option<mlua::Table>)| {
                let mut st = lock(&bb);
                let loc = caller_loc(lua, &st);
                if !is_identifier(&id) {
                    st.error(
                        loc,
                        None,
                        format!("node id '{id}' is not an identifier (letters, digits and _)"),
                    );
                } else if let Some(first) = st.ir.nodes.iter().find(|n| n.id == id) {
                    let at = first.loc;
                    let at = format!("{}:{}", st.ir.file_name(at), at.line);
                    st.error(
                        loc,
                        Some(&id),
                        format!("node id '{id}' is already used at {at}"),
                    );
                }
                let mut node = NodeDecl {
                    id: id.clone(),
                    loc,
                    type_name: ty,
                    type_loc: loc,
                    inputs: Vec::new(),
                };
                if let Some(inputs) = inputs {
                    let mut pairs = Vec::new();
                    for pair in inputs.pairs::<LuaValue, LuaValue>() {
                        let (k, v) = pair?;
                        match k {
                            LuaValue::String(s) => pairs.push((s.to_string_lossy(), v)),
                            other => st.error(
                                loc,
                                Some(&id),
                                format!("input names are strings, found {}", other.type_name()),
                            ),
                        }
                    }
                    // Lua tables have no order: keep bindings sorted for a stable IR.
                    pairs.sort_by(|a, b| a.0.cmp(&b.0));
                    for (port, v) in pairs {
                        match to_input_expr(&v) {
                            Ok(value) => node.inputs.push(InputBinding {
                                port,
                                loc,
                                value,
                                value_loc: loc,
                            }),
                            Err(what) => st.error(
                                loc,
                                Some(&id),
                                format!(
                                    "input '{port}' is {what}, which is not a valid input value"
                                ),
                            ),
                        }
                    }
                }
                st.ir.nodes.push(node);
                Ok(NodeRef { id })
            },
        )?,
    )?;

    let bb = b.clone();
    g.raw_set(
        "lua_node",
        lua.create_function(move |lua, (name, spec): (String, mlua::Table)| {
            let mut st = lock(&bb);
            let loc = caller_loc(lua, &st);
            if !is_identifier(&name) {
                st.error(loc, None, format!("Lua node name '{name}' is not an identifier"));
            }
            let mut decl = LuaNodeDecl {
                name: name.clone(),
                loc,
                doc: String::new(),
                inputs: Vec::new(),
                outputs: Vec::new(),
                code: String::new(),
                code_loc: loc,
            };
            for pair in spec.pairs::<String, LuaValue>() {
                let (key, value) = pair?;
                match key.as_str() {
                    "doc" => decl.doc = value.to_string()?,
                    "code" => match value {
                        LuaValue::String(s) => decl.code = s.to_str()?.to_string(),
                        other => st.error(
                            loc,
                            None,
                            format!("Lua node '{name}': 'code' is a string of Lua, not a {}", other.type_name()),
                        ),
                    },
                    "fn" => match value {
                        LuaValue::Function(f) => match function_source(&f, &st) {
                            Ok((code, at)) => {
                                decl.code = code;
                                decl.code_loc = at;
                            }
                            Err(e) => st.error(loc, None, format!("Lua node '{name}': fn: {e}")),
                        },
                        other => st.error(
                            loc,
                            None,
                            format!("Lua node '{name}': 'fn' is a function, not a {}", other.type_name()),
                        ),
                    },
                    "inputs" | "outputs" => match lua_ports(&value) {
                        Ok(p) if key == "inputs" => decl.inputs = p,
                        Ok(p) => decl.outputs = p,
                        Err(e) => st.error(loc, None, format!("Lua node '{name}': {key}: {e}")),
                    },
                    other => st.error(
                        loc,
                        None,
                        format!("Lua node '{name}': unknown key '{other}' (keys: doc, inputs, outputs, fn, code)"),
                    ),
                }
            }
            if decl.code.is_empty() {
                st.error(loc, None, format!("Lua node '{name}' needs 'fn' (a function) or 'code' (a string)"));
            }
            st.ir.lua_nodes.push(decl);
            Ok(())
        })?,
    )?;

    let bb = b.clone();
    g.raw_set(
        "output",
        lua.create_function(move |lua, (name, link): (String, LuaValue)| {
            let mut st = lock(&bb);
            let loc = caller_loc(lua, &st);
            let port = match &link {
                LuaValue::UserData(u) => u.borrow::<PortRef>().ok().map(|p| p.clone()),
                _ => None,
            };
            match port {
                Some(p) => st.ir.outputs.push(OutputDecl {
                    name,
                    loc,
                    node: p.node,
                    port: p.port,
                    value_loc: loc,
                }),
                None => st.error(
                    loc,
                    None,
                    format!(
                        "output '{name}' must be a node's port (node.port), found {}",
                        link.type_name()
                    ),
                ),
            }
            Ok(())
        })?,
    )?;

    let bb = b.clone();
    g.raw_set(
        "require",
        lua.create_function(move |lua, name: String| -> mlua::Result<LuaValue> {
            let (path, chunk) = {
                let mut st = lock(&bb);
                if let Some((_, key)) = st.modules.iter().find(|(n, _)| *n == name) {
                    return lua.registry_value(key);
                }
                if st.loading.contains(&name) {
                    return Err(mlua::Error::runtime(format!(
                        "require '{name}': modules require each other in a cycle"
                    )));
                }
                let path = module_path(&st.ir.base_dir, &name).map_err(mlua::Error::runtime)?;
                let chunk = path.display().to_string();
                if !st.chunks.contains(&chunk) {
                    st.chunks.push(chunk.clone());
                    st.ir.extra_files.push(chunk.clone());
                    st.ir.watch_files.push(path.clone());
                }
                st.loading.push(name.clone());
                (path, chunk)
            };
            let text = read_script(&path).map_err(mlua::Error::runtime)?;
            // The text is known before the module runs, for Lua node functions it defines.
            lock(&bb).texts.insert(chunk.clone(), text.clone());
            let result = lua
                .load(text.as_str())
                .set_name(format!("={chunk}"))
                .call::<LuaValue>(name.clone());
            let mut st = lock(&bb);
            st.texts.insert(chunk, text);
            st.loading.retain(|n| *n != name);
            let value = result?;
            let value = if value.is_nil() {
                LuaValue::Boolean(true)
            } else {
                value
            };
            let key = lua.create_registry_value(value.clone())?;
            st.modules.push((name, key));
            Ok(value)
        })?,
    )?;
    Ok(())
}

/// Runs a Lua graph script. `source` names it in messages (and is its chunk name); `base_dir` is
/// where relative paths and modules resolve; `path` is the script's file, if it has one.
pub fn parse_lua_graph(
    text: &str,
    source: &str,
    base_dir: &Path,
    path: Option<&Path>,
    limits: &LuaLimits,
) -> Result<GraphIr, Diagnostics> {
    let fail = |msg: String| Diagnostics(vec![Diagnostic::new(source, Loc::START, msg)]);
    if text.len() > MAX_SCRIPT_BYTES {
        return Err(fail(format!(
            "graph script is {:.1} MB; the limit is {} MB",
            text.len() as f64 / 1e6,
            MAX_SCRIPT_BYTES >> 20
        )));
    }
    let builder: Shared = Arc::new(Mutex::new(Builder {
        ir: GraphIr {
            source: source.to_string(),
            base_dir: base_dir.to_path_buf(),
            watch_files: path.map(Path::to_path_buf).into_iter().collect(),
            ..GraphIr::default()
        },
        chunks: vec![source.to_string()],
        texts: [(source.to_string(), text.to_string())]
            .into_iter()
            .collect(),
        getupvalue: None,
        diags: Vec::new(),
        modules: Vec::new(),
        loading: Vec::new(),
    }));
    let (lua, getupvalue) =
        sandbox(limits, true).map_err(|e| fail(format!("cannot start Lua: {e}")))?;
    lock(&builder).getupvalue = getupvalue;
    install_api(&lua, &builder).map_err(|e| fail(format!("cannot start Lua: {e}")))?;
    let result = lua.load(text).set_name(format!("={source}")).exec();
    // The API functions hold clones of the builder: drop them with the state first.
    drop(lua);
    let mut st = lock(&builder);
    if let Err(e) = result {
        let d = lua_error(&e, &st);
        st.diags.push(d);
    }
    st.modules.clear();
    if st.diags.is_empty() {
        Ok(std::mem::take(&mut st.ir))
    } else {
        Err(Diagnostics(std::mem::take(&mut st.diags)).sorted())
    }
}
