//! The job store: the queue and the history in one SQLite database, so both survive a restart.
//!
//! A job is `queued`, then `running`, then `succeeded`, `failed` or `cancelled`. The queue is
//! bounded: [`Store::submit`] refuses a job past `queue_limit` queued ones. The next job is the
//! one of highest priority, then the oldest. Jobs a stopped server left running go back to the
//! queue when the store is opened again. Finished jobs are kept up to a count and an age
//! ([`Store::prune`]). A job submitted again under an id the store knows is not queued twice.

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Mutex;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Delivered to workers more times than allowed without finishing (scale-out only: its
    /// workers died or stopped answering); it is not delivered again.
    Dead,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Queued,
        State::Running,
        State::Succeeded,
        State::Failed,
        State::Cancelled,
        State::Dead,
    ];

    pub fn name(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
            State::Dead => "dead",
        }
    }

    fn parse(s: &str) -> State {
        match s {
            "queued" => State::Queued,
            "running" => State::Running,
            "succeeded" => State::Succeeded,
            "cancelled" => State::Cancelled,
            "dead" => State::Dead,
            _ => State::Failed,
        }
    }

    pub fn finished(self) -> bool {
        matches!(
            self,
            State::Succeeded | State::Failed | State::Cancelled | State::Dead
        )
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub owner: String,
    pub priority: i64,
    pub state: State,
    /// Seconds since the Unix epoch.
    pub submitted: f64,
    pub started: Option<f64>,
    pub finished: Option<f64>,
    pub error: Option<String>,
    /// The graph's outputs, rendered as JSON.
    pub outputs: serde_json::Value,
    /// The files the job wrote, by name.
    pub files: Vec<String>,
    /// What a front-end keeps with the job (a ComfyUI prompt's client id, number and nodes).
    pub meta: serde_json::Value,
}

/// What a job runs: the graph's text, its format and its inputs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Source {
    pub graph: String,
    pub format: String,
    /// Graph inputs as a JSON object.
    pub args: serde_json::Value,
}

/// Why a submission was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} jobs waiting); try again later")]
    Full(usize),
    #[error("job store: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("job queue: {0}")]
    Queue(String),
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The queue and history.
pub struct Store {
    conn: Mutex<Connection>,
    queue_limit: usize,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    submitted REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    outputs TEXT NOT NULL DEFAULT 'null',
    files TEXT NOT NULL DEFAULT '[]',
    graph TEXT NOT NULL,
    format TEXT NOT NULL,
    args TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority DESC, seq);
";

const COLUMNS: &str =
    "id, owner, priority, state, submitted, started, finished, error, outputs, files, meta";

fn job_of(row: &rusqlite::Row) -> rusqlite::Result<Job> {
    let text = |i: usize| -> rusqlite::Result<String> { row.get(i) };
    Ok(Job {
        id: row.get(0)?,
        owner: row.get(1)?,
        priority: row.get(2)?,
        state: State::parse(&text(3)?),
        submitted: row.get(4)?,
        started: row.get(5)?,
        finished: row.get(6)?,
        error: row.get(7)?,
        outputs: serde_json::from_str(&text(8)?).unwrap_or(serde_json::Value::Null),
        files: serde_json::from_str(&text(9)?).unwrap_or_default(),
        meta: serde_json::from_str(&text(10)?).unwrap_or(serde_json::Value::Null),
    })
}

