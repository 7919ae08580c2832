#![cfg(feature = "cuda")]
//! The CUDA backend: every kernel compiles through NVRTC for sm_80 and sm_90 (required in CI,
//! where `.ci/run` installs libnvrtc and sets `DITFLOW_REQUIRE_NVRTC=1`), and, when a GPU is
//! present, every CUDA op matches the CPU op (`--device` on a machine without one is tested
//! with the command line, in `tests/cli.rs`).

mod common;
#[path = "common/gpu_checks.rs"]
mod gpu_checks;

use ditflow::kernels::cuda_available;
use ditflow::tensor::ops::{self, Binary, LayerNorm, Reduce, Unary, Upsample};
use ditflow::tensor::{DType, Device, Tensor};
use gpu_checks::{r, rel};

fn nvrtc_required() -> bool {
    std::env::var_os("DITFLOW_REQUIRE_NVRTC").is_some_and(|v| v == "1")
}

#[test]
fn every_kernel_compiles_with_nvrtc_for_sm80_and_sm90() {
    use ditflow::kernels::cuda::{compile_kernels, KERNEL_NAMES};
    let cache = common::temp_dir("nvrtc-cache");
    std::env::set_var("DITFLOW_CACHE_DIR", &cache);
    for arch in ["compute_80", "compute_90"] {
        match compile_kernels(arch) {
            Ok(ptx) => {
                for name in KERNEL_NAMES {
                    assert!(
                        ptx.contains(&format!(".entry {name}(")),
                        "{arch}: no kernel {name} in the PTX"
                    );
                }
                eprintln!(
                    "NVRTC compiled {} kernels for {arch} ({} bytes of PTX)",
                    KERNEL_NAMES.len(),
                    ptx.len()
                );
            }
            Err(e) if e.contains("not found") && !nvrtc_required() => {
                eprintln!("skipped: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn kernel_list_matches_the_cuda_source() {
    use ditflow::kernels::cuda::{KERNELS_CU, KERNEL_NAMES};
    let mut in_source: Vec<&str> = KERNELS_CU
        .split("extern \"C\" __global__ void ")
        .skip(1)
        .map(|rest| rest.split('(').next().unwrap().trim())
        .collect();
    let mut listed = KERNEL_NAMES.to_vec();
    in_source.sort_unstable();
    listed.sort_unstable();
    assert_eq!(in_source, listed);
}

/// The block formats with their `BF_*` codes in kernels.cu and the offsets of their f16 fields.
const BLOCK_FORMATS: &[(DType, i32, &[usize])] = &[
    (DType::Q8_0, 0, &[0]),
    (DType::Q4_0, 1, &[0]),
    (DType::Q4_1, 2, &[0, 2]),
    (DType::Q5_0, 3, &[0]),
    (DType::Q5_1, 4, &[0, 2]),
    (DType::Q4K, 5, &[0, 2]),
    (DType::Q5K, 6, &[0, 2]),
    (DType::Q6K, 7, &[208]),
];

/// `blocks` random blocks of `dtype` whose f16 scales are finite (the exponent's top bit
/// cleared), subnormals included.
fn random_blocks(dtype: DType, f16_at: &[usize], blocks: usize, seed: u64) -> Vec<u8> {
    let bytes = dtype.block().1;
    let mut state = seed;
    let mut data: Vec<u8> = (0..blocks * bytes)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 56) as u8
        })
        .collect();
    for block in data.chunks_exact_mut(bytes) {
        for &at in f16_at {
            block[at + 1] &= !0x40;
        }
    }
    data
}

/// kernels.cu's host-testable parts compiled as one C++ program with the host's compiler
/// (`c++`), with stand-ins for CUDA's intrinsics: no contraction into FMAs (as the `_rn`
/// intrinsics promise) and grid-stride kernels run as a single thread. Its `main` runs one
/// decoder or kernel on files (see `HOST_MAIN`). Built once per test process.
fn host_kernels() -> &'static std::path::Path {
    static EXE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        use ditflow::kernels::cuda::KERNELS_CU;
        let parts: Vec<&str> = KERNELS_CU
            .split("\n// BEGIN HOST-TESTABLE\n")
            .skip(1)
            .map(|p| {
                p.split("\n// END HOST-TESTABLE\n")
                    .next()
                    .expect("an end marker")
            })
            .collect();
        assert!(parts.len() >= 3, "kernels.cu's host-testable parts");
        let dir = common::temp_dir("cuda-host-kernels");
        let src = dir.join("kernels_host.cpp");
        std::fs::write(
            &src,
            format!("{HOST_SHIM}\n{}\n{HOST_MAIN}", parts.join("\n")),
        )
        .unwrap();
        let exe = dir.join("kernels_host");
        let built = std::process::Command::new("c++")
            .args(["-O1", "-ffp-contract=off", "-o"])
            .arg(&exe)
            .arg(&src)
            .output()
            .expect("run the host's C++ compiler (c++)");
        assert!(
            built.status.success(),
            "kernels.cu's host-testable parts do not compile as C++:\n{}",
            String::from_utf8_lossy(&built.stderr)
        );
        exe
    })
}

