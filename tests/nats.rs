//! Scale-out on NATS JetStream, end to end with a real `nats-server`: `ditflow serve --nats`
//! queues, `ditflow worker --nats` processes run the jobs.
//!
//! The NATS server is the one at `DITFLOW_NATS_URL` (`.ci/run` starts one on 127.0.0.1), else
//! one these tests start from `nats-server` on the PATH, else the tests are skipped with a
//! message (and fail when `DITFLOW_REQUIRE_NATS` is set, as in CI). Each test works under a
//! prefix of its own, so they share one NATS server.

mod common;
#[path = "common/http.rs"]
mod http;

use http::{request, run_locally, Server};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const ALICE: &str = "alice-token-1";
const ADMIN: &str = "admin-token-333";

/// A `nats-server` these tests started, killed when the test process ends... or never
/// started: its URL either way.
struct Nats {
    url: String,
    _child: Option<Child>,
}

fn nats() -> Option<&'static str> {
    static NATS: OnceLock<Option<Nats>> = OnceLock::new();
    let n = NATS.get_or_init(|| {
        if let Ok(url) = std::env::var("DITFLOW_NATS_URL") {
            return Some(Nats { url, _child: None });
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = common::temp_dir("nats-store");
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let url = format!("nats://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Nats {
            url,
            _child: Some(child),
        })
    });
    match n {
        Some(n) => Some(n.url.as_str()),
        None => {
            assert!(
                std::env::var_os("DITFLOW_REQUIRE_NATS").is_none(),
                "DITFLOW_REQUIRE_NATS is set, but there is no DITFLOW_NATS_URL and no \
                 nats-server on the PATH"
            );
            eprintln!("skipped: no NATS server (set DITFLOW_NATS_URL or install nats-server)");
            None
        }
    }
}

/// A namespace on the NATS server for one test.
fn prefix(test: &str) -> String {
    format!("t{}_{test}", std::process::id())
}

fn serve(data: &std::path::Path, url: &str, prefix: &str, extra: &[&str]) -> Server {
    let args: Vec<std::ffi::OsString> = [
        "--token",
        &format!("alice:{ALICE}"),
        "--admin-token",
        ADMIN,
        "--nats",
        url,
        "--nats-prefix",
        prefix,
    ]
    .iter()
    .chain(extra)
    .map(Into::into)
    .collect();
    Server::start(
        data,
        &common::repo().join("graphs"),
        &args,
        Stdio::inherit(),
    )
}

