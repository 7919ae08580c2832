//! Model parity with diffusers: tiny random models of each supported class, saved with their
//! inputs and reference outputs by `tools/make_parity_fixtures.py` in `tests/fixtures/parity/`,
//! are loaded by `LoadDiffusionModel` and run by `Forward` through the plugin, and the outputs are
//! compared with diffusers' (f32, relative error ≤ 1e-4 of the largest reference value).

mod common;

use ditflow::{Graph, RunOptions, Runtime, Session};
use std::path::Path;
use std::sync::Arc;

fn session() -> Session {
    let rt = Runtime::new();
    for lib in common::std_plugins() {
        rt.load_plugin_file(&lib).expect("nodes plugin loads");
    }
    Session::new(Arc::new(rt))
}

fn read(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("{}: no {name}", path.display()));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    let vals = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), vals)
}

/// Runs `Forward` on fixture `name` and returns the largest relative error over its outputs.
fn forward_error(session: &Session, name: &str, outputs: &[&str]) -> f64 {
    forward_error_with(session, name, "io.safetensors", outputs)
}

/// [`forward_error`] with the inputs and outputs of fixture `name`'s file `io`.
fn forward_error_with(session: &Session, name: &str, io: &str, outputs: &[&str]) -> f64 {
    let (loader, port) = match name {
        "vae" | "vae16" => ("LoadVAE", "vae"),
        "flux_dev" | "flux_schnell" => ("LoadFlux", "model"),
        "sd3" | "sd3_5" => ("LoadSD3", "model"),
        "hidream" => ("LoadHiDream", "model"),
        "wan" | "wan_t2" => ("LoadWan", "model"),
        "wan_vae" => ("LoadWanVAE", "vae"),
        "stable_audio" => ("LoadStableAudio", "model"),
        "oobleck" => ("LoadOobleck", "vae"),
        "t5" | "umt5" | "clip" | "clip_projection" => ("LoadTextEncoder", "encoder"),
        _ => ("LoadDiffusionModel", "model"),
    };
    let dir = common::repo().join("tests/fixtures/parity").join(name);
    let out_dir = common::temp_dir(&format!("parity-{name}-{io}"));
    let yaml = format!(
        "version: 1\nnodes:\n  m: {{type: {loader}, inputs: {{path: {dir:?}}}}}\n  f: {{type: Forward, inputs: {{model: m.{port}, inputs: {io:?}, outputs: out.safetensors}}}}\noutputs:\n  path: f.path\n",
        dir = dir.to_string_lossy(),
        io = dir.join(io).to_string_lossy(),
    );
    let g = Graph::from_yaml(&yaml, "parity.yaml", Path::new(".")).unwrap();
    let opts = RunOptions {
        out_dir: out_dir.clone(),
        ..RunOptions::default()
    };
    let report = session.run(&g, &[], &opts).unwrap();
    assert!(report.ok(), "{name}: {:?}", report.failed);
    let mut worst = 0f64;
    for out in outputs {
        let (ws, want) = read(&dir.join(io), &format!("out.{out}"));
        let (gs, got) = read(&out_dir.join("out.safetensors"), &format!("out.{out}"));
        assert_eq!(gs, ws, "{name}.{out} shape");
        let err = common::relative_error(&got, &want);
        eprintln!("{name}.{out}: relative error {err:.2e}");
        worst = worst.max(err);
    }
    worst
}

#[test]
fn pixart_alpha_matches_diffusers() {
    // PixArt-α: resolution and aspect-ratio conditioning, a text mask with dropped tokens.
    assert!(forward_error(&session(), "pixart_alpha", &["sample"]) <= 1e-4);
}

#[test]
fn pixart_sigma_matches_diffusers() {
    // PixArt-Σ: no size conditioning, position interpolation scale 2.
    assert!(forward_error(&session(), "pixart_sigma", &["sample"]) <= 1e-4);
}

#[test]
fn flux_dev_and_schnell_match_diffusers() {
    // Double- and single-stream blocks, 3-axis interleaved RoPE over text-then-image ids, the
    // pooled text and (dev) the guidance embedding.
    let s = session();
    for name in ["flux_dev", "flux_schnell"] {
        assert!(forward_error(&s, name, &["sample"]) <= 1e-4, "{name}");
    }
}

#[test]
fn the_16_channel_vae_without_quant_convs_matches_diffusers() {
    // SD3's and Flux's VAE layout: 16 latent channels, no quant_conv / post_quant_conv.
    assert!(forward_error(&session(), "vae16", &["mean", "logvar", "decoded"]) <= 1e-4);
}

#[test]
fn sd3_and_sd3_5_match_diffusers() {
    // Joint blocks with the last one context_pre_only and the cropped position table; SD3.5 with
    // q/k RMS norms, dual attention in block 0, and block 1 skipped (skip_layers).
    let s = session();
    for name in ["sd3", "sd3_5"] {
        assert!(forward_error(&s, name, &["sample"]) <= 1e-4, "{name}");
    }
}

#[test]
fn hidream_matches_diffusers() {
    // Double- and single-stream blocks with sparse MoE feed-forwards (4 experts, top 2, a
    // shared one), q/k RMS norms across the heads, 3-axis RoPE, and each block reading its own
    // Llama layer (llama_layers out of order). A wide latent is padded to max_resolution's
    // tokens, their keys masked, as diffusers does.
    let s = session();
    assert!(forward_error(&s, "hidream", &["sample"]) <= 1e-4);
    assert!(forward_error_with(&s, "hidream", "io_wide.safetensors", &["sample"]) <= 1e-4);
}

#[test]
fn wan_matches_diffusers() {
    // WanTransformer3DModel: 3-D patches, RoPE with the head dimension split over frames, rows
    // and columns (a non-square picture), q/k RMS norms across the heads, the cross-attention
    // norm, two rows at two timesteps; and a 2-frame temporal patch.
    let s = session();
    assert!(forward_error(&s, "wan", &["sample"]) <= 1e-4);
    assert!(forward_error(&s, "wan_t2", &["sample"]) <= 1e-4);
}

#[test]
fn stable_audio_matches_diffusers() {
    // StableAudioDiTModel: the global token prepended, grouped-query cross-attention (4 query
    // heads over 2 key/value heads), RoPE on half of each head's channels in split halves, with
    // the pipeline's rotary tables given, and built here the pipeline's way when not.
    let s = session();
    assert!(forward_error(&s, "stable_audio", &["sample"]) <= 1e-4);
    assert!(
        forward_error_with(&s, "stable_audio", "io_no_rotary.safetensors", &["sample"]) <= 1e-4
    );
}

/// Graph nodes loading a bridge fixture: `b` (the bridge of `dir/model`) and the four input
/// tensors of `io` (`video`, `audio`, `video_emb`, `audio_emb`).
fn bridge_fixture_nodes(dir: &Path, io: &Path) -> String {
    let q = |p: &Path| format!("{:?}", p.to_string_lossy());
    let mut nodes = format!(
        "  b: {{type: LoadBridge, inputs: {{path: {d}}}}}\n",
        d = q(&dir.join("model"))
    );
    for t in ["video", "audio", "video_emb", "audio_emb"] {
        nodes += &format!(
            "  {t}: {{type: LoadTensor, inputs: {{path: {io}, name: in.{t}}}}}\n",
            io = q(io)
        );
    }
    nodes
}

#[test]
fn the_dual_cross_attention_bridge_matches_bridgedit() {
    // BridgeDiT's CrossDiTBlockAdaLN, re-written in PyTorch from its public code by
    // tools/make_bridge_fixtures.py: per-stream adaLN, q/k/v with RoPE over each stream's own
    // index, bicross (each stream attends to the other) for two blocks, and a2v (the second
    // stream attends to itself). Tolerance 1e-4 relative to the largest reference value.
    for (name, blocks) in [("bridge", 2), ("bridge_a2v", 1)] {
        let dir = common::repo().join("tests/fixtures/parity").join(name);
        let io = dir.join("io.safetensors");
        let mut nodes = bridge_fixture_nodes(&dir, &io);
        let mut outputs = String::new();
        for i in 0..blocks {
            nodes += &format!("  blk{i}: {{type: BridgeBlock, inputs: {{bridge: b.bridge, index: {i}, video: video.tensor, audio: audio.tensor, video_emb: video_emb.tensor, audio_emb: audio_emb.tensor}}}}\n");
            outputs += &format!("  video_{i}: blk{i}.video\n  audio_{i}: blk{i}.audio\n");
        }
        let yaml = format!("version: 1\nnodes:\n{nodes}outputs:\n{outputs}");
        let g = Graph::from_yaml(&yaml, "bridge.yaml", Path::new(".")).unwrap();
        let report = session().run(&g, &[], &RunOptions::default()).unwrap();
        assert!(report.ok(), "{name}: {:?}", report.failed);
        for i in 0..blocks {
            for stream in ["video", "audio"] {
                let key = format!("{stream}_{i}");
                let e = relative_error(report.output(&key).unwrap(), &io, &key);
                eprintln!("{name} {key}: {e:.2e}");
                assert!(e <= 1e-4, "{name} {key}: {e:.2e}");
            }
        }
    }
}

#[test]
fn the_bridge_rotates_by_each_token_s_time_in_seconds() {
    // LTX-2's alignment (rope_positions "seconds"): 15 video tokens as 5 frames of 0.25 s and 7
    // audio tokens 0.2 s apart after a global token at 0, 4 positions per second, against the
    // PyTorch block of tools/make_bridge_fixtures.py at those positions, with the dual
    // cross-attention, joint attention (each stream over both) and the additive exchange (each
    // token takes the other stream's values interpolated to its time; its checkpoint has no q
    // or k). Without the frame count BridgeBlock rotates by the sequence index, which differs.
    // Tolerance 1e-4 relative.
    for name in ["bridge_seconds", "bridge_joint", "bridge_additive"] {
        bridge_at_token_times(name);
    }
}

fn bridge_at_token_times(name: &str) {
    let dir = common::repo().join("tests/fixtures/parity").join(name);
    let io = dir.join("io.safetensors");
    let mut nodes = bridge_fixture_nodes(&dir, &io);
    let ins = "bridge: b.bridge, video: video.tensor, audio: audio.tensor, video_emb: video_emb.tensor, audio_emb: audio_emb.tensor";
    nodes += &format!("  timed: {{type: BridgeBlock, inputs: {{{ins}, frames: 5}}}}\n");
    nodes += &format!("  indexed: {{type: BridgeBlock, inputs: {{{ins}}}}}\n");
    let yaml = format!(
        "version: 1\nnodes:\n{nodes}outputs:\n  video: timed.video\n  audio: timed.audio\n  \
         video_index: indexed.video\n"
    );
    let g = Graph::from_yaml(&yaml, "bridge_seconds.yaml", Path::new(".")).unwrap();
    let report = session().run(&g, &[], &RunOptions::default()).unwrap();
    assert!(
        report.output("video").is_some(),
        "{name}: {:?}",
        report.failed
    );
    for stream in ["video", "audio"] {
        let e = relative_error(report.output(stream).unwrap(), &io, &format!("{stream}_0"));
        eprintln!("{name} {stream}: {e:.2e}");
        assert!(e <= 1e-4, "{name} {stream}: {e:.2e}");
    }
    match report.output("video_index") {
        Some(v) => {
            let e = relative_error(v, &io, "video_0");
            assert!(
                e > 1e-3,
                "{name}: the sequence index gives other numbers ({e:.2e})"
            );
        }
        // The additive exchange needs token times: without the frames it is refused.
        None => {
            let f = report
                .failed
                .iter()
                .find(|f| &*f.node == "indexed")
                .unwrap();
            assert!(f.error.contains("token times"), "{}", f.error);
        }
    }
}

#[test]
fn stable_audio_conditioning_matches_the_pipeline() {
    // StableAudioProjectionModel (a linear text projection, the seconds start/end number
    // conditioners) and StableAudioPipeline's assembly: the prompt padded to 8 tokens with the
    // padding zeroed, then the start and end tokens; the global states the two side by side.
    // Tolerance 1e-4 relative to the largest reference value.
    let dir = common::repo().join("tests/fixtures/parity/stable_audio_projection");
    let io = dir.join("io.safetensors");
    let q = |p: &Path| format!("{:?}", p.to_string_lossy());
    let yaml = format!(
        r#"version: 1
nodes:
  p: {{type: LoadStableAudioProjection, inputs: {{path: {m}}}}}
  t: {{type: LoadTensor, inputs: {{path: {io}, name: in.text}}}}
  text: {{type: TensorAs, inputs: {{tensor: t.tensor, kind: Conditioning}}}}
  c: {{type: StableAudioConditioning, inputs: {{projection: p.projection, text: text.value, seconds_start: 1.5, seconds_end: 9.25, pad_to: 8}}}}
  u: {{type: StableAudioConditioning, inputs: {{projection: p.projection, text: text.value, seconds_start: 1.5, seconds_end: 9.25, pad_to: 8, unconditional: true}}}}
  late: {{type: StableAudioConditioning, inputs: {{projection: p.projection, text: text.value, seconds_end: 48.0}}}}
outputs:
  c: c.conditioning
  u: u.conditioning
"#,
        m = q(&dir.join("model")),
        io = q(&io)
    );
    let g = Graph::from_yaml(&yaml, "sa_conditioning.yaml", Path::new(".")).unwrap();
    let report = session().run(&g, &[], &RunOptions::default()).unwrap();
    let part = |v: &ditflow::Value, name: &str| -> ditflow::Value {
        let ditflow::Value::List(pairs) = v else {
            panic!("a conditioning of named parts")
        };
        for pair in pairs.iter() {
            if let ditflow::Value::List(p) = pair.as_ref() {
                if matches!(p[0].as_ref(), ditflow::Value::String(s) if s.as_str() == name) {
                    return p[1].as_ref().clone();
                }
            }
        }
        panic!("no part {name}")
    };
    let c = report.output("c").unwrap();
    for name in ["encoder_hidden_states", "global_hidden_states"] {
        let e = relative_error(&part(c, name), &io, name);
        eprintln!("stable audio conditioning {name}: {e:.2e}");
        assert!(e <= 1e-4, "{name}: {e:.2e}");
    }
    // The unconditional form: zero encoder states, the same global states.
    let u = report.output("u").unwrap();
    let ditflow::Value::Tensor(_, zeros) = part(u, "encoder_hidden_states") else {
        panic!("a tensor")
    };
    assert!(zeros.as_f32().iter().all(|&x| x == 0.0));
    assert!(
        relative_error(
            &part(u, "global_hidden_states"),
            &io,
            "global_hidden_states"
        ) <= 1e-4
    );
    // Seconds beyond the model's range are refused, naming the range.
    let f = report
        .failed
        .iter()
        .find(|f| &*f.node == "late")
        .expect("48 s is refused");
    assert!(f.error.contains("[0, 47]"), "{}", f.error);
}

