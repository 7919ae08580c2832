//! Feature-cache benchmark (`cargo bench -p ditflow --bench caches`): text to image with the
//! bundled demo model (20 steps, CFG 4) and with the tiny PixArt pipeline fixture, uncached and
//! under each cache patch. For each method it prints the model evaluations per image, the
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

struct Case {
    name: &'static str,
    dir: PathBuf,
    prompt: &'static str,
    size: usize,
    downscale: usize,
    scheduler: &'static str,
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
    let mut y = format!(
        "version: 1\nnodes:\n  te: {{type: LoadTextEncoder, inputs: {{path: {te:?}}}}}\n  dm: {{type: LoadDiffusionModel, inputs: {{path: {tr:?}}}}}\n  pos: {{type: TextEncode, inputs: {{encoder: te.encoder, text: {prompt:?}}}}}\n  neg: {{type: TextEncode, inputs: {{encoder: te.encoder, text: \"\"}}}}\n{patch}  lat: {{type: EmptyLatent, inputs: {{width: {s}, height: {s}, channels: 4, downscale: {ds}}}}}\n  s: {{type: Sample, inputs: {{model: {model}, positive: pos.conditioning, negative: neg.conditioning, latent: lat.latent, sampler: auto, scheduler_config: {sc:?}, steps: 20, cfg: 4.0, seed: {seed}}}}}\n",
        te = d("text_encoder"),
        tr = d("transformer"),
        prompt = case.prompt,
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

/// PSNR of `x` against `reference`, both images in [0, 1].
fn psnr(x: &[f32], reference: &[f32]) -> f64 {
    let mse = x
        .iter()
        .zip(reference)
        .map(|(a, b)| ((a.clamp(0.0, 1.0) - b.clamp(0.0, 1.0)) as f64).powi(2))
        .sum::<f64>()
        / x.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (1.0 / mse).log10()
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
            dir: common::repo().join("models/demo"),
            prompt: "a large red circle in the center on a blue background",
            size: 64,
            downscale: 4,
            scheduler: "scheduler/scheduler_config.json",
        },
        Case {
            name: "tiny PixArt fixture (2 blocks, 8x8 latent)",
            dir: common::repo().join("tests/fixtures/parity/pipeline"),
            prompt: "a red circle",
            size: 64,
            downscale: 8,
            scheduler: "scheduler_euler/scheduler_config.json",
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
            "\n{} — 20 steps, CFG 4, {} seeds, best of {reps}",
            case.name,
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
                    psnrs.push(psnr(&image, &base_images[si]));
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
