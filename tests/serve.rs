//! `ditflow serve` end to end, over real sockets: jobs submitted, followed over SSE and a
//! websocket, their files fetched; tokens, owners, path traversal, oversized and malformed
//! submissions; a bounded queue that refuses cleanly and survives a restart; models kept loaded
//! between jobs.

mod common;
#[path = "common/http.rs"]
mod http;

use http::{request, request_typed, run_locally, Resp, Server};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ALICE: &str = "alice-token-1";
const BOB: &str = "bob-token-22";
const ADMIN: &str = "admin-token-333";

fn start(data: &std::path::Path, extra: &[&str]) -> Server {
    let tokens = [
        "--token".to_string(),
        format!("alice:{ALICE}"),
        "--token".to_string(),
        format!("bob:{BOB}"),
        "--admin-token".to_string(),
        ADMIN.to_string(),
    ];
    start_with(data, &common::repo().join("graphs"), &tokens, extra)
}

/// A server with `tokens` (none: open, loopback only) and graphs' paths relative to `base`.
fn start_with(
    data: &std::path::Path,
    base: &std::path::Path,
    tokens: &[String],
    extra: &[&str],
) -> Server {
    let args: Vec<std::ffi::OsString> = tokens
        .iter()
        .map(Into::into)
        .chain(extra.iter().map(Into::into))
        .collect();
    Server::start(data, base, &args, Stdio::inherit())
}

fn submit(addr: &str, token: &str, body: serde_json::Value) -> Resp {
    request(
        addr,
        "POST",
        "/jobs",
        Some(token),
        body.to_string().as_bytes(),
    )
}

fn noise_job(seed: i64) -> serde_json::Value {
    let graph = std::fs::read_to_string(common::repo().join("graphs/noise.yaml")).unwrap();
    serde_json::json!({ "graph": graph, "args": { "seed": seed, "size": 32 } })
}

