//! The memory cap on weights: how many bytes of memory-mapped weights stay resident at once.
//!
//! Weights are memory-mapped, so a weight's pages are read from its file when first used. With a
//! cap set ([`set_cap`]), every weight a linear layer reads is [`touch`]ed: once the weights
//! touched pass the cap, the least recently used are released (`madvise(MADV_DONTNEED)` on their
//! pages, which a read-only file mapping reads back from the file, or the page cache, when next
//! used). So a model larger than the cap runs with at most about the cap of its weights resident,
//! bit for bit as uncapped (the values are the file's either way), at the price of reading the
//! released weights again: the bytes read back are counted ([`streamed_bytes`]) and reported in
//! run events. Weights not mapped (converted at load) are not counted and never released, except
//! those a loader joins from mapped ones under the cap (fused projections): they are written to a
//! file of their own and mapped from it ([`mapped_join`]), so the cap holds them too.

use crate::tensor::Tensor;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Weak};

/// The cap in bytes; 0: none.
static CAP: AtomicUsize = AtomicUsize::new(0);
/// Bytes of weights read back after their release, since the process started.
static STREAMED: AtomicU64 = AtomicU64::new(0);
static STATE: Mutex<Option<State>> = Mutex::new(None);

/// One mapped weight seen since the cap was set.
struct Entry {
    map: Weak<memmap2::Mmap>,
    offset: usize,
    len: usize,
    last_use: u64,
    resident: bool,
    /// Released at least once (so a later use reads it back).
    released: bool,
}

#[derive(Default)]
struct State {
    /// By (mapping address, offset).
    entries: HashMap<(usize, usize), Entry>,
    resident: usize,
    clock: u64,
}

/// Sets the cap on resident mapped weights (`None`: no cap, the default). Weights already
/// resident stay until they are next passed over.
pub fn set_cap(bytes: Option<usize>) {
    CAP.store(bytes.unwrap_or(0), Ordering::Relaxed);
    *STATE.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// The cap on resident mapped weights, if one is set.
pub fn cap() -> Option<usize> {
    Some(CAP.load(Ordering::Relaxed)).filter(|&c| c > 0)
}

/// Where joined weights' files go: `DITFLOW_CACHE_DIR`, else `$XDG_CACHE_HOME/ditflow`, else
/// `~/.cache/ditflow` (a disk, where the temporary folder may be memory).
fn join_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(d) = std::env::var_os("DITFLOW_CACHE_DIR") {
        return PathBuf::from(d).join("joined");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map_or_else(std::env::temp_dir, |c| c.join("ditflow"))
        .join("joined")
}

/// A tensor of `dtype` and `shape` whose bytes `fill` writes, mapped from a file of its own (made
/// and unlinked at once: the mapping keeps its pages). `None` when no such file can be made; the
/// caller then joins in memory.
pub(crate) fn mapped_join(
    dtype: crate::tensor::DType,
    shape: &[usize],
    fill: impl FnOnce(&mut [u8]),
) -> Option<Tensor> {
    static N: AtomicU64 = AtomicU64::new(0);
    let len = Tensor::nbytes_for(dtype, shape)?;
    if len == 0 {
        return None;
    }
    let dir = join_dir();
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join(format!(
        "join-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .ok()?;
    let _ = std::fs::remove_file(&path);
    file.set_len(len as u64).ok()?;
    // SAFETY: the file was just made by this process and unlinked: nothing else maps it.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.ok()?;
    fill(&mut map[..]);
    let map = std::sync::Arc::new(map.make_read_only().ok()?);
    // Written, the pages stay in the file's page cache: let them go from this process until a
    // product touches them, under the cap like every weight.
    release_pages(&map, 0, len);
    Tensor::from_mapped(dtype, shape, &map, 0, len).ok()
}

/// Lets go of the resident pages of mapped tensor `t` (read back from its file when next used).
pub(crate) fn release(t: &Tensor) {
    if let Some((map, offset, len)) = t.mapped_range() {
        release_pages(map, offset, len);
    }
}

/// Bytes of weights read back from their files after being released under the cap, since the
/// process started.
pub fn streamed_bytes() -> u64 {
    STREAMED.load(Ordering::Relaxed)
}

/// Counts `bytes` of weights brought back to where an op needs them (uploads under the VRAM
/// cap, [`super::vram`]).
pub(crate) fn count_streamed(bytes: u64) {
    STREAMED.fetch_add(bytes, Ordering::Relaxed);
}

/// Parses a byte count as the command line takes it: `8G`, `512M`, `2.5GiB`, `1000000`.
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("'{text}' is not a size (e.g. 8G, 512M, 1000000)"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "'{text}': unknown unit '{other}' (use K, M, G or T)"
            ))
        }
    };
    let bytes = value * scale as f64;
    if !(bytes >= 1.0 && bytes < usize::MAX as f64) {
        return Err(format!("'{text}' is not a usable size"));
    }
    Ok(bytes as usize)
}

