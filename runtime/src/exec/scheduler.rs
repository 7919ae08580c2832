//! The scheduler: runs a plan on a bounded pool of worker threads, independent branches
//! concurrently, looking each node up in the cache by its input signature first.
//!
//! The main thread owns all bookkeeping (ready set, results, failures); workers only execute one
//! node at a time and report back. A failed node fails only its descendants. Cancellation is
//! cooperative: nothing new starts, and running nodes see `is_cancelled`.

use super::cache::{Cache, Outputs};
use super::context::ExecContext;
use super::events::{Event, Subscriber};
use super::plan::{CacheKey, InputSource, KeyHasher, Plan};
use crate::value::Value;
use crate::weights::residency;
use ditflow_plugin::panic_message;
use std::collections::VecDeque;
use std::hash::Hash;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

static RUN_COUNTER: AtomicU64 = AtomicU64::new(1);

/// How a run is carried out.
#[derive(Clone)]
pub struct RunOptions {
    /// Worker threads (at least 1).
    pub workers: usize,
    /// Where nodes write relative output paths.
    pub out_dir: PathBuf,
    /// Set to stop the run.
    pub cancel: Arc<AtomicBool>,
    pub subscribers: Vec<Subscriber>,
    /// The device nodes put their tensors on.
    pub device: crate::tensor::Device,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            out_dir: PathBuf::from("out"),
            cancel: Arc::new(AtomicBool::new(false)),
            device: crate::tensor::Device::Cpu,
            subscribers: Vec::new(),
        }
    }
}

/// A node that failed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFailure {
    pub node: Arc<str>,
    pub node_type: String,
    pub error: String,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub run: u64,
    /// The graph's outputs that were produced, in declaration order.
    pub outputs: Vec<(String, Arc<Value>)>,
    /// Nodes executed, in completion order.
    pub executed: Vec<Arc<str>>,
    /// Nodes whose outputs came from the cache.
    pub cached: Vec<Arc<str>>,
    pub failed: Vec<NodeFailure>,
    /// Nodes not run because of an upstream failure or cancellation.
    pub skipped: Vec<Arc<str>>,
    pub cancelled: bool,
    pub ms: f64,
}

impl RunReport {
    pub fn ok(&self) -> bool {
        self.failed.is_empty() && self.skipped.is_empty() && !self.cancelled
    }

