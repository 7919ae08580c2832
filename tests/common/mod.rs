//! Shared helpers for the end-to-end tests: where cargo put the plugin libraries, building the C
//! test plugins, and small graph fixtures.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub fn repo() -> PathBuf {
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

/// The folder holding the workspace's Rust plugin libraries (`ditflow-nodes`, `ditflow-testkit`):
/// the newer of `target/<profile>` (where `cargo build` puts them) and its `deps` (where a
/// clean `cargo test` leaves them), so a stale copy from an older build is never used.
pub fn plugin_dir() -> PathBuf {
    let top = profile_dir();
    let modified = |dir: &Path| -> Option<std::time::SystemTime> {
        let a = std::fs::metadata(dir.join(lib_name("ditflow_nodes")))
            .ok()?
            .modified()
            .ok()?;
        let b = std::fs::metadata(dir.join(lib_name("ditflow_testkit")))
            .ok()?
            .modified()
            .ok()?;
        Some(a.min(b))
    };
    let best = [top.clone(), top.join("deps")]
        .into_iter()
        .filter_map(|d| modified(&d).map(|t| (t, d)))
        .max_by_key(|(t, _)| *t);
    if let Some((_, dir)) = best {
        return dir;
    }
    panic!(
        "the plugin libraries were not built next to {}; run `cargo test --workspace`",
        top.display()
    )
}

/// The path of a workspace plugin library, e.g. `plugin_lib("ditflow_nodes")`.
pub fn plugin_lib(stem: &str) -> PathBuf {
    plugin_dir().join(lib_name(stem))
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
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler '{cc}': {e}"));
    assert!(status.success(), "compiling {} failed", src.display());
    out
}
