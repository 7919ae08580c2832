//! `ApplyLoRA` against peft: a tiny PixArt with two random adapters, made by
//! `tools/make_lora_fixtures.py` in `tests/fixtures/lora/`, in the diffusers, kohya and peft
//! layouts, and random adapters on the Flux and SD3.5 parity fixtures. Tolerance: 1e-4 of the largest reference value (f32; the low-rank product is
//! summed in another order than peft's). Strength 0 and removal are compared bit-exactly with
//! ditflow's own base run. Bad LoRA files are clear errors.

mod common;

use ditflow::{Graph, RunOptions, Runtime, Session};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn session() -> Session {
    let rt = Runtime::new();
    for lib in common::std_plugins() {
        rt.load_plugin_file(&lib).expect("nodes plugin loads");
    }
    Session::new(Arc::new(rt))
}

fn fixtures() -> PathBuf {
    common::repo().join("tests/fixtures/lora")
}

fn read(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("{}: no {name}", path.display()));
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// `(file, strength, merge)` for each LoRA, applied in order.
type Loras<'a> = &'a [(&'a str, f64, bool)];

/// One Forward of the fixture model with `loras` and `model_dir`: the output, or the failures.
fn forward(session: &Session, model_dir: &Path, loras: Loras) -> Result<Vec<f32>, String> {
    // A folder per run: the tests run in parallel.
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out_dir = common::temp_dir(&format!("lora-{n}"));
    let mut yaml = format!(
        "version: 1\nnodes:\n  m0: {{type: LoadDiffusionModel, inputs: {{path: {:?}}}}}\n",
        model_dir.to_string_lossy()
    );
    for (i, (file, strength, merge)) in loras.iter().enumerate() {
        let path = if file.starts_with('/') {
            file.to_string()
        } else {
            fixtures().join(file).to_string_lossy().into_owned()
        };
        yaml += &format!(
            "  m{}: {{type: ApplyLoRA, inputs: {{model: m{i}.model, path: {path:?}, strength: {strength}, merge: {merge}}}}}\n",
            i + 1
        );
    }
    yaml += &format!(
        "  f: {{type: Forward, inputs: {{model: m{}.model, inputs: {:?}, outputs: out.safetensors}}}}\noutputs:\n  path: f.path\n",
        loras.len(),
        fixtures().join("io.safetensors").to_string_lossy()
    );
    let g = Graph::from_yaml(&yaml, "lora.yaml", Path::new(".")).map_err(|e| e.to_string())?;
    let opts = RunOptions {
        out_dir: out_dir.clone(),
        ..RunOptions::default()
    };
    let report = session.run(&g, &[], &opts).map_err(|e| e.to_string())?;
    if !report.ok() {
        return Err(format!("{:?}", report.failed));
    }
    Ok(read(&out_dir.join("out.safetensors"), "out.sample"))
}

fn model() -> PathBuf {
    fixtures().join("transformer")
}

/// The largest error relative to the largest value of peft's output `name`.
fn error_vs_peft(got: &[f32], name: &str) -> f64 {
    let want = read(&fixtures().join("io.safetensors"), &format!("out.{name}"));
    let err = common::relative_error(got, &want);
    eprintln!("{name}: relative error {err:.2e}");
    err
}

#[test]
fn both_layouts_match_peft_at_strengths_one_and_point_six() {
    let s = session();
    let base = forward(&s, &model(), &[]).unwrap();
    assert!(error_vs_peft(&base, "base") <= 1e-4);
    for file in ["a.safetensors", "a_kohya.safetensors"] {
        for (strength, want) in [(1.0, "a_1"), (0.6, "a_06")] {
            for merge in [false, true] {
                let got = forward(&s, &model(), &[(file, strength, merge)]).unwrap();
                let err = error_vs_peft(&got, want);
                assert!(err <= 1e-4, "{file} at {strength} (merge {merge}): {err}");
            }
        }
    }
}

#[test]
fn a_peft_folder_with_its_adapter_config_matches_peft() {
    // Adapter b's alpha and its alpha_pattern come from b/adapter_config.json.
    let got = forward(
        &session(),
        &model(),
        &[("b/adapter_model.safetensors", 1.0, false)],
    )
    .unwrap();
    assert!(error_vs_peft(&got, "b") <= 1e-4);
}

#[test]
fn strength_zero_is_the_base_model_bit_exactly() {
    let s = session();
    let base = forward(&s, &model(), &[]).unwrap();
    let zero = forward(&s, &model(), &[("a.safetensors", 0.0, false)]).unwrap();
    assert_eq!(zero, base);
}

#[test]
fn two_stacked_loras_match_peft_and_removing_one_restores_the_other() {
    let s = session();
    let a = forward(&s, &model(), &[("a.safetensors", 1.0, false)]).unwrap();
    let ab = forward(
        &s,
        &model(),
        &[
            ("a.safetensors", 1.0, false),
            ("b/adapter_model.safetensors", 0.6, false),
        ],
    )
    .unwrap();
    assert!(error_vs_peft(&ab, "ab") <= 1e-4);
    // The same stack in the other order sums the same deltas.
    let ba = forward(
        &s,
        &model(),
        &[
            ("b/adapter_model.safetensors", 0.6, false),
            ("a.safetensors", 1.0, true),
        ],
    )
    .unwrap();
    assert!(error_vs_peft(&ba, "ab") <= 1e-4);
    // Removing b (the graph edited in the same session, the model kept loaded) gives a back
    // bit-exactly: nothing was subtracted from the weights.
    let again = forward(&s, &model(), &[("a.safetensors", 1.0, false)]).unwrap();
    assert_eq!(again, a);
    let base = forward(&s, &model(), &[]).unwrap();
    assert!(error_vs_peft(&base, "base") <= 1e-4);
}

/// Writes f32 tensors `(name, shape)` filled with 0.01 to a safetensors file.
fn write_lora(path: &Path, tensors: &[(&str, &[usize])]) {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s)| {
            let count: usize = s.iter().product();
            let bytes = (0..count).flat_map(|_| 0.01f32.to_le_bytes()).collect();
            (n.to_string(), s.to_vec(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn bad_lora_files_are_clear_errors() {
    let s = session();
    let dir = common::temp_dir("lora-bad");
    let q = "transformer.transformer_blocks.0.attn1.to_q";
    let cases: Vec<(PathBuf, Vec<&str>)> = {
        let mut v = Vec::new();
        // Truncated: half of a real file.
        let bytes = std::fs::read(fixtures().join("a.safetensors")).unwrap();
        let p = dir.join("truncated.safetensors");
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        v.push((p, vec!["truncated.safetensors"]));
        // A LoRA for a UNet: its names match nothing here.
        let p = dir.join("unet.safetensors");
        write_lora(
            &p,
            &[
                ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight", &[4, 320]),
                ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight", &[320, 4]),
            ],
        );
        v.push((
            p,
            vec![
                "lora_unet_down_blocks_0",
                "matches no linear layer",
                "closest",
            ],
        ));
        // The right names for a wider model.
        let p = dir.join("wider.safetensors");
        let (a, b) = (format!("{q}.lora_A.weight"), format!("{q}.lora_B.weight"));
        write_lora(&p, &[(&a, &[4, 32]), (&b, &[32, 4])]);
        v.push((p, vec!["another model", "to_q"]));
        // Ranks that disagree.
        let p = dir.join("rank.safetensors");
        write_lora(&p, &[(&a, &[4, 16]), (&b, &[16, 3])]);
        v.push((p, vec!["rank mismatch", "to_q"]));
        // Half a pair.
        let p = dir.join("half.safetensors");
        write_lora(&p, &[(&a, &[4, 16])]);
        v.push((p, vec!["only one of its two"]));
        v
    };
    for (path, says) in cases {
        let p = path.to_string_lossy().into_owned();
        let err = forward(&s, &model(), &[(&p, 1.0, false)]).unwrap_err();
        for word in says {
            assert!(err.contains(word), "{}: {err}", path.display());
        }
        assert!(err.contains("\"m1\""), "names the node: {err}");
    }
    // A model without linear-delta sites (DiT) refuses a LoRA, naming what is missing.
    let dit = common::repo().join("tests/fixtures/parity/dit");
    let err = forward(&s, &dit, &[("a.safetensors", 1.0, false)]).unwrap_err();
    assert!(err.contains("no linear-delta sites"), "{err}");
    // The session still runs a good graph.
    forward(&s, &model(), &[("a.safetensors", 1.0, false)]).unwrap();
}

/// The bytes of every tensor in a safetensors file.
fn tensor_bytes(path: &Path) -> i64 {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .iter()
        .map(|(_, t)| t.data().len() as i64)
        .sum()
}

#[test]
fn model_info_counts_the_patches_and_their_memory() {
    // Reference: the LoRA files' tensor bytes, and for the merged one the f32 copies of the
    // weights it touches (b: attn1's fused qkv [48, 16], attn2's fused kv [32, 16] and ff.net.2
    // [16, 64] in each of the 2 blocks).
    let s = session();
    let a = fixtures().join("a.safetensors");
    let b = fixtures().join("b/adapter_model.safetensors");
    let yaml = format!(
        "version: 1\nnodes:\n  m0: {{type: LoadDiffusionModel, inputs: {{path: {:?}}}}}\n  m1: {{type: ApplyLoRA, inputs: {{model: m0.model, path: {:?}}}}}\n  m2: {{type: ApplyLoRA, inputs: {{model: m1.model, path: {:?}, merge: true}}}}\n  i0: {{type: ModelInfo, inputs: {{model: m0.model}}}}\n  i1: {{type: ModelInfo, inputs: {{model: m1.model}}}}\n  i2: {{type: ModelInfo, inputs: {{model: m2.model}}}}\noutputs:\n  kind: i2.kind\n  n0: i0.patches\n  n2: i2.patches\n  b0: i0.patch_bytes\n  b1: i1.patch_bytes\n  b2: i2.patch_bytes\n  d1: i1.digest\n  d2: i2.digest\n",
        model().to_string_lossy(),
        a.to_string_lossy(),
        b.to_string_lossy()
    );
    let g = Graph::from_yaml(&yaml, "info.yaml", Path::new(".")).unwrap();
    let report = s
        .run(
            &g,
            &[],
            &RunOptions {
                out_dir: common::temp_dir("lora-info"),
                ..RunOptions::default()
            },
        )
        .unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    let int = |name: &str| match &**report.output(name).unwrap() {
        ditflow::Value::Int(i) => *i,
        other => panic!("{name}: {other:?}"),
    };
    let text = |name: &str| match &**report.output(name).unwrap() {
        ditflow::Value::String(s) => s.as_str().to_string(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(text("kind"), "a denoiser");
    assert_eq!((int("n0"), int("n2")), (0, 2));
    assert_eq!(int("b0"), 0);
    assert_eq!(int("b1"), tensor_bytes(&a));
    let merged = 2 * (48 * 16 + 32 * 16 + 16 * 64) * 4;
    assert_eq!(int("b2"), tensor_bytes(&a) + tensor_bytes(&b) + merged);
    assert_ne!(text("d1"), text("d2"));
}

/// One Forward of MMDiT parity fixture `folder` (loaded by `loader`) with LoRA `file` at
/// `strength`, on the inputs of `io`.
fn mmdit_forward(loader: &str, folder: &str, io: &str, file: &str, strength: f64) -> Vec<f32> {
    let out_dir = common::temp_dir(&format!("lora-{folder}-{file}-{strength}"));
    let model = common::repo().join("tests/fixtures/parity").join(folder);
    let yaml = format!(
        "version: 1\nnodes:\n  m0: {{type: {loader}, inputs: {{path: {:?}}}}}\n  m1: {{type: ApplyLoRA, inputs: {{model: m0.model, path: {:?}, strength: {strength}}}}}\n  f: {{type: Forward, inputs: {{model: m1.model, inputs: {:?}, outputs: out.safetensors}}}}\noutputs:\n  path: f.path\n",
        model.to_string_lossy(),
        fixtures().join(file).to_string_lossy(),
        fixtures().join(io).to_string_lossy()
    );
    let g = Graph::from_yaml(&yaml, "lora.yaml", Path::new(".")).unwrap();
    let report = session()
        .run(
            &g,
            &[],
            &RunOptions {
                out_dir: out_dir.clone(),
                ..RunOptions::default()
            },
        )
        .unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    read(&out_dir.join("out.safetensors"), "out.sample")
}

#[test]
fn lora_on_flux_and_sd3_matches_peft() {
    // Adapters on the attention, MLP, modulation and embedding linears of both streams (and
    // Flux's single-stream blocks); tolerance 1e-4 of the largest value.
    for (loader, folder, name) in [
        ("LoadFlux", "flux_dev", "flux"),
        ("LoadSD3", "sd3_5", "sd3"),
    ] {
        let io = format!("{name}_io.safetensors");
        for (strength, key) in [(1.0, "a_1"), (0.6, "a_06")] {
            let got = mmdit_forward(
                loader,
                folder,
                &io,
                &format!("{name}.safetensors"),
                strength,
            );
            let want = read(&fixtures().join(&io), &format!("out.{key}"));
            let err = common::relative_error(&got, &want);
            eprintln!("{name} at {strength}: relative error {err:.2e}");
            assert!(err <= 1e-4, "{name} at {strength}: {err}");
        }
    }
}

#[test]
fn loras_in_the_original_layouts_apply_to_the_split_weights() {
    // kohya's `lora_unet_double_blocks_0_img_attn_qkv` / `lora_unet_joint_blocks_0_x_block_attn_qkv`
    // and ComfyUI's `diffusion_model.single_blocks.0.linear1` target the fused weights of BFL's
    // and Stability AI's layouts; Flux and SD3 hold diffusers' split q, k, v (and Flux's MLP
    // input), so each delta lands in its parts' rows. Reference: the deltas merged into the
    // diffusers parts, split as diffusers' converters split them (checked against diffusers'
    // kohya converter for Flux by the fixture script). Tolerance 1e-4 of the largest value.
    for (loader, folder, name) in [
        ("LoadFlux", "flux_dev", "flux"),
        ("LoadSD3", "sd3_5", "sd3"),
    ] {
        let io = format!("{name}_fused_io.safetensors");
        let want = read(&fixtures().join(&io), "out.fused");
        for layout in ["kohya", "comfy"] {
            let file = format!("{name}_{layout}.safetensors");
            let got = mmdit_forward(loader, folder, &io, &file, 1.0);
            let err = common::relative_error(&got, &want);
            eprintln!("{file}: relative error {err:.2e}");
            assert!(err <= 1e-4, "{file}: {err}");
        }
    }
}

#[test]
fn a_flux_lora_on_sd3_is_a_clear_error() {
    // The SD3.5 fixture has no single-stream blocks or x_embedder: the first such key is named,
    // with the closest layers the model has.
    let out_dir = common::temp_dir("lora-flux-on-sd3");
    let yaml = format!(
        "version: 1\nnodes:\n  m0: {{type: LoadSD3, inputs: {{path: {:?}}}}}\n  m1: {{type: ApplyLoRA, inputs: {{model: m0.model, path: {:?}}}}}\noutputs:\n  m: m1.model\n",
        common::repo().join("tests/fixtures/parity/sd3_5").to_string_lossy(),
        fixtures().join("flux.safetensors").to_string_lossy()
    );
    let g = Graph::from_yaml(&yaml, "lora.yaml", Path::new(".")).unwrap();
    let report = session()
        .run(
            &g,
            &[],
            &RunOptions {
                out_dir,
                ..RunOptions::default()
            },
        )
        .unwrap();
    let err = format!("{:?}", report.failed);
    assert!(
        err.contains("flux.safetensors")
            && err.contains("matches no linear layer")
            && err.contains("closest"),
        "{err}"
    );
}
