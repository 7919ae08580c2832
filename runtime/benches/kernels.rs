//! Kernel benchmark: GEMM, attention and layer norm + modulate on the CPU (and CUDA when present),
//! printing one JSON line per measurement. `tools/bench_kernels.py` runs it beside PyTorch and
//! prints the ratios; run alone with `cargo bench -p ditflow --bench kernels [FILTER]`.
//! `--cuda-only` skips the CPU; `--bf16` gives attention bf16 inputs (on CUDA its kernels read
//! them as they are); `--tensor-cores` as the CLI takes it.

use ditflow::tensor::ops::{self, LayerNorm};
use ditflow::tensor::{Device, Tensor};
use std::time::Instant;

/// The fastest of enough repetitions of `f` to fill about `budget` seconds (the minimum is the
/// least noisy estimate on a shared machine; the PyTorch side uses the same rule).
fn time(budget: f64, mut f: impl FnMut()) -> f64 {
    f();
    let t0 = Instant::now();
    f();
    let one = t0.elapsed().as_secs_f64().max(1e-6);
    let reps = ((budget / one) as usize).clamp(3, 200);
    let mut ts: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    ts.sort_by(f64::total_cmp);
    ts[0]
}

fn randn(shape: &[usize], seed: u64, device: Device) -> Tensor {
    ops::randn(shape, seed, device).expect("randn")
}