impl Store {
    /// Opens (or creates) the store at `path`; jobs left running go back to the queue.
    pub fn open(path: &Path, queue_limit: usize) -> rusqlite::Result<Store> {
        let conn = Connection::open(path)?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")?;
        conn.execute_batch(SCHEMA)?;
        conn.execute(
            "UPDATE jobs SET state = 'queued', started = NULL WHERE state = 'running'",
            [],
        )?;
        Ok(Store {
            conn: Mutex::new(conn),
            queue_limit,
        })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a job under `id` for `owner`. The job the store has under that id already when
    /// there is one (a resubmission is not queued twice).
    pub fn submit(
        &self,
        id: &str,
        owner: &str,
        priority: i64,
        source: &Source,
        meta: &serde_json::Value,
    ) -> Result<Job, SubmitError> {
        let db = self.db();
        if let Some(job) = Self::get_in(&db, id)? {
            return Ok(job);
        }
        let queued: usize = db.query_row(
            "SELECT COUNT(*) FROM jobs WHERE state = 'queued'",
            [],
            |r| r.get::<_, i64>(0),
        )? as usize;
        if queued >= self.queue_limit {
            return Err(SubmitError::Full(queued));
        }
        db.execute(
            "INSERT INTO jobs (id, owner, priority, state, submitted, graph, format, args, meta)
             VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?7, ?8)",
            params![
                id,
                owner,
                priority,
                now(),
                source.graph,
                source.format,
                source.args.to_string(),
                meta.to_string()
            ],
        )?;
        Ok(Self::get_in(&db, id)?.expect("just inserted"))
    }

