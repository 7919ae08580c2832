//! The model protocol across plugins: a denoiser written in C (`plugins/examples/c/
//! gmm_denoiser.c`) and one in Rust in the test kit are sampled by the standard library's
//! `Sample`; patches from the test kit (a third plugin) apply to them and to PixArt, and a patch
//! written in C (`residual_patch.c`) to PixArt; the feature caches keep the atomic rule; bad
//! combinations and failing hooks are clear errors.
//!
//! Reference: the Gaussian-mixture denoisers are exact, so Sample's flow-matching Euler
//! trajectory is recomputed here in float64 from the same Philox noise; tolerance 1e-4 of the
//! largest value (f32 arithmetic over 30 steps).

mod common;

use ditflow::{Graph, RunOptions, Runtime, Session, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn session(with_c: bool) -> (Session, PathBuf) {
    let rt = Runtime::new();
    for lib in common::std_plugins() {
        rt.load_plugin_file(&lib).unwrap();
    }
    rt.load_plugin_file(&common::plugin_lib("ditflow_testkit"))
        .unwrap();
    // A folder per session: the tests run in parallel, and each builds and writes its own.
    static SESSIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = common::temp_dir(&format!("protocol-{n}"));
    if with_c {
        for source in [
            "plugins/examples/c/gmm_denoiser.c",
            "plugins/examples/c/residual_patch.c",
        ] {
            let lib = common::build_c_plugin(source, &dir);
            rt.load_plugin_file(&lib).unwrap();
        }
    }
    (Session::new(Arc::new(rt)), dir)
}

/// Runs `yaml` and returns output `x` as f32s, or the failure messages.
fn run(session: &Session, dir: &Path, yaml: &str) -> Result<(Vec<usize>, Vec<f32>), String> {
    let g = Graph::from_yaml(yaml, "protocol.yaml", dir).map_err(|e| e.to_string())?;
    let report = session
        .run(
            &g,
            &[],
            &RunOptions {
                out_dir: dir.to_path_buf(),
                ..RunOptions::default()
            },
        )
        .map_err(|e| e.to_string())?;
    if !report.ok() {
        return Err(format!("{:?}", report.failed));
    }
    let Value::Tensor(_, t) = &**report.output("x").unwrap() else {
        panic!("a tensor")
    };
    Ok((t.shape().to_vec(), t.to_f32_vec().unwrap()))
}

const MEANS: [f64; 2] = [-1.0, 1.0];
const STD: f64 = 0.1;
const STEPS: usize = 30;
const SEED: u64 = 5;

/// The exact mixture velocity for one row, in float64.
fn velocity(x: &[f64], t: f64) -> Vec<f64> {
    let (a, s2) = (1.0 - t, STD * STD);
    let var = a * a * s2 + t * t;
    let logr: Vec<f64> = MEANS
        .iter()
        .map(|&mu| -0.5 * x.iter().map(|&v| (v - a * mu).powi(2)).sum::<f64>() / var)
        .collect();
    let best = logr.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = logr.iter().map(|l| (l - best).exp()).collect();
    let total: f64 = w.iter().sum();
    x.iter()
        .map(|&v| {
            MEANS
                .iter()
                .zip(&w)
                .map(|(&mu, &wk)| wk / total * ((t - a * s2) * (v - a * mu) / var - mu))
                .sum()
        })
        .collect()
}

/// Flow-matching Euler over the mixture from seed `SEED`, with the prediction times `factor`.
fn reference(shape: &[usize], factor: f64) -> Vec<f64> {
    let n: usize = shape.iter().product();
    let mut noise = vec![0f32; n];
    ditflow::tensor::rng::fill_randn(SEED, &mut noise);
    let mut x: Vec<f64> = noise.iter().map(|&v| v as f64).collect();
    let mut sigmas: Vec<f64> = (0..STEPS)
        .map(|i| 1.0 + (1.0 / STEPS as f64 - 1.0) * i as f64 / (STEPS - 1) as f64)
        .collect();
    sigmas.push(0.0);
    let row = n / shape[0];
    for w in sigmas.windows(2) {
        for r in x.chunks_mut(row) {
            let v = velocity(r, w[0]);
            for (xi, vi) in r.iter_mut().zip(v) {
                *xi += (w[1] - w[0]) * factor * vi;
            }
        }
    }
    x
}

fn gmm_graph(denoiser: &str, patches: &str, model: &str) -> String {
    format!(
        "version: 1\nnodes:\n  gmm: {{type: {denoiser}, inputs: {{channels: 4, means: \"-1;1\", std: {STD}}}}}\n{patches}  lat: {{type: EmptyLatent, inputs: {{width: 8, height: 8, channels: 4, downscale: 2, batch: 3}}}}\n  s: {{type: Sample, inputs: {{model: {model}, latent: lat.latent, sampler: flow_euler, steps: {STEPS}, cfg: 1.0, seed: {SEED}}}}}\noutputs:\n  x: s.latent\n"
    )
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
    eprintln!("{what}: max error {err:.2e} of {scale:.3}");
    assert!(err <= 1e-4 * scale, "{what}: max error {err} of {scale}");
}

#[test]
fn c_and_rust_denoisers_from_other_plugins_are_sampled_by_sample() {
    let (session, dir) = session(true);
    for denoiser in ["GaussianMixtureDenoiser", "RustGaussianDenoiser"] {
        let (shape, x) = run(&session, &dir, &gmm_graph(denoiser, "", "gmm.model")).unwrap();
        assert_eq!(shape, [3, 4, 4, 4]);
        assert_close(&x, &reference(&shape, 1.0), denoiser);
        // Each sample landed on one component: its mean is near ±1.
        for row in x.chunks(64) {
            let m = row.iter().map(|&v| v as f64).sum::<f64>() / 64.0;
            assert!((m.abs() - 1.0).abs() < 0.1, "{denoiser}: row mean {m}");
        }
    }
}

#[test]
fn a_patch_from_a_third_plugin_applies_to_both_denoisers() {
    let (session, dir) = session(true);
    let patch = "  p: {type: ScalePrediction, inputs: {model: gmm.model, factor: 0.5}}\n";
    for denoiser in ["GaussianMixtureDenoiser", "RustGaussianDenoiser"] {
        let (shape, x) = run(&session, &dir, &gmm_graph(denoiser, patch, "p.model")).unwrap();
        assert_close(
            &x,
            &reference(&shape, 0.5),
            &format!("{denoiser} scaled by 0.5"),
        );
    }
}

#[test]
fn a_block_patch_on_a_model_without_blocks_is_refused_naming_both() {
    let (session, dir) = session(true);
    let patch = "  p: {type: AddResidual, inputs: {model: gmm.model, value: 1.0}}\n";
    let err = run(
        &session,
        &dir,
        &gmm_graph("GaussianMixtureDenoiser", patch, "p.model"),
    )
    .unwrap_err();
    assert!(
        err.contains("AddResidual(1)")
            && err.contains("ditflow-testkit")
            && err.contains("block residuals")
            && err.contains("c-gmm.denoiser"),
        "{err}"
    );
}

#[test]
fn a_hook_that_fails_or_panics_mid_sampling_is_the_node_error() {
    let (session, dir) = session(false);
    for (panic, says) in [(false, "fails at step 3"), (true, "panicked")] {
        let patch = format!(
            "  p: {{type: FailingHook, inputs: {{model: gmm.model, at: 3, panic: {panic}}}}}\n"
        );
        let err = run(
            &session,
            &dir,
            &gmm_graph("RustGaussianDenoiser", &patch, "p.model"),
        )
        .unwrap_err();
        assert!(
            err.contains("'FailingHook' from plugin 'ditflow-testkit'")
                && err.contains(says)
                && err.contains("\"s\""),
            "{err}"
        );
    }
    // The session is still usable.
    run(
        &session,
        &dir,
        &gmm_graph("RustGaussianDenoiser", "", "gmm.model"),
    )
    .unwrap();
}

fn demo_graph(patches: &str, model: &str) -> String {
    let demo = common::repo().join("models/demo");
    format!(
        "version: 1\nnodes:\n  te: {{type: LoadTextEncoder, inputs: {{path: {te:?}}}}}\n  pos: {{type: TextEncode, inputs: {{encoder: te.encoder, text: \"a large red circle in the center on a blue background\"}}}}\n  dm: {{type: LoadDiffusionModel, inputs: {{path: {tr:?}}}}}\n{patches}  lat: {{type: EmptyLatent, inputs: {{width: 64, height: 64, channels: 4, downscale: 4}}}}\n  s: {{type: Sample, inputs: {{model: {model}, positive: pos.conditioning, latent: lat.latent, sampler: flow_euler, steps: 6, cfg: 1.0, seed: 3}}}}\noutputs:\n  x: s.latent\n",
        te = demo.join("text_encoder").to_string_lossy(),
        tr = demo.join("transformer").to_string_lossy(),
    )
}

#[test]
fn block_residuals_on_pixart_follow_their_strength_gates_and_sum() {
    // References computed here: relations that hold exactly (bit-exact) or up to f32 rounding
    // (1e-5 of the largest value) between patched and unpatched runs of the demo PixArt.
    let (session, dir) = session(false);
    let base = run(&session, &dir, &demo_graph("", "dm.model")).unwrap().1;
    let one = |inputs: &str| {
        format!("  p: {{type: AddResidual, inputs: {{model: dm.model, {inputs}}}}}\n")
    };
    // A zero residual, or one gated to a branch that is not sampled (cfg 1 has no unconditional
    // rows), leaves the output bit-exact.
    for inputs in [
        "value: 0.0",
        "value: 0.3, branch: uncond",
        "value: 0.3, strength: 0.0",
    ] {
        let x = run(&session, &dir, &demo_graph(&one(inputs), "p.model"))
            .unwrap()
            .1;
        assert_eq!(x, base, "{inputs}");
    }
    // A residual changes the output; strength scales it: (0.2, strength 0.5) == (0.1, 1).
    let a = run(
        &session,
        &dir,
        &demo_graph(
            &one("value: 0.2, strength: 0.5, first: 2, last: 3"),
            "p.model",
        ),
    )
    .unwrap()
    .1;
    let b = run(
        &session,
        &dir,
        &demo_graph(&one("value: 0.1, first: 2, last: 3"), "p.model"),
    )
    .unwrap()
    .1;
    assert_ne!(a, base);
    assert_close(
        &a,
        &b.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        "strength 0.5",
    );
    // Two patches sum: +0.1 then -0.1 on the same blocks gives the base back.
    let two = format!(
        "{}  q: {{type: AddResidual, inputs: {{model: p.model, value: -0.1, first: 2, last: 3}}}}\n",
        one("value: 0.1, first: 2, last: 3")
    );
    let c = run(&session, &dir, &demo_graph(&two, "q.model")).unwrap().1;
    assert_close(
        &c,
        &base.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        "+0.1 then -0.1",
    );
    // Gated to the second half of the steps: the first half runs unpatched, so it differs from
    // the always-on patch.
    let late = run(
        &session,
        &dir,
        &demo_graph(&one("value: 0.1, first: 2, last: 3, start: 0.5"), "p.model"),
    )
    .unwrap()
    .1;
    assert_ne!(late, b);
    assert_ne!(late, base);
}

#[test]
fn caches_that_never_reuse_are_transparent_and_reuse_stays_close() {
    // Reference: the unpatched demo run. A cache whose gate never opens runs the same blocks in
    // the same order through the continuation: bit-exact. One that reuses changes the output,
    // but little (6 steps: relative error under 10% of the largest value).
    let (session, dir) = session(false);
    let base = run(&session, &dir, &demo_graph("", "dm.model")).unwrap().1;
    let cache = |node: &str| format!("  p: {{type: {node}}}\n");
    for never in [
        "FirstBlockCache, inputs: {model: dm.model, threshold: 0.0}",
        "TeaCache, inputs: {model: dm.model, threshold: 0.0}",
        "TaylorSeer, inputs: {model: dm.model, interval: 1, warmup: 1}",
    ] {
        let x = run(&session, &dir, &demo_graph(&cache(never), "p.model"))
            .unwrap()
            .1;
        assert_eq!(x, base, "{never}");
    }
    let scale = base.iter().fold(0f32, |m, v| m.max(v.abs()));
    for reuse in [
        "FirstBlockCache, inputs: {model: dm.model, threshold: 0.2}",
        "TeaCache, inputs: {model: dm.model, threshold: 0.2}",
        "TaylorSeer, inputs: {model: dm.model, interval: 2, warmup: 2}",
    ] {
        let x = run(&session, &dir, &demo_graph(&cache(reuse), "p.model"))
            .unwrap()
            .1;
        let err = x
            .iter()
            .zip(&base)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{reuse}: max error {err:.3e} of {scale:.3}");
        assert!(x != base && err < 0.1 * scale, "{reuse}: {err} of {scale}");
    }
}

#[test]
fn a_cache_holds_the_block_residuals_inside_its_range_once() {
    // The atomic rule. AddResidual on blocks 2..=5 fails if it is computed at step 1 or later:
    // under a cache that reuses every step after the first, it is never asked for again (the
    // cached residual holds it), so sampling succeeds; a cache that never reuses computes it
    // at step 1 and fails there.
    let (session, dir) = session(false);
    let residual = "  r: {type: AddResidual, inputs: {model: dm.model, value: 0.05, first: 2, fail_from: 1}}\n";
    let with = |threshold: f64| {
        format!("{residual}  p: {{type: FirstBlockCache, inputs: {{model: r.model, threshold: {threshold}}}}}\n")
    };
    let held = run(&session, &dir, &demo_graph(&with(10.0), "p.model"))
        .unwrap()
        .1;
    let err = run(&session, &dir, &demo_graph(&with(0.0), "p.model")).unwrap_err();
    assert!(err.contains("computed for block 2 at step 1"), "{err}");
    // The reused residual holds the injection: without it the cached run differs.
    let plain = run(
        &session,
        &dir,
        &demo_graph(
            "  p: {type: FirstBlockCache, inputs: {model: dm.model, threshold: 10.0}}\n",
            "p.model",
        ),
    )
    .unwrap()
    .1;
    assert_ne!(held, plain);
    // A residual that must be fresh at every step is refused under a cache, naming both.
    let fresh = "  r: {type: AddResidual, inputs: {model: dm.model, value: 0.05, first: 2, fresh: true}}\n  p: {type: TaylorSeer, inputs: {model: r.model}}\n";
    let err = run(&session, &dir, &demo_graph(fresh, "p.model")).unwrap_err();
    assert!(
        err.contains("TaylorSeer") && err.contains("AddResidual(0.05)") && err.contains("skip"),
        "{err}"
    );
    // A cache needs a block stack: the Gaussian mixture has none.
    let err = run(
        &session,
        &dir,
        &gmm_graph(
            "RustGaussianDenoiser",
            "  p: {type: FirstBlockCache, inputs: {model: gmm.model}}\n",
            "p.model",
        ),
    )
    .unwrap_err();
    assert!(err.contains("block stack"), "{err}");
    // A bridge needs two streams: PixArt has one.
    let err = run(
        &session,
        &dir,
        &demo_graph(
            "  p: {type: NoOpBridge, inputs: {model: dm.model}}\n",
            "p.model",
        ),
    )
    .unwrap_err();
    assert!(
        err.contains("NoOpBridge") && err.contains("two streams"),
        "{err}"
    );
}

#[test]
fn a_patch_written_in_c_applies_to_pixart_like_its_rust_twin() {
    // Reference: the test kit's AddResidual computes the same residual in Rust, so the two runs
    // are bit-exact.
    let (session, dir) = session(true);
    let c = run(
        &session,
        &dir,
        &demo_graph(
            "  p: {type: ConstantResidual, inputs: {model: dm.model, value: 0.1, first: 2, last: 3}}\n",
            "p.model",
        ),
    )
    .unwrap()
    .1;
    let rust = run(
        &session,
        &dir,
        &demo_graph(
            "  p: {type: AddResidual, inputs: {model: dm.model, value: 0.1, first: 2, last: 3}}\n",
            "p.model",
        ),
    )
    .unwrap()
    .1;
    let base = run(&session, &dir, &demo_graph("", "dm.model")).unwrap().1;
    assert_eq!(c, rust);
    assert_ne!(c, base);
    // Its range is checked by the host like any patch's.
    let err = run(
        &session,
        &dir,
        &demo_graph(
            "  p: {type: ConstantResidual, inputs: {model: dm.model, value: 0.1, first: 7}}\n",
            "p.model",
        ),
    )
    .unwrap_err();
    assert!(
        err.contains("ConstantResidual(0.1)")
            && err.contains("c-residual-patch")
            && err.contains("6 blocks"),
        "{err}"
    );
}

#[test]
fn the_sampler_plugin_can_go_first_when_values_are_dropped() {
    // Unloading order: the model value (from the nodes plugin) outlives the runtime that loaded
    // the sampler's plugin, then the patch's plugin (the test kit) is dropped after both.
    let (session, dir) = session(true);
    let g = Graph::from_yaml(
        &gmm_graph(
            "GaussianMixtureDenoiser",
            "  p: {type: ScalePrediction, inputs: {model: gmm.model, factor: 0.5}}\n",
            "p.model",
        )
        .replace(
            "outputs:\n  x: s.latent\n",
            "outputs:\n  x: s.latent\n  m: p.model\n",
        ),
        "protocol.yaml",
        &dir,
    )
    .unwrap();
    let report = session
        .run(
            &g,
            &[],
            &RunOptions {
                out_dir: dir.clone(),
                ..RunOptions::default()
            },
        )
        .unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    let model = report.output("m").unwrap().clone();
    // Drop the session and runtime (the sampler's plugin reference) first, then the model.
    drop(report);
    drop(session);
    drop(model);
}

#[test]
fn a_vae_wired_into_sample_is_a_located_validation_error() {
    // The VAE and the text encoder speak their interfaces, so their ports are typed.
    let (session, dir) = session(false);
    let vae = common::repo().join("models/demo/vae");
    let yaml = demo_graph(
        &format!(
            "  vae: {{type: LoadVAE, inputs: {{path: {:?}}}}}\n",
            vae.to_string_lossy()
        ),
        "vae.vae",
    );
    let err = run(&session, &dir, &yaml).unwrap_err();
    eprintln!("{err}");
    assert!(
        err.contains("Model<Autoencoder>")
            && err.contains("Model<Denoiser>")
            && err.contains("protocol.yaml:"),
        "{err}"
    );
}

#[test]
fn attention_hooks_on_pixart_edit_mask_and_add() {
    // References: relations that hold exactly or to f32 rounding between patched runs of the demo
    // PixArt (6 steps), and a key-length mask checked against truncated captions below.
    let (session, dir) = session(false);
    let base = run(&session, &dir, &demo_graph("", "dm.model")).unwrap().1;
    let one = |node: &str| format!("  p: {{type: {node}}}\n");
    // Zero queries or zero keys: both make every logit 0, so both give uniform attention.
    for kind in ["self", "cross"] {
        let q = run(
            &session,
            &dir,
            &demo_graph(
                &one(&format!(
                    "ZeroLogits, inputs: {{model: dm.model, kind: {kind}}}"
                )),
                "p.model",
            ),
        )
        .unwrap()
        .1;
        let k = run(
            &session,
            &dir,
            &demo_graph(
                &one(&format!(
                    "ZeroLogits, inputs: {{model: dm.model, keys: true, kind: {kind}}}"
                )),
                "p.model",
            ),
        )
        .unwrap()
        .1;
        assert_ne!(q, base, "{kind}");
        assert_close(&q, &k.iter().map(|&v| v as f64).collect::<Vec<_>>(), kind);
    }
    // An extra branch of zeros, at strength 0, or gated to a branch that is not sampled leaves
    // the output bit-exact; strength scales it exactly.
    for inputs in [
        "value: 0.0",
        "value: 0.3, strength: 0.0",
        "value: 0.3, branch: uncond",
    ] {
        let x = run(
            &session,
            &dir,
            &demo_graph(
                &one(&format!(
                    "ConstantAttention, inputs: {{model: dm.model, {inputs}}}"
                )),
                "p.model",
            ),
        )
        .unwrap()
        .1;
        assert_eq!(x, base, "{inputs}");
    }
    let half = run(
        &session,
        &dir,
        &demo_graph(
            &one("ConstantAttention, inputs: {model: dm.model, value: 0.2, strength: 0.5}"),
            "p.model",
        ),
    )
    .unwrap()
    .1;
    let full = run(
        &session,
        &dir,
        &demo_graph(
            &one("ConstantAttention, inputs: {model: dm.model, value: 0.1}"),
            "p.model",
        ),
    )
    .unwrap()
    .1;
    assert_ne!(full, base);
    assert_eq!(half, full);
}

/// Reads every tensor of a safetensors file as `(name, dtype, shape, bytes)`.
fn read_all(path: &Path) -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect()
}

