//! Feature-cache benchmark (`cargo bench -p ditflow --bench caches`): text to image with the
//! bundled demo model (20 steps, CFG 4), the tiny PixArt pipeline fixture, and tiny random SD3
//! (4 joint blocks, CFG 4) and Flux (2 double + 4 single blocks, distilled guidance) models,
//! uncached and under each cache patch. For each method it prints the model evaluations per image, the
//! block-stack evaluations computed and reused (from the caches' run summaries), the sampling
//! wall time as a ratio to uncached in the same run, and the PSNR of the decoded image against
//! the uncached one. Prints numbers; asserts nothing.

#[path = "../../tests/common/mod.rs"]
mod common;

use ditflow::{Graph, RunOptions, Runtime, Session, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The log lines the caches write, captured.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// `(computed, reused)` summed over the summaries logged since the last call.
    fn take_counts(&self) -> (usize, usize) {
        let text =
            String::from_utf8_lossy(&std::mem::take(&mut *self.0.lock().unwrap())).into_owned();
        let mut total = (0, 0);
        for line in text.lines() {
            let Some(i) = line.find("block-stack evaluations computed, ") else {
                continue;
            };
            let num = |s: &str| {
                s.trim()
                    .split(' ')
                    .next_back()
                    .and_then(|n| n.parse::<usize>().ok())
            };
            let computed = num(&line[..i]).unwrap_or(0);
            let reused = line[i..]
                .split(", ")
                .nth(1)
                .and_then(|s| s.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            total.0 += computed;
            total.1 += reused;
        }
        total
    }
}

/// The model family of a case: how its graph loads the model and encodes the prompt.
enum Family {
    PixArt,
    /// Text encoders from this folder (a pipeline fixture).
    Sd3(PathBuf),
    Flux(PathBuf),
}

struct Case {
    name: &'static str,
    family: Family,
    dir: PathBuf,
    prompt: &'static str,
    size: usize,
    downscale: usize,
    scheduler: &'static str,
}

/// The nodes that load the model (`dm`) and make `pos` and `neg`, the latent's channels and
/// Sample's extra inputs.
fn family_nodes(case: &Case) -> (String, usize, &'static str) {
    let d = |p: &str| case.dir.join(p).to_string_lossy().into_owned();
    let prompt = case.prompt;
    match &case.family {
        Family::PixArt => (
            format!(
                "  te: {{type: LoadTextEncoder, inputs: {{path: {te:?}}}}}\n  dm: {{type: LoadDiffusionModel, inputs: {{path: {tr:?}}}}}\n  pos: {{type: TextEncode, inputs: {{encoder: te.encoder, text: {prompt:?}}}}}\n  neg: {{type: TextEncode, inputs: {{encoder: te.encoder, text: \"\"}}}}\n",
                te = d("text_encoder"),
                tr = d("transformer"),
            ),
            4,
            "sampler: auto, cfg: 4.0",
        ),
        Family::Sd3(enc) => {
            let e = |p: &str| enc.join(p).to_string_lossy().into_owned();
            let encode = |name: &str, text: &str| format!("  {name}: {{type: SD3TextEncode, inputs: {{clip_l: l.encoder, clip_g: g.encoder, t5: t5.encoder, text: {text:?}, t5_tokens: 16}}}}\n");
            (
                format!(
                    "  dm: {{type: LoadSD3, inputs: {{path: {tr:?}}}}}\n  l: {{type: LoadTextEncoder, inputs: {{path: {l:?}}}}}\n  g: {{type: LoadTextEncoder, inputs: {{path: {g:?}}}}}\n  t5: {{type: LoadTextEncoder, inputs: {{path: {t5:?}}}}}\n{}{}",
                    encode("pos", prompt),
                    encode("neg", ""),
                    tr = d("transformer"),
                    l = e("text_encoder"),
                    g = e("text_encoder_2"),
                    t5 = e("text_encoder_3"),
                ),
                16,
                "sampler: flow_euler, flow_sigmas: scheduler, cfg: 4.0",
            )
        }
        Family::Flux(enc) => {
            let e = |p: &str| enc.join(p).to_string_lossy().into_owned();
            let encode = |name: &str, text: &str| format!("  {name}: {{type: FluxTextEncode, inputs: {{clip: clip.encoder, t5: t5.encoder, text: {text:?}, t5_tokens: 16}}}}\n");
            (
                format!(
                    "  dm: {{type: LoadFlux, inputs: {{path: {tr:?}}}}}\n  clip: {{type: LoadTextEncoder, inputs: {{path: {c:?}}}}}\n  t5: {{type: LoadTextEncoder, inputs: {{path: {t5:?}}}}}\n{}{}",
                    encode("pos", prompt),
                    encode("neg", ""),
                    tr = d("transformer"),
                    c = e("text_encoder"),
                    t5 = e("text_encoder_2"),
                ),
                16,
                "sampler: flow_euler, cfg: 1.0, guidance: 3.5",
            )
        }
    }
}

fn graph(case: &Case, patch: &str, seed: u64, decode: bool) -> String {
    let d = |p: &str| case.dir.join(p).to_string_lossy().into_owned();
    let model = if patch.is_empty() {
        "dm.model"
    } else {
        "p.model"
    };
    let patch = if patch.is_empty() {
        String::new()
    } else {
        format!("  p: {{type: {patch}}}\n").replace("MODEL", "dm.model")
    };
    let (nodes, channels, sampling) = family_nodes(case);
    let mut y = format!(
        "version: 1\nnodes:\n{nodes}{patch}  lat: {{type: EmptyLatent, inputs: {{width: {s}, height: {s}, channels: {channels}, downscale: {ds}}}}}\n  s: {{type: Sample, inputs: {{model: {model}, positive: pos.conditioning, negative: neg.conditioning, latent: lat.latent, {sampling}, scheduler_config: {sc:?}, steps: 20, seed: {seed}}}}}\n",
        s = case.size,
        ds = case.downscale,
        sc = d(case.scheduler),
    );
    if decode {
        y += &format!(
            "  vae: {{type: LoadVAE, inputs: {{path: {:?}}}}}\n  dec: {{type: VAEDecode, inputs: {{vae: vae.vae, latent: s.latent}}}}\noutputs:\n  image: dec.image\n",
            d("vae")
        );
    } else {
        y += "outputs:\n  latent: s.latent\n";
    }
    y
}

fn run(session: &Session, yaml: &str) -> ditflow::RunReport {
    let g = Graph::from_yaml(yaml, "bench.yaml", Path::new(".")).expect("graph");
    let r = session
        .run(
            &g,
            &[],
            &RunOptions {
                workers: 1,
                out_dir: std::env::temp_dir(),
                ..RunOptions::default()
            },
        )
        .expect("valid graph");
    assert!(r.ok(), "{:?}", r.failed);
    r
}

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Tensor(_, t) => t.to_f32_vec().unwrap(),
        other => panic!("expected a tensor, got {other:?}"),
    }
}