const HOST_SHIM: &str = r#"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <string>
#include <vector>
#define __device__
#define __global__
#define __forceinline__ inline
typedef unsigned int u32;
static inline float __uint_as_float(u32 u) { float f; memcpy(&f, &u, 4); return f; }
static inline u32 __float_as_uint(float f) { u32 u; memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
struct HostDim { unsigned x, y, z; };
static const HostDim blockIdx = {0, 0, 0}, threadIdx = {0, 0, 0};
static const HostDim blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
"#;

const HOST_MAIN: &str = r#"
static std::vector<unsigned char> slurp(const char* path) {
    std::vector<unsigned char> d;
    FILE* f = fopen(path, "rb");
    if (!f) exit(3);
    int c;
    while ((c = fgetc(f)) != EOF) d.push_back((unsigned char)c);
    fclose(f);
    return d;
}
static void spill(const char* path, const void* p, size_t n) {
    FILE* f = fopen(path, "wb");
    if (!f) exit(4);
    fwrite(p, 1, n, f);
    fclose(f);
}
#define HALF(dt, name, ...) (bf16 ? name##_bf16((const bf16_t*)__VA_ARGS__) : name##_f16((const f16_t*)__VA_ARGS__))
// kernels_host decode FORMAT BLOCK_BYTES PARTS_PER_BLOCK IN OUT
// kernels_host KERNEL bf16|f16 SIZES... INPUTS... OUT (see tests/cuda.rs)
int main(int argc, char** argv) {
    if (argc < 2) return 2;
    std::string op = argv[1];
    if (op == "decode") {  // the `dequantize` kernel over whole blocks
        int format = atoi(argv[2]), block_bytes = atoi(argv[3]), parts = atoi(argv[4]);
        std::vector<unsigned char> data = slurp(argv[5]);
        i64 all = (i64)(data.size() / block_bytes) * parts;
        std::vector<float> out(all * 32);
        dequantize(data.data(), out.data(), all, format, block_bytes, parts);
        spill(argv[6], out.data(), out.size() * 4);
        return 0;
    }
    if (op == "cast") {  // SDT DDT N IN OUT (DT_* codes)
        int sdt = atoi(argv[2]), ddt = atoi(argv[3]);
        i64 n = atoll(argv[4]);
        std::vector<unsigned char> x = slurp(argv[5]), y(n * 8);
        cast(x.data(), sdt, y.data(), ddt, n);
        int size = ddt == DT_F32 || ddt == DT_I32 ? 4 : ddt == DT_I64 ? 8 : ddt == DT_U8 ? 1 : 2;
        spill(argv[6], y.data(), n * size);
        return 0;
    }
    bool bf16 = std::string(argv[2]) == "bf16";
    if (op == "unary") {  // N CODE X OUT
        i64 n = atoll(argv[3]);
        int code = atoi(argv[4]);
        std::vector<unsigned char> x = slurp(argv[5]), y(n * 2);
        if (bf16) unary_bf16((const bf16_t*)x.data(), (bf16_t*)y.data(), n, code);
        else unary_f16((const f16_t*)x.data(), (f16_t*)y.data(), n, code);
        spill(argv[6], y.data(), y.size());
    } else if (op == "affine") {  // N MUL ADD X OUT
        i64 n = atoll(argv[3]);
        float mul = (float)atof(argv[4]), add = (float)atof(argv[5]);
        std::vector<unsigned char> x = slurp(argv[6]), y(n * 2);
        if (bf16) affine_bf16((const bf16_t*)x.data(), (bf16_t*)y.data(), n, mul, add);
        else affine_f16((const f16_t*)x.data(), (f16_t*)y.data(), n, mul, add);
        spill(argv[7], y.data(), y.size());
    } else if (op == "binary") {  // ROWS COLS B_IS_F32_ROW CODE A B OUT
        i64 rows = atoll(argv[3]), cols = atoll(argv[4]);
        int row = atoi(argv[5]), code = atoi(argv[6]);
        std::vector<unsigned char> a = slurp(argv[7]), b = slurp(argv[8]), y(rows * cols * 2);
        Dims8 shape = {{rows, cols}}, sa = {{cols, 1}}, sb = {{row ? 0 : cols, 1}};
        i64 n = rows * cols;
        if (bf16 && row) binary_bf16_f32((const bf16_t*)a.data(), (const float*)b.data(), (bf16_t*)y.data(), n, 2, shape, sa, sb, code);
        else if (bf16) binary_bf16((const bf16_t*)a.data(), (const bf16_t*)b.data(), (bf16_t*)y.data(), n, 2, shape, sa, sb, code);
        else if (row) binary_f16_f32((const f16_t*)a.data(), (const float*)b.data(), (f16_t*)y.data(), n, 2, shape, sa, sb, code);
        else binary_f16((const f16_t*)a.data(), (const f16_t*)b.data(), (f16_t*)y.data(), n, 2, shape, sa, sb, code);
        spill(argv[9], y.data(), y.size());
    } else if (op == "gated") {  // ROWS D X Y GATE OUT
        i64 rows = atoll(argv[3]), d = atoll(argv[4]), n = rows * d;
        std::vector<unsigned char> x = slurp(argv[5]), yv = slurp(argv[6]), g = slurp(argv[7]), o(n * 2);
        if (bf16) gated_residual_bf16((const bf16_t*)x.data(), (const bf16_t*)yv.data(), (const float*)g.data(), (bf16_t*)o.data(), n, d, n);
        else gated_residual_f16((const f16_t*)x.data(), (const f16_t*)yv.data(), (const float*)g.data(), (f16_t*)o.data(), n, d, n);
        spill(argv[8], o.data(), o.size());
    } else if (op == "bias_act") {  // ROWS COLS ACT SRC BIAS OUT
        i64 rows = atoll(argv[3]), cols = atoll(argv[4]);
        int act = atoi(argv[5]);
        std::vector<unsigned char> src = slurp(argv[6]), bias = slurp(argv[7]), y(rows * cols * 2);
        if (bf16) bias_act_bf16((const float*)src.data(), (bf16_t*)y.data(), (const float*)bias.data(), 0, rows, cols, act);
        else bias_act_f16((const float*)src.data(), (f16_t*)y.data(), (const float*)bias.data(), 0, rows, cols, act);
        spill(argv[8], y.data(), y.size());
    } else if (op == "rope") {  // ROWS L D R INTERLEAVED X COS SIN OUT
        i64 rows = atoll(argv[3]);
        int l = atoi(argv[4]), d = atoi(argv[5]), r = atoi(argv[6]), il = atoi(argv[7]);
        std::vector<unsigned char> x = slurp(argv[8]), c = slurp(argv[9]), sn = slurp(argv[10]), y(rows * d * 2);
        if (bf16) rope_bf16((const bf16_t*)x.data(), (bf16_t*)y.data(), (const float*)c.data(), (const float*)sn.data(), rows, l, d, r, il, 1);
        else rope_f16((const f16_t*)x.data(), (f16_t*)y.data(), (const float*)c.data(), (const float*)sn.data(), rows, l, d, r, il, 1);
        spill(argv[11], y.data(), y.size());
    } else {
        return 2;
    }
    return 0;
}
"#;

/// Runs the host-compiled kernels with `args`, the tensors' bytes as input files in their
/// places (`None` where an argument is text), and reads back the output file.
fn run_host_kernel(args: &[&str], inputs: &[&Tensor]) -> Vec<u8> {
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = common::temp_dir(&format!("cuda-host-run-{run}"));
    let mut cmd = std::process::Command::new(host_kernels());
    cmd.args(args);
    for (i, t) in inputs.iter().enumerate() {
        let path = dir.join(format!("in{i}.bin"));
        std::fs::write(&path, t.cpu_bytes().unwrap()).unwrap();
        cmd.arg(path);
    }
    let out = dir.join("out.bin");
    let status = cmd.arg(&out).status().unwrap();
    assert!(
        status.success(),
        "{args:?}: the host-compiled kernel failed"
    );
    std::fs::read(&out).unwrap()
}

#[test]
fn the_cuda_block_decoders_give_the_cpus_bits_compiled_for_the_host() {
    // The decoders against `weights::quant`'s on random blocks of every format: exact.
    use ditflow::weights::quant::BlockFormat;
    for &(dtype, code, f16_at) in BLOCK_FORMATS {
        let (values, bytes) = dtype.block();
        let data = random_blocks(dtype, f16_at, 48, code as u64 + 1);
        let blocks = Tensor::from_bytes(DType::U8, &[data.len()], &data).unwrap();
        let (c, b, p) = (
            code.to_string(),
            bytes.to_string(),
            (values / 32).to_string(),
        );
        let got: Vec<u32> = run_host_kernel(&["decode", &c, &b, &p], &[&blocks])
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let mut want = vec![0f32; data.len() / bytes * values];
        BlockFormat::of(dtype).unwrap().dequantize(&data, &mut want);
        let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got.len(), want.len(), "{}", dtype.name());
        let bad = got.iter().zip(&want).position(|(g, w)| g != w);
        assert!(
            bad.is_none(),
            "{}: value {} is {:e} on the CUDA decoder, {:e} on the CPU",
            dtype.name(),
            bad.unwrap(),
            f32::from_bits(got[bad.unwrap()]),
            f32::from_bits(want[bad.unwrap()])
        );
        eprintln!("{}: {} values, the same bits", dtype.name(), got.len());
    }
}