#[test]
fn oobleck_matches_diffusers() {
    // AutoencoderOobleck: weight norms folded at load (a transposed convolution's over its
    // input channels), Snake activations, residual units with dilations 1, 3, 9, strides 2 and
    // 4 down and up; the latent's mean and softplus std, and a decode.
    assert!(forward_error(&session(), "oobleck", &["mean", "std", "decoded"]) <= 1e-4);
}

#[test]
fn the_wan_vae_matches_diffusers_chunk_by_chunk() {
    // AutoencoderKLWan on 9 frames: the encoder's first frame alone then two chunks of four,
    // the decoder one latent frame at a time, the causal convolutions' caches, the temporal
    // downsamplers' pass-through first chunk and the upsamplers' Rep rule.
    assert!(forward_error(&session(), "wan_vae", &["mean", "logvar", "decoded"]) <= 1e-4);
}

/// A graph of two `BridgedForward`s of the Wan tower `video` and the Stable Audio tower `audio`
/// coupled by `bridge` on the in.* inputs of `vi` and `ai`: `video`, `audio` with the bridge on,
/// `video_alone`, `audio_alone` with it off.
fn bridged_forward_graph(
    video: &Path,
    audio: &Path,
    bridge: &Path,
    vi: &Path,
    ai: &Path,
) -> String {
    let q = |p: &Path| format!("{:?}", p.to_string_lossy());
    format!(
        r#"version: 1
nodes:
  v: {{type: LoadWan, inputs: {{path: {v}}}}}
  a: {{type: LoadStableAudio, inputs: {{path: {a}}}}}
  b: {{type: LoadBridge, inputs: {{path: {b}}}}}
  on: {{type: BridgedForward, inputs: {{video: v.model, audio: a.model, bridge: b.bridge, video_inputs: {vi}, audio_inputs: {ai}}}}}
  off: {{type: BridgedForward, inputs: {{video: v.model, audio: a.model, bridge: b.bridge, video_inputs: {vi}, audio_inputs: {ai}, enabled: false}}}}
outputs:
  video: on.video
  audio: on.audio
  video_alone: off.video
  audio_alone: off.audio
"#,
        v = q(video),
        a = q(audio),
        b = q(bridge),
        vi = q(vi),
        ai = q(ai),
    )
}

#[test]
fn two_towers_coupled_by_a_bridge_match_bridgedit_s_segments() {
    // The tiny Wan and Stable Audio transformers coupled by two dual cross-attention blocks
    // after video blocks 0, 1 and audio blocks 0, 1, through block stepping, against diffusers'
    // blocks run segment by segment with the PyTorch bridge (tools/make_bridged_towers_fixtures.py);
    // with the bridge off, each tower alone. Tolerance 1e-4 relative to the largest reference.
    let parity = common::repo().join("tests/fixtures/parity");
    let dir = parity.join("bridged_towers");
    let io = dir.join("io.safetensors");
    let q = |p: &Path| format!("{:?}", p.to_string_lossy());
    let yaml = bridged_forward_graph(
        &parity.join("wan"),
        &parity.join("stable_audio"),
        &dir.join("bridge"),
        &dir.join("video.safetensors"),
        &dir.join("audio.safetensors"),
    );
    let g = Graph::from_yaml(&yaml, "bridged.yaml", Path::new(".")).unwrap();
    let report = session().run(&g, &[], &RunOptions::default()).unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    for key in ["video", "audio", "video_alone", "audio_alone"] {
        let e = relative_error(report.output(key).unwrap(), &io, key);
        eprintln!("bridged towers {key}: {e:.2e}");
        assert!(e <= 1e-4, "{key}: {e:.2e}");
    }
    // A bridge whose blocks follow tower blocks these towers do not have (the 4-block one of
    // the bridge fixture) is refused before anything runs, naming the bridge and the counts.
    let bad = yaml.replace(&q(&dir.join("bridge")), &q(&parity.join("bridge/model")));
    let g = Graph::from_yaml(&bad, "bridged_bad.yaml", Path::new(".")).unwrap();
    let report = session().run(&g, &[], &RunOptions::default()).unwrap();
    let f = report.failed.first().expect("the bridged forward fails");
    assert!(
        f.error.contains("bridge/model") && f.error.contains("towers of 2 and 2 blocks"),
        "{}",
        f.error
    );
}

#[test]
fn two_towers_fused_in_their_cross_attention_match_ovi_s_fusion_blocks() {
    // Ovi's key/value injection (a FusedCrossAttentionBridge in every block pair of the tiny Wan
    // and a tiny Stable Audio of the same head width, Ovi's RoPE: the video's three Wan bands,
    // the audio's time band at scaled positions), run through block stepping by halves, against
    // the pure PyTorch fusion of tools/make_fused_bridge_fixtures.py on diffusers' blocks.
    // Tolerance 1e-4 relative to the largest reference; with the bridge off, each tower alone.
    let parity = common::repo().join("tests/fixtures/parity");
    let inputs = parity.join("bridged_towers");
    let dir = parity.join("bridged_towers_fused");
    let q = |p: &Path| format!("{:?}", p.to_string_lossy());
    let yaml = bridged_forward_graph(
        &parity.join("wan"),
        &dir.join("stable_audio"),
        &dir.join("bridge"),
        &inputs.join("video.safetensors"),
        &dir.join("audio.safetensors"),
    );
    let g = Graph::from_yaml(&yaml, "fused.yaml", Path::new(".")).unwrap();
    let report = session().run(&g, &[], &RunOptions::default()).unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    for key in ["video", "audio"] {
        let e = relative_error(
            report.output(key).unwrap(),
            &dir.join("io.safetensors"),
            key,
        );
        eprintln!("fused towers {key}: {e:.2e}");
        assert!(e <= 1e-4, "{key}: {e:.2e}");
    }
    let e = relative_error(
        report.output("video_alone").unwrap(),
        &inputs.join("io.safetensors"),
        "video_alone",
    );
    assert!(e <= 1e-4, "video alone: {e:.2e}");
    let e = relative_error(
        report.output("audio_alone").unwrap(),
        &dir.join("io.safetensors"),
        "audio_alone",
    );
    assert!(e <= 1e-4, "audio alone: {e:.2e}");
    // A config whose RoPE does not fit the towers is refused when loaded, naming its file.
    let bad = common::temp_dir("fused-bad");
    let cfg = std::fs::read_to_string(dir.join("bridge/config.json")).unwrap();
    let cfg = cfg.replace("\"rope_dims\": 4", "\"rope_dims\": 6");
    std::fs::write(bad.join("config.json"), cfg).unwrap();
    std::fs::copy(
        dir.join("bridge/bridge.safetensors"),
        bad.join("bridge.safetensors"),
    )
    .unwrap();
    let g = Graph::from_yaml(
        &yaml.replace(&q(&dir.join("bridge")), &q(&bad)),
        "fused_bad.yaml",
        Path::new("."),
    )
    .unwrap();
    let report = session().run(&g, &[], &RunOptions::default()).unwrap();
    let f = report.failed.first().expect("the bridge is refused");
    assert!(
        f.error.contains("config.json") && f.error.contains("set rope_dims to 4"),
        "{}",
        f.error
    );
}

#[test]
fn sampling_two_bridged_towers_matches_the_lockstep_reference() {
    // SampleAudioVideo as BridgeDiT samples: both towers each step through the bridge, the
    // video on UniPC flow sigmas (shift 3), the audio on DPM-Solver++ with v-prediction, CFG 3
    // and 2 with their own negatives, seeded Philox noise; then with modality-isolation
    // guidance 0.5. Against diffusers' schedulers and blocks with the PyTorch bridge
    // (tools/make_bridged_towers_fixtures.py). Tolerance 1e-4 relative to the largest value.
    let parity = common::repo().join("tests/fixtures/parity");
    let dir = parity.join("bridged_towers");
    lockstep_sampling_error(&dir.join("bridge"), &parity.join("stable_audio"), &dir);
}

#[test]
fn sampling_two_towers_fused_by_ovi_s_bridge_matches_the_lockstep_reference() {
    // The same sampling with the fused cross-attention bridge (its rows paired through each
    // guided batch, switched off for the isolation pass), against the PyTorch fusion
    // (tools/make_fused_bridge_fixtures.py). Tolerance 1e-4 relative to the largest value.
    let parity = common::repo().join("tests/fixtures/parity");
    let dir = parity.join("bridged_towers_fused");
    lockstep_sampling_error(&dir.join("bridge"), &dir.join("stable_audio"), &dir);
}

/// Runs SampleAudioVideo with `bridge` over the tiny Wan and the audio tower `audio` on the
/// conditionings of `bridged_towers/sample.safetensors`, and checks both latents, plain and
/// with isolation guidance 0.5, against `dir/sample.safetensors` within 1e-4.
fn lockstep_sampling_error(bridge: &Path, audio: &Path, dir: &Path) {
    let parity = common::repo().join("tests/fixtures/parity");
    let io = dir.join("sample.safetensors");
    let scheduler = parity.join("bridged_towers/video_scheduler/scheduler_config.json");
    let q = |p: &Path| format!("{:?}", p.to_string_lossy());
    let t = |n: &str| {
        format!(
            "{{type: LoadTensor, inputs: {{path: {}, name: {n}}}}}",
            q(&io)
        )
    };
    for (suffix, iso) in [("", 0.0), ("_iso", 0.5)] {
        let yaml = format!(
            r#"version: 1
nodes:
  v: {{type: LoadWan, inputs: {{path: {v}}}}}
  a: {{type: LoadStableAudio, inputs: {{path: {a}}}}}
  b: {{type: LoadBridge, inputs: {{path: {b}}}}}
  tvp: {tvp}
  tvn: {tvn}
  tap: {tap}
  tan: {tan}
  tgp: {tgp}
  tgn: {tgn}
  tvl: {tvl}
  tal: {tal}
  vp: {{type: ConditioningPart, inputs: {{tensor: tvp.tensor}}}}
  vn: {{type: ConditioningPart, inputs: {{tensor: tvn.tensor}}}}
  ap0: {{type: ConditioningPart, inputs: {{tensor: tap.tensor}}}}
  ap: {{type: ConditioningPart, inputs: {{conditioning: ap0.conditioning, name: global_hidden_states, tensor: tgp.tensor}}}}
  an0: {{type: ConditioningPart, inputs: {{tensor: tan.tensor}}}}
  an: {{type: ConditioningPart, inputs: {{conditioning: an0.conditioning, name: global_hidden_states, tensor: tgn.tensor}}}}
  vl: {{type: TensorAs, inputs: {{tensor: tvl.tensor, kind: Latent}}}}
  al: {{type: TensorAs, inputs: {{tensor: tal.tensor, kind: Latent}}}}
  s: {{type: SampleAudioVideo, inputs: {{video: v.model, audio: a.model, bridge: b.bridge, video_positive: vp.conditioning, video_negative: vn.conditioning, audio_positive: ap.conditioning, audio_negative: an.conditioning, video_latent: vl.value, audio_latent: al.value, video_scheduler_config: {sc}, steps: 4, video_cfg: 3.0, audio_cfg: 2.0, isolation: {iso}, seed: 5}}}}
outputs:
  video_latent{suffix}: s.video_latent
  audio_latent{suffix}: s.audio_latent
"#,
            v = q(&parity.join("wan")),
            a = q(audio),
            b = q(bridge),
            tvp = t("in.video_positive"),
            tvn = t("in.video_negative"),
            tap = t("in.audio_positive"),
            tan = t("in.audio_negative"),
            tgp = t("in.audio_global_positive"),
            tgn = t("in.audio_global_negative"),
            tvl = t("out.video_latent"),
            tal = t("out.audio_latent"),
            sc = q(&scheduler),
        );
        let g = Graph::from_yaml(&yaml, "sample_av.yaml", Path::new(".")).unwrap();
        let report = session().run(&g, &[], &RunOptions::default()).unwrap();
        assert!(report.ok(), "{suffix}: {:?}", report.failed);
        for key in [
            format!("video_latent{suffix}"),
            format!("audio_latent{suffix}"),
        ] {
            let e = relative_error(report.output(&key).unwrap(), &io, &key);
            eprintln!("SampleAudioVideo {key}: {e:.2e}");
            assert!(e <= 1e-4, "{key}: {e:.2e}");
        }
    }
}

