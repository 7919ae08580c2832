//! ComfyUI's server API on ditflow's jobs, in ComfyUI's shapes, so its API clients
//! (`script_examples/basic_api_example.py`, `websockets_api_example.py`) work unchanged:
//! `POST /prompt` takes an API-format prompt ([`import`]) and queues it as a job; `/queue`,
//! `/history`, `/interrupt`, `/view`, `/object_info` (from ditflow's node schemas) and the
//! `/ws?clientId=` websocket (`status`, `execution_start`, `execution_cached`, `executing`,
//! `progress`, `executed`, `execution_success`, `execution_error`, and `executing` with a null
//! node at the end), every route also under `/api`. A job's images are served by `/view` with
//! the job's id as their `subfolder`. Tokens apply as to the other routes.

pub mod import;

use crate::http::{visible_job, ApiError, Who};
use crate::store::{Job, Source, State};
use crate::Server;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State as Ctx};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value as Json_};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

type S = Arc<Server>;

/// The ComfyUI routes, at `/` and under `/api`.
pub fn routes() -> Router<S> {
    let r = Router::new()
        .route("/prompt", post(prompt).get(prompt_info))
        .route("/queue", get(queue).post(queue_edit))
        .route("/interrupt", post(interrupt))
        .route("/history", get(history))
        .route("/history/{id}", get(history_one))
        .route("/view", get(view))
        .route("/upload/image", post(upload_image))
        .route("/object_info", get(object_info))
        .route("/object_info/{class}", get(object_info_one))
        .route("/ws", get(ws));
    Router::new().merge(r.clone()).nest("/api", r)
}

fn comfy_error(status: StatusCode, kind: &str, message: String, node_errors: Json_) -> ApiError {
    ApiError(
        status,
        json!({
            "error": {"type": kind, "message": message, "details": "", "extra_info": {}},
            "node_errors": node_errors,
        }),
    )
}

/// Whether `job` came in through `/prompt`.
fn is_prompt(job: &Job) -> bool {
    job.meta.get("comfy").is_some()
}

/// ComfyUI's queue item: `[number, prompt_id, prompt, extra_data, outputs_to_execute]`.
fn queue_item(job: &Job) -> Json_ {
    let c = &job.meta["comfy"];
    json!([
        c["number"],
        job.id,
        c["prompt"],
        c["extra_data"],
        c["outputs"]
    ])
}

async fn prompt(
    Ctx(s): Ctx<S>,
    Who(who): Who,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: Json_ = serde_json::from_slice(&body).map_err(|e| {
        comfy_error(
            StatusCode::BAD_REQUEST,
            "invalid_prompt",
            format!("the request body: {e}"),
            json!({}),
        )
    })?;
    let Some(graph) = body.get("prompt") else {
        return Err(comfy_error(
            StatusCode::BAD_REQUEST,
            "no_prompt",
            "no 'prompt' in the body".into(),
            json!({}),
        ));
    };
    let models = s.opts.base_dir.clone();
    let imported = import::import(graph, &models, &inputs_dir(&s, &who)).map_err(|errs| {
        let mut by_node: HashMap<String, Json_> = HashMap::new();
        let mut general = Vec::new();
        for e in &errs {
            match &e.node {
                Some(n) => {
                    let entry = by_node.entry(n.clone()).or_insert_with(|| {
                        json!({"errors": [], "dependent_outputs": [], "class_type": e.class_type})
                    });
                    entry["errors"].as_array_mut().expect("an array").push(json!({
                        "type": "import", "message": e.message, "details": e.to_string(), "extra_info": {},
                    }));
                }
                None => general.push(e.message.clone()),
            }
        }
        let msg = if general.is_empty() {
            "Prompt outputs failed validation".to_string()
        } else {
            general.join("; ")
        };
        comfy_error(StatusCode::BAD_REQUEST, "prompt_outputs_failed_validation", msg, json!(by_node))
    })?;
    let source = Source {
        graph: imported.yaml.clone(),
        format: "yaml".into(),
        args: json!({}),
    };
    // Checked as any submission, so a node type or input problem is a 400 here too.
    let server = s.clone();
    let check_source = source.clone();
    tokio::task::spawn_blocking(move || {
        crate::jobs::validate(&check_source, &server.runtime, &server.opts.base_dir)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|r| {
        let located: Vec<String> = r
            .errors
            .iter()
            .map(|e| {
                format!(
                    "{}:{}:{}: {}",
                    e["file"].as_str().unwrap_or(""),
                    e["line"],
                    e["col"],
                    e["message"].as_str().unwrap_or("")
                )
            })
            .collect();
        comfy_error(
            StatusCode::BAD_REQUEST,
            "prompt_outputs_failed_validation",
            format!("{}: {}", r.message, located.join("; ")),
            json!({}),
        )
    })?;
    let id = match body.get("prompt_id").and_then(Json_::as_str) {
        Some(p) if crate::http::safe_relative(p) && !p.contains('/') && p.len() <= 64 => {
            p.to_string()
        }
        Some(p) => {
            return Err(comfy_error(
                StatusCode::BAD_REQUEST,
                "invalid_prompt",
                format!("prompt_id '{p}'"),
                json!({}),
            ))
        }
        None => crate::random_id(),
    };
    let number = s.next_number();
    let outputs: Vec<&String> = imported.images.iter().map(|(n, _)| n).collect();
    let nodes: serde_json::Map<String, Json_> = graph
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v["class_type"].clone()))
        .collect();
    let meta = json!({"comfy": {
        "client_id": body.get("client_id").cloned().unwrap_or(Json_::Null),
        "number": number,
        "prompt": graph,
        "extra_data": body.get("extra_data").cloned().unwrap_or(json!({})),
        "outputs": outputs,
        "images": imported.images,
        "classes": nodes,
    }});
    let priority = if body.get("front").and_then(Json_::as_bool) == Some(true) {
        1
    } else {
        0
    };
    crate::http::enqueue(&s, &who, &id, priority, &source, &meta)?;
    Ok(Json(json!({"prompt_id": id, "number": number, "node_errors": {}})).into_response())
}