/// A `ditflow worker` process whose stdout lines are collected; killed (SIGKILL) when dropped.
struct Worker {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Worker {
    fn start(url: &str, prefix: &str, name: &str, extra: &[&str]) -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ditflow"))
            .args([
                "worker",
                "--nats",
                url,
                "--nats-prefix",
                prefix,
                "--name",
                name,
            ])
            .arg("--base")
            .arg(common::repo().join("graphs"))
            .args(["--run-threads", "1"])
            .args(extra)
            .env("DITFLOW_PLUGIN_PATH", common::plugin_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ditflow worker");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("piped");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let w = Worker { child, lines };
        w.wait_for(|l| l.ends_with("ready"), 60);
        w
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits up to `secs` for a line matching `f`.
    fn wait_for(&self, f: impl Fn(&str) -> bool, secs: u64) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Some(l) = self.lines().into_iter().find(|l| f(l)) {
                return Some(l);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn t2i_job(args: serde_json::Value) -> serde_json::Value {
    let graph = std::fs::read_to_string(common::repo().join("graphs/text_to_image.yaml")).unwrap();
    serde_json::json!({ "graph": graph, "args": args })
}

fn submit(addr: &str, body: &serde_json::Value) -> String {
    let r = request(
        addr,
        "POST",
        "/jobs",
        Some(ALICE),
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_string()
}

/// Every job on the server, by id.
fn jobs(addr: &str) -> HashMap<String, serde_json::Value> {
    let r = request(addr, "GET", "/jobs?limit=1000", Some(ADMIN), b"");
    assert_eq!(r.status, 200);
    r.json()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["id"].as_str().unwrap().to_string(), j.clone()))
        .collect()
}

/// Waits until every job in `ids` has finished; their final states.
fn wait_all(addr: &str, ids: &[String], secs: u64) -> HashMap<String, serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let all = jobs(addr);
        let done = ids.iter().all(|id| {
            all.get(id)
                .and_then(|j| j["state"].as_str())
                .is_some_and(|s| !matches!(s, "queued" | "running"))
        });
        if done {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "jobs still unfinished after {secs} s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the workers' `finished ID STATE MODEL loads=N` lines say of one job.
struct End {
    model: String,
    loads: usize,
}

/// The workers' `finished` lines: each job's last, and how many times each id finished.
fn finished(lines: &[String]) -> (HashMap<String, End>, HashMap<String, usize>) {
    let mut by_id = HashMap::new();
    let mut times = HashMap::new();
    for l in lines {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() == 5 && f[0] == "finished" {
            let loads = f[4].trim_start_matches("loads=").parse().unwrap();
            let end = End {
                model: f[3].to_string(),
                loads,
            };
            by_id.insert(f[1].to_string(), end);
            *times.entry(f[1].to_string()).or_insert(0) += 1;
        }
    }
    (by_id, times)
}

#[test]
fn three_workers_run_fifty_jobs_exactly_once_through_a_server_restart_and_a_killed_worker() {
    let Some(url) = nats() else { return };
    let p = prefix("fifty");
    let data = common::temp_dir("nats-fifty");
    let srv = serve(&data, url, &p, &["--ack-wait", "4", "--queue-limit", "100"]);
    // The first job is long enough to be caught running; the others vary the seed.
    let long = submit(
        &srv.addr,
        &t2i_job(serde_json::json!({"steps": 300, "scale": 1, "preview_every": 0})),
    );
    let mut ids = vec![long.clone()];
    for i in 0..48 {
        let args = serde_json::json!({"steps": 4, "scale": 1, "seed": i % 4, "preview_every": 0});
        ids.push(submit(&srv.addr, &t2i_job(args)));
    }
    // A job with a client id, submitted twice: one job.
    let mut dup =
        t2i_job(serde_json::json!({"steps": 4, "scale": 1, "seed": 1, "preview_every": 0}));
    dup["id"] = "client-job-1".into();
    let dup_id = submit(&srv.addr, &dup);
    assert_eq!(submit(&srv.addr, &dup), dup_id);
    ids.push(dup_id.clone());
    assert_eq!(ids.len(), 50);
    // A job cancelled while queued never runs.
    let cancelled = submit(
        &srv.addr,
        &t2i_job(serde_json::json!({"steps": 4, "scale": 1})),
    );
    let r = request(
        &srv.addr,
        "DELETE",
        &format!("/jobs/{cancelled}"),
        Some(ALICE),
        b"",
    );
    assert_eq!(r.json()["state"], "cancelled");

    // The server is killed mid-queue and started again: the queue is on NATS.
    drop(srv);
    let srv = serve(&data, url, &p, &["--ack-wait", "4", "--queue-limit", "100"]);
    let before = jobs(&srv.addr);
    let queued = ids
        .iter()
        .filter(|id| before[*id]["state"] == "queued")
        .count();
    assert_eq!(queued, 50, "every job is still queued after the restart");

    let mut workers: Vec<Worker> = (0..3)
        .map(|i| Worker::start(url, &p, &format!("w{i}"), &[]))
        .collect();
    // The workers report themselves: GET /workers and /metrics list them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = request(&srv.addr, "GET", "/workers", Some(ADMIN), b"").json();
        let names: Vec<&str> = r["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|w| w["name"].as_str())
            .collect();
        if names == ["w0", "w1", "w2"] {
            assert_eq!(r["queue"], "nats");
            break;
        }
        assert!(Instant::now() < deadline, "workers listed: {names:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = request(&srv.addr, "GET", "/metrics", Some(ADMIN), b"");
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("ditflow_workers 3"), "{text}");
    assert!(
        text.contains("ditflow_worker_models_loaded{worker=\"w0\"}"),
        "{text}"
    );
    // The worker that took the long job is killed (SIGKILL) while it runs.
    let started = format!("started {long}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let victim = loop {
        if let Some(i) = workers
            .iter()
            .position(|w| w.lines().iter().any(|l| l.starts_with(&started)))
        {
            break i;
        }
        assert!(Instant::now() < deadline, "the long job never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    let killed = workers.remove(victim);
    let killed_lines = {
        let mut k = killed;
        let _ = k.child.kill();
        let _ = k.child.wait();
        std::thread::sleep(Duration::from_millis(100));
        k.lines()
    };
    assert!(
        !killed_lines
            .iter()
            .any(|l| l.starts_with(&format!("finished {long}"))),
        "the long job was killed mid-run"
    );
    // A replacement joins.
    workers.push(Worker::start(url, &p, "w3", &[]));

    let all = wait_all(&srv.addr, &ids, 600);
    let mut lines = killed_lines.clone();
    for w in &workers {
        lines.extend(w.lines());
    }
    let (ends, times) = finished(&lines);
    for id in &ids {
        assert_eq!(all[id]["state"], "succeeded", "{id}: {}", all[id]);
        assert_eq!(times.get(id), Some(&1), "{id} finished once");
    }
    assert_eq!(ends.len(), 50, "no other job ran");
    let long_starts = lines.iter().filter(|l| l.starts_with(&started)).count();
    assert_eq!(
        long_starts, 2,
        "the long job was delivered again after its worker died"
    );
    assert_eq!(jobs(&srv.addr)[&cancelled]["state"], "cancelled");
    assert!(
        !lines.iter().any(|l| l.contains(&cancelled)),
        "the cancelled job never ran"
    );

    // The results are byte-identical to single-machine runs.
    let local: Vec<Vec<u8>> = (0..4)
        .map(|seed| {
            let seed = format!("seed={seed}");
            let sets = ["steps=4", "scale=1", &seed, "preview_every=0"];
            run_locally("graphs/text_to_image.yaml", &sets, "text_to_image.png")
        })
        .collect();
    for (i, id) in ids[1..49].iter().enumerate() {
        let r = request(
            &srv.addr,
            "GET",
            &format!("/jobs/{id}/files/text_to_image.png"),
            Some(ALICE),
            b"",
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("image/png"));
        assert!(
            r.body == local[i % 4],
            "job {id} (seed {}) differs from a local run",
            i % 4
        );
    }
    let dup_png = request(
        &srv.addr,
        "GET",
        &format!("/jobs/{dup_id}/files/text_to_image.png"),
        Some(ALICE),
        b"",
    );
    assert!(dup_png.body == local[1]);
}

#[test]
fn a_job_whose_workers_keep_dying_is_dead_after_its_deliveries() {
    let Some(url) = nats() else { return };
    let p = prefix("dead");
    let data = common::temp_dir("nats-dead");
    let srv = serve(
        &data,
        url,
        &p,
        &["--ack-wait", "1", "--max-deliveries", "1"],
    );
    let id = submit(
        &srv.addr,
        &t2i_job(serde_json::json!({"steps": 1000, "scale": 1, "preview_every": 0})),
    );
    let w = Worker::start(url, &p, "d0", &[]);
    assert!(w.wait_for(|l| l.starts_with("started"), 60).is_some());
    drop(w);
    // The next delivery passes the one allowed: the job is dead, and says why.
    let w = Worker::start(url, &p, "d1", &[]);
    assert!(
        w.wait_for(|l| l == format!("dead {id}"), 60).is_some(),
        "{:?}",
        w.lines()
    );
    let job = request(&srv.addr, "GET", &format!("/jobs/{id}"), Some(ALICE), b"").json();
    assert_eq!(job["state"], "dead", "{job}");
    assert!(
        job["error"].as_str().unwrap().contains("delivered 1 times"),
        "{job}"
    );
    // And it is not delivered again.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!w.lines().iter().any(|l| l.starts_with("started")));
}

/// Copies the demo model folder to `dir`.
fn copy_demo(dir: &std::path::Path) {
    fn copy(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            let t = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &t);
            } else {
                std::fs::copy(e.path(), t).unwrap();
            }
        }
    }
    copy(&common::repo().join("models/demo"), dir);
}

/// Runs 12 jobs alternating between two copies of the demo model on 3 workers that keep one
/// model loaded at a time; the loader nodes run across the workers, and the model keys seen.
fn mixed_workload(
    url: &str,
    p: &str,
    models: &[std::path::PathBuf],
    affinity: bool,
) -> (usize, usize) {
    let data = common::temp_dir(&format!("nats-mixed-{p}"));
    let srv = serve(&data, url, p, &[]);
    let ids: Vec<String> = (0..12)
        .map(|i| {
            let args = serde_json::json!({
                "steps": 4, "scale": 1, "seed": i, "preview_every": 0,
                "models": models[i % 2].to_string_lossy(),
            });
            submit(&srv.addr, &t2i_job(args))
        })
        .collect();
    // A little more than one model's weights: the second one loaded lets the first go.
    let weights: u64 = ["text_encoder", "transformer", "vae"]
        .iter()
        .flat_map(|d| std::fs::read_dir(models[0].join(d)).unwrap().flatten())
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let keep = (weights * 3 / 2).to_string();
    let mut extra = vec!["--keep-models", keep.as_str()];
    if affinity {
        // Idle workers wait a while before they take the other model's jobs.
        extra.extend(["--steal-after", "3"]);
    } else {
        extra.push("--no-affinity");
    }
    let workers: Vec<Worker> = (0..3)
        .map(|i| Worker::start(url, p, &format!("m{i}"), &extra))
        .collect();
    let all = wait_all(&srv.addr, &ids, 600);
    for id in &ids {
        assert_eq!(all[id]["state"], "succeeded", "{}", all[id]);
    }
    let lines: Vec<String> = workers.iter().flat_map(|w| w.lines()).collect();
    let (ends, _) = finished(&lines);
    let loads = ends.values().map(|e| e.loads).sum();
    let keys: std::collections::HashSet<&String> = ends.values().map(|e| &e.model).collect();
    (loads, keys.len())
}

#[test]
fn with_affinity_a_mixed_workload_loads_models_fewer_times() {
    let Some(url) = nats() else { return };
    let models: Vec<_> = ["a", "b"]
        .iter()
        .map(|m| {
            let d = common::temp_dir(&format!("nats-model-{m}"));
            copy_demo(&d);
            d
        })
        .collect();
    let (off, keys_off) = mixed_workload(url, &prefix("mixoff"), &models, false);
    let (on, keys_on) = mixed_workload(url, &prefix("mixon"), &models, true);
    println!(
        "model loads (loader nodes run) for 12 jobs alternating 2 models on 3 workers that keep \
         one model: affinity off {off}, on {on}"
    );
    assert_eq!((keys_off, keys_on), (2, 2), "two model keys");
    assert!(on < off, "affinity on: {on} loads, off: {off}");
}