#[test]
fn decode_nodes_give_audio_and_video_values_of_the_vaes() {
    // DecodeAudio (Oobleck) gives the first row of the decode at the VAE's 8000 Hz; DecodeVideo
    // (Wan VAE) gives its frames [T, H, W, 3] mapped from [-1, 1] to [0, 1] at the given rate.
    // Tolerance as the VAEs' parity: 1e-4 relative to the largest value.
    let parity = common::repo().join("tests/fixtures/parity");
    let q = |p: &Path| format!("{:?}", p.to_string_lossy());
    let (oo, wv) = (parity.join("oobleck"), parity.join("wan_vae"));
    let yaml = format!(
        r#"version: 1
nodes:
  o: {{type: LoadOobleck, inputs: {{path: {o}}}}}
  w: {{type: LoadWanVAE, inputs: {{path: {w}}}}}
  ol: {{type: LoadTensor, inputs: {{path: {oi}, name: in.latent}}}}
  wl: {{type: LoadTensor, inputs: {{path: {wi}, name: in.latent}}}}
  oll: {{type: TensorAs, inputs: {{tensor: ol.tensor, kind: Latent}}}}
  wll: {{type: TensorAs, inputs: {{tensor: wl.tensor, kind: Latent}}}}
  da: {{type: DecodeAudio, inputs: {{vae: o.vae, latent: oll.value}}}}
  dv: {{type: DecodeVideo, inputs: {{vae: w.vae, latent: wll.value, fps: 12}}}}
outputs:
  audio: da.audio
  video: dv.video
"#,
        o = q(&oo),
        w = q(&wv),
        oi = q(&oo.join("io.safetensors")),
        wi = q(&wv.join("io.safetensors")),
    );
    let g = Graph::from_yaml(&yaml, "decode.yaml", Path::new(".")).unwrap();
    let report = session().run(&g, &[], &RunOptions::default()).unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    let media = |name: &str| -> (Vec<usize>, Vec<f32>, f64) {
        let v = report.output(name).unwrap();
        let ditflow::Value::List(items) = &**v else {
            panic!("{name}: [tensor, rate]")
        };
        let (ditflow::Value::Tensor(_, t), ditflow::Value::Float(r)) = (&*items[0], &*items[1])
        else {
            panic!("{name}: [tensor, rate]")
        };
        (t.shape().to_vec(), t.as_f32().to_vec(), *r)
    };
    let (shape, audio, rate) = media("audio");
    let (_, want) = read(&oo.join("io.safetensors"), "out.decoded");
    assert_eq!((shape.as_slice(), rate), (&[2usize, 64][..], 8000.0));
    let e = common::relative_error(&audio, &want[..2 * 64]);
    assert!(e <= 1e-4, "audio {e:.2e}");
    let (shape, frames, fps) = media("video");
    let (ws, want) = read(&wv.join("io.safetensors"), "out.decoded");
    assert_eq!((shape.as_slice(), fps), (&[9usize, 16, 16, 3][..], 12.0));
    let (t, h, w) = (ws[2], ws[3], ws[4]);
    let want: Vec<f32> = (0..t * h * w * 3)
        .map(|i| {
            let (f, rest) = (i / (h * w * 3), i % (h * w * 3));
            let (y, x, c) = (rest / (w * 3), (rest / 3) % w, rest % 3);
            (want[((c * t + f) * h + y) * w + x] * 0.5 + 0.5).clamp(0.0, 1.0)
        })
        .collect();
    let e = common::relative_error(&frames, &want);
    assert!(e <= 1e-4, "video {e:.2e}");
}

#[test]
fn dit_matches_diffusers() {
    // Class-conditional DiT, including the null class.
    assert!(forward_error(&session(), "dit", &["sample"]) <= 1e-4);
}

#[test]
fn autoencoder_kl_matches_diffusers() {
    // Encode (mean, clamped log-variance), decode, and diffusers' tiled decode with blending.
    assert!(forward_error(&session(), "vae", &["mean", "logvar", "decoded", "tiled"]) <= 1e-4);
}

#[test]
fn clip_text_encoders_match_transformers() {
    // CLIPTextModel with the legacy end-of-text id (pooled at the largest id) and
    // CLIPTextModelWithProjection with a real one (pooled at its first occurrence), on padded
    // batches.
    let s = session();
    assert!(forward_error(&s, "clip", &["last_hidden_state", "pooler_output"]) <= 1e-4);
    assert!(forward_error(&s, "clip_projection", &["last_hidden_state", "text_embeds"]) <= 1e-4);
}

#[test]
fn t5_encoder_matches_transformers() {
    // Gated-GELU T5 with relative position buckets past the exact range and padded tokens.
    assert!(forward_error(&session(), "t5", &["last_hidden_state"]) <= 1e-4);
    // UMT5 (Wan's text encoder): each of its 3 blocks has its own relative position bias.
    assert!(forward_error(&session(), "umt5", &["last_hidden_state"]) <= 1e-4);
}

/// Runs tokens → image on the pipeline fixture with scheduler config `scheduler` and compares
/// with the reference image `out.{image}` of `io` (a file of the fixture). Tolerance: 1e-3
/// relative to the largest pixel value.
fn pipeline_error(scheduler: &str, sampler: &str, io: &str, image: &str) -> f64 {
    let dir = common::repo().join("tests/fixtures/parity/pipeline");
    let io = dir.join(io);
    let yaml = format!(
        r#"version: 1
nodes:
  te: {{type: LoadTextEncoder, inputs: {{path: {d:?}}}}}
  dit: {{type: LoadDiffusionModel, inputs: {{path: {t:?}}}}}
  vae: {{type: LoadVAE, inputs: {{path: {v:?}}}}}
  pos: {{type: TextEncode, inputs: {{encoder: te.encoder, text: "a red circle on a blue background", max_tokens: 12}}}}
  neg: {{type: TextEncode, inputs: {{encoder: te.encoder, text: "", max_tokens: 12}}}}
  latent: {{type: EmptyLatent, inputs: {{width: 16, height: 16, channels: 4, downscale: 2}}}}
  sample: {{type: Sample, inputs: {{model: dit.model, positive: pos.conditioning, negative: neg.conditioning, latent: latent.latent, sampler: {sampler}, scheduler_config: {s:?}, steps: 6, cfg: 3.0, seed: 7}}}}
  decode: {{type: VAEDecode, inputs: {{vae: vae.vae, latent: sample.latent}}}}
outputs:
  image: decode.image
"#,
        d = dir.join("text_encoder").to_string_lossy(),
        t = dir.join("transformer").to_string_lossy(),
        v = dir.join("vae").to_string_lossy(),
        s = dir
            .join(scheduler)
            .join("scheduler_config.json")
            .to_string_lossy(),
    );
    let g = Graph::from_yaml(&yaml, "pipeline.yaml", Path::new(".")).unwrap();
    let report = session().run(&g, &[], &RunOptions::default()).unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    let ditflow::Value::Tensor(_, img) = &**report.output("image").unwrap() else {
        panic!("an image")
    };
    let (ws, want) = read(&io, &format!("out.{image}"));
    assert_eq!(img.shape(), &ws[..]);
    let err = common::relative_error(img.as_f32(), &want);
    eprintln!("pipeline ({sampler}) image: relative error {err:.2e}");
    err
}

#[test]
fn text_to_image_pipeline_matches_diffusers() {
    // Tokens → T5 → PixArt with guidance → VAE, against diffusers' PixArtSigmaPipeline on the same
    // tiny models started from ditflow's Philox noise: DPM-Solver++(2M) (the pipeline's default)
    // and Euler (scaled model inputs).
    let io = common::repo().join("tests/fixtures/parity/pipeline/io.safetensors");
    // The fixture script reimplements ditflow's noise in numpy; check that first.
    let (_, noise) = read(&io, "in.noise");
    let ours = ditflow::tensor::ops::randn(&[1, 4, 8, 8], 7, ditflow::tensor::Device::Cpu).unwrap();
    assert_eq!(
        ours.as_f32(),
        &noise[..],
        "the fixture's noise is ditflow's"
    );
    assert!(pipeline_error("scheduler", "auto", "io.safetensors", "image") <= 1e-3);
    assert!(pipeline_error("scheduler_euler", "euler", "io.safetensors", "image_euler") <= 1e-3);
}

#[test]
fn pixart_image_to_image_with_dpm_solver_matches_diffusers_img2img_recipe() {
    // PixArt has no img2img pipeline in diffusers; the fixture runs PixArtSigmaPipeline with its
    // schedule cut as diffusers' img2img pipelines cut it (strength 0.6 of 6 steps: from step 2,
    // the scheduler's begin index there, so DPM-Solver++ restarts its order count) from
    // add_noise(VAE mean of init.png, ditflow's noise). The graph: LoadImage, VAEEncode,
    // Sample with init_latent and denoise 0.6. Tolerance 1e-3 relative, as above.
    let dir = common::repo().join("tests/fixtures/parity/pipeline");
    let image = common::repo().join("tests/fixtures/parity/sd3_pipeline/init.png");
    let yaml = format!(
        r#"version: 1
nodes:
  te: {{type: LoadTextEncoder, inputs: {{path: {d:?}}}}}
  dit: {{type: LoadDiffusionModel, inputs: {{path: {t:?}}}}}
  vae: {{type: LoadVAE, inputs: {{path: {v:?}}}}}
  img: {{type: LoadImage, inputs: {{path: {i:?}}}}}
  enc: {{type: VAEEncode, inputs: {{vae: vae.vae, image: img.image}}}}
  pos: {{type: TextEncode, inputs: {{encoder: te.encoder, text: "a red circle on a blue background", max_tokens: 12}}}}
  neg: {{type: TextEncode, inputs: {{encoder: te.encoder, text: "", max_tokens: 12}}}}
  sample: {{type: Sample, inputs: {{model: dit.model, positive: pos.conditioning, negative: neg.conditioning, init_latent: enc.latent, denoise: 0.6, sampler: auto, scheduler_config: {s:?}, steps: 6, cfg: 3.0, seed: 7}}}}
  decode: {{type: VAEDecode, inputs: {{vae: vae.vae, latent: sample.latent}}}}
outputs:
  image: decode.image
"#,
        d = dir.join("text_encoder").to_string_lossy(),
        t = dir.join("transformer").to_string_lossy(),
        v = dir.join("vae").to_string_lossy(),
        i = image.to_string_lossy(),
        s = dir
            .join("scheduler/scheduler_config.json")
            .to_string_lossy(),
    );
    let g = Graph::from_yaml(&yaml, "img2img.yaml", Path::new(".")).unwrap();
    let report = session().run(&g, &[], &RunOptions::default()).unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    let ditflow::Value::Tensor(_, img) = &**report.output("image").unwrap() else {
        panic!("an image")
    };
    let (ws, want) = read(&dir.join("io_samplers.safetensors"), "out.image_img2img");
    assert_eq!(img.shape(), &ws[..]);
    let err = common::relative_error(img.as_f32(), &want);
    eprintln!("pixart img2img (dpm-solver++ from step 2): relative error {err:.2e}");
    assert!(err <= 1e-3, "{err:.2e}");
}

#[test]
fn stochastic_and_two_call_samplers_match_diffusers_in_the_pipeline() {
    // Euler ancestral adds fresh noise at every step: ditflow draws it from the seed's stream
    // k + 1 at step k, and the fixture script hands diffusers the same noise (replayed Philox).
    // Heun calls the model twice per step (11 calls for 6 steps), each call with CFG.
    let io = "io_samplers.safetensors";
    let e = pipeline_error(
        "scheduler_euler_ancestral",
        "euler_ancestral",
        io,
        "image_euler_ancestral",
    );
    assert!(e <= 1e-3, "euler_ancestral {e:.2e}");
    let e = pipeline_error("scheduler_heun", "heun", io, "image_heun");
    assert!(e <= 1e-3, "heun {e:.2e}");
}

#[test]
fn euler_with_custom_sigmas_matches_the_pipeline_given_them() {
    // Sample's spacing: custom with six sigmas (the end, 0, from the config) against
    // PixArtSigmaPipeline(sigmas=[14.6, 8, 4, 2, 1, 0.4, 0]) with EulerDiscreteScheduler. Tolerance
    // 1e-3 as above.
    let sampler = "euler, spacing: custom, sigmas: \"14.6, 8.0, 4.0, 2.0, 1.0, 0.4\"";
    let e = pipeline_error(
        "scheduler_euler",
        sampler,
        "io_custom_sigmas.safetensors",
        "image",
    );
    assert!(e <= 1e-3, "{e:.2e}");
}

/// Runs the shipped graph `graphs/{graph}` on pipeline fixture `fixture` (its defaults point
/// there) with `sets`, and returns the largest relative errors of the final latent and the image
/// against the diffusers pipeline's (`out.latent` and `out.image` of its io.safetensors).
fn graph_pipeline_error(graph: &str, fixture: &str, sets: &[(&str, &str)]) -> (f64, f64) {
    let refs = ("io.safetensors", "out.latent", "out.image");
    graph_pipeline_error_against(graph, fixture, refs, sets)
}