/// Marks weight `w` as in use; under a cap, releases the least recently used weights until the
/// resident ones fit. An error when `w` alone is larger than the cap.
pub fn touch(w: &Tensor) -> Result<(), String> {
    let Some(cap) = cap() else {
        return Ok(());
    };
    let Some((map, offset, len)) = w.mapped_range() else {
        return Ok(());
    };
    if len > cap {
        return Err(format!(
            "a {} weight {:?} of {} MiB does not fit under the memory cap of {} MiB: raise \
             --max-memory to at least its size",
            w.dtype().name(),
            w.shape(),
            len >> 20,
            cap >> 20
        ));
    }
    let mut guard = STATE.lock().unwrap_or_else(|p| p.into_inner());
    let st = guard.get_or_insert_with(State::default);
    st.clock += 1;
    let key = (std::sync::Arc::as_ptr(map) as usize, offset);
    let clock = st.clock;
    let e = st.entries.entry(key).or_insert_with(|| Entry {
        map: std::sync::Arc::downgrade(map),
        offset,
        len,
        last_use: 0,
        resident: false,
        released: false,
    });
    e.last_use = clock;
    if !e.resident {
        if e.released {
            // Released before: its pages are read back from the file now.
            STREAMED.fetch_add(e.len as u64, Ordering::Relaxed);
        }
        e.resident = true;
        st.resident += e.len;
    }
    release_until_fits(st, cap, key);
    Ok(())
}

/// Releases the least recently used resident weights (never `keep`) until the resident bytes
/// fit under `cap`; weights whose file is no longer mapped are forgotten.
fn release_until_fits(st: &mut State, cap: usize, keep: (usize, usize)) {
    st.entries.retain(|_, e| {
        let alive = e.map.strong_count() > 0;
        if !alive && e.resident {
            st.resident -= e.len;
        }
        alive
    });
    while st.resident > cap {
        let Some((&key, _)) = st
            .entries
            .iter()
            .filter(|(k, e)| e.resident && **k != keep)
            .min_by_key(|(_, e)| e.last_use)
        else {
            break;
        };
        let e = st.entries.get_mut(&key).expect("just found");
        if let Some(map) = e.map.upgrade() {
            release_pages(&map, e.offset, e.len);
        }
        e.resident = false;
        e.released = true;
        st.resident -= e.len;
    }
}

/// Drops the whole pages of `map[offset..offset + len]` from the process.
pub(crate) fn release_pages(map: &memmap2::Mmap, offset: usize, len: usize) {
    const PAGE: usize = 4096;
    let start = offset.div_ceil(PAGE) * PAGE;
    let end = (offset + len) / PAGE * PAGE;
    if end > start {
        // SAFETY: the mapping is read-only and file-backed, so dropped pages are read back from
        // the file unchanged on the next access; no reference into them is invalidated.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
    }
}