#[test]
fn the_cuda_cast_kernel_gives_the_cpus_bits_compiled_for_the_host() {
    // f32 to and from bf16 and f16 (round to nearest even, subnormals, infinities, values past
    // f16's range) against the CPU's `cast`: exact.
    let mut values = r(&[4096], 31).to_vec::<f32>().unwrap();
    for (i, v) in values.iter_mut().enumerate() {
        *v *= [1e-6f32, 1e-3, 1.0, 300.0, 7e4, 1e38][i % 6];
    }
    values.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        65519.0,
        65520.0,
        5.96e-8,
    ]);
    let x = Tensor::from_f32(&[values.len()], &values).unwrap();
    let n = values.len().to_string();
    for dt in [DType::BF16, DType::F16] {
        let (f32c, dtc) = (DType::F32.raw().to_string(), dt.raw().to_string());
        let narrowed = run_host_kernel(&["cast", &f32c, &dtc, &n], &[&x]);
        let want = ops::cast(&x, dt).unwrap();
        assert_eq!(narrowed, want.cpu_bytes().unwrap(), "f32 to {}", dt.name());
        let widened = run_host_kernel(&["cast", &dtc, &f32c, &n], &[&want]);
        let back = ops::cast(&want, DType::F32).unwrap();
        assert_eq!(widened, back.cpu_bytes().unwrap(), "{} to f32", dt.name());
    }
}