/// [`graph_pipeline_error`] against the references `(file, latent, image)` of the fixture.
fn graph_pipeline_error_against(
    graph: &str,
    fixture: &str,
    (file, latent_ref, image_ref): (&str, &str, &str),
    sets: &[(&str, &str)],
) -> (f64, f64) {
    use ditflow::ArgValue;
    let io = common::repo()
        .join("tests/fixtures/parity")
        .join(fixture)
        .join(file);
    // A graph file, or `edited:FILE:FROM=>TO` for the file with one piece of text replaced.
    let g = match graph.strip_prefix("edited:") {
        Some(spec) => {
            let (file, edit) = spec.split_once(':').unwrap();
            let (from, to) = edit.split_once("=>").unwrap();
            let dir = common::repo().join("graphs");
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            assert!(text.contains(from), "{file} has no {from:?}");
            Graph::from_yaml(&text.replace(from, to), file, &dir).unwrap()
        }
        None => Graph::from_file(&common::repo().join("graphs").join(graph)).unwrap(),
    };
    let args: Vec<(String, ArgValue)> = sets
        .iter()
        .map(|(k, v)| (k.to_string(), ArgValue::Text(v.to_string())))
        .collect();
    let opts = RunOptions {
        out_dir: common::temp_dir(&format!("graph-{fixture}")),
        ..RunOptions::default()
    };
    let report = session().run(&g, &args, &opts).unwrap();
    assert!(report.ok(), "{graph}: {:?}", report.failed);
    let err = |output: &str, reference: &str| {
        let ditflow::Value::Tensor(_, got) = &**report.output(output).unwrap() else {
            panic!("a tensor")
        };
        let (ws, want) = read(&io, reference);
        assert_eq!(got.shape(), &ws[..], "{graph}: {output}");
        common::relative_error(got.as_f32(), &want)
    };
    let (latent, image) = (err("latent", latent_ref), err("pixels", image_ref));
    eprintln!("{graph}: latent relative error {latent:.2e}, image {image:.2e}");
    (latent, image)
}

#[test]
fn sd3_graph_matches_stable_diffusion_3_pipeline() {
    // CLIP-L + CLIP-G penultimate states padded to T5's width, T5 tokens, pooled projections,
    // flow-matching Euler with the scheduler's sigmas and shift 3, CFG 4, the 16-channel VAE:
    // graphs/sd3_text_to_image.yaml against StableDiffusion3Pipeline. Tolerance 1e-3 relative
    // to the largest reference value, for the final latent and the image.
    let (latent, image) = graph_pipeline_error(
        "sd3_text_to_image.yaml",
        "sd3_pipeline",
        &[
            ("steps", "4"),
            ("cfg", "4"),
            ("t5_tokens", "16"),
            ("seed", "11"),
        ],
    );
    assert!(latent <= 1e-3 && image <= 1e-3, "{latent:.2e} {image:.2e}");
}

#[test]
fn sd3_skip_layer_guidance_matches_stable_diffusion_3_pipeline() {
    // StableDiffusion3Pipeline's skip_guidance_layers [1], scale 2.8, start 0.1, stop 0.75: a third
    // evaluation of the conditional prompt without block 1 at steps 1 and 2 of 4, added as
    // 2.8·(c − c_skip): the graph's slg inputs, through a range-override patch that only acts
    // in the skip-layers branch. Tolerance 1e-3 as above.
    let refs = ("io_slg.safetensors", "out.latent", "out.image");
    let (latent, image) = graph_pipeline_error_against(
        "sd3_text_to_image.yaml",
        "sd3_pipeline",
        refs,
        &[
            ("steps", "4"),
            ("cfg", "4"),
            ("t5_tokens", "16"),
            ("seed", "11"),
            ("slg_scale", "2.8"),
            ("slg_layers", "1"),
            ("slg_start", "0.1"),
            ("slg_stop", "0.75"),
        ],
    );
    assert!(
        latent <= 1e-3 && image <= 1e-3,
        "slg {latent:.2e} {image:.2e}"
    );
    // The same without skip-layer guidance is the plain pipeline's picture, not this one.
    let (plain, _) = graph_pipeline_error_against(
        "sd3_text_to_image.yaml",
        "sd3_pipeline",
        refs,
        &[
            ("steps", "4"),
            ("cfg", "4"),
            ("t5_tokens", "16"),
            ("seed", "11"),
        ],
    );
    assert!(
        plain > 1e-2,
        "skip-layer guidance changed nothing ({plain:.2e})"
    );
}

#[test]
fn sd3_image_to_image_and_inpainting_graphs_match_their_pipelines() {
    // graphs/sd3_image_to_image.yaml against StableDiffusion3Img2ImgPipeline (strength 0.6: 3 of
    // 4 steps from the VAE's mean of init.png noised to the second sigma), and
    // graphs/sd3_inpaint.yaml against StableDiffusion3InpaintPipeline (strength 0.7, mask.png
    // binarized and taken at the latent's size; outside it the image latent at each step's
    // level). Both from ditflow's noise, seed 11. Tolerance 1e-3 as above.
    let sets = [
        ("steps", "4"),
        ("cfg", "4"),
        ("t5_tokens", "16"),
        ("seed", "11"),
    ];
    let refs = (
        "io_img2img.safetensors",
        "out.img2img_latent",
        "out.img2img_image",
    );
    let (latent, image) =
        graph_pipeline_error_against("sd3_image_to_image.yaml", "sd3_pipeline", refs, &sets);
    assert!(
        latent <= 1e-3 && image <= 1e-3,
        "img2img {latent:.2e} {image:.2e}"
    );
    let refs = (
        "io_img2img.safetensors",
        "out.inpaint_latent",
        "out.inpaint_image",
    );
    let (latent, image) =
        graph_pipeline_error_against("sd3_inpaint.yaml", "sd3_pipeline", refs, &sets);
    assert!(
        latent <= 1e-3 && image <= 1e-3,
        "inpaint {latent:.2e} {image:.2e}"
    );
    // graphs/sd3_inpaint_model.yaml: a 33-channel inpainting transformer that reads the mask
    // and the masked image's latent (MaskImage, VAEEncode) beside the latent, at strength 1,
    // against StableDiffusion3InpaintPipeline with it. Tolerance 1e-3 as above.
    let refs = ("io_inpaint_model.safetensors", "out.latent", "out.image");
    let (latent, image) =
        graph_pipeline_error_against("sd3_inpaint_model.yaml", "sd3_pipeline", refs, &sets);
    assert!(
        latent <= 1e-3 && image <= 1e-3,
        "inpainting model {latent:.2e} {image:.2e}"
    );
    // Without its masked image, the inpainting model is refused with a message naming it.
    let text = std::fs::read_to_string(common::repo().join("graphs/sd3_inpaint_model.yaml"))
        .unwrap()
        .replace(", masked_latent: masked_latent.latent", "");
    let g = Graph::from_yaml(
        &text,
        "sd3_inpaint_model.yaml",
        &common::repo().join("graphs"),
    )
    .unwrap();
    let opts = RunOptions {
        out_dir: common::temp_dir("graph-inpaint-model-bad"),
        ..RunOptions::default()
    };
    let report = session()
        .run(
            &g,
            &[("steps".to_string(), ditflow::ArgValue::Text("2".into()))],
            &opts,
        )
        .unwrap();
    let failed = format!("{:?}", report.failed);
    assert!(
        failed.contains("inpainting model") && failed.contains("masked_latent"),
        "{failed}"
    );
    // A strength that leaves no step is the node's error, not an empty run.
    let g = Graph::from_file(&common::repo().join("graphs/sd3_image_to_image.yaml")).unwrap();
    let args = [
        ("steps".to_string(), ditflow::ArgValue::Text("4".into())),
        ("denoise".to_string(), ditflow::ArgValue::Text("0".into())),
    ];
    let opts = RunOptions {
        out_dir: common::temp_dir("img2img-bad"),
        ..RunOptions::default()
    };
    let report = session().run(&g, &args, &opts).unwrap();
    let failed = format!("{:?}", report.failed);
    assert!(failed.contains("leaves no step"), "{failed}");
}

#[test]
fn flux_graph_matches_flux_pipeline() {
    // CLIP-L pooled + T5 tokens, 2x2 packing with the pipeline's image ids inside the model,
    // linspace sigmas with the dynamic shift for 16 tokens, distilled guidance 3.5:
    // graphs/flux_text_to_image.yaml against FluxPipeline. Tolerance 1e-3 as above.
    let (latent, image) = graph_pipeline_error(
        "flux_text_to_image.yaml",
        "flux_pipeline",
        &[
            ("steps", "4"),
            ("guidance", "3.5"),
            ("t5_tokens", "16"),
            ("seed", "12"),
        ],
    );
    assert!(latent <= 1e-3 && image <= 1e-3, "{latent:.2e} {image:.2e}");
    // True CFG: the pipeline's true_cfg_scale 2 with a negative prompt, both evaluations with the
    // distilled guidance, is the graph's cfg 2 (the two prompts batched).
    let refs = ("io_true_cfg.safetensors", "out.latent", "out.image");
    let (latent, image) = graph_pipeline_error_against(
        "flux_text_to_image.yaml",
        "flux_pipeline",
        refs,
        &[
            ("steps", "4"),
            ("guidance", "3.5"),
            ("t5_tokens", "16"),
            ("seed", "12"),
            ("cfg", "2"),
            ("negative", "a green square on a blue background"),
        ],
    );
    assert!(
        latent <= 1e-3 && image <= 1e-3,
        "true cfg {latent:.2e} {image:.2e}"
    );
    // Custom sigmas: FluxPipeline's own linspace(1, 1/4, 4) given as a list give its picture.
    let edited = "edited:flux_text_to_image.yaml:flow_sigmas: linspace,=>\
                  flow_sigmas: custom, sigmas: \"1.0, 0.75, 0.5, 0.25\",";
    let sets = [
        ("steps", "4"),
        ("guidance", "3.5"),
        ("t5_tokens", "16"),
        ("seed", "12"),
    ];
    let (latent, image) = graph_pipeline_error(edited, "flux_pipeline", &sets);
    assert!(
        latent <= 1e-3 && image <= 1e-3,
        "custom sigmas {latent:.2e} {image:.2e}"
    );
}

#[test]
fn flux_fill_graph_matches_flux_fill_pipeline() {
    // graphs/flux_fill.yaml against FluxFillPipeline: a Fill transformer (in_channels 2·64 +
    // 4·2², the mask folded 2×2 pixels per latent pixel for the tiny VAE) reading the masked
    // image's latent and the mask beside the latent, strength 1, guidance 30, no latent
    // blending. From ditflow's noise, seed 12. Tolerance 1e-3 as above.
    let sets = [
        ("steps", "4"),
        ("guidance", "30"),
        ("t5_tokens", "16"),
        ("seed", "12"),
    ];
    let refs = ("io_fill.safetensors", "out.latent", "out.image");
    let (latent, image) =
        graph_pipeline_error_against("flux_fill.yaml", "flux_pipeline", refs, &sets);
    assert!(latent <= 1e-3 && image <= 1e-3, "{latent:.2e} {image:.2e}");
    // A mask at the latent's size reaches the Fill model, which needs it at the image's: a
    // clear error naming the model and the sizes.
    let dir = common::temp_dir("flux-fill-bad");
    let small = dir.join("small_mask.png");
    let mut enc = png::Encoder::new(std::fs::File::create(&small).unwrap(), 8, 8);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()
        .unwrap()
        .write_image_data(&[255; 64])
        .unwrap();
    let text = std::fs::read_to_string(common::repo().join("graphs/flux_fill.yaml"))
        .unwrap()
        .replace(
            "mask: mask_in.image, masked_latent",
            "mask: small.image, masked_latent",
        )
        .replace(
            "nodes:\n",
            &format!("nodes:\n  small: {{type: LoadImage, inputs: {{path: {small:?}}}}}\n"),
        );
    let g = Graph::from_yaml(&text, "flux_fill.yaml", &common::repo().join("graphs")).unwrap();
    let args = [
        ("steps".to_string(), ditflow::ArgValue::Text("2".into())),
        (
            "t5_tokens".to_string(),
            ditflow::ArgValue::Text("16".into()),
        ),
    ];
    let opts = RunOptions {
        out_dir: dir,
        ..RunOptions::default()
    };
    let report = session().run(&g, &args, &opts).unwrap();
    let failed = format!("{:?}", report.failed);
    assert!(
        failed.contains("Flux Fill") && failed.contains("[1, 1, 16, 16]"),
        "{failed}"
    );
}

