//! The HTTP routes. Every route but `/health` needs a token ([`crate::auth`]); a job of another
//! owner is a 404 (as if it did not exist), not a 403.
//!
//! | route | |
//! |---|---|
//! | `POST /jobs` | submit `{graph, format?, args?, priority?, id?}`: 201 with the job; 400 with located errors; 429 when the queue is full; 413 past the body limit |
//! | `GET /jobs` | the caller's jobs, newest first (`?limit=N`) |
//! | `GET /jobs/{id}` | one job: state, times, outputs, files |
//! | `DELETE /jobs/{id}` | cancel: a queued job never runs, a running one is stopped |
//! | `GET /jobs/{id}/events` | the job's events as server-sent events |
//! | `GET /jobs/{id}/ws` | the same over a websocket, one JSON text message per event |
//! | `GET /jobs/{id}/files/{name}` | a file the job wrote, with its content type |
//! | `GET /health` | `{ok, instance}` |
//! | `GET /metrics` | Prometheus text: queue depth, jobs by state, latencies, loaded models, memory |
//!
//! ComfyUI's routes are in [`crate::comfy`].

use crate::auth::{token_of, Caller};
use crate::jobs::{check, Submission};
use crate::store::{Job, State, SubmitError};
use crate::Server;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, State as Ctx};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

type S = Arc<Server>;

/// An error response: a status and `{"error": message, ...extra}`.
pub struct ApiError(pub StatusCode, pub serde_json::Value);

impl ApiError {
    pub fn new(status: StatusCode, msg: impl Into<String>) -> ApiError {
        ApiError(status, serde_json::json!({ "error": msg.into() }))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// The caller of a request, from its token.
fn caller(s: &Server, headers: &HeaderMap, uri: &Uri) -> Result<Caller, ApiError> {
    if s.opts.tokens.is_empty() {
        // No tokens configured: a local, single-user server.
        return Ok(Caller {
            owner: "local".into(),
            admin: true,
        });
    }
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = token_of(auth, uri.query()).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "a token is needed: 'Authorization: Bearer TOKEN' or '?token=TOKEN'",
        )
    })?;
    s.opts
        .tokens
        .caller(token)
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unknown token"))
}

/// The caller of a request, as a handler argument: a request without a known token is
/// answered 401 before the handler runs.
pub struct Who(pub Caller);

impl axum::extract::FromRequestParts<S> for Who {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &S,
    ) -> Result<Who, ApiError> {
        caller(s, &parts.headers, &parts.uri).map(Who)
    }
}

/// Job `id` when the caller may see it; a 404 otherwise.
pub(crate) fn visible_job(s: &Server, who: &Caller, id: &str) -> Result<Job, ApiError> {
    match s.queue.get(id).map_err(internal)? {
        Some(job) if who.sees(&job.owner) => Ok(job),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no job '{id}'"),
        )),
    }
}

pub fn router(server: S) -> Router {
    let limit = server.opts.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/workers", get(workers))
        .route("/jobs", get(list).post(submit))
        .route("/jobs/{id}", get(job).delete(cancel))
        .route("/jobs/{id}/events", get(events_sse))
        .route("/jobs/{id}/ws", get(events_ws))
        .route("/jobs/{id}/files/{*name}", get(file))
        .merge(crate::comfy::routes())
        .layer(DefaultBodyLimit::max(limit))
        .with_state(server)
}

/// Serves until Ctrl-C (or SIGTERM).
pub async fn serve(server: S) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(server.opts.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", server.opts.addr))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening on http://{addr}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    axum::serve(listener, router(server))
        .with_graceful_shutdown(async {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("a SIGTERM handler");
                tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            }
            #[cfg(not(unix))]
            let _ = ctrl_c.await;
        })
        .await
        .map_err(|e| e.to_string())
}

async fn health(Ctx(s): Ctx<S>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "ok": true, "instance": s.instance }))
}

async fn submit(
    Ctx(s): Ctx<S>,
    Who(who): Who,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let sub: Submission = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("the request body: {e}")))?;
    let server = s.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let source = check(&sub, &server.runtime, &server.opts.base_dir)?;
        Ok::<_, crate::jobs::Refusal>((sub, source))
    })
    .await
    .map_err(internal)?;
    let (sub, source) = checked.map_err(|r| {
        ApiError(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": r.message, "errors": r.errors }),
        )
    })?;
    let id = match &sub.id {
        // A client's id is scoped to its owner, so two owners never share a job.
        Some(id) => format!("{}-{id}", who.owner),
        None => crate::random_id(),
    };
    let job = enqueue(&s, &who, &id, sub.priority, &source, &serde_json::json!({}))?;
    Ok((StatusCode::CREATED, Json(job_json(&s, &job))).into_response())
}

