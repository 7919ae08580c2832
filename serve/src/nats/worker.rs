//! `ditflow worker --nats URL`: takes jobs from the JetStream stream and runs them on one
//! session, so the models one job loads stay loaded for the next.
//!
//! For each delivery the worker reads the job's record: a job already finished (a duplicate
//! delivery) or cancelled is acknowledged and skipped; one delivered more than its record
//! allows is marked `dead` and terminated. Otherwise the record says `running`, the job runs
//! while a heartbeat (`+WPI`) tells the server it is still being worked on, its files go to the
//! object store, the record gets its end, and only then is the delivery acknowledged (double
//! acknowledgement, confirmed by the server). A worker that dies before that leaves the
//! delivery unacknowledged: after the acknowledgement wait it is delivered to another worker.
//! Any job-level failure (a node's error, a panic) is the job's end, not a redelivery; failing
//! to store the files is a negative acknowledgement, so another worker tries.
//!
//! Every few seconds the worker reports itself in the workers' bucket ([`super::WorkerInfo`]),
//! and takes its report back when it stops.
//!
//! The worker prints a line per job on stdout: `started ID MODEL`, then `finished ID STATE
//! MODEL loads=N` (N: the loader nodes it ran for the job, not served from its cache), or
//! `dead ID`.

use super::affinity;
use super::{Nats, NatsOptions, Record, WorkerInfo};
use crate::store::{now, State};
use crate::worker::{execute, finished_line, started_line, Setting};
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use ditflow::tensor::Device;
use ditflow::{Event, Runtime, Session};
use futures_util::StreamExt;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub nats: NatsOptions,
    /// The worker's name in job records and logs.
    pub name: String,
    /// Relative paths in graphs resolve against this folder.
    pub base_dir: PathBuf,
    /// Where jobs write their files before they go to the object store.
    pub scratch: PathBuf,
    pub device: Device,
    pub run_threads: usize,
    /// Take the jobs of the models this worker holds first.
    pub affinity: bool,
    /// With affinity: how long a worker with models of its own stays idle before it takes
    /// another model's jobs.
    pub steal_after: Duration,
    /// The most bytes of model weights kept loaded between jobs (`None`: as the session keeps).
    pub keep_model_bytes: Option<usize>,
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs the worker until Ctrl-C (between jobs); an error when NATS cannot be reached at the
/// start.
pub fn run(opts: WorkerOptions, runtime: Arc<Runtime>) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("the async runtime: {e}"))?;
    rt.block_on(work(opts, runtime))
}

struct Worker {
    opts: WorkerOptions,
    nats: Arc<Nats>,
    session: Arc<Session>,
    /// Node types that load models.
    loaders: Arc<HashSet<String>>,
    /// Cancel flags of the running job, by id.
    running: Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>,
    /// What it reports of itself.
    info: Arc<Mutex<WorkerInfo>>,
    consumers: HashMap<String, PullConsumer>,
}

