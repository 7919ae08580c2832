//! Load on `ditflow serve` over loopback: 200 submissions of the demo model's text-to-image
//! (4 steps, 64×64) from 20 concurrent clients against a queue bounded at 150. Prints the
//! submissions accepted and refused (a 429, cleanly), that every accepted job completed once,
//! the throughput, the p50/p99 latency from submission to the end, and the server's peak RSS.
//! Then the same load on the scale-out path, when a NATS server is at hand (`DITFLOW_NATS_URL`,
//! or `nats-server` on the PATH): `ditflow serve --nats` with two `ditflow worker`s of one
//! thread each.
//! Run: `cargo bench -p ditflow-cli --bench serve_load`.

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/common/http.rs"]
mod http;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CLIENTS: usize = 20;
const PER_CLIENT: usize = 10;
const QUEUE_LIMIT: usize = 150;

/// The peak resident set of process `pid`, in MiB.
fn peak_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    kib as f64 / 1024.0
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A NATS server's URL: `DITFLOW_NATS_URL`, or one started from `nats-server` on the PATH.
fn nats() -> Option<(String, Option<Killed>)> {
    if let Ok(url) = std::env::var("DITFLOW_NATS_URL") {
        return Some((url, None));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(common::temp_dir("serve-load-nats"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((format!("nats://127.0.0.1:{port}"), Some(Killed(child))))
}

fn main() {
    let data = common::temp_dir("serve-load");
    let srv = http::Server::start(
        &data,
        &common::repo().join("graphs"),
        &["--queue-limit".into(), QUEUE_LIMIT.to_string().into()],
        Stdio::null(),
    );
    load("one machine (SQLite, one worker of 2 threads)", srv, &[]);
    let Some((url, _nats)) = nats() else {
        println!("scale-out: skipped (no DITFLOW_NATS_URL and no nats-server on the PATH)");
        return;
    };
    let prefix = format!("load{}", std::process::id());
    let srv = http::Server::start(
        &common::temp_dir("serve-load-2"),
        &common::repo().join("graphs"),
        &[
            "--queue-limit".into(),
            QUEUE_LIMIT.to_string().into(),
            "--nats".into(),
            url.clone().into(),
            "--nats-prefix".into(),
            prefix.clone().into(),
        ],
        Stdio::null(),
    );
    let workers: Vec<Killed> = (0..2)
        .map(|i| {
            Killed(
                Command::new(env!("CARGO_BIN_EXE_ditflow"))
                    .args(["worker", "--nats", &url, "--nats-prefix", &prefix])
                    .args([
                        "--name",
                        &format!("load{i}"),
                        "--run-threads",
                        "1",
                        "--base",
                    ])
                    .arg(common::repo().join("graphs"))
                    .env("DITFLOW_PLUGIN_PATH", common::plugin_dir())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("start a worker"),
            )
        })
        .collect();
    load("NATS JetStream (two workers of 1 thread)", srv, &workers);
}

/// Runs the load against `srv` and prints what came of it (`workers`: their peak RSS too).
fn load(label: &str, srv: http::Server, workers: &[Killed]) {
    let addr = srv.addr.clone();
    let graph = std::fs::read_to_string(common::repo().join("graphs/text_to_image.yaml")).unwrap();
    let t0 = Instant::now();
    let results: Vec<(Vec<String>, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (addr, graph) = (&addr, &graph);
                s.spawn(move || {
                    let (mut ids, mut refused) = (Vec::new(), 0);
                    for i in 0..PER_CLIENT {
                        let body = serde_json::json!({
                            "graph": graph,
                            "args": {"seed": c * PER_CLIENT + i, "steps": 4, "scale": 1, "preview_every": 0},
                        });
                        let r = http::request(addr, "POST", "/jobs", None, body.to_string().as_bytes());
                        match r.status {
                            201 => ids.push(r.json()["id"].as_str().unwrap().to_string()),
                            429 => refused += 1,
                            other => panic!("submission answered {other}"),
                        }
                    }
                    (ids, refused)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let submitted = t0.elapsed();
    let ids: Vec<String> = results.iter().flat_map(|(i, _)| i.clone()).collect();
    let refused: usize = results.iter().map(|(_, r)| r).sum();
    // Wait for every accepted job to end.
    let deadline = Instant::now() + Duration::from_secs(1800);
    let jobs = loop {
        let list = http::request(&addr, "GET", "/jobs?limit=1000", None, b"").json();
        let jobs = list["jobs"].as_array().unwrap().clone();
        let done = jobs
            .iter()
            .filter(|j| j["state"] == "succeeded" || j["state"] == "failed")
            .count();
        if done == ids.len() {
            break jobs;
        }
        assert!(
            Instant::now() < deadline,
            "jobs did not finish: {done} of {}",
            ids.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let wall = t0.elapsed();
    let peak = peak_mib(srv.child.id());
    let worker_peaks: Vec<String> = workers
        .iter()
        .map(|w| format!("{:.0}", peak_mib(w.0.id())))
        .collect();
    drop(srv);
    let failed = jobs.iter().filter(|j| j["state"] == "failed").count();
    let listed: std::collections::HashSet<&str> =
        jobs.iter().filter_map(|j| j["id"].as_str()).collect();
    assert!(
        ids.iter().all(|i| listed.contains(i.as_str())),
        "an accepted job is missing"
    );
    assert_eq!(
        listed.len(),
        ids.len(),
        "a job ran twice or appeared from nowhere"
    );
    let mut lat: Vec<f64> = jobs
        .iter()
        .map(|j| j["finished"].as_f64().unwrap() - j["submitted"].as_f64().unwrap())
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
    println!("{label}:");
    println!(
        "{CLIENTS} clients x {PER_CLIENT} submissions, queue bound {QUEUE_LIMIT}: {} accepted, {refused} refused (429), {} completed, {failed} failed, none lost",
        ids.len(),
        ids.len() - failed
    );
    println!(
        "submissions took {:.2} s; all done after {:.1} s: {:.2} jobs/s; latency p50 {:.2} s, p99 {:.2} s; server peak RSS {:.0} MiB{}",
        submitted.as_secs_f64(),
        wall.as_secs_f64(),
        ids.len() as f64 / wall.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        peak,
        if worker_peaks.is_empty() {
            String::new()
        } else {
            format!(", workers' {} MiB", worker_peaks.join(" and "))
        }
    );
}