/// Where `/upload/image` puts a caller's images (and `LoadImage` finds them).
fn inputs_dir(s: &Server, who: &crate::auth::Caller) -> std::path::PathBuf {
    s.opts.data_dir.join("input").join(&who.owner)
}

/// `POST /upload/image` (multipart: `image`, optional `subfolder`, `overwrite`): stores a PNG
/// for `LoadImage`; a file name that is not a plain name, or a file that is not a PNG, is a 400.
async fn upload_image(
    Ctx(s): Ctx<S>,
    Who(who): Who,
    mut form: axum::extract::Multipart,
) -> Result<Json<Json_>, ApiError> {
    let bad = |msg: String| ApiError::new(StatusCode::BAD_REQUEST, msg);
    let (mut file, mut subfolder, mut overwrite) = (None, String::new(), false);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| bad(format!("the form: {e}")))?
    {
        match field.name().unwrap_or("") {
            "image" => {
                let name = field.file_name().unwrap_or("").to_string();
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| bad(format!("the image: {e}")))?;
                file = Some((name, bytes));
            }
            "subfolder" => subfolder = field.text().await.unwrap_or_default(),
            "overwrite" => overwrite = field.text().await.is_ok_and(|t| t == "true" || t == "1"),
            _ => {}
        }
    }
    let Some((name, bytes)) = file else {
        return Err(bad("no 'image' file in the form".into()));
    };
    if !crate::http::safe_relative(&name) || name.contains('/') {
        return Err(bad(format!("'{name}' is not a plain file name")));
    }
    if !subfolder.is_empty() && !crate::http::safe_relative(&subfolder) {
        return Err(bad(format!(
            "subfolder '{subfolder}' is not a plain relative folder"
        )));
    }
    if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Err(bad(format!(
            "'{name}' is not a PNG (LoadImage reads PNG files)"
        )));
    }
    let dir = inputs_dir(&s, &who).join(&subfolder);
    let rel = if subfolder.is_empty() {
        name.clone()
    } else {
        format!("{subfolder}/{name}")
    };
    let path = dir.join(&name);
    if path.exists() && !overwrite {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("'{rel}' exists (send overwrite=true)"),
        ));
    }
    let io = |e: std::io::Error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    tokio::fs::create_dir_all(&dir).await.map_err(io)?;
    tokio::fs::write(&path, &bytes).await.map_err(io)?;
    Ok(Json(
        json!({"name": name, "subfolder": subfolder, "type": "input"}),
    ))
}