fn write_all(path: &Path, tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn forward_sample(session: &Session, dir: &Path, patch: &str, io: &Path) -> Vec<f32> {
    let model = common::repo().join("tests/fixtures/lora/transformer");
    forward_sample_with(session, dir, "LoadDiffusionModel", &model, patch, io)
}

/// [`forward_sample`] of the model at `model` loaded by `loader`.
fn forward_sample_with(
    session: &Session,
    dir: &Path,
    loader: &str,
    model: &Path,
    patch: &str,
    io: &Path,
) -> Vec<f32> {
    let (patch, m) = if patch.is_empty() {
        (String::new(), "dm.model")
    } else {
        (format!("  p: {{type: {patch}}}\n"), "p.model")
    };
    let yaml = format!(
        "version: 1\nnodes:\n  dm: {{type: {loader}, inputs: {{path: {:?}}}}}\n{patch}  f: {{type: Forward, inputs: {{model: {m}, inputs: {:?}, outputs: f.safetensors}}}}\noutputs:\n  path: f.path\n",
        model.to_string_lossy(),
        io.to_string_lossy()
    );
    let g = Graph::from_yaml(&yaml, "forward.yaml", dir).unwrap();
    let report = session
        .run(
            &g,
            &[],
            &RunOptions {
                out_dir: dir.to_path_buf(),
                ..RunOptions::default()
            },
        )
        .unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    let (_, _, _, bytes) = read_all(&dir.join("f.safetensors"))
        .into_iter()
        .find(|t| t.0 == "out.sample")
        .unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn a_key_length_mask_equals_truncating_the_keys() {
    // Reference: the same forward with the captions cut to their first 2 tokens (and a mask of
    // ones); tolerance 1e-4 of the largest value (softmax over the same keys; the masked ones
    // weigh exactly 0).
    let (session, dir) = session(false);
    let io = common::repo().join("tests/fixtures/lora/io.safetensors");
    let mut cut = Vec::new();
    for (name, dtype, shape, bytes) in read_all(&io) {
        match name.as_str() {
            "in.encoder_hidden_states" => {
                let (b, l, c) = (shape[0], shape[1], shape[2]);
                let mut out = Vec::new();
                for row in 0..b {
                    out.extend_from_slice(&bytes[row * l * c * 4..(row * l + 2) * c * 4]);
                }
                cut.push((name, dtype, vec![b, 2, c], out));
            }
            "in.encoder_attention_mask" => {
                let ones: Vec<u8> = (0..shape[0] * 2).flat_map(|_| 1i64.to_le_bytes()).collect();
                cut.push((name, dtype, vec![shape[0], 2], ones));
            }
            n if n.starts_with("in.") => cut.push((name, dtype, shape, bytes)),
            _ => {}
        }
    }
    let cut_path = dir.join("cut.safetensors");
    write_all(&cut_path, &cut);
    let want = forward_sample(&session, &dir, "", &cut_path);
    let got = forward_sample(
        &session,
        &dir,
        "KeyLengthMask, inputs: {model: dm.model, length: 2, kind: cross}",
        &io,
    );
    let full = forward_sample(&session, &dir, "", &io);
    assert_ne!(full, want);
    assert_close(
        &got,
        &want.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        "key lengths 2 vs 2 tokens",
    );
}

#[test]
fn attention_hooks_on_wan_mask_its_captions_and_keep_its_rope() {
    // Wan's attention sites: a key-length mask of 3 on the cross-attention equals the forward
    // with the captions cut to 3 tokens; a mask keeping all 60 video keys on the
    // self-attention (the hooked path, with RoPE on the heads) equals the plain forward.
    // Tolerance 1e-4 of the largest value.
    let (session, dir) = session(false);
    let model = common::repo().join("tests/fixtures/parity/wan");
    let io = model.join("io.safetensors");
    let mut cut = Vec::new();
    for (name, dtype, shape, bytes) in read_all(&io) {
        match name.as_str() {
            "in.encoder_hidden_states" => {
                let (b, l, c) = (shape[0], shape[1], shape[2]);
                let mut out = Vec::new();
                for row in 0..b {
                    out.extend_from_slice(&bytes[row * l * c * 4..(row * l + 3) * c * 4]);
                }
                cut.push((name, dtype, vec![b, 3, c], out));
            }
            n if n.starts_with("in.") => cut.push((name, dtype, shape, bytes)),
            _ => {}
        }
    }
    let cut_path = dir.join("wan_cut.safetensors");
    write_all(&cut_path, &cut);
    let run =
        |patch: &str, io: &Path| forward_sample_with(&session, &dir, "LoadWan", &model, patch, io);
    let full = run("", &io);
    let want = run("", &cut_path);
    assert_ne!(full, want);
    let got = run(
        "KeyLengthMask, inputs: {model: dm.model, length: 3, kind: cross}",
        &io,
    );
    assert_close(
        &got,
        &want.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        "Wan cross mask",
    );
    let kept = run(
        "KeyLengthMask, inputs: {model: dm.model, length: 60, kind: self}",
        &io,
    );
    assert_close(
        &kept,
        &full.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        "Wan self, all keys",
    );
}

/// The `out.sample` tensor of a safetensors file, widened to f64.
fn out_sample(io: &Path) -> Vec<f64> {
    let (_, _, _, bytes) = read_all(io)
        .into_iter()
        .find(|t| t.0 == "out.sample")
        .unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .collect()
}

#[test]
fn scene_captions_give_each_scene_its_own_caption() {
    // Mask²DiT's segment mask on Wan: two scenes of 1 and 2 latent frames, captions of 3 and 4
    // tokens; against diffusers' Wan with the boolean mask passed to every cross-attention
    // (tools/make_wan_fixtures.py). Tolerance 1e-4 of the largest value. Durations that do not
    // add up are refused.
    let (session, dir) = session(false);
    let model = common::repo().join("tests/fixtures/parity/wan");
    let io = model.join("io_scenes.safetensors");
    let want = out_sample(&io);
    let run = |patch: &str| forward_sample_with(&session, &dir, "LoadWan", &model, patch, &io);
    let got = run("SceneCaptions, inputs: {model: dm.model, frames: [1, 2], tokens: [3, 4]}");
    let plain = run("");
    eprintln!(
        "got vs plain max diff {}",
        got.iter()
            .zip(&plain)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    );
    assert_close(&got, &want, "two scenes");
    assert!(plain
        .iter()
        .zip(&want)
        .any(|(a, b)| (*a as f64 - b).abs() > 1e-3));
    let yaml = format!(
        "version: 1\nnodes:\n  dm: {{type: LoadWan, inputs: {{path: {:?}}}}}\n  p: {{type: SceneCaptions, inputs: {{model: dm.model, frames: [1, 1], tokens: [3, 4]}}}}\n  f: {{type: Forward, inputs: {{model: p.model, inputs: {:?}, outputs: f.safetensors}}}}\noutputs:\n  path: f.path\n",
        model.to_string_lossy(),
        io.to_string_lossy()
    );
    let g = Graph::from_yaml(&yaml, "scenes.yaml", &dir).unwrap();
    let report = session
        .run(
            &g,
            &[],
            &RunOptions {
                out_dir: dir.clone(),
                ..RunOptions::default()
            },
        )
        .unwrap();
    let f = report.failed.first().expect("the forward fails");
    assert!(
        f.error.contains("add up") && f.error.contains("SceneCaptions"),
        "{}",
        f.error
    );
}

#[test]
fn scene_captions_on_a_joint_attention_model_use_mask2dit_s_joint_mask() {
    // Mask²DiT's joint form on SD3 (image then text in one sequence): two scenes, bands of 1 and
    // 3 token rows of the 4x4 grid, captions of 2 and 3 tokens; image tokens see all image tokens
    // and their scene's caption, caption tokens their own caption and their scene's image tokens.
    // Against diffusers' SD3 with that boolean mask at every joint attention
    // (tools/make_sd3_fixtures.py). Tolerance 1e-4 of the largest value.
    let (session, dir) = session(false);
    let model = common::repo().join("tests/fixtures/parity/sd3");
    let io = model.join("io_scenes.safetensors");
    let want = out_sample(&io);
    let run = |patch: &str| forward_sample_with(&session, &dir, "LoadSD3", &model, patch, &io);
    let got = run("SceneCaptions, inputs: {model: dm.model, frames: [1, 3], tokens: [2, 3]}");
    assert_close(&got, &want, "two regions on SD3");
    let plain = run("");
    assert!(plain
        .iter()
        .zip(&want)
        .any(|(a, b)| (*a as f64 - b).abs() > 1e-3));
}

/// `SteppedForward` of the LoRA fixture's PixArt (2 blocks) with `patch`.
fn stepped_sample(
    session: &Session,
    dir: &Path,
    patch: &str,
    split: usize,
    add: f64,
) -> Result<Vec<f32>, String> {
    let model = common::repo().join("tests/fixtures/lora/transformer");
    let io = common::repo().join("tests/fixtures/lora/io.safetensors");
    let (patch, m) = if patch.is_empty() {
        (String::new(), "dm.model")
    } else {
        (format!("  p: {{type: {patch}}}\n"), "p.model")
    };
    let yaml = format!(
        "version: 1\nnodes:\n  dm: {{type: LoadDiffusionModel, inputs: {{path: {:?}}}}}\n{patch}  s: {{type: SteppedForward, inputs: {{model: {m}, inputs: {:?}, split: {split}, add: {add}}}}}\noutputs:\n  x: s.sample\n",
        model.to_string_lossy(),
        io.to_string_lossy()
    );
    run(session, dir, &yaml).map(|r| r.1)
}

#[test]
fn a_denoiser_stepped_block_by_block_equals_its_forward() {
    // Block stepping, the protocol two separately loaded towers are bridged with: prepare, blocks
    // 0..=0, blocks 1..=1, finish gives the forward bit-exactly, with the model's patches; a
    // change to the hidden state between the ranges is a block residual there.
    let (session, dir) = session(false);
    let io = common::repo().join("tests/fixtures/lora/io.safetensors");
    let lora = common::repo().join("tests/fixtures/lora/a.safetensors");
    let lora = format!(
        "ApplyLoRA, inputs: {{model: dm.model, path: {:?}}}",
        lora.to_string_lossy()
    );
    for patch in ["", lora.as_str()] {
        let forward = forward_sample(&session, &dir, patch, &io);
        let stepped = stepped_sample(&session, &dir, patch, 1, 0.0).unwrap();
        assert_eq!(stepped, forward, "{patch}");
    }
    let residual = forward_sample(
        &session,
        &dir,
        "AddResidual, inputs: {model: dm.model, value: 0.1, first: 0, last: 0}",
        &io,
    );
    let stepped = stepped_sample(&session, &dir, "", 1, 0.1).unwrap();
    assert_eq!(stepped, residual);
    // A cache over the whole stack cannot run on half of it: refused, naming the cache.
    let err = stepped_sample(
        &session,
        &dir,
        "FirstBlockCache, inputs: {model: dm.model}",
        1,
        0.0,
    )
    .unwrap_err();
    assert!(
        err.contains("FirstBlockCache") && err.contains("cut"),
        "{err}"
    );
    // A whole-call override has no whole call to wrap when the model is stepped.
    let err = stepped_sample(
        &session,
        &dir,
        "ScalePrediction, inputs: {model: dm.model, factor: 0.5}",
        1,
        0.0,
    )
    .unwrap_err();
    assert!(
        err.contains("ScalePrediction") && err.contains("stepped"),
        "{err}"
    );
}

#[test]
fn patches_apply_to_flux_and_sd3_on_their_joint_sequences() {
    // Patched, Flux and SD3 run their blocks through the hooks on the joint sequence (Flux text
    // then image, SD3 image then text). References: the unpatched forward (bit-exact for
    // do-nothing patches, SD3.5's skipped block included) and a residual's effect, which must
    // change the output.
    let (session, dir) = session(false);
    for (loader, fixture) in [("LoadFlux", "flux_dev"), ("LoadSD3", "sd3_5")] {
        let root = common::repo().join("tests/fixtures/parity").join(fixture);
        let forward = |patch: &str, tag: &str| -> Vec<f32> {
            let (patch, m) = if patch.is_empty() {
                (String::new(), "dm.model")
            } else {
                (format!("  p: {{type: {patch}}}\n"), "p.model")
            };
            let yaml = format!(
            "version: 1\nnodes:\n  dm: {{type: {loader}, inputs: {{path: {:?}}}}}\n{patch}  f: {{type: Forward, inputs: {{model: {m}, inputs: {:?}, outputs: {tag}.safetensors}}}}\noutputs:\n  path: f.path\n",
            root.to_string_lossy(),
            root.join("io.safetensors").to_string_lossy()
        );
            let g = Graph::from_yaml(&yaml, "flux.yaml", &dir).unwrap();
            let report = session
                .run(
                    &g,
                    &[],
                    &RunOptions {
                        out_dir: dir.clone(),
                        ..RunOptions::default()
                    },
                )
                .unwrap();
            assert!(report.ok(), "{tag}: {:?}", report.failed);
            let (_, _, _, bytes) = read_all(&dir.join(format!("{tag}.safetensors")))
                .into_iter()
                .find(|t| t.0 == "out.sample")
                .unwrap();
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let base = forward("", "base");
        for (patch, tag) in [
            (
                "FirstBlockCache, inputs: {model: dm.model, threshold: 0.0}",
                "cache",
            ),
            (
                "AddResidual, inputs: {model: dm.model, value: 0.0, first: 1}",
                "zero",
            ),
            (
                "NoOpHooks, inputs: {model: dm.model, attention: false}",
                "noop",
            ),
        ] {
            assert_eq!(forward(patch, tag), base, "{fixture}: {patch}");
        }
        let residual = forward(
            "AddResidual, inputs: {model: dm.model, value: 0.1, first: 1}",
            "res",
        );
        assert_ne!(residual, base, "{fixture}");
    }
}
