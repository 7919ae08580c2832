//! The `ditflow` command line: run, watch (hot reload), validate, serve jobs over HTTP, list node
//! types, and draw graphs.
//!
//! Exit codes: 0 success, 1 the run failed (a node failed or the run was cancelled), 2 an invalid
//! graph or bad usage.

mod client;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use ditflow::graph::dot::to_dot;
use ditflow::tensor::device::DeviceRequest;
use ditflow::tensor::Device;
use ditflow::{
    watch_graph, ArgValue, Event, Graph, GraphError, RunOptions, Runtime, Session, WatchOptions,
};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Parser)]
#[command(
    name = "ditflow",
    version,
    about = "Run diffusion-transformer workflow graphs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EventFormat {
    /// One JSON object per line on stdout.
    Jsonl,
}

#[derive(clap::Args)]
struct PluginArgs {
    /// A folder to load plugins from (repeatable); searched before DITFLOW_PLUGIN_PATH and the
    /// executable's folder.
    #[arg(long = "plugins", value_name = "DIR")]
    plugins: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct DeviceArgs {
    /// Where tensors live: cpu, cuda, cuda:N, or auto (the first GPU if one works, else the CPU).
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
    /// On CUDA, trade f32 for tensor-core speed: attention and bf16/f16-weight linears in bf16
    /// or f16 with f32 sums, f32 GEMMs in TF32 (results within about 1e-2 of the CPU's; see
    /// `ditflow ops`). No effect on the CPU.
    #[arg(long = "tensor-cores")]
    tensor_cores: bool,
    /// On a GPU, the type a denoiser's activations are kept in: f32 (the default), bf16 or f16.
    /// The latent and token sequences go in narrowed and the prediction comes back in f32; the
    /// kernels read and write that type with f32 sums. No effect on the CPU.
    #[arg(long = "gpu-activations", value_name = "TYPE")]
    gpu_activations: Option<String>,
    /// On a GPU, cap the model weights it holds (e.g. 8G): weights past the cap stay in host
    /// memory and are uploaded when an op needs them, least recently used let go first.
    #[arg(long = "max-vram", value_name = "SIZE")]
    max_vram: Option<String>,
}

/// Resolves `--device`; `None` means exit 2 (the error is printed).
fn resolve_device(args: &DeviceArgs) -> Option<Device> {
    if args.tensor_cores {
        ditflow::kernels::set_tensor_cores(true);
    }
    if let Some(text) = &args.gpu_activations {
        let set = ditflow::kernels::parse_gpu_activations(text)
            .and_then(ditflow::kernels::set_gpu_activations);
        if let Err(e) = set {
            eprintln!("error: --gpu-activations: {e}");
            return None;
        }
    }
    if let Some(text) = &args.max_vram {
        match ditflow::weights::residency::parse_bytes(text) {
            Ok(bytes) => ditflow::weights::vram::set_cap(Some(bytes)),
            Err(e) => {
                eprintln!("error: --max-vram: {e}");
                return None;
            }
        }
    }
    let text = args.device.as_deref().unwrap_or("auto");
    let request = match text.parse::<DeviceRequest>() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: --device: {e}");
            return None;
        }
    };
    match Device::resolve(request) {
        Ok((device, note)) => {
            if let (Some(note), Some(_)) = (note, &args.device) {
                eprintln!("note: {note}");
            }
            Some(device)
        }
        Err(e) => {
            eprintln!("error: {e}");
            None
        }
    }
}

/// What `run` and `watch` take.
#[derive(clap::Args)]
struct RunArgs {
    /// A YAML document or a Lua script (`.lua`).
    graph: PathBuf,
    /// Set a graph input: `--set prompt="a red circle"` (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    #[command(flatten)]
    plugins: PluginArgs,
    /// Write events to stdout.
    #[arg(long, value_enum)]
    events: Option<EventFormat>,
    /// Folder for files the graph writes.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// Worker threads (default: the number of cores).
    #[arg(long)]
    workers: Option<usize>,
    #[command(flatten)]
    device: DeviceArgs,
    /// Keep at most this much of the models' memory-mapped weights resident (`8G`, `512M`):
    /// the rest stays on disk and is read back as it is used, bit for bit as uncapped, and the
    /// bytes read back are reported (`weights_streamed` events).
    #[arg(long = "max-memory", value_name = "SIZE")]
    max_memory: Option<String>,
}