fn queue_lists(s: &Server, owner: Option<&str>) -> Result<(Vec<Job>, Vec<Job>), ApiError> {
    let jobs = s
        .queue
        .list(owner, 1000)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let pick = |st: State| {
        let mut v: Vec<Job> = jobs
            .iter()
            .filter(|j| j.state == st && is_prompt(j))
            .cloned()
            .collect();
        v.reverse();
        v
    };
    Ok((pick(State::Running), pick(State::Queued)))
}

async fn prompt_info(Ctx(s): Ctx<S>, Who(who): Who) -> Result<Json<Json_>, ApiError> {
    let (running, pending) = queue_lists(&s, (!who.admin).then_some(who.owner.as_str()))?;
    Ok(Json(
        json!({"exec_info": {"queue_remaining": running.len() + pending.len()}}),
    ))
}

async fn queue(Ctx(s): Ctx<S>, Who(who): Who) -> Result<Json<Json_>, ApiError> {
    let (running, pending) = queue_lists(&s, (!who.admin).then_some(who.owner.as_str()))?;
    Ok(Json(json!({
        "queue_running": running.iter().map(queue_item).collect::<Vec<_>>(),
        "queue_pending": pending.iter().map(queue_item).collect::<Vec<_>>(),
    })))
}

async fn queue_edit(
    Ctx(s): Ctx<S>,
    Who(who): Who,
    Json(body): Json<Json_>,
) -> Result<Json<Json_>, ApiError> {
    let (_, pending) = queue_lists(&s, (!who.admin).then_some(who.owner.as_str()))?;
    let delete: Vec<String> = if body.get("clear").and_then(Json_::as_bool) == Some(true) {
        pending.iter().map(|j| j.id.clone()).collect()
    } else {
        body.get("delete")
            .and_then(Json_::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .filter(|id| pending.iter().any(|j| &j.id == id))
            .collect()
    };
    for id in &delete {
        let _ = s.queue.cancel(id);
    }
    Ok(Json(json!({})))
}

async fn interrupt(
    Ctx(s): Ctx<S>,
    Who(who): Who,
    body: axum::body::Bytes,
) -> Result<Json<Json_>, ApiError> {
    let target = serde_json::from_slice::<Json_>(&body)
        .ok()
        .and_then(|b| b.get("prompt_id").and_then(Json_::as_str).map(String::from));
    if s.queue.distributed() {
        // On NATS the jobs run on workers: the queue tells the one running each.
        let owner = (!who.admin).then_some(who.owner.as_str());
        let jobs = s
            .queue
            .list(owner, 1000)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        for j in jobs.iter().filter(|j| j.state == State::Running) {
            if target.as_deref().is_none_or(|t| t == j.id) {
                let _ = s.queue.cancel(&j.id);
            }
        }
        return Ok(Json(json!({})));
    }
    let running = s.running.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for (id, flag) in running {
        let visible = s
            .queue
            .get(&id)
            .ok()
            .flatten()
            .is_some_and(|j| who.sees(&j.owner));
        if visible && target.as_deref().is_none_or(|t| t == id) {
            flag.store(true, Ordering::SeqCst);
        }
    }
    Ok(Json(json!({})))
}

/// ComfyUI's history entry of a finished prompt job.
fn history_entry(job: &Job) -> Json_ {
    let c = &job.meta["comfy"];
    let mut outputs = serde_json::Map::new();
    for pair in c["images"].as_array().into_iter().flatten() {
        let (Some(node), Some(file)) = (pair[0].as_str(), pair[1].as_str()) else {
            continue;
        };
        if job.files.iter().any(|f| f == file) {
            outputs.insert(
                node.to_string(),
                json!({"images": [{"filename": file, "subfolder": job.id, "type": "output"}]}),
            );
        }
    }
    let ok = job.state == State::Succeeded;
    let mut messages = vec![json!(["execution_start", {"prompt_id": job.id}])];
    messages.push(if ok {
        json!(["execution_success", {"prompt_id": job.id}])
    } else {
        json!(["execution_error", {"prompt_id": job.id, "exception_message": job.error}])
    });
    json!({
        "prompt": queue_item(job),
        "outputs": outputs,
        "status": {"status_str": if ok { "success" } else { "error" }, "completed": ok, "messages": messages},
        "meta": {},
    })
}

#[derive(serde::Deserialize)]
struct HistoryQuery {
    max_items: Option<usize>,
}

async fn history(
    Ctx(s): Ctx<S>,
    Who(who): Who,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<Json_>, ApiError> {
    let jobs = s
        .queue
        .list(
            (!who.admin).then_some(who.owner.as_str()),
            q.max_items.unwrap_or(1000).min(10000),
        )
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut out = serde_json::Map::new();
    for j in jobs
        .iter()
        .rev()
        .filter(|j| j.state.finished() && is_prompt(j))
    {
        out.insert(j.id.clone(), history_entry(j));
    }
    Ok(Json(Json_::Object(out)))
}

async fn history_one(
    Ctx(s): Ctx<S>,
    Who(who): Who,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    // ComfyUI answers {} for a prompt it does not have (or has not finished).
    let job = visible_job(&s, &who, &id)
        .ok()
        .filter(|j| j.state.finished() && is_prompt(j));
    Ok(Json(match job {
        Some(j) => json!({ id: history_entry(&j) }),
        None => json!({}),
    }))
}

#[derive(serde::Deserialize)]
struct ViewQuery {
    filename: String,
    #[serde(default)]
    subfolder: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

async fn view(
    Ctx(s): Ctx<S>,
    Who(who): Who,
    Query(q): Query<ViewQuery>,
) -> Result<Response, ApiError> {
    if q.kind.as_deref().is_some_and(|k| k != "output") {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "only type=output files are served",
        ));
    }
    if !crate::http::safe_relative(&q.filename) || !crate::http::safe_relative(&q.subfolder) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "not a file of a job",
        ));
    }
    let job = visible_job(&s, &who, &q.subfolder)?;
    crate::http::job_file(&s, &job, &q.filename).await
}

