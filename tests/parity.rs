//! Model parity with diffusers: tiny random models of each supported class, saved with their
//! inputs and reference outputs by `tools/make_parity_fixtures.py` in `tests/fixtures/parity/`,
//! are loaded by `LoadDiffusionModel` and run by `Forward` through the plugin, and the outputs are
//! compared with diffusers' (f32, relative error ≤ 1e-4 of the largest reference value).

mod common;

use ditflow::{Graph, RunOptions, Runtime, Session};
use std::path::Path;
use std::sync::Arc;

fn session() -> Session {
    let mut rt = Runtime::new();
    rt.load_plugin_file(&common::plugin_lib("ditflow_nodes"))
        .expect("nodes plugin loads");
    Session::new(Arc::new(rt))
}

fn read(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("{}: no {name}", path.display()));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    let vals = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), vals)
}

/// Runs `Forward` on fixture `name` and returns the largest relative error over its outputs.
fn forward_error(session: &Session, name: &str, outputs: &[&str]) -> f64 {
    let (loader, port) = match name {
        "vae" => ("LoadVAE", "vae"),
        "t5" => ("LoadTextEncoder", "encoder"),
        _ => ("LoadDiffusionModel", "model"),
    };
    let dir = common::repo().join("tests/fixtures/parity").join(name);
    let out_dir = common::temp_dir(&format!("parity-{name}"));
    let yaml = format!(
        "version: 1\nnodes:\n  m: {{type: {loader}, inputs: {{path: {dir:?}}}}}\n  f: {{type: Forward, inputs: {{model: m.{port}, inputs: {io:?}, outputs: out.safetensors}}}}\noutputs:\n  path: f.path\n",
        dir = dir.to_string_lossy(),
        io = dir.join("io.safetensors").to_string_lossy(),
    );
    let g = Graph::from_yaml(&yaml, "parity.yaml", Path::new(".")).unwrap();
    let opts = RunOptions {
        out_dir: out_dir.clone(),
        ..RunOptions::default()
    };
    let report = session.run(&g, &[], &opts).unwrap();
    assert!(report.ok(), "{name}: {:?}", report.failed);
    let mut worst = 0f64;
    for out in outputs {
        let (ws, want) = read(&dir.join("io.safetensors"), &format!("out.{out}"));
        let (gs, got) = read(&out_dir.join("out.safetensors"), &format!("out.{out}"));
        assert_eq!(gs, ws, "{name}.{out} shape");
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .fold(0f64, f64::max)
            / scale;
        eprintln!("{name}.{out}: relative error {err:.2e}");
        worst = worst.max(err);
    }
    worst
}

#[test]
fn pixart_alpha_matches_diffusers() {
    // PixArt-α: resolution and aspect-ratio conditioning, a text mask with dropped tokens.
    assert!(forward_error(&session(), "pixart_alpha", &["sample"]) <= 1e-4);
}

#[test]
fn pixart_sigma_matches_diffusers() {
    // PixArt-Σ: no size conditioning, position interpolation scale 2.
    assert!(forward_error(&session(), "pixart_sigma", &["sample"]) <= 1e-4);
}

#[test]
fn dit_matches_diffusers() {
    // Class-conditional DiT, including the null class.
    assert!(forward_error(&session(), "dit", &["sample"]) <= 1e-4);
}

#[test]
fn autoencoder_kl_matches_diffusers() {
    // Encode (mean, clamped log-variance), decode, and diffusers' tiled decode with blending.
    assert!(forward_error(&session(), "vae", &["mean", "logvar", "decoded", "tiled"]) <= 1e-4);
}

#[test]
fn t5_encoder_matches_transformers() {
    // Gated-GELU T5 with relative position buckets past the exact range and padded tokens.
    assert!(forward_error(&session(), "t5", &["last_hidden_state"]) <= 1e-4);
}

#[test]
fn text_to_image_pipeline_matches_diffusers() {
    // Tokens → T5 → PixArt under DPM-Solver++(2M) with guidance → VAE, against diffusers'
    // PixArtSigmaPipeline on the same tiny models started from ditflow's Philox noise.
    // Tolerance: 1e-3 relative to the largest pixel value.
    let dir = common::repo().join("tests/fixtures/parity/pipeline");
    let io = dir.join("io.safetensors");
    // The fixture script reimplements ditflow's noise in numpy; check that first.
    let (_, noise) = read(&io, "in.noise");
    let ours = ditflow::tensor::ops::randn(&[1, 4, 8, 8], 7, ditflow::tensor::Device::Cpu).unwrap();
    assert_eq!(ours.as_f32(), &noise[..], "the fixture's noise is ditflow's");
    let yaml = format!(
        r#"version: 1
nodes:
  te: {{type: LoadTextEncoder, inputs: {{path: {d:?}}}}}
  dit: {{type: LoadDiffusionModel, inputs: {{path: {t:?}}}}}
  vae: {{type: LoadVAE, inputs: {{path: {v:?}}}}}
  pos: {{type: TextEncode, inputs: {{encoder: te.encoder, text: "a red circle on a blue background", max_tokens: 12}}}}
  neg: {{type: TextEncode, inputs: {{encoder: te.encoder, text: "", max_tokens: 12}}}}
  latent: {{type: EmptyLatent, inputs: {{width: 16, height: 16, channels: 4, downscale: 2}}}}
  sample: {{type: Sample, inputs: {{model: dit.model, positive: pos.conditioning, negative: neg.conditioning, latent: latent.latent, scheduler_config: {s:?}, steps: 6, cfg: 3.0, seed: 7}}}}
  decode: {{type: VAEDecode, inputs: {{vae: vae.vae, latent: sample.latent}}}}
outputs:
  image: decode.image
"#,
        d = dir.join("text_encoder").to_string_lossy(),
        t = dir.join("transformer").to_string_lossy(),
        v = dir.join("vae").to_string_lossy(),
        s = dir.join("scheduler/scheduler_config.json").to_string_lossy(),
    );
    let g = Graph::from_yaml(&yaml, "pipeline.yaml", Path::new(".")).unwrap();
    let report = session().run(&g, &[], &RunOptions::default()).unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    let ditflow::Value::Tensor(_, img) = &**report.output("image").unwrap() else { panic!("an image") };
    let (ws, want) = read(&io, "out.image");
    assert_eq!(img.shape(), &ws[..]);
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let err = img.as_f32().iter().zip(&want).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0f64, f64::max) / scale;
    eprintln!("pipeline image: relative error {err:.2e}");
    assert!(err <= 1e-3, "relative error {err}");
}