#[test]
fn conditioning_that_does_not_fit_the_model_is_a_clear_error() {
    // SD3 given plain T5 tokens (no pooled projections): the error names what the model reads
    // and what the conditioning gave. A negative encoded differently from the positive: the
    // error names the missing part.
    let dir = common::repo().join("tests/fixtures/parity/sd3_pipeline");
    let p = |n: &str| format!("{:?}", dir.join(n).to_string_lossy());
    let run = |positive: &str, negative: &str| {
        let yaml = format!(
            r#"version: 1
nodes:
  dit: {{type: LoadSD3, inputs: {{path: {t}}}}}
  t5: {{type: LoadTextEncoder, inputs: {{path: {t5}}}}}
  l: {{type: LoadTextEncoder, inputs: {{path: {l}}}}}
  g: {{type: LoadTextEncoder, inputs: {{path: {g}}}}}
  plain: {{type: TextEncode, inputs: {{encoder: t5.encoder, text: "a red circle"}}}}
  full: {{type: SD3TextEncode, inputs: {{clip_l: l.encoder, clip_g: g.encoder, t5: t5.encoder, text: "a red circle", t5_tokens: 16}}}}
  latent: {{type: EmptyLatent, inputs: {{width: 16, height: 16, channels: 16, downscale: 2}}}}
  sample: {{type: Sample, inputs: {{model: dit.model, positive: {positive}, negative: {negative}, latent: latent.latent, sampler: flow_euler, steps: 2, cfg: 2.0}}}}
outputs:
  latent: sample.latent
"#,
            t = p("transformer"),
            t5 = p("text_encoder_3"),
            l = p("text_encoder"),
            g = p("text_encoder_2"),
        );
        let g = Graph::from_yaml(&yaml, "mismatch.yaml", Path::new(".")).unwrap();
        let report = session().run(&g, &[], &RunOptions::default()).unwrap();
        let failed = report.failed.first().expect("Sample fails");
        assert_eq!(&*failed.node, "sample");
        failed.error.clone()
    };
    let msg = run("plain.conditioning", "plain.conditioning");
    assert!(
        msg.contains("pooled_projections")
            && msg.contains("the conditioning gave encoder_hidden_states"),
        "{msg}"
    );
    let msg = run("full.conditioning", "plain.conditioning");
    assert!(
        msg.contains("the negative conditioning has no 'pooled_projections'"),
        "{msg}"
    );
}

#[test]
fn guidance_settings_of_sample_compose_as_their_definitions_say() {
    // Sample on the tiny SD3 pipeline with the guidance pieces (their maths matches diffusers'
    // guiders in the samplers' tests): an empty guidance interval runs the conditional prompt
    // alone, bit for bit what cfg 1 gives; APG with eta 1 and no cap is CFG (within float32
    // rounding, 1e-5 of the largest value); with eta 0 it differs; a start after the stop is
    // refused, naming the node and the setting.
    let dir = common::repo().join("tests/fixtures/parity/sd3_pipeline");
    let p = |n: &str| format!("{:?}", dir.join(n).to_string_lossy());
    let run = |extra: &str| {
        let yaml = format!(
            r#"version: 1
nodes:
  dit: {{type: LoadSD3, inputs: {{path: {t}}}}}
  t5: {{type: LoadTextEncoder, inputs: {{path: {t5}}}}}
  l: {{type: LoadTextEncoder, inputs: {{path: {l}}}}}
  g: {{type: LoadTextEncoder, inputs: {{path: {g}}}}}
  pos: {{type: SD3TextEncode, inputs: {{clip_l: l.encoder, clip_g: g.encoder, t5: t5.encoder, text: "a red circle", t5_tokens: 16}}}}
  neg: {{type: SD3TextEncode, inputs: {{clip_l: l.encoder, clip_g: g.encoder, t5: t5.encoder, text: "", t5_tokens: 16}}}}
  latent: {{type: EmptyLatent, inputs: {{width: 16, height: 16, channels: 16, downscale: 2}}}}
  sample: {{type: Sample, inputs: {{model: dit.model, positive: pos.conditioning, negative: neg.conditioning, latent: latent.latent, sampler: flow_euler, steps: 3, seed: 4{extra}}}}}
outputs:
  latent: sample.latent
"#,
            t = p("transformer"),
            t5 = p("text_encoder_3"),
            l = p("text_encoder"),
            g = p("text_encoder_2"),
        );
        let g = Graph::from_yaml(&yaml, "guidance.yaml", Path::new(".")).unwrap();
        let report = session().run(&g, &[], &RunOptions::default()).unwrap();
        match report.output("latent").map(|v| &**v) {
            Some(ditflow::Value::Tensor(_, t)) => Ok(t.as_f32().to_vec()),
            _ => Err(report.failed.first().expect("a failure").clone()),
        }
    };
    let cond_only = run(", cfg: 1.0").unwrap();
    let empty = run(", cfg: 3.0, guidance_start: 0.0, guidance_stop: 0.0").unwrap();
    assert_eq!(cond_only, empty);
    let cfg = run(", cfg: 3.0").unwrap();
    let apg =
        run(", cfg: 3.0, guidance_method: apg, apg_eta: 1.0, apg_norm_threshold: 0.0").unwrap();
    let scale = cfg.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = cfg
        .iter()
        .zip(&apg)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= 1e-5 * scale, "APG eta 1 vs CFG: {err} of {scale}");
    let projected = run(", cfg: 3.0, guidance_method: apg, apg_eta: 0.0").unwrap();
    assert!(projected
        .iter()
        .zip(&cfg)
        .any(|(a, b)| (a - b).abs() > 1e-3));
    let f = run(", cfg: 3.0, guidance_start: 0.8, guidance_stop: 0.2").unwrap_err();
    assert_eq!(&*f.node, "sample");
    assert!(f.error.contains("guidance_start"), "{}", f.error);
}

/// The largest error of tensor `got` against `out.{name}` of `io`, relative to the largest
/// reference value.
fn relative_error(got: &ditflow::Value, io: &Path, name: &str) -> f64 {
    let ditflow::Value::Tensor(_, got) = got else {
        panic!("{name}: a tensor")
    };
    let (ws, want) = read(io, &format!("out.{name}"));
    assert_eq!(got.shape(), &ws[..], "{name}");
    common::relative_error(got.as_f32(), &want)
}

#[test]
fn sd3_controlnets_match_the_controlnet_pipeline() {
    // StableDiffusion3ControlNetPipeline on tiny models: the hint PNG encoded by the VAE (its
    // mean, InstantX's rule of no shift), the ControlNet run on each step's batched latents and
    // prompt with zero pooled projections, its residuals every 2 of the 4 base blocks (not after
    // the last, context_pre_only one). One ControlNet at 0.8; then two stacked (0.7 over
    // [0, 0.5] and 1.2 over [0.25, 1]), summed as SD3MultiControlNetModel sums them.
    // Tolerance 1e-3 relative to the largest reference value, latent and image.
    let dir = common::repo().join("tests/fixtures/parity/sd3_controlnet");
    let enc = common::repo().join("tests/fixtures/parity/sd3_pipeline");
    let p = |d: &Path, n: &str| format!("{:?}", d.join(n).to_string_lossy());
    let io = dir.join("io.safetensors");
    let run = |patches: &str, model: &str| {
        let yaml = format!(
            r#"version: 1
nodes:
  dit: {{type: LoadSD3, inputs: {{path: {t}}}}}
  vae: {{type: LoadVAE, inputs: {{path: {v}}}}}
  l: {{type: LoadTextEncoder, inputs: {{path: {l}}}}}
  g: {{type: LoadTextEncoder, inputs: {{path: {g}}}}}
  t5: {{type: LoadTextEncoder, inputs: {{path: {t5}}}}}
  cn_a: {{type: LoadSD3ControlNet, inputs: {{path: {a}}}}}
  cn_b: {{type: LoadSD3ControlNet, inputs: {{path: {b}}}}}
  hint_a: {{type: LoadImage, inputs: {{path: {ha}}}}}
  hint_b: {{type: LoadImage, inputs: {{path: {hb}}}}}
{patches}
  pos: {{type: SD3TextEncode, inputs: {{clip_l: l.encoder, clip_g: g.encoder, t5: t5.encoder, text: "a red circle on a blue background", t5_tokens: 16}}}}
  neg: {{type: SD3TextEncode, inputs: {{clip_l: l.encoder, clip_g: g.encoder, t5: t5.encoder, text: "", t5_tokens: 16}}}}
  latent: {{type: EmptyLatent, inputs: {{width: 16, height: 16, channels: 16, downscale: 2}}}}
  sample: {{type: Sample, inputs: {{model: {model}, positive: pos.conditioning, negative: neg.conditioning, latent: latent.latent, sampler: flow_euler, scheduler_config: {s}, flow_sigmas: scheduler, steps: 4, cfg: 4.0, seed: 13}}}}
  decode: {{type: VAEDecode, inputs: {{vae: vae.vae, latent: sample.latent}}}}
outputs:
  latent: sample.latent
  image: decode.image
"#,
            t = p(&dir, "transformer"),
            v = p(&dir, "vae"),
            a = p(&dir, "controlnet_a"),
            b = p(&dir, "controlnet_b"),
            ha = p(&dir, "hint_a.png"),
            hb = p(&dir, "hint_b.png"),
            l = p(&enc, "text_encoder"),
            g = p(&enc, "text_encoder_2"),
            t5 = p(&enc, "text_encoder_3"),
            s = p(&enc, "scheduler/scheduler_config.json"),
        );
        let g = Graph::from_yaml(&yaml, "controlnet.yaml", Path::new(".")).unwrap();
        let report = session().run(&g, &[], &RunOptions::default()).unwrap();
        assert!(report.ok(), "{:?}", report.failed);
        (
            report.output("latent").unwrap().clone(),
            report.output("image").unwrap().clone(),
        )
    };
    let (latent, image) = run(
        "  one: {type: ApplySD3ControlNet, inputs: {model: dit.model, controlnet: cn_a.controlnet, vae: vae.vae, image: hint_a.image, strength: 0.8}}",
        "one.model",
    );
    let (le, ie) = (
        relative_error(&latent, &io, "latent_single"),
        relative_error(&image, &io, "image_single"),
    );
    eprintln!("one SD3 ControlNet: latent {le:.2e}, image {ie:.2e}");
    assert!(le <= 1e-3 && ie <= 1e-3, "{le:.2e} {ie:.2e}");
    let (latent, image) = run(
        "  one: {type: ApplySD3ControlNet, inputs: {model: dit.model, controlnet: cn_a.controlnet, vae: vae.vae, image: hint_a.image, strength: 0.7, start: 0.0, end: 0.5}}\n  two: {type: ApplySD3ControlNet, inputs: {model: one.model, controlnet: cn_b.controlnet, vae: vae.vae, image: hint_b.image, strength: 1.2, start: 0.25, end: 1.0}}",
        "two.model",
    );
    let (le, ie) = (
        relative_error(&latent, &io, "latent_multi"),
        relative_error(&image, &io, "image_multi"),
    );
    eprintln!("two SD3 ControlNets: latent {le:.2e}, image {ie:.2e}");
    assert!(le <= 1e-3 && ie <= 1e-3, "{le:.2e} {ie:.2e}");
}

/// A FluxPipeline-like graph on the flux_pipeline fixture's encoders and scheduler: `dit` from
/// `transformer`, `vae` from `vae`, the `extra` nodes, then 4 flow-matching steps (guidance 3.5)
/// of the model `model` from `seed`, decoded; outputs `latent`, `image` and `extra_outputs`.
const EMPTY_LATENT_16: &str = "{width: 16, height: 16, channels: 16, downscale: 2}";

/// The Flux sampling graph of the pipeline fixtures: a 16x16 picture from a 2x VAE, unless
/// `EMPTY_LATENT_16` is replaced by the caller.
fn flux_sample_graph(
    transformer: &Path,
    vae: &Path,
    extra: &str,
    model: &str,
    seed: u64,
    extra_outputs: &str,
) -> String {
    let enc = common::repo().join("tests/fixtures/parity/flux_pipeline");
    let p = |d: &Path| format!("{:?}", d.to_string_lossy());
    format!(
        r#"version: 1
nodes:
  dit: {{type: LoadFlux, inputs: {{path: {t}}}}}
  vae: {{type: LoadVAE, inputs: {{path: {v}}}}}
  clip: {{type: LoadTextEncoder, inputs: {{path: {c}}}}}
  t5: {{type: LoadTextEncoder, inputs: {{path: {t5}}}}}
{extra}
  pos: {{type: FluxTextEncode, inputs: {{clip: clip.encoder, t5: t5.encoder, text: "a red circle on a blue background", t5_tokens: 16}}}}
  latent: {{type: EmptyLatent, inputs: {EMPTY_LATENT_16}}}
  sample: {{type: Sample, inputs: {{model: {model}, positive: pos.conditioning, latent: latent.latent, sampler: flow_euler, scheduler_config: {s}, steps: 4, cfg: 1.0, guidance: 3.5, seed: {seed}}}}}
  decode: {{type: VAEDecode, inputs: {{vae: vae.vae, latent: sample.latent}}}}
outputs:
  latent: sample.latent
  image: decode.image
{extra_outputs}"#,
        t = p(transformer),
        v = p(vae),
        c = p(&enc.join("text_encoder")),
        t5 = p(&enc.join("text_encoder_2")),
        s = p(&enc.join("scheduler/scheduler_config.json")),
    )
}