/// The job's events over SSE, until the stream ends.
fn sse_events(addr: &str, id: &str, token: &str) -> Vec<serde_json::Value> {
    let r = request(addr, "GET", &format!("/jobs/{id}/events"), Some(token), b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    String::from_utf8_lossy(&r.body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn jobs_run_and_stream_their_events_and_files_to_their_owner_only() {
    let data = common::temp_dir("serve-jobs");
    let srv = start(&data, &["--max-body", "64K"]);
    let a = srv.addr.as_str();

    // Health needs no token; everything else does.
    let h = request(a, "GET", "/health", None, b"");
    assert_eq!(h.status, 200);
    assert!(h.json()["instance"].is_string());
    assert_eq!(request(a, "GET", "/jobs", None, b"").status, 401);
    assert_eq!(
        request(a, "GET", "/jobs", Some("wrong-token-1"), b"").status,
        401
    );

    // A job: followed over SSE to its end, then its PNG fetched.
    let r = submit(a, ALICE, noise_job(7));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    let events = sse_events(a, &id, ALICE);
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(names.first(), Some(&"job_started"), "{names:?}");
    assert!(names.contains(&"node_finished"), "{names:?}");
    let end = events.last().unwrap();
    assert_eq!(end["event"], "job_finished", "{events:?}");
    assert_eq!(end["state"], "succeeded", "{end}");
    assert!(end["outputs"]["caption"]
        .as_str()
        .unwrap()
        .starts_with("seed 7: mean"));
    let job = request(a, "GET", &format!("/jobs/{id}"), Some(ALICE), b"").json();
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["files"], serde_json::json!(["noise.png"]));
    let png = request(
        a,
        "GET",
        &format!("/jobs/{id}/files/noise.png"),
        Some(ALICE),
        b"",
    );
    assert_eq!(png.status, 200);
    assert_eq!(png.header("content-type"), Some("image/png"));
    assert_eq!(&png.body[..8], b"\x89PNG\r\n\x1a\n");
    // The same file as the command line writes for the same graph and inputs.
    let cli = run_locally("graphs/noise.yaml", &["seed=7", "size=32"], "noise.png");
    assert_eq!(png.body, cli);

    // Another owner sees nothing of it; the admin sees it.
    assert_eq!(
        request(a, "GET", &format!("/jobs/{id}"), Some(BOB), b"").status,
        404
    );
    assert_eq!(
        request(
            a,
            "GET",
            &format!("/jobs/{id}/files/noise.png"),
            Some(BOB),
            b""
        )
        .status,
        404
    );
    assert!(request(a, "GET", "/jobs", Some(BOB), b"").json()["jobs"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        request(a, "GET", &format!("/jobs/{id}"), Some(ADMIN), b"").status,
        200
    );

    // Path traversal through the file route is refused, encoded or not.
    for path in [
        format!("/jobs/{id}/files/..%2F..%2Fjobs.sqlite"),
        format!("/jobs/{id}/files/%2E%2E/%2E%2E/jobs.sqlite"),
        format!("/jobs/{id}/files/../../jobs.sqlite"),
    ] {
        let r = request(a, "GET", &path, Some(ALICE), b"");
        assert!(matches!(r.status, 400 | 404), "{path}: {}", r.status);
        assert!(!r.body.starts_with(b"SQLite"), "{path} served the database");
    }

    // Malformed submissions: a 400 with located errors; an oversized one: 413.
    let bad = submit(
        a,
        ALICE,
        serde_json::json!({ "graph": "version: 1\nnodes:\n  x: {type: NoSuchNode}\n" }),
    );
    assert_eq!(bad.status, 400);
    let errors = bad.json()["errors"].clone();
    let first = &errors[0];
    assert_eq!(first["line"], 3, "{errors}");
    assert!(
        first["message"].as_str().unwrap().contains("NoSuchNode"),
        "{errors}"
    );
    assert_eq!(
        request(a, "POST", "/jobs", Some(ALICE), b"{not json").status,
        400
    );
    let huge = serde_json::json!({ "graph": "x".repeat(100_000) });
    assert_eq!(submit(a, ALICE, huge).status, 413);

    // The websocket gives the same lines as SSE.
    let url = format!("ws://{a}/jobs/{id}/ws?token={ALICE}");
    let (mut ws, _) = tungstenite::connect(url.as_str()).expect("websocket");
    let mut got = Vec::new();
    while let Ok(msg) = ws.read() {
        match msg {
            tungstenite::Message::Text(t) => {
                got.push(serde_json::from_str::<serde_json::Value>(&t).unwrap())
            }
            tungstenite::Message::Close(_) => break,
            _ => {}
        }
    }
    assert_eq!(got, events, "websocket and SSE lines differ");

    // Metrics: Prometheus text with the queue and the jobs.
    let m = request(a, "GET", "/metrics", Some(ADMIN), b"");
    let text = String::from_utf8_lossy(&m.body);
    assert!(text.contains("ditflow_queue_depth 0"), "{text}");
    assert!(
        text.contains("ditflow_jobs{state=\"succeeded\"} 1"),
        "{text}"
    );
    assert!(text.contains("ditflow_job_seconds_count 1"), "{text}");
}

#[test]
fn a_full_queue_refuses_cleanly_and_the_queue_survives_a_restart() {
    let data = common::temp_dir("serve-queue");
    // No workers: jobs wait.
    let srv = start(&data, &["--workers", "0", "--queue-limit", "2"]);
    let a = srv.addr.clone();
    let first = submit(&a, ALICE, noise_job(1));
    assert_eq!(first.status, 201);
    let mut again = noise_job(2);
    again["id"] = "mine-2".into();
    assert_eq!(submit(&a, ALICE, again.clone()).status, 201);
    let full = submit(&a, ALICE, noise_job(3));
    assert_eq!(full.status, 429);
    assert!(full.json()["error"].as_str().unwrap().contains("full"));
    // A resubmission under the same id is the same job, not a new one (nor a refusal).
    let dup = submit(&a, ALICE, again.clone());
    assert_eq!(dup.status, 201);
    assert_eq!(dup.json()["id"], "alice-mine-2");
    drop(srv);

    // Restarted with a worker: both jobs are still there and run, once each.
    let srv = start(&data, &[]);
    let a = srv.addr.clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let jobs = request(&a, "GET", "/jobs", Some(ALICE), b"").json()["jobs"].clone();
        let jobs = jobs.as_array().unwrap();
        assert_eq!(jobs.len(), 2, "{jobs:?}");
        if jobs.iter().all(|j| j["state"] == "succeeded") {
            break;
        }
        assert!(Instant::now() < deadline, "jobs did not finish: {jobs:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Cancelling: a queued job never runs.
    drop(srv);
    let srv = start(&data, &["--workers", "0"]);
    let a = srv.addr.clone();
    let id = submit(&a, ALICE, noise_job(4)).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let c = request(&a, "DELETE", &format!("/jobs/{id}"), Some(ALICE), b"");
    assert_eq!(c.json()["state"], "cancelled");
    assert_eq!(
        request(&a, "DELETE", &format!("/jobs/{id}"), Some(BOB), b"").status,
        404
    );
}

#[test]
fn jobs_that_share_a_model_load_it_once() {
    let data = common::temp_dir("serve-models");
    let srv = start(&data, &[]);
    let a = srv.addr.clone();
    let graph = std::fs::read_to_string(common::repo().join("graphs/text_to_image.yaml")).unwrap();
    let mut loads = Vec::new();
    for seed in [1, 2] {
        let body =
            serde_json::json!({ "graph": graph, "args": { "seed": seed, "steps": 2, "scale": 1 } });
        let r = submit(&a, BOB, body);
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let id = r.json()["id"].as_str().unwrap().to_string();
        let events = sse_events(&a, &id, BOB);
        assert_eq!(events.last().unwrap()["state"], "succeeded", "{events:?}");
        let started: Vec<String> = events
            .iter()
            .filter(|e| e["event"] == "node_started")
            .map(|e| e["node"].as_str().unwrap().to_string())
            .collect();
        loads.push(started.iter().any(|n| n == "dit"));
    }
    assert_eq!(
        loads,
        [true, false],
        "the second job loaded the model again"
    );
    let m = request(&a, "GET", "/metrics", Some(BOB), b"");
    assert!(String::from_utf8_lossy(&m.body).contains("ditflow_models_loaded 3"));
}

/// ComfyUI's default API-format workflow (its `script_examples/basic_api_example.py`), with the
/// demo model as the checkpoint and the demo's picture size.
fn comfy_prompt(seed: i64) -> serde_json::Value {
    serde_json::json!({
        "3": {"class_type": "KSampler", "inputs": {
            "cfg": 4.0, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0],
            "negative": ["7", 0], "positive": ["6", 0], "sampler_name": "euler",
            "scheduler": "normal", "seed": seed, "steps": 8}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "models/demo"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": 64, "width": 64}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a red circle on a blue background"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}}
    })
}

#[test]
fn comfyui_s_websocket_api_example_flow_gets_its_picture_back() {
    // ComfyUI's clients send no token: an open server on loopback, paths from the repository.
    let data = common::temp_dir("serve-comfy");
    let srv = start_with(&data, &common::repo(), &[], &[]);
    let a = srv.addr.clone();
    // websockets_api_example.py: connect with a client id, queue the prompt with it, read
    // messages until `executing` with a null node for that prompt, then /history and /view.
    let client = "3c2b9d0e-client";
    let (mut ws, _) =
        tungstenite::connect(format!("ws://{a}/ws?clientId={client}").as_str()).unwrap();
    let body = serde_json::json!({ "prompt": comfy_prompt(3), "client_id": client });
    let r = request(&a, "POST", "/prompt", None, body.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let prompt_id = r.json()["prompt_id"].as_str().unwrap().to_string();
    let mut kinds = Vec::new();
    loop {
        let msg = ws.read().expect("a websocket message");
        let tungstenite::Message::Text(t) = msg else {
            continue;
        };
        let m: serde_json::Value = serde_json::from_str(&t).unwrap();
        kinds.push(m["type"].as_str().unwrap().to_string());
        if m["type"] == "executing"
            && m["data"]["node"].is_null()
            && m["data"]["prompt_id"] == prompt_id.as_str()
        {
            break;
        }
    }
    for k in [
        "status",
        "execution_start",
        "executing",
        "progress",
        "executed",
        "execution_success",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} message: {kinds:?}");
    }
    let history = request(&a, "GET", &format!("/history/{prompt_id}"), None, b"").json();
    let entry = &history[&prompt_id];
    assert_eq!(entry["status"]["status_str"], "success", "{history}");
    let image = &entry["outputs"]["9"]["images"][0];
    assert_eq!(image["type"], "output");
    let view = format!(
        "/view?filename={}&subfolder={}&type={}",
        image["filename"].as_str().unwrap(),
        image["subfolder"].as_str().unwrap(),
        image["type"].as_str().unwrap()
    );
    let png = request(&a, "GET", &view, None, b"");
    assert_eq!(png.status, 200);
    assert_eq!(png.header("content-type"), Some("image/png"));
    // The same picture as the bundled graph draws with the same settings.
    let cli = run_locally(
        "graphs/text_to_image.yaml",
        &["seed=3", "steps=8", "scale=1", "cfg=4"],
        "text_to_image.png",
    );
    assert_eq!(png.body, cli, "the imported prompt drew another picture");
    // /view refuses what is not a job's file.
    let bad = request(
        &a,
        "GET",
        "/view?filename=..%2Fjobs.sqlite&subfolder=&type=output",
        None,
        b"",
    );
    assert!(matches!(bad.status, 400 | 404), "{}", bad.status);
    let bad = request(
        &a,
        "GET",
        &format!("/view?filename=jobs.sqlite&subfolder={prompt_id}%2F..%2F..&type=output"),
        None,
        b"",
    );
    assert!(matches!(bad.status, 400 | 404), "{}", bad.status);
    // The queue is empty again; /object_info lists the node types in ComfyUI's shape.
    let q = request(&a, "GET", "/queue", None, b"").json();
    assert_eq!(q["queue_pending"], serde_json::json!([]));
    let info = request(&a, "GET", "/object_info/Sample", None, b"").json();
    assert_eq!(
        info["Sample"]["input"]["required"]["model"][0],
        "MODEL<DENOISER>"
    );
    assert!(info["Sample"]["input"]["optional"]["steps"][1]["default"] == 20);
    // Image-to-image from an uploaded image (ComfyUI's /upload/image, then LoadImage and
    // VAEEncode into the KSampler with denoise < 1); uploaded names that are not plain file
    // names, and files that are not PNGs, are refused.
    let upload = |name: &str, bytes: &[u8]| {
        let mut body = Vec::new();
        body.extend_from_slice(
            format!("--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n--XyZ--\r\n");
        request_typed(
            &a,
            "POST",
            "/upload/image",
            None,
            "multipart/form-data; boundary=XyZ",
            &body,
        )
    };
    for evil in [
        "../../evil.png",
        "/tmp/evil.png",
        "a/../../evil.png",
        "..\\evil.png",
    ] {
        let r = upload(evil, &png.body);
        assert_eq!(
            r.status,
            400,
            "{evil}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert!(!data.join("evil.png").exists() && !data.join("input").join("evil.png").exists());
    assert_eq!(upload("notes.png", b"just text").status, 400);
    let up = upload("start.png", &png.body);
    assert_eq!(up.status, 200, "{}", String::from_utf8_lossy(&up.body));
    assert_eq!(up.json()["name"], "start.png");
    let mut i2i = comfy_prompt(4);
    i2i["10"] = serde_json::json!({"class_type": "LoadImage", "inputs": {"image": "start.png"}});
    i2i["11"] = serde_json::json!({"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}});
    i2i["3"]["inputs"]["latent_image"] = serde_json::json!(["11", 0]);
    i2i["3"]["inputs"]["denoise"] = serde_json::json!(0.5);
    let r = request(
        &a,
        "POST",
        "/prompt",
        None,
        serde_json::json!({ "prompt": i2i }).to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["prompt_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    let entry = loop {
        let h = request(&a, "GET", &format!("/history/{id}"), None, b"").json();
        if let Some(e) = h.get(&id) {
            break e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the image-to-image prompt did not finish"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
    assert_eq!(entry["outputs"]["9"]["images"][0]["subfolder"], id.as_str());

    // An unmapped class: a 400 naming the node and the class.
    let mut bad = comfy_prompt(1);
    bad["10"] = serde_json::json!({"class_type": "UltimateSDUpscale", "inputs": {}});
    let r = request(
        &a,
        "POST",
        "/prompt",
        None,
        serde_json::json!({ "prompt": bad }).to_string().as_bytes(),
    );
    assert_eq!(r.status, 400);
    let j = r.json();
    assert_eq!(
        j["node_errors"]["10"]["class_type"], "UltimateSDUpscale",
        "{j}"
    );
    assert!(j["node_errors"]["10"]["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("UltimateSDUpscale"));
}

#[test]
fn import_comfy_writes_the_graph_as_yaml() {
    let dir = common::temp_dir("import-comfy");
    let file = dir.join("workflow_api.json");
    std::fs::write(&file, comfy_prompt(5).to_string()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_ditflow"))
        .args(["import-comfy"])
        .arg(&file)
        .args(["--models", "."])
        .current_dir(common::repo())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let yaml = String::from_utf8(o.stdout).unwrap();
    assert!(yaml.contains("n3: {type: Sample"), "{yaml}");
    assert!(yaml.contains("sampler: {value: \"flow_euler\"}"), "{yaml}");
    assert!(yaml.contains("n4_dit: {type: LoadDiffusionModel"), "{yaml}");
    // It validates as a ditflow graph.
    let g = dir.join("imported.yaml");
    std::fs::write(&g, &yaml).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_ditflow"))
        .arg("validate")
        .arg(&g)
        .env("DITFLOW_PLUGIN_PATH", common::plugin_dir())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A LoRA and KSamplerAdvanced (its plain form) map too; its partial forms are refused.
    let mut lora = comfy_prompt(6);
    lora["12"] = serde_json::json!({"class_type": "LoraLoader", "inputs": {
        "model": ["4", 0], "clip": ["4", 1], "lora_name": "style.safetensors",
        "strength_model": 0.8, "strength_clip": 1.0}});
    lora["3"]["class_type"] = "KSamplerAdvanced".into();
    let inputs = lora["3"]["inputs"].as_object_mut().unwrap();
    inputs.insert("model".into(), serde_json::json!(["12", 0]));
    inputs.insert("noise_seed".into(), inputs["seed"].clone());
    for (k, v) in [
        ("add_noise", "enable"),
        ("return_with_leftover_noise", "disable"),
    ] {
        inputs.insert(k.into(), v.into());
    }
    inputs.insert("start_at_step".into(), 0.into());
    inputs.insert("end_at_step".into(), 10000.into());
    lora["6"]["inputs"]["clip"] = serde_json::json!(["12", 1]);
    std::fs::write(&file, lora.to_string()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_ditflow"))
        .args(["import-comfy"])
        .arg(&file)
        .current_dir(common::repo())
        .output()
        .unwrap();
    let yaml = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        yaml.contains("n12: {type: ApplyLoRA, inputs: {model: n4_dit.model"),
        "{yaml}"
    );
    assert!(
        yaml.contains("n3: {type: Sample, inputs: {model: n12.model"),
        "{yaml}"
    );
    assert!(
        yaml.contains("n6: {type: TextEncode, inputs: {encoder: n4_te.encoder"),
        "{yaml}"
    );
    lora["3"]["inputs"]["start_at_step"] = 4.into();
    std::fs::write(&file, lora.to_string()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_ditflow"))
        .args(["import-comfy"])
        .arg(&file)
        .current_dir(common::repo())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("node \"3\" (KSamplerAdvanced)") && err.contains("start/end steps"),
        "{err}"
    );
    assert!(!err.contains("checkpoint"), "{err}");
    // An unmapped class: exit 2, naming it.
    std::fs::write(&file, r#"{"1": {"class_type": "Nope", "inputs": {}}}"#).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_ditflow"))
        .args(["import-comfy"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("node \"1\" (Nope)"));
}

#[test]
fn submit_follows_a_job_and_fetches_its_files_and_jobs_lists_it() {
    let data = common::temp_dir("serve-submit");
    let srv = start(&data, &[]);
    let server = format!("http://{}", srv.addr);
    let out = common::temp_dir("serve-submit-out");
    let o = Command::new(env!("CARGO_BIN_EXE_ditflow"))
        .args([
            "submit",
            "graphs/noise.yaml",
            "--server",
            &server,
            "--set",
            "seed=7",
            "--set",
            "size=32",
            "--out",
        ])
        .arg(&out)
        .current_dir(common::repo())
        .env("DITFLOW_TOKEN", ALICE)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("caption = seed 7: mean"), "{stdout}");
    assert_eq!(
        &std::fs::read(out.join("noise.png")).unwrap()[..8],
        b"\x89PNG\r\n\x1a\n"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_ditflow"))
        .args(["jobs", "--server", &server, "--token", ALICE])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && list.contains("succeeded") && list.contains("noise.png"),
        "{list}"
    );
    // A bad graph: exit 1 with the located error; no token: exit 1 saying so.
    let bad = out.join("bad.yaml");
    std::fs::write(&bad, "version: 1\nnodes:\n  x: {type: NoSuchNode}\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_ditflow"))
        .args(["submit"])
        .arg(&bad)
        .args(["--server", &server, "--token", ALICE])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("400") && err.contains(":3:") && err.contains("NoSuchNode"),
        "{err}"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_ditflow"))
        .args(["jobs", "--server", &server])
        .env_remove("DITFLOW_TOKEN")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("401"));
}

#[test]
fn a_job_running_when_the_server_is_killed_runs_again_after_a_restart() {
    let data = common::temp_dir("serve-kill");
    let srv = start(&data, &[]);
    let graph = std::fs::read_to_string(common::repo().join("graphs/text_to_image.yaml")).unwrap();
    // Long enough to be caught running.
    let body = serde_json::json!({ "graph": graph, "args": { "steps": 400, "scale": 1, "preview_every": 0 } });
    let r = submit(&srv.addr, ALICE, body);
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let state = |addr: &str| {
        request(addr, "GET", &format!("/jobs/{id}"), Some(ALICE), b"").json()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while state(&srv.addr) != "running" {
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGKILL: no chance to record anything.
    drop(srv);
    let srv = start(&data, &[]);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        match state(&srv.addr).as_str() {
            "succeeded" => break,
            "queued" | "running" => {}
            other => panic!("the job ended {other}"),
        }
        assert!(
            Instant::now() < deadline,
            "the job did not finish after the restart"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let jobs = request(&srv.addr, "GET", "/jobs", Some(ALICE), b"").json()["jobs"].clone();
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
}
