//! The plugin boundary: a C plugin built by the tests is loaded and run; incompatible, malformed
//! and duplicate plugins are refused with messages naming the library, and the host goes on.

mod common;

use ditflow::plugin::PluginError;
use ditflow::{Graph, RunOptions, Runtime, Session, Value};
use std::path::Path;
use std::sync::Arc;

#[test]
fn c_example_plugin_loads_and_runs() {
    let dir = common::temp_dir("c-hello");
    let lib = common::build_c_plugin("plugins/examples/c/hello_plugin.c", &dir);
    let rt = Runtime::new();
    assert_eq!(rt.load_plugin_file(&lib).expect("loads"), 3);
    let greet = rt
        .registry()
        .get("CGreet")
        .cloned()
        .expect("CGreet registered");
    assert_eq!(greet.plugin.name, "c-hello");
    assert_eq!(greet.inputs[1].min, Some(1.0));
    let g = Graph::from_yaml(
        "version: 1\nnodes:\n  g: {type: CGreet, inputs: {name: Ada, times: 2}}\n  s: {type: CScale, inputs: {x: 1.5, factor: 4}}\noutputs:\n  text: g.text\n  y: s.y\n",
        "c.yaml",
        Path::new("."),
    )
    .unwrap();
    let session = Session::new(Arc::new(rt));
    let report = session.run(&g, &[], &RunOptions::default()).unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    assert_eq!(
        **report.output("text").unwrap(),
        Value::string("hello, Ada! hello, Ada!")
    );
    assert_eq!(**report.output("y").unwrap(), Value::Float(6.0));
}

#[test]
fn a_c_plugin_writes_a_tensor_in_place_and_calls_engine_ops() {
    let dir = common::temp_dir("c-ops");
    let lib = common::build_c_plugin("plugins/examples/c/hello_plugin.c", &dir);
    let rt = Runtime::new();
    rt.load_plugin_file(&lib).expect("loads");
    let session = Session::new(Arc::new(rt));
    let g = Graph::from_yaml(
        "version: 1\nnodes:\n  r: {type: CSoftmaxRamp, inputs: {n: 5, temperature: 2.0}}\noutputs:\n  y: r.y\n",
        "ramp.yaml",
        Path::new("."),
    )
    .unwrap();
    let report = session.run(&g, &[], &RunOptions::default()).unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    let Value::Tensor(_, y) = &**report.output("y").unwrap() else {
        panic!("a tensor")
    };
    // Reference: softmax(i / 2) in f64; tolerance 1e-6 relative.
    let z: f64 = (0..5).map(|i| (i as f64 / 2.0).exp()).sum();
    for (i, v) in y.as_f32().iter().enumerate() {
        let want = (i as f64 / 2.0).exp() / z;
        assert!(
            (*v as f64 - want).abs() < 1e-6 * want.max(1e-3),
            "{i}: {v} vs {want}"
        );
    }
}