#[test]
fn the_half_activation_kernels_match_the_cpu_ops_compiled_for_the_host() {
    // The bf16 and f16 kernels of the elementwise ops, rope and the linear epilogue, run on the
    // host against the CPU's ops on the same half inputs: both compute in f32 and round once,
    // so they differ by at most one unit in the last place where their f32 maths does (the
    // CPU's vectorised exp and erf against libm's, FMAs): tolerance 1e-2 (bf16) and 2e-3 (f16)
    // of the largest value.
    use ditflow::kernels::cpu::Activation;
    for (dt, name, tol) in [(DType::BF16, "bf16", 1e-2), (DType::F16, "f16", 2e-3)] {
        let h = |shape: &[usize], seed: u64| ops::cast(&r(shape, seed), dt).unwrap();
        let back = |bytes: Vec<u8>, shape: &[usize]| Tensor::from_bytes(dt, shape, &bytes).unwrap();
        let check = |what: &str, got: Tensor, want: Tensor| {
            assert_eq!(want.dtype(), dt, "{what}: the CPU op keeps the type");
            let e = rel(&got, &want);
            eprintln!("{what} in {name} on the host: {e:.2e}");
            assert!(e <= tol, "{what} in {name}: relative error {e} > {tol}");
        };
        let (rows, cols) = (37usize, 96usize);
        let (x, y) = (h(&[rows, cols], 1), h(&[rows, cols], 2));
        let n = (rows * cols).to_string();
        // unary: SiLU (code 100 + 3), and exp (1).
        for (code, f) in [(103, Unary::Act(Activation::Silu)), (1, Unary::Exp)] {
            let got = run_host_kernel(&["unary", name, &n, &code.to_string()], &[&x]);
            check(
                &format!("unary {code}"),
                back(got, &[rows, cols]),
                ops::unary(&x, f).unwrap(),
            );
        }
        let got = run_host_kernel(&["affine", name, &n, "0.5", "1.25"], &[&x]);
        check(
            "affine",
            back(got, &[rows, cols]),
            ops::affine(&x, 0.5, 1.25).unwrap(),
        );
        let (rs, cs) = (rows.to_string(), cols.to_string());
        let got = run_host_kernel(&["binary", name, &rs, &cs, "0", "0"], &[&x, &y]);
        let want = ops::binary(&x, &y, Binary::Add).unwrap();
        check("binary add, both half", back(got, &[rows, cols]), want);
        let row = r(&[cols], 3);
        let got = run_host_kernel(&["binary", name, &rs, &cs, "1", "2"], &[&x, &row]);
        let want = ops::binary(&x, &row, Binary::Mul).unwrap();
        check("binary mul by an f32 row", back(got, &[rows, cols]), want);
        let gate = r(&[cols], 4);
        let got = run_host_kernel(&["gated", name, &rs, &cs], &[&x, &y, &gate]);
        let want = ops::gated_residual(&x, &y, &gate).unwrap();
        check("gated_residual", back(got, &[rows, cols]), want);
        // The epilogue of a linear layer with half activations: f32 sums, a bias, tanh-GELU.
        let (sums, bias) = (r(&[rows, cols], 5), r(&[cols], 6));
        let got = run_host_kernel(&["bias_act", name, &rs, &cs, "2"], &[&sums, &bias]);
        let biased = ops::binary(&sums, &bias, Binary::Add).unwrap();
        let act = ops::unary(&biased, Unary::Act(Activation::GeluTanh)).unwrap();
        check(
            "bias_act",
            back(got, &[rows, cols]),
            ops::cast(&act, dt).unwrap(),
        );
        // rope over 40 of 64 channels, both pair layouts.
        let (l, d, rot) = (rows, 64usize, 40usize);
        let xr = h(&[l, d], 7);
        let (cos, sin) = (r(&[l, rot / 2], 8), r(&[l, rot / 2], 9));
        for interleaved in [false, true] {
            let il = (interleaved as i32).to_string();
            let (ls, ds, rts) = (l.to_string(), d.to_string(), rot.to_string());
            let got = run_host_kernel(
                &["rope", name, &ls, &ls, &ds, &rts, &il],
                &[&xr, &cos, &sin],
            );
            let want = ops::rope(&xr, &cos, &sin, interleaved).unwrap();
            check(
                &format!("rope interleaved={interleaved}"),
                back(got, &[l, d]),
                want,
            );
        }
    }
}

