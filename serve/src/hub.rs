//! Each job's events, for its websocket and SSE subscribers: the lines so far (a subscriber
//! arriving late gets them first) and the live ones, until the job ends.
//!
//! Lines are the runtime's event JSON (`node_started`, `node_progress`, `node_preview`, ...) and
//! the server's own `job_started` and `job_finished`. A job's backlog keeps its last
//! [`BACKLOG_BYTES`] of lines; previews beyond that are dropped from the backlog first, as they
//! are the bulk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// The most bytes of lines kept per job for late subscribers.
pub const BACKLOG_BYTES: usize = 8 << 20;

struct JobEvents {
    backlog: Vec<Arc<str>>,
    bytes: usize,
    /// `None` once the job has ended: receivers then end after the last line.
    tx: Option<broadcast::Sender<Arc<str>>>,
}

/// Every job's events.
pub struct Hub {
    jobs: Mutex<HashMap<String, JobEvents>>,
    /// Every line of every job, `(job id, line)`, for front-ends that follow a client's jobs
    /// (ComfyUI's websocket).
    all: broadcast::Sender<(Arc<str>, Arc<str>)>,
}

impl Default for Hub {
    fn default() -> Hub {
        Hub {
            jobs: Mutex::default(),
            all: broadcast::channel(4096).0,
        }
    }
}

/// A subscription: the lines so far, then the live ones (`None` when the job has ended).
pub struct Subscription {
    pub backlog: Vec<Arc<str>>,
    pub live: Option<broadcast::Receiver<Arc<str>>>,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, JobEvents>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens job `id`'s stream (when it starts running).
    pub fn open(&self, id: &str) {
        let (tx, _) = broadcast::channel(1024);
        self.lock().insert(
            id.to_string(),
            JobEvents {
                backlog: Vec::new(),
                bytes: 0,
                tx: Some(tx),
            },
        );
    }

    /// Whether job `id`'s stream is open and not ended.
    pub fn is_live(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|ev| ev.tx.is_some())
    }

    /// Adds a line to job `id`'s stream.
    pub fn publish(&self, id: &str, line: String) {
        let mut jobs = self.lock();
        let Some(ev) = jobs.get_mut(id) else {
            return;
        };
        let line: Arc<str> = line.into();
        ev.bytes += line.len();
        ev.backlog.push(line.clone());
        while ev.bytes > BACKLOG_BYTES && ev.backlog.len() > 1 {
            // Previews first, then the oldest lines.
            let i = ev
                .backlog
                .iter()
                .position(|l| l.contains("\"node_preview\""))
                .unwrap_or(0);
            let gone = ev.backlog.remove(i);
            ev.bytes -= gone.len();
        }
        if let Some(tx) = &ev.tx {
            // No receiver is fine: nobody is listening live.
            let _ = tx.send(line.clone());
        }
        let _ = self.all.send((id.into(), line));
    }

    /// Ends job `id`'s stream: live subscribers finish after the last line.
    pub fn close(&self, id: &str) {
        if let Some(ev) = self.lock().get_mut(id) {
            ev.tx = None;
        }
    }

    /// Subscribes to job `id`'s stream; `None` when the server has no stream for it (a job
    /// that has not started, or ended before this server started).
    pub fn subscribe(&self, id: &str) -> Option<Subscription> {
        let jobs = self.lock();
        let ev = jobs.get(id)?;
        Some(Subscription {
            backlog: ev.backlog.clone(),
            live: ev.tx.as_ref().map(|tx| tx.subscribe()),
        })
    }

    /// Every job's lines from now on.
    pub fn follow_all(&self) -> broadcast::Receiver<(Arc<str>, Arc<str>)> {
        self.all.subscribe()
    }

    /// Forgets job `id`'s stream (its job was pruned from the history).
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_subscribers_get_the_backlog_then_the_live_lines_until_the_end() {
        let hub = Hub::default();
        hub.open("j");
        hub.publish("j", "one".into());
        let mut sub = hub.subscribe("j").unwrap();
        assert_eq!(sub.backlog.len(), 1);
        hub.publish("j", "two".into());
        hub.close("j");
        let live = sub.live.as_mut().unwrap();
        assert_eq!(&*live.try_recv().unwrap(), "two");
        assert!(live.try_recv().is_err(), "closed after the last line");
        let late = hub.subscribe("j").unwrap();
        assert_eq!(late.backlog.len(), 2);
        assert!(late.live.is_none());
        assert!(hub.subscribe("unknown").is_none());
    }
}
