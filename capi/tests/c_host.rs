//! The C embedding API from C: `tests/host.c` is compiled with the system C compiler against
//! `include/ditflow.h` and `libditflow_c`, and runs a graph and its Lua twin, threads, cancellation
//! and the error paths under valgrind (no leak, no invalid access). Without valgrind it is built
//! with AddressSanitizer instead.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The newest `libditflow_c` cargo built (next to the test binary's folder, or in it).
fn capi_lib() -> PathBuf {
    let top = common::profile_dir();
    let name = format!(
        "{}ditflow_c{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    [top.join(&name), top.join("deps").join(&name)]
        .into_iter()
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p)
        .unwrap_or_else(|| panic!("{name} was not built next to {}", top.display()))
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn compile(out: &Path, lib: &Path, extra: &[&str]) {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let dir = lib.parent().unwrap();
    let status = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-O1"])
        .args(extra)
        .arg("-I")
        .arg(common::repo().join("include"))
        .arg(common::repo().join("capi/tests/host.c"))
        .arg("-o")
        .arg(out)
        .arg(format!("-L{}", dir.display()))
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .args(["-lditflow_c", "-lpthread"])
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler '{cc}': {e}"));
    assert!(status.success(), "compiling host.c failed");
}

#[cfg(target_os = "linux")]
#[test]
fn a_c_host_runs_graphs_cleanly_under_valgrind_or_asan() {
    let dir = common::temp_dir("c-host");
    let lib = capi_lib();
    let exe = dir.join("host");
    let out = dir.join("out");
    let args = [
        common::plugin_lib("ditflow_nodes").display().to_string(),
        common::repo().join("graphs").display().to_string(),
        out.display().to_string(),
    ];
    let output = if have("valgrind") {
        compile(&exe, &lib, &[]);
        Command::new("valgrind")
            .args([
                "--error-exitcode=97",
                "--leak-check=full",
                // Threads that live until exit (the worker pools) keep "possibly lost" and
                // "still reachable" blocks; what the host or the library lose is "definite".
                "--errors-for-leak-kinds=definite,indirect",
                "--show-leak-kinds=definite,indirect",
            ])
            .arg(&exe)
            .args(&args)
            // cargo puts target/<profile> first on LD_LIBRARY_PATH, where an older
            // libditflow_c may lie; the host's rpath names the one `capi_lib` chose.
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .expect("run valgrind")
    } else {
        compile(
            &exe,
            &lib,
            &["-fsanitize=address", "-fno-omit-frame-pointer"],
        );
        Command::new(&exe)
            .args(&args)
            .env_remove("LD_LIBRARY_PATH")
            .env("ASAN_OPTIONS", "detect_leaks=1")
            .output()
            .expect("run the host")
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "the C host failed ({}):\n{text}",
        output.status
    );
    assert!(text.contains("caption: seed 7: mean"), "{text}");
    assert!(text.contains("\nok\n"), "{text}");
}
