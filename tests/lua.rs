//! Lua graphs: a script and the equivalent YAML document give bit-identical outputs; hostile
//! scripts are stopped with clear errors; errors point at the Lua file and line (modules too).

mod common;

use ditflow::exec::plan::InputSource;
use ditflow::{ArgValue, Graph, GraphError, LuaLimits, RunOptions, Runtime, Session, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

fn runtime() -> Arc<Runtime> {
    let rt = Runtime::new();
    for lib in common::std_plugins() {
        rt.load_plugin_file(&lib).expect("nodes plugin loads");
    }
    Arc::new(rt)
}

/// Runs `graph` in a fresh session; returns each output with the bytes of the file it names
/// (when it names one) or its printed value.
fn outputs(
    rt: &Arc<Runtime>,
    graph: &Graph,
    args: &[(String, ArgValue)],
    tag: &str,
) -> Vec<(String, Vec<u8>)> {
    let session = Session::new(rt.clone());
    let out = common::temp_dir(tag);
    let report = session
        .run(
            graph,
            args,
            &RunOptions {
                out_dir: out,
                ..RunOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(report.ok(), "{:?}", report.failed);
    report
        .outputs
        .iter()
        .map(|(name, v)| {
            let bytes = match &**v {
                Value::String(s) if Path::new(s.as_str()).is_file() => {
                    std::fs::read(s.as_str()).unwrap()
                }
                other => format!("{other:?}").into_bytes(),
            };
            (name.clone(), bytes)
        })
        .collect()
}

fn graphs_dir() -> PathBuf {
    common::repo().join("graphs")
}

#[test]
fn lua_and_yaml_twins_give_bit_identical_outputs() {
    let rt = runtime();
    for (lua, yaml, args) in [
        (
            "noise.lua",
            "noise.yaml",
            vec![("seed".to_string(), ArgValue::Value(Value::Int(7)))],
        ),
        (
            "text_to_image.lua",
            "text_to_image.yaml",
            vec![
                ("steps".to_string(), ArgValue::Value(Value::Int(6))),
                (
                    "prompt".to_string(),
                    ArgValue::Text(
                        "a small white triangle on the left on a green background".into(),
                    ),
                ),
            ],
        ),
    ] {
        let from_lua = Graph::from_file(&graphs_dir().join(lua)).unwrap_or_else(|e| panic!("{e}"));
        let from_yaml =
            Graph::from_file(&graphs_dir().join(yaml)).unwrap_or_else(|e| panic!("{e}"));
        // The same validated plan, up to order: every node's type and where each input comes from.
        let shape = |g: &Graph| {
            let plan = g.plan(&rt, &args).unwrap_or_else(|e| panic!("{e}"));
            let mut nodes: Vec<String> = plan
                .nodes
                .iter()
                .map(|n| {
                    let inputs: Vec<String> = n
                        .inputs
                        .iter()
                        .map(|src| match src {
                            InputSource::Value(v) => format!("{v:?}"),
                            InputSource::Link { node, port } => {
                                format!("{}.{port}", plan.nodes[*node].id)
                            }
                            InputSource::Absent => "-".into(),
                        })
                        .collect();
                    format!("{}:{}({})", n.id, n.ty.name, inputs.join(","))
                })
                .collect();
            nodes.sort();
            nodes
        };
        assert_eq!(
            shape(&from_lua),
            shape(&from_yaml),
            "{lua} and {yaml} differ"
        );
        let a = outputs(&rt, &from_lua, &args, "lua-twin");
        let b = outputs(&rt, &from_yaml, &args, "yaml-twin");
        assert_eq!(a.len(), b.len());
        for ((na, va), (nb, vb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert!(va == vb, "{lua}: output '{na}' differs from {yaml}'s");
        }
        // The module the Lua twin requires is one of its files, for watching.
        if lua == "text_to_image.lua" {
            assert!(
                from_lua.files().iter().any(|f| f.ends_with("lib/demo.lua")),
                "{:?}",
                from_lua.files()
            );
        }
    }
}

#[test]
fn the_scenes_example_builds_one_branch_per_scene() {
    let g = Graph::from_file(&graphs_dir().join("scenes.lua")).unwrap_or_else(|e| panic!("{e}"));
    let plan = g.plan(&runtime(), &[]).unwrap_or_else(|e| panic!("{e}"));
    let saves = plan
        .nodes
        .iter()
        .filter(|n| n.ty.name == "SaveImage")
        .count();
    assert_eq!(saves, 4);
    assert_eq!(plan.outputs.len(), 4);
    assert_eq!(
        plan.nodes
            .iter()
            .filter(|n| n.ty.name == "LoadDiffusionModel")
            .count(),
        1
    );
}

/// The first diagnostic of a script that must fail.
fn error_of(dir: &Path, file: &str, text: &str, limits: &LuaLimits) -> String {
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    let start = Instant::now();
    let err = match Graph::from_file_with(&path, limits) {
        Ok(_) => panic!("{file} should fail"),
        Err(GraphError::Invalid(d)) => d.0[0].to_string(),
        Err(e) => e.to_string(),
    };
    // Not a timing test: a generous bound that only an unbounded script would break.
    assert!(
        start.elapsed().as_secs() < 60,
        "{file} ran for {:?}",
        start.elapsed()
    );
    err
}

#[test]
fn hostile_scripts_are_stopped_with_clear_errors() {
    let dir = common::temp_dir("lua-hostile");
    let graph_dir = dir.join("graph");
    std::fs::create_dir_all(graph_dir.join("sub")).unwrap();
    std::fs::write(dir.join("secret.lua"), "return {}").unwrap();
    let limits = LuaLimits {
        instructions: 20_000_000,
        memory_bytes: 16 << 20,
        ..LuaLimits::default()
    };
    let cases: &[(&str, &str, &str)] = &[
        (
            "loop.lua",
            "local n = 0\nwhile true do n = n + 1 end\n",
            "instruction budget",
        ),
        (
            "pcall_loop.lua",
            "while true do pcall(function() while true do end end) end\n",
            "instruction budget",
        ),
        (
            "hog.lua",
            "local t = {}\nfor i = 1, 1e9 do t[i] = string.rep('x', 64) .. i end\n",
            "memory limit",
        ),
        (
            "open.lua",
            "local f = io.open('/etc/passwd')\n",
            "global 'io'",
        ),
        ("exec.lua", "os.execute('true')\n", "global 'os'"),
        ("dofile.lua", "dofile('/etc/passwd')\n", "global 'dofile'"),
        ("load.lua", "load('return 1')()\n", "global 'load'"),
        ("debug.lua", "debug.getinfo(1)\n", "global 'debug'"),
        ("dump.lua", "string.dump(function() end)\n", "field 'dump'"),
        (
            "up.lua",
            "require('..secret')\n",
            "a module name is identifiers",
        ),
        (
            "abs.lua",
            "require('/etc/passwd')\n",
            "a module name is identifiers",
        ),
        ("missing.lua", "require('nope')\n", "no module"),
    ];
    for (file, text, expect) in cases {
        let err = error_of(&graph_dir, file, text, &limits);
        assert!(err.contains(expect), "{file}: {err}");
        assert!(
            err.starts_with(&graph_dir.join(file).display().to_string()),
            "{file}: {err}"
        );
    }
    // A link that leads out of the graph's folder is refused too.
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(dir.join("secret.lua"), graph_dir.join("sub/escape.lua"))
            .unwrap();
        let err = error_of(&graph_dir, "link.lua", "require('sub.escape')\n", &limits);
        assert!(err.contains("outside the graph's folder"), "{err}");
    }
    // A host may widen the sandbox on purpose.
    let path = graph_dir.join("io_ok.lua");
    std::fs::write(
        &path,
        "assert(io.open ~= nil and os.time() > 0)\nnode('n', 'RandomNoise', {})\n",
    )
    .unwrap();
    let wide = LuaLimits {
        allow_io_os: true,
        ..LuaLimits::default()
    };
    Graph::from_file_with(&path, &wide).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn errors_point_at_the_lua_file_and_line_including_modules() {
    let dir = common::temp_dir("lua-errors");
    std::fs::create_dir_all(dir.join("parts")).unwrap();
    std::fs::write(
        dir.join("parts/blocks.lua"),
        "local M = {}\nfunction M.noise(id)\n  return node(id, 'RandomNoize', {seed = 1})\nend\nfunction M.broken()\n  local x = nil\n  return x.y\nend\nreturn M\n",
    )
    .unwrap();
    let main = dir.join("main.lua");
    std::fs::write(
        &main,
        "local b = require('parts.blocks')\nlocal n = b.noise('a')\nnode('img', 'NoiseToImage', {latent = n.noise, scael = 0.2})\noutput('x', n)\n",
    )
    .unwrap();
    // Builder errors: a whole node where a port is expected.
    let err = error_of(
        &dir,
        "main.lua",
        &std::fs::read_to_string(&main).unwrap(),
        &LuaLimits::default(),
    );
    assert_eq!(
        err,
        format!(
            "{}:4:1: error: output 'x' must be a node's port (node.port), found userdata",
            main.display()
        )
    );
    // Validation errors: the misspelt type in the module, the misspelt input in the script.
    std::fs::write(&main, "local b = require('parts.blocks')\nlocal n = b.noise('a')\nnode('img', 'NoiseToImage', {latent = n.noise, scael = 0.2})\n").unwrap();
    let g = Graph::from_file(&main).unwrap_or_else(|e| panic!("{e}"));
    let diags = g.plan(&runtime(), &[]).unwrap_err().to_string();
    let module = dir.join("parts/blocks.lua").display().to_string();
    assert!(
        diags.contains(&format!(
            "{module}:3:1: error: node 'a': unknown node type 'RandomNoize'"
        )),
        "{diags}"
    );
    assert!(
        diags.contains(&format!("{}:3:1: error: node 'img'", main.display())),
        "{diags}"
    );
    assert!(diags.contains("scael"), "{diags}");
    // A runtime error inside a module points into the module.
    let err = error_of(
        &dir,
        "main.lua",
        "local b = require('parts.blocks')\nb.broken()\n",
        &LuaLimits::default(),
    );
    assert!(
        err.starts_with(&format!(
            "{module}:7:1: error: attempt to index a nil value"
        )),
        "{err}"
    );
    // A wrong argument to the API names the function.
    let err = error_of(
        &dir,
        "main.lua",
        "local b = 1\nnode('a', 'RandomNoise', 5)\n",
        &LuaLimits::default(),
    );
    assert!(
        err.starts_with(&format!(
            "{}:2:1: error: bad argument #3 to 'node'",
            main.display()
        )),
        "{err}"
    );
    // A syntax error.
    let err = error_of(&dir, "main.lua", "local x = = 1\n", &LuaLimits::default());
    assert!(
        err.starts_with(&format!("{}:1:1: error:", main.display())),
        "{err}"
    );
}

const LUA_NODES_YAML: &str = r#"version: 1
lua_nodes:
  Template:
    doc: "a prompt from a subject and a style"
    inputs: {subject: String, style: String, n: Int}
    outputs: {prompt: String, count: Int, sizes: List<Int>, half: Float}
    code: |
      local sizes = {}
      for i = 1, n do sizes[i] = 32 * i end
      return {prompt = "a " .. style .. " " .. subject, count = #subject, sizes = sizes, half = n / 2}
nodes:
  t: {type: Template, inputs: {subject: circle, style: red, n: 3}}
  f: {type: FormatString, inputs: {template: "{a} / {b}", a: t.prompt, b: t.count}}
outputs:
  text: f.text
  sizes: t.sizes
  half: t.half
"#;

const LUA_NODES_LUA: &str = r#"
lua_node("Template", {
  doc = "a prompt from a subject and a style",
  inputs = "subject: String, style: String, n: Int",
  outputs = "prompt: String, count: Int, sizes: List<Int>, half: Float",
  code = [[
local sizes = {}
for i = 1, n do sizes[i] = 32 * i end
return {prompt = "a " .. style .. " " .. subject, count = #subject, sizes = sizes, half = n / 2}
]],
})
local t = node("t", "Template", {subject = "circle", style = "red", n = 3})
local f = node("f", "FormatString", {template = "{a} / {b}", a = t.prompt, b = t.count})
output("text", f.text)
output("sizes", t.sizes)
output("half", t.half)
"#;

fn run_outputs(session: &Session, g: &Graph) -> Vec<(String, String)> {
    let report = session
        .run(g, &[], &RunOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(report.ok(), "{:?}", report.failed);
    report
        .outputs
        .iter()
        .map(|(n, v)| (n.clone(), format!("{v:?}")))
        .collect()
}

#[test]
fn lua_nodes_compute_typed_outputs_the_same_from_yaml_and_lua() {
    let rt = runtime();
    let dir = common::temp_dir("lua-nodes");
    let from_yaml =
        Graph::from_yaml(LUA_NODES_YAML, "nodes.yaml", &dir).unwrap_or_else(|e| panic!("{e}"));
    let from_lua = Graph::from_lua(LUA_NODES_LUA, "nodes.lua", &dir, &LuaLimits::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let a = run_outputs(&Session::new(rt.clone()), &from_yaml);
    let b = run_outputs(&Session::new(rt.clone()), &from_lua);
    assert_eq!(a, b);
    let text = |name: &str| a.iter().find(|(n, _)| n == name).unwrap().1.clone();
    assert_eq!(
        text("text"),
        format!("{:?}", Value::string("a red circle / 6"))
    );
    assert_eq!(
        text("sizes"),
        format!(
            "{:?}",
            Value::list([Value::Int(32), Value::Int(64), Value::Int(96)])
        )
    );
    assert_eq!(text("half"), format!("{:?}", Value::Float(1.5)));
    // The node's schema is part of the graph: ports with their types.
    let plan = from_yaml.plan(&rt, &[]).unwrap();
    let t = &plan.nodes[plan.node_index("t").unwrap()].ty;
    assert_eq!(t.doc, "a prompt from a subject and a style");
    assert_eq!(
        t.outputs
            .iter()
            .map(|p| p.ty.to_string())
            .collect::<Vec<_>>(),
        ["String", "Int", "List<Int>", "Float"]
    );
}

#[test]
fn a_lua_node_body_may_be_a_function_of_the_script() {
    let rt = runtime();
    let dir = common::temp_dir("lua-nodes-fn");
    let with_fn = LUA_NODES_LUA.replace(
        "  code = [[\nlocal sizes = {}\nfor i = 1, n do sizes[i] = 32 * i end\nreturn {prompt = \"a \" .. style .. \" \" .. subject, count = #subject, sizes = sizes, half = n / 2}\n]],",
        "  fn = function(inp)\n    local sizes = {}\n    for i = 1, inp.n do sizes[i] = 32 * i end\n    return {prompt = \"a \" .. inp.style .. \" \" .. inp.subject, count = #inp.subject, sizes = sizes, half = inp.n / 2}\n  end,",
    );
    assert_ne!(with_fn, LUA_NODES_LUA);
    let from_fn = Graph::from_lua(&with_fn, "fn.lua", &dir, &LuaLimits::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let from_yaml = Graph::from_yaml(LUA_NODES_YAML, "nodes.yaml", &dir).unwrap();
    assert_eq!(
        run_outputs(&Session::new(rt.clone()), &from_fn),
        run_outputs(&Session::new(rt), &from_yaml)
    );
    // A function that uses the script's locals cannot run on its own: refused, located.
    let err = match Graph::from_lua(
        "local k = 2\nlua_node('N', {inputs = 'x: Int', outputs = 'y: Int', fn = function(i) return i.x * k end})\n",
        "upvalue.lua",
        &dir,
        &LuaLimits::default(),
    ) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("refused"),
    };
    assert!(
        err.starts_with("upvalue.lua:2:1:") && err.contains("local variables from outside"),
        "{err}"
    );
}

#[test]
fn editing_a_lua_node_body_reruns_it_and_only_it() {
    let rt = runtime();
    let dir = common::temp_dir("lua-nodes-edit");
    let session = Session::new(rt);
    let g1 = Graph::from_yaml(LUA_NODES_YAML, "nodes.yaml", &dir).unwrap();
    let r1 = session.run(&g1, &[], &RunOptions::default()).unwrap();
    assert_eq!(r1.executed.len(), 2);
    let r2 = session.run(&g1, &[], &RunOptions::default()).unwrap();
    assert_eq!((r2.executed.len(), r2.cached.len()), (0, 2));
    let g2 = Graph::from_yaml(
        &LUA_NODES_YAML.replace("\"a \" ..", "\"one \" .."),
        "nodes.yaml",
        &dir,
    )
    .unwrap();
    let r3 = session.run(&g2, &[], &RunOptions::default()).unwrap();
    assert_eq!(
        r3.executed.len(),
        2,
        "the body changed: the node and its consumer re-run"
    );
    assert_eq!(
        &*r3.output("text").unwrap().to_string(),
        "one red circle / 6"
    );
}

#[test]
fn lua_node_errors_are_located_and_sandboxed() {
    let rt = runtime();
    let dir = common::temp_dir("lua-nodes-errors");
    let graph = |code: &str, outputs: &str| {
        format!(
            "version: 1\nlua_nodes:\n  N:\n    inputs: {{x: Float}}\n    outputs: {outputs}\n    code: |\n      {code}\nnodes:\n  n: {{type: N, inputs: {{x: 1.0}}}}\n"
        )
    };
    // A syntax error is a graph error at the code.
    let g = Graph::from_yaml(&graph("return x *+", "{y: Float}"), "syntax.yaml", &dir).unwrap();
    let e = g.plan(&rt, &[]).unwrap_err().to_string();
    assert!(
        e.starts_with("syntax.yaml:7:") && e.contains("unexpected symbol"),
        "{e}"
    );
    // An unsupported port type, a clash with a plugin's node type.
    let g = Graph::from_yaml(&graph("return x", "{y: Model}"), "types.yaml", &dir).unwrap();
    let e = g.plan(&rt, &[]).unwrap_err().to_string();
    assert!(e.contains("output 'y' is a Model"), "{e}");
    let g = Graph::from_yaml(
        &graph("return x", "{y: Float}")
            .replace("  N:", "  FormatString:")
            .replace("type: N,", "type: FormatString,"),
        "clash.yaml",
        &dir,
    )
    .unwrap();
    let e = g.plan(&rt, &[]).unwrap_err().to_string();
    assert!(e.contains("has the name of a node type from plugin"), "{e}");
    // Run-time failures are the node's failure, with the reason.
    let session = Session::new(rt.clone());
    for (code, outputs, expect) in [
        (
            "return x * nil",
            "{y: Float}",
            "attempt to perform arithmetic on a nil value",
        ),
        (
            "return 'text'",
            "{y: Float}",
            "output 'y': expected Float, found string text",
        ),
        (
            "return {z = 1}",
            "{y: Float, z: Float}",
            "no value for output 'y'",
        ),
        ("return io.open('/etc/passwd')", "{y: Float}", "global 'io'"),
        ("while true do end", "{y: Float}", "instruction budget"),
    ] {
        let g = Graph::from_yaml(&graph(code, outputs), "run.yaml", &dir).unwrap();
        let report = session
            .run(&g, &[], &RunOptions::default())
            .unwrap_or_else(|e| panic!("{code}: {e}"));
        assert_eq!(report.failed.len(), 1, "{code}");
        assert!(
            report.failed[0].error.contains(expect),
            "{code}: {}",
            report.failed[0].error
        );
    }
}