/// Queues a checked job for `who` and wakes a worker: the job already under `id` when it is
/// theirs, a 409 when it is another owner's, a 429 when the queue is full.
pub(crate) fn enqueue(
    s: &Server,
    who: &Caller,
    id: &str,
    priority: i64,
    source: &crate::store::Source,
    meta: &serde_json::Value,
) -> Result<Job, ApiError> {
    // Jobs on NATS go to the subject of the models they load, for workers that hold them.
    let model = if s.queue.distributed() {
        crate::jobs::parse(source, &s.opts.base_dir)
            .map(|g| crate::nats::affinity::model_key(&g, &s.runtime, &source.args))
            .unwrap_or_else(|_| "none".into())
    } else {
        String::new()
    };
    let job = match s
        .queue
        .submit(id, &who.owner, priority, source, meta, &model)
    {
        Ok(job) if who.sees(&job.owner) => job,
        Ok(_) => return Err(ApiError::new(StatusCode::CONFLICT, "that id is taken")),
        Err(e @ SubmitError::Full(_)) => {
            return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()))
        }
        Err(e) => return Err(internal(e)),
    };
    s.notify();
    Ok(job)
}

fn job_json(s: &Server, job: &Job) -> serde_json::Value {
    let mut v = serde_json::to_value(job).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("instance".into(), s.instance.clone().into());
    }
    v
}

#[derive(serde::Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

async fn list(
    Ctx(s): Ctx<S>,
    Who(who): Who,
    Query(q): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let owner = (!who.admin).then_some(who.owner.as_str());
    let jobs = s
        .queue
        .list(owner, q.limit.unwrap_or(100).min(1000))
        .map_err(internal)?;
    Ok(Json(serde_json::json!({
        "jobs": jobs.iter().map(|j| job_json(&s, j)).collect::<Vec<_>>(),
    })))
}

async fn job(
    Ctx(s): Ctx<S>,
    Who(who): Who,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(job_json(&s, &visible_job(&s, &who, &id)?)))
}

async fn cancel(
    Ctx(s): Ctx<S>,
    Who(who): Who,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    visible_job(&s, &who, &id)?;
    // On NATS, a running job's worker is told by the queue.
    let before = s.queue.cancel(&id).map_err(internal)?;
    if before == Some(State::Running) {
        if let Some(flag) = s.running.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
            flag.store(true, Ordering::SeqCst);
        }
    }
    Ok(Json(job_json(&s, &visible_job(&s, &who, &id)?)))
}

/// The job's event lines: the backlog, then live ones until the job ends. A queued job's
/// stream starts when it runs; a job that ended before this server started gives its end.
fn event_lines(s: S, job: Job) -> impl Stream<Item = Arc<str>> {
    enum Phase {
        Waiting,
        Backlog(
            std::vec::IntoIter<Arc<str>>,
            Option<tokio::sync::broadcast::Receiver<Arc<str>>>,
        ),
        Live(tokio::sync::broadcast::Receiver<Arc<str>>),
        Done,
    }
    stream::unfold((Phase::Waiting, s, job), |(mut phase, s, job)| async move {
        loop {
            phase = match phase {
                Phase::Waiting => match s.hub.subscribe(&job.id) {
                    Some(sub) => Phase::Backlog(sub.backlog.into_iter(), sub.live),
                    None => {
                        let now = s.queue.get(&job.id).ok().flatten();
                        match now {
                            Some(j) if j.state.finished() => {
                                let line: Arc<str> = serde_json::json!({
                                    "event": "job_finished",
                                    "job": j.id,
                                    "state": j.state,
                                    "error": j.error,
                                    "outputs": j.outputs,
                                    "files": j.files,
                                })
                                .to_string()
                                .into();
                                return Some((line, (Phase::Done, s, job)));
                            }
                            Some(_) => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                Phase::Waiting
                            }
                            None => return None,
                        }
                    }
                },
                Phase::Backlog(mut lines, live) => match lines.next() {
                    Some(l) => return Some((l, (Phase::Backlog(lines, live), s, job))),
                    None => live.map_or(Phase::Done, Phase::Live),
                },
                Phase::Live(mut rx) => match rx.recv().await {
                    Ok(l) => return Some((l, (Phase::Live(rx), s, job))),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Phase::Live(rx),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => Phase::Done,
                },
                Phase::Done => return None,
            }
        }
    })
}

async fn events_sse(
    Ctx(s): Ctx<S>,
    Who(who): Who,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let job = visible_job(&s, &who, &id)?;
    let lines = event_lines(s, job).map(|l| Ok(SseEvent::default().data(&*l)));
    Ok(Sse::new(lines))
}

async fn events_ws(
    Ctx(s): Ctx<S>,
    Who(who): Who,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let job = visible_job(&s, &who, &id)?;
    Ok(ws.on_upgrade(move |socket| send_lines(socket, s, job)))
}

async fn send_lines(mut socket: WebSocket, s: S, job: Job) {
    let mut lines = Box::pin(event_lines(s, job));
    while let Some(l) = lines.next().await {
        if socket
            .send(Message::Text(l.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

/// The content type of a job's file, by its extension.
pub fn content_type(name: &str) -> &'static str {
    let ext = name.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "png" | "apng" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "json" => "application/json",
        "txt" | "log" => "text/plain; charset=utf-8",
        "yaml" | "yml" => "application/yaml",
        _ => "application/octet-stream",
    }
}

/// Whether `name` is a plain relative path (no `..`, no root, no backslashes or NULs).
pub fn safe_relative(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains(['\\', '\0'])
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

async fn file(
    Ctx(s): Ctx<S>,
    Who(who): Who,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let job = visible_job(&s, &who, &id)?;
    if !safe_relative(&name) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("'{name}' is not a file name of this job"),
        ));
    }
    job_file(&s, &job, &name).await
}