#[test]
fn flux_controlnets_match_the_controlnet_pipeline() {
    // FluxControlNetPipeline on tiny models: the hint PNG encoded by the VAE (mean, shifted,
    // scaled) and packed, the ControlNet run on each step's packed latents with the pipeline's
    // ids and guidance, its residuals every ceil(2/1) double and ceil(4/2) single base blocks.
    // A plain ControlNet at 0.8; a union one in mode 1 (its embedding prepended to the text) at
    // 1.1 over [0.25, 0.75]. Tolerance 1e-3 relative to the largest reference value.
    let dir = common::repo().join("tests/fixtures/parity/flux_controlnet");
    let p = |d: &Path, n: &str| format!("{:?}", d.join(n).to_string_lossy());
    let io = dir.join("io.safetensors");
    for (name, patch) in [
        ("plain", "{type: ApplyFluxControlNet, inputs: {model: dit.model, controlnet: cn.controlnet, vae: vae.vae, image: hint.image, strength: 0.8}}"),
        ("union", "{type: ApplyFluxControlNet, inputs: {model: dit.model, controlnet: union.controlnet, vae: vae.vae, image: hint.image, mode: 1, strength: 1.1, start: 0.25, end: 0.75}}"),
    ] {
        let extra = format!(
            "  cn: {{type: LoadFluxControlNet, inputs: {{path: {a}}}}}\n  union: {{type: LoadFluxControlNet, inputs: {{path: {u}}}}}\n  hint: {{type: LoadImage, inputs: {{path: {h}}}}}\n  patched: {patch}",
            a = p(&dir, "controlnet"),
            u = p(&dir, "controlnet_union"),
            h = p(&dir, "hint.png"),
        );
        let yaml = flux_sample_graph(
            &dir.join("transformer"),
            &dir.join("vae"),
            &extra,
            "patched.model",
            14,
            "",
        );
        let g = Graph::from_yaml(&yaml, "flux_controlnet.yaml", Path::new(".")).unwrap();
        let report = session().run(&g, &[], &RunOptions::default()).unwrap();
        assert!(report.ok(), "{name}: {:?}", report.failed);
        let le = relative_error(report.output("latent").unwrap(), &io, &format!("latent_{name}"));
        let ie = relative_error(report.output("image").unwrap(), &io, &format!("image_{name}"));
        eprintln!("Flux ControlNet ({name}): latent {le:.2e}, image {ie:.2e}");
        assert!(le <= 1e-3 && ie <= 1e-3, "{name}: {le:.2e} {ie:.2e}");
    }
}

#[test]
fn an_xlabs_flux_controlnet_matches_the_controlnet_pipeline() {
    // FluxControlNetPipeline with an XLabs-style ControlNet: the 64x64 hint image in [-1, 1]
    // through the ControlNet's input hint block (8x smaller, packed 2x2), no VAE; its two double
    // blocks' residuals repeat over the base's four (0, 1, 0, 1). At strength 0.9 over an 8x
    // VAE's 8x8 latent. Tolerance 1e-3 relative to the largest reference value.
    let dir = common::repo().join("tests/fixtures/parity/flux_controlnet_xlabs");
    let p = |n: &str| format!("{:?}", dir.join(n).to_string_lossy());
    let io = dir.join("io.safetensors");
    let extra = format!(
        "  cn: {{type: LoadFluxControlNet, inputs: {{path: {c}}}}}\n  hint: {{type: LoadImage, inputs: {{path: {h}}}}}\n  patched: {{type: ApplyFluxControlNet, inputs: {{model: dit.model, controlnet: cn.controlnet, image: hint.image, strength: 0.9}}}}",
        c = p("controlnet"),
        h = p("hint.png"),
    );
    let yaml = flux_sample_graph(
        &dir.join("transformer"),
        &dir.join("vae"),
        &extra,
        "patched.model",
        15,
        "",
    )
    .replace(
        EMPTY_LATENT_16,
        "{width: 64, height: 64, channels: 16, downscale: 8}",
    );
    let g = Graph::from_yaml(&yaml, "flux_controlnet_xlabs.yaml", Path::new(".")).unwrap();
    let report = session().run(&g, &[], &RunOptions::default()).unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    let le = relative_error(report.output("latent").unwrap(), &io, "latent_xlabs");
    let ie = relative_error(report.output("image").unwrap(), &io, "image_xlabs");
    eprintln!("XLabs Flux ControlNet: latent {le:.2e}, image {ie:.2e}");
    assert!(le <= 1e-3 && ie <= 1e-3, "{le:.2e} {ie:.2e}");
}

#[test]
fn hint_preprocessors_match_opencv_and_pil() {
    // CannyEdges against cv2.Canny on cv2's grey (every pixel the same: tolerance 0), and
    // ResizeImage (stretch) against PIL's bilinear resize in float mode (tolerance 1e-5
    // absolute), on a 48x40 picture of shapes, a gradient and noise.
    let dir = common::repo().join("tests/fixtures/preprocess");
    let io = dir.join("io.safetensors");
    let yaml = format!(
        r#"version: 1
nodes:
  pic: {{type: LoadImage, inputs: {{path: {p:?}}}}}
  c1: {{type: CannyEdges, inputs: {{image: pic.image, low: 100, high: 200}}}}
  c2: {{type: CannyEdges, inputs: {{image: pic.image, low: 50, high: 120}}}}
  r1: {{type: ResizeImage, inputs: {{image: pic.image, width: 32, height: 24, fit: stretch}}}}
  r2: {{type: ResizeImage, inputs: {{image: pic.image, width: 80, height: 64, fit: stretch}}}}
  r3: {{type: ResizeImage, inputs: {{image: pic.image, width: 30, height: 50, fit: stretch}}}}
outputs:
  c1: c1.image
  c2: c2.image
  r1: r1.image
  r2: r2.image
  r3: r3.image
"#,
        p = dir.join("picture.png").to_string_lossy()
    );
    let g = Graph::from_yaml(&yaml, "preprocess.yaml", Path::new(".")).unwrap();
    let report = session().run(&g, &[], &RunOptions::default()).unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    let tensor = |name: &str| match &**report.output(name).unwrap() {
        ditflow::Value::Tensor(_, t) => t.as_f32().to_vec(),
        _ => panic!("{name}: a tensor"),
    };
    for (out, reference) in [("c1", "out.canny_100_200"), ("c2", "out.canny_50_120")] {
        let got = tensor(out);
        let (_, want) = read(&io, reference);
        // Ours is [h, w, 3] in [0, 1]; OpenCV's [h, w] in {0, 255}.
        let differ = want
            .iter()
            .enumerate()
            .filter(|(i, w)| (got[i * 3] * 255.0 - **w).abs() > 0.5)
            .count();
        eprintln!("{reference}: {differ} of {} pixels differ", want.len());
        assert_eq!(differ, 0, "{reference}");
    }
    for (out, reference) in [
        ("r1", "out.resize_32x24"),
        ("r2", "out.resize_80x64"),
        ("r3", "out.resize_30x50"),
    ] {
        let got = tensor(out);
        let (_, want) = read(&io, reference);
        assert_eq!(got.len(), want.len(), "{reference}");
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{reference}: largest difference {err:.2e}");
        assert!(err <= 1e-5, "{reference}: {err}");
    }
}

#[test]
fn a_bf16_checkpoint_runs_on_its_bf16_weights_exactly() {
    // The Flux dev fixture saved in bf16, and in f32 holding the same bf16-rounded values: the
    // bf16 linear weights are read as they are (converted while the GEMM packs them, with no
    // f32 copy kept), so the two forwards agree bit for bit (tolerance 0).
    let src = common::repo().join("tests/fixtures/parity/flux_dev");
    let bytes = std::fs::read(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut bf16: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut rounded: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in st.tensors() {
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        let vals: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let halves: Vec<half::bf16> = vals.iter().map(|&v| half::bf16::from_f32(v)).collect();
        bf16.push((
            name.clone(),
            t.shape().to_vec(),
            halves
                .iter()
                .flat_map(|h| h.to_bits().to_le_bytes())
                .collect(),
        ));
        rounded.push((
            name,
            t.shape().to_vec(),
            halves
                .iter()
                .flat_map(|h| h.to_f32().to_le_bytes())
                .collect(),
        ));
    }
    let write =
        |tag: &str, dtype: safetensors::Dtype, tensors: &[(String, Vec<usize>, Vec<u8>)]| {
            let dir = common::temp_dir(&format!("bf16-{tag}"));
            std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
            let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
                .iter()
                .map(|(n, s, b)| {
                    (
                        n.clone(),
                        safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
                    )
                })
                .collect();
            let data = safetensors::tensor::serialize(views, None).unwrap();
            std::fs::write(dir.join("diffusion_pytorch_model.safetensors"), data).unwrap();
            dir
        };
    let outputs: Vec<Vec<f32>> = [
        write("bf16", safetensors::Dtype::BF16, &bf16),
        write("rounded", safetensors::Dtype::F32, &rounded),
    ]
    .iter()
    .map(|dir| {
        let out_dir = dir.join("out");
        let yaml = format!(
            "version: 1\nnodes:\n  m: {{type: LoadFlux, inputs: {{path: {:?}}}}}\n  f: {{type: Forward, inputs: {{model: m.model, inputs: {:?}, outputs: out.safetensors}}}}\noutputs:\n  path: f.path\n",
            dir.to_string_lossy(),
            src.join("io.safetensors").to_string_lossy()
        );
        let g = Graph::from_yaml(&yaml, "bf16.yaml", Path::new(".")).unwrap();
        let opts = RunOptions {
            out_dir: out_dir.clone(),
            ..RunOptions::default()
        };
        let report = session().run(&g, &[], &opts).unwrap();
        assert!(report.ok(), "{:?}", report.failed);
        read(&out_dir.join("out.safetensors"), "out.sample").1
    })
    .collect();
    assert_eq!(outputs[0], outputs[1]);
    // And within bf16's rounding of diffusers' f32 result.
    let (_, want) = read(&src.join("io.safetensors"), "out.sample");
    let err = common::relative_error(&outputs[0], &want);
    eprintln!("bf16 Flux against diffusers' f32: relative error {err:.2e}");
    assert!(err < 5e-2, "{err}");
}

#[test]
fn the_flux_ip_adapter_matches_flux_pipeline() {
    // CLIPVisionModelWithProjection on the reference PNG (CLIPImageProcessor's normalisation;
    // at 32x32 its resize and crop keep it as it is) against transformers (1e-4), then
    // FluxPipeline with diffusers' load_ip_adapter at scale 0.7: the image tokens, and each
    // double block's image queries attending to them, added after the block (1e-3, latent and
    // image). Scale 0 must differ (the adapter is active).
    let dir = common::repo().join("tests/fixtures/parity/flux_ip_adapter");
    let base = common::repo().join("tests/fixtures/parity/flux_pipeline");
    let p = |d: &Path, n: &str| format!("{:?}", d.join(n).to_string_lossy());
    let io = dir.join("io.safetensors");
    let run = |scale: f64| {
        let extra = format!(
            "  vision: {{type: LoadImageEncoder, inputs: {{path: {ie}}}}}\n  ref: {{type: LoadImage, inputs: {{path: {r}}}}}\n  embeds: {{type: CLIPVisionEncode, inputs: {{encoder: vision.encoder, image: ref.image}}}}\n  ip: {{type: ApplyFluxIPAdapter, inputs: {{model: dit.model, path: {ip}, image_embeds: embeds.image_embeds, scale: {scale}}}}}",
            ie = p(&dir, "image_encoder"),
            r = p(&dir, "reference.png"),
            ip = p(&dir, "ip_adapter.safetensors"),
        );
        let yaml = flux_sample_graph(
            &base.join("transformer"),
            &base.join("vae"),
            &extra,
            "ip.model",
            15,
            "  embeds: embeds.image_embeds\n",
        );
        let g = Graph::from_yaml(&yaml, "ip_adapter.yaml", Path::new(".")).unwrap();
        let report = session().run(&g, &[], &RunOptions::default()).unwrap();
        assert!(report.ok(), "{:?}", report.failed);
        (
            relative_error(report.output("embeds").unwrap(), &io, "image_embeds"),
            relative_error(report.output("latent").unwrap(), &io, "latent"),
            relative_error(report.output("image").unwrap(), &io, "image"),
        )
    };
    let (ee, le, ie) = run(0.7);
    eprintln!("Flux IP-Adapter: image embeds {ee:.2e}, latent {le:.2e}, image {ie:.2e}");
    assert!(ee <= 1e-4, "{ee:.2e}");
    assert!(le <= 1e-3 && ie <= 1e-3, "{le:.2e} {ie:.2e}");
    let (_, off, _) = run(0.0);
    eprintln!("without the adapter: latent {off:.2e}");
    assert!(off > 1e-2, "the adapter changes the result ({off:.2e})");
}

#[test]
fn an_all_in_one_sd3_file_gives_the_folders_result_bit_for_bit() {
    // One file holding the transformer (Stability AI's layout), the VAE (the original LDM
    // layout under first_stage_model.) and the three text encoders (text_encoders.*): the SD3
    // pipeline run from it equals the run from the diffusers folders bit for bit (tolerance 0).
    // The tiny models' configs are given (their heads and norm groups are not in their shapes).
    let file =
        common::repo().join("tests/fixtures/parity/sd3_all_in_one/sd3-tiny-all-in-one.safetensors");
    let enc = common::repo().join("tests/fixtures/parity/sd3_pipeline");
    let p = |d: &Path, n: &str| format!("{:?}", d.join(n).to_string_lossy());
    let f = format!("{:?}", file.to_string_lossy());
    let run = |loaders: &str| {
        let yaml = format!(
            r#"version: 1
nodes:
{loaders}
  pos: {{type: SD3TextEncode, inputs: {{clip_l: l.encoder, clip_g: g.encoder, t5: t5.encoder, text: "a red circle on a blue background", t5_tokens: 16}}}}
  neg: {{type: SD3TextEncode, inputs: {{clip_l: l.encoder, clip_g: g.encoder, t5: t5.encoder, text: "", t5_tokens: 16}}}}
  latent: {{type: EmptyLatent, inputs: {{width: 16, height: 16, channels: 16, downscale: 2}}}}
  sample: {{type: Sample, inputs: {{model: dit.model, positive: pos.conditioning, negative: neg.conditioning, latent: latent.latent, sampler: flow_euler, scheduler_config: {s}, flow_sigmas: scheduler, steps: 3, cfg: 4.0, seed: 5}}}}
  decode: {{type: VAEDecode, inputs: {{vae: vae.vae, latent: sample.latent}}}}
outputs:
  image: decode.image
"#,
            s = p(&enc, "scheduler/scheduler_config.json"),
        );
        let g = Graph::from_yaml(&yaml, "all_in_one.yaml", Path::new(".")).unwrap();
        let report = session().run(&g, &[], &RunOptions::default()).unwrap();
        assert!(report.ok(), "{:?}", report.failed);
        match &**report.output("image").unwrap() {
            ditflow::Value::Tensor(_, t) => t.as_f32().to_vec(),
            _ => panic!("an image"),
        }
    };
    let folders = run(&format!(
        "  dit: {{type: LoadSD3, inputs: {{path: {}}}}}\n  vae: {{type: LoadVAE, inputs: {{path: {}}}}}\n  l: {{type: LoadTextEncoder, inputs: {{path: {}}}}}\n  g: {{type: LoadTextEncoder, inputs: {{path: {}}}}}\n  t5: {{type: LoadTextEncoder, inputs: {{path: {}}}}}",
        p(&enc, "transformer"),
        p(&enc, "vae"),
        p(&enc, "text_encoder"),
        p(&enc, "text_encoder_2"),
        p(&enc, "text_encoder_3"),
    ));
    let te = |name: &str, component: &str, folder: &str| {
        format!(
            "  {name}: {{type: LoadTextEncoder, inputs: {{path: {f}, component: {component}, tokenizer: {t}, config: {c}}}}}",
            t = p(&enc, folder),
            c = p(&enc, &format!("{folder}/config.json")),
        )
    };
    let single = run(&[
        format!("  dit: {{type: LoadSD3, inputs: {{path: {f}}}}}"),
        format!(
            "  vae: {{type: LoadVAE, inputs: {{path: {f}, config: {}}}}}",
            p(&enc, "vae/config.json")
        ),
        te("l", "clip_l", "text_encoder"),
        te("g", "clip_g", "text_encoder_2"),
        te("t5", "t5xxl", "text_encoder_3"),
    ]
    .join("\n"));
    assert_eq!(single, folders);
}

#[test]
fn single_files_without_configs_are_read_from_their_shapes() {
    // A bare VAE in the LDM layout and an encoders file (CLIP-L with projection, T5 under
    // text_encoders.*) with no configs: the loaders infer them from the shapes (32-group VAE
    // norms, 64-wide CLIP heads, T5's heads from its relative-position table) and match
    // diffusers and transformers (1e-4).
    let dir = common::repo().join("tests/fixtures/parity/inferable");
    let s = session();
    for (loader, port, extra, io, outputs) in [
        ("LoadVAE", "vae", "", "vae_io", &["decoded"][..]),
        (
            "LoadTextEncoder",
            "encoder",
            ", component: clip_l",
            "clip_io",
            &["last_hidden_state", "text_embeds"][..],
        ),
        (
            "LoadTextEncoder",
            "encoder",
            ", component: t5xxl",
            "t5_io",
            &["last_hidden_state"][..],
        ),
    ] {
        let file = if loader == "LoadVAE" {
            "vae_ldm.safetensors"
        } else {
            "encoders.safetensors"
        };
        let out_dir = common::temp_dir(&format!("inferable-{io}"));
        let yaml = format!(
            "version: 1\nnodes:\n  m: {{type: {loader}, inputs: {{path: {:?}{extra}}}}}\n  f: {{type: Forward, inputs: {{model: m.{port}, inputs: {:?}, outputs: out.safetensors}}}}\noutputs:\n  path: f.path\n",
            dir.join(file).to_string_lossy(),
            dir.join(format!("{io}.safetensors")).to_string_lossy(),
        );
        let g = Graph::from_yaml(&yaml, "inferable.yaml", Path::new(".")).unwrap();
        let opts = RunOptions {
            out_dir: out_dir.clone(),
            ..RunOptions::default()
        };
        let report = s.run(&g, &[], &opts).unwrap();
        assert!(report.ok(), "{io}: {:?}", report.failed);
        for out in outputs {
            let (ws, want) = read(
                &dir.join(format!("{io}.safetensors")),
                &format!("out.{out}"),
            );
            let (gs, got) = read(&out_dir.join("out.safetensors"), &format!("out.{out}"));
            assert_eq!(gs, ws, "{io}.{out}");
            let err = common::relative_error(&got, &want);
            eprintln!("{io}.{out}: relative error {err:.2e}");
            assert!(err <= 1e-4, "{io}.{out}: {err}");
        }
    }
}

/// Writes a `size`×`size` grey RGB PNG.
fn grey_png(path: &Path, size: u32) {
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), size, size);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().unwrap();
    w.write_image_data(&vec![128u8; (size * size * 3) as usize])
        .unwrap();
}

