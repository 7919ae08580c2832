//! Weights-loading memory benchmark: writes a 1 GB f32 safetensors file (256 tensors of 4 MiB),
//! loads it through `Weights::open` (memory-mapped), reads every element, and prints the rise in
//! peak RSS (VmHWM) and the load time as one JSON line. Run with
//! `cargo bench -p ditflow --bench weights`; `tools/bench_kernels.py` runs it too.

use ditflow::weights::{LoadOptions, Weights};
use std::io::Write;
use std::time::Instant;

/// Peak resident set size in bytes (Linux), or 0 where unknown.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    let dir = std::env::temp_dir().join(format!("ditflow-bench-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    let (n_tensors, per) = (256usize, 1usize << 20); // 256 × 1M f32 = 1 GiB
    {
        // Header, then raw data, streamed so the writer's memory stays small.
        let mut header = String::from("{");
        for i in 0..n_tensors {
            let (a, b) = (i * per * 4, (i + 1) * per * 4);
            header += &format!(
                "\"w{i}\":{{\"dtype\":\"F32\",\"shape\":[1024,1024],\"data_offsets\":[{a},{b}]}}"
            );
            header += if i + 1 < n_tensors { "," } else { "}" };
        }
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        let chunk: Vec<u8> = (0..per)
            .flat_map(|j| ((j % 97) as f32 * 0.01).to_le_bytes())
            .collect();
        for _ in 0..n_tensors {
            f.write_all(&chunk).unwrap();
        }
    }
    let file_bytes = std::fs::metadata(&path).unwrap().len();
    let before = peak_rss();
    let t0 = Instant::now();
    let w = Weights::open(&path, LoadOptions::default()).unwrap();
    let load_s = t0.elapsed().as_secs_f64();
    let mut sum = 0f64;
    for t in w.tensors.values() {
        sum += t.as_f32().iter().map(|&v| v as f64).sum::<f64>();
    }
    let touch_s = t0.elapsed().as_secs_f64() - load_s;
    let after = peak_rss();
    let zero_copy = w.tensors.values().all(|t| t.is_mapped());
    println!(
        "{{\"bench\":\"weights_1gb\",\"file_gb\":{:.3},\"peak_rss_rise_gb\":{:.3},\"open_s\":{load_s:.4},\"read_all_s\":{touch_s:.3},\"zero_copy\":{zero_copy},\"checksum\":{sum:.1}}}",
        file_bytes as f64 / 1e9,
        after.saturating_sub(before) as f64 / 1e9
    );
    drop(w);
    let _ = std::fs::remove_dir_all(&dir);
}