/// Applies `--max-memory`; false means exit 2 (the error is printed).
fn apply_memory_cap(max_memory: &Option<String>) -> bool {
    let Some(text) = max_memory else {
        return true;
    };
    match ditflow::weights::residency::parse_bytes(text) {
        Ok(bytes) => {
            ditflow::weights::residency::set_cap(Some(bytes));
            true
        }
        Err(e) => {
            eprintln!("error: --max-memory: {e}");
            false
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Validate and run a graph.
    Run(RunArgs),
    /// Run a graph, then re-run it in place whenever its files or a plugin library change
    /// (only what changed executes; loaded models stay loaded). Ctrl-C stops.
    Watch(RunArgs),
    /// Check a graph without running it.
    Validate {
        graph: PathBuf,
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
        #[command(flatten)]
        plugins: PluginArgs,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// List the available node types.
    Nodes {
        /// Print the full schemas as JSON (for graph editors).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// List the tensor engine's ops (what plugins call through `tensor_op`) and the devices.
    Ops,
    /// Print a graph in Graphviz DOT.
    Dot { graph: PathBuf },
    /// Serve graphs as jobs over HTTP, SSE and websockets, with a persistent queue (see the
    /// README's "Serving"). Ctrl-C stops; queued and running jobs are kept for the next start.
    Serve(ServeArgs),
    /// Run jobs queued on NATS JetStream by `ditflow serve --nats` (any number of workers, on
    /// any number of machines). Prints a line per job; Ctrl-C stops between jobs.
    Worker(WorkerArgs),
    /// Submit a graph to a `ditflow serve` as a job, follow its progress, and fetch its files.
    /// Relative paths inside the graph resolve on the server (against its --base).
    Submit {
        graph: PathBuf,
        /// The server, http://HOST:PORT.
        #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8188")]
        server: String,
        /// The API token (default: the DITFLOW_TOKEN environment variable).
        #[arg(long)]
        token: Option<String>,
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
        /// Higher runs first.
        #[arg(long, default_value_t = 0)]
        priority: i64,
        /// Return once the job is queued (print its id) instead of following it.
        #[arg(long = "no-wait")]
        no_wait: bool,
        /// Where the job's files are written.
        #[arg(long, value_name = "DIR", default_value = "out")]
        out: PathBuf,
    },
    /// List your jobs on a `ditflow serve`, newest first.
    Jobs {
        #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8188")]
        server: String,
        #[arg(long)]
        token: Option<String>,
        /// The most jobs listed.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Convert a ComfyUI API-format prompt (workflow_api.json, or a /prompt body) into a ditflow
    /// graph, printed as YAML.
    ImportComfy {
        file: PathBuf,
        /// The folder checkpoint, VAE and image names are relative to (default: the current one).
        #[arg(long, value_name = "DIR")]
        models: Option<PathBuf>,
        /// Write the YAML to this file instead of stdout.
        #[arg(long, short = 'o', value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// `--token`, else DITFLOW_TOKEN.
fn token_arg(token: Option<String>) -> Option<String> {
    token.or_else(|| {
        std::env::var("DITFLOW_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
    })
}

#[allow(clippy::too_many_arguments)]
fn cmd_submit(
    graph: &Path,
    server: &str,
    token: Option<String>,
    set: &[String],
    priority: i64,
    no_wait: bool,
    out: &Path,
) -> anyhow::Result<ExitCode> {
    let usage = |msg: String| {
        eprintln!("error: {msg}");
        Ok(ExitCode::from(2))
    };
    let host = match client::host_of(server) {
        Ok(h) => h,
        Err(e) => return usage(e),
    };
    let text = match std::fs::read_to_string(graph) {
        Ok(t) => t,
        Err(e) => return usage(format!("{}: {e}", graph.display())),
    };
    let format = match graph.extension().and_then(|e| e.to_str()) {
        Some("lua") => "lua",
        Some("json") => "json",
        _ => "yaml",
    };
    let mut args = serde_json::Map::new();
    for s in set {
        match s.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                args.insert(k.trim().to_string(), v.into());
            }
            _ => return usage(format!("--set expects NAME=VALUE, got '{s}'")),
        }
    }
    let token = token_arg(token);
    let body =
        serde_json::json!({"graph": text, "format": format, "args": args, "priority": priority});
    let failed = |msg: String| {
        eprintln!("error: {msg}");
        Ok(ExitCode::from(1))
    };
    let job = match client::request(
        &host,
        "POST",
        "/jobs",
        token.as_deref(),
        Some(body.to_string().as_bytes()),
    )
    .and_then(|r| r.json())
    {
        Ok(j) => j,
        Err(e) => return failed(e),
    };
    let id = job["id"].as_str().unwrap_or_default().to_string();
    if no_wait {
        println!("{id}");
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("job {id} queued on {server}");
    let multi = MultiProgress::new();
    let mut bars: HashMap<String, ProgressBar> = HashMap::new();
    let mut end = serde_json::Value::Null;
    let terminal = std::io::stderr().is_terminal();
    let events = client::request(
        &host,
        "GET",
        &format!("/jobs/{id}/events"),
        token.as_deref(),
        None,
    )
    .and_then(|r| {
        client::follow_events(r, |e| {
            let node = e["node"].as_str().unwrap_or("").to_string();
            match e["event"].as_str().unwrap_or("") {
                "node_progress" if terminal => {
                    let total = e["total"].as_u64().unwrap_or(0);
                    let bar = bars.entry(node.clone()).or_insert_with(|| {
                        let b = multi.add(ProgressBar::new(total));
                        b.set_style(
                            ProgressStyle::with_template(
                                "{prefix:>12} [{bar:30}] {pos}/{len} {elapsed}",
                            )
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                        );
                        b.set_prefix(node.clone());
                        b
                    });
                    bar.set_length(total);
                    bar.set_position(e["step"].as_u64().unwrap_or(0));
                }
                "node_finished" | "node_failed" => {
                    if let Some(b) = bars.remove(&node) {
                        b.finish_and_clear();
                    }
                    if e["event"] == "node_failed" {
                        eprintln!(
                            "node \"{node}\" failed: {}",
                            e["error"].as_str().unwrap_or("")
                        );
                    }
                }
                "job_finished" => end = e,
                _ => {}
            }
        })
    });
    if let Err(e) = events {
        return failed(e);
    }
    let state = end["state"].as_str().unwrap_or("unknown");
    if state != "succeeded" {
        return failed(format!(
            "job {id} {state}: {}",
            end["error"].as_str().unwrap_or("")
        ));
    }
    for (name, value) in end["outputs"].as_object().into_iter().flatten() {
        match value.as_str() {
            Some(s) => println!("{name} = {s}"),
            None => println!("{name} = {value}"),
        }
    }
    for f in end["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str())
    {
        let bytes = match client::request(
            &host,
            "GET",
            &format!("/jobs/{id}/files/{f}"),
            token.as_deref(),
            None,
        )
        .and_then(|r| {
            if r.status == 200 {
                r.bytes()
            } else {
                r.json().map(|_| Vec::new())
            }
        }) {
            Ok(b) => b,
            Err(e) => return failed(format!("{f}: {e}")),
        };
        let path = out.join(f);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_jobs(server: &str, token: Option<String>, limit: usize) -> anyhow::Result<ExitCode> {
    let host = match client::host_of(server) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let token = token_arg(token);
    let list = match client::request(
        &host,
        "GET",
        &format!("/jobs?limit={limit}"),
        token.as_deref(),
        None,
    )
    .and_then(|r| r.json())
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    println!(
        "{:<34} {:<10} {:<8} {:>9}  files",
        "id", "state", "owner", "seconds"
    );
    for j in list["jobs"].as_array().into_iter().flatten() {
        let secs = match (j["started"].as_f64(), j["finished"].as_f64()) {
            (Some(s), Some(f)) => format!("{:.1}", f - s),
            _ => "-".into(),
        };
        let files: Vec<&str> = j["files"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str())
            .collect();
        println!(
            "{:<34} {:<10} {:<8} {:>9}  {}",
            j["id"].as_str().unwrap_or(""),
            j["state"].as_str().unwrap_or(""),
            j["owner"].as_str().unwrap_or(""),
            secs,
            files.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_import_comfy(
    file: &Path,
    models: Option<PathBuf>,
    out: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let fail = |msg: String| {
        eprintln!("error: {msg}");
        Ok(ExitCode::from(2))
    };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => return fail(format!("{}: {e}", file.display())),
    };
    let json: serde_json::Value = match serde_json::from_str(&text) {
        Ok(j) => j,
        Err(e) => return fail(format!("{}: not JSON: {e}", file.display())),
    };
    // A /prompt body holds the prompt under "prompt".
    let prompt = json
        .get("prompt")
        .filter(|p| p.is_object())
        .unwrap_or(&json);
    let models = models.unwrap_or_else(|| PathBuf::from("."));
    let models = std::fs::canonicalize(&models).unwrap_or(models);
    match ditflow_serve::comfy::import::import(prompt, &models, &models) {
        Ok(imported) => {
            match out {
                Some(path) => std::fs::write(&path, &imported.yaml)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{}", imported.yaml),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for e in errors {
                eprintln!("{}: {e}", file.display());
            }
            Ok(ExitCode::from(2))
        }
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The address to listen on (port 0: a free port; the one chosen is printed).
    #[arg(long, default_value = "127.0.0.1:8188")]
    addr: std::net::SocketAddr,
    /// The folder for the job store and the jobs' files.
    #[arg(long, value_name = "DIR", default_value = "ditflow-serve")]
    data: PathBuf,
    /// The folder relative paths in submitted graphs resolve against (default: the current one).
    #[arg(long, value_name = "DIR")]
    base: Option<PathBuf>,
    /// An API token, OWNER:SECRET (repeatable): it sees only its owner's jobs.
    #[arg(long = "token", value_name = "OWNER:SECRET")]
    tokens: Vec<String>,
    /// An admin token, which sees every job (repeatable).
    #[arg(long = "admin-token", value_name = "SECRET")]
    admin_tokens: Vec<String>,
    /// The most jobs waiting; past it submissions are refused with 429.
    #[arg(long = "queue-limit", default_value_t = 100)]
    queue_limit: usize,
    /// Finished jobs kept (with their files).
    #[arg(long = "history-limit", default_value_t = 1000)]
    history_limit: usize,
    /// Days finished jobs are kept.
    #[arg(long = "history-days", default_value_t = 7.0)]
    history_days: f64,
    /// Jobs run at once (0: queue jobs without running them).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Threads for one job's nodes (default: one per core).
    #[arg(long = "run-threads", value_name = "N")]
    run_threads: Option<usize>,
    /// The largest request body accepted (e.g. 16M).
    #[arg(long = "max-body", value_name = "SIZE", default_value = "16M")]
    max_body: String,
    /// Cap the models' memory-mapped weights resident at once (as for `run`).
    #[arg(long = "max-memory", value_name = "SIZE")]
    max_memory: Option<String>,
    #[command(flatten)]
    nats: NatsArgs,
    /// With --nats: seconds a delivered job may go without a worker's heartbeat before it is
    /// delivered again.
    #[arg(long = "ack-wait", value_name = "SECS", default_value_t = 30.0)]
    ack_wait: f64,
    /// With --nats: deliveries after which a job that never finished is marked dead.
    #[arg(long = "max-deliveries", value_name = "N", default_value_t = 3)]
    max_deliveries: u32,
    #[command(flatten)]
    plugins: PluginArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(clap::Args)]
struct NatsArgs {
    /// Queue on NATS JetStream at this URL (nats://HOST:PORT) instead of SQLite.
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// The prefix of the stream, buckets and subjects on NATS (one deployment's namespace).
    #[arg(long = "nats-prefix", value_name = "NAME", default_value = "ditflow")]
    nats_prefix: String,
}

#[derive(clap::Args)]
struct WorkerArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// The worker's name in job records (default: host name and process id).
    #[arg(long)]
    name: Option<String>,
    /// The folder relative paths in graphs resolve against (default: the current one).
    #[arg(long, value_name = "DIR")]
    base: Option<PathBuf>,
    /// Where jobs write their files before they are stored on NATS (default: a temporary
    /// folder).
    #[arg(long, value_name = "DIR")]
    scratch: Option<PathBuf>,
    /// Take jobs in order of how many wait, ignoring which models this worker holds.
    #[arg(long = "no-affinity")]
    no_affinity: bool,
    /// Seconds a worker stays idle before it takes jobs of models it does not hold.
    #[arg(long = "steal-after", value_name = "SECS", default_value_t = 1.0)]
    steal_after: f64,
    /// The most model weights kept loaded between jobs (e.g. 8G; default: all that fit the
    /// memory cap).
    #[arg(long = "keep-models", value_name = "SIZE")]
    keep_models: Option<String>,
    /// Threads for one job's nodes (default: one per core).
    #[arg(long = "run-threads", value_name = "N")]
    run_threads: Option<usize>,
    /// Cap the models' memory-mapped weights resident at once (as for `run`).
    #[arg(long = "max-memory", value_name = "SIZE")]
    max_memory: Option<String>,
    #[command(flatten)]
    plugins: PluginArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

fn secs(name: &str, v: f64) -> Result<std::time::Duration, String> {
    std::time::Duration::try_from_secs_f64(v)
        .map_err(|_| format!("{name} {v}: expected seconds >= 0"))
}

fn cmd_worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let usage = |msg: String| {
        eprintln!("error: {msg}");
        Ok(ExitCode::from(2))
    };
    let Some(url) = args.nats.nats else {
        return usage(
            "a worker needs --nats URL (the NATS server `ditflow serve --nats` queues on)".into(),
        );
    };
    let Some(device) = resolve_device(&args.device) else {
        return Ok(ExitCode::from(2));
    };
    if !apply_memory_cap(&args.max_memory) {
        return Ok(ExitCode::from(2));
    }
    let keep_model_bytes = match args
        .keep_models
        .as_deref()
        .map(ditflow::weights::residency::parse_bytes)
    {
        None => None,
        Some(Ok(b)) => Some(b),
        Some(Err(e)) => return usage(format!("--keep-models: {e}")),
    };
    let steal_after = match secs("--steal-after", args.steal_after) {
        Ok(d) => d,
        Err(e) => return usage(e),
    };
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = args
        .name
        .unwrap_or_else(|| format!("{host}-{}", std::process::id()));
    let scratch = args.scratch.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("ditflow-worker-{}", std::process::id()))
    });
    let mut nats = ditflow_serve::nats::NatsOptions::new(&url);
    nats.prefix = args.nats.nats_prefix;
    let opts = ditflow_serve::nats::worker::WorkerOptions {
        nats,
        name,
        base_dir: args
            .base
            .unwrap_or_else(|| std::env::current_dir().unwrap_or_default()),
        scratch,
        device,
        run_threads: args
            .run_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1),
        affinity: !args.no_affinity,
        steal_after,
        keep_model_bytes,
    };
    let rt = Arc::new(load_runtime(&args.plugins));
    match ditflow_serve::nats::worker::run(opts, rt) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn cmd_serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let Some(device) = resolve_device(&args.device) else {
        return Ok(ExitCode::from(2));
    };
    if !apply_memory_cap(&args.max_memory) {
        return Ok(ExitCode::from(2));
    }
    let usage = |msg: String| {
        eprintln!("error: {msg}");
        Ok(ExitCode::from(2))
    };
    let tokens = match ditflow_serve::auth::Tokens::parse(&args.tokens, &args.admin_tokens) {
        Ok(t) => t,
        Err(e) => return usage(e),
    };
    let max_body = match ditflow::weights::residency::parse_bytes(&args.max_body) {
        Ok(b) => b,
        Err(e) => return usage(format!("--max-body: {e}")),
    };
    if !(args.history_days >= 0.0 && args.history_days.is_finite()) {
        return usage(format!(
            "--history-days {}: expected days >= 0",
            args.history_days
        ));
    }
    if tokens.is_empty() {
        if !args.addr.ip().is_loopback() {
            return usage(format!(
                "serving on {} needs --token or --admin-token (without tokens only a loopback \
                 address is served)",
                args.addr
            ));
        }
        eprintln!("note: no tokens given: every request is served, as its admin (loopback only)");
    }
    let rt = Arc::new(load_runtime(&args.plugins));
    let mut opts = ditflow_serve::ServeOptions::new(args.data);
    opts.addr = args.addr;
    if let Some(base) = args.base {
        opts.base_dir = base;
    }
    opts.tokens = tokens;
    opts.queue_limit = args.queue_limit;
    opts.history_limit = args.history_limit;
    opts.history_max_age = std::time::Duration::from_secs_f64(args.history_days * 86400.0);
    opts.workers = args.workers;
    if let Some(n) = args.run_threads {
        opts.run_threads = n.max(1);
    }
    opts.device = device;
    opts.max_body_bytes = max_body;
    if let Some(url) = args.nats.nats {
        let mut n = ditflow_serve::nats::NatsOptions::new(&url);
        n.prefix = args.nats.nats_prefix;
        n.ack_wait = match secs("--ack-wait", args.ack_wait) {
            Ok(d) if !d.is_zero() => d,
            _ => {
                return usage(format!(
                    "--ack-wait {}: expected seconds > 0",
                    args.ack_wait
                ))
            }
        };
        if args.max_deliveries == 0 {
            return usage("--max-deliveries 0: expected at least 1".into());
        }
        n.max_deliveries = args.max_deliveries;
        opts.nats = Some(n);
    }
    match ditflow_serve::serve(opts, rt) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn load_runtime(args: &PluginArgs) -> Runtime {
    let rt = Runtime::with_plugins(&args.plugins);
    for p in rt.problems() {
        eprintln!("warning: {p}");
    }
    rt
}

/// Parses `NAME=VALUE` pairs.
fn parse_sets(sets: &[String]) -> Result<Vec<(String, ArgValue)>, String> {
    sets.iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), ArgValue::Text(v.to_string())))
            }
            _ => Err(format!("--set expects NAME=VALUE, got '{s}'")),
        })
        .collect()
}

fn print_diagnostics(e: &GraphError) {
    for d in e.diagnostics().0 {
        eprintln!("{d}");
    }
}

/// Loads and validates a graph, printing problems; `None` means exit 2.
fn load_plan(graph: &Path, set: &[String], rt: &Runtime) -> Option<ditflow::exec::plan::Plan> {
    let args = match parse_sets(set) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return None;
        }
    };
    let g = match Graph::from_file(graph) {
        Ok(g) => g,
        Err(e) => {
            print_diagnostics(&e);
            return None;
        }
    };
    match g.plan(rt, &args) {
        Ok(plan) => Some(plan),
        Err(d) => {
            for line in d.0 {
                eprintln!("{line}");
            }
            None
        }
    }
}

/// Progress bars for nodes that report progress, drawn on stderr when it is a terminal.
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<Arc<str>, ProgressBar>>,
}