// --- GPU parity: each CUDA op against the CPU op (skipped without a GPU) ------------------------

#[test]
fn block_quantized_weights_on_cuda_dequantise_per_layer_as_the_cpu_does() {
    // Every format moved to the GPU as stored: `cast` to f32 gives the CPU's bits (exact), and
    // a linear layer reading it matches the CPU's linear on the same weight (1e-4: cuBLAS sums
    // in another order).
    let Some(dev) = gpu() else { return };
    let (n, k) = (48, 512);
    let x = r(&[3, 7, k], 21);
    for &(dtype, code, f16_at) in BLOCK_FORMATS {
        let blocks = n * k / dtype.block().0;
        let bytes = random_blocks(dtype, f16_at, blocks, 100 + code as u64);
        let w = Tensor::from_bytes(dtype, &[n, k], &bytes).unwrap();
        let wg = w.to_device(dev).unwrap();
        assert_eq!(
            (wg.device(), wg.dtype(), wg.nbytes()),
            (dev, dtype, bytes.len())
        );
        let (cpu, got) = (
            ops::cast(&w, DType::F32).unwrap(),
            ops::cast(&wg, DType::F32).unwrap(),
        );
        assert_eq!(
            got.to_vec::<f32>().unwrap(),
            cpu.to_vec::<f32>().unwrap(),
            "{}: dequantised on the GPU",
            dtype.name()
        );
        let b = r(&[n], 22);
        let act = ditflow::kernels::cpu::Activation::Gelu;
        let cpu = ops::linear(&x, &w, Some(&b), act).unwrap();
        let got = ops::linear(
            &x.to_device(dev).unwrap(),
            &wg,
            Some(&b.to_device(dev).unwrap()),
            act,
        )
        .unwrap();
        let e = rel(&got, &cpu);
        eprintln!("linear with a {} weight on the GPU: {e:.2e}", dtype.name());
        assert!(
            e < 1e-4,
            "linear with a {} weight: relative error {e}",
            dtype.name()
        );
    }
}

