#![cfg(feature = "cuda")]
//! bf16/f16 activations on CUDA (`--gpu-activations`), in a test binary of their own because the
//! setting holds for the whole process: each op whose kernels read and write half activations
//! against the CPU op on the same half inputs (the CPU widens, computes in f32 and narrows, which
//! the half kernels must reproduce), and every tiny model's forward with its activations in bf16
//! and in f16 against the CPU's f32. Skipped where no GPU is found; the kernels' NVRTC
//! compilation is checked in `tests/cuda.rs` on every machine.

mod common;
#[path = "common/gpu_checks.rs"]
mod gpu_checks;

use ditflow::kernels::cpu::Activation;
use ditflow::kernels::{cuda_available, gpu_activations, set_gpu_activations};
use ditflow::tensor::ops::{self, Binary, Unary};
use ditflow::tensor::{DType, Device, Tensor};
use gpu_checks::{r, rel};

/// `f` on half CPU inputs and on the same inputs on the GPU: the GPU result stays in the half
/// type, on the GPU, within `tol` of the CPU's.
fn check(name: &str, dtype: DType, tol: f64, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor) {
    let dev = Device::Cuda(0);
    let cpu = f(inputs);
    let moved: Vec<Tensor> = inputs.iter().map(|t| t.to_device(dev).unwrap()).collect();
    let got = f(&moved);
    assert_eq!(got.device(), dev, "{name}");
    assert_eq!(
        got.dtype(),
        dtype,
        "{name}: the result keeps the activation type"
    );
    assert_eq!(got.shape(), cpu.shape(), "{name}");
    let e = rel(&got, &cpu);
    eprintln!("{name} in {}: {e:.2e}", dtype.name());
    assert!(
        e <= tol,
        "{name} in {}: relative error {e} > {tol}",
        dtype.name()
    );
}

#[test]
fn half_activation_kernels_match_the_cpu_on_the_same_half_inputs() {
    if let Err(why) = cuda_available(0) {
        eprintln!("skipped: {why}");
        return;
    }
    // Both sides round once from f32 sums, so they differ by at most one unit in the last
    // place where the sums' order differs: tolerance 2e-2 for bf16 (8 bits of mantissa),
    // 2e-3 for f16 (11 bits).
    for (dt, tol) in [(DType::BF16, 2e-2), (DType::F16, 2e-3)] {
        let h = |shape: &[usize], seed: u64| ops::cast(&r(shape, seed), dt).unwrap();
        let (x, y) = (h(&[2, 37, 96], 1), h(&[2, 37, 96], 2));
        let (w96, b96) = (r(&[96], 3), r(&[96], 4));
        let (shift, scale, gate) = (r(&[2, 96], 5), r(&[2, 96], 6), r(&[2, 96], 7));
        check("linear", dt, tol, &[x.clone(), h(&[80, 96], 8)], |t| {
            ops::linear(&t[0], &t[1], None, Activation::None).unwrap()
        });
        check(
            "linear + bias + gelu",
            dt,
            tol,
            &[x.clone(), h(&[80, 96], 8), r(&[80], 9)],
            |t| ops::linear(&t[0], &t[1], Some(&t[2]), Activation::Gelu).unwrap(),
        );
        check(
            "layer_norm modulated",
            dt,
            tol,
            &[x.clone(), shift.clone(), scale.clone()],
            |t| {
                let p = ops::LayerNorm {
                    shift: Some(&t[1]),
                    scale: Some(&t[2]),
                    eps: 1e-6,
                    ..Default::default()
                };
                ops::layer_norm(&t[0], p).unwrap()
            },
        );
        check(
            "layer_norm affine",
            dt,
            tol,
            &[x.clone(), w96.clone(), b96.clone()],
            |t| {
                let p = ops::LayerNorm {
                    weight: Some(&t[1]),
                    bias: Some(&t[2]),
                    eps: 1e-5,
                    ..Default::default()
                };
                ops::layer_norm(&t[0], p).unwrap()
            },
        );
        check("rms_norm", dt, tol, &[x.clone(), w96.clone()], |t| {
            ops::rms_norm(&t[0], Some(&t[1]), 1e-6).unwrap()
        });
        check("softmax", dt, tol, std::slice::from_ref(&x), |t| {
            ops::softmax(&t[0], -1).unwrap()
        });
        check("unary silu", dt, tol, std::slice::from_ref(&x), |t| {
            ops::unary(&t[0], Unary::Act(Activation::Silu)).unwrap()
        });
        check("affine", dt, tol, std::slice::from_ref(&x), |t| {
            ops::affine(&t[0], 0.5, 1.0).unwrap()
        });
        check("binary, both half", dt, tol, &[x.clone(), y.clone()], |t| {
            ops::binary(&t[0], &t[1], Binary::Add).unwrap()
        });
        check(
            "binary, f32 modulation",
            dt,
            tol,
            &[x.clone(), r(&[2, 1, 96], 10)],
            |t| ops::binary(&t[0], &t[1], Binary::Mul).unwrap(),
        );
        check(
            "gated_residual",
            dt,
            tol,
            &[x.clone(), y.clone(), gate.clone()],
            |t| ops::gated_residual(&t[0], &t[1], &t[2]).unwrap(),
        );
        // Attention over the tiled kernel (head size 40) and the wide one (160); the
        // tensor-core kernels are in `tests/cuda_tensor_cores.rs`.
        for d in [40, 160] {
            check(
                &format!("attention d={d}"),
                dt,
                tol,
                &[
                    h(&[1, 2, 33, d], 11),
                    h(&[1, 2, 45, d], 12),
                    h(&[1, 2, 45, d], 13),
                ],
                |t| ops::attention(&t[0], &t[1], &t[2], None, None).unwrap(),
            );
        }
    }
}

#[test]
fn every_tiny_model_forward_with_half_activations_stays_near_the_cpu() {
    if let Err(why) = cuda_available(0) {
        eprintln!("skipped: {why}");
        return;
    }
    // End to end, each parity fixture on the GPU with its blocks' activations in bf16, then in
    // f16, against the CPU's f32: tolerance 8e-2 (bf16) and 2e-2 (f16) of the output's largest
    // value, the rounding of every op's output over a few layers.
    for (dt, tol) in [(DType::BF16, 8e-2), (DType::F16, 2e-2)] {
        set_gpu_activations(dt).unwrap();
        assert_eq!(gpu_activations(), dt);
        gpu_checks::every_model_matches_the_cpu(
            Device::Cuda(0),
            tol,
            &format!("with {} activations", dt.name()),
        );
    }
    set_gpu_activations(DType::F32).unwrap();
}

#[test]
fn the_setting_takes_f32_bf16_and_f16_and_names_what_it_refuses() {
    use ditflow::kernels::parse_gpu_activations;
    assert_eq!(parse_gpu_activations("bf16"), Ok(DType::BF16));
    assert_eq!(parse_gpu_activations(" FP16 "), Ok(DType::F16));
    assert_eq!(parse_gpu_activations("float32"), Ok(DType::F32));
    let e = parse_gpu_activations("f8").unwrap_err();
    assert!(e.contains("'f8'") && e.contains("bf16"), "{e}");
    let e = set_gpu_activations(DType::I64).unwrap_err();
    assert!(e.contains("i64"), "{e}");
}
