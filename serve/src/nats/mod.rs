//! Scale-out over NATS JetStream: `ditflow serve --nats URL` queues jobs on a JetStream
//! work-queue stream and `ditflow worker --nats URL` processes them, on any number of machines.
//!
//! Everything lives in the NATS server, under a prefix (`ditflow` by default), so any server
//! instance can answer for any job:
//! - the stream `<PREFIX>_JOBS` holds queued jobs' ids, on the subject
//!   `<prefix>.jobs.<model key>` ([`affinity::model_key`]), with the job id as `Nats-Msg-Id`
//!   (a job resubmitted within the stream's two-minute window is not queued twice). It holds at
//!   most the queue limit of jobs (waiting or being run), refusing more;
//! - one durable pull consumer per model key takes them, with explicit acknowledgement, an
//!   acknowledgement wait, and unlimited redelivery: a job whose worker dies is delivered again
//!   once the wait passes. A worker heartbeats (`+WPI`) while it runs a job;
//! - the key-value bucket `<prefix>_jobs` holds each job's record ([`Record`]): its state,
//!   owner, outputs, files and graph; a record is created only once per id;
//! - the object store `<prefix>_results` holds the jobs' files, as `<job id>/<file>`;
//! - events go over core NATS on `<prefix>.events.<job id>`, which each server instance feeds
//!   to its websocket and SSE subscribers; cancelling a running job is a message on
//!   `<prefix>.cancel.<job id>`.
//!
//! A job delivered more than its record's `max_deliveries` times is marked `dead` and not
//! delivered again: the dead-letter state, visible in the API.
//!
//! Workers report themselves every few seconds in the bucket `<prefix>_workers` ([`WorkerInfo`]),
//! whose entries expire after [`WORKER_TTL`]: what `GET /workers` and `/metrics` show.

pub mod affinity;
pub mod worker;

use crate::store::{now, Job, Source, State, SubmitError};
use async_nats::jetstream::{self, consumer, kv, object_store, stream};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How to reach the NATS server, and the settings of the queue there.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    pub url: String,
    /// Names the stream, bucket, object store and subjects, so several deployments (or
    /// tests) can share one NATS server.
    pub prefix: String,
    /// How long a delivered job may go without an acknowledgement or heartbeat before it is
    /// delivered again.
    pub ack_wait: Duration,
    /// Deliveries after which a job is dead.
    pub max_deliveries: u32,
    /// The most jobs in the stream (waiting or running).
    pub queue_limit: usize,
}

impl NatsOptions {
    pub fn new(url: &str) -> NatsOptions {
        NatsOptions {
            url: url.to_string(),
            prefix: "ditflow".into(),
            ack_wait: Duration::from_secs(30),
            max_deliveries: 3,
            queue_limit: 100,
        }
    }
}

/// A job as kept in the key-value bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub job: Job,
    pub source: Source,
    /// The model key the job was queued under.
    pub model: String,
    pub max_deliveries: u32,
    /// The worker that ran it last.
    #[serde(default)]
    pub worker: Option<String>,
}

/// How long a worker's report lasts without a newer one.
pub const WORKER_TTL: Duration = Duration::from_secs(30);

/// What a worker reports of itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    /// Seconds since the Unix epoch: when it started, and when it reported.
    pub started: f64,
    pub seen: f64,
    /// The job it is running.
    pub running: Option<String>,
    pub jobs_finished: u64,
    /// The model keys of its latest jobs, most recent first.
    pub recent_models: Vec<String>,
    /// What its session holds: models, and the bytes of their weights.
    pub models_loaded: usize,
    pub model_bytes: usize,
}

/// A connection to the NATS server, with the stream, buckets and object store made.
pub struct Nats {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub stream: stream::Stream,
    pub kv: kv::Store,
    /// The workers' reports.
    pub workers: kv::Store,
    pub objects: object_store::ObjectStore,
    pub opts: NatsOptions,
}

fn bucket_err(e: impl std::fmt::Display) -> String {
    format!("the job bucket: {e}")
}

/// Opens the key-value bucket `name` (entries kept `max_age`, zero: for ever), made when missing.
/// Its stream is made as the client's `create_key_value` makes it, without its account query,
/// whose reply from servers before 2.10 the client cannot read.
async fn bucket(
    js: &jetstream::Context,
    name: String,
    max_age: Duration,
) -> Result<kv::Store, String> {
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("the bucket {name}: {e}"))?;
    js.get_key_value(&name)
        .await
        .map_err(|e| format!("the bucket {name}: {e}"))
}

