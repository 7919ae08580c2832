#![cfg(feature = "cuda")]
//! The tensor-core paths of the CUDA backend (`--tensor-cores`), in a test binary of their own
//! because the setting holds for the whole process: attention on mma.sync in bf16, linear
//! layers with bf16 and f16 weights in their own type, f32 GEMMs in TF32, each against the CPU's
//! f32 op. Skipped where no GPU is found; the kernels' NVRTC compilation is checked in
//! `tests/cuda.rs` on every machine.

mod common;
#[path = "common/gpu_checks.rs"]
mod gpu_checks;

use ditflow::kernels::cpu::Activation;
use ditflow::kernels::{cuda_available, set_tensor_cores, tensor_cores};
use ditflow::tensor::ops;
use ditflow::tensor::{DType, Device, Tensor};
use gpu_checks::{r, rel};

#[test]
fn tensor_core_paths_match_the_cpu_within_bf16_precision() {
    set_tensor_cores(true);
    assert!(tensor_cores());
    if let Err(why) = cuda_available(0) {
        eprintln!("skipped: {why}");
        return;
    }
    let dev = Device::Cuda(0);
    let m = |t: &Tensor| t.to_device(dev).unwrap();
    // Attention: (b, h, lq, lk, d) over both kernels (head sizes padded to 64 and to 128),
    // partial query and key tiles. Tolerance 3e-2: q, k, v and the weights are rounded to bf16
    // (8 bits of mantissa), the sums are f32.
    for (b, h, lq, lk, d) in [
        (1, 1, 1, 1, 64),
        (1, 2, 100, 130, 64),
        (2, 3, 70, 200, 128),
        (1, 2, 65, 64, 72),
        (1, 1, 5, 3, 40),
    ] {
        let (q, k, v) = (
            r(&[b, h, lq, d], 1),
            r(&[b, h, lk, d], 2),
            r(&[b, h, lk, d], 3),
        );
        let cpu = ops::attention(&q, &k, &v, None, None).unwrap();
        let got = ops::attention(&m(&q), &m(&k), &m(&v), None, None).unwrap();
        let e = rel(&got, &cpu);
        eprintln!("attention {:?}: {e:.2e}", (b, h, lq, lk, d));
        assert!(
            e < 3e-2,
            "attention {:?}: relative error {e}",
            (b, h, lq, lk, d)
        );
    }
    // An additive mask: key 0 hidden from every query, and query 2 sees nothing (zeros).
    let (lq, lk, d) = (3, 70, 64);
    let (q, k, v) = (
        r(&[1, 1, lq, d], 4),
        r(&[1, 1, lk, d], 5),
        r(&[1, 1, lk, d], 6),
    );
    let mut mask = vec![0f32; lq * lk];
    mask[0] = f32::NEG_INFINITY;
    mask[lk] = f32::NEG_INFINITY;
    mask[2 * lk..].fill(f32::NEG_INFINITY);
    let mask = Tensor::from_f32(&[1, 1, lq, lk], &mask).unwrap();
    let cpu = ops::attention(&q, &k, &v, Some(&mask), None).unwrap();
    let got = ops::attention(&m(&q), &m(&k), &m(&v), Some(&m(&mask)), None).unwrap();
    let e = rel(&got, &cpu);
    assert!(e < 3e-2, "masked attention: relative error {e}");
    let row2 = &got.to_f32_vec().unwrap()[2 * d..];
    assert!(
        row2.iter().all(|&x| x == 0.0),
        "a fully masked row gives zeros: {row2:?}"
    );
    // Linear with bf16 and f16 weights read as stored, bias and GELU (tanh): x rounded to the
    // weight's type. Tolerance 2e-2.
    let (x, b) = (r(&[1, 70, 256], 7), r(&[96], 8));
    for dtype in [DType::BF16, DType::F16] {
        let w = ops::cast(&r(&[96, 256], 9), dtype).unwrap();
        let cpu = ops::linear(&x, &w, Some(&b), Activation::GeluTanh).unwrap();
        let got = ops::linear(&m(&x), &m(&w), Some(&m(&b)), Activation::GeluTanh).unwrap();
        let e = rel(&got, &cpu);
        eprintln!("linear, {} weight: {e:.2e}", dtype.name());
        assert!(
            e < 2e-2,
            "linear with a {} weight: relative error {e}",
            dtype.name()
        );
    }
    // f32 GEMMs in TF32 (10 bits of mantissa): tolerance 1e-2.
    let (a, bm) = (r(&[130, 300], 10), r(&[300, 70], 11));
    let cpu = ops::matmul(&a, &bm, false, false).unwrap();
    let got = ops::matmul(&m(&a), &m(&bm), false, false).unwrap();
    let e = rel(&got, &cpu);
    eprintln!("matmul in TF32: {e:.2e}");
    assert!(e < 1e-2, "matmul in TF32: relative error {e}");
}

#[test]
fn every_tiny_model_forward_with_tensor_cores_stays_near_the_cpu() {
    // End to end, each parity fixture on the GPU with tensor cores against the CPU's f32.
    // Tolerance 5e-2 of the output's largest value: bf16 operands (8 bits of mantissa) in
    // attention and TF32 in the GEMMs, over a few layers.
    set_tensor_cores(true);
    if let Err(why) = cuda_available(0) {
        eprintln!("skipped: {why}");
        return;
    }
    gpu_checks::every_model_matches_the_cpu(Device::Cuda(0), 5e-2, "with tensor cores");
}
