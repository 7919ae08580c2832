//! The workers: each takes the next queued job, runs it on the server's one session (so the
//! models one job loads stay loaded for the next job that names them), publishes its events,
//! records how it ended and which files it wrote, then prunes the history.
//!
//! A job interrupted by the server stopping is left `running` in the store, which queues it
//! again when the server starts next: nothing is lost. A panic anywhere in a run fails that
//! job only.

use crate::store::{Job, Source, State};
use crate::{jobs, Server};
use ditflow::{Event, RunOptions};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Starts worker `i`.
pub fn spawn(server: Arc<Server>, i: usize) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("ditflow-worker-{i}"))
        .spawn(move || run(&server))
        .expect("spawn a worker thread")
}

fn run(server: &Server) {
    while !server.shutdown.load(Ordering::SeqCst) {
        let seen = *server.wake.0.lock().unwrap_or_else(|p| p.into_inner());
        match server.queue.claim_next() {
            Ok(Some((job, source))) => run_job(server, job, source),
            Ok(None) => {
                let (lock, cv) = &server.wake;
                let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
                if *guard == seen {
                    let _ = cv.wait_timeout(guard, Duration::from_secs(1));
                }
            }
            Err(e) => {
                tracing::error!("job store: {e}");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// A line of the server's own events, with the runtime's `event` key.
fn line(event: &str, fields: serde_json::Value) -> String {
    let mut v = serde_json::json!({ "event": event });
    if let (Some(o), serde_json::Value::Object(f)) = (v.as_object_mut(), fields) {
        o.extend(f);
    }
    v.to_string()
}

/// The files under `dir`, as `/`-separated paths relative to it, sorted.
pub fn files_in(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path(), &rel, out),
                Ok(t) if t.is_file() => out.push(rel),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out);
    out.sort();
    out
}

/// How a job's run ended.
pub struct Outcome {
    pub state: State,
    pub error: Option<String>,
    /// The graph's outputs, rendered as JSON.
    pub outputs: serde_json::Value,
    /// The files it wrote under its folder.
    pub files: Vec<String>,
}

/// Where and how a job runs.
pub struct Setting<'a> {
    pub session: &'a ditflow::Session,
    /// Relative paths in the graph resolve against this folder.
    pub base_dir: &'a Path,
    pub device: ditflow::tensor::Device,
    pub threads: usize,
}

/// Runs `source` in `set` with its files written under `out_dir`, its events given to
/// `publish`; a panic anywhere in the run fails the job only.
pub fn execute(
    set: &Setting,
    source: &Source,
    out_dir: &Path,
    cancel: &Arc<AtomicBool>,
    publish: impl Fn(&Event) + Send + Sync + 'static,
) -> Outcome {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        std::fs::create_dir_all(out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
        let graph = jobs::parse(source, set.base_dir).map_err(|e| e.to_string())?;
        let mut opts = RunOptions {
            out_dir: out_dir.to_path_buf(),
            cancel: cancel.clone(),
            device: set.device,
            workers: set.threads.max(1),
            ..RunOptions::default()
        };
        opts.subscribers.push(Arc::new(publish));
        set.session
            .run(&graph, &jobs::args(source), &opts)
            .map_err(|d| d.to_string())
    }))
    .unwrap_or_else(|p| {
        Err(format!(
            "the run panicked: {}",
            ditflow_plugin::panic_message(&*p)
        ))
    });
    let (state, error, outputs) = match &outcome {
        Ok(report) if report.ok() => (
            State::Succeeded,
            None,
            serde_json::Value::Object(
                report
                    .outputs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json()))
                    .collect(),
            ),
        ),
        Ok(report) if report.cancelled => (
            State::Cancelled,
            Some("cancelled".to_string()),
            serde_json::Value::Null,
        ),
        Ok(report) => {
            let msg = report
                .failed
                .iter()
                .map(|f| format!("node \"{}\" ({}): {}", f.node, f.node_type, f.error))
                .collect::<Vec<_>>()
                .join("; ");
            (State::Failed, Some(msg), serde_json::Value::Null)
        }
        Err(e) => (State::Failed, Some(e.clone()), serde_json::Value::Null),
    };
    Outcome {
        state,
        error,
        outputs,
        files: files_in(out_dir),
    }
}

/// The server's `job_started` line.
pub fn started_line(id: &str, instance: &str) -> String {
    line(
        "job_started",
        serde_json::json!({ "job": id, "instance": instance }),
    )
}

/// The server's `job_finished` line.
pub fn finished_line(id: &str, o: &Outcome) -> String {
    line(
        "job_finished",
        serde_json::json!({
            "job": id,
            "state": o.state,
            "error": o.error,
            "outputs": o.outputs,
            "files": o.files,
        }),
    )
}

fn run_job(server: &Server, job: Job, source: Source) {
    let id = job.id.clone();
    server.hub.open(&id);
    server.hub.publish(&id, started_line(&id, &server.instance));
    let out_dir = server.results_dir(&id);
    let cancel = Arc::new(AtomicBool::new(false));
    server
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.clone(), cancel.clone());
    let started = std::time::Instant::now();
    let publisher = {
        let (id, hub) = (id.clone(), server.hub.clone());
        move |e: &Event| hub.publish(&id, e.to_json_line())
    };
    let set = Setting {
        session: &server.session,
        base_dir: &server.opts.base_dir,
        device: server.opts.device,
        threads: server.opts.run_threads,
    };
    let outcome = execute(&set, &source, &out_dir, &cancel, publisher);
    server
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    if server.shutdown.load(Ordering::SeqCst) && cancel.load(Ordering::SeqCst) {
        // Stopped by the server going down: it stays `running`, and is queued again at start.
        server.hub.close(&id);
        return;
    }
    if let Err(e) = server.queue.finish(
        &id,
        outcome.state,
        outcome.error.as_deref(),
        &outcome.outputs,
        &outcome.files,
    ) {
        tracing::error!("job {id}: recording its end: {e}");
    }
    server.latencies.record(job.submitted, started);
    server.hub.publish(&id, finished_line(&id, &outcome));
    server.hub.close(&id);
    prune(server);
}

/// Drops finished jobs past the history's bounds, with their files and event streams.
pub(crate) fn prune(server: &Server) {
    let opts = &server.opts;
    match server
        .queue
        .prune(opts.history_limit, opts.history_max_age.as_secs_f64())
    {
        Ok(ids) => {
            for id in ids {
                let _ = std::fs::remove_dir_all(server.results_dir(&id));
                server.hub.remove(&id);
            }
        }
        Err(e) => tracing::error!("pruning the history: {e}"),
    }
}