#[test]
fn controlnets_that_do_not_fit_are_clear_errors() {
    // A hint image of another size than the picture (refused when the step runs, naming both
    // shapes); an SD3 ControlNet on a Flux model and a Flux one on SD3 (refused, naming the
    // model's stacks); a union ControlNet without a mode; a
    // feature cache over a ControlNet, and a ControlNet under a cache (refused either way: the
    // cache would skip blocks whose residuals must be fresh).
    let dir = common::repo().join("tests/fixtures/parity/sd3_controlnet");
    let enc = common::repo().join("tests/fixtures/parity/sd3_pipeline");
    let tmp = common::temp_dir("controlnet-misfit");
    grey_png(&tmp.join("big.png"), 32);
    let p = |d: &Path, n: &str| format!("{:?}", d.join(n).to_string_lossy());
    let fail = |nodes: &str, output: &str| -> (String, String) {
        let yaml = format!(
            r#"version: 1
nodes:
  dit: {{type: LoadSD3, inputs: {{path: {t}}}}}
  flux: {{type: LoadFlux, inputs: {{path: {f}}}}}
  vae: {{type: LoadVAE, inputs: {{path: {v}}}}}
  t5: {{type: LoadTextEncoder, inputs: {{path: {t5}}}}}
  l: {{type: LoadTextEncoder, inputs: {{path: {l}}}}}
  g: {{type: LoadTextEncoder, inputs: {{path: {g}}}}}
  cn: {{type: LoadSD3ControlNet, inputs: {{path: {a}}}}}
  fcn: {{type: LoadFluxControlNet, inputs: {{path: {fu}}}}}
  hint: {{type: LoadImage, inputs: {{path: {h}}}}}
  big: {{type: LoadImage, inputs: {{path: {big}}}}}
  pos: {{type: SD3TextEncode, inputs: {{clip_l: l.encoder, clip_g: g.encoder, t5: t5.encoder, text: "a circle", t5_tokens: 16}}}}
  latent: {{type: EmptyLatent, inputs: {{width: 16, height: 16, channels: 16, downscale: 2}}}}
{nodes}
outputs:
  out: {output}
"#,
            t = p(&dir, "transformer"),
            f = p(&common::repo().join("tests/fixtures/parity"), "flux_dev"),
            v = p(&dir, "vae"),
            a = p(&dir, "controlnet_a"),
            fu = p(
                &common::repo().join("tests/fixtures/parity/flux_controlnet"),
                "controlnet_union"
            ),
            h = p(&dir, "hint_a.png"),
            big = p(&tmp, "big.png"),
            l = p(&enc, "text_encoder"),
            g = p(&enc, "text_encoder_2"),
            t5 = p(&enc, "text_encoder_3"),
        );
        let g = Graph::from_yaml(&yaml, "misfit.yaml", Path::new(".")).unwrap();
        let report = session().run(&g, &[], &RunOptions::default()).unwrap();
        let f = report.failed.first().expect("a node fails");
        (f.node.to_string(), f.error.clone())
    };
    let (node, msg) = fail(
        "  cn1: {type: ApplySD3ControlNet, inputs: {model: dit.model, controlnet: cn.controlnet, vae: vae.vae, image: big.image}}\n  s: {type: Sample, inputs: {model: cn1.model, positive: pos.conditioning, latent: latent.latent, sampler: flow_euler, steps: 1, cfg: 1.0}}",
        "s.latent",
    );
    assert_eq!(node, "s");
    assert!(
        msg.contains("[1, 16, 16, 16]")
            && msg.contains("[1, 16, 8, 8]")
            && msg.contains("SD3ControlNet"),
        "{msg}"
    );
    let (node, msg) = fail(
        "  cn1: {type: ApplySD3ControlNet, inputs: {model: flux.model, controlnet: cn.controlnet, vae: vae.vae, image: hint.image}}",
        "cn1.model",
    );
    assert_eq!(node, "cn1");
    assert!(
        msg.contains("controlnet_a")
            && msg.contains("needs an SD3 model")
            && msg.contains("single_transformer_blocks"),
        "{msg}"
    );
    let (_, msg) = fail(
        "  cn1: {type: ApplyFluxControlNet, inputs: {model: dit.model, controlnet: fcn.controlnet, vae: vae.vae, image: hint.image, mode: 1}}",
        "cn1.model",
    );
    assert!(
        msg.contains("needs a Flux model") && msg.contains("transformer_blocks (4 blocks)"),
        "{msg}"
    );
    let (_, msg) = fail(
        "  cn1: {type: ApplyFluxControlNet, inputs: {model: flux.model, controlnet: fcn.controlnet, vae: vae.vae, image: hint.image}}",
        "cn1.model",
    );
    assert!(
        msg.contains("controlnet_union") && msg.contains("needs a control mode"),
        "{msg}"
    );
    for nodes in [
        "  cn1: {type: ApplySD3ControlNet, inputs: {model: dit.model, controlnet: cn.controlnet, vae: vae.vae, image: hint.image}}\n  c: {type: FirstBlockCache, inputs: {model: cn1.model}}",
        "  c: {type: FirstBlockCache, inputs: {model: dit.model}}\n  cn1: {type: ApplySD3ControlNet, inputs: {model: c.model, controlnet: cn.controlnet, vae: vae.vae, image: hint.image}}",
    ] {
        let last = if nodes.ends_with("cn1.model}}") { "c.model" } else { "cn1.model" };
        let (_, msg) = fail(nodes, last);
        assert!(msg.contains("SD3ControlNet") && msg.contains("FirstBlockCache"), "{msg}");
    }
}