/// `t` (f32, on the CPU) memory-mapped from a file of its own, as a loaded weight is.
fn mapped(t: &Tensor) -> Tensor {
    let bytes: Vec<u8> = t
        .to_f32_vec()
        .unwrap()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let path = std::env::temp_dir().join(format!("ditflow-bench-{}.bin", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    // SAFETY: the file is this benchmark's own and is not changed while mapped.
    let map = std::sync::Arc::new(unsafe { memmap2::Mmap::map(&file) }.unwrap());
    let _ = std::fs::remove_file(&path);
    Tensor::from_mapped(t.dtype(), t.shape(), &map, 0, bytes.len()).unwrap()
}

/// Times `x·wᵀ + b` then tanh-GELU for an `m×k` input and `n×k` weights `ws` used in turn,
/// and prints the fastest with its FLOP rate.
fn time_linear(
    budget: f64,
    name: &str,
    dev: Device,
    (m, k, n): (usize, usize, usize),
    ws: &[Tensor],
) {
    let x = randn(&[1, m, k], 1, dev);
    let b = randn(&[n], 3, dev);
    let mut turn = 0;
    let s = time(budget, || {
        turn = (turn + 1) % ws.len();
        let y = ops::linear(
            &x,
            &ws[turn],
            Some(&b),
            ditflow::kernels::cpu::Activation::GeluTanh,
        );
        sync(&y.unwrap())
    });
    let gflops = 2.0 * (m * n * k) as f64 / s / 1e9;
    println!(
        "{{\"bench\":\"{name}\",\"device\":\"{dev}\",\"seconds\":{s:.6},\"gflops\":{gflops:.1}}}"
    );
}

fn sync(t: &Tensor) {
    // A 1-element readback waits for the device.
    let _ = ops::slice(&t.reshaped(&[t.numel()]).unwrap(), 0, 0, 1, 1)
        .unwrap()
        .to_vec::<f32>();
}

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let want = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let flag = |name: &str| std::env::args().any(|a| a == name);
    let half = flag("--bf16");
    if flag("--tensor-cores") {
        ditflow::kernels::set_tensor_cores(true);
    }
    // Attention inputs in bf16 under `--bf16`.
    let act = |t: Tensor| {
        if half {
            ops::cast(&t, ditflow::tensor::DType::BF16).unwrap()
        } else {
            t
        }
    };
    let mut devices = vec![Device::Cpu];
    if flag("--cuda-only") {
        devices.clear();
    }
    if ditflow::kernels::cuda_available(0).is_ok() {
        devices.push(Device::Cuda(0));
    }
    for dev in devices {
        let budget = if dev == Device::Cpu { 1.0 } else { 0.3 };
        for (m, k, n) in [
            (1024, 1024, 1024),
            (2048, 2048, 2048),
            (256, 384, 1536),
            (256, 1536, 384),
        ] {
            let name = format!("gemm_{m}x{k}x{n}");
            if !want(&name) {
                continue;
            }
            let a = randn(&[m, k], 1, dev);
            let b = randn(&[k, n], 2, dev);
            let s = time(budget, || sync(&ops::matmul(&a, &b, false, false).unwrap()));
            let gflops = 2.0 * (m * n * k) as f64 / s / 1e9;
            println!("{{\"bench\":\"{name}\",\"device\":\"{dev}\",\"seconds\":{s:.6},\"gflops\":{gflops:.1}}}");
        }
        // The last three are Flux's at real width: the MLP input, a single block's output and a
        // fused q, k, v.
        for (m, k, n) in [
            (256, 384, 1536),
            (256, 1536, 384),
            (256, 384, 384),
            (1024, 3072, 12288),
            (1536, 15360, 3072),
            (1024, 3072, 9216),
            // Wan2.1-1.3B's at 1950 video tokens: q/k/v, the fused q, k, v, and the MLP.
            (1950, 1536, 1536),
            (1950, 1536, 4608),
            (1950, 1536, 8960),
            (1950, 8960, 1536),
            // PixArt-Σ's at 1024 image tokens: the fused q, k, v, a projection, the MLP, and the
            // caption's k, v.
            (1024, 1152, 3456),
            (1024, 1152, 1152),
            (1024, 1152, 4608),
            (1024, 4608, 1152),
            (120, 1152, 2304),
        ] {
            let name = format!("linear_{m}x{k}x{n}");
            if !want(&name) {
                continue;
            }
            let w = randn(&[n, k], 2, dev);
            time_linear(budget, &name, dev, (m, k, n), &[w]);
        }
        // PixArt-Σ's linears with the weight memory-mapped, as a loaded model's are: packed once
        // on first use, then read as packed.
        for (m, k, n) in [
            (1024, 1152, 3456),
            (1024, 1152, 1152),
            (1024, 1152, 4608),
            (1024, 4608, 1152),
        ] {
            let name = format!("linear_packed_{m}x{k}x{n}");
            if dev != Device::Cpu || !want(&name) {
                continue;
            }
            time_linear(
                budget,
                &name,
                dev,
                (m, k, n),
                &[mapped(&randn(&[n, k], 2, dev))],
            );
        }
        // The same with eight weights used in turn (more than the caches hold), as a forward
        // meets each weight once: the cost of reading packed panels from memory.
        for (m, k, n) in [(1024, 1152, 4608), (1024, 4608, 1152)] {
            let name = format!("linear_packed_cold_{m}x{k}x{n}");
            if dev != Device::Cpu || !want(&name) {
                continue;
            }
            let ws: Vec<Tensor> = (0..8)
                .map(|i| mapped(&randn(&[n, k], 10 + i, dev)))
                .collect();
            time_linear(budget, &name, dev, (m, k, n), &ws);
        }
        // The same Flux shapes with bf16 weights (converted while packed, per call).
        for (m, k, n) in [(1024, 3072, 12288), (1536, 15360, 3072)] {
            let name = format!("linear_bf16_{m}x{k}x{n}");
            if !want(&name) {
                continue;
            }
            let x = randn(&[1, m, k], 1, dev);
            let w = ops::cast(&randn(&[n, k], 2, dev), ditflow::tensor::DType::BF16).unwrap();
            let s = time(budget, || {
                sync(&ops::linear(&x, &w, None, ditflow::kernels::cpu::Activation::None).unwrap())
            });
            let gflops = 2.0 * (m * n * k) as f64 / s / 1e9;
            println!("{{\"bench\":\"{name}\",\"device\":\"{dev}\",\"seconds\":{s:.6},\"gflops\":{gflops:.1}}}");
        }
        for l in [256, 1024, 4096] {
            let name = format!("attention_h6_d64_l{l}");
            if !want(&name) {
                continue;
            }
            let q = act(randn(&[1, 6, l, 64], 3, dev));
            let k = act(randn(&[1, 6, l, 64], 4, dev));
            let v = act(randn(&[1, 6, l, 64], 5, dev));
            let s = time(budget, || {
                sync(&ops::attention(&q, &k, &v, None, None).unwrap())
            });
            println!("{{\"bench\":\"{name}\",\"device\":\"{dev}\",\"seconds\":{s:.6}}}");
        }
        // Flux's attention at 4096 tokens (24 heads of 128), on a GPU.
        let name = "attention_h24_d128_l4096";
        if dev != Device::Cpu && want(name) {
            let (q, k, v) = (
                act(randn(&[1, 24, 4096, 128], 3, dev)),
                act(randn(&[1, 24, 4096, 128], 4, dev)),
                act(randn(&[1, 24, 4096, 128], 5, dev)),
            );
            let s = time(budget, || {
                sync(&ops::attention(&q, &k, &v, None, None).unwrap())
            });
            let gflops = 4.0 * (24 * 4096 * 4096 * 128usize) as f64 / s / 1e9;
            println!("{{\"bench\":\"{name}\",\"device\":\"{dev}\",\"seconds\":{s:.6},\"gflops\":{gflops:.1}}}");
        }
        // PixArt-Σ's self- and cross-attention (16 heads of 72, 1024 image and 120 caption
        // tokens), with the FLOP rate of the two products.
        for (name, lk) in [
            ("attention_h16_d72_l1024", 1024),
            ("attention_cross_h16_d72_q1024_k120", 120),
        ] {
            if !want(name) {
                continue;
            }
            let q = act(randn(&[1, 16, 1024, 72], 3, dev));
            let k = act(randn(&[1, 16, lk, 72], 4, dev));
            let v = act(randn(&[1, 16, lk, 72], 5, dev));
            let s = time(budget, || {
                sync(&ops::attention(&q, &k, &v, None, None).unwrap())
            });
            let gflops = 4.0 * (16 * 1024 * lk * 72) as f64 / s / 1e9;
            println!("{{\"bench\":\"{name}\",\"device\":\"{dev}\",\"seconds\":{s:.6},\"gflops\":{gflops:.1}}}");
        }
        let name = "attention_cross_h6_d64_q256_k16";
        if want(name) {
            let q = randn(&[1, 6, 256, 64], 3, dev);
            let k = randn(&[1, 6, 16, 64], 4, dev);
            let v = randn(&[1, 6, 16, 64], 5, dev);
            let s = time(budget, || {
                sync(&ops::attention(&q, &k, &v, None, None).unwrap())
            });
            println!("{{\"bench\":\"{name}\",\"device\":\"{dev}\",\"seconds\":{s:.6}}}");
        }
        let name = "permute_256x6x64";
        if want(name) {
            let x = randn(&[1, 256, 6, 64], 3, dev);
            let s = time(budget, || sync(&ops::permute(&x, &[0, 2, 1, 3]).unwrap()));
            println!("{{\"bench\":\"{name}\",\"device\":\"{dev}\",\"seconds\":{s:.6}}}");
        }
        let name = "layernorm_modulate_b2_l1024_d1152";
        if want(name) {
            let x = randn(&[2, 1024, 1152], 6, dev);
            let shift = randn(&[2, 1, 1152], 7, dev);
            let scale = randn(&[2, 1, 1152], 8, dev);
            let p = LayerNorm {
                shift: Some(&shift),
                scale: Some(&scale),
                eps: 1e-6,
                ..Default::default()
            };
            let s = time(budget, || sync(&ops::layer_norm(&x, p).unwrap()));
            println!("{{\"bench\":\"{name}\",\"device\":\"{dev}\",\"seconds\":{s:.6}}}");
        }
    }
}