fn gpu() -> Option<Device> {
    match cuda_available(0) {
        Ok(()) => Some(Device::Cuda(0)),
        Err(why) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

/// Runs `f` on CPU inputs and on the same inputs moved to the GPU, and compares.
fn check(name: &str, tol: f64, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor) {
    let Some(dev) = gpu() else { return };
    let cpu = f(inputs);
    let moved: Vec<Tensor> = inputs.iter().map(|t| t.to_device(dev).unwrap()).collect();
    let out = f(&moved);
    assert_eq!(out.device(), dev, "{name}");
    assert_eq!(out.shape(), cpu.shape(), "{name}");
    let e = rel(&out, &cpu);
    assert!(e <= tol, "{name}: relative error {e} > {tol}");
    eprintln!("{name}: {e:.2e}");
}

#[test]
fn cuda_attention_on_a_tiny_case() {
    // One query, three keys, one-hot values: the output is the softmax weights themselves.
    let q = Tensor::from_f32(&[1, 1, 1, 2], &[1.0, 0.0]).unwrap();
    let k = Tensor::from_f32(&[1, 1, 3, 2], &[1.0, 0.0, 0.0, 1.0, -1.0, 0.0]).unwrap();
    let v = Tensor::from_f32(&[1, 1, 3, 3], &[1., 0., 0., 0., 1., 0., 0., 0., 1.]).unwrap();
    let cpu = ops::attention(&q, &k, &v, None, Some(1.0))
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    let z = 1f32.exp() + 1.0 + (-1f32).exp();
    let want = [1f32.exp() / z, 1.0 / z, (-1f32).exp() / z];
    for (a, b) in cpu.iter().zip(&want) {
        assert!((a - b).abs() < 1e-6, "cpu {cpu:?} vs {want:?}");
    }
    let Some(dev) = gpu() else { return };
    let m = |t: &Tensor| t.to_device(dev).unwrap();
    let got = ops::attention(&m(&q), &m(&k), &m(&v), None, Some(1.0))
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-6, "cuda {got:?} vs {want:?}");
    }
    // Growing shapes, to localise a failure: (b, h, lq, lk, d, dv).
    for (b, h, lq, lk, d, dv) in [
        (1, 1, 1, 40, 8, 8),
        (1, 1, 9, 5, 8, 8),
        (1, 2, 1, 5, 8, 8),
        (1, 1, 1, 5, 40, 8),
        (1, 1, 1, 5, 8, 24),
        (2, 3, 70, 130, 40, 24),
    ] {
        let (q, k, v) = (
            r(&[b, h, lq, d], 1),
            r(&[b, h, lk, d], 2),
            r(&[b, h, lk, dv], 3),
        );
        let cpu = ops::attention(&q, &k, &v, None, None).unwrap();
        let got = ops::attention(&m(&q), &m(&k), &m(&v), None, None).unwrap();
        let e = rel(&got, &cpu);
        let (g, c) = (got.to_vec::<f32>().unwrap(), cpu.to_vec::<f32>().unwrap());
        let bad: Vec<(usize, f32, f32)> = g
            .iter()
            .zip(&c)
            .enumerate()
            .filter(|(_, (x, y))| (*x - *y).abs() > 1e-4)
            .map(|(i, (x, y))| (i, *x, *y))
            .take(12)
            .collect();
        assert!(
            e < 1e-4,
            "{:?}: error {e}: (index, cuda, cpu) {bad:?}",
            (b, h, lq, lk, d, dv)
        );
    }
}

