//! End-to-end forwards of the tiny parity models on a chosen device, for the CUDA tests
//! (included by `#[path]` beside `mod common;`, in the runtime's package, whose dev-dependencies
//! have `safetensors`).
#![allow(dead_code)]

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