#[test]
fn a_plugin_for_another_abi_major_is_refused_with_a_clear_message() {
    let dir = common::temp_dir("bad-abi");
    let lib = common::build_c_plugin("tests/plugins/c/bad_abi_plugin.c", &dir);
    let err = Runtime::new().load_plugin_file(&lib).expect_err("refused");
    assert!(
        matches!(err, PluginError::IncompatibleAbi { major: 2, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&lib.display().to_string()), "{msg}");
    assert!(
        msg.contains("'bad-abi'") && msg.contains("ABI 2.") && msg.contains("host speaks ABI 1.8"),
        "{msg}"
    );
}

#[test]
fn a_plugin_with_a_newer_minor_is_refused() {
    let dir = common::temp_dir("newer-minor");
    let lib = common::build_c_plugin("tests/plugins/c/newer_minor_plugin.c", &dir);
    let err = Runtime::new().load_plugin_file(&lib).expect_err("refused");
    assert!(
        err.to_string().contains("ABI 1.9") && err.to_string().contains("ABI 1.8"),
        "{err}"
    );
}

#[test]
fn malformed_libraries_are_refused_and_the_host_goes_on() {
    let dir = common::temp_dir("malformed");
    // Not a library at all.
    std::fs::write(dir.join("libgarbage.so"), b"this is not an ELF file").unwrap();
    // A library without the descriptor.
    common::build_c_plugin("tests/plugins/c/no_descriptor.c", &dir);
    // One incompatible plugin and one good one in the same folder.
    common::build_c_plugin("tests/plugins/c/bad_abi_plugin.c", &dir);
    common::build_c_plugin("plugins/examples/c/hello_plugin.c", &dir);

    let rt = Runtime::new();
    let err = rt
        .load_plugin_file(&dir.join("libgarbage.so"))
        .err()
        .unwrap();
    assert!(matches!(err, PluginError::Load { .. }), "{err:?}");
    assert!(
        err.to_string().contains("libgarbage.so") && err.to_string().contains("dlopen failed: "),
        "{err}"
    );
    let err = rt
        .load_plugin_file(&dir.join(format!(
            "{}no_descriptor{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        )))
        .err()
        .unwrap();
    assert!(matches!(err, PluginError::NotAPlugin { .. }), "{err:?}");

    let rt = Runtime::new();
    rt.load_plugin_dir(&dir);
    assert!(
        rt.registry().get("CGreet").is_some(),
        "the good plugin still loads"
    );
    let problems = rt.problems().join("\n");
    assert!(problems.contains("libgarbage.so"), "{problems}");
    assert!(problems.contains("bad_abi_plugin"), "{problems}");
    assert!(
        !problems.contains("no_descriptor"),
        "non-plugins are skipped quietly: {problems}"
    );
}

#[test]
fn two_plugins_declaring_one_node_type_is_an_error_naming_both() {
    let dir = common::temp_dir("dup");
    let src = dir.join("dup_greet.c");
    std::fs::write(
        &src,
        r#"#include "ditflow_plugin.h"
static int32_t run(void* ud, const DfHostApi* host, DfContext* ctx) { (void)ud; (void)host; (void)ctx; return DF_OK; }
static int32_t reg(const DfHostApi* host, DfRegistrar* r) {
    DfNodeDesc d = {0};
    d.size = sizeof(DfNodeDesc);
    d.type_name = "CGreet";
    d.execute = run;
    return host->register_node(r, &d);
}
DF_DEFINE_PLUGIN("dup-greet", "0.1.0", reg);
"#,
    )
    .unwrap();
    let lib = common::build_c_plugin(src.to_str().unwrap(), &dir);
    let hello = common::build_c_plugin("plugins/examples/c/hello_plugin.c", &dir);
    let rt = Runtime::new();
    rt.load_plugin_file(&hello).unwrap();
    rt.load_plugin_file(&lib).unwrap();
    let problems = rt.problems().join("\n");
    assert!(problems.contains("'CGreet'"), "{problems}");
    assert!(
        problems.contains("'c-hello'") && problems.contains("'dup-greet'"),
        "{problems}"
    );
    assert_eq!(rt.registry().get("CGreet").unwrap().plugin.name, "c-hello");
}

#[test]
fn rust_plugins_export_full_schemas() {
    let rt = Runtime::new();
    for lib in common::std_plugins() {
        rt.load_plugin_file(&lib).unwrap();
    }
    let math = rt.registry().get("Math").cloned().expect("Math");
    let op = &math.inputs[math.input_index("op").unwrap()];
    assert!(op.choices.iter().any(|c| c == "mul"));
    assert_eq!(op.default, Some(Value::string("add")));
    let json = math.to_json();
    assert_eq!(json["plugin"]["name"], "ditflow-nodes");
    assert_eq!(json["inputs"][0]["type"], "Float");
    let save = rt.registry().get("SaveImage").cloned().unwrap();
    assert!(save.side_effects && !save.cacheable);
}

#[test]
fn rust_sdk_ops_match_the_engine_called_directly() {
    use ditflow::tensor::ops::{self, LayerNorm};
    use ditflow::tensor::Device;
    let rt = Runtime::new();
    rt.load_plugin_file(&common::plugin_lib("ditflow_testkit"))
        .expect("testkit loads");
    let session = Session::new(Arc::new(rt));
    let g = Graph::from_yaml(
        "version: 1\nnodes:\n  b: {type: AdaLnBlock, inputs: {seed: 5}}\noutputs:\n  y: b.y\n",
        "block.yaml",
        Path::new("."),
    )
    .unwrap();
    let report = session.run(&g, &[], &RunOptions::default()).unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    let Value::Tensor(_, y) = &**report.output("y").unwrap() else {
        panic!("a tensor")
    };
    // The same computation through the Rust API: the same kernels, so bit-identical.
    let r = |shape: &[usize], k: u64| ops::randn(shape, 5 + k, Device::Cpu).unwrap();
    let (x, w, shift, scale, gate) = (
        r(&[2, 8, 16], 0),
        r(&[32, 16], 1),
        r(&[2, 1, 16], 2),
        r(&[2, 1, 16], 3),
        r(&[2, 1, 32], 4),
    );
    let bias: Vec<f32> = (0..32).map(|i| i as f32 * 0.01).collect();
    let bias = ditflow::tensor::Tensor::from_f32(&[32], &bias).unwrap();
    let n = ops::layer_norm(
        &x,
        LayerNorm {
            shift: Some(&shift),
            scale: Some(&scale),
            eps: 1e-6,
            ..Default::default()
        },
    )
    .unwrap();
    let h = ops::linear(
        &n,
        &w,
        Some(&bias),
        ditflow::kernels::cpu::Activation::GeluTanh,
    )
    .unwrap();
    let heads = ops::permute(&ops::reshape(&h, &[2, 8, 2, 16]).unwrap(), &[0, 2, 1, 3]).unwrap();
    let a = ops::attention(&heads, &heads, &heads, None, None).unwrap();
    let a = ops::reshape(&ops::permute(&a, &[0, 2, 1, 3]).unwrap(), &[2, 8, 32]).unwrap();
    let want = ops::gated_residual(&h, &a, &gate).unwrap();
    assert_eq!(y.shape(), &[2, 8, 32]);
    assert_eq!(y.as_f32(), want.as_f32());
}