#[test]
fn cuda_ops_match_cpu_ops() {
    // Tolerances: 1e-5 for f32 elementwise and norms, 1e-4 for GEMM-based ops and attention
    // (cuBLAS sums in another order), 1e-2 for half precision.
    if gpu().is_none() {
        return;
    }
    let noise_cpu = ops::randn(&[3, 1001], 42, Device::Cpu).unwrap();
    let noise_gpu = ops::randn(&[3, 1001], 42, Device::Cuda(0)).unwrap();
    assert_eq!(
        noise_cpu.to_vec::<f32>().unwrap(),
        noise_gpu.to_vec::<f32>().unwrap(),
        "same noise on both devices"
    );

    check(
        "matmul",
        1e-4,
        &[r(&[3, 67, 45], 1), r(&[3, 45, 33], 2)],
        |t| ops::matmul(&t[0], &t[1], false, false).unwrap(),
    );
    check("matmul_t", 1e-4, &[r(&[45, 67], 1), r(&[33, 45], 2)], |t| {
        ops::matmul(&t[0], &t[1], true, true).unwrap()
    });
    check(
        "linear_gelu",
        1e-4,
        &[r(&[2, 17, 40], 3), r(&[24, 40], 4), r(&[24], 5)],
        |t| {
            ops::linear(
                &t[0],
                &t[1],
                Some(&t[2]),
                ditflow::kernels::cpu::Activation::GeluTanh,
            )
            .unwrap()
        },
    );
    check(
        "conv2d",
        1e-4,
        &[r(&[2, 4, 9, 7], 6), r(&[6, 2, 3, 3], 7), r(&[6], 8)],
        |t| ops::conv(&t[0], &t[1], Some(&t[2]), &[2], &[1], &[1], 2).unwrap(),
    );
    check(
        "conv1d",
        1e-4,
        &[r(&[1, 3, 20], 6), r(&[5, 3, 4], 7)],
        |t| ops::conv(&t[0], &t[1], None, &[1], &[2], &[2], 1).unwrap(),
    );
    check(
        "conv3d",
        1e-4,
        &[r(&[1, 2, 5, 6, 7], 6), r(&[3, 2, 2, 3, 3], 7)],
        |t| ops::conv(&t[0], &t[1], None, &[1], &[1], &[1], 1).unwrap(),
    );
    check(
        "layer_norm_modulate",
        1e-5,
        &[
            r(&[2, 33, 70], 9),
            r(&[70], 10),
            r(&[2, 1, 70], 11),
            r(&[2, 1, 70], 12),
        ],
        |t| {
            ops::layer_norm(
                &t[0],
                LayerNorm {
                    weight: Some(&t[1]),
                    shift: Some(&t[2]),
                    scale: Some(&t[3]),
                    eps: 1e-6,
                    ..Default::default()
                },
            )
            .unwrap()
        },
    );
    check("rms_norm", 1e-5, &[r(&[5, 64], 13), r(&[64], 14)], |t| {
        ops::rms_norm(&t[0], Some(&t[1]), 1e-6).unwrap()
    });
    check(
        "group_norm_silu",
        1e-5,
        &[r(&[2, 8, 5, 5], 15), r(&[8], 16), r(&[8], 17)],
        |t| {
            ops::group_norm(
                &t[0],
                4,
                Some(&t[1]),
                Some(&t[2]),
                1e-5,
                ditflow::kernels::cpu::Activation::Silu,
            )
            .unwrap()
        },
    );
    check("softmax_mid", 1e-5, &[r(&[3, 50, 4], 18)], |t| {
        ops::softmax(&t[0], 1).unwrap()
    });
    check(
        "attention",
        1e-4,
        &[
            r(&[2, 3, 70, 40], 19),
            r(&[2, 3, 130, 40], 20),
            r(&[2, 3, 130, 24], 21),
        ],
        |t| ops::attention(&t[0], &t[1], &t[2], None, None).unwrap(),
    );
    check(
        "attention_wide_heads",
        1e-4,
        &[
            r(&[1, 2, 33, 160], 19),
            r(&[1, 2, 47, 160], 20),
            r(&[1, 2, 47, 200], 21),
        ],
        |t| ops::attention(&t[0], &t[1], &t[2], None, None).unwrap(),
    );
    let keep: Vec<u8> = (0..130).map(|i| (i % 5 != 0) as u8).collect();
    let mask = Tensor::from_slice(&[2, 1, 1, 65], &keep).unwrap();
    check(
        "attention_mask",
        1e-4,
        &[
            r(&[2, 2, 9, 32], 22),
            r(&[2, 2, 65, 32], 23),
            r(&[2, 2, 65, 32], 24),
            mask,
        ],
        |t| ops::attention(&t[0], &t[1], &t[2], Some(&t[3]), Some(0.3)).unwrap(),
    );
    let pos = Tensor::from_f32(&[6, 2], &[0., 0., 0., 1., 1., 0., 1., 1., 2., 0., 2., 1.]).unwrap();
    let (c, s) = ops::rope_tables(&pos, &[8, 8], 10000.0, Device::Cpu).unwrap();
    for interleaved in [true, false] {
        check(
            "rope",
            1e-5,
            &[r(&[2, 3, 6, 20], 25), c.clone(), s.clone()],
            |t| ops::rope(&t[0], &t[1], &t[2], interleaved).unwrap(),
        );
    }
    for f in [
        Unary::Exp,
        Unary::Tanh,
        Unary::Sigmoid,
        Unary::Act(ditflow::kernels::cpu::Activation::Gelu),
        Unary::Act(ditflow::kernels::cpu::Activation::Silu),
    ] {
        check(&format!("{f:?}"), 1e-5, &[r(&[1000], 26)], |t| {
            ops::unary(&t[0], f).unwrap()
        });
    }
    check("affine", 1e-6, &[r(&[77], 27)], |t| {
        ops::affine(&t[0], 1.5, -2.0).unwrap()
    });
    check(
        "binary_broadcast",
        1e-6,
        &[r(&[4, 1, 6], 28), r(&[5, 1], 29)],
        |t| ops::binary(&t[0], &t[1], Binary::Div).unwrap(),
    );
    check(
        "gated_residual",
        1e-6,
        &[r(&[2, 9, 16], 30), r(&[2, 9, 16], 31), r(&[2, 1, 16], 32)],
        |t| ops::gated_residual(&t[0], &t[1], &t[2]).unwrap(),
    );
    check("reduce_mean", 1e-6, &[r(&[3, 4, 5], 33)], |t| {
        ops::reduce(&t[0], &[0, 2], true, Reduce::Mean).unwrap()
    });
    check("permute", 0.0, &[r(&[2, 3, 4, 5], 34)], |t| {
        ops::permute(&t[0], &[0, 2, 1, 3]).unwrap()
    });
    check(
        "concat",
        0.0,
        &[r(&[2, 3, 4], 35), r(&[2, 5, 4], 36)],
        |t| ops::concat(&[&t[0], &t[1]], 1).unwrap(),
    );
    check("slice", 0.0, &[r(&[3, 10, 2], 37)], |t| {
        ops::slice(&t[0], 1, 1, 9, 3).unwrap()
    });
    check("upsample_bilinear", 1e-6, &[r(&[1, 2, 5, 7], 38)], |t| {
        ops::upsample2d(
            &t[0],
            (9, 13),
            Upsample::Bilinear {
                align_corners: false,
            },
        )
        .unwrap()
    });
    check("upsample_nearest", 0.0, &[r(&[1, 2, 5, 7], 38)], |t| {
        ops::upsample2d(&t[0], (10, 14), Upsample::Nearest).unwrap()
    });
    let ids = Tensor::from_slice(&[2, 3], &[0i64, 4, 2, 2, 1, 3]).unwrap();
    check("embedding", 0.0, &[r(&[5, 8], 39), ids], |t| {
        ops::embedding(&t[0], &t[1]).unwrap()
    });
    // MoE routing: the top-k gate (values and indices) and the scatter-add of experts' rows.
    check("topk_values", 0.0, &[r(&[6, 16], 43)], |t| {
        ops::topk(&t[0], 4).unwrap().remove(0)
    });
    check("topk_indices", 0.0, &[r(&[6, 16], 43)], |t| {
        ops::cast(&ops::topk(&t[0], 4).unwrap().remove(1), DType::F32).unwrap()
    });
    let index = Tensor::from_slice(&[5], &[1i64, 0, 1, 3, 1]).unwrap();
    check(
        "index_add",
        1e-6,
        &[r(&[4, 8], 44), index, r(&[5, 8], 45)],
        |t| ops::index_add(&t[0], &t[1], &t[2]).unwrap(),
    );
    for dt in [DType::F16, DType::BF16] {
        check(&format!("cast_{dt:?}"), 0.0, &[r(&[333], 40)], |t| {
            ops::cast(&t[0], dt).unwrap()
        });
        check(
            &format!("linear_{dt:?}"),
            1e-2,
            &[
                ops::cast(&r(&[8, 32], 41), dt).unwrap(),
                ops::cast(&r(&[16, 32], 42), dt).unwrap(),
            ],
            |t| ops::linear(&t[0], &t[1], None, Default::default()).unwrap(),
        );
    }
}