async fn work(opts: WorkerOptions, runtime: Arc<Runtime>) -> Result<(), String> {
    let nats = Arc::new(Nats::connect(opts.nats.clone()).await?);
    let session = Arc::new(Session::new(runtime.clone()));
    session.keep_model_bytes(opts.keep_model_bytes);
    let loaders = runtime
        .registry()
        .iter()
        .filter(|t| t.category == "loaders")
        .map(|t| t.name.clone())
        .collect();
    let mut w = Worker {
        opts,
        nats: nats.clone(),
        session,
        loaders: Arc::new(loaders),
        running: Arc::default(),
        info: Arc::default(),
        consumers: HashMap::new(),
    };
    if !w
        .opts
        .name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "worker name '{}': expected letters, digits, '-', '_' or '.'",
            w.opts.name
        ));
    }
    {
        let mut info = w.info.lock().unwrap_or_else(|p| p.into_inner());
        info.name = w.opts.name.clone();
        info.started = now();
    }
    let report = {
        let (nats, info, session) = (nats.clone(), w.info.clone(), w.session.clone());
        tokio::spawn(async move {
            loop {
                let value = {
                    let mut i = info.lock().unwrap_or_else(|p| p.into_inner());
                    let stats = session.cache_stats();
                    i.seen = now();
                    i.models_loaded = stats.models;
                    i.model_bytes = stats.model_bytes;
                    serde_json::to_vec(&*i).unwrap_or_default()
                };
                let name = info.lock().unwrap_or_else(|p| p.into_inner()).name.clone();
                if let Err(e) = nats.workers.put(&name, value.into()).await {
                    tracing::warn!("reporting this worker: {e}");
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    };
    let mut cancels = nats
        .client
        .subscribe(format!("{}.cancel.*", nats.opts.prefix))
        .await
        .map_err(|e| format!("subscribing to cancellations: {e}"))?;
    let running = w.running.clone();
    tokio::spawn(async move {
        while let Some(msg) = cancels.next().await {
            if let Some(id) = msg.subject.as_str().rsplit('.').next() {
                let flags = running.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(flag) = flags.get(id) {
                    flag.store(true, Ordering::SeqCst);
                }
            }
        }
    });
    say(&format!("worker {} ready", w.opts.name));
    let mut recent: Vec<String> = Vec::new();
    let mut idle_since = Instant::now();
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        // A lost connection is waited out (the client reconnects), not the worker's end.
        let waiting = match w.waiting().await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("{e}; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let order = affinity::order(
            &waiting,
            &recent,
            w.opts.affinity,
            idle_since.elapsed(),
            w.opts.steal_after,
        );
        let mut got = None;
        for key in order {
            match w.take(&key).await {
                Ok(Some(msg)) => {
                    got = Some((key, msg));
                    break;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("{e}"),
            }
        }
        match got {
            Some((key, msg)) => {
                w.handle(&key, msg).await;
                recent.retain(|k| k != &key);
                recent.insert(0, key);
                w.info
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .recent_models = recent.iter().take(8).cloned().collect();
                idle_since = Instant::now();
            }
            None => {
                tokio::select! {
                    _ = &mut stop => {
                        report.abort();
                        let _ = nats.workers.delete(&w.opts.name).await;
                        return Ok(());
                    }
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }
}

impl Worker {
    /// Each model key's jobs waiting: those not yet delivered, and those delivered and not
    /// acknowledged (one whose worker died comes back among them once its wait passes).
    async fn waiting(&self) -> Result<Vec<affinity::Waiting>, String> {
        let mut infos = self.nats.stream.consumers();
        let mut out = Vec::new();
        while let Some(info) = infos.next().await {
            let info = info.map_err(|e| format!("listing the consumers: {e}"))?;
            if let Some(key) = info.name.strip_prefix("model-") {
                out.push(affinity::Waiting {
                    key: key.to_string(),
                    new: info.num_pending,
                    unacked: info.num_ack_pending as u64,
                });
            }
        }
        Ok(out)
    }

    /// The next delivery of model key `key`'s jobs, if one is waiting.
    async fn take(&mut self, key: &str) -> Result<Option<jetstream::Message>, String> {
        if !self.consumers.contains_key(key) {
            let c = self.nats.consumer(key).await?;
            self.consumers.insert(key.to_string(), c);
        }
        let consumer = &self.consumers[key];
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .messages()
            .await
            .map_err(|e| format!("fetching a job: {e}"))?;
        match batch.next().await {
            Some(Ok(m)) => Ok(Some(m)),
            Some(Err(e)) => {
                tracing::warn!("fetching a job: {e}");
                Ok(None)
            }
            None => Ok(None),
        }
    }

    /// Runs one delivery to its end.
    async fn handle(&self, key: &str, msg: jetstream::Message) {
        let id = String::from_utf8_lossy(&msg.payload).into_owned();
        if let Err(e) = self.run_delivery(key, &id, msg).await {
            tracing::error!("job {id}: {e}");
        }
    }

    async fn run_delivery(
        &self,
        key: &str,
        id: &str,
        msg: jetstream::Message,
    ) -> Result<(), String> {
        let nats = &self.nats;
        let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
        let ack_wait = self
            .consumers
            .get(key)
            .map_or(nats.opts.ack_wait, |c| c.cached_info().config.ack_wait);
        let Some((mut rec, rev)) = nats.record(id).await? else {
            // Pruned, or never recorded: nothing to run.
            let _ = msg.ack_with(AckKind::Term).await;
            return Ok(());
        };
        if rec.job.state.finished() {
            // A duplicate delivery of a job that ended, or a cancelled one.
            let _ = msg.double_ack().await;
            return Ok(());
        }
        if delivered > i64::from(rec.max_deliveries) {
            self.dead(&mut rec, delivered - 1).await?;
            let _ = msg.ack_with(AckKind::Term).await;
            return Ok(());
        }
        rec.job.state = State::Running;
        rec.job.started = Some(now());
        rec.worker = Some(self.opts.name.clone());
        if !nats.write(&rec, Some(rev)).await? {
            // Changed meanwhile (cancelled?): look again next time round.
            let _ = msg.ack_with(AckKind::Nak(None)).await;
            return Ok(());
        }
        nats.event(id, started_line(id, &self.opts.name)).await;
        say(&format!("started {id} {key}"));
        self.info.lock().unwrap_or_else(|p| p.into_inner()).running = Some(id.to_string());
        let msg = Arc::new(msg);
        let heartbeat = {
            let msg = msg.clone();
            let every = (ack_wait / 3).max(Duration::from_millis(100));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let _ = msg.ack_with(AckKind::Progress).await;
                }
            })
        };
        let result = self.run_job(id, &mut rec).await;
        heartbeat.abort();
        {
            let mut info = self.info.lock().unwrap_or_else(|p| p.into_inner());
            info.running = None;
            info.jobs_finished += u64::from(result.is_ok());
        }
        match result {
            Ok(loads) => {
                msg.double_ack()
                    .await
                    .map_err(|e| format!("acknowledging: {e}"))?;
                say(&format!(
                    "finished {id} {} {key} loads={loads}",
                    rec.job.state.name()
                ));
                Ok(())
            }
            Err(e) => {
                // Not the job's fault: another worker tries.
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                Err(e)
            }
        }
    }

    /// Marks a job dead after `deliveries` deliveries that did not finish it.
    async fn dead(&self, rec: &mut Record, deliveries: i64) -> Result<(), String> {
        let id = rec.job.id.clone();
        rec.job.state = State::Dead;
        rec.job.finished = Some(now());
        rec.job.error = Some(format!(
            "delivered {deliveries} times without finishing (its workers died or stopped \
             answering); not delivered again"
        ));
        self.nats.write(rec, None).await?;
        let outcome = crate::worker::Outcome {
            state: State::Dead,
            error: rec.job.error.clone(),
            outputs: serde_json::Value::Null,
            files: Vec::new(),
        };
        self.nats.event(&id, finished_line(&id, &outcome)).await;
        say(&format!("dead {id}"));
        Ok(())
    }

    /// Runs the job, stores its files and its end; the loader nodes it ran.
    async fn run_job(&self, id: &str, rec: &mut Record) -> Result<usize, String> {
        let nats = &self.nats;
        let out_dir = self.opts.scratch.join(id);
        let _ = std::fs::remove_dir_all(&out_dir);
        let cancel = Arc::new(AtomicBool::new(false));
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), cancel.clone());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let forward = {
            let (nats, id) = (nats.clone(), id.to_string());
            tokio::spawn(async move {
                while let Some(line) = rx.recv().await {
                    nats.event(&id, line).await;
                }
            })
        };
        let loads = Arc::new(AtomicUsize::new(0));
        let publisher = {
            let (loads, loaders) = (loads.clone(), self.loaders.clone());
            move |e: &Event| {
                if let Event::NodeStarted { r#type, .. } = e {
                    if loaders.contains(r#type) {
                        loads.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let _ = tx.send(e.to_json_line());
            }
        };
        let outcome = {
            let (session, source, dir) =
                (self.session.clone(), rec.source.clone(), out_dir.clone());
            let (base, device, threads) = (
                self.opts.base_dir.clone(),
                self.opts.device,
                self.opts.run_threads,
            );
            let cancel = cancel.clone();
            tokio::task::spawn_blocking(move || {
                let set = Setting {
                    session: &session,
                    base_dir: &base,
                    device,
                    threads,
                };
                execute(&set, &source, &dir, &cancel, publisher)
            })
            .await
            .map_err(|e| format!("the run's thread: {e}"))?
        };
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        // Every event is out before the end.
        let _ = forward.await;
        for f in &outcome.files {
            let bytes = tokio::fs::read(out_dir.join(f))
                .await
                .map_err(|e| format!("{f}: {e}"))?;
            nats.objects
                .put(format!("{id}/{f}").as_str(), &mut bytes.as_slice())
                .await
                .map_err(|e| format!("storing {f}: {e}"))?;
        }
        let _ = std::fs::remove_dir_all(&out_dir);
        rec.job.state = outcome.state;
        rec.job.error = outcome.error.clone();
        rec.job.outputs = relative_to(&outcome.outputs, &out_dir);
        rec.job.files = outcome.files.clone();
        rec.job.finished = Some(now());
        nats.write(rec, None).await?;
        let outcome = crate::worker::Outcome {
            outputs: rec.job.outputs.clone(),
            ..outcome
        };
        nats.event(id, finished_line(id, &outcome)).await;
        Ok(loads.load(Ordering::Relaxed))
    }
}

/// `v` with the paths under `dir` (this worker's scratch folder, meaningless elsewhere) made
/// relative to it: the names of the job's files.
fn relative_to(v: &serde_json::Value, dir: &std::path::Path) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) => match std::path::Path::new(s).strip_prefix(dir) {
            Ok(rel) => Value::String(rel.to_string_lossy().into_owned()),
            Err(_) => v.clone(),
        },
        Value::Array(items) => Value::Array(items.iter().map(|x| relative_to(x, dir)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| (k.clone(), relative_to(x, dir)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn outputs_under_the_scratch_folder_become_file_names() {
        let dir = std::path::Path::new("/tmp/w/job1");
        let v = serde_json::json!({"image": "/tmp/w/job1/a/b.png", "n": 3, "other": "/etc/x"});
        assert_eq!(
            super::relative_to(&v, dir),
            serde_json::json!({"image": "a/b.png", "n": 3, "other": "/etc/x"})
        );
    }
}