/// File `name` that `job` wrote, with its content type; a 404 for a name it did not write.
pub(crate) async fn job_file(s: &Server, job: &Job, name: &str) -> Result<Response, ApiError> {
    if !job.files.iter().any(|f| f == name) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("job '{}' has no file '{name}'", job.id),
        ));
    }
    let bytes = s
        .queue
        .file(&s.results_dir(&job.id), &job.id, name)
        .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, e))?;
    Ok((
        [(header::CONTENT_TYPE, content_type(name))],
        Body::from(bytes),
    )
        .into_response())
}

/// `GET /workers`: the NATS workers that reported lately (empty on SQLite, where this server
/// runs the jobs itself).
async fn workers(Ctx(s): Ctx<S>, _authorised: Who) -> Result<Json<serde_json::Value>, ApiError> {
    let list = s.queue.workers().map_err(internal)?;
    Ok(Json(serde_json::json!({
        "queue": if s.queue.distributed() { "nats" } else { "sqlite" },
        "workers": list,
    })))
}

/// The resident set size of this process, from `/proc/self/statm`.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

async fn metrics(Ctx(s): Ctx<S>, _authorised: Who) -> Result<Response, ApiError> {
    let counts = s.queue.counts().map_err(internal)?;
    let count = |st: State| counts.iter().find(|(c, _)| *c == st).map_or(0, |(_, n)| *n);
    let cache = s.session.cache_stats();
    let lat = &s.latencies;
    let mut out = String::new();
    // Each line is the name, then a suffix (labels, or a summary's `_sum`/`_count`), then the value.
    let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, f64)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in lines {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    metric(
        "ditflow_queue_depth",
        "gauge",
        "Jobs waiting to run.",
        vec![(String::new(), count(State::Queued) as f64)],
    );
    metric(
        "ditflow_jobs",
        "gauge",
        "Jobs in the store by state.",
        State::ALL
            .iter()
            .map(|&st| (format!("{{state=\"{}\"}}", st.name()), count(st) as f64))
            .collect(),
    );
    let finished = lat.finished.load(Ordering::Relaxed) as f64;
    for (name, help, micros) in [
        (
            "ditflow_job_seconds",
            "Seconds from submission to the end, of jobs finished since the server started.",
            &lat.total_micros,
        ),
        (
            "ditflow_run_seconds",
            "Seconds running, of jobs finished since the server started.",
            &lat.run_micros,
        ),
    ] {
        let sum = micros.load(Ordering::Relaxed) as f64 / 1e6;
        metric(
            name,
            "summary",
            help,
            vec![("_sum".into(), sum), ("_count".into(), finished)],
        );
    }
    metric(
        "ditflow_models_loaded",
        "gauge",
        "Models held by the session's cache.",
        vec![(String::new(), cache.models as f64)],
    );
    metric(
        "ditflow_model_bytes",
        "gauge",
        "Bytes of the cached models' weights.",
        vec![(String::new(), cache.model_bytes as f64)],
    );
    if s.queue.distributed() {
        let workers = s.queue.workers().map_err(internal)?;
        let per = |f: &dyn Fn(&crate::nats::WorkerInfo) -> f64| {
            workers
                .iter()
                .map(|w| (format!("{{worker=\"{}\"}}", w.name), f(w)))
                .collect::<Vec<_>>()
        };
        metric(
            "ditflow_workers",
            "gauge",
            "NATS workers that reported lately.",
            vec![(String::new(), workers.len() as f64)],
        );
        metric(
            "ditflow_worker_models_loaded",
            "gauge",
            "Models held by each NATS worker's session.",
            per(&|w| w.models_loaded as f64),
        );
        metric(
            "ditflow_worker_model_bytes",
            "gauge",
            "Bytes of the weights each NATS worker holds.",
            per(&|w| w.model_bytes as f64),
        );
    }
    metric(
        "ditflow_resident_bytes",
        "gauge",
        "Resident memory of the server process.",
        vec![(String::new(), resident_bytes().unwrap_or(0) as f64)],
    );
    metric(
        "ditflow_uptime_seconds",
        "counter",
        "Seconds since the server started.",
        vec![(String::new(), s.started.elapsed().as_secs_f64())],
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_names_are_served_with_their_types() {
        for ok in ["out.png", "frames/0001.png", "a.b.wav"] {
            assert!(safe_relative(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a\\b",
            "a\0",
        ] {
            assert!(!safe_relative(bad), "{bad:?}");
        }
        assert_eq!(content_type("x.PNG"), "image/png");
        assert_eq!(content_type("clip.mp4"), "video/mp4");
        assert_eq!(
            content_type("weights.safetensors"),
            "application/octet-stream"
        );
    }
}