/// A node type in `/object_info`'s shape.
fn object_info_of(t: &ditflow::registry::NodeType) -> Json_ {
    let mut required = serde_json::Map::new();
    let mut optional = serde_json::Map::new();
    let (mut req_order, mut opt_order) = (Vec::new(), Vec::new());
    for p in &t.inputs {
        let mut opts = serde_json::Map::new();
        if let Some(d) = &p.default {
            opts.insert("default".into(), d.to_json());
        }
        if let Some(m) = p.min {
            opts.insert("min".into(), m.into());
        }
        if let Some(m) = p.max {
            opts.insert("max".into(), m.into());
        }
        if !p.doc.is_empty() {
            opts.insert("tooltip".into(), p.doc.clone().into());
        }
        let ty = if p.choices.is_empty() {
            json!(p.ty.to_string().to_uppercase())
        } else {
            json!(p.choices)
        };
        let spec = json!([ty, opts]);
        if p.required() {
            required.insert(p.name.clone(), spec);
            req_order.push(p.name.clone());
        } else {
            optional.insert(p.name.clone(), spec);
            opt_order.push(p.name.clone());
        }
    }
    json!({
        "input": {"required": required, "optional": optional},
        "input_order": {"required": req_order, "optional": opt_order},
        "output": t.outputs.iter().map(|p| p.ty.to_string().to_uppercase()).collect::<Vec<_>>(),
        "output_is_list": t.outputs.iter().map(|_| false).collect::<Vec<_>>(),
        "output_name": t.outputs.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
        "name": t.name,
        "display_name": t.name,
        "description": t.doc,
        "python_module": format!("ditflow.{}", t.plugin.name),
        "category": t.category,
        "output_node": t.side_effects,
    })
}

async fn object_info(Ctx(s): Ctx<S>, _authorised: Who) -> Result<Json<Json_>, ApiError> {
    let reg = s.runtime.registry();
    let all: serde_json::Map<String, Json_> = reg
        .iter()
        .map(|t| (t.name.clone(), object_info_of(t)))
        .collect();
    Ok(Json(Json_::Object(all)))
}

async fn object_info_one(
    Ctx(s): Ctx<S>,
    _authorised: Who,
    Path(class): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    let reg = s.runtime.registry();
    Ok(Json(match reg.get(&class) {
        Some(t) => json!({ class: object_info_of(t) }),
        None => json!({}),
    }))
}

#[derive(serde::Deserialize)]
struct WsQuery {
    #[serde(rename = "clientId")]
    client_id: Option<String>,
}

