//! The queue and history behind the routes: SQLite on one machine (the default), or NATS
//! JetStream across machines (`--nats`). Both answer the same calls; on NATS, jobs are run by
//! `ditflow worker` processes rather than by the server.

use crate::nats::NatsQueue;
use crate::store::{Job, Source, State, Store, SubmitError};
use std::path::Path;

pub enum Queue {
    Sqlite(Store),
    Nats(NatsQueue),
}

impl Queue {
    /// Whether jobs run elsewhere (on NATS workers).
    pub fn distributed(&self) -> bool {
        matches!(self, Queue::Nats(_))
    }

    /// Queues a job under `id` for `owner` (`model`: its model key, for NATS's subjects). The
    /// job already under `id` when there is one.
    pub fn submit(
        &self,
        id: &str,
        owner: &str,
        priority: i64,
        source: &Source,
        meta: &serde_json::Value,
        model: &str,
    ) -> Result<Job, SubmitError> {
        match self {
            Queue::Sqlite(s) => s.submit(id, owner, priority, source, meta),
            Queue::Nats(n) => n.submit(id, owner, priority, source, meta, model),
        }
    }

    pub fn get(&self, id: &str) -> Result<Option<Job>, String> {
        match self {
            Queue::Sqlite(s) => s.get(id).map_err(|e| e.to_string()),
            Queue::Nats(n) => n.get(id),
        }
    }

    /// The newest `limit` jobs, of `owner` only when given.
    pub fn list(&self, owner: Option<&str>, limit: usize) -> Result<Vec<Job>, String> {
        match self {
            Queue::Sqlite(s) => s.list(owner, limit).map_err(|e| e.to_string()),
            Queue::Nats(n) => n.list(owner, limit),
        }
    }

    /// Jobs in each state.
    pub fn counts(&self) -> Result<Vec<(State, usize)>, String> {
        match self {
            Queue::Sqlite(s) => s.counts().map_err(|e| e.to_string()),
            Queue::Nats(n) => n.counts(),
        }
    }

    /// Cancels a queued job; the state before (`None`: no such job). A running job is stopped
    /// by the caller on SQLite, by a message to its worker on NATS.
    pub fn cancel(&self, id: &str) -> Result<Option<State>, String> {
        match self {
            Queue::Sqlite(s) => s.cancel(id).map_err(|e| e.to_string()),
            Queue::Nats(n) => n.cancel(id),
        }
    }

    /// Deletes finished jobs past the bounds; their ids.
    pub fn prune(&self, keep: usize, max_age: f64) -> Result<Vec<String>, String> {
        match self {
            Queue::Sqlite(s) => s.prune(keep, max_age).map_err(|e| e.to_string()),
            Queue::Nats(n) => n.prune(keep, max_age),
        }
    }

    /// The next job for this server's own workers (none on NATS: workers pull there).
    pub fn claim_next(&self) -> Result<Option<(Job, Source)>, String> {
        match self {
            Queue::Sqlite(s) => s.claim_next().map_err(|e| e.to_string()),
            Queue::Nats(_) => Ok(None),
        }
    }

    /// Records how a job this server ran ended.
    pub fn finish(
        &self,
        id: &str,
        state: State,
        error: Option<&str>,
        outputs: &serde_json::Value,
        files: &[String],
    ) -> Result<(), String> {
        match self {
            Queue::Sqlite(s) => s
                .finish(id, state, error, outputs, files)
                .map_err(|e| e.to_string()),
            Queue::Nats(_) => Err("jobs on NATS are finished by their workers".into()),
        }
    }

    /// The workers running this queue's jobs elsewhere (none on SQLite: they are this
    /// server's threads).
    pub fn workers(&self) -> Result<Vec<crate::nats::WorkerInfo>, String> {
        match self {
            Queue::Sqlite(_) => Ok(Vec::new()),
            Queue::Nats(n) => n.workers(),
        }
    }

    /// File `name` of job `id` (`results_dir`: its folder on this machine).
    pub fn file(&self, results_dir: &Path, id: &str, name: &str) -> Result<Vec<u8>, String> {
        match self {
            Queue::Sqlite(_) => {
                std::fs::read(results_dir.join(name)).map_err(|e| format!("{name}: {e}"))
            }
            Queue::Nats(n) => n.file(id, name),
        }
    }
}