/// Copies fixture `name` into a fresh folder, rewriting its weights with `edit`.
fn broken_copy(
    name: &str,
    tag: &str,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> std::path::PathBuf {
    let src = common::repo().join("tests/fixtures/parity").join(name);
    let dst = common::temp_dir(&format!("broken-{name}-{tag}"));
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let file = "diffusion_pytorch_model.safetensors";
    let bytes = std::fs::read(src.join(file)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dst.join(file)).unwrap();
    dst
}

/// Loads `dir` with LoadDiffusionModel and returns the node's error.
fn load_error(session: &Session, dir: &Path) -> String {
    let yaml = format!("version: 1\nnodes:\n  m: {{type: LoadDiffusionModel, inputs: {{path: {:?}}}}}\noutputs:\n  m: m.model\n", dir.to_string_lossy());
    let g = Graph::from_yaml(&yaml, "load.yaml", Path::new(".")).unwrap();
    let report = session.run(&g, &[], &RunOptions::default()).unwrap();
    assert!(!report.ok(), "{} loaded", dir.display());
    report.failed[0].error.clone()
}

#[test]
fn bad_model_folders_are_clear_errors_naming_the_file_and_key() {
    let s = session();
    let missing = common::temp_dir("no-model").join("nope");
    let e = load_error(&s, &missing);
    assert!(
        e.contains("nope") && e.contains("no such model folder"),
        "{e}"
    );

    let wrong_class = broken_copy("pixart_sigma", "class", |_| {});
    let cfg = std::fs::read_to_string(wrong_class.join("config.json")).unwrap();
    std::fs::write(
        wrong_class.join("config.json"),
        cfg.replace("PixArtTransformer2DModel", "UNet2DConditionModel"),
    )
    .unwrap();
    let e = load_error(&s, &wrong_class);
    assert!(
        e.contains("config.json")
            && e.contains("\"UNet2DConditionModel\" is not a supported diffusion model"),
        "{e}"
    );

    let key = "transformer_blocks.1.attn2.to_k.weight";
    let dropped = broken_copy("pixart_sigma", "dropped", |t| t.retain(|(n, ..)| n != key));
    let e = load_error(&s, &dropped);
    assert!(
        e.contains(&dropped.display().to_string()) && e.contains(&format!("'{key}' is missing")),
        "{e}"
    );

    let reshaped = broken_copy("pixart_sigma", "reshaped", |t| {
        let w = t.iter_mut().find(|(n, ..)| n == "proj_out.weight").unwrap();
        w.2 = vec![w.2[1], w.2[0]];
    });
    let e = load_error(&s, &reshaped);
    assert!(
        e.contains("'proj_out.weight' has shape [24, 32], expected [32, 24]"),
        "{e}"
    );

    let truncated = broken_copy("pixart_sigma", "truncated", |_| {});
    let f = truncated.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_error(&s, &truncated);
    assert!(
        e.contains("diffusion_pytorch_model.safetensors")
            && e.contains("not a valid safetensors file"),
        "{e}"
    );
}

/// `Forward` of the model at `model` (a folder or a file, loaded by `loader`) on fixture `io`.
fn forward_output(session: &Session, loader: &str, model: &Path, io: &Path, tag: &str) -> Vec<f32> {
    let out_dir = common::temp_dir(&format!("parity-out-{tag}"));
    let yaml = format!(
        "version: 1\nnodes:\n  m: {{type: {loader}, inputs: {{path: {:?}}}}}\n  f: {{type: Forward, inputs: {{model: m.model, inputs: {:?}, outputs: out.safetensors}}}}\noutputs:\n  path: f.path\n",
        model.to_string_lossy(),
        io.to_string_lossy(),
    );
    let g = Graph::from_yaml(&yaml, "parity.yaml", Path::new(".")).unwrap();
    let opts = RunOptions {
        out_dir: out_dir.clone(),
        ..RunOptions::default()
    };
    let report = session.run(&g, &[], &opts).unwrap();
    assert!(report.ok(), "{tag}: {:?}", report.failed);
    read(&out_dir.join("out.safetensors"), "out.sample").1
}

#[test]
fn a_flux_single_file_in_the_bfl_layout_equals_the_diffusers_folder() {
    // The same tiny model as one BFL-layout file with ComfyUI's prefix (made from the folder by
    // tools/make_flux_fixtures.py and checked there against diffusers' converter): bit-identical
    // outputs.
    let s = session();
    let root = common::repo().join("tests/fixtures/parity");
    let io = root.join("flux_dev/io.safetensors");
    let folder = forward_output(&s, "LoadFlux", &root.join("flux_dev"), &io, "folder");
    let file = root.join("flux_dev_single/flux1-tiny.safetensors");
    let single = forward_output(&s, "LoadFlux", &file, &io, "single");
    assert_eq!(single, folder);
}

#[test]
fn flux_sd3_and_wan_ggufs_load_like_their_single_files() {
    // The tiny BFL-layout Flux written as GGUF by the gguf package (tools/make_gguf_fixtures.py):
    // all F32, bit-identical to the safetensors file; with the weights that hold whole Q8_0
    // blocks quantized (6 of 84 at this width), the forward's relative error against f32 is
    // printed, and held under 5e-2 as a sanity bound (Q8_0 keeps 8 bits per weight; measured
    // in the note).
    let s = session();
    let root = common::repo().join("tests/fixtures");
    let io = root.join("parity/flux_dev/io.safetensors");
    let file = root.join("parity/flux_dev_single/flux1-tiny.safetensors");
    let single = forward_output(&s, "LoadFlux", &file, &io, "gguf-single");
    let f32_gguf = root.join("gguf/flux/flux1-tiny-F32.gguf");
    assert_eq!(
        forward_output(&s, "LoadFlux", &f32_gguf, &io, "gguf-f32"),
        single
    );
    let q8 = root.join("gguf/flux/flux1-tiny-Q8_0.gguf");
    let quantized = forward_output(&s, "LoadFlux", &q8, &io, "gguf-q8");
    let err = common::relative_error(&quantized, &single);
    eprintln!("flux1-tiny Q8_0 GGUF forward: relative error {err:.2e} against f32");
    assert!(err > 0.0 && err < 5e-2, "{err:.2e}");
    // City96's SD3.5 GGUFs keep Stability AI's names: the tiny SD3.5 as an F32 GGUF gives its
    // single file's forward bit for bit.
    let io = root.join("parity/sd3_5/io.safetensors");
    let file = root.join("parity/sd3_5_single/sd3.5-tiny.safetensors");
    let gguf = root.join("gguf/sd3/sd3.5-tiny-F32.gguf");
    assert_eq!(
        forward_output(&s, "LoadSD3", &gguf, &io, "gguf-sd3"),
        forward_output(&s, "LoadSD3", &file, &io, "gguf-sd3-single")
    );
    // City96's Wan GGUFs keep Wan's original names (renamed here as diffusers' single-file
    // converter renames them): the tiny Wan in that layout as an F32 GGUF gives the diffusers
    // folder's forward bit for bit.
    let io = root.join("parity/wan/io.safetensors");
    let wan = root.join("gguf/wan/wan-tiny-F32.gguf");
    assert_eq!(
        forward_output(&s, "LoadWan", &wan, &io, "gguf-wan"),
        forward_output(
            &s,
            "LoadWan",
            &root.join("parity/wan"),
            &io,
            "gguf-wan-folder"
        )
    );
    // A GGUF of another architecture is refused by what its tensors are.
    let yaml = format!(
        "version: 1\nnodes:\n  m: {{type: LoadFlux, inputs: {{path: {:?}}}}}\noutputs:\n  m: m.model\n",
        gguf.to_string_lossy()
    );
    let g = Graph::from_yaml(&yaml, "wrong.yaml", Path::new(".")).unwrap();
    let report = s.run(&g, &[], &RunOptions::default()).unwrap();
    let err = format!("{:?}", report.failed);
    assert!(
        err.contains("not a Flux checkpoint") && err.contains("SD3"),
        "{err}"
    );
}

#[test]
fn a_pixart_gguf_loads_like_its_folder() {
    // The tiny PixArt-Σ in diffusers' names as GGUF (tools/make_gguf_fixtures.py), with its
    // config.json beside: all F32, bit-identical to the folder; with the weights that hold whole
    // Q8_0 blocks quantized (3 of 57 at this width), the forward's relative error against f32 is
    // printed and held under 5e-2 as a sanity bound (measured in the note).
    let s = session();
    let root = common::repo().join("tests/fixtures");
    let io = root.join("parity/pixart_sigma/io.safetensors");
    let folder = forward_output(
        &s,
        "LoadDiffusionModel",
        &root.join("parity/pixart_sigma"),
        &io,
        "pixart-folder",
    );
    let gguf = |name: &str| root.join("gguf/pixart").join(name);
    let f32_gguf = gguf("pixart-sigma-tiny-F32.gguf");
    let f32_out = forward_output(&s, "LoadDiffusionModel", &f32_gguf, &io, "pixart-f32");
    assert_eq!(f32_out, folder);
    let q8 = gguf("pixart-sigma-tiny-Q8_0.gguf");
    let quantized = forward_output(&s, "LoadDiffusionModel", &q8, &io, "pixart-q8");
    let err = common::relative_error(&quantized, &folder);
    eprintln!("pixart-sigma-tiny Q8_0 GGUF forward: relative error {err:.2e} against f32");
    assert!(err > 0.0 && err < 5e-2, "{err:.2e}");
    // Without its config.json beside it, or with another model's tensors, the file is refused
    // with a message that says why.
    let lone = common::temp_dir("pixart-lone").join("pixart.gguf");
    std::fs::copy(&f32_gguf, &lone).unwrap();
    let load = |path: &Path| {
        let yaml = format!(
            "version: 1\nnodes:\n  m: {{type: LoadDiffusionModel, inputs: {{path: {:?}}}}}\noutputs:\n  m: m.model\n",
            path.to_string_lossy()
        );
        let g = Graph::from_yaml(&yaml, "pixart.yaml", Path::new(".")).unwrap();
        format!(
            "{:?}",
            s.run(&g, &[], &RunOptions::default()).unwrap().failed
        )
    };
    let err = load(&lone);
    assert!(
        err.contains("needs its diffusers config.json beside it"),
        "{err}"
    );
    let err = load(&root.join("gguf/wan/wan-tiny-F32.gguf"));
    assert!(err.contains("not a PixArt or DiT checkpoint"), "{err}");
}

#[test]
fn a_checkpoint_given_to_the_wrong_loader_says_what_it_looks_like() {
    let s = session();
    let root = common::repo().join("tests/fixtures/parity");
    let sd3 = root.join("sd3_5/diffusion_pytorch_model.safetensors");
    let yaml = format!(
        "version: 1\nnodes:\n  m: {{type: LoadFlux, inputs: {{path: {:?}}}}}\noutputs:\n  m: m.model\n",
        sd3.to_string_lossy()
    );
    let g = Graph::from_yaml(&yaml, "wrong.yaml", Path::new(".")).unwrap();
    let report = s.run(&g, &[], &RunOptions::default()).unwrap();
    let err = format!("{:?}", report.failed);
    assert!(
        err.contains("not a Flux checkpoint") && err.contains("an SD3 transformer"),
        "{err}"
    );
}

#[test]
fn an_sd3_single_file_in_the_stability_layout_equals_the_diffusers_folder() {
    // The SD3.5 fixture as one file in Stability AI's layout with ComfyUI's prefix (checked in
    // tools/make_sd3_fixtures.py to convert back exactly with diffusers' converter): bit-identical
    // outputs, the skipped block included.
    let s = session();
    let root = common::repo().join("tests/fixtures/parity");
    let io = root.join("sd3_5/io.safetensors");
    let folder = forward_output(&s, "LoadSD3", &root.join("sd3_5"), &io, "sd3-folder");
    let file = root.join("sd3_5_single/sd3.5-tiny.safetensors");
    let single = forward_output(&s, "LoadSD3", &file, &io, "sd3-single");
    assert_eq!(single, folder);
}

#[test]
fn a_single_file_with_a_missing_key_names_the_file_and_the_key() {
    // The Flux BFL fixture without one of its keys.
    let root = common::repo().join("tests/fixtures/parity/flux_dev_single");
    let bytes = std::fs::read(root.join("flux1-tiny.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dropped = "model.diffusion_model.double_blocks.1.txt_attn.proj.weight";
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != dropped)
        .collect();
    let dir = common::temp_dir("flux-missing-key");
    let file = dir.join("flux1-broken.safetensors");
    safetensors::serialize_to_file(kept, None, &file).unwrap();
    std::fs::copy(root.join("config.json"), dir.join("config.json")).unwrap();
    let yaml = format!(
        "version: 1\nnodes:\n  m: {{type: LoadFlux, inputs: {{path: {:?}}}}}\noutputs:\n  m: m.model\n",
        file.to_string_lossy()
    );
    let g = Graph::from_yaml(&yaml, "broken.yaml", Path::new(".")).unwrap();
    let report = session().run(&g, &[], &RunOptions::default()).unwrap();
    let err = format!("{:?}", report.failed);
    assert!(
        err.contains("flux1-broken.safetensors")
            && err.contains("double_blocks.1.txt_attn.proj.weight"),
        "{err}"
    );
}

/// The edit graph with the source prompt as the edit and no guidance: the relative error of the
/// final latent against the encoded image (a reconstruction), and of the inverted latent's
/// spread against unit noise.
fn edit_reconstruction(sampler: &str, steps: &str) -> (f64, f64) {
    use ditflow::ArgValue;
    let g = Graph::from_file(&common::repo().join("graphs/sd3_edit.yaml")).unwrap();
    let sets = [
        ("sampler", sampler),
        ("steps", steps),
        ("cfg", "1"),
        ("prompt", "a red circle on a blue background"),
        ("t5_tokens", "16"),
    ];
    let args: Vec<(String, ArgValue)> = sets
        .iter()
        .map(|(k, v)| (k.to_string(), ArgValue::Text(v.to_string())))
        .collect();
    let opts = RunOptions {
        out_dir: common::temp_dir(&format!("edit-{sampler}")),
        ..RunOptions::default()
    };
    let report = session().run(&g, &args, &opts).unwrap();
    assert!(report.ok(), "{:?}", report.failed);
    let tensor = |name: &str| {
        let ditflow::Value::Tensor(_, t) = &**report.output(name).unwrap() else {
            panic!("a tensor")
        };
        t.as_f32().to_vec()
    };
    let (got, want, noise) = (tensor("latent"), tensor("source"), tensor("noise"));
    let std = (noise.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / noise.len() as f64).sqrt();
    (common::relative_error(&got, &want), std)
}

#[test]
fn rf_solver_inverts_and_resamples_an_image_closer_than_euler() {
    // Invert then sample back under the same prompt, on the tiny SD3 (shift 3): RF-Solver's
    // second-order steps come back closer to the image than Euler's at the same number of model
    // calls (8 RF-Solver steps = 16 calls against 16 Euler steps), and the inverted latent has
    // roughly the unit spread of noise. Measured: 8.8e-3 against 3.1e-2, spread 1.11.
    let (rf, rf_std) = edit_reconstruction("rf_solver", "8");
    let (euler, euler_std) = edit_reconstruction("flow_euler", "16");
    eprintln!("reconstruction: rf_solver {rf:.2e} (noise std {rf_std:.2}), flow_euler {euler:.2e} (std {euler_std:.2})");
    assert!(rf < euler, "rf_solver {rf:.2e} vs flow_euler {euler:.2e}");
    assert!(rf <= 0.05, "rf_solver reconstruction {rf:.2e}");
    assert!((0.5..2.0).contains(&rf_std), "inverted latent std {rf_std}");
}
