//! The bridges' overhead, driven by `tools/bench_av_bridge.py` (which makes real-width towers,
//! two bridges and their conditioning): one `SampleAudioVideo` step of both towers coupled by a
//! dual cross-attention bridge (`bridge/`), and by a fused cross-attention bridge in every block
//! pair (`fused/`), against the same step of the two towers alone, in alternating rounds of one
//! process; each keeps its fastest, printed as JSON.
//!
//! `cargo bench -p ditflow --bench av_bridge -- PLUGINS_DIR FIXTURE_DIR [REPS]`

use ditflow::{ArgValue, Graph, RunOptions, Runtime, Session};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The step's graph, coupled by the bridge in folder `bridge` when given.
fn graph(dir: &Path, bridge: Option<&str>) -> String {
    let q = |n: &str| format!("{:?}", dir.join(n).to_string_lossy());
    let t = |n: &str| {
        format!(
            "{{type: LoadTensor, inputs: {{path: {}, name: {n}}}}}",
            q("inputs.safetensors")
        )
    };
    let (folder, port) = match bridge {
        Some(f) => (f, ", bridge: b.bridge"),
        None => ("bridge", ""),
    };
    format!(
        r#"version: 1
inputs:
  seed: {{type: Int, default: 0}}
nodes:
  v: {{type: LoadWan, inputs: {{path: {v}}}}}
  a: {{type: LoadStableAudio, inputs: {{path: {a}}}}}
  b: {{type: LoadBridge, inputs: {{path: {b}}}}}
  tv: {tv}
  ta: {ta}
  tg: {tg}
  vl0: {vl}
  al0: {al}
  vp: {{type: ConditioningPart, inputs: {{tensor: tv.tensor}}}}
  ap0: {{type: ConditioningPart, inputs: {{tensor: ta.tensor}}}}
  ap: {{type: ConditioningPart, inputs: {{conditioning: ap0.conditioning, name: global_hidden_states, tensor: tg.tensor}}}}
  vl: {{type: TensorAs, inputs: {{tensor: vl0.tensor, kind: Latent}}}}
  al: {{type: TensorAs, inputs: {{tensor: al0.tensor, kind: Latent}}}}
  s: {{type: SampleAudioVideo, inputs: {{video: v.model, audio: a.model{port}, video_positive: vp.conditioning, audio_positive: ap.conditioning, video_latent: vl.value, audio_latent: al.value, steps: 1, seed: $seed}}}}
outputs:
  video: s.video_latent
"#,
        v = q("video"),
        a = q("audio"),
        b = q(folder),
        tv = t("video_text"),
        ta = t("audio_text"),
        tg = t("audio_global"),
        vl = t("video_latent"),
        al = t("audio_latent"),
    )
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let [plugins, dir, rest @ ..] = &args[..] else {
        eprintln!("usage: av_bridge PLUGINS_DIR FIXTURE_DIR [REPS]");
        std::process::exit(2);
    };
    let reps: usize = rest.first().and_then(|r| r.parse().ok()).unwrap_or(5);
    let rt = Runtime::with_plugins(&[PathBuf::from(plugins)]);
    let session = Session::new(Arc::new(rt));
    let dir = Path::new(dir);
    let graphs = [None, Some("bridge"), Some("fused")].map(|bridge| {
        Graph::from_yaml(&graph(dir, bridge), "av_bridge.yaml", Path::new(".")).expect("graph")
    });
    let opts = RunOptions {
        workers: 1,
        ..RunOptions::default()
    };
    let mut best = [f64::INFINITY; 3];
    // A new seed each run, so the sampling step runs again while the loaded models stay cached.
    for round in 0..=reps {
        for (g, slot) in graphs.iter().zip(best.iter_mut()) {
            let seed = [("seed".to_string(), ArgValue::Text(round.to_string()))];
            let t = Instant::now();
            let r = session.run(g, &seed, &opts).expect("valid graph");
            assert!(r.ok(), "{:?}", r.failed);
            if round > 0 {
                *slot = slot.min(t.elapsed().as_secs_f64());
            }
        }
    }
    println!(
        "{{\"alone_seconds\": {:.6}, \"bridged_seconds\": {:.6}, \"overhead\": {:.4}, \
         \"fused_seconds\": {:.6}, \"fused_overhead\": {:.4}}}",
        best[0],
        best[1],
        best[1] / best[0] - 1.0,
        best[2],
        best[2] / best[0] - 1.0
    );
}