fn main() {
    let captured = Captured::default();
    let sink = captured.clone();
    tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .init();
    let rt = Runtime::new();
    for lib in common::std_plugins() {
        rt.load_plugin_file(&lib).expect("plugin loads");
    }
    let rt = Arc::new(rt);
    let cases = [
        Case {
            name: "demo PixArt (6 blocks, 16x16 latent)",
            family: Family::PixArt,
            dir: common::repo().join("models/demo"),
            prompt: "a large red circle in the center on a blue background",
            size: 64,
            downscale: 4,
            scheduler: "scheduler/scheduler_config.json",
        },
        Case {
            name: "tiny PixArt fixture (2 blocks, 8x8 latent)",
            family: Family::PixArt,
            dir: common::repo().join("tests/fixtures/parity/pipeline"),
            prompt: "a red circle",
            size: 64,
            downscale: 8,
            scheduler: "scheduler_euler/scheduler_config.json",
        },
        Case {
            name: "tiny random SD3 (4 joint blocks, 16x16 latent; the caches span all blocks)",
            family: Family::Sd3(common::repo().join("tests/fixtures/parity/sd3_pipeline")),
            dir: common::repo().join("tests/fixtures/parity/sd3_controlnet"),
            prompt: "a red circle on a blue background",
            size: 32,
            downscale: 2,
            scheduler: "../sd3_pipeline/scheduler/scheduler_config.json",
        },
        Case {
            name: "tiny random Flux (2 double + 4 single blocks, 16x16 latent; the caches span the double blocks)",
            family: Family::Flux(common::repo().join("tests/fixtures/parity/flux_pipeline")),
            dir: common::repo().join("tests/fixtures/parity/flux_controlnet"),
            prompt: "a red circle on a blue background",
            size: 32,
            downscale: 2,
            scheduler: "../flux_pipeline/scheduler/scheduler_config.json",
        },
    ];
    let methods = [
        "",
        "FirstBlockCache, inputs: {model: MODEL, threshold: 0.05}",
        "FirstBlockCache, inputs: {model: MODEL, threshold: 0.1}",
        "FirstBlockCache, inputs: {model: MODEL, threshold: 0.2}",
        "TeaCache, inputs: {model: MODEL, threshold: 0.1}",
        "TeaCache, inputs: {model: MODEL, threshold: 0.3}",
        "TaylorSeer, inputs: {model: MODEL, interval: 2, order: 1, warmup: 3}",
        "TaylorSeer, inputs: {model: MODEL, interval: 3, order: 1, warmup: 3}",
        "TaylorSeer, inputs: {model: MODEL, interval: 3, order: 2, warmup: 3}",
    ];
    let seeds = [0u64, 1, 2, 3];
    let reps = 3;
    for case in &cases {
        let session = Session::new(rt.clone());
        // Load and warm up every model once.
        run(&session, &graph(case, "", 99, true));
        println!(
            "\n{} — 20 steps, {}, {} seeds, best of {reps}",
            case.name,
            family_nodes(case).2,
            seeds.len()
        );
        println!(
            "  {:<58} {:>6} {:>9} {:>7} {:>8} {:>9}",
            "method", "evals", "computed", "reused", "time", "PSNR dB"
        );
        let mut base_time = 0.0;
        let mut base_images: Vec<Vec<f32>> = Vec::new();
        for (mi, method) in methods.iter().enumerate() {
            let mut time = 0.0;
            let mut psnrs = Vec::new();
            let mut counts = (0, 0);
            for (si, &seed) in seeds.iter().enumerate() {
                let mut best = f64::INFINITY;
                for rep in 0..reps {
                    // A fresh session input each rep: a different seed offset keeps Sample from
                    // coming out of the cache, then the decode graph reuses the last sample.
                    let yaml = graph(case, method, seed + 1000 * rep as u64, false);
                    captured.take_counts();
                    let t = Instant::now();
                    run(&session, &yaml);
                    best = best.min(t.elapsed().as_secs_f64());
                    let c = captured.take_counts();
                    if rep == 0 {
                        counts.0 += c.0;
                        counts.1 += c.1;
                    }
                }
                time += best;
                let image = floats(
                    run(&session, &graph(case, method, seed, true))
                        .output("image")
                        .unwrap(),
                );
                captured.take_counts();
                if mi == 0 {
                    base_images.push(image);
                } else {
                    psnrs.push(common::psnr(&image, &base_images[si]));
                }
            }
            if mi == 0 {
                base_time = time;
            }
            let label = if method.is_empty() {
                "uncached".to_string()
            } else {
                method
                    .replace("inputs: {model: MODEL, ", "")
                    .replace('}', "")
            };
            let n = seeds.len();
            let psnr_text = if psnrs.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1}", psnrs.iter().sum::<f64>() / psnrs.len() as f64)
            };
            let (computed, reused) = if mi == 0 {
                (20, 0)
            } else {
                (counts.0 / n, counts.1 / n)
            };
            println!(
                "  {:<58} {:>6} {:>9} {:>7} {:>7.2}x {:>9}",
                label,
                20,
                computed,
                reused,
                time / base_time,
                psnr_text
            );
            std::io::stdout().flush().ok();
        }
        println!(
            "  uncached sampling time: {:.1} ms per image",
            base_time * 1e3 / seeds.len() as f64
        );
    }
}