async fn ws(
    Ctx(s): Ctx<S>,
    Who(who): Who,
    Query(q): Query<WsQuery>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let client = q.client_id.unwrap_or_else(crate::random_id);
    Ok(upgrade.on_upgrade(move |socket| follow(socket, s, who, client)))
}

/// ComfyUI's messages for one ditflow event line of a prompt job (`comfy_node` maps our node
/// ids to the prompt's).
fn messages(job: &Job, line: &Json_) -> Vec<Json_> {
    let id = &job.id;
    let ts = (crate::store::now() * 1000.0) as u64;
    let comfy_node = |ours: &str| -> Json_ {
        // Our ids are `n<comfy id>` with an optional `_suffix`.
        let rest = ours.strip_prefix('n').unwrap_or(ours);
        let base = rest.split('_').next().unwrap_or(rest);
        json!(base)
    };
    let node = line["node"].as_str().unwrap_or("");
    match line["event"].as_str().unwrap_or("") {
        "job_started" => {
            vec![json!({"type": "execution_start", "data": {"prompt_id": id, "timestamp": ts}})]
        }
        "node_cached" => vec![
            json!({"type": "execution_cached", "data": {"nodes": [comfy_node(node)], "prompt_id": id, "timestamp": ts}}),
        ],
        "node_started" => vec![
            json!({"type": "executing", "data": {"node": comfy_node(node), "display_node": comfy_node(node), "prompt_id": id}}),
        ],
        "node_progress" => vec![
            json!({"type": "progress", "data": {"value": line["step"], "max": line["total"], "prompt_id": id, "node": comfy_node(node)}}),
        ],
        "node_finished" => {
            let cn = comfy_node(node);
            let images: Vec<Json_> = job.meta["comfy"]["images"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p[0] == cn)
                .map(|p| json!({"filename": p[1], "subfolder": id, "type": "output"}))
                .collect();
            if images.is_empty() {
                vec![]
            } else {
                vec![
                    json!({"type": "executed", "data": {"node": cn, "display_node": cn, "output": {"images": images}, "prompt_id": id}}),
                ]
            }
        }
        "job_finished" => {
            let end = json!({"type": "executing", "data": {"node": null, "prompt_id": id}});
            if line["state"] == "succeeded" {
                vec![
                    json!({"type": "execution_success", "data": {"prompt_id": id, "timestamp": ts}}),
                    end,
                ]
            } else {
                vec![
                    json!({"type": "execution_error", "data": {
                        "prompt_id": id, "node_id": null, "node_type": null, "executed": [],
                        "exception_message": line["error"], "exception_type": "ditflow", "traceback": [],
                        "current_inputs": {}, "current_outputs": {},
                    }}),
                    end,
                ]
            }
        }
        _ => vec![],
    }
}

/// The websocket: `status`, then the messages of every prompt job of `client`.
async fn follow(mut socket: WebSocket, s: S, who: crate::auth::Caller, client: String) {
    let mut all = s.hub.follow_all();
    let status = |s: &Server| {
        let remaining = queue_lists(s, (!who.admin).then_some(who.owner.as_str()))
            .map(|(r, p)| r.len() + p.len())
            .unwrap_or(0);
        json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": remaining}}, "sid": client}})
    };
    if socket
        .send(Message::Text(status(&s).to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    let mut jobs: HashMap<Arc<str>, Option<Job>> = HashMap::new();
    loop {
        let (id, line) = tokio::select! {
            got = all.recv() => match got {
                Ok(pair) => pair,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            },
        };
        let job = jobs
            .entry(id.clone())
            .or_insert_with(|| {
                s.queue.get(&id).ok().flatten().filter(|j| {
                    is_prompt(j)
                        && who.sees(&j.owner)
                        && j.meta["comfy"]["client_id"].as_str() == Some(&client)
                })
            })
            .clone();
        let Some(job) = job else { continue };
        let Ok(line) = serde_json::from_str::<Json_>(&line) else {
            continue;
        };
        for m in messages(&job, &line) {
            if socket
                .send(Message::Text(m.to_string().into()))
                .await
                .is_err()
            {
                return;
            }
        }
        if line["event"] == "job_finished" {
            jobs.remove(&id);
            if socket
                .send(Message::Text(status(&s).to_string().into()))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}