    /// Takes the next queued job (highest priority, then oldest) and marks it running.
    pub fn claim_next(&self) -> rusqlite::Result<Option<(Job, Source)>> {
        let db = self.db();
        let next: Option<(String, String, String, String)> = db
            .query_row(
                "SELECT id, graph, format, args FROM jobs WHERE state = 'queued'
                 ORDER BY priority DESC, seq LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((id, graph, format, args)) = next else {
            return Ok(None);
        };
        db.execute(
            "UPDATE jobs SET state = 'running', started = ?2 WHERE id = ?1",
            params![id, now()],
        )?;
        let job = Self::get_in(&db, &id)?.expect("just read");
        let args = serde_json::from_str(&args).unwrap_or(serde_json::Value::Null);
        Ok(Some((
            job,
            Source {
                graph,
                format,
                args,
            },
        )))
    }

    /// Records how a running job ended.
    pub fn finish(
        &self,
        id: &str,
        state: State,
        error: Option<&str>,
        outputs: &serde_json::Value,
        files: &[String],
    ) -> rusqlite::Result<()> {
        self.db().execute(
            "UPDATE jobs SET state = ?2, finished = ?3, error = ?4, outputs = ?5, files = ?6
             WHERE id = ?1",
            params![
                id,
                state.name(),
                now(),
                error,
                outputs.to_string(),
                serde_json::Value::from(files.to_vec()).to_string()
            ],
        )?;
        Ok(())
    }

    /// Cancels a queued job (it will not run); returns the job's state before, or `None` for an
    /// unknown id. A running job is left to the caller, who stops the run.
    pub fn cancel(&self, id: &str) -> rusqlite::Result<Option<State>> {
        let db = self.db();
        let Some(job) = Self::get_in(&db, id)? else {
            return Ok(None);
        };
        if job.state == State::Queued {
            db.execute(
                "UPDATE jobs SET state = 'cancelled', finished = ?2 WHERE id = ?1",
                params![id, now()],
            )?;
        }
        Ok(Some(job.state))
    }

    fn get_in(db: &Connection, id: &str) -> rusqlite::Result<Option<Job>> {
        db.query_row(
            &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"),
            [id],
            job_of,
        )
        .optional()
    }

    pub fn get(&self, id: &str) -> rusqlite::Result<Option<Job>> {
        Self::get_in(&self.db(), id)
    }

    /// The newest `limit` jobs, of `owner` only when given.
    pub fn list(&self, owner: Option<&str>, limit: usize) -> rusqlite::Result<Vec<Job>> {
        let db = self.db();
        let limit = limit.min(i64::MAX as usize) as i64;
        let mut st = db.prepare(&format!(
            "SELECT {COLUMNS} FROM jobs WHERE (?1 IS NULL OR owner = ?1)
             ORDER BY seq DESC LIMIT ?2"
        ))?;
        let rows = st.query_map(params![owner, limit], job_of)?;
        rows.collect()
    }

    /// Jobs in each state.
    pub fn counts(&self) -> rusqlite::Result<Vec<(State, usize)>> {
        let db = self.db();
        let mut st = db.prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
        let rows = st.query_map([], |r| {
            Ok((
                State::parse(&r.get::<_, String>(0)?),
                r.get::<_, i64>(1)? as usize,
            ))
        })?;
        rows.collect()
    }

    /// Deletes finished jobs beyond the newest `keep`, and those finished more than `max_age`
    /// seconds ago; returns their ids (so their files can go too).
    pub fn prune(&self, keep: usize, max_age: f64) -> rusqlite::Result<Vec<String>> {
        let db = self.db();
        let keep = keep.min(i64::MAX as usize) as i64;
        let cutoff = now() - max_age;
        let mut st = db.prepare(
            "SELECT id FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled')
             AND (finished < ?2 OR seq NOT IN (
                 SELECT seq FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled')
                 ORDER BY seq DESC LIMIT ?1))",
        )?;
        let ids: Vec<String> = st
            .query_map(params![keep, cutoff], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for id in &ids {
            db.execute("DELETE FROM jobs WHERE id = ?1", [id])?;
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> Source {
        Source {
            graph: "version: 1".into(),
            format: "yaml".into(),
            args: serde_json::json!({}),
        }
    }

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ditflow-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("jobs.sqlite")
    }

    #[test]
    fn jobs_run_by_priority_then_age_and_the_queue_survives_a_restart() {
        let path = temp("order");
        let s = Store::open(&path, 10).unwrap();
        for (id, prio) in [("a", 0), ("b", 5), ("c", 0), ("d", 5)] {
            s.submit(id, "alice", prio, &source(), &serde_json::json!({}))
                .unwrap();
        }
        let (first, _) = s.claim_next().unwrap().unwrap();
        assert_eq!(first.id, "b");
        drop(s);
        // Reopened: "b" was running, so it is queued again, ahead of "d" (older, same priority).
        let s = Store::open(&path, 10).unwrap();
        let order: Vec<String> =
            std::iter::from_fn(|| s.claim_next().unwrap().map(|(j, _)| j.id)).collect();
        assert_eq!(order, ["b", "d", "a", "c"]);
    }

    #[test]
    fn a_full_queue_refuses_and_a_resubmitted_id_is_not_queued_twice() {
        let s = Store::open(&temp("full"), 2).unwrap();
        s.submit("a", "alice", 0, &source(), &serde_json::json!({}))
            .unwrap();
        s.submit("b", "alice", 0, &source(), &serde_json::json!({}))
            .unwrap();
        assert!(matches!(
            s.submit("c", "alice", 0, &source(), &serde_json::json!({})),
            Err(SubmitError::Full(2))
        ));
        // "a" again: the same job, no new one.
        assert_eq!(
            s.submit("a", "alice", 0, &source(), &serde_json::json!({}))
                .unwrap()
                .id,
            "a"
        );
        assert_eq!(s.list(None, 10).unwrap().len(), 2);
    }

    #[test]
    fn history_is_pruned_by_count_and_cancelling_a_queued_job_stops_it() {
        let s = Store::open(&temp("prune"), 10).unwrap();
        for id in ["a", "b", "c", "d"] {
            s.submit(id, "bob", 0, &source(), &serde_json::json!({}))
                .unwrap();
        }
        assert_eq!(s.cancel("d").unwrap(), Some(State::Queued));
        assert_eq!(s.get("d").unwrap().unwrap().state, State::Cancelled);
        assert_eq!(s.cancel("zz").unwrap(), None);
        for _ in 0..3 {
            let (j, _) = s.claim_next().unwrap().unwrap();
            s.finish(&j.id, State::Succeeded, None, &serde_json::json!({}), &[])
                .unwrap();
        }
        assert!(
            s.claim_next().unwrap().is_none(),
            "the cancelled job does not run"
        );
        // Keep the newest two finished: "c" and "d" stay.
        let mut gone = s.prune(2, 1e9).unwrap();
        gone.sort();
        assert_eq!(gone, ["a", "b"]);
        assert_eq!(s.list(Some("bob"), 10).unwrap().len(), 2);
        // By age: everything finished is older than -1 seconds.
        assert_eq!(s.prune(100, -1.0).unwrap().len(), 2);
    }
}