impl Bars {
    fn on_event(&self, e: &Event) {
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        match e {
            Event::NodeProgress { node, step, total } => {
                let bar = bars.entry(node.clone()).or_insert_with(|| {
                    let b = self.multi.add(ProgressBar::new(*total));
                    b.set_style(
                        ProgressStyle::with_template(
                            "{prefix:>12} [{bar:30}] {pos}/{len} {elapsed} {msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    b.set_prefix(node.to_string());
                    b
                });
                bar.set_length(*total);
                bar.set_position(*step);
            }
            Event::NodePreview {
                node, step, png, ..
            } => {
                // The preview itself travels in the JSON events; the bar says it is there.
                if let Some(bar) = bars.get(node) {
                    bar.set_message(format!(
                        "preview at step {step} ({} bytes)",
                        png.len() * 3 / 4
                    ));
                }
            }
            Event::WeightsStreamed {
                node,
                step: Some(step),
                bytes,
            } => {
                if let Some(bar) = bars.get(node) {
                    bar.set_message(format!(
                        "step {step} read {:.1} MiB of weights from disk (--max-memory)",
                        *bytes as f64 / (1u64 << 20) as f64
                    ));
                }
            }
            Event::NodeFinished { node, .. } | Event::NodeFailed { node, .. } => {
                if let Some(b) = bars.remove(node) {
                    b.finish_and_clear();
                }
            }
            _ => {}
        }
    }
}

/// Run options from the command line, with Ctrl-C wired to `cancel`; `None` means exit 2.
fn run_options(
    events: Option<EventFormat>,
    out: PathBuf,
    workers: Option<usize>,
    device: &DeviceArgs,
) -> Option<RunOptions> {
    let device = resolve_device(device)?;
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        // Ctrl-C asks the run to stop; a second Ctrl-C exits at once.
        let _ = ctrlc::set_handler(move || {
            if cancel.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ncancelling... (Ctrl-C again to quit now)");
        });
    }
    let mut opts = RunOptions {
        out_dir: out,
        cancel,
        device,
        ..RunOptions::default()
    };
    if let Some(w) = workers {
        if w == 0 {
            eprintln!("error: --workers must be at least 1");
            return None;
        }
        opts.workers = w;
    }
    if events == Some(EventFormat::Jsonl) {
        let stdout = Arc::new(Mutex::new(std::io::stdout()));
        opts.subscribers.push(Arc::new(move |e: &Event| {
            let mut out = stdout.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(out, "{}", e.to_json_line());
            let _ = out.flush();
        }));
    } else if std::io::stderr().is_terminal() {
        let bars = Arc::new(Bars {
            multi: MultiProgress::new(),
            bars: Mutex::new(HashMap::new()),
        });
        opts.subscribers
            .push(Arc::new(move |e: &Event| bars.on_event(e)));
    }
    Some(opts)
}

fn cmd_run(
    RunArgs {
        graph,
        set,
        plugins,
        events,
        out,
        workers,
        device,
        max_memory,
    }: RunArgs,
) -> anyhow::Result<ExitCode> {
    if !apply_memory_cap(&max_memory) {
        return Ok(ExitCode::from(2));
    }
    let Some(opts) = run_options(events, out, workers, &device) else {
        return Ok(ExitCode::from(2));
    };
    let rt = load_runtime(&plugins);
    let Some(plan) = load_plan(&graph, &set, &rt) else {
        return Ok(ExitCode::from(2));
    };
    let session = Session::new(Arc::new(rt));
    let report = session.run_plan(&plan, &opts);
    for f in &report.failed {
        eprintln!(
            "error: node '{}' ({}) failed: {}",
            f.node, f.node_type, f.error
        );
    }
    if !report.skipped.is_empty() {
        let names: Vec<&str> = report.skipped.iter().map(|s| &**s).collect();
        eprintln!("note: not run: {}", names.join(", "));
    }
    if events.is_none() {
        for (name, value) in &report.outputs {
            println!("{name} = {value}");
        }
        eprintln!(
            "{} in {:.0} ms: {} executed, {} cached, {} failed",
            if report.cancelled {
                "cancelled"
            } else if report.ok() {
                "finished"
            } else {
                "failed"
            },
            report.ms,
            report.executed.len(),
            report.cached.len(),
            report.failed.len()
        );
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn cmd_watch(
    RunArgs {
        graph,
        set,
        plugins,
        events,
        out,
        workers,
        device,
        max_memory,
    }: RunArgs,
) -> anyhow::Result<ExitCode> {
    if !apply_memory_cap(&max_memory) {
        return Ok(ExitCode::from(2));
    }
    let args = match parse_sets(&set) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let Some(mut run) = run_options(events, out, workers, &device) else {
        return Ok(ExitCode::from(2));
    };
    let watch = WatchOptions {
        plugin_dirs: ditflow::plugin::search_path(&plugins.plugins),
        // Ctrl-C ends the watch (and cancels a run in progress).
        stop: run.cancel.clone(),
        ..WatchOptions::default()
    };
    if events.is_none() {
        run.subscribers.push(Arc::new(|e: &Event| match e {
            Event::GraphLoaded { graph, .. } => eprintln!("loaded {graph}"),
            Event::GraphInvalid { errors, .. } => {
                for line in errors {
                    eprintln!("{line}");
                }
                eprintln!("note: the graph is invalid; keeping the last good one (waiting for changes)");
            }
            Event::PluginReloaded {
                plugin, node_types, ..
            } => eprintln!("reloaded plugin '{plugin}' ({} node types)", node_types.len()),
            Event::PluginLoaded {
                plugin, node_types, ..
            } => eprintln!("loaded plugin '{plugin}' ({} node types)", node_types.len()),
            Event::PluginRefused { error, .. } => {
                eprintln!("error: {error}\nnote: keeping the plugin's previous build")
            }
            Event::NodeFailed { node, error } => eprintln!("error: node '{node}' failed: {error}"),
            Event::RunFinished {
                ok,
                ms,
                executed,
                cached,
                failed,
                ..
            } => eprintln!(
                "{} in {ms:.0} ms: {executed} executed, {cached} cached, {failed} failed; watching for changes (Ctrl-C to stop)",
                if *ok { "finished" } else { "failed" }
            ),
            _ => {}
        }));
    }
    let session = Session::new(Arc::new(load_runtime(&plugins)));
    match watch_graph(&session, &graph, &args, &run, &watch) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn cmd_ops() -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "ops (inputs; attributes; ? marks an optional input):"
    )?;
    for op in ditflow::tensor::op_call::OPS {
        writeln!(
            stdout,
            "  {:<15} ({}; {})\n      {}",
            op.name,
            op.inputs.join(", "),
            op.attrs.join(", "),
            op.doc
        )?;
    }
    let cuda = match ditflow::kernels::cuda_available(0) {
        Ok(()) => "cuda:0 available".to_string(),
        Err(why) => format!("no CUDA: {why}"),
    };
    writeln!(
        stdout,
        "\ndevices: cpu ({} threads); {cuda}",
        rayon_threads()
    )?;
    writeln!(
        stdout,
        "\ntensor-core paths on CUDA (with --tensor-cores or DITFLOW_TENSOR_CORES=1; now {}):",
        if ditflow::kernels::tensor_cores() {
            "on"
        } else {
            "off"
        }
    )?;
    for (op, how) in ditflow::kernels::TENSOR_CORE_OPS {
        writeln!(stdout, "  {op:<15} {how}")?;
    }
    writeln!(
        stdout,
        "\nbf16/f16 activations on CUDA (with --gpu-activations or DITFLOW_GPU_ACTIVATIONS; now {}): {}",
        ditflow::kernels::gpu_activations().name(),
        ditflow::kernels::HALF_ACTIVATION_OPS.join(", ")
    )?;
    Ok(ExitCode::SUCCESS)
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn cmd_nodes(json: bool, plugins: PluginArgs) -> anyhow::Result<ExitCode> {
    let rt = load_runtime(&plugins);
    let mut stdout = std::io::stdout().lock();
    if json {
        let all: Vec<serde_json::Value> = rt.registry().iter().map(|t| t.to_json()).collect();
        let doc = serde_json::json!({"abi": format!("{}.{}", ditflow_plugin::abi::DF_ABI_MAJOR, ditflow_plugin::abi::DF_ABI_MINOR), "nodes": all});
        writeln!(stdout, "{}", serde_json::to_string_pretty(&doc)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if rt.registry().is_empty() {
        writeln!(
            stdout,
            "no node types found; load plugins with --plugins DIR or DITFLOW_PLUGIN_PATH"
        )?;
    }
    let registry = rt.registry();
    let mut by_category: Vec<_> = registry.iter().collect();
    by_category.sort_by(|a, b| (&a.category, &a.name).cmp(&(&b.category, &b.name)));
    let mut last = None;
    for t in by_category {
        if last != Some(&t.category) {
            writeln!(
                stdout,
                "\n{}:",
                if t.category.is_empty() {
                    "other"
                } else {
                    &t.category
                }
            )?;
            last = Some(&t.category);
        }
        let ins: Vec<String> = t
            .inputs
            .iter()
            .map(|p| {
                if p.required() {
                    format!("{}: {}", p.name, p.ty)
                } else {
                    format!("[{}: {}]", p.name, p.ty)
                }
            })
            .collect();
        let outs: Vec<String> = t
            .outputs
            .iter()
            .map(|p| format!("{}: {}", p.name, p.ty))
            .collect();
        writeln!(
            stdout,
            "  {} ({}) -> {}    [{}]",
            t.name,
            ins.join(", "),
            outs.join(", "),
            t.plugin.name
        )?;
        if !t.doc.is_empty() {
            writeln!(stdout, "      {}", t.doc.lines().next().unwrap_or(""))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return Ok(ExitCode::from(code));
        }
    };
    match cli.command {
        Command::Run(args) => cmd_run(args),
        Command::Watch(args) => cmd_watch(args),
        Command::Validate {
            graph,
            set,
            plugins,
            device,
        } => {
            if resolve_device(&device).is_none() {
                return Ok(ExitCode::from(2));
            }
            let rt = load_runtime(&plugins);
            Ok(match load_plan(&graph, &set, &rt) {
                Some(_) => {
                    println!("{}: ok", graph.display());
                    ExitCode::SUCCESS
                }
                None => ExitCode::from(2),
            })
        }
        Command::Nodes { json, plugins } => cmd_nodes(json, plugins),
        Command::Ops => cmd_ops(),
        Command::Serve(args) => cmd_serve(args),
        Command::Worker(args) => cmd_worker(args),
        Command::ImportComfy { file, models, out } => cmd_import_comfy(&file, models, out),
        Command::Submit {
            graph,
            server,
            token,
            set,
            priority,
            no_wait,
            out,
        } => cmd_submit(&graph, &server, token, &set, priority, no_wait, &out),
        Command::Jobs {
            server,
            token,
            limit,
        } => cmd_jobs(&server, token, limit),
        Command::Dot { graph } => match Graph::from_file(&graph) {
            Ok(g) => {
                print!("{}", to_dot(g.ir()));
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                print_diagnostics(&e);
                Ok(ExitCode::from(2))
            }
        },
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(if std::env::var_os("DITFLOW_DEBUG").is_some() {
            tracing::Level::DEBUG
        } else {
            tracing::Level::WARN
        })
        .init();
    match real_main().context("ditflow") {
        Ok(code) => code,
        // `ditflow ops | head`: a closed pipe is not an error.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