#[test]
fn every_tiny_model_forward_on_cuda_matches_the_cpu() {
    // End to end through the loaders and Forward, each parity fixture on the GPU against the
    // CPU. Tolerance 1e-3 of the output's largest value: f32 throughout, but cuBLAS and the
    // kernels sum in other orders than the CPU, over a few layers.
    let Some(dev) = gpu() else { return };
    gpu_checks::every_model_matches_the_cpu(dev, 1e-3, "on CUDA");
}

#[test]
fn under_a_vram_cap_of_half_the_weights_every_tiny_model_runs_as_uncapped() {
    // Weights past the cap stay in host memory and are uploaded per use: the same values reach
    // the same kernels, so the output is the uncapped one (tolerance 1e-6 of its largest value,
    // for a cuBLAS that picks another algorithm for another buffer), and the uploads are
    // counted as streamed bytes.
    use ditflow::weights::{residency, vram};
    let Some(dev) = gpu() else { return };
    for &case in gpu_checks::PARITY_MODELS {
        let folder = common::repo().join("tests/fixtures/parity").join(case.1);
        let weights: u64 = std::fs::read_dir(&folder)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        let want =
            gpu_checks::fixture_forward(&gpu_checks::session(), case, dev, "uncapped").unwrap();
        vram::set_cap(Some(weights as usize / 2));
        let before = residency::streamed_bytes();
        let got = gpu_checks::fixture_forward(&gpu_checks::session(), case, dev, "vram-capped");
        vram::set_cap(None);
        let got = got.unwrap();
        let e = common::relative_error(&got, &want);
        let streamed = residency::streamed_bytes() - before;
        eprintln!(
            "{} under a VRAM cap of half its weights: {e:.2e}, {streamed} bytes uploaded per use",
            case.1
        );
        assert!(e <= 1e-6, "{}: {e} against uncapped", case.1);
        assert!(streamed > 0, "{}: nothing staged under the cap", case.1);
    }
}
