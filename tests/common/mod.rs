//! Shared helpers for the end-to-end tests: where cargo put the plugin libraries, building the C
//! test plugins, and small graph fixtures.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub fn repo() -> PathBuf {
    // DITFLOW_REPO: a copy of the tree elsewhere, for test binaries built here and run on
    // another machine (`tools/device_checks.sh`).
    if let Some(dir) = std::env::var_os("DITFLOW_REPO") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("runtime/ has a parent")
        .to_path_buf()
}

/// `target/<profile>`: the folder above the test binary's `deps/`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

fn lib_name(stem: &str) -> String {
    format!(
        "{}{stem}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// The newest build of plugin library `stem`: cargo leaves one in `target/<profile>` (`cargo
/// build`) and one in its `deps` (`cargo test`), and either can be stale.
fn newest_lib(stem: &str) -> Option<PathBuf> {
    let top = profile_dir();
    [top.clone(), top.join("deps")]
        .into_iter()
        .map(|d| d.join(lib_name(stem)))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p)
}

/// A folder holding the newest build of each workspace plugin library (`ditflow-nodes`,
/// `ditflow-testkit`), as links made once per test process.
pub fn plugin_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = temp_dir("plugins");
        for stem in STD_PLUGINS.iter().chain(&["ditflow_testkit"]) {
            let lib = newest_lib(stem).unwrap_or_else(|| {
                panic!(
                    "the plugin library {stem} was not built next to {}; run `cargo test --workspace`",
                    profile_dir().display()
                )
            });
            #[cfg(unix)]
            std::os::unix::fs::symlink(&lib, dir.join(lib_name(stem))).expect("link the plugin library");
            #[cfg(not(unix))]
            std::fs::copy(&lib, dir.join(lib_name(stem))).expect("copy the plugin library");
        }
        dir
    })
    .clone()
}

/// The standard library and the model-family plugins: what `cargo build` puts next to the
/// `ditflow` executable.
pub const STD_PLUGINS: &[&str] = &[
    "ditflow_nodes",
    "ditflow_pixart_dit",
    "ditflow_t5_clip",
    "ditflow_autoencoder_kl",
    "ditflow_flux",
    "ditflow_sd3",
    "ditflow_hidream",
    "ditflow_wan",
    "ditflow_stable_audio",
    "ditflow_av_bridge",
];

/// The paths of the [`STD_PLUGINS`] libraries.
#[allow(dead_code)]
pub fn std_plugins() -> Vec<PathBuf> {
    STD_PLUGINS.iter().map(|s| plugin_lib(s)).collect()
}

/// The path of a workspace plugin library, e.g. `plugin_lib("ditflow_nodes")`.
pub fn plugin_lib(stem: &str) -> PathBuf {
    plugin_dir().join(lib_name(stem))
}

/// The largest absolute difference of `got` from `want`, relative to `want`'s largest magnitude:
/// the parity tests' error measure.
#[allow(dead_code)]
pub fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "compared tensors differ in size");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    got.iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0f64, f64::max)
        / scale
}

/// A fresh, empty temporary folder for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ditflow-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Compiles a C plugin source (relative to the repo root) into `out_dir` with the system C
/// compiler, and returns the library path.
pub fn build_c_plugin(source: &str, out_dir: &Path) -> PathBuf {
    build_c_plugin_with(source, out_dir, &[])
}

/// [`build_c_plugin`] with extra compiler arguments (`-DNAME=VALUE`).
pub fn build_c_plugin_with(source: &str, out_dir: &Path, extra: &[&str]) -> PathBuf {
    let src = repo().join(source);
    let stem = src
        .file_stem()
        .expect("file name")
        .to_string_lossy()
        .to_string();
    let out = out_dir.join(lib_name(&stem));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args([
            "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-std=c99", "-I",
        ])
        .arg(repo().join("plugins/sdk/include"))
        .args(extra)
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler '{cc}': {e}"));
    assert!(status.success(), "compiling {} failed", src.display());
    out
}

/// The shape, f32 data and rate of an Audio or Video value (`[tensor, rate]`).
pub fn media_value(v: &ditflow::Value) -> (Vec<usize>, Vec<f32>, f64) {
    let ditflow::Value::List(items) = v else {
        panic!("a [tensor, rate] list, got {v:?}")
    };
    let (ditflow::Value::Tensor(_, t), ditflow::Value::Float(rate)) = (&*items[0], &*items[1])
    else {
        panic!("a [tensor, rate] list")
    };
    (t.shape().to_vec(), t.as_f32().to_vec(), *rate)
}

/// PSNR in dB of image `x` against `reference`, both in [0, 1] (values clamped there).
pub fn psnr(x: &[f32], reference: &[f32]) -> f64 {
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

/// Standard base64 (with padding) back to bytes.
pub fn unbase64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for chunk in text.as_bytes().chunks(4) {
        let pad = chunk.iter().filter(|&&c| c == b'=').count();
        let n = chunk
            .iter()
            .map(|&c| if c == b'=' { 0 } else { u32::from(value(c)) })
            .fold(0u32, |acc, v| (acc << 6) | v);
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    out
}

/// An 8-bit RGB PNG's pixels as floats in [0, 1], with its width and height.
pub fn png_pixels(bytes: &[u8]) -> (Vec<f32>, usize, usize) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("a size")];
    let info = reader.next_frame(&mut buf).expect("a frame");
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let px = buf[..info.buffer_size()]
        .iter()
        .map(|&v| v as f32 / 255.0)
        .collect();
    (px, info.width as usize, info.height as usize)
}

/// The `node_preview` events of a run with `opts`, as (node, step, total, base64 PNG), gathered
/// as they come.
pub type Previews = std::sync::Arc<std::sync::Mutex<Vec<(String, u64, u64, String)>>>;

/// Subscribes to `opts`'s events and returns where their previews will be gathered.
pub fn collect_previews(opts: &mut ditflow::RunOptions) -> Previews {
    let previews = Previews::default();
    let seen = previews.clone();
    opts.subscribers
        .push(std::sync::Arc::new(move |e: &ditflow::Event| {
            if let ditflow::Event::NodePreview {
                node,
                step,
                total,
                png,
            } = e
            {
                seen.lock()
                    .unwrap()
                    .push((node.to_string(), *step, *total, png.clone()));
            }
        }));
    previews
}
