//! `ditflow serve`: graphs run as jobs behind an HTTP and websocket API.
//!
//! - [`jobs`]: what a client submits, checked before it is queued;
//! - [`queue`]: the queue and history the routes use: [`store`], SQLite on one machine, both
//!   kept across restarts; or [`nats`], NATS JetStream with `ditflow worker`s on many machines;
//! - [`worker`]: runs queued jobs on one session, so models stay loaded between jobs;
//! - [`hub`]: each job's events for its websocket and SSE subscribers;
//! - [`auth`]: API tokens, each seeing only its owner's jobs;
//! - [`http`]: the routes, `/health` and `/metrics`;
//! - [`comfy`]: ComfyUI's routes and API-format prompts, for its clients.

pub mod auth;
pub mod comfy;
pub mod http;
pub mod hub;
pub mod jobs;
pub mod nats;
pub mod queue;
pub mod store;
pub mod worker;

use ditflow::tensor::Device;
use ditflow::{Runtime, Session};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    /// The job store and the jobs' files.
    pub data_dir: PathBuf,
    /// Relative paths in submitted graphs (models, images) resolve against this folder.
    pub base_dir: PathBuf,
    pub tokens: auth::Tokens,
    /// The most jobs waiting; past it submissions get a 429.
    pub queue_limit: usize,
    /// Finished jobs kept, by count and by age.
    pub history_limit: usize,
    pub history_max_age: Duration,
    /// Jobs run at once (0: accept and queue jobs without running them).
    pub workers: usize,
    /// Threads for one run's nodes.
    pub run_threads: usize,
    pub device: Device,
    /// The largest request body accepted.
    pub max_body_bytes: usize,
    /// Queue on NATS JetStream instead of SQLite (jobs then run on `ditflow worker`s).
    pub nats: Option<nats::NatsOptions>,
}

impl ServeOptions {
    pub fn new(data_dir: PathBuf) -> ServeOptions {
        ServeOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 8188)),
            base_dir: std::env::current_dir().unwrap_or_default(),
            data_dir,
            tokens: auth::Tokens::default(),
            queue_limit: 100,
            history_limit: 1000,
            history_max_age: Duration::from_secs(7 * 24 * 3600),
            workers: 1,
            run_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            device: Device::Cpu,
            max_body_bytes: 16 << 20,
            nats: None,
        }
    }
}

/// Latency counters for `/metrics`.
#[derive(Default)]
pub struct Latencies {
    /// Jobs finished, and the sums of their seconds from submission to end and of running.
    pub finished: AtomicU64,
    pub total_micros: AtomicU64,
    pub run_micros: AtomicU64,
}

impl Latencies {
    /// Counts a job submitted at `submitted` (seconds since the epoch) that ran `run` seconds.
    pub fn record_secs(&self, submitted: f64, run: f64) {
        self.finished.fetch_add(1, Ordering::Relaxed);
        self.run_micros
            .fetch_add((run.max(0.0) * 1e6) as u64, Ordering::Relaxed);
        let total = (store::now() - submitted).max(0.0);
        self.total_micros
            .fetch_add((total * 1e6) as u64, Ordering::Relaxed);
    }

    /// [`Latencies::record_secs`] for a run started at `started`.
    pub fn record(&self, submitted: f64, started: Instant) {
        self.record_secs(submitted, started.elapsed().as_secs_f64());
    }
}

/// Everything the routes and the workers share.
pub struct Server {
    pub opts: ServeOptions,
    pub runtime: Arc<Runtime>,
    pub session: Session,
    pub queue: queue::Queue,
    pub hub: Arc<hub::Hub>,
    /// The cancel flags of running jobs.
    pub running: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// Wakes idle workers when a job is queued.
    pub wake: (Mutex<u64>, Condvar),
    pub shutdown: AtomicBool,
    pub latencies: Latencies,
    /// Identifies this server process (for load balancers telling instances apart).
    pub instance: String,
    pub started: Instant,
    /// ComfyUI's prompt numbers.
    pub numbers: AtomicU64,
}

/// A random hex id of 16 bytes.
pub fn random_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if ok.is_err() {
        // No urandom: time and a counter, unique within the process.
        static N: AtomicU64 = AtomicU64::new(0);
        let t = store::now().to_bits() ^ N.fetch_add(1, Ordering::Relaxed).rotate_left(32);
        bytes[..8].copy_from_slice(&t.to_le_bytes());
        bytes[8..].copy_from_slice(&(std::process::id() as u64).to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Server {
    /// Opens the store under `opts.data_dir` (created if missing).
    pub fn new(opts: ServeOptions, runtime: Arc<Runtime>) -> Result<Arc<Server>, String> {
        std::fs::create_dir_all(opts.data_dir.join("results"))
            .map_err(|e| format!("{}: {e}", opts.data_dir.display()))?;
        let queue = match &opts.nats {
            Some(n) => {
                let mut n = n.clone();
                n.queue_limit = opts.queue_limit;
                queue::Queue::Nats(nats::NatsQueue::connect(n)?)
            }
            None => {
                let db = opts.data_dir.join("jobs.sqlite");
                let store = store::Store::open(&db, opts.queue_limit)
                    .map_err(|e| format!("{}: {e}", db.display()))?;
                queue::Queue::Sqlite(store)
            }
        };
        let server = Arc::new(Server {
            session: Session::new(runtime.clone()),
            runtime,
            queue,
            hub: Arc::default(),
            running: Mutex::new(HashMap::new()),
            wake: (Mutex::new(0), Condvar::new()),
            shutdown: AtomicBool::new(false),
            latencies: Latencies::default(),
            instance: random_id()[..12].to_string(),
            started: Instant::now(),
            numbers: AtomicU64::new(0),
            opts,
        });
        if let queue::Queue::Nats(n) = &server.queue {
            n.follow_events(Arc::downgrade(&server));
        }
        Ok(server)
    }

    /// The next ComfyUI prompt number.
    pub fn next_number(&self) -> u64 {
        self.numbers.fetch_add(1, Ordering::Relaxed)
    }

    /// A job's files.
    pub fn results_dir(&self, id: &str) -> PathBuf {
        self.opts.data_dir.join("results").join(id)
    }

    /// Wakes a worker (a job was queued, or the server is stopping).
    pub fn notify(&self) {
        let (lock, cv) = &self.wake;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        cv.notify_all();
    }
}

/// Runs the server until Ctrl-C: binds `opts.addr`, prints `listening on http://ADDR` on stdout
/// (with the port chosen when it was 0), starts the workers and serves.
pub fn serve(opts: ServeOptions, runtime: Arc<Runtime>) -> Result<(), String> {
    let server = Server::new(opts, runtime)?;
    // On NATS, `ditflow worker`s run the jobs.
    let local = if server.queue.distributed() {
        0
    } else {
        server.opts.workers
    };
    let workers: Vec<_> = (0..local)
        .map(|i| worker::spawn(server.clone(), i))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("the async runtime: {e}"))?;
    let result = rt.block_on(http::serve(server.clone()));
    server.shutdown.store(true, Ordering::SeqCst);
    for flag in server
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
    {
        flag.store(true, Ordering::SeqCst);
    }
    server.notify();
    for w in workers {
        let _ = w.join();
    }
    result
}