impl Nats {
    /// Connects and makes (or opens) the stream, bucket and object store.
    pub async fn connect(opts: NatsOptions) -> Result<Nats, String> {
        let valid = !opts.prefix.is_empty()
            && opts
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(format!(
                "NATS prefix '{}': expected letters, digits, '-' or '_'",
                opts.prefix
            ));
        }
        let client = async_nats::ConnectOptions::new()
            .name("ditflow")
            .connection_timeout(Duration::from_secs(5))
            .connect(opts.url.as_str())
            .await
            .map_err(|e| format!("connecting to NATS at {}: {e}", opts.url))?;
        let js = jetstream::new(client.clone());
        let p = &opts.prefix;
        let stream = js
            .get_or_create_stream(stream::Config {
                name: format!("{}_JOBS", p.to_ascii_uppercase()),
                subjects: vec![format!("{p}.jobs.>")],
                retention: stream::RetentionPolicy::WorkQueue,
                discard: stream::DiscardPolicy::New,
                max_messages: opts.queue_limit.min(i64::MAX as usize) as i64,
                duplicate_window: Duration::from_secs(120),
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                format!("the JetStream stream (is JetStream enabled, `nats-server -js`?): {e}")
            })?;
        let kv = bucket(&js, format!("{p}_jobs"), Duration::ZERO).await?;
        let workers = bucket(&js, format!("{p}_workers"), WORKER_TTL).await?;
        let objects = match js.get_object_store(format!("{p}_results")).await {
            Ok(o) => o,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: format!("{p}_results"),
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("the results store: {e}"))?,
        };
        Ok(Nats {
            client,
            js,
            stream,
            kv,
            workers,
            objects,
            opts,
        })
    }

    pub fn jobs_subject(&self, model: &str) -> String {
        format!("{}.jobs.{model}", self.opts.prefix)
    }

    pub fn events_subject(&self, id: &str) -> String {
        format!("{}.events.{id}", self.opts.prefix)
    }

    pub fn cancel_subject(&self, id: &str) -> String {
        format!("{}.cancel.{id}", self.opts.prefix)
    }

    /// The durable consumer of model key `model`'s jobs.
    pub fn consumer_name(model: &str) -> String {
        format!("model-{model}")
    }

    /// The consumer of `model`'s jobs, made when missing.
    pub async fn consumer(&self, model: &str) -> Result<consumer::PullConsumer, String> {
        let name = Self::consumer_name(model);
        self.stream
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: self.jobs_subject(model),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: self.opts.ack_wait,
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("the consumer of model {model}: {e}"))
    }

    /// Job `id`'s record and its revision.
    pub async fn record(&self, id: &str) -> Result<Option<(Record, u64)>, String> {
        let entry = self.kv.entry(id).await.map_err(bucket_err)?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| {
                serde_json::from_slice::<Record>(&e.value)
                    .ok()
                    .map(|r| (r, e.revision))
            }))
    }

    /// Writes `record` over revision `revision` (none: unconditionally); false when the record
    /// changed since.
    pub async fn write(&self, record: &Record, revision: Option<u64>) -> Result<bool, String> {
        let value = serde_json::to_vec(record).map_err(|e| e.to_string())?;
        let key = record.job.id.as_str();
        match revision {
            None => self
                .kv
                .put(key, value.into())
                .await
                .map(|_| true)
                .map_err(bucket_err),
            Some(rev) => Ok(self.kv.update(key, value.into(), rev).await.is_ok()),
        }
    }

    /// Every job record, in submission order.
    pub async fn records(&self) -> Result<Vec<Record>, String> {
        use futures_util::StreamExt;
        let mut keys = self.kv.keys().await.map_err(bucket_err)?;
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            let Ok(k) = k else { continue };
            if let Some((r, _)) = self.record(&k).await? {
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.job.submitted.total_cmp(&b.job.submitted));
        Ok(out)
    }

    /// The workers that reported within [`WORKER_TTL`], by name.
    pub async fn worker_infos(&self) -> Result<Vec<WorkerInfo>, String> {
        use futures_util::StreamExt;
        let mut keys = self
            .workers
            .keys()
            .await
            .map_err(|e| format!("the workers' bucket: {e}"))?;
        let mut out = Vec::new();
        let fresh = now() - WORKER_TTL.as_secs_f64();
        while let Some(k) = keys.next().await {
            let Ok(k) = k else { continue };
            if let Ok(Some(v)) = self.workers.get(&k).await {
                if let Ok(w) = serde_json::from_slice::<WorkerInfo>(&v) {
                    if w.seen >= fresh {
                        out.push(w);
                    }
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Publishes one of job `id`'s event lines.
    pub async fn event(&self, id: &str, line: String) {
        let _ = self
            .client
            .publish(self.events_subject(id), line.into())
            .await;
    }

    /// Deletes finished jobs beyond the newest `keep` and those finished more than `max_age`
    /// seconds ago, with their files; their ids.
    pub async fn prune(&self, keep: usize, max_age: f64) -> Result<Vec<String>, String> {
        let finished: Vec<Record> = self
            .records()
            .await?
            .into_iter()
            .filter(|r| r.job.state.finished())
            .collect();
        let cutoff = now() - max_age;
        let excess = finished.len().saturating_sub(keep);
        let mut gone = Vec::new();
        for (i, r) in finished.iter().enumerate() {
            if i < excess || r.job.finished.is_some_and(|f| f < cutoff) {
                for f in &r.job.files {
                    let _ = self.objects.delete(format!("{}/{f}", r.job.id)).await;
                }
                let _ = self.kv.purge(&r.job.id).await;
                gone.push(r.job.id.clone());
            }
        }
        Ok(gone)
    }

    /// Job `id`'s file `name` from the object store.
    pub async fn file(&self, id: &str, name: &str) -> Result<Vec<u8>, String> {
        use tokio::io::AsyncReadExt;
        let mut obj = self
            .objects
            .get(format!("{id}/{name}"))
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        let mut out = Vec::new();
        obj.read_to_end(&mut out)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        Ok(out)
    }
}

/// The server's side of the queue: the calls the routes make, answered from NATS on a runtime
/// of its own (the routes' calls are synchronous, as they are over SQLite).
pub struct NatsQueue {
    pub nats: Arc<Nats>,
    rt: tokio::runtime::Runtime,
    /// Model keys whose consumer this server made.
    consumers: Mutex<HashSet<String>>,
}

impl NatsQueue {
    pub fn connect(opts: NatsOptions) -> Result<NatsQueue, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ditflow-nats")
            .enable_all()
            .build()
            .map_err(|e| format!("the NATS runtime: {e}"))?;
        let nats = rt.block_on(Nats::connect(opts))?;
        Ok(NatsQueue {
            nats: Arc::new(nats),
            rt,
            consumers: Mutex::new(HashSet::new()),
        })
    }

    /// Runs `f` on the queue's runtime and waits for it, from a route or any thread.
    fn call<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        let wait = || rx.recv().expect("the NATS runtime answers every call");
        match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(wait),
            Err(_) => wait(),
        }
    }

    /// Runs `f` on the queue's runtime in the background.
    pub fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        self.rt.spawn(f);
    }

    /// Queues a job: its record, then its id on its model's subject. The job already under
    /// `id` when there is one (it is published again while queued, which the stream's
    /// de-duplication absorbs when it got there the first time).
    pub fn submit(
        &self,
        id: &str,
        owner: &str,
        priority: i64,
        source: &Source,
        meta: &serde_json::Value,
        model: &str,
    ) -> Result<Job, SubmitError> {
        let record = Record {
            job: Job {
                id: id.to_string(),
                owner: owner.to_string(),
                priority,
                state: State::Queued,
                submitted: now(),
                started: None,
                finished: None,
                error: None,
                outputs: serde_json::Value::Null,
                files: Vec::new(),
                meta: meta.clone(),
            },
            source: source.clone(),
            model: model.to_string(),
            max_deliveries: self.nats.opts.max_deliveries,
            worker: None,
        };
        let known = self
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(model);
        if !known {
            // Workers find a model key's jobs through its consumer: made before its first job.
            let (nats, key) = (self.nats.clone(), model.to_string());
            self.call(async move { nats.consumer(&key).await.map(|_| ()) })
                .map_err(SubmitError::Queue)?;
            self.consumers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(model.to_string());
        }
        let nats = self.nats.clone();
        self.call(async move {
            let value =
                serde_json::to_vec(&record).map_err(|e| SubmitError::Queue(e.to_string()))?;
            let created = nats.kv.create(&record.job.id, value.into()).await;
            let record = match created {
                Ok(_) => record,
                Err(_) => match nats
                    .record(&record.job.id)
                    .await
                    .map_err(SubmitError::Queue)?
                {
                    Some((existing, _)) if existing.job.state != State::Queued => {
                        return Ok(existing.job)
                    }
                    Some((existing, _)) => existing,
                    None => {
                        return Err(SubmitError::Queue("the job bucket refused the job".into()))
                    }
                },
            };
            let publish = jetstream::message::PublishMessage::build()
                .message_id(&record.job.id)
                .payload(record.job.id.clone().into());
            let sent = match nats
                .js
                .send_publish(nats.jobs_subject(&record.model), publish)
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match sent {
                Ok(()) => Ok(record.job),
                Err(e) => {
                    let _ = nats.kv.delete(&record.job.id).await;
                    if e.contains("maximum messages") {
                        let n = nats.opts.queue_limit;
                        Err(SubmitError::Full(n))
                    } else {
                        Err(SubmitError::Queue(format!("queueing the job: {e}")))
                    }
                }
            }
        })
    }

    pub fn get(&self, id: &str) -> Result<Option<Job>, String> {
        let (nats, id) = (self.nats.clone(), id.to_string());
        self.call(async move { Ok(nats.record(&id).await?.map(|(r, _)| r.job)) })
    }

    /// The newest `limit` jobs, of `owner` only when given.
    pub fn list(&self, owner: Option<&str>, limit: usize) -> Result<Vec<Job>, String> {
        let nats = self.nats.clone();
        let owner = owner.map(String::from);
        self.call(async move {
            let mut jobs: Vec<Job> = nats
                .records()
                .await?
                .into_iter()
                .map(|r| r.job)
                .filter(|j| owner.as_deref().is_none_or(|o| o == j.owner))
                .collect();
            jobs.reverse();
            jobs.truncate(limit);
            Ok(jobs)
        })
    }

    pub fn counts(&self) -> Result<Vec<(State, usize)>, String> {
        let jobs = self.list(None, usize::MAX)?;
        Ok(State::ALL
            .iter()
            .map(|&s| (s, jobs.iter().filter(|j| j.state == s).count()))
            .collect())
    }

    /// Cancels a queued job, or asks the worker running it to stop; the state before.
    pub fn cancel(&self, id: &str) -> Result<Option<State>, String> {
        let (nats, id) = (self.nats.clone(), id.to_string());
        self.call(async move {
            for _ in 0..8 {
                let Some((mut r, rev)) = nats.record(&id).await? else {
                    return Ok(None);
                };
                let before = r.job.state;
                match before {
                    State::Queued => {
                        r.job.state = State::Cancelled;
                        r.job.finished = Some(now());
                        r.job.error = Some("cancelled".into());
                        if !nats.write(&r, Some(rev)).await? {
                            continue;
                        }
                    }
                    State::Running => {
                        let _ = nats
                            .client
                            .publish(nats.cancel_subject(&id), "".into())
                            .await;
                    }
                    _ => {}
                }
                return Ok(Some(before));
            }
            Err(format!("job {id} kept changing while being cancelled"))
        })
    }

    /// Deletes finished jobs beyond the newest `keep` and those older than `max_age` seconds,
    /// with their files; their ids.
    pub fn prune(&self, keep: usize, max_age: f64) -> Result<Vec<String>, String> {
        let nats = self.nats.clone();
        self.call(async move { nats.prune(keep, max_age).await })
    }

    /// Feeds the jobs' events from the workers to `server`'s subscribers, records the
    /// latencies of the jobs that end, and prunes the history after each.
    pub fn follow_events(&self, server: std::sync::Weak<crate::Server>) {
        use futures_util::StreamExt;
        let nats = self.nats.clone();
        self.rt.spawn(async move {
            let subject = format!("{}.events.*", nats.opts.prefix);
            let mut sub = match nats.client.subscribe(subject).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("following the workers' events: {e}");
                    return;
                }
            };
            while let Some(msg) = sub.next().await {
                let Some(server) = server.upgrade() else {
                    return;
                };
                let Some(id) = msg.subject.as_str().rsplit('.').next() else {
                    continue;
                };
                let line = String::from_utf8_lossy(&msg.payload).into_owned();
                let event = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v["event"].as_str().map(String::from))
                    .unwrap_or_default();
                if event == "job_started" || !server.hub.is_live(id) {
                    server.hub.open(id);
                }
                server.hub.publish(id, line);
                if event == "job_finished" {
                    server.hub.close(id);
                    if let Ok(Some((r, _))) = nats.record(id).await {
                        if let (Some(s), Some(f)) = (r.job.started, r.job.finished) {
                            server.latencies.record_secs(r.job.submitted, f - s);
                        }
                    }
                    let opts = &server.opts;
                    let max_age = opts.history_max_age.as_secs_f64();
                    match nats.prune(opts.history_limit, max_age).await {
                        Ok(ids) => ids.iter().for_each(|id| server.hub.remove(id)),
                        Err(e) => tracing::error!("pruning the history: {e}"),
                    }
                }
            }
        });
    }

    /// The workers that reported lately.
    pub fn workers(&self) -> Result<Vec<WorkerInfo>, String> {
        let nats = self.nats.clone();
        self.call(async move { nats.worker_infos().await })
    }

    /// Job `id`'s file `name`.
    pub fn file(&self, id: &str, name: &str) -> Result<Vec<u8>, String> {
        let (nats, id, name) = (self.nats.clone(), id.to_string(), name.to_string());
        self.call(async move { nats.file(&id, &name).await })
    }
}
