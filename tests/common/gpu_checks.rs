//! Helpers of the CUDA tests (included by `#[path]` beside `mod common;` in the runtime's
//! package, whose dev-dependencies have `safetensors`): errors between tensors, random inputs, a
//! session with the standard plugins, and the tiny parity models' forwards on a chosen device.
#![allow(dead_code)]

use ditflow::tensor::{ops, Device, Tensor};

/// max |a - b| / max |b| (a NaN counts as infinitely far).
pub fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-30);
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            if x.is_nan() {
                f64::INFINITY
            } else {
                (*x as f64 - *y as f64).abs()
            }
        })
        .fold(0.0, f64::max)
        / scale
}

/// Standard-normal values on the CPU.
pub fn r(shape: &[usize], seed: u64) -> Tensor {
    ops::randn(shape, seed, Device::Cpu).unwrap()
}

/// A session with the standard plugins.
pub fn session() -> ditflow::Session {
    let rt = ditflow::Runtime::new();
    for lib in crate::common::std_plugins() {
        rt.load_plugin_file(&lib).expect("plugin loads");
    }
    ditflow::Session::new(std::sync::Arc::new(rt))
}

/// Every tiny model's forward on `device` against the CPU's, within `tol` of the output's
/// largest value (`what` names the setting in the messages).
pub fn every_model_matches_the_cpu(device: Device, tol: f64, what: &str) {
    let s = session();
    for &case in PARITY_MODELS {
        let cpu = fixture_forward(&s, case, Device::Cpu, "cpu").unwrap();
        let got = fixture_forward(&s, case, device, "device").unwrap();
        let e = crate::common::relative_error(&got, &cpu);
        eprintln!("{} ({}) {what}: {e:.2e}", case.1, case.0);
        assert!(
            e < tol,
            "{} {what}: relative error {e} against the CPU (tolerance {tol})",
            case.1
        );
    }
}

/// The tiny models of `tests/fixtures/parity` with their loaders, for end-to-end comparisons
/// (on CUDA against the CPU): (loader, model folder, inputs file).
pub const PARITY_MODELS: &[(&str, &str, &str)] = &[
    ("LoadDiffusionModel", "pixart_sigma", "pixart_sigma"),
    ("LoadDiffusionModel", "pixart_alpha", "pixart_alpha"),
    ("LoadDiffusionModel", "dit", "dit"),
    ("LoadFlux", "flux_dev", "flux_dev"),
    ("LoadSD3", "sd3_5", "sd3_5"),
    ("LoadWan", "wan", "wan"),
];

/// The forward of the parity fixture `model` (loaded by `loader`) on `inputs`, run on
/// `device` through a `Forward` graph: its `out.sample`.
pub fn fixture_forward(
    session: &ditflow::Session,
    (loader, model, inputs): (&str, &str, &str),
    device: ditflow::tensor::Device,
    tag: &str,
) -> Result<Vec<f32>, String> {
    let root = crate::common::repo().join("tests/fixtures/parity");
    let out_dir = crate::common::temp_dir(&format!("forward-{tag}"));
    let yaml = format!(
        "version: 1\nnodes:\n  m: {{type: {loader}, inputs: {{path: {:?}}}}}\n  f: {{type: Forward, inputs: {{model: m.model, inputs: {:?}, outputs: out.safetensors}}}}\noutputs:\n  path: f.path\n",
        root.join(model).to_string_lossy(),
        root.join(inputs).join("io.safetensors").to_string_lossy(),
    );
    let g = ditflow::Graph::from_yaml(&yaml, "forward.yaml", std::path::Path::new("."))
        .map_err(|e| e.to_string())?;
    let opts = ditflow::RunOptions {
        out_dir: out_dir.clone(),
        device,
        ..ditflow::RunOptions::default()
    };
    let report = session.run(&g, &[], &opts).map_err(|e| e.to_string())?;
    if !report.ok() {
        return Err(format!("{tag}: {:?}", report.failed));
    }
    let bytes = std::fs::read(out_dir.join("out.safetensors")).map_err(|e| e.to_string())?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
    let t = st.tensor("out.sample").map_err(|e| e.to_string())?;
    Ok(t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect())
}
