//! File helpers for nodes that read and write files: the fingerprints that make an edited input
//! file or model folder be read again, and path handling with errors that name the file.

use crate::{bail, Context, Error, Result};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// FNV-1a over `bytes`, continuing from `hash`: a stable hash (unlike `DefaultHasher`), so
/// fingerprints stay valid across builds of the plugin.
pub fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The FNV-1a offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A fingerprint of a file's resolved path, length and modification time, so a cached result is
/// dropped when the file is edited. A missing or unreadable file is an error "`what` `path`:
/// reason".
pub fn file_fingerprint(what: &str, path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| io_error(what, path, &e))?;
    if !meta.is_file() {
        bail!("{what} {}: not a file", path.display());
    }
    // A file dated before 1970 (or a filesystem without times) still gets a fingerprint from its
    // length; the sign of the offset is kept apart from its magnitude.
    let mtime = match meta.modified() {
        Ok(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        },
        Err(_) => 0,
    };
    Ok(fingerprint_of(path, meta.len(), mtime))
}

/// The fingerprint of a file described by its path, length and modification time in nanoseconds.
fn fingerprint_of(path: &Path, len: u64, mtime_ns: i128) -> u64 {
    let mut h = fnv1a(FNV_OFFSET, path.as_os_str().as_encoded_bytes());
    h = fnv1a(h, &[0xff]);
    h = fnv1a(h, &len.to_le_bytes());
    fnv1a(h, &mtime_ns.to_le_bytes())
}

/// An I/O error as "`what` `path`: reason", with a plainer reason for a missing file.
pub fn io_error(what: &str, path: &Path, e: &std::io::Error) -> Error {
    let reason = match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        _ => e.to_string(),
    };
    Error(format!("{what} {}: {reason}", path.display()))
}

/// Checks that a path input is not empty, naming the input otherwise.
pub fn non_empty<'a>(input: &str, path: &'a str) -> Result<&'a str> {
    if path.trim().is_empty() {
        bail!("input '{input}' is empty: give a file path");
    }
    Ok(path)
}

/// The path to read for input `input`, resolved against the graph's folder.
pub fn input_path(ctx: &Context, input: &str) -> Result<PathBuf> {
    let path: String = ctx.input(input)?;
    let path = non_empty(input, &path)?;
    ctx.input_path(path)
        .map_err(|e| Error(format!("cannot resolve {path:?}: {e}")))
}

/// The path to write for input `input`, resolved against the run's output folder (which the host
/// creates on demand).
pub fn output_path(ctx: &Context, input: &str) -> Result<PathBuf> {
    let path: String = ctx.input(input)?;
    let path = non_empty(input, &path)?;
    ctx.output_path(path)
        .map_err(|e| Error(format!("cannot write {path:?}: {e}")))
}

/// A fingerprint of a model folder: every file's path, size and modification time.
pub fn folder_fingerprint(dir: &Path) -> Result<u64> {
    if !dir.is_dir() {
        bail!("{}: no such model folder", dir.display());
    }
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    names.iter().try_fold(FNV_OFFSET, |h, p| {
        Ok(fnv1a(h, &file_fingerprint("cannot read", p)?.to_le_bytes()))
    })
}

/// [`file_fingerprint`] of a single-file checkpoint, [`folder_fingerprint`] of a model folder.
pub fn model_fingerprint(path: &Path) -> Result<u64> {
    if path.is_file() {
        file_fingerprint("cannot read", path)
    } else {
        folder_fingerprint(path)
    }
}

/// `path` made absolute against the current directory (without touching symlinks), for the path
/// outputs of the savers.
pub fn absolute(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference() {
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn fingerprints_change_with_length_time_and_path() {
        let p = Path::new("/data/a.png");
        let base = fingerprint_of(p, 100, 1_000);
        assert_eq!(base, fingerprint_of(p, 100, 1_000));
        assert_ne!(base, fingerprint_of(p, 101, 1_000));
        assert_ne!(base, fingerprint_of(p, 100, 1_001));
        assert_ne!(base, fingerprint_of(p, 100, -1_000));
        assert_ne!(base, fingerprint_of(Path::new("/data/b.png"), 100, 1_000));
    }

    #[test]
    fn folder_fingerprint_changes_with_the_files() {
        let dir =
            std::env::temp_dir().join(format!("ditflow-sdk-folder-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        let a = folder_fingerprint(&dir).unwrap();
        std::fs::write(dir.join("w.safetensors"), "x").unwrap();
        assert_ne!(a, folder_fingerprint(&dir).unwrap());
        assert!(folder_fingerprint(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_fingerprint_of_a_real_file() {
        let dir = std::env::temp_dir().join(format!("ditflow-sdk-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("x.bin");
        std::fs::write(&file, b"one").unwrap();
        let a = file_fingerprint("cannot read", &file).unwrap();
        assert_eq!(a, file_fingerprint("cannot read", &file).unwrap());
        std::fs::write(&file, b"three").unwrap();
        assert_ne!(a, file_fingerprint("cannot read", &file).unwrap());
        let e = file_fingerprint("cannot read", &dir.join("missing.bin"))
            .unwrap_err()
            .0;
        assert!(
            e.contains("missing.bin") && e.contains("no such file"),
            "{e}"
        );
        let e = file_fingerprint("cannot read", &dir).unwrap_err().0;
        assert!(e.contains("not a file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