    pub fn output(&self, name: &str) -> Option<&Arc<Value>> {
        self.outputs.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

struct Job {
    index: usize,
    inputs: Vec<Option<Arc<Value>>>,
    key: CacheKey,
}

enum Outcome {
    Executed(Outputs, f64),
    Cached(Outputs),
    Failed(String),
    Cancelled,
}

struct Done {
    index: usize,
    key: CacheKey,
    outcome: Outcome,
}

fn emit(subscribers: &[Subscriber], event: &Event) {
    for s in subscribers {
        // A subscriber's panic must not take a worker down.
        let _ = catch_unwind(AssertUnwindSafe(|| s(event)));
    }
}

/// Runs one node (on a worker thread) and reports its outcome to subscribers from there, so a
/// node's events are ordered with the work itself.
fn execute(plan: &Plan, job: Job, opts: &RunOptions, cache: &Mutex<Cache>) -> Done {
    let done = execute_node(plan, job, opts, cache);
    let id = plan.nodes[done.index].id.clone();
    match &done.outcome {
        Outcome::Executed(_, ms) => emit(
            &opts.subscribers,
            &Event::NodeFinished { node: id, ms: *ms },
        ),
        Outcome::Cached(_) => emit(&opts.subscribers, &Event::NodeCached { node: id }),
        Outcome::Failed(error) => emit(
            &opts.subscribers,
            &Event::NodeFailed {
                node: id,
                error: error.clone(),
            },
        ),
        Outcome::Cancelled => {}
    }
    done
}

fn execute_node(plan: &Plan, job: Job, opts: &RunOptions, cache: &Mutex<Cache>) -> Done {
    let node = &plan.nodes[job.index];
    let mut key = job.key;
    if opts.cancel.load(Ordering::Relaxed) {
        return Done {
            index: job.index,
            key,
            outcome: Outcome::Cancelled,
        };
    }
    let subscribers = &opts.subscribers;
    // Weights read back from disk under the memory cap, reported per step and at the end.
    let streamed_at = AtomicU64::new(residency::streamed_bytes());
    let report_streamed = |step: Option<u64>| {
        if residency::cap().is_none() {
            return;
        }
        let now = residency::streamed_bytes();
        let before = streamed_at.swap(now, Ordering::Relaxed);
        if now > before {
            emit(
                subscribers,
                &Event::WeightsStreamed {
                    node: node.id.clone(),
                    step,
                    bytes: now - before,
                },
            );
        }
    };
    let progress = |step: u64, total: u64| {
        emit(
            subscribers,
            &Event::NodeProgress {
                node: node.id.clone(),
                step,
                total,
            },
        );
        report_streamed(Some(step));
    };
    let preview = |step: u64, total: u64, png: &[u8]| {
        emit(
            subscribers,
            &Event::NodePreview {
                node: node.id.clone(),
                step,
                total,
                png: super::events::base64(png),
            },
        );
    };
    let mut ctx = ExecContext {
        node_id: &node.id,
        node_type: &node.ty,
        inputs: &job.inputs,
        outputs: vec![None; node.ty.outputs.len()],
        error: None,
        progress: &progress,
        preview: &preview,
        cancel: &opts.cancel,
        graph_dir: &plan.graph_dir,
        out_dir: &opts.out_dir,
        keep_alive: None,
        device: opts.device,
        weight_bytes: 0,
    };
    let imp = node.ty.imp.clone();
    let fail = |key, e: String| Done {
        index: job.index,
        key,
        outcome: Outcome::Failed(e),
    };
    // Constants were range-checked by validation; linked values are checked here.
    for ((port, src), value) in node.ty.inputs.iter().zip(&node.inputs).zip(&job.inputs) {
        let bounded = port.min.is_some() || port.max.is_some() || !port.choices.is_empty();
        if let (true, InputSource::Link { .. }, Some(v)) = (bounded, src, value) {
            if let Err(e) = port.check_value(v) {
                return fail(key, format!("input {e}"));
            }
        }
    }
    match catch_unwind(AssertUnwindSafe(|| imp.fingerprint(&mut ctx))) {
        Ok(Ok(Some(fp))) => {
            let mut h = KeyHasher::default();
            (key, fp).hash(&mut h);
            key = h.key();
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => return fail(key, format!("fingerprint: {e}")),
        Err(p) => {
            return fail(
                key,
                format!("fingerprint panicked: {}", panic_message(p.as_ref())),
            )
        }
    }
    if node.ty.cacheable {
        let hit = cache.lock().unwrap_or_else(|p| p.into_inner()).get(key);
        if let Some(outputs) = hit {
            return Done {
                index: job.index,
                key,
                outcome: Outcome::Cached(outputs),
            };
        }
    }
    emit(
        subscribers,
        &Event::NodeStarted {
            node: node.id.clone(),
            r#type: node.ty.name.clone(),
        },
    );
    let t0 = Instant::now();
    let result = match catch_unwind(AssertUnwindSafe(|| imp.execute(&mut ctx))) {
        Ok(r) => r,
        Err(p) => Err(format!("panicked: {}", panic_message(p.as_ref()))),
    };
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    report_streamed(None);
    if let Err(e) = result {
        return fail(key, e);
    }
    let missing: Vec<&str> = node
        .ty
        .outputs
        .iter()
        .zip(&ctx.outputs)
        .filter(|(_, v)| v.is_none())
        .map(|(p, _)| p.name.as_str())
        .collect();
    if !missing.is_empty() {
        return fail(
            key,
            format!("the node did not set output(s) {}", missing.join(", ")),
        );
    }
    let outputs: Outputs = std::mem::take(&mut ctx.outputs).into();
    if node.ty.cacheable {
        cache.lock().unwrap_or_else(|p| p.into_inner()).insert_from(
            key,
            outputs.clone(),
            Some(node.ty.plugin.clone()),
        );
    }
    Done {
        index: job.index,
        key,
        outcome: Outcome::Executed(outputs, ms),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Done,
    Failed,
    Skipped,
}

/// Runs `plan`, reusing and filling `cache`.
pub fn run_plan(plan: &Plan, opts: &RunOptions, cache: &Mutex<Cache>) -> RunReport {
    let t0 = Instant::now();
    let run = RUN_COUNTER.fetch_add(1, Ordering::Relaxed);
    let n = plan.nodes.len();
    let workers = opts.workers.max(1).min(n.max(1));
    emit(
        &opts.subscribers,
        &Event::RunStarted {
            run,
            nodes: n,
            workers,
        },
    );

    let dependents = plan.dependents();
    let mut waiting_on: Vec<usize> = plan
        .nodes
        .iter()
        .map(|node| {
            let mut ups: Vec<usize> = node
                .inputs
                .iter()
                .filter_map(|s| match s {
                    InputSource::Link { node, .. } => Some(*node),
                    _ => None,
                })
                .collect();
            ups.sort_unstable();
            ups.dedup();
            ups.len()
        })
        .collect();
    let mut state = vec![State::Waiting; n];
    let mut results: Vec<Option<(CacheKey, Outputs)>> = vec![None; n];
    let mut ready: VecDeque<usize> = (0..n).filter(|&i| waiting_on[i] == 0).collect();
    let mut report = RunReport {
        run,
        ..RunReport::default()
    };

    std::thread::scope(|scope| {
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        for _ in 0..workers {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            scope.spawn(move || loop {
                let job = job_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                match job {
                    Ok(job) => {
                        if done_tx.send(execute(plan, job, opts, cache)).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            });
        }
        drop(done_tx);

        let mut running = 0usize;
        loop {
            let cancelled = opts.cancel.load(Ordering::Relaxed);
            while let Some(i) = ready.pop_front() {
                if cancelled {
                    ready.push_front(i);
                    break;
                }
                let node = &plan.nodes[i];
                let mut inputs = Vec::with_capacity(node.inputs.len());
                let mut h = KeyHasher::default();
                node.static_key.hash(&mut h);
                for src in &node.inputs {
                    inputs.push(match src {
                        InputSource::Value(v) => Some(v.clone()),
                        InputSource::Absent => None,
                        InputSource::Link { node: up, port } => {
                            let (up_key, outputs) = results[*up].as_ref().expect("upstream done");
                            up_key.hash(&mut h);
                            outputs[*port].clone()
                        }
                    });
                }
                if !node.ty.cacheable || !node.ty.deterministic || node.ty.side_effects {
                    // Its outputs may differ every run: so do its descendants' keys.
                    run.hash(&mut h);
                }
                state[i] = State::Running;
                running += 1;
                if job_tx
                    .send(Job {
                        index: i,
                        inputs,
                        key: h.key(),
                    })
                    .is_err()
                {
                    break;
                }
            }
            if running == 0 {
                break;
            }
            let Ok(done) = done_rx.recv() else { break };
            running -= 1;
            let node = &plan.nodes[done.index];
            let ok = match done.outcome {
                Outcome::Executed(outputs, _) => {
                    report.executed.push(node.id.clone());
                    results[done.index] = Some((done.key, outputs));
                    true
                }
                Outcome::Cached(outputs) => {
                    report.cached.push(node.id.clone());
                    results[done.index] = Some((done.key, outputs));
                    true
                }
                Outcome::Failed(error) => {
                    report.failed.push(NodeFailure {
                        node: node.id.clone(),
                        node_type: node.ty.name.clone(),
                        error,
                    });
                    false
                }
                Outcome::Cancelled => {
                    emit(
                        &opts.subscribers,
                        &Event::NodeSkipped {
                            node: node.id.clone(),
                            reason: "cancelled".into(),
                        },
                    );
                    report.skipped.push(node.id.clone());
                    false
                }
            };
            state[done.index] = if ok { State::Done } else { State::Failed };
            if ok {
                for &d in &dependents[done.index] {
                    waiting_on[d] -= 1;
                    if waiting_on[d] == 0 && state[d] == State::Waiting {
                        ready.push_back(d);
                    }
                }
            } else {
                skip_descendants(plan, &dependents, done.index, &mut state, &mut report, opts);
            }
        }
        drop(job_tx);
    });

    report.cancelled = opts.cancel.load(Ordering::Relaxed);
    for (i, st) in state.iter_mut().enumerate() {
        if *st == State::Waiting {
            *st = State::Skipped;
            let reason = if report.cancelled {
                "cancelled"
            } else {
                "not reached"
            };
            emit(
                &opts.subscribers,
                &Event::NodeSkipped {
                    node: plan.nodes[i].id.clone(),
                    reason: reason.into(),
                },
            );
            report.skipped.push(plan.nodes[i].id.clone());
        }
    }
    for out in &plan.outputs {
        if let Some((_, outputs)) = &results[out.node] {
            if let Some(v) = &outputs[out.port] {
                report.outputs.push((out.name.clone(), v.clone()));
            }
        }
    }
    report.ms = t0.elapsed().as_secs_f64() * 1e3;
    emit(
        &opts.subscribers,
        &Event::RunFinished {
            run,
            ok: report.ok(),
            cancelled: report.cancelled,
            ms: report.ms,
            executed: report.executed.len(),
            cached: report.cached.len(),
            failed: report.failed.len(),
        },
    );
    report
}

fn skip_descendants(
    plan: &Plan,
    dependents: &[Vec<usize>],
    failed: usize,
    state: &mut [State],
    report: &mut RunReport,
    opts: &RunOptions,
) {
    let cause = &plan.nodes[failed].id;
    let mut stack: Vec<usize> = dependents[failed].clone();
    while let Some(d) = stack.pop() {
        if state[d] != State::Waiting {
            continue;
        }
        state[d] = State::Skipped;
        let reason = format!("upstream node '{cause}' did not finish");
        emit(
            &opts.subscribers,
            &Event::NodeSkipped {
                node: plan.nodes[d].id.clone(),
                reason,
            },
        );
        report.skipped.push(plan.nodes[d].id.clone());
        stack.extend(dependents[d].iter().copied());
    }
}
